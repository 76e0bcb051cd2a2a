//! The JetStream store ([`NatsStore`]) against a real `nats-server`, below
//! the collector: batches larger than the client's limit of unacknowledged
//! publishes, and history kept as a stream.
//!
//! Skips without a `nats-server` >= 2.10 on PATH unless
//! `PULSEBELL_REQUIRE_NATS=1` (`scripts/install-nats` installs one).

use std::time::Duration;

use pulsebell_collector::config::ClusterConfig;
use pulsebell_collector::history::{Agg, Bucket};
use pulsebell_collector::store::{EventKind, EventRecord, NatsStore, Reason, Store};
use pulsebell_tests::nats::{nats_or_skip, NatsCluster};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

async fn store(cluster: &NatsCluster) -> NatsStore {
    let cfg = ClusterConfig { nats_urls: cluster.urls(), ..ClusterConfig::default() };
    NatsStore::connect(&cfg, "t1", Duration::from_secs(3600)).await.expect("connect to JetStream")
}

/// A reconnect storm ends thousands of connections in one write-back
/// round. The client allows 5,000 unacknowledged publishes and makes a
/// sender wait for a permit, so sending them all before awaiting any ack
/// would wait forever (it did: a collector hung at shutdown).
#[test]
fn a_batch_of_events_larger_than_the_clients_ack_window_is_stored_in_order() {
    let Some(_) = nats_or_skip("a_batch_of_events_larger_than_the_clients_ack_window_is_stored_in_order") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = NatsCluster::start(1, dir.path());
    runtime().block_on(async {
        let store = store(&cluster).await;
        let now = pulsebell_collector::clock::now_ms();
        // 6,000 devices, each online then offline: 12,000 events.
        let mut events = Vec::new();
        for d in 0..6000u64 {
            let device = format!("storm-{d:05}");
            events.push(EventRecord {
                device: device.clone(),
                kind: EventKind::Online,
                reason: Reason::Connected,
                at_ms: now + d,
                generation: 1,
                check: None,
            });
            events.push(EventRecord {
                device,
                kind: EventKind::Offline,
                reason: Reason::CollectorShutdown,
                at_ms: now + d + 1,
                generation: 1,
                check: None,
            });
        }
        tokio::time::timeout(Duration::from_secs(120), store.append_events(&events))
            .await
            .expect("12,000 events stored within 2 minutes (not stuck on the ack window)")
            .expect("events stored");
        let got = store.events(None, 0, 20_000).await.expect("read events");
        assert_eq!(got.len(), events.len(), "every event stored once");
        let one = store.events(Some("storm-04321"), 0, 10).await.expect("read one device's events");
        let kinds: Vec<EventKind> = one.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec![EventKind::Online, EventKind::Offline], "a device's events in order");
        // Sent again (a retried round): JetStream drops the duplicates.
        store.append_events(&events[..1000]).await.expect("events sent again");
        assert_eq!(store.events(None, 0, 20_000).await.expect("read events").len(), events.len());
    });
}

fn minute(m: u32, cpu: f64) -> Bucket {
    let agg = |v: f64| Agg { min: v, avg: v, max: v };
    Bucket { minute: m, samples: 6, cpu: agg(cpu), temp: None, mem: agg(1e6), load: agg(0.5) }
}

/// History on JetStream is a stream of rounds: a device's minutes come
/// back in order from any round, the last write of a minute wins (a
/// hand-over between nodes), other devices' minutes stay out, and
/// `since_minute` cuts older ones.
#[test]
fn history_rounds_fold_into_minutes_per_device() {
    let Some(_) = nats_or_skip("history_rounds_fold_into_minutes_per_device") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = NatsCluster::start(1, dir.path());
    runtime().block_on(async {
        let store = store(&cluster).await;
        // Minutes of the last hour (a round is published after its minutes).
        let now_minute = (pulsebell_collector::clock::now_ms() / 60_000) as u32;
        let m0 = now_minute - 30;
        let a = "pi.kitchen".to_string(); // `.` in an id: keys and subjects spell it `=`
        let b = "pi-barn".to_string();
        store
            .put_history(&[
                (a.clone(), minute(m0, 10.0)),
                (a.clone(), minute(m0 + 1, 11.0)),
                (b.clone(), minute(m0, 50.0)),
            ])
            .await
            .expect("first round");
        store.put_history(&[(a.clone(), minute(m0 + 2, 12.0))]).await.expect("second round");
        // The next node writes minute m0+1 again.
        store.put_history(&[(a.clone(), minute(m0 + 1, 21.0))]).await.expect("hand-over round");
        let h = store.history(&a, 0).await.expect("history of a");
        let got: Vec<(u32, f64)> = h.iter().map(|b| (b.minute, b.cpu.avg)).collect();
        assert_eq!(got, vec![(m0, 10.0), (m0 + 1, 21.0), (m0 + 2, 12.0)]);
        let since = store.history(&a, m0 + 1).await.expect("history of a since m0+1");
        assert_eq!(since.iter().map(|b| b.minute).collect::<Vec<_>>(), vec![m0 + 1, m0 + 2]);
        let hb = store.history(&b, 0).await.expect("history of b");
        assert_eq!(hb.iter().map(|b| (b.minute, b.cpu.avg)).collect::<Vec<_>>(), vec![(m0, 50.0)]);
        assert!(store.history("pi-none", 0).await.expect("history of an unknown device").is_empty());
        // Deleting a device drops its history, not the others'.
        store.delete_device(&a).await.expect("delete a");
        assert!(store.history(&a, 0).await.expect("history of a after delete").is_empty());
        assert_eq!(store.history(&b, 0).await.expect("history of b").len(), 1);
    });
}
