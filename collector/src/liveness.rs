//! Liveness rules: when a device is online, and what each change records.
//!
//! Pure functions over a [`DeviceRecord`], no I/O and no locks, so the
//! rules are unit-tested alone and the fleet applies them under its lock.
//!
//! - A device is online from an accepted Hello until its connection ends or
//!   it stays silent (no pulse) past its `offline_after`.
//! - Every change is an [`EventRecord`] tagged with the connection
//!   generation. Generations only grow (cluster-wide in cluster mode: see
//!   [`crate::store::Store::claim`]); a change from an older generation than
//!   the device's current one is ignored, so a late "disconnected" from a
//!   replaced connection never marks a reconnected device offline, on any
//!   node.
//! - Alerts are raised for offline reasons that are the device's problem
//!   ([`Reason::alerts`]) and for "online again" after one of those.

use pulsebell_proto::{CheckReport, CheckStatus, Hello, Pulse, Throttled};

use crate::alerts::Raised;
use crate::fleet::link;
use crate::store::{AlertKind, CheckEvent, DeviceRecord, EventKind, EventRecord, Reason};

/// What a change produced: events to append and alerts to raise.
#[derive(Debug, Default, PartialEq)]
pub struct Effects {
    /// Liveness events.
    pub events: Vec<EventRecord>,
    /// Alerts.
    pub alerts: Vec<Raised>,
}

fn event(device: &str, kind: EventKind, reason: Reason, at_ms: u64, generation: u64) -> EventRecord {
    EventRecord { device: device.to_string(), kind, reason, at_ms, generation, check: None }
}

/// A check report from connection `generation`: a full one replaces the
/// record's checks, a partial one updates those it names. Every status
/// change of a check is an event: `check_recovered` back to OK,
/// `check_failed` otherwise (a new check that starts OK is none), with an
/// alert of the same kind.
pub fn checks_reported(
    device: &str,
    record: &mut DeviceRecord,
    report: CheckReport,
    generation: u64,
    now: u64,
) -> Effects {
    let mut fx = Effects::default();
    // A full report replaces the list (checks gone from the agent's config
    // go with it); a partial one updates it in place. Either way the list
    // stays sorted by name, one entry per name.
    let old = if report.full { std::mem::take(&mut record.checks) } else { Vec::new() };
    for r in report.results {
        let previous = if report.full { &old } else { &record.checks };
        let before = previous.binary_search_by(|c| c.name.as_str().cmp(&r.name)).ok().map(|i| previous[i].status);
        let changed = before != Some(r.status) && !(before.is_none() && r.status == CheckStatus::Ok);
        if changed {
            let (kind, alert) = if r.status == CheckStatus::Ok {
                (EventKind::CheckRecovered, AlertKind::CheckRecovered)
            } else {
                (EventKind::CheckFailed, AlertKind::CheckFailed)
            };
            let mut e = event(device, kind, Reason::Check, now, generation);
            e.check =
                Some(CheckEvent { name: r.name.clone(), status: r.status.as_str().into(), summary: r.summary.clone() });
            fx.events.push(e);
            let text = match r.status {
                CheckStatus::Ok => format!("{device}: check {} is OK again", r.name),
                s => format!("{device}: check {} is {}: {}", r.name, s.as_str().to_uppercase(), r.summary),
            };
            fx.alerts.push(Raised::new(
                alert,
                device,
                text,
                serde_json::json!({
                    "check": r.name, "kind": r.kind.as_str(), "status": r.status.as_str(),
                    "was": before.map(CheckStatus::as_str), "summary": r.summary,
                }),
            ));
        }
        match record.checks.binary_search_by(|c| c.name.as_str().cmp(&r.name)) {
            Ok(i) => record.checks[i] = r,
            Err(i) => record.checks.insert(i, r),
        }
    }
    fx
}

