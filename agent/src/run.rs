//! The daemon: sample health every interval, keep one connection to the
//! collector, send each sample as a pulse, answer bells.
//!
//! With several collectors (`collector_urls`) the agent is connected to one
//! of them at a time: it starts at a random one and, after a failed attempt
//! or a dropped session, moves on to the next (round robin), waiting the
//! usual backoff in between.
//!
//! Sampling runs on its own timer whether or not the collector is reachable,
//! so CPU and network rates stay meaningful and sequence numbers keep
//! counting: pulses taken while disconnected are dropped, and the collector
//! sees the gap.

use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;

use pulsebell_proto::{
    close, decode, encode, AgentMsg, BellReport, CheckDigest, CheckReport, CheckResult, Hello, Pulse, ServerMsg,
    PROTOCOL_VERSION,
};
use rand::SeedableRng;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message,
};
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::actions::Executor;
use crate::checks::Checks;
use crate::config::Config;
use crate::health::{facts, Sampler, SystemFacts};
use crate::uplink::backoff::{Backoff, STABLE_AFTER};
use crate::uplink::endpoints::Endpoints;
use crate::uplink::{tls, ConnectError, Connection, Dialer, WsStream};

/// The agent reconnects when it has heard nothing from the collector (no
/// frame, not even a ping) for this many intervals: the TCP connection is
/// probably half-open.
pub const SILENCE_INTERVALS: u32 = 3;

/// Runs the agent until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tls = tls::config_for(&config.trust)?;
    tokio::pin!(shutdown);
    let token = match config.provision_key()? {
        // First start of a provisioned image: ask for a token (until
        // stopped).
        Some(key) => tokio::select! {
            t = crate::provision::obtain_token(&config, tls.clone(), &key) => t?,
            () = &mut shutdown => return Ok(()),
        },
        None => config.token()?,
    };
    let dialers: Vec<Dialer> =
        config.collectors.iter().map(|url| Dialer::new(url.clone(), token.clone(), tls.clone())).collect();
    let dialers = Endpoints::with_random_start(dialers, &mut rand::rng())
        .ok_or_else(|| anyhow::anyhow!("no collector configured"))?;
    if dialers.len() > 1 {
        info!(
            collectors = dialers.len(),
            first = %dialers.current().url().url,
            "several collectors configured; connecting to one at a time, round robin"
        );
    }
    let facts = facts(&config.root);
    let executor = Executor::open(&config, facts.boot_id.clone())?;
    let (pulse_tx, pulse_rx) = watch::channel(None);
    let sampler = tokio::spawn(sample_loop(
        Sampler::new(config.root.clone(), config.disk_path.clone()),
        config.interval,
        pulse_tx,
    ));
    let watchdog = tokio::spawn(watchdog_loop(pulse_rx.clone(), config.interval));
    let checks = (!config.checks.is_empty()).then(|| Checks::spawn(&config));
    notify_ready();
    let (stop_tx, stop) = watch::channel(false);
    let mut agent = Agent { config, dialers, facts, pulse_rx, executor, checks, stop };
    {
        let connected = agent.connect_loop();
        tokio::pin!(connected);
        tokio::select! {
            () = &mut connected => {}
            () = &mut shutdown => {
                info!("shutting down");
                // Say goodbye (close 1001), so a planned stop is not taken
                // for a crash.
                let _ = stop_tx.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(3), &mut connected).await;
            }
        }
    }
    sampler.abort();
    watchdog.abort();
    agent.executor.shutdown().await;
    Ok(())
}

/// Resolves once the agent is stopping.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// Samples health every `interval` and publishes the newest pulse.
async fn sample_loop(mut sampler: Sampler, interval: Duration, tx: watch::Sender<Option<Pulse>>) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick is immediate; skip it so the first CPU sample covers a
    // whole interval rather than a few microseconds.
    ticker.tick().await;
    let mut seq: u32 = 0;
    loop {
        ticker.tick().await;
        seq = seq.wrapping_add(1).max(1);
        let health = sampler.sample();
        if tx.send(Some(Pulse { seq, health })).is_err() {
            return;
        }
    }
}

