//! Cluster mode end to end: real NATS JetStream servers (a 3-node cluster
//! on loopback), three real collectors on it, real agents.
//!
//! Skipped with a message when no `nats-server` ≥ 2.10 is installed, unless
//! `PULSEBELL_REQUIRE_NATS=1` (CI), where a missing server fails.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use pulsebell_tests::nats::{nats_or_skip, NatsCluster};
use pulsebell_tests::serde_json::Value;
use pulsebell_tests::{find_device, toml_str, wait_until, Agent, AgentOpts, Collector};

/// How long a lost collector's devices may take to be back (the goal).
const FAILOVER: Duration = Duration::from_secs(15);

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("pulsebell-cluster-").tempdir().expect("temp dir")
}

/// Three collectors on a 3-server NATS cluster; each collector knows every
/// NATS server.
struct Fixture {
    nats: NatsCluster,
    nodes: Vec<Collector>,
}

impl Fixture {
    fn start(root: &Path) -> Fixture {
        let nats_dir = root.join("nats");
        fs::create_dir_all(&nats_dir).expect("nats dir");
        let nats = NatsCluster::start(3, &nats_dir);
        let urls = nats.urls();
        let mut nodes: Vec<Collector> = vec![];
        for i in 0..3 {
            let dir = root.join(format!("c{}", i + 1));
            fs::create_dir_all(&dir).expect("node dir");
            let node = Collector::start_cluster_node(&dir, &urls, &format!("c{}", i + 1), nodes.first(), "");
            nodes.push(node);
        }
        Fixture { nats, nodes }
    }

    fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Collector::device_url).collect()
    }
}

fn node_of(d: &Value) -> Option<String> {
    d.get("node").and_then(Value::as_str).map(str::to_string)
}

/// `echo run >> file` as an action: one line per run.
fn counting_action(name: &str, file: &Path, sleep_secs: u32) -> String {
    let script = format!("echo run >> '{}'; sleep {sleep_secs}; echo done", file.display());
    format!("\n[actions.{name}]\ncommand = [\"sh\", \"-c\", {}]\n", toml_str(&script))
}

