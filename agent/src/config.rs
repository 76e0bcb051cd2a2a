//! The agent's TOML configuration: parsing, defaults and validation.
//!
//! Every key is a named constant in [`keys`]; an error names the key and the
//! problem, and `main` exits with [`EX_CONFIG`] (64, `EX_USAGE`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex_lite::Regex;
use serde::{Deserialize, Deserializer};

/// The commented default config, compiled in.
pub const DEFAULT_CONFIG: &str = include_str!("../default-config.toml");

/// Exit code for an invalid config or command line (`EX_USAGE`).
pub const EX_CONFIG: i32 = 64;

/// Default pulse interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pulsebell-agent";

/// Default action timeout.
pub const DEFAULT_ACTION_TIMEOUT: Duration = Duration::from_secs(300);

/// Default time between two runs of a check.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Default time limit of one run of a check.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Default number of consecutive results that must agree before a check's
/// status changes.
pub const DEFAULT_CHECK_RETRIES: u32 = 1;

/// Shortest interval between two runs of a check (the pulse's shortest
/// interval too).
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(pulsebell_proto::MIN_INTERVAL_MS as u64);

/// Regex applied to parameters declared as a plain list of names: no
/// whitespace, quotes, `;`, `|`, `$`, backticks or other shell syntax.
pub const DEFAULT_PARAM_REGEX: &str = r"^[A-Za-z0-9._:/@+=-]{1,256}$";

/// Names of the config keys, as they appear in the file.
pub mod keys {
    /// `collector_url`
    pub const COLLECTOR_URL: &str = "collector_url";
    /// `collector_urls`: several collectors, tried in turn (cluster mode).
    pub const COLLECTOR_URLS: &str = "collector_urls";
    /// `device_id`
    pub const DEVICE_ID: &str = "device_id";
    /// `token_file`
    pub const TOKEN_FILE: &str = "token_file";
    /// `token`
    pub const TOKEN: &str = "token";
    /// `ca_file`
    pub const CA_FILE: &str = "ca_file";
    /// `ca_fingerprint`: pin the collector's CA by its SHA-256.
    pub const CA_FINGERPRINT: &str = "ca_fingerprint";
    /// `provision_key`: enrol on first start (no token yet).
    pub const PROVISION_KEY: &str = "provision_key";
    /// `provision_key_file`
    pub const PROVISION_KEY_FILE: &str = "provision_key_file";
    /// `interval`
    pub const INTERVAL: &str = "interval";
    /// `tags`
    pub const TAGS: &str = "tags";
    /// `state_dir`
    pub const STATE_DIR: &str = "state_dir";
    /// `actions`
    pub const ACTIONS: &str = "actions";
    /// `checks`: application checks, one `[checks.NAME]` table each.
    pub const CHECKS: &str = "checks";

    /// Keys of one `[checks.NAME]` table.
    pub mod check {
        /// `unit`: a systemd unit's active state.
        pub const UNIT: &str = "unit";
        /// `command`: a Nagios-convention plugin's argv.
        pub const COMMAND: &str = "command";
        /// `http`: an `http://` or `https://` URL to GET.
        pub const HTTP: &str = "http";
        /// `tcp`: a `host:port` to connect to.
        pub const TCP: &str = "tcp";
        /// `process`: a process name that must be running.
        pub const PROCESS: &str = "process";
        /// The kind keys; a check sets exactly one.
        pub const KINDS: [&str; 5] = [UNIT, COMMAND, HTTP, TCP, PROCESS];
        /// `expect_status`: the HTTP status that is OK (with `http` only).
        pub const EXPECT_STATUS: &str = "expect_status";
        /// `interval`
        pub const INTERVAL: &str = "interval";
        /// `timeout`
        pub const TIMEOUT: &str = "timeout";
        /// `retries`
        pub const RETRIES: &str = "retries";
    }
}

/// A config problem: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the key (`interval`, `actions.update.params.version`);
    /// empty when the file itself is unreadable or not TOML.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { key: key.into(), message: message.into() }
    }
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

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    collector_url: Option<String>,
    collector_urls: Option<Vec<String>>,
    device_id: String,
    token_file: Option<PathBuf>,
    token: Option<String>,
    provision_key: Option<String>,
    provision_key_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    ca_fingerprint: Option<String>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    interval: Option<Duration>,
    #[serde(default)]
    tags: Vec<String>,
    state_dir: Option<PathBuf>,
    lock_file: Option<PathBuf>,
    #[serde(default = "default_root")]
    root: PathBuf,
    #[serde(default = "default_root")]
    disk_path: PathBuf,
    #[serde(default)]
    actions: BTreeMap<String, RawAction>,
    #[serde(default)]
    checks: BTreeMap<String, RawCheck>,
}

fn default_root() -> PathBuf {
    PathBuf::from("/")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    command: Vec<String>,
    #[serde(default)]
    params: RawParams,
    #[serde(default, deserialize_with = "de_duration_opt")]
    timeout: Option<Duration>,
    #[serde(default)]
    disruptive: bool,
    #[serde(default)]
    reboots: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    unit: Option<String>,
    command: Option<Vec<String>>,
    http: Option<String>,
    tcp: Option<String>,
    process: Option<String>,
    expect_status: Option<u16>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    timeout: Option<Duration>,
    retries: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum RawParams {
    #[default]
    None,
    Names(Vec<String>),
    Patterns(BTreeMap<String, String>),
}

fn de_duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a duration ({e}); write e.g. \"5s\" or \"1m\"")))
}

/// Where the device connects: parsed from `collector_url` or one entry of
/// `collector_urls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorUrl {
    /// The URL as written.
    pub url: String,
    /// Host name or IP address (what the certificate must name).
    pub host: String,
    /// Port (default 443).
    pub port: u16,
}

