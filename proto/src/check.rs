//! Checks: is the application on the device healthy, not just the board.
//!
//! The agent runs its configured checks (a systemd unit, a Nagios-style
//! command, an HTTP endpoint, a TCP port, a process) and sends a
//! [`CheckReport`] when a check's state changes, all of them after each
//! Welcome. Every pulse carries a [`CheckDigest`], the count per status, so
//! the collector can tell it holds every check's state without a message per
//! check per interval; when its counts disagree it asks again with
//! [`crate::ServerMsg::ResendChecks`].
//!
//! Protocol version 2 and later: a version-1 connection carries none of
//! this.

use serde::{Deserialize, Serialize};

/// A check's state, as Nagios plugins report it (exit 0, 1, 2, 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CheckStatus {
    /// Exit 0: fine.
    Ok,
    /// Exit 1: degraded.
    Warning,
    /// Exit 2: failing.
    Critical,
    /// Exit 3, or the check itself could not run (timeout, missing binary).
    Unknown,
}

impl CheckStatus {
    /// All four, in the order of their numbers.
    pub const ALL: [CheckStatus; 4] =
        [CheckStatus::Ok, CheckStatus::Warning, CheckStatus::Critical, CheckStatus::Unknown];

    /// The Nagios number: 0 ok, 1 warning, 2 critical, 3 unknown.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// From a Nagios plugin's exit code; anything but 0–2 is unknown.
    pub fn from_exit_code(code: i32) -> CheckStatus {
        match code {
            0 => CheckStatus::Ok,
            1 => CheckStatus::Warning,
            2 => CheckStatus::Critical,
            _ => CheckStatus::Unknown,
        }
    }

    /// Lower-case name: `ok`, `warning`, `critical`, `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Warning => "warning",
            CheckStatus::Critical => "critical",
            CheckStatus::Unknown => "unknown",
        }
    }

    /// Parses a name as [`CheckStatus::as_str`] writes it, or the short
    /// forms `warn` and `crit`.
    pub fn parse(s: &str) -> Option<CheckStatus> {
        match s {
            "ok" => Some(CheckStatus::Ok),
            "warning" | "warn" => Some(CheckStatus::Warning),
            "critical" | "crit" => Some(CheckStatus::Critical),
            "unknown" => Some(CheckStatus::Unknown),
            _ => None,
        }
    }
}

/// What a check looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CheckKind {
    /// A systemd unit's active state.
    Unit,
    /// A Nagios-convention command.
    Command,
    /// An HTTP GET's status code.
    Http,
    /// A TCP connect.
    Tcp,
    /// A running process by name.
    Process,
}

impl CheckKind {
    /// Lower-case name, as in the agent's config: `unit`, `command`, …
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Unit => "unit",
            CheckKind::Command => "command",
            CheckKind::Http => "http",
            CheckKind::Tcp => "tcp",
            CheckKind::Process => "process",
        }
    }
}

/// One check's settled state (after the agent's retries agreed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The check's name from the agent's config (`[checks.NAME]`).
    pub name: String,
    /// What it looks at.
    pub kind: CheckKind,
    /// Its state.
    pub status: CheckStatus,
    /// One line: a plugin's first output line, or what the agent saw.
    pub summary: String,
    /// Tail of the output, at most [`crate::MAX_CHECK_OUTPUT`] bytes.
    pub output: String,
    /// Since when (agent wall clock, Unix ms) the check has had this status.
    pub since_ms: u64,
}

/// Check states sent by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Whether `results` is every check the agent has (checks the
    /// collector knew and that are missing were removed from the config);
    /// otherwise only the ones that changed.
    pub full: bool,
    /// The checks, at most [`crate::MAX_CHECKS`].
    pub results: Vec<CheckResult>,
}

/// Number of checks in each status, carried by every version-2 pulse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CheckDigest {
    /// Checks that are OK.
    pub ok: u16,
    /// Checks in WARNING.
    pub warning: u16,
    /// Checks in CRITICAL.
    pub critical: u16,
    /// Checks in UNKNOWN.
    pub unknown: u16,
}

impl CheckDigest {
    /// Counts the statuses of `results`.
    pub fn of<'a>(results: impl IntoIterator<Item = &'a CheckResult>) -> CheckDigest {
        let mut d = CheckDigest::default();
        for r in results {
            d.add(r.status);
        }
        d
    }

    /// Counts one more check in `status`.
    pub fn add(&mut self, status: CheckStatus) {
        let n = match status {
            CheckStatus::Ok => &mut self.ok,
            CheckStatus::Warning => &mut self.warning,
            CheckStatus::Critical => &mut self.critical,
            CheckStatus::Unknown => &mut self.unknown,
        };
        *n = n.saturating_add(1);
    }

    /// The count for `status`.
    pub fn get(&self, status: CheckStatus) -> u16 {
        match status {
            CheckStatus::Ok => self.ok,
            CheckStatus::Warning => self.warning,
            CheckStatus::Critical => self.critical,
            CheckStatus::Unknown => self.unknown,
        }
    }

    /// All checks counted.
    pub fn total(&self) -> u32 {
        CheckStatus::ALL.iter().map(|s| u32::from(self.get(*s))).sum()
    }

    /// The worst status with a check in it, if there are checks.
    pub fn worst(&self) -> Option<CheckStatus> {
        [CheckStatus::Critical, CheckStatus::Unknown, CheckStatus::Warning, CheckStatus::Ok]
            .into_iter()
            .find(|s| self.get(*s) > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_counts_and_ranks() {
        let r = |status| CheckResult {
            name: "x".into(),
            kind: CheckKind::Tcp,
            status,
            summary: String::new(),
            output: String::new(),
            since_ms: 0,
        };
        let d = CheckDigest::of(&[r(CheckStatus::Ok), r(CheckStatus::Ok), r(CheckStatus::Warning)]);
        assert_eq!((d.ok, d.warning, d.critical, d.unknown, d.total()), (2, 1, 0, 0, 3));
        assert_eq!(d.worst(), Some(CheckStatus::Warning));
        assert_eq!(CheckDigest::default().worst(), None);
        let d = CheckDigest::of(&[r(CheckStatus::Unknown), r(CheckStatus::Critical)]);
        assert_eq!(d.worst(), Some(CheckStatus::Critical));
        assert_eq!(CheckStatus::from_exit_code(2), CheckStatus::Critical);
        assert_eq!(CheckStatus::from_exit_code(-1), CheckStatus::Unknown);
        assert_eq!(CheckStatus::parse("crit"), Some(CheckStatus::Critical));
        assert_eq!(CheckStatus::Critical.code(), 2);
    }
}
