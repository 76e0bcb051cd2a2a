//! Rules that heal: `[[rules]]` in the collector's config ring a bell when a
//! condition has held long enough, such as restarting the app whose check
//! has been critical for two minutes.
//!
//! A rule's bell is an ordinary bell (durable, allowlisted by the agent,
//! executed exactly once, refused by the agent under its maintenance lock
//! when the action is `disruptive`) whose origin is `rule:NAME`. Two limits
//! keep a bad rule from doing harm:
//! - `cooldown`: at most one bell per device per cooldown;
//! - `max_per_hour`: at most this many bells of the rule per hour, across
//!   the fleet.
//!
//! Both are counted from the bells themselves, which are durable, so they
//! hold across collector restarts: at start the engine reads the recent
//! bells back. How long a condition has held is measured on the
//! collector's clock from when it first saw it (not the agent's, which may
//! be wrong on a board without a real-time clock), so after a restart a
//! condition must hold for `for` again before the rule acts.
//!
//! In cluster mode each node looks after the devices connected to it; an
//! offline rule is evaluated by one node, the alive node whose id sorts
//! first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::bells::{Bells, RingRequest};
use crate::clock::{now_ms, rfc3339};
use crate::cluster::Membership;
use crate::config::RuleConfig;
use crate::fleet::Fleet;

/// How often rules are evaluated.
pub const TICK: Duration = Duration::from_secs(1);

/// Most recent bells read back at start to restore cooldowns and ceilings.
const RESTORE_BELLS: usize = 10_000;

const HOUR_MS: u64 = 3_600_000;

/// The rules engine.
pub struct Rules {
    rules: Vec<RuleConfig>,
    fleet: Arc<Fleet>,
    bells: Arc<Bells>,
    membership: Option<(Arc<Membership>, Duration)>,
    state: Mutex<Vec<RuleState>>,
}

/// What one rule remembers.
#[derive(Debug, Default)]
struct RuleState {
    /// Devices whose condition holds: since when (collector clock, ms) and
    /// whether this episode was already counted as held back.
    holding: HashMap<String, Episode>,
    /// When the rule rang in the last hour, oldest first.
    recent: VecDeque<u64>,
    /// When the rule last rang each device.
    last_by_device: HashMap<String, u64>,
    /// Its last bell: when, device, bell id.
    last: Option<(u64, String, u64)>,
    held: HeldBack,
}

#[derive(Debug, Clone, Copy)]
struct Episode {
    since_ms: u64,
    held: bool,
}

/// Times a rule's condition held long enough but no bell was rung, by why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldBack {
    /// The device had a bell of this rule within the cooldown.
    pub cooldown: u64,
    /// The rule had rung `max_per_hour` bells in the last hour.
    pub ceiling: u64,
    /// The device does not announce the rule's action.
    pub no_action: u64,
}

/// A rule as `rules --json` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleView {
    /// Name.
    pub name: String,
    /// The condition, as written: `check app is critical for 2m`.
    pub when: String,
    /// The action it rings.
    pub action: String,
    /// Only devices with one of these tags (empty: all).
    pub tags: Vec<String>,
    /// Cooldown, seconds.
    pub cooldown_secs: u64,
    /// Fleet-wide ceiling per hour.
    pub max_per_hour: u32,
    /// Its last bell, if any.
    pub last_fired: Option<Fired>,
    /// Bells it rang in the last hour.
    pub fired_last_hour: usize,
    /// Devices whose condition holds now.
    pub holding: Vec<String>,
    /// What it held back since the collector started.
    pub held_back: HeldBack,
}

/// A rule's bell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fired {
    /// When, RFC 3339.
    pub at: String,
    /// Which device.
    pub device: String,
    /// The bell's id.
    pub bell: u64,
}

/// The origin recorded on a rule's bells.
pub fn origin(rule: &str) -> String {
    format!("rule:{rule}")
}

impl Rules {
    /// The configured rules, with cooldowns and ceilings restored from the
    /// stored bells. `membership`: the cluster's nodes and after how long
    /// one is lost (cluster mode only).
    pub async fn load(
        fleet: Arc<Fleet>,
        bells: Arc<Bells>,
        membership: Option<(Arc<Membership>, Duration)>,
    ) -> anyhow::Result<Arc<Rules>> {
        let rules = fleet.config().rules.clone();
        let mut state: Vec<RuleState> = rules.iter().map(|_| RuleState::default()).collect();
        if !rules.is_empty() {
            let now = now_ms();
            let longest = rules.iter().map(|r| r.cooldown.as_millis() as u64).max().unwrap_or(0).max(HOUR_MS);
            let mut stored = fleet.store().bells(None, RESTORE_BELLS).await?;
            stored.sort_by_key(|b| b.created_ms);
            for b in stored.iter().filter(|b| now.saturating_sub(b.created_ms) < longest) {
                let Some(i) = rules.iter().position(|r| b.origin.as_deref() == Some(origin(&r.name).as_str())) else {
                    continue;
                };
                let s = &mut state[i];
                if now.saturating_sub(b.created_ms) < HOUR_MS {
                    s.recent.push_back(b.created_ms);
                }
                s.last_by_device.insert(b.device.clone(), b.created_ms);
                s.last = Some((b.created_ms, b.device.clone(), b.id));
            }
        }
        Ok(Arc::new(Rules { rules, fleet, bells, membership, state: Mutex::new(state) }))
    }

