//! Automated rollouts: a route moves through its plan's steps only when the
//! collector's evidence for the step passes every gate; a failing gate rolls it back
//! by the same path as `strangler route rollback`, and missing evidence holds it.
//!
//! The decision itself ([`evaluate`]) is a pure function of the plan, the step, the
//! evidence and the time spent, so it is tested without servers; [`run`] adds the
//! loop, the collector and the route changes.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{Value, json};
use strangler_model::rollout::{OnFail, RolloutPlan, SqlGate, Step};

use crate::control::Controller;
use crate::control::lifecycle::{Percent, State};

/// One side's numbers in a step's window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Side {
    /// Requests it served (not shadow copies).
    pub served: u64,
    /// Shadow copies it answered.
    pub shadow: u64,
    /// Errors among both.
    pub errors: u64,
    /// p99 latency over both, ms (`None` without requests).
    pub p99_ms: Option<f64>,
}

impl Side {
    /// Requests of both kinds.
    pub fn requests(&self) -> u64 {
        self.served + self.shadow
    }
}

/// What the collector says about a step's window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Evidence {
    /// The legacy monolith.
    pub legacy: Side,
    /// The new service.
    pub new: Side,
    /// Shadow pairs whose answers matched.
    pub matched: u64,
    /// Shadow pairs whose answers differed.
    pub differed: u64,
}

impl Evidence {
    /// From the `route_evidence` named query's rows.
    pub fn from_rows(rows: &[Value]) -> Self {
        let mut e = Self::default();
        // p99s of the served and shadow rows, weighted by requests (an approximation
        // of the p99 over both; exact when one kind dominates, as it does per step).
        let mut p99 = [(0.0f64, 0u64), (0.0, 0)];
        for r in rows {
            let n = r["requests"].as_u64().unwrap_or(0);
            let is_shadow = r["shadow"].as_u64().unwrap_or(0) > 0;
            let (side, slot) = match r["side"].as_str() {
                Some("legacy") => (&mut e.legacy, 0),
                Some("new") => (&mut e.new, 1),
                _ => continue,
            };
            if is_shadow {
                side.shadow += n;
            } else {
                side.served += n;
            }
            side.errors += r["errors"].as_u64().unwrap_or(0);
            if let Some(p) = r["p99_ms"].as_f64() {
                p99[slot].0 = if p99[slot].1 + n == 0 {
                    p
                } else {
                    (p99[slot].0 * p99[slot].1 as f64 + p * n as f64) / (p99[slot].1 + n) as f64
                };
                p99[slot].1 += n;
            }
            e.matched += r["diff_match"].as_u64().unwrap_or(0);
            e.differed += r["diff_mismatch"].as_u64().unwrap_or(0);
        }
        e.legacy.p99_ms = (p99[0].1 > 0).then_some(p99[0].0);
        e.new.p99_ms = (p99[1].1 > 0).then_some(p99[1].0);
        e
    }
}

/// The Wilson score interval of `k` successes in `n` trials (`z`: the normal
/// quantile of the confidence). Well-behaved at 0 and n, unlike the normal
/// approximation, which is what small canaries need.
pub fn wilson(k: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// A gate's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Good enough, with the confidence asked for.
    Pass,
    /// Worse than allowed, with that confidence.
    Fail,
    /// Not enough evidence either way yet.
    Inconclusive,
    /// Nothing to judge at this step (e.g. no shadow pairs during a canary).
    NotApplicable,
}

/// What failing a gate does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Consequence {
    /// Back to legacy.
    Rollback,
    /// Stay at the step.
    Hold,
}

/// One gate's verdict, with the numbers behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateVerdict {
    /// The gate.
    pub gate: String,
    /// Its outcome.
    pub outcome: Outcome,
    /// What a failure does.
    pub on_fail: Consequence,
    /// The numbers, for people.
    pub detail: String,
}

/// What the rollout does after an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "decision", content = "why", rename_all = "lowercase")]
pub enum Decision {
    /// On to the next step (or done, at the last).
    Advance,
    /// Stay and look again.
    Hold(String),
    /// Back to legacy now.
    Rollback(String),
}

