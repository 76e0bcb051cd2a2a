//! The Pulsebell collector: authenticates devices, keeps their last state
//! and history, detects silence, rings bells.
//!
//! # Layout
//! - [`config`]: the TOML config and its defaults.
//! - [`clock`]: Unix-ms time and RFC 3339.
//! - [`tls`]: the device listener's certificate (configured, or a generated dev CA).
//! - [`auth`]: device tokens (hashed, constant-time) and the admin token check.
//! - [`store`]: the async persistence interface, its sled (default), NATS
//!   JetStream (cluster) and in-memory (tests) implementations, and the
//!   records they keep (`store/records.rs`).
//! - [`liveness`]: the online/offline rules, ordered by connection generation.
//! - [`fleet`]: every device in memory: enrolment, connection owner, last
//!   state; link quality (`fleet/link.rs`), views (`fleet/view.rs`),
//!   write-back batches (`fleet/writeback.rs`).
//! - [`gateway`]: TLS accept, WebSocket upgrade, token auth, one session per
//!   device connection (`gateway/session.rs`).
//! - [`provision`]: provisioning keys (zero-touch enrolment).
//! - [`cluster`]: cluster mode: changes from other nodes, heartbeats,
//!   fencing, lost nodes.
//! - [`history`]: one-minute aggregates per device, kept for a week.
//! - [`bells`]: the durable bell queue and its state machine.
//! - [`rules`]: `[[rules]]` that ring bells by themselves (a failing check's
//!   restart), within a cooldown and an hourly ceiling.
//! - [`alerts`]: webhook/command hooks on transitions, from a durable outbox.
//! - [`admin`]: the admin HTTP API (JSON) for the CLI and scripts.
//! - [`server`]: wires it all together; start on port 0 in tests.
//! - [`cli`]: the command line, one file per group of subcommands.
#![forbid(unsafe_code)]

pub mod admin;
pub mod alerts;
pub mod auth;
pub mod bells;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod fleet;
pub mod gateway;
pub mod history;
pub mod liveness;
pub mod provision;
pub mod rules;
pub mod server;
pub mod store;
pub mod tls;