struct Agent {
    config: Config,
    /// One dialer per collector URL; the current one is tried next.
    dialers: Endpoints<Dialer>,
    facts: SystemFacts,
    pulse_rx: watch::Receiver<Option<Pulse>>,
    executor: Executor,
    /// The checks' runner, if the config has any.
    checks: Option<Checks>,
    /// Turns true when the agent is stopping.
    stop: watch::Receiver<bool>,
}

/// What the collector has been told of the checks on this connection: the
/// pulse's digest counts exactly these, so the collector can tell when it
/// missed something.
#[derive(Default)]
struct SentChecks {
    results: Arc<Vec<CheckResult>>,
}

impl SentChecks {
    /// The report that brings the collector from what it was told to
    /// `now`: everything when `full` or when a check went away, otherwise
    /// the checks whose status changed (a new summary alone, such as a
    /// response time, travels with the check's next change). `None` when
    /// nothing did.
    fn report(&mut self, now: Arc<Vec<CheckResult>>, full: bool) -> Option<CheckReport> {
        // A check that has not run yet is not news: it is reported with its
        // first result.
        let now = if now.iter().any(crate::checks::is_pending) {
            Arc::new(now.iter().filter(|r| !crate::checks::is_pending(r)).cloned().collect())
        } else {
            now
        };
        let before = std::mem::replace(&mut self.results, now.clone());
        let gone = before.iter().any(|b| !now.iter().any(|n| n.name == b.name));
        if full || gone {
            return Some(CheckReport { full: true, results: now.to_vec() });
        }
        let changed: Vec<CheckResult> =
            now.iter().filter(|n| !before.iter().any(|b| b.name == n.name && b.status == n.status)).cloned().collect();
        (!changed.is_empty()).then_some(CheckReport { full: false, results: changed })
    }

    fn digest(&self) -> CheckDigest {
        CheckDigest::of(self.results.iter())
    }
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// The collector closed the connection.
    Closed(Option<(u16, String)>),
    /// Nothing heard from the collector for [`SILENCE_INTERVALS`] intervals.
    Silent,
    /// Read or write failed.
    Error(String),
    /// The agent is stopping (SIGTERM): it said goodbye.
    Stopping,
}

/// What was last logged about one collector, so that a collector failing
/// the same way on every attempt is logged once, not on every retry. Kept
/// per collector: with several, their failures interleave.
#[derive(Debug, Default)]
struct Quiet {
    /// Kind of the last failed connection attempt ([`ConnectError::kind`]).
    last_failure: Option<&'static str>,
    /// Close code and reason of the last session, if the collector closed it.
    last_close: Option<(u16, String)>,
}

