//! `checks`: the agents' application checks across the fleet; `rules`: the
//! rules that act on them.

use std::time::SystemTime;

use super::client::Client;
use pulsebell_proto::{CheckDigest, CheckStatus};

use super::status::{ago, columns};
use crate::fleet::{CheckRow, CheckView};

/// `checks [DEVICE] [--status S] [--json]`. Exit 0; a device with no
/// checks or no such device lists nothing (the API answers 404 for an
/// unknown device).
pub async fn list(client: &Client, device: Option<&str>, status: Option<&str>, json: bool) -> anyhow::Result<()> {
    let mut path = "/v1/checks".to_string();
    let mut sep = '?';
    for (k, v) in [("device", device), ("status", status)] {
        if let Some(v) = v {
            path.push(sep);
            path.push_str(&format!("{k}={v}"));
            sep = '&';
        }
    }
    let rows: Vec<CheckRow> = client.get(&path).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", render_table(&rows, SystemTime::now()));
    }
    Ok(())
}

/// `rules [--json]`.
pub async fn rules(client: &Client, json: bool) -> anyhow::Result<()> {
    let rules: Vec<crate::rules::RuleView> = client.get("/v1/rules").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rules)?);
        return Ok(());
    }
    if rules.is_empty() {
        println!("(no rules: add [[rules]] to the collector's config)");
    }
    for r in &rules {
        let tags = if r.tags.is_empty() { String::new() } else { format!(" on tags {}", r.tags.join(",")) };
        println!("{}: when {} ring {}{tags}", r.name, r.when, r.action);
        let last = match &r.last_fired {
            Some(f) => format!("bell {} on {} at {}", f.bell, f.device, f.at),
            None => "never".into(),
        };
        let h = &r.held_back;
        println!(
            "  last fired {last}; {} in the last hour (max {}); cooldown {}s; holding now: {}",
            r.fired_last_hour,
            r.max_per_hour,
            r.cooldown_secs,
            if r.holding.is_empty() { "-".to_string() } else { r.holding.join(", ") }
        );
        println!(
            "  held back: {} by cooldown, {} by the hourly ceiling, {} without the action",
            h.cooldown, h.ceiling, h.no_action
        );
    }
    Ok(())
}

/// The checks table.
pub fn render_table(rows: &[CheckRow], now: SystemTime) -> String {
    let mut cells: Vec<[String; 6]> =
        vec![["DEVICE", "CHECK", "KIND", "STATUS", "SINCE", "SUMMARY"].map(str::to_string)];
    for r in rows {
        let c = &r.check;
        cells.push([
            r.device.clone(),
            c.name.clone(),
            c.kind.clone(),
            c.status.to_uppercase(),
            ago(Some(&c.since), now).replace(" ago", ""),
            c.summary.clone(),
        ]);
    }
    let mut out = columns(&cells);
    if rows.is_empty() {
        out.push_str("(no checks: agents list them under [checks.NAME] in their config)\n");
    }
    out
}

/// The `CHECKS` cell of the status table: failing checks by status, worst
/// first (`1 crit, 2 warn`), or how many are OK (`3 ok`); `-` with none.
pub fn summary_cell(checks: &[CheckView]) -> String {
    if checks.is_empty() {
        return "-".into();
    }
    let mut digest = CheckDigest::default();
    for c in checks {
        // A status this CLI does not know (a newer collector's) counts as unknown.
        digest.add(CheckStatus::parse(&c.status).unwrap_or(CheckStatus::Unknown));
    }
    let failing: Vec<String> =
        [(CheckStatus::Critical, "crit"), (CheckStatus::Unknown, "unknown"), (CheckStatus::Warning, "warn")]
            .into_iter()
            .filter(|(s, _)| digest.get(*s) > 0)
            .map(|(s, short)| format!("{} {short}", digest.get(s)))
            .collect();
    if failing.is_empty() {
        format!("{} ok", digest.ok)
    } else {
        failing.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, status: &str) -> CheckView {
        CheckView {
            name: name.into(),
            kind: "unit".into(),
            status: status.into(),
            summary: format!("{name} is {status}"),
            since: "2026-11-30T10:00:00Z".into(),
            output: String::new(),
        }
    }

    #[test]
    fn status_cell_puts_the_worst_first() {
        assert_eq!(summary_cell(&[]), "-");
        assert_eq!(summary_cell(&[check("a", "ok"), check("b", "ok"), check("c", "ok")]), "3 ok");
        assert_eq!(summary_cell(&[check("a", "ok"), check("b", "warning"), check("c", "critical")]), "1 crit, 1 warn");
        assert_eq!(summary_cell(&[check("a", "unknown")]), "1 unknown");
    }

    #[test]
    fn table_lists_each_check() {
        let now = humantime::parse_rfc3339("2026-11-30T10:05:00Z").unwrap();
        let rows = [CheckRow { device: "pi-1".into(), check: check("app", "critical") }];
        let out = render_table(&rows, now);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("DEVICE") && lines[0].contains("STATUS"), "{out}");
        assert!(lines[1].contains("pi-1") && lines[1].contains("CRITICAL") && lines[1].contains("5m"), "{out}");
        // JSON rows are flat: the device beside the check's fields.
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(json["device"], "pi-1");
        assert_eq!(json["name"], "app");
        assert_eq!(json["status"], "critical");
        assert!(render_table(&[], now).contains("no checks"));
    }
}
