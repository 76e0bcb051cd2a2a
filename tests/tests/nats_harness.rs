//! The NATS harness itself (`pulsebell_tests::nats`): a three-server
//! JetStream cluster comes up with a meta leader, and a server killed with
//! SIGKILL and restarted on the same config and store rejoins it.
//!
//! Skips without a `nats-server` >= 2.10 on PATH unless
//! `PULSEBELL_REQUIRE_NATS=1` (`scripts/install-nats` installs one).

use std::collections::BTreeSet;
use std::time::Duration;

use pulsebell_tests::nats::{nats_or_skip, NatsCluster};
use pulsebell_tests::wait_until;
use tempfile::TempDir;

/// Routes drop within a second or two of a peer's death on loopback (the
/// TCP connection resets); generous for busy machines.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

fn tempdir() -> TempDir {
    tempfile::Builder::new().prefix("pulsebell-nats-").tempdir().expect("create temp dir")
}

fn names(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// Waits until server `i` has routes to exactly `peers`.
fn wait_for_peers(cluster: &NatsCluster, i: usize, peers: &[&str]) {
    let want = names(peers);
    let what = format!("{} to have routes to {want:?}", cluster.server_name(i));
    wait_until(&what, ROUTE_TIMEOUT, || match cluster.route_peers(i)? {
        got if got == want => Ok(()),
        got => Err(format!("routes to {got:?}")),
    });
}

#[test]
fn three_server_cluster_rejoins_after_kill_and_restart() {
    let Some(_) = nats_or_skip("three_server_cluster_rejoins_after_kill_and_restart") else { return };
    let dir = tempdir();
    let mut cluster = NatsCluster::start(3, dir.path());

    // Distinct client URLs, each served by the named server with JetStream.
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    assert_eq!(urls.iter().collect::<BTreeSet<_>>().len(), 3, "distinct URLs: {urls:?}");
    for (i, url) in urls.iter().enumerate() {
        assert!(url.starts_with("nats://127.0.0.1:"), "{url}");
        assert_eq!(&cluster.url(i), url);
        let info = cluster.client_info(i).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(info["server_name"], cluster.server_name(i), "INFO: {info}");
        assert_eq!(info["jetstream"], true, "INFO: {info}");
        assert_eq!(info["cluster"], cluster.cluster_name(), "INFO: {info}");
    }
    assert_eq!(["n1", "n2", "n3"], [0, 1, 2].map(|i| cluster.server_name(i)));

    // Fully meshed, and every server agrees on one meta leader.
    wait_for_peers(&cluster, 0, &["n2", "n3"]);
    wait_for_peers(&cluster, 1, &["n1", "n3"]);
    wait_for_peers(&cluster, 2, &["n1", "n2"]);
    let leaders: BTreeSet<Option<String>> =
        (0..3).map(|i| cluster.meta_leader(i).unwrap_or_else(|e| panic!("{e}"))).collect();
    assert_eq!(leaders.len(), 1, "one meta leader: {leaders:?}");
    assert!(leaders.iter().all(Option::is_some), "a meta leader exists: {leaders:?}");
    let jsz = cluster.monitor(0, "/jsz").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(jsz["meta_cluster"]["cluster_size"], 3, "/jsz: {jsz}");

    // SIGKILL n2: it is gone, and the others drop their routes to it.
    cluster.kill(1);
    assert!(!cluster.is_running(1));
    assert!(cluster.is_running(0) && cluster.is_running(2));
    wait_for_peers(&cluster, 0, &["n3"]);
    wait_for_peers(&cluster, 2, &["n1"]);
    // Two of three keep (or elect) a meta leader.
    wait_until("n1 and n3 to agree on a meta leader", ROUTE_TIMEOUT, || {
        let a = cluster.meta_leader(0)?;
        let b = cluster.meta_leader(2)?;
        match (&a, &b) {
            (Some(x), Some(y)) if x == y && x != "n2" => Ok(()),
            _ => Err(format!("n1 sees {a:?}, n3 sees {b:?}")),
        }
    });

    // Restart n2 on the same ports and store: it rejoins the mesh and the
    // JetStream meta group (restart waits for its /healthz).
    let store = cluster.store_dir(1).to_owned();
    assert!(store.join("jetstream").is_dir(), "{} holds the JetStream store", store.display());
    cluster.restart(1);
    assert!(cluster.is_running(1));
    wait_for_peers(&cluster, 1, &["n1", "n3"]);
    wait_for_peers(&cluster, 0, &["n2", "n3"]);
    wait_for_peers(&cluster, 2, &["n1", "n2"]);
    let leader = cluster.meta_leader(0).unwrap_or_else(|e| panic!("{e}"));
    assert!(leader.is_some(), "a meta leader after the restart");
    wait_until("n2 to see the same meta leader", ROUTE_TIMEOUT, || match cluster.meta_leader(1)? {
        l if l == leader => Ok(()),
        l => Err(format!("n2 sees {l:?}, n1 sees {leader:?}")),
    });
    let restarted = cluster.client_info(1).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(restarted["server_name"], "n2", "INFO after restart: {restarted}");
    assert!(cluster.log(1).contains("--- restart ---"));
}
