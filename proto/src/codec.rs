//! The two message enums and their encoding: one postcard value per binary
//! WebSocket frame.
//!
//! [`decode`] never panics: oversized input, truncated or malformed bytes,
//! unknown variants, trailing bytes and values over the limits each give a
//! [`DecodeError`].

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::check::{CheckDigest, CheckReport};
use crate::limits::*;
use crate::{ActionInfo, Bell, BellReport, Hello, Pulse, Welcome};

/// Agent → collector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// First message of every connection.
    Hello(Hello),
    /// Periodic health.
    Pulse(Pulse),
    /// Progress or outcome of a bell.
    BellReport(BellReport),
    // Version 2. New variants go last: postcard writes the variant's index,
    // so version-1 messages keep their bytes.
    /// Check states: all of them after each Welcome, then those that changed.
    Checks(CheckReport),
    /// A pulse with the count of checks per status (replaces `Pulse`).
    CheckedPulse(Pulse, CheckDigest),
    /// The allowlist's actions with their parameters, after the Hello.
    Actions(Vec<ActionInfo>),
}

impl AgentMsg {
    /// The first protocol version that has this message.
    pub fn since_version(&self) -> u16 {
        match self {
            AgentMsg::Hello(_) | AgentMsg::Pulse(_) | AgentMsg::BellReport(_) => 1,
            AgentMsg::Checks(_) | AgentMsg::CheckedPulse(..) | AgentMsg::Actions(_) => 2,
        }
    }
}

/// Collector → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Answer to a valid Hello.
    Welcome(Welcome),
    /// Run an action.
    Bell(Bell),
    /// Stop the bell with this id if it is running.
    Cancel(u64),
    // Version 2.
    /// Send every check's state again: the collector's counts disagree with
    /// the pulse's digest (its state was lost or is stale).
    ResendChecks,
}

impl ServerMsg {
    /// The first protocol version that has this message.
    pub fn since_version(&self) -> u16 {
        match self {
            ServerMsg::Welcome(_) | ServerMsg::Bell(_) | ServerMsg::Cancel(_) => 1,
            ServerMsg::ResendChecks => 2,
        }
    }
}

/// WebSocket close codes the collector uses, with a reason text alongside.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The collector is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol violation (Pulse before Hello, second Hello, …).
    pub const PROTOCOL: u16 = 1002;
    /// A text frame where binary is required.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// The frame did not decode.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy: device id does not match the token's enrolment.
    pub const POLICY: u16 = 1008;
    /// Frame larger than [`crate::MAX_FRAME`].
    pub const TOO_BIG: u16 = 1009;
    /// Close reason of an agent that is stopping (with [`GOING_AWAY`]): a
    /// planned stop, not a failure.
    pub const AGENT_STOPPING: &str = "agent stopping";
    /// Close reason prefix (with [`GOING_AWAY`]) of an agent stopping
    /// because a bell's action is rebooting the board; the bell id follows.
    pub const REBOOTING_PREFIX: &str = "rebooting for bell ";
    /// The collector cannot take the connection now (cut off from its
    /// cluster, overloaded): try again later, perhaps elsewhere.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The agent speaks another protocol version.
    pub const VERSION_MISMATCH: u16 = 4001;
    /// The device's enrolment was revoked.
    pub const REVOKED: u16 = 4003;
    /// A newer connection of the same device replaced this one.
    pub const REPLACED: u16 = 4004;
    /// No pulse for longer than the device's offline threshold.
    pub const SILENT: u16 = 4008;
}

/// Error encoding a message.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// Serialization failed.
    #[error("encoding failed: {0}")]
    Postcard(#[from] postcard::Error),
    /// The encoded message would exceed [`MAX_FRAME`].
    #[error("encoded message is {len} bytes, over the {MAX_FRAME}-byte limit")]
    TooLarge {
        /// Encoded length.
        len: usize,
    },
}

/// Error decoding a message. Each variant says what was wrong with the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame is longer than [`MAX_FRAME`].
    #[error("frame is {len} bytes, over the {MAX_FRAME}-byte limit")]
    TooLarge {
        /// Frame length.
        len: usize,
    },
    /// The bytes ended in the middle of a value.
    #[error("truncated message")]
    Truncated,
    /// An enum discriminant that this version does not know.
    #[error("unknown message or field variant")]
    UnknownVariant,
    /// Bytes left over after a complete message.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// Any other malformed content (bad varint, bad UTF-8, …).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A well-formed value over a protocol limit.
    #[error("field `{field}` is {len} long, over the limit of {max}")]
    Limit {
        /// Field name.
        field: &'static str,
        /// Its length (bytes or items).
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl From<postcard::Error> for DecodeError {
    fn from(e: postcard::Error) -> Self {
        use postcard::Error as E;
        match e {
            E::DeserializeUnexpectedEnd => DecodeError::Truncated,
            // serde's derive reports an out-of-range variant index as a
            // custom error; our types have no other custom deserializers.
            E::DeserializeBadEnum | E::SerdeDeCustom => DecodeError::UnknownVariant,
            other => DecodeError::Malformed(other.to_string()),
        }
    }
}

/// Checks a decoded value against the protocol limits.
pub trait Validate {
    /// `Ok` when every string and list is within its limit.
    fn validate(&self) -> Result<(), DecodeError>;
}

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), DecodeError> {
    if len > max {
        Err(DecodeError::Limit { field, len, max })
    } else {
        Ok(())
    }
}

