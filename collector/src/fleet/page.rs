//! One page of the fleet table for the dashboard: rows filtered by search,
//! tag and state, sorted by id and cut to a window, with fleet-wide counts.
//!
//! A page is built from the live map under the fleet lock without building
//! a full [`super::DeviceView`] per device: only the rows on the page are
//! materialised, and the fleet-wide counts and tags come from a [`Tally`]
//! kept up to date as devices change, so a page of 100 rows costs the same
//! with 100 or 19,000 devices (only a search, tag or state filter walks the
//! ids). The live stream ([`crate::admin::dashboard`]) sends a page once and
//! then only the rows that changed.

use std::collections::BTreeMap;

use pulsebell_proto::view::ThrottledView;
use serde::{Deserialize, Serialize};

use super::{link, view, Device, Devices};

/// Rows on a page when the query does not say.
pub const DEFAULT_LIMIT: usize = 100;
/// The most rows one page may hold.
pub const MAX_LIMIT: usize = 1000;

/// What a dashboard page shows (the query string of `/v1/stream` and
/// `/v1/fleet`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(default)]
pub struct PageQuery {
    /// Case-insensitive part of the device id.
    pub q: String,
    /// Only devices with this tag.
    pub tag: String,
    /// Only devices in this state (`online`, `offline`, `never_seen`).
    pub state: String,
    /// Only this device (exact id): the device page follows its state.
    pub device: String,
    /// Rows to skip.
    pub offset: usize,
    /// Rows on the page (default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]).
    pub limit: usize,
}

impl PageQuery {
    /// The page size this query gets.
    pub fn limit(&self) -> usize {
        match self.limit {
            0 => DEFAULT_LIMIT,
            n => n.min(MAX_LIMIT),
        }
    }
}

/// Devices by state, over the whole fleet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Enrolled devices.
    pub devices: usize,
    /// Online.
    pub online: usize,
    /// Offline.
    pub offline: usize,
    /// Enrolled, never connected.
    pub never_seen: usize,
}

/// One row of the fleet table: what the table shows, rounded as shown, so
/// that a row "changes" only when its cells would.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// Device id.
    pub id: String,
    /// `online`, `offline` or `never_seen`.
    pub state: &'static str,
    /// Last pulse, Unix ms (the browser shows "12s ago").
    pub last_seen_ms: Option<u64>,
    /// CPU busy, whole percent.
    pub cpu: Option<u8>,
    /// Memory used, whole percent.
    pub mem: Option<u8>,
    /// Root filesystem used, whole percent.
    pub disk: Option<u8>,
    /// Highest temperature, °C to one decimal.
    pub temp: Option<f64>,
    /// Throttling and link warnings.
    pub warnings: Vec<&'static str>,
    /// Tags (the agent's, then its enrolment's).
    pub tags: Vec<String>,
    /// Its checks that are not OK, as `name status` (`app critical`).
    pub failing_checks: Vec<String>,
    /// How many of its checks are OK.
    pub checks_ok: usize,
}

/// A page of the fleet table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    /// Fleet-wide counts and tags (`counts`, `tags` in the JSON).
    #[serde(flatten)]
    pub summary: Summary,
    /// Devices matching the filters.
    pub matched: usize,
    /// First row's index among the matching devices.
    pub offset: usize,
    /// Page size.
    pub limit: usize,
    /// The rows, sorted by id.
    pub rows: Vec<Row>,
}

/// The fleet-wide part of a page, the same whatever the query.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Devices by state (not filtered).
    pub counts: Counts,
    /// Every tag in the fleet, sorted (for the filter).
    pub tags: Vec<String>,
}

/// The fleet-wide counts and tags, kept in step with every change of a
/// device's state or tags (the fleet calls [`Tally::enter`], [`Tally::leave`]
/// and [`Tally::moved`] where it makes them), so that neither a dashboard
/// page nor a stats poll walks the fleet: walking 19,000 devices and
/// gathering their tags once a second was most of what an open dashboard
/// cost the collector.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Tally {
    counts: Counts,
    /// Tag → devices carrying it.
    tags: BTreeMap<String, usize>,
}

impl Tally {
    /// The tally of `devices`, counted (at load).
    pub(super) fn of(devices: &Devices) -> Tally {
        let mut tally = Tally::default();
        devices.values().for_each(|d| tally.enter(d));
        tally
    }

    /// `d` joins the fleet, or is back after a change of its tags.
    pub(super) fn enter(&mut self, d: &Device) {
        self.counts.devices += 1;
        *self.slot(d.state()) += 1;
        for tag in distinct_tags(d) {
            match self.tags.get_mut(tag) {
                Some(n) => *n += 1,
                None => {
                    self.tags.insert(tag.clone(), 1);
                }
            }
        }
    }

    /// `d` leaves the fleet, or is about to change its tags.
    pub(super) fn leave(&mut self, d: &Device) {
        self.counts.devices -= 1;
        *self.slot(d.state()) -= 1;
        for tag in distinct_tags(d) {
            if let Some(n) = self.tags.get_mut(tag) {
                *n -= 1;
                if *n == 0 {
                    self.tags.remove(tag);
                }
            }
        }
    }