impl Agent {
    async fn connect_loop(&mut self) {
        let mut backoff = Backoff::default();
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let mut quiet: Vec<Quiet> = (0..self.dialers.len()).map(|_| Quiet::default()).collect();
        loop {
            let span = info_span!("uplink", collector = %self.dialers.current().url().url);
            let quiet = &mut quiet[self.dialers.index()];
            if self.attempt(quiet).instrument(span).await {
                backoff.reset();
            }
            if *self.stop.borrow() {
                return;
            }
            self.dialers.advance();
            let delay = backoff.next_delay(&mut rng);
            debug!(?delay, next = %self.dialers.current().url().url, "reconnecting after backoff");
            let mut stop = self.stop.clone();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(&mut stop) => return,
            }
        }
    }

    /// One connection attempt to the current collector and, if it succeeds,
    /// the session until it ends. True if the session was stable (lasted
    /// [`STABLE_AFTER`]), which resets the backoff.
    async fn attempt(&mut self, quiet: &mut Quiet) -> bool {
        debug!("connecting");
        // Bound first: the dialer borrows `self`, the session needs it mutably.
        let connected = self.dialers.current().connect().await;
        let Quiet { last_failure, last_close } = quiet;
        match connected {
            Ok(Connection { ws, version }) => {
                if last_close.is_none() {
                    info!("connected");
                } else {
                    debug!("connected");
                }
                *last_failure = None;
                let started = Instant::now();
                let end = self.session(ws, version).await;
                // A collector that refuses us the same way on every
                // attempt (version mismatch, policy) is logged once.
                let repeat = matches!(&end, SessionEnd::Closed(Some(c)) if last_close.as_ref() == Some(c));
                match &end {
                    _ if repeat => debug!(?end, "collector closed the connection again"),
                    SessionEnd::Closed(Some((code, reason))) if *code == close::GOING_AWAY => {
                        info!(code, %reason, "collector is going away; reconnecting")
                    }
                    SessionEnd::Closed(Some((code, reason))) => {
                        warn!(code, %reason, "collector closed the connection")
                    }
                    SessionEnd::Closed(None) => warn!("collector closed the connection"),
                    SessionEnd::Silent => {
                        warn!("nothing heard from the collector for {} intervals; reconnecting", SILENCE_INTERVALS)
                    }
                    SessionEnd::Error(e) => warn!(error = %e, "connection lost"),
                    SessionEnd::Stopping => info!("said goodbye to the collector"),
                }
                *last_close = match end {
                    SessionEnd::Closed(Some(c)) => Some(c),
                    _ => None,
                };
                started.elapsed() >= STABLE_AFTER
            }
            Err(e) => {
                // Only a change of failure kind is logged at warn; repeats go to debug.
                if *last_failure != Some(e.kind()) {
                    match &e {
                        ConnectError::Unauthorized | ConnectError::Tls { .. } => error!("{e}"),
                        _ => warn!("{e}"),
                    }
                    *last_failure = Some(e.kind());
                } else {
                    debug!("{e}");
                }
                false
            }
        }
    }

    fn hello(&self, version: u16) -> Hello {
        let f = &self.facts;
        Hello {
            protocol_version: version,
            device_id: self.config.device_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            boot_id: f.boot_id.clone(),
            hostname: f.hostname.clone(),
            os: f.os.clone(),
            kernel: f.kernel.clone(),
            arch: f.arch.clone(),
            board_model: f.board_model.clone(),
            interval_ms: u32::try_from(self.config.interval.as_millis()).unwrap_or(u32::MAX),
            tags: self.config.tags.clone(),
            actions: self.executor.action_names(),
        }
    }

    /// One connected session: Hello, then pulses out and bells in until the
    /// connection ends.
    async fn session(&mut self, mut ws: WsStream, version: u16) -> SessionEnd {
        if let Err(e) = send(&mut ws, &AgentMsg::Hello(self.hello(version))).await {
            return SessionEnd::Error(e);
        }
        // From version 2 the collector also learns each action's parameters
        // (for the dashboard's forms). An allowlist too large for one frame
        // is left out: bells by name still work.
        if version >= 2 {
            match encode(&AgentMsg::Actions(self.executor.action_infos())) {
                Ok(bytes) => {
                    if let Err(e) = ws.send(Message::Binary(bytes.into())).await {
                        return SessionEnd::Error(e.to_string());
                    }
                }
                Err(e) => warn!(error = %e, "the action list does not fit in one message; not sent"),
            }
        }
        // Checks travel from protocol version 2 on; an older collector
        // gets plain pulses and no checks.
        let mut checks = self.checks.as_ref().map(Checks::subscribe).filter(|_| version >= 2);
        if self.checks.is_some() && checks.is_none() {
            warn!(
                version,
                newest = PROTOCOL_VERSION,
                "the collector speaks an older protocol and cannot take check results: \
                 upgrade the collectors first, then the agents; checks run but are not reported"
            );
        }
        let mut sent = SentChecks::default();
        if let Some(rx) = &mut checks {
            let report = sent.report(rx.borrow_and_update().clone(), true);
            if let Some(report) = report {
                if let Err(e) = send(&mut ws, &AgentMsg::Checks(report)).await {
                    return SessionEnd::Error(e);
                }
            }
        }
        let silence = self.config.interval * SILENCE_INTERVALS;
        let mut deadline = Instant::now() + silence;
        // Don't resend a pulse that was already sent on a previous connection.
        self.pulse_rx.mark_unchanged();
        let (report_tx, mut report_rx) = mpsc::channel::<BellReport>(64);
        self.executor.attach(report_tx).await;
        let mut stop = self.stop.clone();
        let end = loop {
            tokio::select! {
                () = stopped(&mut stop) => break SessionEnd::Stopping,
                changed = self.pulse_rx.changed() => {
                    if changed.is_err() {
                        break SessionEnd::Error("sampler stopped".into());
                    }
                    let pulse = self.pulse_rx.borrow_and_update().clone();
                    if let Some(pulse) = pulse {
                        let msg = match checks {
                            Some(_) => AgentMsg::CheckedPulse(pulse, sent.digest()),
                            None => AgentMsg::Pulse(pulse),
                        };
                        if let Err(e) = send(&mut ws, &msg).await {
                            break SessionEnd::Error(e);
                        }
                    }
                }
                Ok(()) = async { checks.as_mut().expect("guarded").changed().await }, if checks.is_some() => {
                    let now = checks.as_mut().expect("guarded").borrow_and_update().clone();
                    if let Some(report) = sent.report(now, false) {
                        if let Err(e) = send(&mut ws, &AgentMsg::Checks(report)).await {
                            break SessionEnd::Error(e);
                        }
                    }
                }
                Some(report) = report_rx.recv() => {
                    if let Err(e) = send(&mut ws, &AgentMsg::BellReport(report)).await {
                        break SessionEnd::Error(e);
                    }
                }
                frame = ws.next() => {
                    deadline = Instant::now() + silence;
                    match frame {
                        None => break SessionEnd::Closed(None),
                        Some(Err(e)) => break SessionEnd::Error(e.to_string()),
                        Some(Ok(Message::Binary(bytes))) => match decode::<ServerMsg>(&bytes) {
                            Ok(ServerMsg::ResendChecks) => {
                                let Some(rx) = &mut checks else { continue };
                                debug!("the collector asked for every check again");
                                let report = sent.report(rx.borrow_and_update().clone(), true);
                                if let Some(report) = report {
                                    if let Err(e) = send(&mut ws, &AgentMsg::Checks(report)).await {
                                        break SessionEnd::Error(e);
                                    }
                                }
                            }
                            Ok(msg) => self.on_server_msg(msg).await,
                            Err(e) => warn!(error = %e, "ignoring a message from the collector that does not decode"),
                        },
                        Some(Ok(Message::Close(frame))) => {
                            break SessionEnd::Closed(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                        }
                        Some(Ok(_)) => {} // pings are answered by tungstenite
                    }
                }
                () = sleep_until(deadline) => break SessionEnd::Silent,
            }
        };
        self.executor.detach().await;
        let frame = match &end {
            SessionEnd::Closed(_) | SessionEnd::Error(_) => None,
            SessionEnd::Silent => Some(CloseFrame { code: CloseCode::Normal, reason: "reconnecting".into() }),
            // The collector records a planned stop (`agent_stopped`) or a
            // reboot bell's own stop (`rebooting`) instead of a failure.
            SessionEnd::Stopping => Some(CloseFrame {
                code: CloseCode::Away,
                reason: match self.executor.rebooting() {
                    Some(bell) => format!("{}{bell}", close::REBOOTING_PREFIX).into(),
                    None => close::AGENT_STOPPING.into(),
                },
            }),
        };
        if let Some(frame) = frame {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
        }
        end
    }

    async fn on_server_msg(&mut self, msg: ServerMsg) {
        match msg {
            ServerMsg::Welcome(w) => {
                info!(generation = w.generation, offline_after_ms = w.offline_after_ms, "welcomed by the collector");
                if u128::from(w.interval_ms) != self.config.interval.as_millis() {
                    warn!(accepted_ms = w.interval_ms, "the collector accepted a different interval");
                }
            }
            ServerMsg::Bell(bell) => self.executor.ring(bell).await,
            ServerMsg::Cancel(id) => self.executor.cancel(id).await,
            ServerMsg::ResendChecks => {} // handled by the session
        }
    }
}