fn check_list(field: &'static str, items: &[String], max_items: usize, max_len: usize) -> Result<(), DecodeError> {
    check_len(field, items.len(), max_items)?;
    items.iter().try_for_each(|s| check_len(field, s.len(), max_len))
}

impl Validate for Hello {
    fn validate(&self) -> Result<(), DecodeError> {
        check_len("device_id", self.device_id.len(), MAX_DEVICE_ID)?;
        for (field, value) in [
            ("agent_version", &self.agent_version),
            ("boot_id", &self.boot_id),
            ("hostname", &self.hostname),
            ("os", &self.os),
            ("kernel", &self.kernel),
            ("arch", &self.arch),
        ] {
            check_len(field, value.len(), MAX_STRING)?;
        }
        if let Some(model) = &self.board_model {
            check_len("board_model", model.len(), MAX_STRING)?;
        }
        check_list("tags", &self.tags, MAX_TAGS, MAX_TAG)?;
        check_list("actions", &self.actions, MAX_ITEMS, MAX_STRING)
    }
}

impl Validate for BellReport {
    fn validate(&self) -> Result<(), DecodeError> {
        check_len("output", self.output.len(), MAX_OUTPUT)?;
        if let Some(reason) = &self.reason {
            check_len("reason", reason.len(), MAX_OUTPUT)?;
        }
        Ok(())
    }
}

impl Validate for Bell {
    fn validate(&self) -> Result<(), DecodeError> {
        check_len("action", self.action.len(), MAX_STRING)?;
        check_len("params", self.params.len(), MAX_ITEMS)?;
        for (k, v) in &self.params {
            check_len("params", k.len(), MAX_STRING)?;
            check_len("params", v.len(), MAX_PARAM_VALUE)?;
        }
        Ok(())
    }
}

impl Validate for CheckReport {
    fn validate(&self) -> Result<(), DecodeError> {
        check_len("checks", self.results.len(), MAX_CHECKS)?;
        for r in &self.results {
            check_len("check name", r.name.len(), MAX_CHECK_NAME)?;
            if !crate::valid_device_id(&r.name) {
                return Err(DecodeError::Malformed(format!(
                    "check name {:?}: use letters, digits, '.', '_' or '-', not first '.' or '-'",
                    r.name
                )));
            }
            check_len("check summary", r.summary.len(), MAX_STRING)?;
            check_len("check output", r.output.len(), MAX_CHECK_OUTPUT)?;
        }
        Ok(())
    }
}

impl Validate for AgentMsg {
    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            AgentMsg::Hello(h) => h.validate(),
            AgentMsg::Pulse(_) | AgentMsg::CheckedPulse(..) => Ok(()),
            AgentMsg::BellReport(r) => r.validate(),
            AgentMsg::Checks(c) => c.validate(),
            AgentMsg::Actions(a) => {
                check_len("actions", a.len(), MAX_ITEMS)?;
                for action in a {
                    check_len("action name", action.name.len(), MAX_STRING)?;
                    check_list("action params", &action.params, MAX_ITEMS, MAX_STRING)?;
                }
                Ok(())
            }
        }
    }
}

impl Validate for ServerMsg {
    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            ServerMsg::Bell(b) => b.validate(),
            ServerMsg::Welcome(_) | ServerMsg::Cancel(_) | ServerMsg::ResendChecks => Ok(()),
        }
    }
}

/// Encodes a message into the bytes of one binary WebSocket frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    let bytes = postcard::to_stdvec(msg)?;
    if bytes.len() > MAX_FRAME {
        return Err(EncodeError::TooLarge { len: bytes.len() });
    }
    Ok(bytes)
}

/// Decodes one frame into a message and checks it against the limits.
pub fn decode<T: DeserializeOwned + Validate>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_FRAME {
        return Err(DecodeError::TooLarge { len: bytes.len() });
    }
    let (msg, rest) = postcard::take_from_bytes::<T>(bytes)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    msg.validate()?;
    Ok(msg)
}

/// If `bytes` starts like an [`AgentMsg::Hello`], returns its protocol
/// version, even when the rest is in a format this version cannot read. This
/// lets the collector tell "wrong version" from "garbage".
pub fn peek_hello_version(bytes: &[u8]) -> Option<u16> {
    // Variant index 0 (Hello) as a one-byte varint, then the u16 as a varint.
    let (&tag, rest) = bytes.split_first()?;
    if tag != 0 {
        return None;
    }
    postcard::take_from_bytes::<u16>(rest).ok().map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_version() {
        let hello = crate::Hello {
            protocol_version: 9,
            device_id: "d".into(),
            agent_version: String::new(),
            boot_id: String::new(),
            hostname: String::new(),
            os: String::new(),
            kernel: String::new(),
            arch: String::new(),
            board_model: None,
            interval_ms: 1000,
            tags: vec![],
            actions: vec![],
        };
        let bytes = encode(&AgentMsg::Hello(hello)).unwrap();
        assert_eq!(peek_hello_version(&bytes), Some(9));
        assert_eq!(peek_hello_version(&[1, 2]), None);
        assert_eq!(peek_hello_version(&[]), None);
    }
}
