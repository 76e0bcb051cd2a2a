//! The fleet against the in-memory store: generations, replacement,
//! write-back, and changes from other nodes.

use std::sync::Arc;

use pulsebell_proto::{Health, Hello, Pulse};

use super::*;
use crate::store::{EventKind, MemoryStore};

fn hello(id: &str) -> Hello {
    Hello {
        protocol_version: pulsebell_proto::PROTOCOL_VERSION,
        device_id: id.into(),
        agent_version: "t".into(),
        boot_id: "boot".into(),
        hostname: "h".into(),
        arch: "x".into(),
        os: "o".into(),
        kernel: "k".into(),
        board_model: None,
        interval_ms: 1000,
        tags: vec!["t".into()],
        actions: vec![],
    }
}

async fn fleet(node: &str) -> (Arc<Fleet>, Arc<dyn Store>) {
    fleet_with(node, Config::default()).await
}

/// A fleet on `config` with device `d1` enrolled.
async fn fleet_with(node: &str, config: Config) -> (Arc<Fleet>, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let fleet = Fleet::load(Arc::new(config), node.into(), store.clone()).await.unwrap();
    fleet.enroll(&["d1".to_string()], false).await.unwrap();
    (fleet, store)
}

async fn connect(f: &Fleet, id: &str) -> (u64, super::OutboundRx) {
    let (tx, rx) = super::outbound_queue(8);
    let g = f.store().claim(id, f.node(), f.generation_floor(id)).await.unwrap();
    let a = f.connect(id, hello(id), tx, g).unwrap();
    assert_eq!(a.generation, g);
    (g, rx)
}

#[tokio::test]
async fn a_new_connection_replaces_the_old_and_the_old_ones_end_is_ignored() {
    let (f, store) = fleet("n1").await;
    let (g1, rx1) = connect(&f, "d1").await;
    assert_eq!(f.pulse("d1", g1, Pulse { seq: 1, health: Health::default() }, None), Pulsed::Accepted);
    let (g2, _rx2) = connect(&f, "d1").await;
    assert!(g2 > g1);
    match rx1.try_recv() {
        Ok(Outbound::Close(code, _, Reason::Replaced)) => assert_eq!(code, close::REPLACED),
        other => panic!("old connection not told to close: {other:?}"),
    }
    assert_eq!(
        f.pulse("d1", g1, Pulse { seq: 2, health: Health::default() }, None),
        Pulsed::Stale,
        "old generation refused"
    );
    assert!(!f.offline("d1", g1, Reason::Disconnected), "old generation cannot end the new one");
    assert_eq!(f.view("d1").unwrap().state, "online");
    assert_eq!(f.view("d1").unwrap().node.as_deref(), Some("n1"));
    // A stale claim (lower than what the fleet knows) is refused.
    let (tx, _rx) = super::outbound_queue(1);
    assert_eq!(f.connect("d1", hello("d1"), tx, g1).unwrap_err(), Refused::Superseded);
    let (tx, _rx) = super::outbound_queue(1);
    assert_eq!(f.connect("d1", hello("d1"), tx, g2).unwrap_err(), Refused::Superseded, "one claim, one connection");

    assert!(f.offline("d1", g2, Reason::Disconnected));
    let v = f.view("d1").unwrap();
    assert_eq!((v.state.as_str(), v.node, v.last_offline_reason.as_deref()), ("offline", None, Some("disconnected")));

    writeback::write_back(&f, None).await.unwrap();
    let events: Vec<(EventKind, Reason, u64)> =
        store.events(Some("d1"), 0, 100).await.unwrap().into_iter().map(|e| (e.kind, e.reason, e.generation)).collect();
    assert_eq!(
        events,
        [
            (EventKind::Online, Reason::Connected, g1),
            (EventKind::Online, Reason::Connected, g2),
            (EventKind::Offline, Reason::Disconnected, g2)
        ]
    );
    let saved = store.device_states().await.unwrap();
    assert_eq!(saved[0].1.generation, g2);
    assert!(!saved[0].1.online);
}