/// An evaluation's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// The decision.
    #[serde(flatten)]
    pub decision: Decision,
    /// Every gate.
    pub gates: Vec<GateVerdict>,
    /// The evidence.
    pub evidence: Evidence,
    /// Seconds into the step's window.
    pub elapsed_s: f64,
}

/// Legacy's numbers to compare against when legacy has (almost) no traffic in a step
/// (at 100 % without shadowing): the previous step's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Baseline {
    /// Error rate.
    pub error_rate: f64,
    /// p99, ms.
    pub p99_ms: Option<f64>,
}

fn pct(x: f64) -> String {
    format!("{:.2} %", 100.0 * x)
}

/// Judges a step's evidence. `custom` holds each SQL gate's value (or why it could
/// not be read).
pub fn evaluate(
    plan: &RolloutPlan,
    step: Step,
    e: &Evidence,
    elapsed: Duration,
    baseline: Option<Baseline>,
    custom: &[(SqlGate, Result<Option<f64>, String>)],
) -> Verdict {
    let z = plan.z();
    let conf = format!("{:.0} %", plan.confidence * 100.0);
    let enough = e.new.requests() >= plan.min_requests;
    let legacy_enough = e.legacy.requests() >= plan.min_requests;
    let mut gates = Vec::new();

    // Errors: new's interval against legacy's rate plus the margin.
    let legacy_rate = if legacy_enough || baseline.is_none() {
        e.legacy.errors as f64 / e.legacy.requests().max(1) as f64
    } else {
        baseline.map_or(0.0, |b| b.error_rate)
    };
    let allowed = legacy_rate + plan.max_error_rate_increase;
    let (lo, hi) = wilson(e.new.errors, e.new.requests(), z);
    let outcome = if e.new.requests() == 0 {
        Outcome::Inconclusive
    } else if lo > allowed {
        Outcome::Fail
    } else if hi <= allowed {
        Outcome::Pass
    } else {
        Outcome::Inconclusive
    };
    gates.push(GateVerdict {
        gate: "error rate".into(),
        outcome,
        on_fail: Consequence::Rollback,
        detail: format!(
            "new {}/{} = {} ({conf} CI {}–{}) vs allowed {} (legacy {} + {})",
            e.new.errors,
            e.new.requests(),
            pct(e.new.errors as f64 / e.new.requests().max(1) as f64),
            pct(lo),
            pct(hi),
            pct(allowed),
            pct(legacy_rate),
            pct(plan.max_error_rate_increase)
        ),
    });

    // Latency: new's p99 against legacy's times the ratio plus slack.
    let legacy_p99 = if legacy_enough {
        e.legacy.p99_ms
    } else {
        baseline.and_then(|b| b.p99_ms).or(e.legacy.p99_ms)
    };
    let (outcome, detail) = match (e.new.p99_ms, legacy_p99) {
        (Some(new), Some(old)) if enough => {
            let limit = old * plan.max_p99_ratio + plan.p99_slack_ms;
            (
                if new <= limit {
                    Outcome::Pass
                } else {
                    Outcome::Fail
                },
                format!(
                    "new {new:.1} ms vs allowed {limit:.1} ms (legacy {old:.1} × {} + {} ms)",
                    plan.max_p99_ratio, plan.p99_slack_ms
                ),
            )
        }
        (_, None) => (
            Outcome::Inconclusive,
            "no legacy latency to compare with yet".into(),
        ),
        _ => (
            Outcome::Inconclusive,
            format!(
                "{} of {} requests needed",
                e.new.requests(),
                plan.min_requests
            ),
        ),
    };
    gates.push(GateVerdict {
        gate: "p99 latency".into(),
        outcome,
        on_fail: Consequence::Rollback,
        detail,
    });

    // Answers: the share of matching shadow pairs. Required in shadow; during a
    // canary it counts when pairs exist (shadowing may be on) and then differing
    // answers reach users, so failing rolls back.
    let pairs = e.matched + e.differed;
    let (lo, hi) = wilson(e.matched, pairs, z);
    let outcome = if pairs == 0 {
        if step == Step::Shadow {
            Outcome::Inconclusive
        } else {
            Outcome::NotApplicable
        }
    } else if hi < plan.min_match_rate {
        Outcome::Fail
    } else if lo >= plan.min_match_rate {
        Outcome::Pass
    } else {
        Outcome::Inconclusive
    };
    gates.push(GateVerdict {
        gate: "answers match".into(),
        outcome,
        on_fail: if step == Step::Shadow {
            Consequence::Hold
        } else {
            Consequence::Rollback
        },
        detail: format!(
            "{}/{pairs} pairs match = {} ({conf} CI {}–{}) vs required {}",
            e.matched,
            pct(e.matched as f64 / pairs.max(1) as f64),
            pct(lo),
            pct(hi),
            pct(plan.min_match_rate)
        ),
    });

    for (g, value) in custom {
        let (outcome, detail) = match value {
            Err(why) => (Outcome::Inconclusive, format!("cannot read: {why}")),
            Ok(None) => (Outcome::Inconclusive, "no value".into()),
            Ok(Some(v)) => {
                let ok = g.min.is_none_or(|m| *v >= m) && g.max.is_none_or(|m| *v <= m);
                let bounds = match (g.min, g.max) {
                    (Some(a), Some(b)) => format!("{a}–{b}"),
                    (Some(a), None) => format!("≥ {a}"),
                    (None, Some(b)) => format!("≤ {b}"),
                    (None, None) => "any".into(),
                };
                (
                    if !enough {
                        Outcome::Inconclusive
                    } else if ok {
                        Outcome::Pass
                    } else {
                        Outcome::Fail
                    },
                    format!("value {v} vs {bounds}"),
                )
            }
        };
        gates.push(GateVerdict {
            gate: g.name.clone(),
            outcome,
            on_fail: match g.on_fail {
                OnFail::Rollback => Consequence::Rollback,
                OnFail::Hold => Consequence::Hold,
            },
            detail,
        });
    }

    let failed = |c: Consequence| {
        gates
            .iter()
            .filter(|g| g.outcome == Outcome::Fail && g.on_fail == c)
            .map(|g| format!("{} failed: {}", g.gate, g.detail))
            .collect::<Vec<_>>()
    };
    let rollback = failed(Consequence::Rollback);
    let hold = failed(Consequence::Hold);
    let decision = if !rollback.is_empty() {
        Decision::Rollback(rollback.join("; "))
    } else if !hold.is_empty() {
        Decision::Hold(hold.join("; "))
    } else if elapsed < plan.min_step || !enough {
        Decision::Hold(format!(
            "gathering evidence: {:.0} of {} s, {} of {} requests on the new side",
            elapsed.as_secs_f64(),
            plan.min_step.as_secs(),
            e.new.requests(),
            plan.min_requests
        ))
    } else if let Some(g) = gates.iter().find(|g| g.outcome == Outcome::Inconclusive) {
        Decision::Hold(format!("{} inconclusive: {}", g.gate, g.detail))
    } else {
        Decision::Advance
    };
    Verdict {
        decision,
        gates,
        evidence: *e,
        elapsed_s: elapsed.as_secs_f64(),
    }
}

