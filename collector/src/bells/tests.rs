//! The bell state machine against the in-memory store.

use std::sync::Arc;
use std::time::Duration;

use pulsebell_proto::{BellReport, BellState, Hello, ServerMsg};

use super::*;
use crate::config::Config;
use crate::fleet::Outbound;
use crate::store::{MemoryStore, Reason};

fn hello() -> Hello {
    Hello {
        protocol_version: pulsebell_proto::PROTOCOL_VERSION,
        device_id: "d1".into(),
        agent_version: "t".into(),
        boot_id: "b".into(),
        hostname: "h".into(),
        arch: "x".into(),
        os: "o".into(),
        kernel: "k".into(),
        board_model: None,
        interval_ms: 1000,
        tags: vec![],
        actions: vec!["ping".into()],
    }
}

async fn setup() -> (Arc<Bells>, Arc<Fleet>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let fleet = Fleet::load(Arc::new(Config::default()), "n1".into(), store).await.unwrap();
    fleet.enroll(&["d1".to_string()], false).await.unwrap();
    let bells = Bells::load(fleet.clone(), Duration::from_secs(60)).await.unwrap();
    (bells, fleet)
}

fn connect(fleet: &Fleet) -> crate::fleet::OutboundRx {
    let (tx, rx) = crate::fleet::outbound_queue(16);
    fleet.connect("d1", hello(), tx, fleet.generation_floor("d1") + 1).unwrap();
    rx
}

fn ring_req(ttl_ms: Option<u64>) -> RingRequest {
    RingRequest {
        device: Some("d1".into()),
        tag: None,
        action: "ping".into(),
        params: Default::default(),
        ttl_ms,
        timeout_ms: None,
        origin: None,
    }
}

fn report(id: u64, state: BellState) -> BellReport {
    BellReport { id, state, exit_code: Some(0), output: "ok".into(), duration_ms: 5, reason: None }
}