/// One allowlisted action.
#[derive(Debug, Clone)]
pub struct Action {
    /// argv; `{name}` placeholders are filled from parameters.
    pub command: Vec<String>,
    /// Declared parameters and the regex each value must match (anchored).
    pub params: BTreeMap<String, Regex>,
    /// Run-time limit unless the bell asks for less.
    pub timeout: Duration,
    /// Rejected while the maintenance lock file exists.
    pub disruptive: bool,
    /// The action reboots the board: success is a new boot id.
    pub reboots: bool,
}

/// One application check (`[checks.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    /// What it looks at.
    pub target: CheckTarget,
    /// Time between the starts of two runs.
    pub interval: Duration,
    /// Time limit of one run; a run that takes longer is UNKNOWN.
    pub timeout: Duration,
    /// Consecutive results that must agree on a new status before the
    /// check's status changes (1: every change counts at once).
    pub retries: u32,
}

impl CheckSpec {
    /// The wire kind of [`CheckSpec::target`].
    pub fn kind(&self) -> pulsebell_proto::CheckKind {
        self.target.kind()
    }
}

/// What a check looks at: one of the kind keys of `[checks.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckTarget {
    /// `unit`: a systemd unit, e.g. `app.service`.
    Unit(String),
    /// `command`: argv of a Nagios-convention plugin (never a shell).
    Command(Vec<String>),
    /// `http` (and `expect_status`).
    Http(HttpTarget),
    /// `tcp`: where to connect.
    Tcp(HostPort),
    /// `process`: the name a running process must have (its `comm`, or the
    /// file name of its argv\[0\]).
    Process(String),
}

impl CheckTarget {
    /// The wire kind.
    pub fn kind(&self) -> pulsebell_proto::CheckKind {
        use pulsebell_proto::CheckKind;
        match self {
            CheckTarget::Unit(_) => CheckKind::Unit,
            CheckTarget::Command(_) => CheckKind::Command,
            CheckTarget::Http(_) => CheckKind::Http,
            CheckTarget::Tcp(_) => CheckKind::Tcp,
            CheckTarget::Process(_) => CheckKind::Process,
        }
    }
}

/// A host (name or IP address, IPv6 without brackets) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP address.
    pub host: String,
    /// Port, not 0.
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// An HTTP check's request and what counts as OK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// The URL as written.
    pub url: String,
    /// `https://`: TLS, verified against the agent's trust (`ca_file`,
    /// `ca_fingerprint` or the web PKI).
    pub tls: bool,
    /// Where to connect (port 80 or 443 unless the URL says).
    pub addr: HostPort,
    /// The `Host` header: the URL's authority.
    pub host_header: String,
    /// Path and query to GET (`/` when the URL has none).
    pub path: String,
    /// The one status that is OK; `None`: any 2xx.
    pub expect_status: Option<u16>,
}

/// The validated agent config.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to connect: `collector_url`, or every entry of `collector_urls`
    /// in the order written. Never empty, no duplicates.
    pub collectors: Vec<CollectorUrl>,
    /// This device's id.
    pub device_id: String,
    /// Where the token comes from.
    pub token_source: TokenSource,
    /// CA bundle; `None` trusts webpki-roots (or the pinned CA).
    pub ca_file: Option<PathBuf>,
    /// What the TLS connection trusts (from `ca_file` / `ca_fingerprint`).
    pub trust: crate::uplink::tls::Trust,
    /// Pulse interval.
    pub interval: Duration,
    /// Tags.
    pub tags: Vec<String>,
    /// State directory (bell journal).
    pub state_dir: PathBuf,
    /// Maintenance lock file.
    pub lock_file: PathBuf,
    /// Root of procfs/sysfs/etc (tests point it at a fake tree).
    pub root: PathBuf,
    /// Filesystem reported as disk.
    pub disk_path: PathBuf,
    /// Allowlisted actions by name.
    pub actions: BTreeMap<String, Action>,
    /// Application checks by name (at most [`pulsebell_proto::MAX_CHECKS`]).
    pub checks: BTreeMap<String, CheckSpec>,
}

/// Where the device token is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A file holding the token.
    File(PathBuf),
    /// The token itself, written in the config.
    Inline(String),
    /// Obtained on first start with this provisioning key and kept in
    /// `<state_dir>/device.token`.
    Provision(KeySource),
}

/// Where the provisioning key is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file holding the key.
    File(PathBuf),
    /// The key itself.
    Inline(String),
}

/// Name of the saved device token in the state directory.
pub const SAVED_TOKEN: &str = "device.token";
/// Name of the pinned CA saved in the state directory.
pub const SAVED_CA: &str = "ca.pem";

/// Expands `{hostname}` and `{machine_id}` in a device id template, from
/// `<root>/proc/sys/kernel/hostname` (or `<root>/etc/hostname`) and
/// `<root>/etc/machine-id`: one config for every board of an image.
pub fn expand_device_id(template: &str, root: &Path) -> Result<String, ConfigError> {
    let read = |rel: &str| std::fs::read_to_string(root.join(rel)).ok().map(|s| s.trim().to_string());
    let mut out = template.to_string();
    if out.contains("{hostname}") {
        let host = read("proc/sys/kernel/hostname")
            .filter(|h| !h.is_empty())
            .or_else(|| read("etc/hostname").filter(|h| !h.is_empty()))
            .ok_or_else(|| ConfigError::new(keys::DEVICE_ID, "{hostname}: cannot read the hostname"))?;
        out = out.replace("{hostname}", &host);
    }
    if out.contains("{machine_id}") {
        let id = read("etc/machine-id")
            .filter(|h| !h.is_empty())
            .ok_or_else(|| ConfigError::new(keys::DEVICE_ID, "{machine_id}: cannot read /etc/machine-id"))?;
        out = out.replace("{machine_id}", &id);
    }
    if out.contains(['{', '}']) {
        return Err(ConfigError::new(
            keys::DEVICE_ID,
            format!("`{template}`: the only placeholders are {{hostname}} and {{machine_id}}"),
        ));
    }
    Ok(out)
}

