//! The collector's TOML configuration: keys, defaults, validation.
//!
//! Every key has a default, so an empty file (or none) is a working
//! config. Unknown keys are errors; every error names its key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The commented default config, compiled in.
pub const DEFAULT_CONFIG: &str = include_str!("../default-config.toml");

/// Exit code for an invalid config or command line (`EX_USAGE`).
pub const EX_CONFIG: i32 = 64;

/// A config problem: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path; empty when the file itself is unreadable or not TOML.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "invalid config: {}", self.message)
        } else {
            write!(f, "invalid config key `{}`: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a duration ({e}); write e.g. \"5s\" or \"1m\"")))
}

fn de_duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// The collector config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Device listener (TLS WebSockets).
    pub listen: SocketAddr,
    /// Admin listener (HTTP API, CLI, metrics); keep it on loopback.
    pub admin_listen: SocketAddr,
    /// Where sled, TLS material and the admin token live.
    pub data_dir: PathBuf,
    /// Offline threshold for every device; `None` = 3 × the device's interval.
    #[serde(deserialize_with = "de_duration_opt")]
    pub offline_after: Option<Duration>,
    /// How long pulse state may sit in memory before it is written to sled.
    #[serde(deserialize_with = "de_duration")]
    pub write_back: Duration,
    /// A device record whose only news is newer pulses is written to sled
    /// at most this often (liveness changes go at the next `write_back`);
    /// `[cluster] sync_interval` takes its place in cluster mode.
    #[serde(deserialize_with = "de_duration")]
    pub sync_interval: Duration,
    /// sled's page cache, in MiB.
    pub sled_cache_mb: u64,
    /// Time allowed for shutdown (closing connections, flushing).
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// Default time a bell may wait for an offline device.
    #[serde(deserialize_with = "de_duration")]
    pub bell_ttl: Duration,
    /// How long one-minute history buckets are kept.
    #[serde(deserialize_with = "de_duration")]
    pub history_retention: Duration,
    /// TLS certificate; without one a dev CA is generated.
    pub tls: TlsConfig,
    /// Resource limits.
    pub limits: Limits,
    /// Per-device overrides.
    pub devices: BTreeMap<String, DeviceOverride>,
    /// Alert hooks.
    pub alerts: AlertsConfig,
    /// Cluster mode (NATS JetStream instead of sled).
    pub cluster: ClusterConfig,
    /// `/metrics`.
    pub metrics: MetricsConfig,
    /// `[[rules]]`: bells rung by the collector itself when a condition
    /// holds (see [`crate::rules`]).
    pub rules: Vec<RuleConfig>,
}

/// One `[[rules]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name, shown as the bell's origin `rule:NAME`.
    pub name: String,
    /// The condition.
    pub when: RuleWhen,
    /// The bell it rings.
    pub ring: RuleRing,
    /// Only devices with one of these tags (empty: every device).
    #[serde(default)]
    pub tags: Vec<String>,
    /// At most one bell per device per cooldown.
    #[serde(default = "default_cooldown", deserialize_with = "de_duration")]
    pub cooldown: Duration,
    /// At most this many bells of the rule per hour, fleet-wide.
    #[serde(default = "default_max_per_hour")]
    pub max_per_hour: u32,
}

fn default_cooldown() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_max_per_hour() -> u32 {
    20
}

/// A rule's condition: `{ check = "app", status = "critical", for = "2m" }`
/// or `{ state = "offline", for = "10m" }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleWhen {
    /// A check's name.
    pub check: Option<String>,
    /// The check's status: `critical` (default), `warning`, `unknown` or `ok`.
    pub status: Option<String>,
    /// Or a device state: `offline`.
    pub state: Option<String>,
    /// How long the condition must hold.
    #[serde(default, rename = "for", deserialize_with = "de_duration_opt")]
    pub for_: Option<Duration>,
}

/// The bell a rule rings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleRing {
    /// An action the device announces.
    pub action: String,
    /// Its parameters.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Which per-device series `/metrics` carries.
    pub per_device: PerDevice,
}

/// `[metrics] per_device`: how many series a device adds to `/metrics`
/// (about 20 with `all`: a large fleet can bound what Prometheus stores).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PerDevice {
    /// Every device series: up, last seen, CPU, load, memory, disk,
    /// temperature, throttling.
    #[default]
    All,
    /// Only `pulsebell_device_up` (one series per device).
    Up,
    /// No per-device series; the fleet totals only.
    None,
}