/// Connection `generation` of `device` said Hello. The caller has checked
/// that `generation` is newer than `record.generation`.
pub fn connected(device: &str, record: &mut DeviceRecord, hello: Hello, generation: u64, now: u64) -> Effects {
    let mut fx = Effects::default();
    // A new agent process starts its sequence at 1.
    if record.hello.as_ref().is_none_or(|h| h.boot_id != hello.boot_id) {
        record.last_seq = 0;
    }
    let first = record.generation == 0 && record.last_seen_ms.is_none();
    record.generation = generation;
    record.hello = Some(hello);
    // A version-2 agent describes its actions again right after the Hello.
    record.action_info.clear();
    record.last_seen_ms = Some(now);
    link::connected(&mut record.link, now);
    // "Online again" is worth an alert only after an offline that was one
    // (not a collector restart or the first connection).
    let after_alerted_offline = !first && record.last_offline_reason.is_some_and(Reason::alerts);
    let was_online = std::mem::replace(&mut record.online, true);
    // Every accepted connection is an `online` event of its generation, so
    // the event log explains each reconnect.
    fx.events.push(event(device, EventKind::Online, Reason::Connected, now, generation));
    if !was_online && after_alerted_offline {
        fx.alerts.push(Raised::new(
            AlertKind::DeviceOnline,
            device,
            format!("{device} is online again"),
            serde_json::json!({ "reason": Reason::Connected, "generation": generation }),
        ));
    }
    fx
}

/// A pulse arrived on the device's current connection `generation`.
pub fn pulsed(device: &str, record: &mut DeviceRecord, generation: u64, pulse: &Pulse, now: u64) -> Effects {
    let mut fx = Effects::default();
    let interval = record.hello.as_ref().map_or(5000, |h| u64::from(h.interval_ms));
    link::pulsed(&mut record.link, record.last_seq, record.last_seen_ms, pulse.seq, interval, now);
    record.last_seq = pulse.seq;
    let before = record.health.as_ref().and_then(|h| h.throttled).map_or(0, |t| t.0 & 0xf);
    let after = pulse.health.throttled.map_or(0, |t| t.0 & 0xf);
    let appeared = after & !before;
    record.health = Some(pulse.health.clone());
    record.last_seen_ms = Some(now);
    if !record.online {
        record.online = true;
        fx.events.push(event(device, EventKind::Online, Reason::Pulse, now, generation));
        fx.alerts.push(Raised::new(
            AlertKind::DeviceOnline,
            device,
            format!("{device} is online again"),
            serde_json::json!({ "reason": Reason::Pulse, "generation": generation }),
        ));
    }
    if appeared & Throttled::UNDER_VOLTAGE != 0 {
        fx.alerts.push(Raised::new(
            AlertKind::UnderVoltage,
            device,
            format!("{device}: under-voltage detected"),
            serde_json::json!({ "flags": after }),
        ));
    }
    if appeared & !Throttled::UNDER_VOLTAGE != 0 {
        let t = pulsebell_proto::view::ThrottledView::from(Throttled(after));
        let what = t.warnings().join(", ");
        fx.alerts.push(Raised::new(
            AlertKind::Throttled,
            device,
            format!("{device}: {what}"),
            serde_json::json!({ "flags": after, "throttled": t }),
        ));
    }
    fx
}

/// Connection `generation` went silent, ended, or the device is gone, for
/// `reason`. Nothing happens unless it is the device's current generation
/// and the device was online.
pub fn ended(device: &str, record: &mut DeviceRecord, generation: u64, reason: Reason, now: u64) -> Effects {
    let mut fx = Effects::default();
    if record.generation != generation || !record.online {
        return fx;
    }
    record.online = false;
    record.last_offline_reason = Some(reason);
    fx.events.push(event(device, EventKind::Offline, reason, now, generation));
    if reason.alerts() {
        fx.alerts.push(Raised::new(
            AlertKind::DeviceOffline,
            device,
            format!("{device} is offline ({reason})"),
            serde_json::json!({ "reason": reason, "generation": generation }),
        ));
    } else if matches!(reason, Reason::AgentStopped | Reason::Rebooting) {
        // Raised, but sent only where `[alerts] events` asks for it.
        fx.alerts.push(Raised::new(
            AlertKind::AgentStopped,
            device,
            format!("{device}: agent stopped ({reason})"),
            serde_json::json!({ "reason": reason, "generation": generation }),
        ));
    }
    fx
}