async fn send(ws: &mut WsStream, msg: &AgentMsg) -> Result<(), String> {
    let bytes = encode(msg).map_err(|e| e.to_string())?;
    ws.send(Message::Binary(bytes.into())).await.map_err(|e| e.to_string())
}

/// Tells systemd (`Type=notify`) that the agent is configured and running.
fn notify_ready() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

/// Pets systemd's watchdog (`WatchdogSec=`) every half watchdog period,
/// but only while the sampling loop is healthy: a new pulse within the last
/// two intervals (or one watchdog period, if longer). If sampling stalls,
/// the pings stop and systemd restarts the agent. Without a watchdog
/// (`WATCHDOG_USEC` unset) this returns at once.
async fn watchdog_loop(mut pulses: watch::Receiver<Option<Pulse>>, interval: Duration) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec);
    let allowed = (interval * 2).max(period);
    let mut last_progress = Instant::now();
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tick.tick().await;
        if pulses.has_changed().unwrap_or(false) {
            pulses.mark_unchanged();
            last_progress = Instant::now();
        }
        if last_progress.elapsed() <= allowed {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        } else {
            warn!("sampling has stalled; no longer petting the systemd watchdog");
        }
    }
}

#[cfg(test)]
mod tests {
    use pulsebell_proto::{CheckKind, CheckStatus};