fn lines(path: &Path) -> usize {
    fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

/// Waits until every node lists every device in `want` online on the
/// given node (`None`: any node but `not_on`).
fn wait_placement(nodes: &[&Collector], want: &BTreeMap<String, Option<String>>, not_on: Option<&str>, t: Duration) {
    for (i, c) in nodes.iter().enumerate() {
        wait_until(&format!("node {i} to list every device online where expected"), t, || {
            let all = c.try_status()?;
            for (id, node) in want {
                let d = find_device(&all, id).ok_or(format!("{id} missing"))?;
                if d["state"] != "online" {
                    return Err(format!("{id} is {}", d["state"]));
                }
                let on = node_of(d);
                match node {
                    Some(n) if on.as_deref() != Some(n.as_str()) => return Err(format!("{id} on {on:?}, want {n}")),
                    None if on.is_none() || on.as_deref() == not_on => return Err(format!("{id} on {on:?}")),
                    _ => {}
                }
            }
            Ok(())
        });
    }
}

/// (1) every node lists every device online with the right `node`;
/// (2) a bell rung on node 1 for a device on node 3 succeeds, and
/// `bell-show --wait` on node 2 sees it end.
#[test]
fn one_fleet_from_every_node_and_bells_across_nodes() {
    if nats_or_skip("one_fleet_from_every_node_and_bells_across_nodes").is_none() {
        return;
    }
    let tmp = tempdir();
    let fx = Fixture::start(tmp.path());
    let mut agents = vec![];
    let mut want = BTreeMap::new();
    let ran = tmp.path().join("ran");
    for i in 0..6 {
        let id = format!("pi-{i}");
        let home = &fx.nodes[i % 3];
        let token = fx.nodes[(i + 1) % 3].enroll(&id); // enrolled on another node
        let opts = AgentOpts {
            collector_url: Some(home.device_url()),
            extra_toml: counting_action("mark", &ran, 0),
            ..AgentOpts::default()
        };
        agents.push(Agent::start(home, &id, &token, opts));
        want.insert(id, Some(format!("c{}", i % 3 + 1)));
    }
    let nodes: Vec<&Collector> = fx.nodes.iter().collect();
    wait_placement(&nodes, &want, None, Duration::from_secs(30));

    // pi-2 is on c3; ring on c1 and wait there.
    let out = fx.nodes[0].cli(&["bell", "pi-2", "mark", "--wait", "--json"]);
    assert!(out.status.success(), "bell on c1 for a device on c3: {}", pulsebell_tests::describe(&out));
    let bells: Value = serde_json::from_slice(&out.stdout).expect("bell --json");
    let id = bells[0]["id"].as_u64().expect("bell id");
    assert_eq!(bells[0]["state"], "succeeded", "{bells}");

    // Another bell rung on c1, followed on c2.
    let out = fx.nodes[0].cli_ok(&["bell", "pi-2", "mark", "--json"]);
    let rung: Value = serde_json::from_slice(&out.stdout).expect("bell --json");
    let second = rung[0]["id"].as_u64().expect("bell id");
    assert!(second > id);
    let out = fx.nodes[1].cli(&["bell-show", &second.to_string(), "--wait", "--json"]);
    assert!(out.status.success(), "bell-show --wait on c2: {}", pulsebell_tests::describe(&out));
    let shown: Value = serde_json::from_slice(&out.stdout).expect("bell-show --json");
    assert_eq!(shown["state"], "succeeded", "{shown}");
    assert_eq!(lines(&ran), 2, "each bell ran exactly once");

    // Every node gives the same bell list and cluster view.
    for c in &fx.nodes {
        let out = c.cli_ok(&["bells", "--json"]);
        let list: Value = serde_json::from_slice(&out.stdout).expect("bells --json");
        let ids: Vec<u64> = list.as_array().expect("array").iter().filter_map(|b| b["id"].as_u64()).collect();
        assert_eq!(ids, [second, id], "bells on {}", c.admin_url());
        let out = c.cli_ok(&["cluster", "--json"]);
        let nodes: Value = serde_json::from_slice(&out.stdout).expect("cluster --json");
        let alive: Vec<(&str, u64)> = nodes
            .as_array()
            .expect("array")
            .iter()
            .map(|n| (n["id"].as_str().unwrap_or("?"), n["devices"].as_u64().unwrap_or(99)))
            .collect();
        assert_eq!(alive.len(), 3, "{nodes}");
        assert!(nodes.as_array().unwrap().iter().all(|n| n["state"] == "alive"), "{nodes}");
    }
    drop(agents);
}

/// (3) kill -9 a collector holding a third of the devices while bells are
/// in flight: its devices are back on the survivors within 15 s, every
/// bell ends final exactly once, events per device stay ordered by
/// generation, and the lost node shows `lost`.
#[test]
fn a_killed_collectors_devices_move_and_bells_run_once() {
    if nats_or_skip("a_killed_collectors_devices_move_and_bells_run_once").is_none() {
        return;
    }
    let tmp = tempdir();
    let mut fx = Fixture::start(tmp.path());
    let urls = fx.urls();
    let mut agents = vec![];
    let mut counts = BTreeMap::new();
    for i in 0..6 {
        let id = format!("pi-{i}");
        let token = fx.nodes[0].enroll(&id);
        // The home node first, then the others: a known placement, and
        // somewhere to go.
        let mut list = urls.clone();
        list.rotate_left(i % 3);
        let count = tmp.path().join(format!("ran-{id}"));
        let opts =
            AgentOpts { collector_urls: list, extra_toml: counting_action("work", &count, 2), ..AgentOpts::default() };
        agents.push(Agent::start(&fx.nodes[0], &id, &token, opts));
        counts.insert(id, count);
    }
    // Agents pick a random start in their list; wait until all are online
    // somewhere, then see where.
    let everywhere: BTreeMap<String, Option<String>> = counts.keys().map(|id| (id.clone(), None)).collect();
    let nodes: Vec<&Collector> = fx.nodes.iter().collect();
    wait_placement(&nodes, &everywhere, None, Duration::from_secs(30));
    let status = fx.nodes[1].status();
    let victim = (1..=3)
        .map(|n| format!("c{n}"))
        .max_by_key(|n| status.iter().filter(|d| node_of(d).as_deref() == Some(n.as_str())).count())
        .expect("a node");
    let moving: Vec<String> = status
        .iter()
        .filter(|d| node_of(d).as_deref() == Some(victim.as_str()))
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!moving.is_empty());
    let victim_index: usize = victim[1..].parse::<usize>().unwrap() - 1;
    let survivor_index = (victim_index + 1) % 3;

    // Bells in flight on every device (each runs 2 s), rung on a survivor.
    let mut bell_ids = vec![];
    for id in counts.keys() {
        let out = fx.nodes[survivor_index].cli_ok(&["bell", id, "work", "--json"]);
        let rung: Value = serde_json::from_slice(&out.stdout).expect("bell --json");
        bell_ids.push(rung[0]["id"].as_u64().expect("id"));
    }
    for id in &moving {
        let count = &counts[id];
        wait_until(&format!("{id}'s bell to start"), Duration::from_secs(20), || {
            if lines(count) >= 1 {
                Ok(())
            } else {
                Err("not started".into())
            }
        });
    }
    let killed_at = Instant::now();
    fx.nodes[victim_index].kill9();
    let survivor = &fx.nodes[survivor_index];

    // Back on the survivors within 15 s.
    let survivors: Vec<&Collector> =
        fx.nodes.iter().enumerate().filter(|(i, _)| *i != victim_index).map(|(_, c)| c).collect();
    wait_placement(&survivors, &everywhere, Some(&victim), FAILOVER);
    let took = killed_at.elapsed();
    assert!(took <= FAILOVER, "devices took {took:?} to come back");

    // Every bell ends final, exactly once.
    for bell in &bell_ids {
        let out = survivor.cli(&["bell-show", &bell.to_string(), "--wait", "--timeout", "60s", "--json"]);
        let shown: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_eq!(shown["state"], "succeeded", "bell {bell}: {}", pulsebell_tests::describe(&out));
        let finals = shown["transitions"]
            .as_array()
            .expect("transitions")
            .iter()
            .filter(|t| {
                ["succeeded", "failed", "timed_out", "rejected", "cancelled", "expired"]
                    .contains(&t["state"].as_str().unwrap_or(""))
            })
            .count();
        assert_eq!(finals, 1, "bell {bell} reached a final state more than once: {shown}");
    }
    for (id, count) in &counts {
        assert_eq!(lines(count), 1, "{id}'s action ran {} times", lines(count));
    }

    // Events of each device in generation order.
    let out = survivor.cli_ok(&["events", "--json"]);
    let events: Value = serde_json::from_slice(&out.stdout).expect("events --json");
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for e in events.as_array().expect("array") {
        let d = e["device"].as_str().unwrap().to_string();
        let g = e["generation"].as_u64().unwrap();
        let prev = last.insert(d.clone(), g).unwrap_or(0);
        assert!(g >= prev, "events of {d} out of generation order: {events}");
    }

    // The lost node shows `lost`.
    wait_until("the killed node to show lost", Duration::from_secs(20), || {
        let out = survivor.cli_ok(&["cluster", "--json"]);
        let nodes: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let state =
            nodes.as_array().and_then(|a| a.iter().find(|n| n["id"] == victim.as_str())).map(|n| n["state"].clone());
        if state == Some(Value::from("lost")) {
            Ok(())
        } else {
            Err(format!("{nodes}"))
        }
    });
    drop(agents);
    drop(fx.nats);
}