/// `[cluster]`: run as one of several collectors sharing one fleet on NATS
/// JetStream. Without `nats_urls`, the collector runs alone on sled.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS servers (`nats://host:4222`, `tls://host:4222`); empty: no
    /// cluster.
    pub nats_urls: Vec<String>,
    /// This node's id; default: the hostname.
    pub node_id: Option<String>,
    /// NATS credentials file (JWT + NKey seed).
    pub nats_creds_file: Option<PathBuf>,
    /// CA certificate (PEM) for NATS servers with a private CA.
    pub nats_ca_file: Option<PathBuf>,
    /// Replicas of every stream and bucket; default 3 in a NATS cluster,
    /// 1 on a single server.
    pub replicas: Option<usize>,
    /// A node whose heartbeat is this old is lost; its devices are
    /// declared offline (`collector_lost`).
    #[serde(deserialize_with = "de_duration")]
    pub lost_after: Duration,
    /// A device record whose only news is newer pulses is written back to
    /// JetStream at most this often (liveness changes go at once): fewer
    /// writes than pulses; other nodes see health and last-seen up to this
    /// late.
    #[serde(deserialize_with = "de_duration")]
    pub sync_interval: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats_urls: vec![],
            node_id: None,
            nats_creds_file: None,
            nats_ca_file: None,
            replicas: None,
            lost_after: Duration::from_secs(8),
            sync_interval: Duration::from_secs(30),
        }
    }
}

impl ClusterConfig {
    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.nats_urls.is_empty()
    }

    /// This node's id: `node_id`, else the hostname.
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "collector".into())
        })
    }
}

/// Whether `id` can name a node (it becomes part of NATS keys).
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `[alerts]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// URLs that get each alert as a JSON POST.
    pub webhooks: Vec<String>,
    /// A command (argv, no shell) that gets each alert as JSON on stdin.
    pub command: Vec<String>,
    /// CA certificates (PEM) trusted for `https://` webhooks besides the
    /// public roots (a private receiver).
    pub ca_file: Option<PathBuf>,
    /// Which alerts: `device_offline`, `device_online`, `under_voltage`,
    /// `throttled`, `bell_failed`, `agent_stopped`. Empty: all but
    /// `agent_stopped`.
    pub events: Vec<String>,
}

/// `[tls]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: Option<PathBuf>,
    /// PEM private key.
    pub key_file: Option<PathBuf>,
    /// Extra names for the generated dev certificate.
    pub names: Vec<String>,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Device connections at once; more are refused at accept.
    pub max_connections: usize,
    /// TLS handshakes in progress at once (reconnect storms queue here).
    pub handshake_concurrency: usize,
    /// Time for TLS, the upgrade and the Hello together.
    #[serde(deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
    /// Largest WebSocket message from a device, bytes.
    pub max_message_size: usize,
    /// Messages queued for one device before it counts as stuck.
    pub outbound_queue: usize,
    /// Failed authentications per source address per minute before 429.
    pub auth_failures_per_minute: u32,
    /// Kernel accept queue of the device listener (capped by
    /// net.core.somaxconn): room for a reconnect storm's SYNs.
    pub accept_backlog: u32,
    /// Newest protocol version offered to agents (default: the newest this
    /// build speaks). 1 serves every agent as version 1, as the previous
    /// release did (no checks): for a staged rollout or a rollback.
    pub max_protocol_version: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 50_000,
            handshake_concurrency: 256,
            handshake_timeout: Duration::from_secs(10),
            max_message_size: pulsebell_proto::MAX_FRAME,
            outbound_queue: 256,
            auth_failures_per_minute: 60,
            accept_backlog: 4096,
            max_protocol_version: pulsebell_proto::PROTOCOL_VERSION,
        }
    }
}