impl Config {
    /// Reads, parses and validates a config file, and checks that the token
    /// and CA files are readable.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
        let config = Config::parse(&text)?;
        match &config.token_source {
            TokenSource::Provision(_) => {
                config.provision_key()?;
            }
            _ => {
                config.token()?;
            }
        }
        if let Some(ca) = &config.ca_file {
            std::fs::metadata(ca)
                .map_err(|e| ConfigError::new(keys::CA_FILE, format!("cannot read {}: {e}", ca.display())))?;
        }
        Ok(config)
    }

    /// Parses and validates config text (file access only to fill a
    /// `device_id` template from `root`).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            // toml's message carries line/column and the offending line.
            let inner = e.into_inner();
            let message = inner.message().to_string();
            let message = match inner.span() {
                Some(span) => format!("{message} (at line {})", line_of(text, span.start)),
                None => message,
            };
            ConfigError::new(key, message)
        })?;
        Config::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let collectors = collectors(raw.collector_url, raw.collector_urls)?;
        let device_id = expand_device_id(&raw.device_id, &raw.root)?;
        if !pulsebell_proto::valid_device_id(&device_id) {
            return Err(ConfigError::new(
                keys::DEVICE_ID,
                format!(
                    "`{device_id}` is not a valid device id: use 1 to {} letters, digits, '.', '_' or '-'",
                    pulsebell_proto::MAX_DEVICE_ID
                ),
            ));
        }
        let given: Vec<&str> = [
            (raw.token_file.is_some(), keys::TOKEN_FILE),
            (raw.token.is_some(), keys::TOKEN),
            (raw.provision_key.is_some(), keys::PROVISION_KEY),
            (raw.provision_key_file.is_some(), keys::PROVISION_KEY_FILE),
        ]
        .into_iter()
        .filter_map(|(set, k)| set.then_some(k))
        .collect();
        if given.len() > 1 {
            return Err(ConfigError::new(
                given[1],
                format!("set only one of `token_file`, `token`, `provision_key`, `provision_key_file` (found `{}` and `{}`)", given[0], given[1]),
            ));
        }
        let token_source = match (raw.token_file, raw.token, raw.provision_key, raw.provision_key_file) {
            (Some(f), _, _, _) => TokenSource::File(f),
            (_, Some(t), _, _) => TokenSource::Inline(t),
            (_, _, Some(k), _) => TokenSource::Provision(KeySource::Inline(k)),
            (_, _, _, Some(f)) => TokenSource::Provision(KeySource::File(f)),
            _ => {
                return Err(ConfigError::new(
                    keys::TOKEN_FILE,
                    "missing: set `token_file` (or `token`), or `provision_key` to enrol on first start",
                ))
            }
        };
        let interval = raw.interval.unwrap_or(DEFAULT_INTERVAL);
        let ms = interval.as_millis();
        if ms < u128::from(pulsebell_proto::MIN_INTERVAL_MS) || ms > u128::from(pulsebell_proto::MAX_INTERVAL_MS) {
            return Err(ConfigError::new(
                keys::INTERVAL,
                format!(
                    "{} is out of range: must be between {}ms and 1h",
                    humantime::format_duration(interval),
                    pulsebell_proto::MIN_INTERVAL_MS
                ),
            ));
        }
        if raw.tags.len() > pulsebell_proto::MAX_TAGS {
            return Err(ConfigError::new(keys::TAGS, format!("at most {} tags", pulsebell_proto::MAX_TAGS)));
        }
        if let Some(bad) = raw.tags.iter().find(|t| !pulsebell_proto::valid_tag(t)) {
            return Err(ConfigError::new(
                keys::TAGS,
                format!("`{bad}` is not a valid tag: use letters, digits, '.', '_' or '-'"),
            ));
        }
        let state_dir = raw.state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let trust = match (&raw.ca_file, &raw.ca_fingerprint) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    keys::CA_FINGERPRINT,
                    "set either `ca_file` or `ca_fingerprint`, not both",
                ))
            }
            (Some(f), None) => crate::uplink::tls::Trust::CaFile(f.clone()),
            (None, Some(fp)) => {
                let sha256 = crate::uplink::tls::parse_fingerprint(fp).ok_or_else(|| {
                    ConfigError::new(
                        keys::CA_FINGERPRINT,
                        format!("`{fp}`: write sha256:<64 hex digits> (as `provision create` prints it)"),
                    )
                })?;
                crate::uplink::tls::Trust::Fingerprint { sha256, save_to: state_dir.join(SAVED_CA) }
            }
            (None, None) => crate::uplink::tls::Trust::WebPki,
        };
        let lock_file = raw.lock_file.unwrap_or_else(|| state_dir.join("maintenance.lock"));
        let mut actions = BTreeMap::new();
        for (name, action) in raw.actions {
            let action = validate_action(&name, action)?;
            actions.insert(name, action);
        }
        if raw.checks.len() > pulsebell_proto::MAX_CHECKS {
            return Err(ConfigError::new(
                keys::CHECKS,
                format!("{} checks: at most {} are allowed", raw.checks.len(), pulsebell_proto::MAX_CHECKS),
            ));
        }
        let mut checks = BTreeMap::new();
        for (name, check) in raw.checks {
            let check = validate_check(&name, check)?;
            checks.insert(name, check);
        }
        Ok(Config {
            collectors,
            device_id,
            token_source,
            ca_file: raw.ca_file,
            trust,
            interval,
            tags: raw.tags,
            state_dir,
            lock_file,
            root: raw.root,
            disk_path: raw.disk_path,
            actions,
            checks,
        })
    }

    /// Where a provisioned device keeps its token.
    pub fn saved_token_path(&self) -> PathBuf {
        self.state_dir.join(SAVED_TOKEN)
    }

    /// The provisioning key, if the config enrols with one.
    pub fn provision_key(&self) -> Result<Option<String>, ConfigError> {
        let (key, text) = match &self.token_source {
            TokenSource::Provision(KeySource::Inline(k)) => (keys::PROVISION_KEY, k.trim().to_string()),
            TokenSource::Provision(KeySource::File(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new(keys::PROVISION_KEY_FILE, format!("cannot read {}: {e}", path.display()))
                })?;
                (keys::PROVISION_KEY_FILE, text.trim().to_string())
            }
            _ => return Ok(None),
        };
        if !text.starts_with("pbk1.") || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(key, "not a provisioning key (pbk1.…, as `provision create` prints it)"));
        }
        Ok(Some(text))
    }

    /// The device token, read from `token_file` or `token`, or (with a
    /// provisioning key) the one saved in the state directory.
    pub fn token(&self) -> Result<String, ConfigError> {
        let (key, token) = match &self.token_source {
            TokenSource::Inline(t) => (keys::TOKEN, t.trim().to_string()),
            TokenSource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::new(keys::TOKEN_FILE, format!("cannot read {}: {e}", path.display())))?;
                (keys::TOKEN_FILE, text.trim().to_string())
            }
            TokenSource::Provision(_) => {
                let path = self.saved_token_path();
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError::new(keys::PROVISION_KEY, format!("not provisioned yet ({}: {e})", path.display()))
                })?;
                (keys::PROVISION_KEY, text.trim().to_string())
            }
        };
        if token.is_empty() {
            return Err(ConfigError::new(key, "the token is empty"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(key, "the token holds characters a token never has"));
        }
        Ok(token)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// The collectors from `collector_url` or `collector_urls` (exactly one of
/// them must be set).
fn collectors(single: Option<String>, list: Option<Vec<String>>) -> Result<Vec<CollectorUrl>, ConfigError> {
    let list = match (single, list) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                keys::COLLECTOR_URLS,
                format!("set either `{}` or `{}`, not both", keys::COLLECTOR_URL, keys::COLLECTOR_URLS),
            ))
        }
        (Some(url), None) => return Ok(vec![parse_url(keys::COLLECTOR_URL, &url)?]),
        (None, Some(list)) => list,
        (None, None) => {
            return Err(ConfigError::new(
                keys::COLLECTOR_URL,
                format!(
                    "missing: set `{}` (or `{}` for several collectors)",
                    keys::COLLECTOR_URL,
                    keys::COLLECTOR_URLS
                ),
            ))
        }
    };
    if list.is_empty() {
        return Err(ConfigError::new(keys::COLLECTOR_URLS, "is empty: list at least one `wss://` URL"));
    }
    let mut collectors: Vec<CollectorUrl> = Vec::with_capacity(list.len());
    for (i, url) in list.iter().enumerate() {
        let key = format!("{}[{i}]", keys::COLLECTOR_URLS);
        let parsed = parse_url(&key, url)?;
        if let Some(first) = collectors.iter().position(|c| c.url == parsed.url) {
            return Err(ConfigError::new(key, format!("`{url}` is already listed at [{first}]")));
        }
        collectors.push(parsed);
    }
    Ok(collectors)
}