    /// A device went from state `from` to state `to` (tags unchanged).
    pub(super) fn moved(&mut self, from: &'static str, to: &'static str) {
        if from != to {
            *self.slot(from) -= 1;
            *self.slot(to) += 1;
        }
    }

    /// Devices by state.
    pub(super) fn counts(&self) -> Counts {
        self.counts
    }

    /// Counts and tags, as a page carries them.
    pub(super) fn summary(&self) -> Summary {
        Summary { counts: self.counts, tags: self.tags.keys().cloned().collect() }
    }

    fn slot(&mut self, state: &str) -> &mut usize {
        match state {
            "online" => &mut self.counts.online,
            "offline" => &mut self.counts.offline,
            _ => &mut self.counts.never_seen,
        }
    }
}

/// `d`'s tags, each once (the agent's and its enrolment's may repeat).
fn distinct_tags(d: &Device) -> impl Iterator<Item = &String> {
    d.tags().enumerate().filter(move |(i, t)| !d.tags().take(*i).any(|u| u == *t)).map(|(_, t)| t)
}

/// Builds a page of `devices` (`ids`: their ids, sorted) with `summary`
/// (the fleet's [`Tally`]).
///
/// The rows cost what the query needs: without a filter only the page's
/// own devices are looked up, `device` is one lookup, and only a search,
/// tag or state filter walks the sorted ids.
pub(super) fn build(devices: &Devices, ids: &[String], query: &PageQuery, now: u64, summary: Summary) -> Page {
    let limit = query.limit();
    let wanted = |id: &str, d: &Device| {
        (query.state.is_empty() || query.state == d.state())
            && (query.tag.is_empty() || d.has_tag(&query.tag))
            && contains_ignore_case(id, &query.q)
    };
    let (matched, rows) = if !query.device.is_empty() {
        match devices.get_key_value(&query.device) {
            Some((id, d)) if wanted(id, d) => (1, if query.offset == 0 { vec![row(id, d, now)] } else { Vec::new() }),
            _ => (0, Vec::new()),
        }
    } else if query.q.is_empty() && query.tag.is_empty() && query.state.is_empty() {
        let page = ids.iter().skip(query.offset).take(limit);
        (ids.len(), page.filter_map(|id| devices.get(id).map(|d| row(id, d, now))).collect())
    } else {
        let mut matched = 0;
        let mut rows = Vec::new();
        for (id, d) in ids.iter().filter_map(|id| Some((id, devices.get(id)?))).filter(|(id, d)| wanted(id, d)) {
            if matched >= query.offset && rows.len() < limit {
                rows.push(row(id, d, now));
            }
            matched += 1;
        }
        (matched, rows)
    };
    Page { summary, matched, offset: query.offset, limit, rows }
}

fn row(id: &str, d: &Device, now: u64) -> Row {
    let r = &d.record;
    let percent = |used: u64, total: u64| (total > 0).then(|| (used.min(total) * 100 / total) as u8);
    let health = r.health.as_ref();
    let mut warnings = health.and_then(|h| h.throttled).map(|t| ThrottledView::from(t).warnings()).unwrap_or_default();
    if link::flaky(&r.link, link::reconnects_24h(&r.link, now)) {
        warnings.push("flaky link");
    }
    Row {
        id: id.to_string(),
        state: d.state(),
        last_seen_ms: r.last_seen_ms,
        cpu: health.map(|h| (h.cpu_percent().round() as u64).min(100) as u8),
        mem: health.and_then(|h| percent(h.mem_used_kib, h.mem_total_kib)),
        disk: health.and_then(|h| percent(h.disk_used_mib, h.disk_total_mib)),
        temp: health.and_then(|h| h.temp_celsius()),
        warnings,
        tags: view::tags_of(&d.enrolment, r),
        failing_checks: r
            .checks
            .iter()
            .filter(|c| c.status != pulsebell_proto::CheckStatus::Ok)
            .map(|c| format!("{} {}", c.name, c.status.as_str()))
            .collect(),
        checks_ok: r.checks.iter().filter(|c| c.status == pulsebell_proto::CheckStatus::Ok).count(),
    }
}

/// Whether `haystack` contains `needle`, ASCII case-insensitively (device
/// ids are ASCII); an empty needle matches everything.
fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_ignores_ascii_case() {
        assert!(contains_ignore_case("Kiosk-017", "kiosk-01"));
        assert!(contains_ignore_case("kiosk-017", "OSK"));
        assert!(contains_ignore_case("anything", ""));
        assert!(!contains_ignore_case("kiosk-017", "kiosk-018"));
        assert!(!contains_ignore_case("ab", "abc"));
    }

    #[test]
    fn page_size_is_bounded() {
        let q = |limit| PageQuery { limit, ..PageQuery::default() };
        assert_eq!(q(0).limit(), DEFAULT_LIMIT);
        assert_eq!(q(25).limit(), 25);
        assert_eq!(q(1_000_000).limit(), MAX_LIMIT);
    }
}
