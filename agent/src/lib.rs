//! The Pulsebell agent.
//!
//! # Layout
//! - [`config`]: the TOML config, its defaults and validation.
//! - [`health`]: one health sample from procfs/sysfs (one file per source).
//! - [`uplink`]: the TLS WebSocket connection to the collector, reconnecting
//!   with backoff (pure state in `uplink/backoff.rs`).
//! - [`run`]: the daemon's main loop tying them together.
#![forbid(unsafe_code)]

pub mod config;
pub mod health;