/// Where evidence comes from.
#[async_trait]
pub trait EvidenceSource: Send + Sync {
    /// The route's evidence between two instants (seconds since the epoch).
    async fn evidence(&self, route: &str, from: u32, to: u32) -> Result<Evidence, String>;
    /// A custom gate's value over the same window.
    async fn gate(
        &self,
        gate: &SqlGate,
        route: &str,
        from: u32,
        to: u32,
    ) -> Result<Option<f64>, String>;
}

/// The collector's HTTP API.
pub struct Collector {
    base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl Collector {
    /// The collector at `base` (token from `STRANGLER_COLLECTOR_TOKEN`), each call
    /// bounded by `timeout`.
    pub fn new(base: &str, timeout: Duration) -> Result<Self, String> {
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .map_err(|e| e.to_string())?,
            token: std::env::var(strangler_collector::config::DEFAULT_WEB_TOKEN_ENV)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, String> {
        let request = match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        };
        let response = request.send().await.map_err(|e| {
            format!(
                "the collector at {} is unreachable (is it running?): {e}",
                self.base
            )
        })?;
        let status = response.status();
        let doc: Value = response.json().await.map_err(|e| {
            format!(
                "the collector at {} answered {status} without JSON: {e}",
                self.base
            )
        })?;
        if !status.is_success() {
            return Err(format!(
                "the collector at {} answered {status}: {}",
                self.base,
                doc["error"].as_str().unwrap_or("no reason given")
            ));
        }
        Ok(doc)
    }

    /// The overview page's numbers over the last `since` (`/api/overview`).
    pub async fn overview(&self, since: &str) -> Result<Value, String> {
        self.send(
            self.client
                .get(format!("{}/api/overview", self.base))
                .query(&[("since", since)]),
        )
        .await
    }

    /// The route page's numbers over the last `since` (`/api/route`).
    pub async fn route(&self, route: &str, since: &str) -> Result<Value, String> {
        self.send(
            self.client
                .get(format!("{}/api/route", self.base))
                .query(&[("route", route), ("since", since)]),
        )
        .await
    }
}

#[async_trait]
impl EvidenceSource for Collector {
    async fn evidence(&self, route: &str, from: u32, to: u32) -> Result<Evidence, String> {
        let doc = self
            .send(
                self.client
                    .get(format!("{}/api/query/route_evidence", self.base))
                    .query(&[("route", route)])
                    .query(&[("from", from), ("to", to)]),
            )
            .await?;
        let rows = doc["rows"]
            .as_array()
            .ok_or_else(|| "collector answer has no rows".to_string())?;
        Ok(Evidence::from_rows(rows))
    }