    /// Evaluates the rules every [`TICK`] until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.rules.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.evaluate(now_ms()).await,
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Whether this node evaluates offline rules: always on its own; in a
    /// cluster, the alive node whose id sorts first.
    fn offline_duty(&self) -> bool {
        match &self.membership {
            None => true,
            Some((m, lost_after)) => {
                let first = m.views(*lost_after).into_iter().find(|n| n.state == "alive").map(|n| n.id);
                first.as_deref() == Some(self.fleet.node())
            }
        }
    }

    /// One round: which conditions hold, and the bells they ring.
    pub async fn evaluate(&self, now: u64) {
        let offline_duty = self.offline_duty();
        let mut to_ring = vec![];
        {
            let mut states = self.state.lock().expect("rules lock");
            for (i, (rule, s)) in self.rules.iter().zip(states.iter_mut()).enumerate() {
                let holding = self.fleet.rule_holds(rule, offline_duty);
                s.holding.retain(|id, _| holding.iter().any(|(h, _)| h == id));
                while s.recent.front().is_some_and(|t| now.saturating_sub(*t) >= HOUR_MS) {
                    s.recent.pop_front();
                }
                let needed = rule.when.for_.unwrap_or_default().as_millis() as u64;
                for (id, offers) in holding {
                    let ep = s.holding.entry(id.clone()).or_insert(Episode { since_ms: now, held: false });
                    if now.saturating_sub(ep.since_ms) < needed {
                        continue;
                    }
                    let cooling = s
                        .last_by_device
                        .get(&id)
                        .is_some_and(|t| now.saturating_sub(*t) < rule.cooldown.as_millis() as u64);
                    let reason = if cooling {
                        Some((&mut s.held.cooldown, "within its cooldown"))
                    } else if s.recent.len() >= rule.max_per_hour as usize {
                        Some((&mut s.held.ceiling, "at its max_per_hour"))
                    } else if !offers {
                        Some((&mut s.held.no_action, "the device does not announce the action"))
                    } else {
                        None
                    };
                    match reason {
                        Some((count, why)) => {
                            if !ep.held {
                                ep.held = true;
                                *count += 1;
                                info!(rule = %rule.name, device = %id, "rule held back: {why}");
                            }
                        }
                        None => {
                            // Counted now so that a second device in the same
                            // round sees the ceiling; undone if ringing fails.
                            s.recent.push_back(now);
                            s.last_by_device.insert(id.clone(), now);
                            // Re-armed: the condition must hold `for` again.
                            *ep = Episode { since_ms: now, held: false };
                            to_ring.push((i, id));
                        }
                    }
                }
            }
        }
        for (i, device) in to_ring {
            let rule = &self.rules[i];
            let req = RingRequest {
                device: Some(device.clone()),
                tag: None,
                action: rule.ring.action.clone(),
                params: rule.ring.params.clone(),
                ttl_ms: None,
                timeout_ms: None,
                origin: Some(origin(&rule.name)),
            };
            match self.bells.ring(req).await {
                Ok(bells) => {
                    let id = bells.first().map_or(0, |b| b.id);
                    info!(rule = %rule.name, device = %device, bell = id, action = %rule.ring.action, "rule rang a bell");
                    self.state.lock().expect("rules lock")[i].last = Some((now, device, id));
                }
                Err(e) => {
                    warn!(rule = %rule.name, device = %device, error = %e, "rule could not ring its bell");
                    let s = &mut self.state.lock().expect("rules lock")[i];
                    if let Some(pos) = s.recent.iter().rposition(|t| *t == now) {
                        s.recent.remove(pos);
                    }
                    s.last_by_device.remove(&device);
                }
            }
        }
    }

    /// Every rule with its last firing and what it held back.
    pub fn views(&self) -> Vec<RuleView> {
        let now = now_ms();
        let states = self.state.lock().expect("rules lock");
        self.rules
            .iter()
            .zip(states.iter())
            .map(|(r, s)| {
                let mut holding: Vec<String> = s.holding.keys().cloned().collect();
                holding.sort();
                RuleView {
                    name: r.name.clone(),
                    when: describe(r),
                    action: r.ring.action.clone(),
                    tags: r.tags.clone(),
                    cooldown_secs: r.cooldown.as_secs(),
                    max_per_hour: r.max_per_hour,
                    last_fired: s.last.as_ref().map(|(at, device, bell)| Fired {
                        at: rfc3339(*at),
                        device: device.clone(),
                        bell: *bell,
                    }),
                    fired_last_hour: s.recent.iter().filter(|t| now.saturating_sub(**t) < HOUR_MS).count(),
                    holding,
                    held_back: s.held,
                }
            })
            .collect()
    }
}

/// `check app is critical for 2m`, `state offline for 10m`.
fn describe(r: &RuleConfig) -> String {
    let what = match (&r.when.check, &r.when.state) {
        (Some(c), _) => format!("check {c} is {}", r.when.status.as_deref().unwrap_or("critical")),
        (None, Some(s)) => format!("device is {s}"),
        (None, None) => String::new(),
    };
    match r.when.for_ {
        Some(d) if !d.is_zero() => format!("{what} for {}", humantime::format_duration(d)),
        _ => what,
    }
}
