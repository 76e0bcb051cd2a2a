//! Ready bells: a command from the collector to run one allowlisted action,
//! and the agent's reports of what happened.

use serde::{Deserialize, Serialize};

/// "Get ready: run this action now." Sent by the collector; the agent runs it
/// only if its own allowlist has the action and every parameter passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bell {
    /// Bell id, unique per collector, increasing.
    pub id: u64,
    /// Action name from the agent's allowlist.
    pub action: String,
    /// Parameters, each filling a `{name}` placeholder the action declares.
    pub params: Vec<(String, String)>,
    /// Run-time limit in milliseconds; `None` uses the action's own timeout.
    pub timeout_ms: Option<u32>,
}

/// A state the agent reports for a bell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BellState {
    /// The action has started.
    Running,
    /// The action exited 0 (or the reboot it asked for happened).
    Succeeded,
    /// The action exited non-zero, was killed, or could not start.
    Failed,
    /// The action ran past its timeout and was killed.
    TimedOut,
    /// The agent refused the bell: unknown action, bad parameter, lock held.
    Rejected,
    /// The action was stopped by a cancel request.
    Cancelled,
}

impl BellState {
    /// Whether this state is final.
    pub fn is_final(self) -> bool {
        !matches!(self, BellState::Running)
    }
}

/// The agent's report on a bell: sent when it starts running and when it
/// ends. A re-delivered bell is answered with the journaled final report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BellReport {
    /// The bell's id.
    pub id: u64,
    /// Its new state.
    pub state: BellState,
    /// Exit code, once known.
    pub exit_code: Option<i32>,
    /// Tail of combined stdout and stderr, at most [`crate::MAX_OUTPUT`] bytes.
    pub output: String,
    /// Run time in milliseconds (0 while running or when nothing ran).
    pub duration_ms: u64,
    /// Why it was rejected or failed, if it was.
    pub reason: Option<String>,
}

/// Alias kept for readability at call sites that deal with final reports.
pub type BellOutcome = BellReport;
