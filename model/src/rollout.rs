//! A route's rollout plan (`[route.rollout]`): the steps from legacy to the new
//! service and the gates each step must pass. The router itself ignores it; the
//! CLI's `strangler route rollout` runs it.

use std::time::Duration;

use serde::Deserialize;

use crate::config_error::Invalid;

/// One step of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Legacy serves, the new service gets copies and answers are compared.
    Shadow,
    /// The new service serves this percentage (1-100) of sticky keys.
    Percent(u8),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shadow => f.write_str("shadow"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Step {
    fn parse(text: &str) -> Result<Self, Invalid> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("shadow") {
            return Ok(Self::Shadow);
        }
        match t.trim_end_matches('%').trim().parse::<u8>() {
            Ok(p) if (1..=100).contains(&p) => Ok(Self::Percent(p)),
            _ => Err(Invalid(format!(
                "step {text:?}: expected \"shadow\" or a percentage 1-100 such as \"25%\""
            ))),
        }
    }
}

/// What to do when a custom gate fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFail {
    /// Back to legacy, now.
    Rollback,
    /// Stay at the step.
    Hold,
}

/// A gate written as SQL against the collector's ClickHouse tables: one row with a
/// numeric column `value`, which must lie within `min`/`max`.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlGate {
    /// Shown in verdicts.
    pub name: String,
    /// The query, with the dashboards' macros (`$__timeFilter(col)` is the step's window,
    /// `'${route}'` the route, `${database}` the collector's database).
    pub sql: String,
    /// Lowest acceptable value.
    pub min: Option<f64>,
    /// Highest acceptable value.
    pub max: Option<f64>,
    /// Failing means rollback (default) or hold.
    pub on_fail: OnFail,
}

/// Default minimum time at each step.
pub const DEFAULT_MIN_STEP_S: u64 = 300;
/// Default minimum number of the new side's requests (served or shadow) per step.
pub const DEFAULT_MIN_REQUESTS: u64 = 500;
/// A step that cannot decide in a day stops the rollout (held, not promoted).
pub const DEFAULT_MAX_STEP_S: u64 = 86_400;
/// How often the evidence is read.
pub const DEFAULT_INTERVAL_S: u64 = 30;
/// Requests in flight at a flip belong to the old state: the window starts after this.
pub const DEFAULT_SETTLE_MS: u64 = 5_000;
/// The new side's error rate may exceed legacy's by this much (absolute).
pub const DEFAULT_MAX_ERROR_RATE_INCREASE: f64 = 0.01;
/// The new side's p99 may be this many times legacy's …
pub const DEFAULT_MAX_P99_RATIO: f64 = 1.2;
/// … plus this many milliseconds (so sub-millisecond jitter never rolls back).
pub const DEFAULT_P99_SLACK_MS: f64 = 10.0;
/// Shadow pairs that must match.
pub const DEFAULT_MIN_MATCH_RATE: f64 = 0.99;
/// Confidence of the intervals the rate gates use.
pub const DEFAULT_CONFIDENCE: f64 = 0.95;

/// A validated plan.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutPlan {
    /// Steps in order; the last one is where the rollout ends.
    pub steps: Vec<Step>,
    /// Minimum time at each step.
    pub min_step: Duration,
    /// Minimum requests the new side handled (served or shadow copies) per step.
    pub min_requests: u64,
    /// After this long without a decision the rollout stops, holding.
    pub max_step: Duration,
    /// Evaluation interval.
    pub interval: Duration,
    /// Wait after a flip before counting evidence.
    pub settle: Duration,
    /// Allowed absolute increase of the error rate, new over legacy.
    pub max_error_rate_increase: f64,
    /// Allowed p99 ratio, new over legacy.
    pub max_p99_ratio: f64,
    /// Milliseconds added to the p99 allowance.
    pub p99_slack_ms: f64,
    /// Required share of matching shadow pairs.
    pub min_match_rate: f64,
    /// Confidence level of rate intervals (0.80, 0.90, 0.95, 0.98, 0.99 or 0.999).
    pub confidence: f64,
    /// Custom gates.
    pub gates: Vec<SqlGate>,
}