/// When a collector dies, devices that cannot reach another one are
/// declared offline with `collector_lost` within 15 s, once, by one node.
#[test]
fn a_killed_collectors_stranded_devices_go_offline_as_collector_lost() {
    if nats_or_skip("a_killed_collectors_stranded_devices_go_offline_as_collector_lost").is_none() {
        return;
    }
    let tmp = tempdir();
    let mut fx = Fixture::start(tmp.path());
    let id = "pi-stranded";
    let token = fx.nodes[1].enroll(id);
    // Only c3's address: nowhere else to go.
    let opts = AgentOpts { collector_url: Some(fx.nodes[2].device_url()), ..AgentOpts::default() };
    let _agent = Agent::start(&fx.nodes[2], id, &token, opts);
    let want: BTreeMap<String, Option<String>> = [(id.to_string(), Some("c3".to_string()))].into();
    let nodes: Vec<&Collector> = fx.nodes.iter().collect();
    wait_placement(&nodes, &want, None, Duration::from_secs(30));
    let generation = fx.nodes[0].show(id)["generation"].as_u64().expect("generation");

    let killed_at = Instant::now();
    fx.nodes[2].kill9();
    for c in &fx.nodes[..2] {
        let d = wait_until("the stranded device to be offline (collector_lost)", FAILOVER, || {
            let d = c.show(id);
            if d["state"] == "offline" {
                Ok(d)
            } else {
                Err(format!("{d}"))
            }
        });
        assert_eq!(d["node"], Value::Null, "{d}");
        assert_eq!(d["last_offline_reason"], "collector_lost", "{d}");
    }
    assert!(killed_at.elapsed() <= FAILOVER, "took {:?}", killed_at.elapsed());
    let events = wait_until("the collector_lost event", Duration::from_secs(10), || {
        let out = fx.nodes[0].cli_ok(&["events", id, "--json"]);
        let events: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let lost: Vec<&Value> = events.as_array().unwrap().iter().filter(|e| e["reason"] == "collector_lost").collect();
        match lost.len() {
            0 => Err(format!("{events}")),
            _ => Ok(events.clone()),
        }
    });
    let lost: Vec<&Value> = events.as_array().unwrap().iter().filter(|e| e["reason"] == "collector_lost").collect();
    assert_eq!(lost.len(), 1, "declared lost exactly once: {events}");
    assert_eq!(lost[0]["generation"].as_u64(), Some(generation), "{events}");
    assert_eq!(lost[0]["kind"], "offline", "{events}");
}