    async fn gate(
        &self,
        gate: &SqlGate,
        route: &str,
        from: u32,
        to: u32,
    ) -> Result<Option<f64>, String> {
        let doc = self
            .send(
                self.client
                    .post(format!("{}/api/gate", self.base))
                    .json(&json!({ "sql": gate.sql, "route": route, "from": from, "to": to })),
            )
            .await?;
        Ok(doc["rows"][0]["value"].as_f64())
    }
}

/// How a rollout ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Every step passed: the route is at the plan's last step.
    Completed,
    /// A gate failed: the route is back on legacy.
    RolledBack,
    /// A step could not decide within `max_step_s` (or `--dry-run` reported): the
    /// route stays where it is.
    Held,
}

fn state_of(step: Step) -> State {
    match step {
        Step::Shadow => State::Shadow,
        Step::Percent(100) => State::New,
        Step::Percent(p) => State::Canary {
            percent: Percent::try_from(p).unwrap_or(Percent::ALL),
        },
    }
}

/// Where the route's current state sits in the plan: the index of the step it is at,
/// or `None` when it is at none of them (then the rollout starts at the first step
/// beyond it).
fn position(plan: &RolloutPlan, state: State) -> Option<usize> {
    plan.steps.iter().position(|s| state_of(*s) == state)
}

fn next_step_after(plan: &RolloutPlan, state: State) -> Option<usize> {
    let key = |s: State| match s {
        State::Legacy => 0u16,
        State::Shadow => 1,
        State::Canary { percent } => 2 + u16::from(percent.get()),
        State::New | State::Retired => 200,
    };
    plan.steps
        .iter()
        .position(|s| key(state_of(*s)) > key(state))
}

fn epoch(t: SystemTime) -> u32 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

fn stamp() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Prints one evaluation.
fn report(route: &str, step: Step, index: usize, plan: &RolloutPlan, v: &Verdict) -> String {
    let mut out = String::new();
    let e = &v.evidence;
    let _ = writeln!(
        out,
        "[{}] {route} · step {}/{} {step} · {:.0} s in window",
        stamp(),
        index + 1,
        plan.steps.len(),
        v.elapsed_s
    );
    for (name, s) in [("legacy", &e.legacy), ("new", &e.new)] {
        let _ = writeln!(
            out,
            "  {name:<7} {} served + {} shadow, {} errors, p99 {}",
            s.served,
            s.shadow,
            s.errors,
            s.p99_ms.map_or("–".into(), |p| format!("{p:.1} ms"))
        );
    }
    for g in &v.gates {
        let _ = writeln!(
            out,
            "  {:<14} {:<13} {}",
            g.gate,
            format!("{:?}", g.outcome).to_lowercase(),
            g.detail
        );
    }
    let _ = writeln!(
        out,
        "  → {}",
        match &v.decision {
            Decision::Advance => match plan.steps.get(index + 1) {
                Some(next) => format!("advance to {next}"),
                None => "complete".into(),
            },
            Decision::Hold(why) => format!("hold: {why}"),
            Decision::Rollback(why) => format!("ROLL BACK: {why}"),
        }
    );
    out
}

