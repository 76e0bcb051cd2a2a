//! The handshake: the agent's [`Hello`] and the collector's [`Welcome`].

use serde::{Deserialize, Serialize};

/// Sent by the agent once per connection, before any pulse. Facts that do not
/// change between pulses travel here, not in every pulse.
///
/// `protocol_version` is the first field so the collector can read it (see
/// [`crate::codec::peek_hello_version`]) even when the rest of a Hello from an
/// incompatible agent does not decode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's [`crate::PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// Device id; must match the enrolment of the token used to connect.
    pub device_id: String,
    /// Agent version (its crate version).
    pub agent_version: String,
    /// Linux boot id (`/proc/sys/kernel/random/boot_id`); changes on reboot.
    pub boot_id: String,
    /// Hostname.
    pub hostname: String,
    /// Operating system (`PRETTY_NAME` from os-release).
    pub os: String,
    /// Kernel release.
    pub kernel: String,
    /// CPU architecture (`aarch64`, `arm`, `x86_64`, …).
    pub arch: String,
    /// Board model from the device tree or DMI, if known.
    pub board_model: Option<String>,
    /// Pulse interval the agent intends to keep, in milliseconds.
    pub interval_ms: u32,
    /// Operator-chosen tags from the agent's config.
    pub tags: Vec<String>,
    /// Names of the actions the agent's allowlist holds.
    pub actions: Vec<String>,
}

/// The collector's answer to a valid [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The collector's [`crate::PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// Collector wall-clock time, milliseconds since the Unix epoch.
    pub server_time_ms: u64,
    /// The pulse interval the collector accepted (the agent's, clamped to
    /// the protocol's bounds), in milliseconds.
    pub interval_ms: u32,
    /// After how long without a pulse the collector declares the device
    /// offline, in milliseconds.
    pub offline_after_ms: u32,
    /// Connection generation: increases with every accepted connection of
    /// this device.
    pub generation: u64,
}

/// What the agent's allowlist says of one action, so an operator's form
/// can ask for its parameters and confirm a disruptive one (protocol
/// version 2, `AgentMsg::Actions`, after the Hello).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionInfo {
    /// The action's name (as in `Hello::actions`).
    pub name: String,
    /// Names of the parameters it takes.
    pub params: Vec<String>,
    /// Refused while the device's maintenance lock is held.
    pub disruptive: bool,
    /// Reboots the board.
    pub reboots: bool,
}