/// (4) kill -9 one NATS server: enrol, ring and status keep working on
/// every collector, nothing acknowledged is lost, and it rejoins.
#[test]
fn losing_one_nats_server_loses_nothing() {
    if nats_or_skip("losing_one_nats_server_loses_nothing").is_none() {
        return;
    }
    let tmp = tempdir();
    let mut fx = Fixture::start(tmp.path());
    let ran = tmp.path().join("ran");
    let mut agents = vec![];
    let mut devices = vec![];
    for i in 0..3 {
        let id = format!("pi-{i}");
        let token = fx.nodes[i].enroll(&id);
        let opts = AgentOpts {
            collector_urls: fx.urls(),
            extra_toml: counting_action("mark", &ran, 0),
            ..AgentOpts::default()
        };
        agents.push(Agent::start(&fx.nodes[i], &id, &token, opts));
        devices.push(id);
    }
    let everywhere: BTreeMap<String, Option<String>> = devices.iter().map(|d| (d.clone(), None)).collect();
    let nodes: Vec<&Collector> = fx.nodes.iter().collect();
    wait_placement(&nodes, &everywhere, None, Duration::from_secs(30));
    let out = fx.nodes[0].cli(&["bell", "pi-0", "mark", "--wait", "--json"]);
    assert!(out.status.success(), "{}", pulsebell_tests::describe(&out));
    let before: Value = serde_json::from_slice(&out.stdout).expect("bell --json");
    let first_bell = before[0]["id"].as_u64().expect("id");
    // Surviving a server needs every stream and bucket on 3 replicas (the
    // default in a cluster), whatever the collectors saw of the routes when
    // they created them.
    let replicas = fx.nats.stream_replicas(1).expect("/jsz");
    assert!(replicas.len() >= 10, "every bucket and stream exists: {replicas:?}");
    assert!(replicas.values().all(|&r| r == 3), "3 replicas each: {replicas:?}");

    fx.nats.kill(0);
    // Each collector goes on: enrol a new device, ring, status. A request
    // may hit the few seconds of a leader election; retry within a bound.
    for (i, c) in fx.nodes.iter().enumerate() {
        let mut attempt = 0;
        wait_until(&format!("enrolling on c{} without one NATS server", i + 1), Duration::from_secs(30), || {
            attempt += 1;
            let out = c.cli(&["enroll", &format!("late-{i}-{attempt}")]);
            if out.status.success() {
                Ok(())
            } else {
                Err(pulsebell_tests::describe(&out))
            }
        });
        wait_until(&format!("a bell through c{} without one NATS server", i + 1), Duration::from_secs(30), || {
            let out = c.cli(&["bell", &format!("pi-{i}"), "mark", "--wait", "--json"]);
            if out.status.success() {
                Ok(())
            } else {
                Err(pulsebell_tests::describe(&out))
            }
        });
    }
    wait_placement(&nodes, &everywhere, None, Duration::from_secs(30));
    assert_eq!(lines(&ran), 4, "every bell ran exactly once");

    fx.nats.restart(0);
    fx.nats.wait_healthy();
    for c in &fx.nodes {
        let all = c.status();
        for i in 0..3 {
            assert!(
                find_device(&all, &format!("late-{i}-1")).is_some()
                    || all.iter().any(|d| d["id"].as_str().unwrap_or("").starts_with(&format!("late-{i}-"))),
                "enrolment lost: {all:?}"
            );
        }
        let out = c.cli_ok(&["bell-show", &first_bell.to_string(), "--json"]);
        let b: Value = serde_json::from_slice(&out.stdout).expect("bell-show --json");
        assert_eq!(b["state"], "succeeded", "{b}");
    }
    drop(agents);
}

