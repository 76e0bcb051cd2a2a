//! The Pulsebell agent.
//!
//! # Layout
//! - [`config`]: the TOML config, its defaults and validation.
//! - [`health`]: one health sample from procfs/sysfs (one file per source).
//! - [`uplink`]: the TLS WebSocket connection to the collector; reconnect
//!   backoff (`uplink/backoff.rs`) and which collector next
//!   (`uplink/endpoints.rs`) as pure state.
//! - [`actions`]: the allowlist, running a bell's action, timeouts, output.
//! - [`journal`]: the on-disk record that makes bells run exactly once.
//! - [`checks`]: application checks (unit, command, HTTP, TCP, process),
//!   their retries and the scheduler that keeps their settled states.
//! - [`resolve`]: host names to addresses (through the system's NSS, also
//!   in the static build).
//! - [`run`]: the daemon's main loop tying them together.
#![forbid(unsafe_code)]

pub mod actions;
pub mod checks;
pub mod config;
pub mod health;
pub mod journal;
pub mod provision;
pub mod resolve;
pub mod run;
pub mod uplink;
