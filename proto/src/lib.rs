//! The Pulsebell wire protocol, shared by the agent and the collector.
//!
//! # Layout
//! - [`limits`]: protocol version, WebSocket subprotocol, frame and string limits.
//! - [`hello`]: [`Hello`], sent once per connection by the agent, and the
//!   collector's [`Welcome`] answer.
//! - [`pulse`]: [`Pulse`] and the fixed-point [`Health`] sample it carries.
//! - [`bell`]: ready bells (collector → agent commands) and their reports.
//! - [`check`]: application checks' states and the digest pulses carry
//!   (version 2).
//! - [`provision`]: zero-touch enrolment with a provisioning key.
//! - [`view`]: the same values in human units for JSON output.
//! - [`codec`]: the two message enums, [`AgentMsg`] and [`ServerMsg`], and
//!   [`encode`] / [`decode`] with typed errors and limit checks.
//!
//! Every message travels as one binary WebSocket frame holding one postcard
//! value. Postcard is not self-describing: a field added to a message changes
//! the wire format, so it needs a new [`PROTOCOL_VERSION`]. Golden byte
//! vectors in `tests/golden.rs` fail when the format drifts by accident.
//!
//! ```
//! use pulsebell_proto::{decode, encode, AgentMsg, Health, Pulse};
//! let msg = AgentMsg::Pulse(Pulse { seq: 7, health: Health::default() });
//! let bytes = encode(&msg).unwrap();
//! assert_eq!(decode::<AgentMsg>(&bytes).unwrap(), msg);
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bell;
pub mod check;
pub mod codec;
pub mod hello;
pub mod limits;
pub mod provision;
pub mod pulse;
pub mod view;

pub use bell::{Bell, BellOutcome, BellReport, BellState};
pub use check::{CheckDigest, CheckKind, CheckReport, CheckResult, CheckStatus};
pub use codec::{close, decode, encode, peek_hello_version, AgentMsg, DecodeError, EncodeError, ServerMsg, Validate};
pub use hello::{ActionInfo, Hello, Welcome};
pub use limits::*;
pub use pulse::{Health, Pulse, Throttled};