/// Parses one collector URL; errors name `key`.
fn parse_url(key: &str, url: &str) -> Result<CollectorUrl, ConfigError> {
    let err = |m: &str| ConfigError::new(key, format!("`{url}`: {m}"));
    let uri: http_uri::Uri = url.parse().map_err(|e| err(&format!("not a URL ({e})")))?;
    match uri.scheme_str() {
        Some("wss") => {}
        Some("ws") => return Err(err("plain ws:// is not allowed; use wss:// (TLS is always on)")),
        _ => return Err(err("must start with wss://")),
    }
    let host = uri.host().ok_or_else(|| err("has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    Ok(CollectorUrl { url: url.to_string(), host, port: uri.port_u16().unwrap_or(443) })
}

/// `http::Uri`, as re-exported by tungstenite.
mod http_uri {
    pub use tokio_tungstenite::tungstenite::http::Uri;
}

fn validate_action(name: &str, raw: RawAction) -> Result<Action, ConfigError> {
    let key = |sub: &str| format!("{}.{name}{sub}", keys::ACTIONS);
    if name == "ping" {
        return Err(ConfigError::new(key(""), "`ping` is built in and cannot be redefined"));
    }
    if !pulsebell_proto::valid_tag(name) {
        return Err(ConfigError::new(key(""), "action names use letters, digits, '.', '_' or '-'"));
    }
    if raw.command.is_empty() || raw.command[0].is_empty() {
        return Err(ConfigError::new(key(".command"), "must name a program: command = [\"/path/to/program\", ...]"));
    }
    let patterns: Vec<(String, String)> = match raw.params {
        RawParams::None => vec![],
        RawParams::Names(names) => names.into_iter().map(|n| (n, DEFAULT_PARAM_REGEX.to_string())).collect(),
        RawParams::Patterns(map) => map.into_iter().collect(),
    };
    let mut params = BTreeMap::new();
    for (pname, pattern) in patterns {
        if !pname.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') || pname.is_empty() {
            return Err(ConfigError::new(
                key(".params"),
                format!("`{pname}`: parameter names use letters, digits and '_'"),
            ));
        }
        // Anchor the whole value, whatever the pattern says, so a pattern
        // like "[0-9]+" cannot let "1; rm -rf /" through.
        let anchored = format!("^(?:{})$", pattern.trim_start_matches('^').trim_end_matches('$'));
        let re = Regex::new(&anchored)
            .map_err(|e| ConfigError::new(key(&format!(".params.{pname}")), format!("invalid regex: {e}")))?;
        params.insert(pname, re);
    }
    for arg in &raw.command {
        for placeholder in placeholders(arg) {
            if !params.contains_key(placeholder) {
                return Err(ConfigError::new(
                    key(".command"),
                    format!("placeholder `{{{placeholder}}}` is not a declared parameter"),
                ));
            }
        }
    }
    let timeout = raw.timeout.unwrap_or(DEFAULT_ACTION_TIMEOUT);
    if timeout.is_zero() {
        return Err(ConfigError::new(key(".timeout"), "must be more than 0"));
    }
    Ok(Action { command: raw.command, params, timeout, disruptive: raw.disruptive, reboots: raw.reboots })
}

fn validate_check(name: &str, raw: RawCheck) -> Result<CheckSpec, ConfigError> {
    use keys::check as k;
    let key = |sub: &str| format!("{}.{name}{sub}", keys::CHECKS);
    if name.len() > pulsebell_proto::MAX_CHECK_NAME || !pulsebell_proto::valid_device_id(name) {
        return Err(ConfigError::new(
            key(""),
            format!(
                "`{name}` is not a valid check name: use 1 to {} letters, digits, '.', '_' or '-', not starting with '.' or '-'",
                pulsebell_proto::MAX_CHECK_NAME
            ),
        ));
    }
    let given: Vec<&str> = [
        (raw.unit.is_some(), k::UNIT),
        (raw.command.is_some(), k::COMMAND),
        (raw.http.is_some(), k::HTTP),
        (raw.tcp.is_some(), k::TCP),
        (raw.process.is_some(), k::PROCESS),
    ]
    .into_iter()
    .filter_map(|(set, k)| set.then_some(k))
    .collect();
    let kinds = "`unit`, `command`, `http`, `tcp` or `process`";
    match given.as_slice() {
        [] => return Err(ConfigError::new(key(""), format!("says nothing to check: set one of {kinds}"))),
        [_] => {}
        [first, second, ..] => {
            return Err(ConfigError::new(
                key(&format!(".{second}")),
                format!("set only one of {kinds} per check (found `{first}` and `{second}`)"),
            ))
        }
    }
    if raw.expect_status.is_some() && raw.http.is_none() {
        return Err(ConfigError::new(key(&format!(".{}", k::EXPECT_STATUS)), "goes only with `http`"));
    }
    let target = if let Some(unit) = raw.unit {
        let bad = unit.is_empty()
            || unit.starts_with('-')
            || unit.len() > pulsebell_proto::MAX_STRING
            || !unit.bytes().all(|b| b.is_ascii_graphic());
        if bad {
            return Err(ConfigError::new(
                key(&format!(".{}", k::UNIT)),
                format!("`{unit}` is not a unit name (e.g. \"app.service\")"),
            ));
        }
        CheckTarget::Unit(unit)
    } else if let Some(command) = raw.command {
        if command.is_empty() || command[0].is_empty() {
            return Err(ConfigError::new(
                key(&format!(".{}", k::COMMAND)),
                "must name a program: command = [\"/path/to/plugin\", ...]",
            ));
        }
        CheckTarget::Command(command)
    } else if let Some(url) = raw.http {
        let key = key(&format!(".{}", k::HTTP));
        let mut target = parse_check_url(&key, &url)?;
        if let Some(status) = raw.expect_status {
            if !(100..=599).contains(&status) {
                return Err(ConfigError::new(
                    format!("{}.{name}.{}", keys::CHECKS, k::EXPECT_STATUS),
                    format!("{status} is not an HTTP status (100 to 599)"),
                ));
            }
        }
        target.expect_status = raw.expect_status;
        CheckTarget::Http(target)
    } else if let Some(addr) = raw.tcp {
        let key = key(&format!(".{}", k::TCP));
        CheckTarget::Tcp(parse_host_port(&addr).map_err(|m| ConfigError::new(key, format!("`{addr}`: {m}")))?)
    } else if let Some(process) = raw.process {
        if process.is_empty() || process.contains(['/', '\0', '\n']) {
            return Err(ConfigError::new(
                key(&format!(".{}", k::PROCESS)),
                format!("`{process}` is not a process name (a program's file name, e.g. \"chromium\")"),
            ));
        }
        CheckTarget::Process(process)
    } else {
        unreachable!("exactly one kind key is set")
    };
    let interval = raw.interval.unwrap_or(DEFAULT_CHECK_INTERVAL);
    if interval < MIN_CHECK_INTERVAL {
        return Err(ConfigError::new(
            key(&format!(".{}", k::INTERVAL)),
            format!("{} is too short: at least 100ms", humantime::format_duration(interval)),
        ));
    }
    // A timeout longer than the interval is fine: the next run waits.
    let timeout = raw.timeout.unwrap_or(DEFAULT_CHECK_TIMEOUT);
    if timeout.is_zero() {
        return Err(ConfigError::new(key(&format!(".{}", k::TIMEOUT)), "must be more than 0"));
    }
    let retries = raw.retries.unwrap_or(DEFAULT_CHECK_RETRIES);
    if retries == 0 {
        return Err(ConfigError::new(
            key(&format!(".{}", k::RETRIES)),
            "must be at least 1 (1: a status changes on the first result that differs)",
        ));
    }
    Ok(CheckSpec { target, interval, timeout, retries })
}

/// Parses `host:port` (`[v6]:port` for an IPv6 address).
fn parse_host_port(s: &str) -> Result<HostPort, String> {
    let (host, port) = s.rsplit_once(':').ok_or("write host:port, e.g. \"127.0.0.1:1883\"")?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']').ok_or("an IPv6 address goes in brackets: [::1]:1883")?,
        None if host.contains(':') => return Err("an IPv6 address goes in brackets: [::1]:1883".into()),
        None => host,
    };
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':')) {
        return Err("has no valid host: write host:port, e.g. \"127.0.0.1:1883\"".into());
    }
    let port: u16 = port.parse().map_err(|_| format!("`{port}` is not a port (1 to 65535)"))?;
    if port == 0 {
        return Err("port 0 is not a port (1 to 65535)".into());
    }
    Ok(HostPort { host: host.to_string(), port })
}