#[tokio::test]
async fn a_newer_owner_elsewhere_closes_the_local_connection() {
    let (f, _store) = fleet("n1").await;
    let (g1, rx) = connect(&f, "d1").await;
    // Node n2 took the device over with a newer generation.
    f.apply(&Change::Owner("d1".into(), Owner { node: Some("n2".into()), generation: g1 + 1, at_ms: 0, reason: None }));
    assert!(matches!(rx.try_recv(), Ok(Outbound::Close(_, _, Reason::Replaced))));
    assert!(f.sender("d1").is_none());
    let v = f.view("d1").unwrap();
    assert_eq!((v.node.as_deref(), v.generation), (Some("n2"), g1 + 1));
    // The session's own end arrives later and changes nothing.
    assert!(!f.offline("d1", g1, Reason::Replaced));
    assert_eq!(f.held_by("n2"), [("d1".to_string(), g1 + 1)]);
}

#[tokio::test]
async fn a_lost_nodes_device_is_declared_offline_once() {
    let (f, store) = fleet("n1").await;
    f.apply(&Change::Device(
        "d1".into(),
        DeviceRecord { online: true, generation: 4, last_seen_ms: Some(1), ..Default::default() },
    ));
    f.apply(&Change::Owner("d1".into(), Owner { node: Some("n3".into()), generation: 4, at_ms: 0, reason: None }));
    assert_eq!(f.view("d1").unwrap().state, "online");
    f.ended_elsewhere("d1", 4, Reason::CollectorLost);
    f.ended_elsewhere("d1", 4, Reason::CollectorLost);
    let v = f.view("d1").unwrap();
    assert_eq!((v.state.as_str(), v.last_offline_reason.as_deref()), ("offline", Some("collector_lost")));
    writeback::write_back(&f, None).await.unwrap();
    let events = store.events(Some("d1"), 0, 100).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].kind, events[0].reason, events[0].generation),
        (EventKind::Offline, Reason::CollectorLost, 4)
    );
}

#[tokio::test]
async fn revocation_closes_and_forgets() {
    let (f, _store) = fleet("n1").await;
    let (_g, rx) = connect(&f, "d1").await;
    assert!(f.revoke("d1").await.unwrap());
    assert!(matches!(rx.try_recv(), Ok(Outbound::Close(_, _, Reason::Revoked))));
    assert!(!f.exists("d1"));
    assert!(!f.revoke("d1").await.unwrap());
}

#[tokio::test]
async fn pulses_wait_for_the_sync_interval_but_liveness_does_not() {
    let mut cluster = Config::default();
    cluster.cluster.nats_urls = vec!["nats://127.0.0.1:4222".into()];
    // sled (the default) and cluster mode, each with its own key.
    for config in [Config::default(), cluster] {
        pulses_wait_for_the_sync_interval(config).await;
    }
    // "0s": every pulse goes out at the next write-back.
    let (f, _store) = fleet_with("n1", Config { sync_interval: Duration::ZERO, ..Config::default() }).await;
    let (g, _rx) = connect(&f, "d1").await;
    for seq in 1..3 {
        assert_eq!(f.pulse("d1", g, Pulse { seq, health: Health::default() }, None), Pulsed::Accepted);
        assert_eq!(f.take_batch(false).records.len(), 1, "sync_interval 0s: every pulse is written");
    }
}