#[tokio::test]
async fn ring_deliver_run_succeed_exactly_once() {
    let (bells, fleet) = setup().await;
    let rx = connect(&fleet);
    let b = bells.ring(ring_req(None)).await.unwrap().remove(0);
    assert_eq!(b.state, BellStatus::Sent);
    assert!(matches!(rx.try_recv(), Ok(Outbound::Msg(m)) if matches!(&*m, ServerMsg::Bell(m) if m.id == b.id)));

    bells.on_report("d1", report(b.id, BellState::Running)).await;
    bells.on_report("d1", report(b.id, BellState::Succeeded)).await;
    let done = bells.wait(b.id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(done.state, BellStatus::Succeeded);
    let states: Vec<BellStatus> = done.transitions.iter().map(|t| t.state).collect();
    assert_eq!(states, [BellStatus::Queued, BellStatus::Sent, BellStatus::Running, BellStatus::Succeeded]);
    // A duplicate final report (re-delivery after a move) changes nothing.
    bells.on_report("d1", report(b.id, BellState::Failed)).await;
    assert_eq!(bells.get(b.id).await.unwrap().unwrap().state, BellStatus::Succeeded);
    assert_eq!(bells.finished_counts().get(&BellStatus::Succeeded), Some(&1));
    assert!(matches!(bells.cancel(b.id).await, Err(BellError::Conflict(_))));
}

#[tokio::test]
async fn a_report_for_another_devices_bell_is_ignored() {
    let (bells, fleet) = setup().await;
    let _rx = connect(&fleet);
    let b = bells.ring(ring_req(None)).await.unwrap().remove(0);
    bells.on_report("intruder", report(b.id, BellState::Succeeded)).await;
    assert_eq!(bells.get(b.id).await.unwrap().unwrap().state, BellStatus::Sent);
}

#[tokio::test]
async fn queued_for_an_offline_device_then_delivered_on_connect_or_expired() {
    let (bells, fleet) = setup().await;
    let b = bells.ring(ring_req(None)).await.unwrap().remove(0);
    assert_eq!(b.state, BellStatus::Queued);
    let rx = connect(&fleet);
    bells.on_connect("d1").await;
    assert!(matches!(rx.try_recv(), Ok(Outbound::Msg(m)) if matches!(&*m, ServerMsg::Bell(m) if m.id == b.id)));
    assert_eq!(bells.get(b.id).await.unwrap().unwrap().state, BellStatus::Sent);

    fleet.offline("d1", fleet.generation_floor("d1"), Reason::Disconnected);
    let short = bells.ring(ring_req(Some(1))).await.unwrap().remove(0);
    let expired = bells.wait(short.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(expired.state, BellStatus::Expired);
}

#[tokio::test]
async fn cancel_of_a_running_bell_asks_the_agent() {
    let (bells, fleet) = setup().await;
    let rx = connect(&fleet);
    let b = bells.ring(ring_req(None)).await.unwrap().remove(0);
    let _ = rx.try_recv();
    bells.on_report("d1", report(b.id, BellState::Running)).await;
    let c = bells.cancel(b.id).await.unwrap();
    assert!(c.cancel_requested);
    assert_eq!(c.state, BellStatus::Running);
    assert!(matches!(rx.try_recv(), Ok(Outbound::Msg(m)) if matches!(*m, ServerMsg::Cancel(id) if id == b.id)));
    bells.on_report("d1", report(b.id, BellState::Cancelled)).await;
    assert_eq!(bells.get(b.id).await.unwrap().unwrap().state, BellStatus::Cancelled);
}

#[tokio::test]
async fn a_bell_from_another_node_reaches_the_local_device_and_stale_copies_are_ignored() {
    let (bells, fleet) = setup().await;
    let rx = connect(&fleet);
    // Node n2 rang it: the store has it, this node learns of it by watch.
    let store = fleet.store().clone();
    let id = store.next_bell_id().await.unwrap();
    let queued = BellRecord {
        id,
        device: "d1".into(),
        action: "ping".into(),
        params: Default::default(),
        state: BellStatus::Queued,
        created_ms: 1,
        updated_ms: 1,
        expires_ms: crate::clock::now_ms() + 60_000,
        timeout_ms: None,
        exit_code: None,
        output: String::new(),
        duration_ms: None,
        reason: None,
        transitions: vec![],
        cancel_requested: false,
        version: 0,
        origin: None,
    };
    store.put_bells(std::slice::from_ref(&queued)).await.unwrap();
    bells.apply(queued.clone()).await;
    assert!(matches!(rx.try_recv(), Ok(Outbound::Msg(m)) if matches!(&*m, ServerMsg::Bell(m) if m.id == id)));
    let sent = bells.get(id).await.unwrap().unwrap();
    assert_eq!((sent.state, sent.version), (BellStatus::Sent, 1));
    // The watch delivers the old queued copy again: no second delivery.
    bells.apply(queued).await;
    assert!(rx.try_recv().is_err());
    assert_eq!(bells.get(id).await.unwrap().unwrap().state, BellStatus::Sent);
}

/// Another node finished the bell: the watch brings the final record, but
/// this node's store read may still be served by a follower with the
/// previous version (simulated: the store is never told). A waiter gets the
/// final record from memory, not the stale one after its timeout.
#[tokio::test(start_paused = true)]
async fn a_waiter_sees_a_bell_finished_elsewhere_even_if_the_store_read_is_stale() {
    let (bells, fleet) = setup().await;
    let _rx = connect(&fleet);
    let b = bells.ring(ring_req(None)).await.unwrap().remove(0);
    assert_eq!(b.state, BellStatus::Sent);
    let waiter = {
        let bells = bells.clone();
        tokio::spawn(async move { bells.wait(b.id, Duration::from_secs(60)).await })
    };
    tokio::task::yield_now().await;
    let mut done = b.clone();
    transition(&mut done, BellStatus::Succeeded, None);
    done.version += 1;
    bells.apply(done.clone()).await;
    let started = tokio::time::Instant::now();
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(got.state, BellStatus::Succeeded, "the final record, not the store's stale copy");
    assert!(started.elapsed() < Duration::from_secs(1), "answered at once, not at the timeout");
    // And a later `bell-show` on this node says the same.
    assert_eq!(bells.get(b.id).await.unwrap().unwrap().state, BellStatus::Succeeded);
}

/// A fast agent's report can be recorded before `deliver` records the bell
/// sent (that write waits for a flush): the report proves delivery, so the
/// bell still reads queued, sent, running, and the late `sent` changes
/// nothing.
#[tokio::test]
async fn a_report_ahead_of_the_sent_record_still_reads_sent() {
    let (bells, fleet) = setup().await;
    let b = bells.ring(ring_req(None)).await.unwrap().remove(0);
    assert_eq!(b.state, BellStatus::Queued);
    let _rx = connect(&fleet);
    bells.on_report("d1", report(b.id, BellState::Running)).await;
    bells.on_connect("d1").await; // the delivery whose `sent` came late
    bells.on_report("d1", report(b.id, BellState::Succeeded)).await;
    let done = bells.get(b.id).await.unwrap().unwrap();
    let states: Vec<BellStatus> = done.transitions.iter().map(|t| t.state).collect();
    assert_eq!(states, [BellStatus::Queued, BellStatus::Sent, BellStatus::Running, BellStatus::Succeeded]);
}