/// Runs `route`'s plan until it completes, rolls back or holds past `max_step_s`
/// (`dry_run`: evaluates the current step once and changes nothing).
pub async fn run(
    controller: &Controller,
    source: &dyn EvidenceSource,
    route: &str,
    plan: &RolloutPlan,
    dry_run: bool,
) -> anyhow::Result<End> {
    let config = controller.route(route)?;
    // Custom gates' macros are checked before anything moves.
    for g in &plan.gates {
        let mut probe = strangler_dashboards::Params::window("strangler", 3_600, 60, 1);
        probe.route = Some(route.to_string());
        strangler_dashboards::query::expand(&g.sql, &probe)
            .map_err(|e| anyhow::anyhow!("{route}: rollout gate {:?}: {e}", g.name))?;
    }
    // One controller per route: a second one is refused and told who runs it.
    let holder = format!(
        "{} (pid {}, since {})",
        controller.actor(),
        std::process::id(),
        strangler_model::history::now_rfc3339()
    );
    let mut lease = if dry_run {
        None
    } else {
        Some(controller.history().lease(route, &holder).await?)
    };
    let state = controller.current_state(config).await?;
    let mut index = match position(plan, state) {
        Some(i) => i,
        None => {
            let Some(i) = next_step_after(plan, state) else {
                println!("{route} is at {state}, past every step of its plan: nothing to do");
                return Ok(End::Completed);
            };
            if dry_run {
                println!(
                    "{route} is at {state}; the rollout would move it to {} (dry run: nothing changed)",
                    plan.steps[i]
                );
                return Ok(End::Held);
            }
            // The first step needs no evidence: it is where the plan starts.
            let to = state_of(plan.steps[i]);
            controller
                .transition_with_evidence(
                    route,
                    to,
                    "rollout start",
                    Some(format!(
                        "rollout plan step 1/{} ({})",
                        plan.steps.len(),
                        plan.steps[i]
                    )),
                    None,
                )
                .await?;
            println!("[{}] {route}: {state} → {to} (rollout start)", stamp());
            i
        }
    };
    // The step began at its last recorded change (a restarted rollout resumes).
    let mut step_began = controller
        .history()
        .for_route(route)
        .await?
        .last()
        .and_then(|e| humantime::parse_rfc3339(&e.at).ok())
        .unwrap_or_else(SystemTime::now);
    let mut baseline: Option<Baseline> = None;
    loop {
        let step = plan.steps[index];
        // A lease in a shared history lives in a database session; if that ended (a
        // database restart), take it again before acting, or stop: another
        // controller may hold it now.
        if lease.as_ref().is_some_and(strangler_model::Lease::lost) {
            lease = Some(
                controller
                    .history()
                    .lease(route, &holder)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "{route}: the rollout lost its lease and could not take it again: {e}"
                        )
                    })?,
            );
            println!(
                "[{}] {route}: took the rollout lease again (its database session had ended)",
                stamp()
            );
        }
        // Someone else moved the route (an operator's rollback, say): a rollback
        // always wins, and the controller never moves a route it no longer holds.
        if !dry_run
            && let Some(end) = moved_by_someone_else(controller, route, state_of(step)).await?
        {
            return Ok(end);
        }
        let window_from = step_began + plan.settle;
        let now = SystemTime::now();
        let elapsed = now.duration_since(window_from).unwrap_or_default();
        let (from, to) = (epoch(window_from), epoch(now));
        let verdict = if now < window_from {
            None
        } else {
            match source.evidence(route, from, to).await {
                Err(why) => {
                    println!(
                        "[{}] {route} · step {}/{} {step}: hold, cannot read evidence: {why}",
                        stamp(),
                        index + 1,
                        plan.steps.len()
                    );
                    None
                }
                Ok(evidence) => {
                    let mut custom = Vec::new();
                    for g in &plan.gates {
                        custom.push((g.clone(), source.gate(g, route, from, to).await));
                    }
                    Some(evaluate(plan, step, &evidence, elapsed, baseline, &custom))
                }
            }
        };
        if let Some(v) = &verdict {
            print!("{}", report(route, step, index, plan, v));
            if dry_run {
                return Ok(End::Held);
            }
            let evidence = serde_json::to_value(v).ok();
            match &v.decision {
                Decision::Rollback(why) => {
                    let outcome = controller
                        .transition_with_evidence(
                            route,
                            State::Legacy,
                            "rollout rollback",
                            Some(format!("at {step}: {why}")),
                            evidence,
                        )
                        .await?;
                    println!(
                        "[{}] {route}: rolled back to legacy in {} ms",
                        stamp(),
                        outcome.took_ms
                    );
                    return Ok(End::RolledBack);
                }
                Decision::Advance if index + 1 == plan.steps.len() => {
                    println!("[{}] {route}: rollout complete at {step}", stamp());
                    return Ok(End::Completed);
                }
                Decision::Advance => {
                    if let Some(end) =
                        moved_by_someone_else(controller, route, state_of(step)).await?
                    {
                        return Ok(end);
                    }
                    let legacy = &v.evidence.legacy;
                    if legacy.requests() >= plan.min_requests {
                        baseline = Some(Baseline {
                            error_rate: legacy.errors as f64 / legacy.requests() as f64,
                            p99_ms: legacy.p99_ms,
                        });
                    }
                    index += 1;
                    let to = state_of(plan.steps[index]);
                    controller
                        .transition_with_evidence(
                            route,
                            to,
                            "rollout advance",
                            Some(format!(
                                "step {step} passed every gate ({} new-side requests in {:.0} s)",
                                v.evidence.new.requests(),
                                v.elapsed_s
                            )),
                            evidence,
                        )
                        .await?;
                    println!("[{}] {route}: → {to}", stamp());
                    step_began = SystemTime::now();
                    continue;
                }
                Decision::Hold(_) => {}
            }
        } else if dry_run {
            println!("{route}: the step's window has not begun yet (dry run: nothing changed)");
            return Ok(End::Held);
        }
        if SystemTime::now()
            .duration_since(step_began)
            .unwrap_or_default()
            > plan.max_step
        {
            let why = verdict.as_ref().map_or_else(
                || "no evidence could be read".to_string(),
                |v| match &v.decision {
                    Decision::Hold(w) => w.clone(),
                    _ => String::new(),
                },
            );
            println!(
                "[{}] {route}: held at {step} for longer than {} s without a decision ({why}); stopping, the route stays at {step}",
                stamp(),
                plan.max_step.as_secs()
            );
            return Ok(End::Held);
        }
        tokio::time::sleep(plan.interval).await;
    }
}