/// Parses an `http://` or `https://` check URL; errors name `key`.
fn parse_check_url(key: &str, url: &str) -> Result<HttpTarget, ConfigError> {
    let err = |m: &str| ConfigError::new(key, format!("`{url}`: {m}"));
    let uri: http_uri::Uri = url.parse().map_err(|e| err(&format!("not a URL ({e})")))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(err("must start with http:// or https://")),
    };
    let authority = uri.authority().ok_or_else(|| err("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(err("user names and passwords in URLs are not supported"));
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(err("has no host"));
    }
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if port == 0 {
        return Err(err("port 0 is not a port"));
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.is_empty() { "/" } else { path };
    Ok(HttpTarget {
        url: url.to_string(),
        tls,
        addr: HostPort { host: host.to_string(), port },
        host_header: authority.as_str().to_string(),
        path: path.to_string(),
        expect_status: None,
    })
}

/// The `{name}` placeholders in one argument.
pub fn placeholders(arg: &str) -> impl Iterator<Item = &str> {
    arg.split('{').skip(1).filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
collector_url = "wss://collector.example:8443/v1/ws"
device_id = "pi-1"
token = "abc"
"#;

    fn err(text: &str) -> ConfigError {
        Config::parse(text).expect_err("config should be refused")
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.collectors.len(), 1);
        assert_eq!(c.collectors[0].url, "wss://collector.example:8443/v1/ws");
        assert_eq!(c.collectors[0].host, "collector.example");
        assert_eq!(c.collectors[0].port, 8443);
        assert_eq!(c.interval, DEFAULT_INTERVAL);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.lock_file, PathBuf::from(DEFAULT_STATE_DIR).join("maintenance.lock"));
        assert_eq!(c.token().unwrap(), "abc");
    }

    #[test]
    fn default_config_parses() {
        let c = Config::parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(c.device_id, "change-me");
        assert_eq!(c.token_source, TokenSource::File("/etc/pulsebell/agent.token".into()));
    }

    #[test]
    fn errors_name_the_key() {
        let e = err(&format!("{MINIMAL}interval = \"5 parsecs\"\n"));
        assert_eq!(e.key, "interval");
        assert!(e.message.contains("5 parsecs"), "{e}");

        let e = err(&MINIMAL.replace("wss://", "ws://"));
        assert_eq!(e.key, "collector_url");

        let e = err(&MINIMAL.replace("pi-1", "pi 1"));
        assert_eq!(e.key, "device_id");

        let e = err(&format!("{MINIMAL}intervall = \"5s\"\n"));
        assert!(e.message.contains("intervall"), "{e}");

        let e = err(&MINIMAL.replace("token = \"abc\"", ""));
        assert_eq!(e.key, "token_file");

        let e = err(&format!("{MINIMAL}tags = [\"ok\", \"not ok\"]\n"));
        assert_eq!(e.key, "tags");

        let e = err(&format!("{MINIMAL}interval = \"1ms\"\n"));
        assert_eq!(e.key, "interval");

        let e = err("collector_url = [");
        assert_eq!(e.key, "");
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    /// [`MINIMAL`] without its `collector_url`, plus `extra`.
    fn without_url(extra: &str) -> String {
        format!("{}{extra}\n", MINIMAL.replace("collector_url = \"wss://collector.example:8443/v1/ws\"\n", ""))
    }

    #[test]
    fn collector_urls_lists_several_collectors_in_order() {
        let c = Config::parse(&without_url(
            r#"collector_urls = ["wss://a.example:8443/v1/ws", "wss://b.example/v1/ws", "wss://[::1]:9443/v1/ws"]"#,
        ))
        .unwrap();
        let got: Vec<(&str, u16)> = c.collectors.iter().map(|u| (u.host.as_str(), u.port)).collect();
        assert_eq!(got, [("a.example", 8443), ("b.example", 443), ("::1", 9443)]);
        assert_eq!(c.collectors[1].url, "wss://b.example/v1/ws");

        let one = Config::parse(&without_url(r#"collector_urls = ["wss://a.example:8443/v1/ws"]"#)).unwrap();
        assert_eq!(one.collectors.len(), 1);
    }

    #[test]
    fn default_config_collector_urls_example_parses_once_uncommented() {
        let mut text = String::new();
        for line in DEFAULT_CONFIG.lines() {
            if line.starts_with("collector_url =") {
                continue;
            }
            let uncommented = ["# collector_urls", "#     \"wss://", "# ]"]
                .iter()
                .any(|p| line.starts_with(p))
                .then(|| line.trim_start_matches("# ").trim_start_matches('#'));
            text.push_str(uncommented.unwrap_or(line));
            text.push('\n');
        }
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.collectors.len(), 2, "{text}");
    }

    #[test]
    fn collector_url_and_collector_urls_together_are_refused() {
        let e = err(&format!("{MINIMAL}collector_urls = [\"wss://b.example/v1/ws\"]\n"));
        assert_eq!(e.key, keys::COLLECTOR_URLS);
        assert!(e.message.contains("`collector_url`") && e.message.contains("`collector_urls`"), "{e}");
    }

    #[test]
    fn neither_collector_key_is_refused() {
        let e = err(&without_url(""));
        assert_eq!(e.key, keys::COLLECTOR_URL);
        assert!(e.message.contains("missing") && e.message.contains("`collector_urls`"), "{e}");
    }

    #[test]
    fn empty_collector_urls_is_refused() {
        let e = err(&without_url("collector_urls = []"));
        assert_eq!(e.key, keys::COLLECTOR_URLS);
        assert!(e.message.contains("empty"), "{e}");
    }

    #[test]
    fn a_bad_entry_in_collector_urls_is_named_by_its_index() {
        let e = err(&without_url(r#"collector_urls = ["wss://a.example/v1/ws", "ws://b.example/v1/ws"]"#));
        assert_eq!(e.key, "collector_urls[1]");
        assert!(e.message.contains("ws://b.example") && e.message.contains("wss://"), "{e}");
        assert!(e.to_string().contains("`collector_urls[1]`"), "{e}");

        let e = err(&without_url(r#"collector_urls = ["https://a.example/v1/ws"]"#));
        assert_eq!(e.key, "collector_urls[0]");
        let e = err(&without_url(r#"collector_urls = ["wss://a.example/v1/ws", "not a url"]"#));
        assert_eq!(e.key, "collector_urls[1]");
        let e = err(&without_url(r#"collector_urls = ["wss://a.example/v1/ws", "wss://a.example/v1/ws"]"#));
        assert_eq!(e.key, "collector_urls[1]");
        assert!(e.message.contains("already listed at [0]"), "{e}");

        // Not a string: serde names the entry the same way.
        let e = err(&without_url(r#"collector_urls = ["wss://a.example/v1/ws", 8443]"#));
        assert_eq!(e.key, "collector_urls[1]");
        let e = err(&without_url(r#"collector_urls = "wss://a.example/v1/ws""#));
        assert_eq!(e.key, "collector_urls");
    }

    #[test]
    fn actions_are_validated() {
        let good = format!(
            "{MINIMAL}{}",
            r#"
[actions.update]
command = ["/usr/local/bin/update-app", "--version", "{version}"]
params = { version = "^[0-9]+\\.[0-9]+\\.[0-9]+$" }
timeout = "10m"

[actions.restart]
command = ["systemctl", "restart", "{unit}"]
params = ["unit"]
disruptive = true
"#
        );
        let c = Config::parse(&good).unwrap();
        let update = &c.actions["update"];
        assert_eq!(update.timeout, Duration::from_secs(600));
        assert!(update.params["version"].is_match("1.2.3"));
        assert!(!update.params["version"].is_match("1.2.3; rm -rf /"));
        assert!(c.actions["restart"].params["unit"].is_match("app.service"));
        assert!(!c.actions["restart"].params["unit"].is_match("a b"));
        assert!(c.actions["restart"].disruptive);

        let e = err(&format!("{MINIMAL}[actions.x]\ncommand = [\"echo\", \"{{who}}\"]\n"));
        assert_eq!(e.key, "actions.x.command");
        let e = err(&format!("{MINIMAL}[actions.x]\ncommand = [\"echo\"]\nparams = {{ a = \"(\" }}\n"));
        assert_eq!(e.key, "actions.x.params.a");
        let e = err(&format!("{MINIMAL}[actions.x]\ncommand = []\n"));
        assert_eq!(e.key, "actions.x.command");
        let e = err(&format!("{MINIMAL}[actions.ping]\ncommand = [\"true\"]\n"));
        assert_eq!(e.key, "actions.ping");
    }

    #[test]
    fn checks_of_every_kind_parse_with_defaults() {
        let c = Config::parse(&format!(
            "{MINIMAL}{}",
            r#"
[checks.app]
unit = "app.service"

[checks.camera]
command = ["/usr/lib/nagios/plugins/check_file_age", "-f", "/var/lib/cam/last.jpg", "-w", "120", "-c", "600"]
interval = "5m"
timeout = "30s"
retries = 3

[checks.web]
http = "http://127.0.0.1:8080/health?full=1"
expect_status = 204

[checks.secure]
http = "https://[::1]/"

[checks.mqtt-port]
tcp = "127.0.0.1:1883"

[checks.kiosk]
process = "chromium"
"#
        ))
        .unwrap();
        let names: Vec<&str> = c.checks.keys().map(String::as_str).collect();
        assert_eq!(names, ["app", "camera", "kiosk", "mqtt-port", "secure", "web"]);
        let app = &c.checks["app"];
        assert_eq!(app.target, CheckTarget::Unit("app.service".into()));
        assert_eq!(
            (app.interval, app.timeout, app.retries),
            (DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_TIMEOUT, DEFAULT_CHECK_RETRIES)
        );
        let camera = &c.checks["camera"];
        assert_eq!(
            (camera.interval, camera.timeout, camera.retries),
            (Duration::from_secs(300), Duration::from_secs(30), 3)
        );
        assert!(matches!(&camera.target, CheckTarget::Command(argv) if argv.len() == 7));
        let CheckTarget::Http(web) = &c.checks["web"].target else { panic!("web is http") };
        assert_eq!(web.addr, HostPort { host: "127.0.0.1".into(), port: 8080 });
        assert_eq!((web.host_header.as_str(), web.path.as_str()), ("127.0.0.1:8080", "/health?full=1"));
        assert_eq!((web.tls, web.expect_status), (false, Some(204)));
        let CheckTarget::Http(secure) = &c.checks["secure"].target else { panic!("secure is http") };
        assert_eq!(
            (secure.tls, secure.addr.port, secure.addr.host.as_str(), secure.path.as_str()),
            (true, 443, "::1", "/")
        );
        assert_eq!(c.checks["mqtt-port"].target, CheckTarget::Tcp(HostPort { host: "127.0.0.1".into(), port: 1883 }));
        assert_eq!(c.checks["kiosk"].kind(), pulsebell_proto::CheckKind::Process);
        assert!(Config::parse(MINIMAL).unwrap().checks.is_empty());
    }

    #[test]
    fn check_errors_name_the_dotted_key() {
        let check = |body: &str| err(&format!("{MINIMAL}[checks.x]\n{body}\n"));
        let cases = [
            ("", "checks.x"),
            ("unit = \"a.service\"\ntcp = \"h:1\"", "checks.x.tcp"),
            ("command = []", "checks.x.command"),
            ("command = [\"\"]", "checks.x.command"),
            ("http = \"ftp://h/\"", "checks.x.http"),
            ("http = \"not a url\"", "checks.x.http"),
            ("http = \"http://u:p@h/\"", "checks.x.http"),
            ("http = \"http://h/\"\nexpect_status = 42", "checks.x.expect_status"),
            ("tcp = \"h:1\"\nexpect_status = 200", "checks.x.expect_status"),
            ("tcp = \"localhost\"", "checks.x.tcp"),
            ("tcp = \"localhost:0\"", "checks.x.tcp"),
            ("tcp = \"localhost:http\"", "checks.x.tcp"),
            ("tcp = \":80\"", "checks.x.tcp"),
            ("tcp = \"::1:80\"", "checks.x.tcp"),
            ("unit = \"--now\"", "checks.x.unit"),
            ("unit = \"\"", "checks.x.unit"),
            ("process = \"/usr/bin/chromium\"", "checks.x.process"),
            ("process = \"a\"\ntimeout = \"0s\"", "checks.x.timeout"),
            ("process = \"a\"\nretries = 0", "checks.x.retries"),
            ("process = \"a\"\nretries = -1", "checks.x.retries"),
            ("process = \"a\"\ninterval = \"1ms\"", "checks.x.interval"),
            ("process = \"a\"\ninterval = \"often\"", "checks.x.interval"),
            ("process = \"a\"\nevery = \"1m\"", "checks.x.every"),
        ];
        for (body, key) in cases {
            let e = check(body);
            assert_eq!(e.key, key, "{body:?}: {e}");
        }
        let e = check("unit = \"a.service\"\nprocess = \"a\"");
        assert!(e.message.contains("`unit` and `process`"), "{e}");
        let e = check("process = \"a\"\nevery = \"1m\"");
        assert!(e.message.contains("every"), "{e}");
        // A timeout as long as the interval, or longer, is fine.
        let c = Config::parse(&format!("{MINIMAL}[checks.x]\nprocess = \"a\"\ninterval = \"1s\"\ntimeout = \"1m\"\n"));
        assert_eq!(c.unwrap().checks["x"].timeout, Duration::from_secs(60));
    }

    #[test]
    fn check_names_and_count_are_limited() {
        for bad in [
            "\"-x\"",
            "\".x\"",
            "\"a b\"",
            "\"a/b\"",
            &format!("\"{}\"", "a".repeat(pulsebell_proto::MAX_CHECK_NAME + 1)),
        ] {
            let e = err(&format!("{MINIMAL}[checks.{bad}]\nprocess = \"a\"\n"));
            assert_eq!(e.key, format!("checks.{}", bad.trim_matches('"')), "{bad}: {e}");
        }
        let many = |n: usize| {
            let mut text = MINIMAL.to_string();
            for i in 0..n {
                text.push_str(&format!("[checks.c{i}]\nprocess = \"a\"\n"));
            }
            text
        };
        assert_eq!(
            Config::parse(&many(pulsebell_proto::MAX_CHECKS)).unwrap().checks.len(),
            pulsebell_proto::MAX_CHECKS
        );
        let e = err(&many(pulsebell_proto::MAX_CHECKS + 1));
        assert_eq!(e.key, keys::CHECKS);
    }

    #[test]
    fn default_config_check_examples_parse_once_uncommented() {
        // The commented `[checks.*]` examples, uncommented, are valid.
        let mut text = String::new();
        let mut in_checks = false;
        for line in DEFAULT_CONFIG.lines() {
            if line.starts_with("# [checks.") {
                in_checks = true;
            } else if !line.starts_with('#') {
                in_checks = false;
            }
            let body = line.trim_start_matches('#').trim_start();
            let example =
                in_checks && (body.starts_with('[') || body.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')));
            text.push_str(if example { body } else { line });
            text.push('\n');
        }
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.checks.len(), 5, "{text}");
        let kinds: std::collections::BTreeSet<&str> = c.checks.values().map(|s| s.kind().as_str()).collect();
        assert_eq!(kinds.len(), 5, "one example of each kind");
    }

    #[test]
    fn unanchored_patterns_are_anchored() {
        let text = format!("{MINIMAL}[actions.x]\ncommand = [\"echo\", \"{{n}}\"]\nparams = {{ n = \"[0-9]+\" }}\n");
        let c = Config::parse(&text).unwrap();
        assert!(c.actions["x"].params["n"].is_match("42"));
        assert!(!c.actions["x"].params["n"].is_match("42; reboot"));
    }
}
