//! Route lifecycle: `legacy → shadow → canary N% → new → retired`, and rollback.
//! The CLI moves routes along it; CDC reads it to know which side owns the data.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config_error::Invalid;

/// A rollout percentage, 0 to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Percent(u8);

impl Percent {
    /// Everyone.
    pub const ALL: Percent = Percent(100);

    /// The value.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl TryFrom<u8> for Percent {
    type Error = Invalid;
    fn try_from(v: u8) -> Result<Self, Invalid> {
        if v <= 100 {
            Ok(Self(v))
        } else {
            Err(Invalid(format!("{v} is not a percentage (0-100)")))
        }
    }
}

impl From<Percent> for u8 {
    fn from(p: Percent) -> u8 {
        p.0
    }
}

impl std::str::FromStr for Percent {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        let n: u8 = s
            .trim_end_matches('%')
            .parse()
            .map_err(|_| Invalid(format!("{s:?} is not a percentage (0-100)")))?;
        Self::try_from(n)
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

/// Where a route is in its migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum State {
    /// Legacy serves everything.
    Legacy,
    /// Legacy serves; the new service gets shadow copies.
    Shadow,
    /// The new service serves `percent` of sticky keys.
    Canary {
        /// The rollout.
        percent: Percent,
    },
    /// The new service serves everything.
    New,
    /// The new service serves everything and the legacy path is unused.
    Retired,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Legacy => f.write_str("legacy"),
            Self::Shadow => f.write_str("shadow"),
            Self::Canary { percent } => write!(f, "canary {percent}"),
            Self::New => f.write_str("new"),
            Self::Retired => f.write_str("retired"),
        }
    }
}

/// What the flags must say for a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlagTarget {
    /// The route's toggle is on.
    pub enabled: bool,
    /// Its flexibleRollout percentage (`None`: leave as is).
    pub rollout: Option<Percent>,
    /// The shadow toggle (`<flag>.shadow`) is on.
    pub shadow: Option<bool>,
}

impl State {
    /// Position on the way from legacy to retired.
    pub fn rank(self) -> u8 {
        match self {
            Self::Legacy => 0,
            Self::Shadow => 1,
            Self::Canary { .. } => 2,
            Self::New => 3,
            Self::Retired => 4,
        }
    }

    /// The flag settings that realise this state.
    pub fn flags(self) -> FlagTarget {
        match self {
            // The rollout is left alone so a later canary can see where it was.
            Self::Legacy => FlagTarget {
                enabled: false,
                rollout: None,
                shadow: Some(false),
            },
            Self::Shadow => FlagTarget {
                enabled: false,
                rollout: None,
                shadow: Some(true),
            },
            Self::Canary { percent } => FlagTarget {
                enabled: true,
                rollout: Some(percent),
                shadow: None,
            },
            Self::New | Self::Retired => FlagTarget {
                enabled: true,
                rollout: Some(Percent::ALL),
                shadow: None,
            },
        }
    }

    /// Whether the new service owns the route's data in this state: it serves at
    /// least half of the route's users (canary ≥ 50 %, new, retired). The CDC
    /// `owner` conflict policy lets the owner's version win.
    pub fn new_owns(self) -> bool {
        match self {
            Self::Legacy | Self::Shadow => false,
            Self::Canary { percent } => percent.get() >= 50,
            Self::New | Self::Retired => true,
        }
    }

    /// Whether moving from `self` to `to` skips a stage and so deserves a confirmation.
    /// Going back (toward legacy) never asks.
    pub fn skips_a_stage_to(self, to: State) -> bool {
        to.rank() > self.rank() + 1
    }

    /// The state implied by flag settings alone, when there is no history.
    pub fn from_flags(enabled: bool, rollout: Option<u8>, shadow: bool) -> State {
        match (enabled, rollout) {
            (true, Some(100) | None) => Self::New,
            (true, Some(p)) if p > 0 => Self::Canary {
                percent: Percent(p),
            },
            _ if shadow => Self::Shadow,
            _ => Self::Legacy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_accepts_0_to_100_with_or_without_sign() {
        assert_eq!("10".parse::<Percent>().map(Percent::get).ok(), Some(10));
        assert_eq!("100%".parse::<Percent>().map(Percent::get).ok(), Some(100));
        assert!("101".parse::<Percent>().is_err());
        assert!("ten".parse::<Percent>().is_err());
    }

    #[test]
    fn skipping_stages_asks_but_steps_and_rollbacks_do_not() {
        let canary = |p| State::Canary {
            percent: Percent(p),
        };
        assert!(!State::Legacy.skips_a_stage_to(State::Shadow));
        assert!(!State::Shadow.skips_a_stage_to(canary(10)));
        assert!(!canary(10).skips_a_stage_to(canary(50)));
        assert!(!canary(50).skips_a_stage_to(State::New));
        assert!(!State::New.skips_a_stage_to(State::Retired));
        assert!(State::Legacy.skips_a_stage_to(canary(10)));
        assert!(State::Legacy.skips_a_stage_to(State::New));
        assert!(State::Shadow.skips_a_stage_to(State::New));
        assert!(!State::New.skips_a_stage_to(State::Legacy));
    }

    #[test]
    fn state_serialises_with_its_percentage() {
        let s = State::Canary {
            percent: Percent(25),
        };
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(json, r#"{"state":"canary","percent":25}"#);
        assert_eq!(serde_json::from_str::<State>(&json).expect("parse"), s);
        assert_eq!(s.to_string(), "canary 25%");
    }

    #[test]
    fn flags_imply_a_state_when_there_is_no_history() {
        assert_eq!(State::from_flags(false, Some(30), false), State::Legacy);
        assert_eq!(State::from_flags(false, Some(0), true), State::Shadow);
        assert_eq!(
            State::from_flags(true, Some(30), false),
            State::Canary {
                percent: Percent(30)
            }
        );
        assert_eq!(State::from_flags(true, Some(100), false), State::New);
        assert_eq!(State::from_flags(true, Some(0), false), State::Legacy);
    }
}