/// How the rollout ends when the route's recorded state is no longer the step's
/// (`None`: still there, or never recorded).
async fn moved_by_someone_else(
    controller: &Controller,
    route: &str,
    expected: State,
) -> anyhow::Result<Option<End>> {
    let Some(now) = controller.history().last_state(route).await? else {
        return Ok(None);
    };
    if now == expected {
        return Ok(None);
    }
    if now == State::Legacy {
        println!(
            "[{}] {route}: rolled back by someone else (the history says {now}); the rollout stops",
            stamp()
        );
        return Ok(Some(End::RolledBack));
    }
    println!(
        "[{}] {route}: moved to {now} by someone else while the rollout held it at {expected}; the rollout stops and leaves it there",
        stamp()
    );
    Ok(Some(End::Held))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RolloutPlan {
        let raw: strangler_router::config::RouterConfig = strangler_router::config::RouterConfig::parse(
            "[legacy]\nupstream = \"127.0.0.1:1\"\n[[route]]\nname = \"orders\"\nmatch = { prefix = \"/o\" }\nnew = \"127.0.0.1:2\"\n[route.rollout]\nsteps = [\"shadow\", \"25%\", \"100%\"]\nmin_step_s = 10\nmin_requests = 100\n",
            std::path::Path::new("t.toml"),
        )
        .expect("config");
        raw.routes[0].rollout.clone().expect("plan")
    }

    fn side(served: u64, shadow: u64, errors: u64, p99: f64) -> Side {
        Side {
            served,
            shadow,
            errors,
            p99_ms: Some(p99),
        }
    }

    fn ev(legacy: Side, new: Side, matched: u64, differed: u64) -> Evidence {
        Evidence {
            legacy,
            new,
            matched,
            differed,
        }
    }

    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn wilson_intervals_behave_at_the_edges() {
        let (lo, hi) = wilson(0, 100, 1.96);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.037).abs() < 0.001, "{hi}");
        let (lo, hi) = wilson(50, 100, 1.96);
        assert!((lo - 0.404).abs() < 0.001 && (hi - 0.596).abs() < 0.001);
        assert_eq!(wilson(0, 0, 1.96), (0.0, 1.0));
        let (lo, _) = wilson(400, 400, 1.96);
        assert!(lo > 0.99);
    }

    #[test]
    fn a_healthy_step_with_enough_evidence_advances() {
        let v = evaluate(
            &plan(),
            Step::Percent(25),
            &ev(side(900, 0, 9, 20.0), side(300, 600, 3, 22.0), 900, 0),
            LONG,
            None,
            &[],
        );
        assert_eq!(v.decision, Decision::Advance, "{v:#?}");
    }

    #[test]
    fn too_little_time_or_traffic_holds_even_when_everything_looks_good() {
        let p = plan();
        let good = ev(side(900, 0, 0, 20.0), side(300, 600, 0, 20.0), 900, 0);
        let v = evaluate(
            &p,
            Step::Percent(25),
            &good,
            Duration::from_secs(3),
            None,
            &[],
        );
        assert!(
            matches!(v.decision, Decision::Hold(ref w) if w.contains("gathering")),
            "{v:?}"
        );
        let few = ev(side(50, 0, 0, 20.0), side(20, 0, 0, 20.0), 0, 0);
        let v = evaluate(&p, Step::Percent(25), &few, LONG, None, &[]);
        assert!(matches!(v.decision, Decision::Hold(_)), "{v:?}");
    }

    #[test]
    fn clearly_more_errors_on_the_new_side_roll_back_even_early() {
        let v = evaluate(
            &plan(),
            Step::Percent(25),
            &ev(side(100, 0, 0, 20.0), side(30, 0, 30, 20.0), 0, 0),
            Duration::from_secs(2),
            None,
            &[],
        );
        assert!(
            matches!(v.decision, Decision::Rollback(ref w) if w.contains("error rate")),
            "{v:?}"
        );
    }

    #[test]
    fn a_slower_new_side_rolls_back_and_jitter_does_not() {
        let p = plan();
        let slow = ev(side(900, 0, 0, 20.0), side(300, 0, 0, 80.0), 0, 0);
        let v = evaluate(&p, Step::Percent(25), &slow, LONG, None, &[]);
        assert!(
            matches!(v.decision, Decision::Rollback(ref w) if w.contains("p99")),
            "{v:?}"
        );
        let jitter = ev(side(900, 0, 0, 0.4), side(600, 0, 0, 3.0), 0, 0);
        let v = evaluate(&p, Step::Percent(25), &jitter, LONG, None, &[]);
        assert_eq!(v.decision, Decision::Advance, "{v:?}");
    }

    #[test]
    fn differing_answers_hold_in_shadow_and_roll_back_in_a_canary() {
        let p = plan();
        let differ = ev(side(900, 0, 0, 20.0), side(0, 900, 0, 20.0), 600, 300);
        let v = evaluate(&p, Step::Shadow, &differ, LONG, None, &[]);
        assert!(
            matches!(v.decision, Decision::Hold(ref w) if w.contains("answers match")),
            "{v:?}"
        );
        let v = evaluate(&p, Step::Percent(25), &differ, LONG, None, &[]);
        assert!(matches!(v.decision, Decision::Rollback(_)), "{v:?}");
    }

    #[test]
    fn shadow_needs_pairs_and_a_canary_does_not() {
        let p = plan();
        // (600 error-free requests put the error rate's upper bound under 1 %.)
        let no_pairs = ev(side(900, 0, 0, 20.0), side(600, 0, 0, 20.0), 0, 0);
        let v = evaluate(&p, Step::Shadow, &no_pairs, LONG, None, &[]);
        assert!(matches!(v.decision, Decision::Hold(_)), "{v:?}");
        let v = evaluate(&p, Step::Percent(25), &no_pairs, LONG, None, &[]);
        assert_eq!(v.decision, Decision::Advance, "{v:?}");
    }

    #[test]
    fn at_full_traffic_the_previous_steps_legacy_numbers_are_the_baseline() {
        let p = plan();
        let full = ev(Side::default(), side(1000, 0, 40, 20.0), 0, 0);
        let base = Baseline {
            error_rate: 0.0,
            p99_ms: Some(20.0),
        };
        let v = evaluate(&p, Step::Percent(100), &full, LONG, Some(base), &[]);
        assert!(
            matches!(v.decision, Decision::Rollback(_)),
            "4 % errors vs 0 %: {v:?}"
        );
        let fine = ev(Side::default(), side(1000, 0, 0, 20.0), 0, 0);
        let v = evaluate(&p, Step::Percent(100), &fine, LONG, Some(base), &[]);
        assert_eq!(v.decision, Decision::Advance, "{v:?}");
    }

    #[test]
    fn custom_gates_pass_fail_or_hold_on_unreadable_values() {
        let p = plan();
        let good = ev(side(900, 0, 0, 20.0), side(300, 600, 0, 20.0), 900, 0);
        let gate = SqlGate {
            name: "409s".into(),
            sql: "SELECT 0 AS value".into(),
            min: None,
            max: Some(0.02),
            on_fail: OnFail::Rollback,
        };
        let v = evaluate(
            &p,
            Step::Percent(25),
            &good,
            LONG,
            None,
            &[(gate.clone(), Ok(Some(0.01)))],
        );
        assert_eq!(v.decision, Decision::Advance);
        let v = evaluate(
            &p,
            Step::Percent(25),
            &good,
            LONG,
            None,
            &[(gate.clone(), Ok(Some(0.05)))],
        );
        assert!(
            matches!(v.decision, Decision::Rollback(ref w) if w.contains("409s")),
            "{v:?}"
        );
        let v = evaluate(
            &p,
            Step::Percent(25),
            &good,
            LONG,
            None,
            &[(gate, Err("down".into()))],
        );
        assert!(
            matches!(v.decision, Decision::Hold(ref w) if w.contains("409s")),
            "{v:?}"
        );
    }

    #[test]
    fn evidence_rows_fold_into_sides_and_pairs() {
        let rows: Vec<Value> = serde_json::from_str(
            r#"[{"side":"legacy","shadow":0,"requests":90,"errors":1,"p99_ms":10.0,"diff_match":80,"diff_mismatch":10},
                {"side":"new","shadow":1,"requests":90,"errors":0,"p99_ms":12.0,"diff_match":0,"diff_mismatch":0},
                {"side":"new","shadow":0,"requests":10,"errors":2,"p99_ms":22.0,"diff_match":0,"diff_mismatch":0}]"#,
        )
        .expect("json");
        let e = Evidence::from_rows(&rows);
        assert_eq!(
            (e.legacy.served, e.new.served, e.new.shadow, e.new.errors),
            (90, 10, 90, 2)
        );
        assert_eq!((e.matched, e.differed), (80, 10));
        assert!((e.new.p99_ms.expect("p99") - 13.0).abs() < 1e-9);
    }

    #[test]
    fn the_rollout_starts_after_the_current_state_and_resumes_at_its_step() {
        let p = plan();
        assert_eq!(next_step_after(&p, State::Legacy), Some(0));
        assert_eq!(position(&p, State::Shadow), Some(0));
        assert_eq!(
            next_step_after(
                &p,
                State::Canary {
                    percent: Percent::try_from(10).expect("10")
                }
            ),
            Some(1)
        );
        assert_eq!(position(&p, State::New), Some(2));
        assert_eq!(next_step_after(&p, State::New), None);
    }
}