/// Puts each device's events in generation order, keeping the slots of the
/// overall (arrival) order: in a cluster, the node that held an older
/// connection may write its last event after the node holding the newer
/// one wrote its first (a node cut off from the store writes when it is
/// back). Within a generation, arrival order stands.
pub fn order_events(events: &mut [EventRecord]) {
    use std::collections::HashMap;
    let mut slots: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        slots.entry(e.device.clone()).or_default().push(i);
    }
    for idx in slots.values() {
        if idx.windows(2).all(|w| events[w[0]].generation <= events[w[1]].generation) {
            continue;
        }
        let mut mine: Vec<EventRecord> = idx.iter().map(|&i| events[i].clone()).collect();
        mine.sort_by_key(|e| e.generation); // stable
        for (&i, e) in idx.iter().zip(mine) {
            events[i] = e;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulsebell_proto::Health;

    fn hello(boot: &str) -> Hello {
        Hello {
            protocol_version: pulsebell_proto::PROTOCOL_VERSION,
            device_id: "d".into(),
            agent_version: "t".into(),
            boot_id: boot.into(),
            hostname: "h".into(),
            arch: "x".into(),
            os: "o".into(),
            kernel: "k".into(),
            board_model: None,
            interval_ms: 1000,
            tags: vec![],
            actions: vec![],
        }
    }

    fn pulse(seq: u32) -> Pulse {
        Pulse { seq, health: Health::default() }
    }

    fn kinds(fx: &Effects) -> Vec<(EventKind, Reason, u64)> {
        fx.events.iter().map(|e| (e.kind, e.reason, e.generation)).collect()
    }

    #[test]
    fn an_older_generation_never_overrides_a_newer_one() {
        let mut r = DeviceRecord::default();
        let fx = connected("d", &mut r, hello("b"), 1, 1000);
        assert_eq!(kinds(&fx), [(EventKind::Online, Reason::Connected, 1)]);
        assert!(fx.alerts.is_empty(), "first connection: no alert");
        // Generation 2 takes over (same node or another).
        let fx = connected("d", &mut r, hello("b"), 2, 2000);
        assert_eq!(kinds(&fx), [(EventKind::Online, Reason::Connected, 2)]);
        // The end of generation 1 arrives late: ignored.
        let fx = ended("d", &mut r, 1, Reason::Disconnected, 2100);
        assert!(fx.events.is_empty() && fx.alerts.is_empty());
        assert!(r.online);
        // The end of generation 2 counts, once.
        let fx = ended("d", &mut r, 2, Reason::CollectorLost, 3000);
        assert_eq!(kinds(&fx), [(EventKind::Offline, Reason::CollectorLost, 2)]);
        assert!(fx.alerts.is_empty(), "a lost collector is not the device's fault");
        assert!(!r.online);
        assert_eq!(r.last_offline_reason, Some(Reason::CollectorLost));
        assert!(ended("d", &mut r, 2, Reason::Silent, 3100).events.is_empty());
    }

    #[test]
    fn silence_alerts_and_a_pulse_brings_it_back() {
        let mut r = DeviceRecord::default();
        connected("d", &mut r, hello("b"), 1, 0);
        assert!(pulsed("d", &mut r, 1, &pulse(1), 1000).events.is_empty());
        let fx = ended("d", &mut r, 1, Reason::Silent, 5000);
        assert_eq!(fx.alerts.len(), 1);
        assert_eq!(fx.alerts[0].kind, AlertKind::DeviceOffline);
        let fx = pulsed("d", &mut r, 1, &pulse(2), 6000);
        assert_eq!(kinds(&fx), [(EventKind::Online, Reason::Pulse, 1)]);
        assert_eq!(fx.alerts[0].kind, AlertKind::DeviceOnline);
        assert_eq!(r.link.pulses, 2);
    }

    #[test]
    fn reconnect_after_an_alerted_offline_raises_online_again() {
        let mut r = DeviceRecord::default();
        connected("d", &mut r, hello("b"), 1, 0);
        ended("d", &mut r, 1, Reason::Disconnected, 10);
        let fx = connected("d", &mut r, hello("b"), 2, 20);
        assert_eq!(fx.alerts.len(), 1);
        // After a collector shutdown: no alert.
        ended("d", &mut r, 2, Reason::CollectorShutdown, 30);
        assert!(connected("d", &mut r, hello("b"), 3, 40).alerts.is_empty());
    }

    #[test]
    fn a_planned_stop_is_not_a_device_offline_alert() {
        let mut r = DeviceRecord::default();
        connected("d", &mut r, hello("b"), 1, 0);
        let fx = ended("d", &mut r, 1, Reason::AgentStopped, 10);
        assert_eq!(kinds(&fx), [(EventKind::Offline, Reason::AgentStopped, 1)]);
        assert_eq!(fx.alerts.iter().map(|a| a.kind).collect::<Vec<_>>(), [AlertKind::AgentStopped]);
        // Back after a planned stop: no "online again" alert either.
        assert!(connected("d", &mut r, hello("b"), 2, 20).alerts.is_empty());
    }

    #[test]
    fn events_of_a_device_come_out_in_generation_order() {
        let e = |d: &str, g: u64, r: Reason| EventRecord {
            device: d.into(),
            kind: EventKind::Offline,
            reason: r,
            at_ms: 0,
            generation: g,
            check: None,
        };
        let mut v = vec![
            e("a", 1, Reason::Connected),
            e("b", 1, Reason::Connected),
            e("a", 2, Reason::Connected),
            e("a", 1, Reason::CollectorFenced),
            e("b", 1, Reason::Silent),
        ];
        order_events(&mut v);
        let got: Vec<(&str, u64, Reason)> = v.iter().map(|e| (e.device.as_str(), e.generation, e.reason)).collect();
        assert_eq!(
            got,
            [
                ("a", 1, Reason::Connected),
                ("b", 1, Reason::Connected),
                ("a", 1, Reason::CollectorFenced),
                ("a", 2, Reason::Connected),
                ("b", 1, Reason::Silent),
            ]
        );
    }

    #[test]
    fn a_new_boot_restarts_the_sequence() {
        let mut r = DeviceRecord::default();
        connected("d", &mut r, hello("b1"), 1, 0);
        pulsed("d", &mut r, 1, &pulse(50), 10);
        connected("d", &mut r, hello("b1"), 2, 20);
        assert_eq!(r.last_seq, 50, "same agent process: sequence continues");
        connected("d", &mut r, hello("b2"), 3, 30);
        assert_eq!(r.last_seq, 0);
    }

    #[test]
    fn under_voltage_alerts_once_when_it_appears() {
        let mut r = DeviceRecord::default();
        connected("d", &mut r, hello("b"), 1, 0);
        let mut p = pulse(1);
        p.health.throttled = Some(Throttled(Throttled::UNDER_VOLTAGE));
        let fx = pulsed("d", &mut r, 1, &p, 10);
        assert_eq!(fx.alerts.iter().map(|a| a.kind).collect::<Vec<_>>(), [AlertKind::UnderVoltage]);
        p.seq = 2;
        assert!(pulsed("d", &mut r, 1, &p, 20).alerts.is_empty());
    }
}