async fn pulses_wait_for_the_sync_interval(config: Config) {
    let (f, _store) = fleet_with("n1", config).await;
    let (g, _rx) = connect(&f, "d1").await;
    assert_eq!(f.take_batch(false).records.len(), 1, "a new connection goes out at once");
    assert_eq!(f.pulse("d1", g, Pulse { seq: 1, health: Health::default() }, None), Pulsed::Accepted);
    assert_eq!(f.take_batch(false).records.len(), 1, "the first health goes out at once");
    assert_eq!(f.pulse("d1", g, Pulse { seq: 2, health: Health::default() }, None), Pulsed::Accepted);
    let b = f.take_batch(false);
    assert!(b.records.is_empty() && !b.complete, "a pulse waits for the sync interval");
    assert!(f.offline("d1", g, Reason::Silent));
    assert_eq!(f.take_batch(false).records.len(), 1, "going offline goes out at once");
    assert_eq!(f.pulse("d1", g, Pulse { seq: 3, health: Health::default() }, None), Pulsed::Accepted);
    assert_eq!(f.take_batch(false).records.len(), 1, "back online goes out at once");
    assert_eq!(f.pulse("d1", g, Pulse { seq: 4, health: Health::default() }, None), Pulsed::Accepted);
    assert!(f.take_batch(false).records.is_empty());
    let b = f.take_batch(true);
    assert_eq!((b.records.len(), b.complete), (1, true), "shutdown writes everything");
}

/// The dashboard's counts and tags are kept as devices change, not counted:
/// after every kind of change they equal a count of the fleet.
#[tokio::test]
async fn the_tally_follows_every_change() {
    let (f, _store) = fleet("n1").await;
    let summary = |f: &Fleet| {
        let state = f.lock();
        assert_eq!(state.tally, page::Tally::of(&state.devices), "the tally drifted from the fleet");
        let s = state.tally.summary();
        ((s.counts.devices, s.counts.online, s.counts.offline, s.counts.never_seen), s.tags)
    };
    let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    f.enroll(&["d2".to_string(), "d3".to_string()], false).await.unwrap();
    f.enroll_new("d4", tags(&["kiosk", "t"]), "pk").await.unwrap();
    assert_eq!(summary(&f), ((4, 0, 0, 4), tags(&["kiosk", "t"])));

    let (g1, _rx1) = connect(&f, "d1").await;
    let (g4, _rx4) = connect(&f, "d4").await; // its Hello repeats tag "t"
    assert_eq!(summary(&f), ((4, 2, 0, 2), tags(&["kiosk", "t"])));
    assert!(f.offline("d1", g1, Reason::Silent));
    assert_eq!(summary(&f).0, (4, 1, 1, 2));
    assert_eq!(
        f.pulse("d1", g1, Pulse { seq: 1, health: Health::default() }, None),
        Pulsed::Accepted,
        "back from silence"
    );
    assert_eq!(summary(&f).0, (4, 2, 0, 2));

    // Another node's device, its owner, and that owner's loss.
    let mut remote = hello("d2");
    remote.tags = tags(&["remote"]);
    let record =
        DeviceRecord { online: true, generation: 3, last_seen_ms: Some(1), hello: Some(remote), ..Default::default() };
    f.apply(&Change::Device("d2".into(), record));
    assert_eq!(summary(&f), ((4, 2, 1, 1), tags(&["kiosk", "remote", "t"])));
    f.apply(&Change::Owner("d2".into(), Owner { node: Some("n2".into()), generation: 3, at_ms: 0, reason: None }));
    assert_eq!(summary(&f).0, (4, 3, 0, 1));
    f.ended_elsewhere("d2", 3, Reason::CollectorLost);
    assert_eq!(summary(&f).0, (4, 2, 1, 1));

    // A rotated enrolment without the tag, a removal, a shutdown.
    let rotated = Enrolment { tags: vec![], ..f.lock().devices["d4"].enrolment.clone() };
    f.apply(&Change::Enrolled(rotated));
    assert_eq!(summary(&f), ((4, 2, 1, 1), tags(&["remote", "t"])));
    assert!(f.revoke("d2").await.unwrap());
    assert_eq!(summary(&f), ((3, 2, 0, 1), tags(&["t"])));
    assert!(f.offline("d4", g4, Reason::Disconnected));
    assert_eq!(f.close_all(close::GOING_AWAY, "bye", Reason::CollectorShutdown).len(), 1);
    assert_eq!(summary(&f).0, (3, 0, 2, 1));
    assert_eq!(f.counts(), (3, 0));
}

