//! What the admin API shows of a device: [`DeviceView`] (`status --json`,
//! `show --json`, the dashboard, metrics).

use pulsebell_proto::view::HealthView;
use pulsebell_proto::CheckResult;
use serde::{Deserialize, Serialize};

use super::link;
use crate::clock::rfc3339;
use crate::store::{DeviceRecord, Enrolment};

/// The JSON view of a device (`status --json`, `show --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceView {
    /// Device id.
    pub id: String,
    /// `online`, `offline` or `never_seen`.
    pub state: String,
    /// Last pulse, RFC 3339.
    pub last_seen: Option<String>,
    /// Agent version.
    pub agent_version: Option<String>,
    /// Hostname.
    pub hostname: Option<String>,
    /// CPU architecture.
    pub arch: Option<String>,
    /// OS.
    pub os: Option<String>,
    /// Kernel.
    pub kernel: Option<String>,
    /// Board model.
    pub board_model: Option<String>,
    /// Boot id.
    pub boot_id: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Actions the agent allows.
    pub actions: Vec<String>,
    /// Pulse interval, ms.
    pub interval_ms: Option<u32>,
    /// Offline threshold, ms.
    pub offline_after_ms: u64,
    /// Whether a connection is open.
    pub connected: bool,
    /// Connection generation.
    pub generation: u64,
    /// Id of the collector node holding the connection; null when offline.
    #[serde(default)]
    pub node: Option<String>,
    /// Why it last went offline.
    #[serde(default)]
    pub last_offline_reason: Option<String>,
    /// When enrolled, RFC 3339.
    pub enrolled_at: String,
    /// Last health, in human units.
    pub health: Option<HealthView>,
    /// Link quality.
    pub link: LinkView,
    /// The agent's checks as last reported, by name (agents of protocol
    /// version 2 and later).
    #[serde(default)]
    pub checks: Vec<CheckView>,
    /// Each of `actions` with its parameters and whether it is disruptive
    /// (agents of protocol version 2; older ones: no parameters known).
    #[serde(default)]
    pub action_details: Vec<ActionView>,
}

/// One action a device announced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionView {
    /// Name.
    pub name: String,
    /// Its parameters' names.
    pub params: Vec<String>,
    /// Refused while the device's maintenance lock is held.
    pub disruptive: bool,
    /// Reboots the board.
    pub reboots: bool,
    /// Whether the agent described it (version 2); if not, nothing is
    /// known of its parameters or whether it is disruptive.
    pub described: bool,
}

/// One of a device's checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckView {
    /// Name from the agent's config.
    pub name: String,
    /// `unit`, `command`, `http`, `tcp` or `process`.
    pub kind: String,
    /// `ok`, `warning`, `critical` or `unknown`.
    pub status: String,
    /// One line: what the check saw.
    pub summary: String,
    /// Since when it has had this status (the agent's clock), RFC 3339.
    pub since: String,
    /// Tail of the check's output.
    pub output: String,
}

/// One check of one device, as `GET /v1/checks` and `checks --json` list it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRow {
    /// Device id.
    pub device: String,
    /// The check.
    #[serde(flatten)]
    pub check: CheckView,
}

impl From<&CheckResult> for CheckView {
    fn from(c: &CheckResult) -> CheckView {
        CheckView {
            name: c.name.clone(),
            kind: c.kind.as_str().into(),
            status: c.status.as_str().into(),
            summary: c.summary.clone(),
            since: rfc3339(c.since_ms),
            output: c.output.clone(),
        }
    }
}

/// Link quality in the device view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkView {
    /// Gaps in sequence numbers.
    pub missed_pulses: u64,
    /// Pulses that came more than 1.5 intervals after the previous one.
    pub late_pulses: u64,
    /// Reconnections in the last 24 h.
    pub reconnects_24h: u64,
    /// Last ping round trip, ms.
    pub rtt_ms: Option<f64>,
    /// Whether the link looks unreliable.
    pub flaky: bool,
}

/// Builds the view. `node`: who holds the connection, if anyone.
pub fn build(
    id: &str,
    enrolment: &Enrolment,
    r: &DeviceRecord,
    node: Option<&str>,
    offline_after_ms: u64,
    now: u64,
) -> DeviceView {
    let h = r.hello.as_ref();
    let online = r.online && node.is_some();
    let state = state_of(r, node);
    let reconnects_24h = link::reconnects_24h(&r.link, now);
    DeviceView {
        id: id.to_string(),
        state: state.to_string(),
        last_seen: r.last_seen_ms.map(rfc3339),
        agent_version: h.map(|h| h.agent_version.clone()),
        hostname: h.map(|h| h.hostname.clone()),
        arch: h.map(|h| h.arch.clone()),
        os: h.map(|h| h.os.clone()),
        kernel: h.map(|h| h.kernel.clone()),
        board_model: h.and_then(|h| h.board_model.clone()),
        boot_id: h.map(|h| h.boot_id.clone()),
        tags: tags_of(enrolment, r),
        actions: h.map(|h| h.actions.clone()).unwrap_or_default(),
        interval_ms: h.map(|h| h.interval_ms),
        offline_after_ms,
        connected: node.is_some(),
        generation: r.generation,
        node: if online { node.map(str::to_string) } else { None },
        last_offline_reason: if online { None } else { r.last_offline_reason.map(|r| r.as_str().to_string()) },
        enrolled_at: rfc3339(enrolment.created_ms),
        health: r.health.as_ref().map(HealthView::from),
        link: LinkView {
            missed_pulses: r.link.missed_pulses,
            late_pulses: r.link.late_pulses,
            reconnects_24h,
            rtt_ms: r.link.rtt_ms,
            flaky: link::flaky(&r.link, reconnects_24h),
        },
        checks: r.checks.iter().map(CheckView::from).collect(),
        action_details: h
            .map(|h| h.actions.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|name| match r.action_info.iter().find(|a| &a.name == name) {
                Some(a) => ActionView {
                    name: a.name.clone(),
                    params: a.params.clone(),
                    disruptive: a.disruptive,
                    reboots: a.reboots,
                    described: true,
                },
                None => ActionView {
                    name: name.clone(),
                    params: vec![],
                    disruptive: false,
                    reboots: false,
                    described: false,
                },
            })
            .collect(),
    }
}

/// `online`, `offline` or `never_seen`. `node`: who holds the connection.
pub fn state_of(r: &DeviceRecord, node: Option<&str>) -> &'static str {
    if r.last_seen_ms.is_none() {
        "never_seen"
    } else if r.online && node.is_some() {
        "online"
    } else {
        "offline"
    }
}

/// The agent's own tags, then those its enrolment gave it.
pub fn tags_of(enrolment: &Enrolment, r: &DeviceRecord) -> Vec<String> {
    let mut tags = r.hello.as_ref().map(|h| h.tags.clone()).unwrap_or_default();
    for t in &enrolment.tags {
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    tags
}
