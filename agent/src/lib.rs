//! The Pulsebell agent.
//!
//! # Layout
//! - [`config`]: the TOML config, its defaults and validation.
//! - [`health`]: one health sample from procfs/sysfs (one file per source).
//! - [`uplink`]: the TLS WebSocket connection to the collector; reconnect
//!   backoff as pure state in `uplink/backoff.rs`.
//! - [`actions`]: the allowlist, running a bell's action, timeouts, output.
//! - [`journal`]: the on-disk record that makes bells run exactly once.
//! - [`run`]: the daemon's main loop tying them together.
#![forbid(unsafe_code)]

pub mod actions;
pub mod config;
pub mod health;
pub mod journal;
pub mod run;
pub mod uplink;