impl RolloutPlan {
    /// The two-sided normal quantile for the plan's confidence.
    pub fn z(&self) -> f64 {
        z_for(self.confidence).unwrap_or(1.959_964)
    }
}

fn z_for(confidence: f64) -> Option<f64> {
    [
        (0.80, 1.281_552),
        (0.90, 1.644_854),
        (0.95, 1.959_964),
        (0.98, 2.326_348),
        (0.99, 2.575_829),
        (0.999, 3.290_527),
    ]
    .iter()
    .find(|(c, _)| (c - confidence).abs() < 1e-9)
    .map(|(_, z)| *z)
}

/// `[route.rollout]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    steps: Vec<String>,
    min_step_s: Option<u64>,
    min_requests: Option<u64>,
    max_step_s: Option<u64>,
    interval_s: Option<f64>,
    settle_ms: Option<u64>,
    max_error_rate_increase: Option<f64>,
    max_p99_ratio: Option<f64>,
    p99_slack_ms: Option<f64>,
    min_match_rate: Option<f64>,
    confidence: Option<f64>,
    #[serde(default)]
    gate: Vec<RawGate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    name: String,
    sql: String,
    min: Option<f64>,
    max: Option<f64>,
    on_fail: Option<String>,
}

fn fraction(name: &str, v: Option<f64>, default: f64) -> Result<f64, Invalid> {
    let v = v.unwrap_or(default);
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(Invalid(format!(
            "rollout.{name} = {v}: expected a fraction 0-1"
        )))
    }
}

