//! The Pulsebell collector: authenticates devices, keeps their last state
//! and history, detects silence, rings bells.
//!
//! # Layout
//! - [`config`]: the TOML config and its defaults.
//! - [`tls`]: the device listener's certificate (configured, or a generated dev CA).
//! - [`store`]: the narrow persistence interface and its sled implementation.
//! - [`fleet`]: every device in memory: enrolment, connection, last state,
//!   liveness events; written back to the store in batches.
//! - [`gateway`]: TLS accept, WebSocket upgrade, token auth (`gateway/auth.rs`),
//!   one session per device connection (`gateway/session.rs`).
//! - [`history`]: one-minute aggregates per device, kept for a week.
//! - [`bells`]: the durable bell queue and its state machine.
//! - [`alerts`]: webhook/command hooks on transitions, from a durable outbox.
//! - [`admin`]: the admin HTTP API (JSON) for the CLI and scripts.
//! - [`server`]: wires it all together; start on port 0 in tests.
//! - [`cli`]: the command line, one file per group of subcommands.
#![forbid(unsafe_code)]

pub mod admin;
pub mod alerts;
pub mod bells;
pub mod cli;
pub mod config;
pub mod fleet;
pub mod gateway;
pub mod history;
pub mod server;
pub mod store;
pub mod tls;