    use super::*;

    fn r(name: &str, status: CheckStatus, summary: &str) -> CheckResult {
        CheckResult {
            name: name.into(),
            kind: CheckKind::Tcp,
            status,
            summary: summary.into(),
            output: String::new(),
            since_ms: 1,
        }
    }

    fn names(report: &CheckReport) -> Vec<&str> {
        report.results.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn sent_checks_report_what_changed_and_count_what_was_sent() {
        let mut sent = SentChecks::default();
        let pending = r("b", CheckStatus::Unknown, crate::checks::PENDING);
        // The first report is full, without checks that have not run yet.
        let first = sent.report(Arc::new(vec![r("a", CheckStatus::Ok, "1 ms"), pending.clone()]), true).unwrap();
        assert!(first.full);
        assert_eq!(names(&first), ["a"]);
        assert_eq!(sent.digest(), CheckDigest { ok: 1, ..CheckDigest::default() });
        // A new summary alone is no news; b's first result is.
        let now = vec![r("a", CheckStatus::Ok, "2 ms"), r("b", CheckStatus::Critical, "refused")];
        let second = sent.report(Arc::new(now.clone()), false).unwrap();
        assert!(!second.full);
        assert_eq!(names(&second), ["b"]);
        assert_eq!(sent.digest(), CheckDigest { ok: 1, critical: 1, ..CheckDigest::default() });
        assert!(sent.report(Arc::new(now), false).is_none(), "nothing changed");
        // A check that went away makes the report full.
        let third = sent.report(Arc::new(vec![r("b", CheckStatus::Ok, "fine")]), false).unwrap();
        assert!(third.full);
        assert_eq!(names(&third), ["b"]);
        assert_eq!(sent.digest(), CheckDigest { ok: 1, ..CheckDigest::default() });
    }
}
