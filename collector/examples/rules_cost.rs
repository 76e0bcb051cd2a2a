//! What evaluating one rule costs at fleet scale: `Fleet::rule_holds` (the
//! walk the rules engine does once per rule per second, under the fleet's
//! lock) over N connected devices with three checks each, one in ten
//! failing.
//!
//! `cargo run --release -p pulsebell-collector --example rules_cost -- 19000`

use std::sync::Arc;
use std::time::Instant;

use pulsebell_collector::config::{Config, RuleConfig, RuleRing, RuleWhen};
use pulsebell_collector::fleet::{outbound_queue, Fleet};
use pulsebell_collector::store::{MemoryStore, Store};
use pulsebell_proto::{CheckKind, CheckReport, CheckResult, CheckStatus, Hello};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(19_000);
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let fleet = Fleet::load(Arc::new(Config::default()), "bench".into(), store.clone()).await?;
    let ids: Vec<String> = (0..n).map(|i| format!("pi-{i:05}")).collect();
    fleet.enroll(&ids, false).await?;
    let mut queues = Vec::with_capacity(n);
    for (i, id) in ids.iter().enumerate() {
        let (tx, rx) = outbound_queue(8);
        queues.push(rx);
        let g = store.claim(id, fleet.node(), fleet.generation_floor(id)).await?;
        let hello = Hello {
            protocol_version: 2,
            device_id: id.clone(),
            agent_version: "bench".into(),
            boot_id: format!("boot-{i}"),
            hostname: id.clone(),
            os: "Debian".into(),
            kernel: "6.6".into(),
            arch: "aarch64".into(),
            board_model: None,
            interval_ms: 10_000,
            tags: vec!["kiosk".into()],
            actions: vec!["restart-app".into()],
        };
        fleet.connect(id, hello, tx, g).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let check = |name: &str, status| CheckResult {
            name: name.into(),
            kind: CheckKind::Command,
            status,
            summary: String::new(),
            output: String::new(),
            since_ms: 0,
        };
        let app = if i % 10 == 0 { CheckStatus::Critical } else { CheckStatus::Ok };
        let results = vec![check("app", app), check("web", CheckStatus::Ok), check("disk", CheckStatus::Ok)];
        fleet.checks(id, g, CheckReport { full: true, results });
    }
    let rule = RuleConfig {
        name: "restart-app".into(),
        when: RuleWhen { check: Some("app".into()), status: None, state: None, for_: None },
        ring: RuleRing { action: "restart-app".into(), params: Default::default() },
        tags: vec!["kiosk".into()],
        cooldown: std::time::Duration::from_secs(900),
        max_per_hour: 20,
    };
    let rounds = 200;
    let started = Instant::now();
    let mut holding = 0;
    for _ in 0..rounds {
        holding = fleet.rule_holds(&rule, true).len();
    }
    let per = started.elapsed() / rounds;
    println!("| devices | holding | one rule's walk | share of a core at 1/s |");
    println!("|---:|---:|---:|---:|");
    println!("| {n} | {holding} | {:.2} ms | {:.3} % |", per.as_secs_f64() * 1e3, per.as_secs_f64() * 100.0);
    drop(queues);
    Ok(())
}