#[tokio::test]
async fn a_check_rule_sees_the_devices_whose_check_fails_and_no_others() {
    use crate::config::{RuleConfig, RuleRing, RuleWhen};
    use pulsebell_proto::{CheckDigest, CheckKind, CheckReport, CheckResult, CheckStatus};
    let (f, _) = fleet("n1").await;
    f.enroll(&["d2".to_string()], false).await.unwrap();
    let (g1, _rx1) = connect(&f, "d1").await;
    let (g2, _rx2) = connect(&f, "d2").await;
    let report = |status| CheckReport {
        full: true,
        results: vec![CheckResult {
            name: "app".into(),
            kind: CheckKind::Unit,
            status,
            summary: String::new(),
            output: String::new(),
            since_ms: 0,
        }],
    };
    let rule = RuleConfig {
        name: "r".into(),
        when: RuleWhen { check: Some("app".into()), status: None, state: None, for_: None },
        ring: RuleRing { action: "restart".into(), params: Default::default() },
        tags: vec![],
        cooldown: Duration::from_secs(60),
        max_per_hour: 1,
    };
    let holding = |f: &Fleet| f.rule_holds(&rule, true).into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    f.checks("d1", g1, report(CheckStatus::Critical));
    f.checks("d2", g2, report(CheckStatus::Ok));
    assert_eq!(holding(&f), ["d1"]);
    // A digest that agrees keeps it; recovery drops it.
    let digest = CheckDigest { critical: 1, ..CheckDigest::default() };
    assert_eq!(f.pulse("d1", g1, Pulse { seq: 1, health: Health::default() }, Some(digest)), Pulsed::Accepted);
    assert_eq!(holding(&f), ["d1"]);
    f.checks("d1", g1, report(CheckStatus::Ok));
    assert!(holding(&f).is_empty());
    // Failing again, then the device comes back as a version-1 agent: its
    // checks are forgotten, and with them the rule's interest.
    f.checks("d2", g2, report(CheckStatus::Critical));
    assert_eq!(holding(&f), ["d2"]);
    assert_eq!(f.pulse("d2", g2, Pulse { seq: 1, health: Health::default() }, None), Pulsed::Accepted);
    assert!(holding(&f).is_empty());
    // Revoked: gone from the index too (the debug assertion checks it).
    f.checks("d1", g1, report(CheckStatus::Warning));
    f.revoke("d1").await.unwrap();
    assert!(holding(&f).is_empty());
}

/// `pulses_stored` counts a pulse once a record carrying it is written: a
/// deferred device's pulses wait with it, and shutdown writes the rest.
#[tokio::test]
async fn pulses_count_as_stored_when_their_record_is_written() {
    use super::writeback::{write_back, write_back_with};
    let (f, _store) = fleet("n1").await;
    let (g, _rx) = connect(&f, "d1").await;
    let stored = |f: &Fleet| f.stats.pulses_stored.load(Ordering::Relaxed);
    assert_eq!(f.pulse("d1", g, Pulse { seq: 1, health: Health::default() }, None), Pulsed::Accepted);
    write_back(&f, None).await.unwrap();
    assert_eq!(stored(&f), 1, "the first health is written at once");
    for seq in 2..5 {
        assert_eq!(f.pulse("d1", g, Pulse { seq, health: Health::default() }, None), Pulsed::Accepted);
    }
    write_back(&f, None).await.unwrap();
    assert_eq!(stored(&f), 1, "pulse-only news waits for the sync interval, and so does its count");
    write_back_with(&f, None, true).await.unwrap();
    assert_eq!(stored(&f), 4, "shutdown writes every record, and every pulse in them counts");
    assert_eq!(f.stats.pulses_accepted.load(Ordering::Relaxed), 4);
}