/// (6) `migrate` from a single collector's sled dir: enrolments, bells
/// (a queued one too), events and history move; the agents connect to the
/// cluster with their old tokens and the queued bell runs there.
#[test]
fn migrate_moves_a_single_collector_into_the_cluster() {
    if nats_or_skip("migrate_moves_a_single_collector_into_the_cluster").is_none() {
        return;
    }
    if pulsebell_tests::skip_on_nats(
        "migrate_moves_a_single_collector_into_the_cluster",
        "migrates a sled data dir, so its single collector must run on sled (the sled run covers it)",
    ) {
        return;
    }
    let tmp = tempdir();
    let single_dir = tmp.path().join("single");
    fs::create_dir_all(&single_dir).expect("dir");
    let mut single = Collector::start(&single_dir);
    let ran = tmp.path().join("ran");
    let token_a = single.enroll("pi-a");
    let token_b = single.enroll("pi-b");
    let opts = || AgentOpts { extra_toml: counting_action("mark", &ran, 0), ..AgentOpts::default() };
    let mut agent_a = Agent::start(&single, "pi-a", &token_a, opts());
    single.wait_for_online_with_health("pi-a");
    let out = single.cli(&["bell", "pi-a", "mark", "--wait", "--json"]);
    assert!(out.status.success(), "{}", pulsebell_tests::describe(&out));
    // pi-b never connected: its bell stays queued.
    let out = single.cli_ok(&["bell", "pi-b", "mark", "--ttl", "1h", "--json"]);
    let queued: Value = serde_json::from_slice(&out.stdout).expect("bell --json");
    let queued_id = queued[0]["id"].as_u64().expect("id");
    let history_before = {
        let out = single.cli_ok(&["history", "pi-a", "--json"]);
        let h: Value = serde_json::from_slice(&out.stdout).expect("history --json");
        h["buckets"].as_array().map_or(0, Vec::len)
    };
    assert!(history_before >= 1);
    agent_a.stop();
    single.stop();

    let nats_dir = tmp.path().join("nats");
    fs::create_dir_all(&nats_dir).expect("dir");
    let nats = NatsCluster::start(3, &nats_dir);
    let out = pulsebell_tests::run_with_timeout(
        {
            let mut cmd = std::process::Command::new(pulsebell_tests::collector_bin());
            cmd.arg("migrate").arg("--from").arg(single.data_dir()).arg("--nats").arg(nats.urls().join(","));
            cmd
        },
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "migrate: {}", pulsebell_tests::describe(&out));

    // The cluster node uses the single collector's token and CA.
    let node_dir = tmp.path().join("c1");
    fs::create_dir_all(&node_dir).expect("dir");
    let node = Collector::start_cluster_node(&node_dir, &nats.urls(), "c1", Some(&single), "");
    let all = node.status();
    assert!(find_device(&all, "pi-a").is_some() && find_device(&all, "pi-b").is_some(), "{all:?}");
    let out = node.cli_ok(&["bells", "--json"]);
    let bells: Value = serde_json::from_slice(&out.stdout).expect("bells --json");
    assert_eq!(bells.as_array().map(Vec::len), Some(2), "{bells}");
    let out = node.cli_ok(&["events", "pi-a", "--json"]);
    let events: Value = serde_json::from_slice(&out.stdout).expect("events --json");
    assert!(events.as_array().is_some_and(|e| e.len() >= 2), "events moved: {events}");
    let out = node.cli_ok(&["history", "pi-a", "--json"]);
    let h: Value = serde_json::from_slice(&out.stdout).expect("history --json");
    assert_eq!(h["buckets"].as_array().map_or(0, Vec::len), history_before, "history moved: {h}");

    // Old tokens work; the queued bell runs on the cluster.
    let _a = Agent::start(&node, "pi-a", &token_a, opts());
    let _b = Agent::start(&node, "pi-b", &token_b, opts());
    node.wait_for_state("pi-a", "online");
    let out = node.cli(&["bell-show", &queued_id.to_string(), "--wait", "--timeout", "30s", "--json"]);
    assert!(out.status.success(), "queued bell after migration: {}", pulsebell_tests::describe(&out));
    assert_eq!(lines(&ran), 2, "each bell ran once");
    // New bells get ids above the migrated ones.
    let out = node.cli_ok(&["bell", "pi-a", "mark", "--json"]);
    let next: Value = serde_json::from_slice(&out.stdout).expect("bell --json");
    assert!(next[0]["id"].as_u64().unwrap() > queued_id, "{next}");
}