impl RawRollout {
    /// Validates the plan.
    pub fn build(self) -> Result<RolloutPlan, Invalid> {
        if self.steps.is_empty() {
            return Err(Invalid(
                "rollout.steps is empty: list e.g. [\"shadow\", \"25%\", \"100%\"]".into(),
            ));
        }
        let steps = self
            .steps
            .iter()
            .map(|s| Step::parse(s).map_err(|e| e.context("rollout.steps")))
            .collect::<Result<Vec<_>, _>>()?;
        let rank = |s: &Step| match s {
            Step::Shadow => 0u16,
            Step::Percent(p) => 1 + u16::from(*p),
        };
        if steps.windows(2).any(|w| rank(&w[1]) <= rank(&w[0])) {
            return Err(Invalid(format!(
                "rollout.steps must only move forward (shadow first, then rising percentages): {:?}",
                self.steps
            )));
        }
        let confidence = self.confidence.unwrap_or(DEFAULT_CONFIDENCE);
        if z_for(confidence).is_none() {
            return Err(Invalid(format!(
                "rollout.confidence = {confidence}: one of 0.80, 0.90, 0.95, 0.98, 0.99, 0.999"
            )));
        }
        let ratio = self.max_p99_ratio.unwrap_or(DEFAULT_MAX_P99_RATIO);
        if !(ratio >= 1.0 && ratio.is_finite()) {
            return Err(Invalid(format!(
                "rollout.max_p99_ratio = {ratio}: must be at least 1"
            )));
        }
        let slack = self.p99_slack_ms.unwrap_or(DEFAULT_P99_SLACK_MS);
        if !(slack >= 0.0 && slack.is_finite()) {
            return Err(Invalid(format!(
                "rollout.p99_slack_ms = {slack}: must be 0 or more"
            )));
        }
        let interval = self.interval_s.unwrap_or(DEFAULT_INTERVAL_S as f64);
        if !(0.1..=3_600.0).contains(&interval) {
            return Err(Invalid(format!(
                "rollout.interval_s = {interval}: 0.1 to 3600"
            )));
        }
        let mut gates = Vec::new();
        for g in self.gate {
            let ctx = |m: String| Invalid(format!("rollout.gate {:?}: {m}", g.name));
            if g.min.is_none() && g.max.is_none() {
                return Err(ctx("set min, max or both".into()));
            }
            if g.sql.trim().is_empty() {
                return Err(ctx("sql is empty".into()));
            }
            let on_fail = match g.on_fail.as_deref().unwrap_or("rollback") {
                "rollback" => OnFail::Rollback,
                "hold" => OnFail::Hold,
                other => {
                    return Err(ctx(format!(
                        "on_fail = {other:?}: \"rollback\" or \"hold\""
                    )));
                }
            };
            gates.push(SqlGate {
                name: g.name,
                sql: g.sql,
                min: g.min,
                max: g.max,
                on_fail,
            });
        }
        let min_step = self.min_step_s.unwrap_or(DEFAULT_MIN_STEP_S);
        let max_step = self.max_step_s.unwrap_or(DEFAULT_MAX_STEP_S);
        if max_step < min_step {
            return Err(Invalid(format!(
                "rollout.max_step_s ({max_step}) is shorter than min_step_s ({min_step})"
            )));
        }
        Ok(RolloutPlan {
            steps,
            min_step: Duration::from_secs(min_step),
            min_requests: self.min_requests.unwrap_or(DEFAULT_MIN_REQUESTS),
            max_step: Duration::from_secs(max_step),
            interval: Duration::from_secs_f64(interval),
            settle: Duration::from_millis(self.settle_ms.unwrap_or(DEFAULT_SETTLE_MS)),
            max_error_rate_increase: fraction(
                "max_error_rate_increase",
                self.max_error_rate_increase,
                DEFAULT_MAX_ERROR_RATE_INCREASE,
            )?,
            max_p99_ratio: ratio,
            p99_slack_ms: slack,
            min_match_rate: fraction(
                "min_match_rate",
                self.min_match_rate,
                DEFAULT_MIN_MATCH_RATE,
            )?,
            confidence,
            gates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Result<RolloutPlan, String> {
        toml::from_str::<RawRollout>(text)
            .map_err(|e| e.to_string())?
            .build()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_plan_parses_with_defaults_and_gates() {
        let p = plan(
            "steps = [\"shadow\", \"5%\", \"25\", \"100%\"]\n[[gate]]\nname = \"409s\"\nsql = \"SELECT 0 AS value\"\nmax = 0.02\n",
        )
        .expect("valid");
        assert_eq!(
            p.steps,
            vec![
                Step::Shadow,
                Step::Percent(5),
                Step::Percent(25),
                Step::Percent(100)
            ]
        );
        assert_eq!(p.min_requests, DEFAULT_MIN_REQUESTS);
        assert_eq!(p.gates[0].on_fail, OnFail::Rollback);
        assert!((p.z() - 1.96).abs() < 0.001);
    }

    #[test]
    fn bad_plans_are_refused_with_the_reason() {
        for (text, want) in [
            ("steps = []", "empty"),
            ("steps = [\"25%\", \"5%\"]", "only move forward"),
            ("steps = [\"5%\", \"shadow\"]", "only move forward"),
            ("steps = [\"150%\"]", "percentage 1-100"),
            ("steps = [\"half\"]", "percentage 1-100"),
            ("steps = [\"5%\"]\nmin_match_rate = 1.5", "fraction"),
            ("steps = [\"5%\"]\nconfidence = 0.97", "one of"),
            ("steps = [\"5%\"]\nmax_p99_ratio = 0.5", "at least 1"),
            (
                "steps = [\"5%\"]\n[[gate]]\nname = \"g\"\nsql = \"SELECT 1\"",
                "min, max",
            ),
            (
                "steps = [\"5%\"]\nmin_step_s = 100\nmax_step_s = 10",
                "shorter",
            ),
        ] {
            let e = plan(text).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