/// `[devices.<id>]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceOverride {
    /// Offline threshold for this device.
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub offline_after: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8443".parse().expect("static address"),
            admin_listen: "127.0.0.1:9180".parse().expect("static address"),
            data_dir: PathBuf::from("./pulsebell-data"),
            offline_after: None,
            write_back: Duration::from_secs(1),
            sync_interval: Duration::from_secs(30),
            sled_cache_mb: 64,
            shutdown_grace: Duration::from_secs(10),
            bell_ttl: Duration::from_secs(3600),
            history_retention: Duration::from_secs(7 * 24 * 3600),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            devices: BTreeMap::new(),
            alerts: AlertsConfig::default(),
            cluster: ClusterConfig::default(),
            metrics: MetricsConfig::default(),
            rules: Vec::new(),
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { key: String::new(), message: format!("cannot read {}: {e}", path.display()) })?;
        Config::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            let inner = e.into_inner();
            let message = match inner.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1;
                    format!("{} (at line {line})", inner.message())
                }
                None => inner.message().to_string(),
            };
            ConfigError { key, message }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense (also after command-line
    /// overrides).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| Err(ConfigError { key: key.into(), message: message.into() });
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return bad("tls.key_file", "set both `cert_file` and `key_file`, or neither");
        }
        if self.limits.max_connections == 0 {
            return bad("limits.max_connections", "must be at least 1");
        }
        if self.limits.handshake_concurrency == 0 {
            return bad("limits.handshake_concurrency", "must be at least 1");
        }
        if self.limits.outbound_queue == 0 {
            return bad("limits.outbound_queue", "must be at least 1");
        }
        if self.limits.max_message_size < 1024 || self.limits.max_message_size > pulsebell_proto::MAX_FRAME {
            return bad("limits.max_message_size", "must be between 1024 and 65536 bytes");
        }
        if self.write_back.is_zero() || self.write_back > Duration::from_secs(60) {
            return bad("write_back", "must be between 1ms and 60s");
        }
        if self.sync_interval > Duration::from_secs(600) {
            return bad("sync_interval", "must be at most 10m");
        }
        if self.offline_after.is_some_and(|d| d < Duration::from_millis(300)) {
            return bad("offline_after", "must be at least 300ms");
        }
        for (i, url) in self.alerts.webhooks.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.parse::<reqwest::Url>().is_err() {
                return bad(&format!("alerts.webhooks[{i}]"), "must be an http:// or https:// URL");
            }
        }
        if let Some(path) = &self.alerts.ca_file {
            if let Err(e) = std::fs::metadata(path) {
                return bad("alerts.ca_file", &format!("cannot read {}: {e}", path.display()));
            }
        }
        if self.alerts.command.first().is_some_and(|c| c.is_empty()) {
            return bad("alerts.command", "must name a program: command = [\"/path/to/program\", ...]");
        }
        const KINDS: [&str; crate::store::AlertKind::ALL.len()] = {
            let mut names = [""; crate::store::AlertKind::ALL.len()];
            let mut i = 0;
            while i < names.len() {
                names[i] = crate::store::AlertKind::ALL[i].as_str();
                i += 1;
            }
            names
        };
        let (oldest, newest) = (pulsebell_proto::OLDEST_PROTOCOL_VERSION, pulsebell_proto::PROTOCOL_VERSION);
        if !(oldest..=newest).contains(&self.limits.max_protocol_version) {
            return bad("limits.max_protocol_version", &format!("this build speaks versions {oldest} to {newest}"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let key = |k: &str| format!("rules[{i}].{k}");
            if !pulsebell_proto::valid_tag(&r.name) {
                return bad(&key("name"), "use letters, digits, '.', '_' or '-' (at most 64)");
            }
            if !names.insert(r.name.as_str()) {
                return bad(&key("name"), &format!("another rule is named `{}`", r.name));
            }
            match (&r.when.check, &r.when.state) {
                (Some(check), None) => {
                    if !pulsebell_proto::valid_device_id(check) {
                        return bad(&key("when.check"), "not a check name");
                    }
                    if let Some(s) = &r.when.status {
                        if pulsebell_proto::CheckStatus::parse(s).is_none() {
                            return bad(&key("when.status"), "use ok, warning, critical or unknown");
                        }
                    }
                }
                (None, Some(state)) => {
                    if state != "offline" {
                        return bad(&key("when.state"), "only \"offline\" is supported");
                    }
                    if r.when.status.is_some() {
                        return bad(&key("when.status"), "goes with `check`, not `state`");
                    }
                }
                _ => return bad(&key("when"), "set exactly one of `check` and `state`"),
            }
            if !pulsebell_proto::valid_tag(&r.ring.action) {
                return bad(&key("ring.action"), "not an action name");
            }
            if let Some(t) = r.tags.iter().find(|t| !pulsebell_proto::valid_tag(t)) {
                return bad(&key("tags"), &format!("`{t}` is not a valid tag"));
            }
            if r.max_per_hour == 0 {
                return bad(&key("max_per_hour"), "must be at least 1 (remove the rule to stop it)");
            }
        }
        if let Some(e) = self.alerts.events.iter().find(|e| !KINDS.contains(&e.as_str())) {
            return bad("alerts.events", &format!("unknown event `{e}`; use {}", KINDS.join(", ")));
        }
        for (i, url) in self.cluster.nats_urls.iter().enumerate() {
            let ok = ["nats://", "tls://", "ws://", "wss://"].iter().any(|p| url.starts_with(p))
                && url.parse::<reqwest::Url>().is_ok_and(|u| u.host_str().is_some());
            if !ok {
                return bad(&format!("cluster.nats_urls[{i}]"), "must be a nats://host:port (or tls://) URL");
            }
        }
        if let Some(id) = &self.cluster.node_id {
            if !valid_node_id(id) {
                return bad("cluster.node_id", "use 1 to 64 letters, digits, '-' or '_'");
            }
        }
        if self.cluster.replicas.is_some_and(|r| !(1..=5).contains(&r)) {
            return bad("cluster.replicas", "must be between 1 and 5");
        }
        if self.cluster.sync_interval > Duration::from_secs(600) {
            return bad("cluster.sync_interval", "must be at most 10m");
        }
        if self.cluster.lost_after < Duration::from_secs(3) || self.cluster.lost_after > Duration::from_secs(120) {
            return bad("cluster.lost_after", "must be between 3s and 120s");
        }
        for (id, o) in &self.devices {
            if o.offline_after.is_some_and(|d| d < Duration::from_millis(300)) {
                return bad(&format!("devices.{id}.offline_after"), "must be at least 300ms");
            }
        }
        Ok(())
    }

    /// The offline threshold for `device` whose agent pulses every `interval`.
    pub fn offline_after(&self, device: &str, interval: Duration) -> Duration {
        self.devices.get(device).and_then(|o| o.offline_after).or(self.offline_after).unwrap_or(interval * 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_default_configs_parse() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9180");
        assert_eq!(c.listen.to_string(), "0.0.0.0:8443");
        let d = Config::parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(d.write_back, Duration::from_secs(1));
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("[limits]\nhandshake_timeout = \"soon\"\n").unwrap_err();
        assert_eq!(e.key, "limits.handshake_timeout");
        let e = Config::parse("listen = \"nowhere\"\n").unwrap_err();
        assert_eq!(e.key, "listen");
        let e = Config::parse("lisen = \"0.0.0.0:1\"\n").unwrap_err();
        assert!(e.message.contains("lisen"), "{e}");
        let e = Config::parse("[tls]\ncert_file = \"c.pem\"\n").unwrap_err();
        assert_eq!(e.key, "tls.key_file");
        let e = Config::parse("[devices.pi]\noffline_after = \"1ms\"\n").unwrap_err();
        assert_eq!(e.key, "devices.pi.offline_after");
        let e = Config::parse("[metrics]\nper_device = \"some\"\n").unwrap_err();
        assert_eq!(e.key, "metrics.per_device");
        assert!(e.message.contains("`all`, `up`, `none`"), "{e}");
    }

    #[test]
    fn rules_parse_with_defaults_and_errors_name_the_key() {
        let rule = |extra: &str| {
            format!("[[rules]]\nname = \"restart-app\"\nring = {{ action = \"restart-app\" }}\n{extra}\n")
        };
        let c = Config::parse(&rule("when = { check = \"app\", for = \"2m\" }")).unwrap();
        let r = &c.rules[0];
        assert_eq!((r.cooldown, r.max_per_hour), (Duration::from_secs(900), 20));
        assert_eq!(r.when.for_, Some(Duration::from_secs(120)));
        assert_eq!(r.when.check.as_deref(), Some("app"));
        let c = Config::parse(&rule("when = { state = \"offline\", for = \"10m\" }\ntags = [\"kiosk\"]")).unwrap();
        assert_eq!(c.rules[0].tags, ["kiosk"]);
        for (extra, key) in [
            ("when = { check = \"app\", state = \"offline\" }", "rules[0].when"),
            ("when = { state = \"online\" }", "rules[0].when.state"),
            ("when = { check = \"app\", status = \"bad\" }", "rules[0].when.status"),
            ("when = { check = \"app\" }\nmax_per_hour = 0", "rules[0].max_per_hour"),
        ] {
            assert_eq!(Config::parse(&rule(extra)).unwrap_err().key, key, "{extra}");
        }
        let twice = format!("{}{}", rule("when = { check = \"a\" }"), rule("when = { check = \"b\" }"));
        let e = Config::parse(&twice).unwrap_err();
        assert_eq!(e.key, "rules[1].name");
        let e = Config::parse(&rule("when = { check = \"app\", for = \"soon\" }")).unwrap_err();
        assert!(e.key.starts_with("rules"), "{e}");
    }

    #[test]
    fn metrics_per_device_defaults_to_all() {
        assert_eq!(Config::parse("").unwrap().metrics.per_device, PerDevice::All);
        assert_eq!(Config::parse(DEFAULT_CONFIG).unwrap().metrics.per_device, PerDevice::All);
        assert_eq!(Config::parse("[metrics]\nper_device = \"up\"\n").unwrap().metrics.per_device, PerDevice::Up);
    }

    #[test]
    fn offline_after_precedence() {
        let c = Config::parse("offline_after = \"20s\"\n[devices.slow]\noffline_after = \"5m\"\n").unwrap();
        assert_eq!(c.offline_after("slow", Duration::from_secs(5)), Duration::from_secs(300));
        assert_eq!(c.offline_after("other", Duration::from_secs(5)), Duration::from_secs(20));
        let c = Config::parse("").unwrap();
        assert_eq!(c.offline_after("x", Duration::from_secs(5)), Duration::from_secs(15));
    }
}