/// Bad conditions get a clear answer: a malformed NATS URL is a config
/// error (exit 64, naming the key); unreachable NATS is retried, saying
/// which URLs; too few servers for the replicas names the setting.
#[test]
fn bad_cluster_conditions_get_clear_answers() {
    let Some(_) = nats_or_skip("bad_cluster_conditions_get_clear_answers") else { return };
    let tmp = tempdir();
    let serve = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(pulsebell_tests::collector_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(extra);
        cmd
    };
    let out = pulsebell_tests::run_with_timeout(serve(&["--nats", "http://not-nats"]), Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(64), "{}", pulsebell_tests::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cluster.nats_urls[0]"),
        "{}",
        pulsebell_tests::describe(&out)
    );

    // Unreachable: keeps retrying and says where it tried.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let url = format!("nats://{closed}");
    let mut child = serve(&["--nats", &url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn collector");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut tries = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while tries < 2 {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("a retry line");
        if line.contains("cannot reach NATS") {
            assert!(line.contains(&url), "names the URL: {line}");
            tries += 1;
        }
    }
    assert!(child.try_wait().unwrap().is_none(), "still running, still retrying");
    let _ = child.kill();
    let _ = child.wait();

    // One server cannot hold 3 replicas.
    let nats_dir = tmp.path().join("nats");
    fs::create_dir_all(&nats_dir).unwrap();
    let nats = NatsCluster::start(1, &nats_dir);
    let config = tmp.path().join("r3.toml");
    fs::write(&config, format!("[cluster]\nnats_urls = [{}]\nreplicas = 3\n", toml_str(&nats.url(0)))).unwrap();
    let out =
        pulsebell_tests::run_with_timeout(serve(&["--config", config.to_str().unwrap()]), Duration::from_secs(30));
    assert!(!out.status.success(), "{}", pulsebell_tests::describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster.replicas") && err.contains("3 replicas"), "{}", pulsebell_tests::describe(&out));
}

/// A record in a bucket that does not decode is logged with its bucket and
/// key, skipped, and counted in /metrics; everything else keeps working.
#[test]
fn an_undecodable_record_is_skipped_and_counted() {
    if nats_or_skip("an_undecodable_record_is_skipped_and_counted").is_none() {
        return;
    }
    let tmp = tempdir();
    let nats_dir = tmp.path().join("nats");
    fs::create_dir_all(&nats_dir).unwrap();
    let nats = NatsCluster::start(1, &nats_dir);
    let dir = tmp.path().join("c1");
    fs::create_dir_all(&dir).unwrap();
    let mut node = Collector::start_cluster_node(&dir, &nats.urls(), "c1", None, "");
    node.enroll("pi-ok");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = async_nats::connect(nats.url(0)).await.expect("connect to NATS");
        let js = async_nats::jetstream::new(client);
        let kv = js.get_key_value("pulsebell_devices").await.expect("devices bucket");
        kv.put("garbage-device", bytes::Bytes::from_static(b"{not json")).await.expect("put garbage");
    });
    // Seen live by the watch, and again on a restart.
    node.stop();
    node.restart();
    assert!(node.log().contains("pulsebell_devices") && node.log().contains("garbage-device"), "{}", node.log().text());
    assert!(find_device(&node.status(), "pi-ok").is_some());
    let metrics = rt.block_on(async {
        let token = fs::read_to_string(node.data_dir().join("admin.token")).unwrap();
        let addr = node.admin_url().trim_start_matches("http://").to_string();
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!(
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            token.trim()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    });
    let count: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pulsebell_store_corrupt_records_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no corrupt-records counter in:\n{metrics}"));
    assert!(count >= 1.0, "{metrics}");
}
