//! Conflicts: a row changed on both sides within the lag window. A stream notices
//! one when the target row is no longer what the change's *before* image says it
//! was (the target was written locally since the last sync), and resolves it by the
//! mapping's policy. Every conflict is counted and logged with the key and both
//! versions. Here: the policies; settling is in [`crate::sink::settle`].

use std::sync::Arc;

use strangler_model::{History, HistoryError, Invalid, Location, State};

/// How a mapping resolves a conflict.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Policy {
    /// No detection: the incoming change is applied (the default).
    #[default]
    Off,
    /// The incoming change wins.
    Source,
    /// The target's row stays.
    Target,
    /// The version with the later value in this target column wins (ties: incoming).
    Newer(String),
    /// The side that owns the route wins, from the route's lifecycle state.
    Owner(Arc<Owner>),
    /// The stream stops and reports.
    Stop,
}

/// Which side owns a route, from `strangler route` history.
#[derive(Debug)]
pub struct Owner {
    /// The route.
    pub route: String,
    /// Where the routers' operators keep the route history (`[control] history`).
    pub location: Location,
    /// Whether this stream's source is the legacy database.
    pub legacy_is_source: bool,
    /// The history, its database connection kept between conflicts.
    history: History,
}

impl PartialEq for Owner {
    fn eq(&self, other: &Self) -> bool {
        (&self.route, &self.location, self.legacy_is_source)
            == (&other.route, &other.location, other.legacy_is_source)
    }
}

impl Eq for Owner {}

/// Which version wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winner {
    /// The incoming change.
    Source,
    /// The target's row.
    Target,
}

impl Policy {
    /// Parses `source`, `target`, `stop`, `owner` or `newer:<column>`.
    pub fn parse(text: &str, owner: Option<&Arc<Owner>>) -> Result<Self, Invalid> {
        Ok(match text.trim() {
            "off" | "" => Self::Off,
            "source" => Self::Source,
            "target" => Self::Target,
            "stop" => Self::Stop,
            "owner" => Self::Owner(Arc::clone(owner.ok_or(Invalid::from(
                "conflict = \"owner\" needs a [conflicts] section with route and history_file",
            ))?)),
            other => match other.strip_prefix("newer:") {
                Some(col) if !col.trim().is_empty() => Self::Newer(col.trim().to_string()),
                _ => {
                    return Err(Invalid(format!(
                        "conflict = {other:?}: expected \"source\", \"target\", \"stop\", \"owner\" or \"newer:<column>\""
                    )));
                }
            },
        })
    }

    /// Whether conflicts are looked for at all.
    pub fn detects(&self) -> bool {
        *self != Self::Off
    }
}

impl Owner {
    /// The policy for `route`, reading the history at `location`.
    pub fn new(route: String, location: Location, legacy_is_source: bool) -> Self {
        Self {
            history: History::new(&location),
            route,
            location,
            legacy_is_source,
        }
    }

    /// The side that owns the route now: legacy until the route serves at least half
    /// of its users from the new service (canary ≥ 50 %, new, retired). Read at each
    /// conflict (conflicts are rare; a stale owner would settle one wrongly).
    pub async fn winner(&self) -> Result<Winner, HistoryError> {
        let new_owns = self
            .history
            .last_state(&self.route)
            .await?
            .is_some_and(State::new_owns);
        Ok(if new_owns != self.legacy_is_source {
            Winner::Source
        } else {
            Winner::Target
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strangler_model::{History, State};

    #[test]
    fn policies_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(Policy::parse("stop", None), Ok(Policy::Stop));
        assert_eq!(
            Policy::parse("newer:updated_at", None),
            Ok(Policy::Newer("updated_at".into()))
        );
        assert!(Policy::parse("owner", None).is_err());
        assert!(
            Policy::parse("newest", None)
                .expect_err("refused")
                .to_string()
                .contains("newer:<column>")
        );
    }

    /// The history is written by the CLI (`strangler route …`) through
    /// `strangler_model::History`; the policy reads it back through the same type.
    #[tokio::test]
    async fn the_owner_follows_the_routes_last_state_in_the_history_the_cli_writes() {
        use strangler_model::{Entry, Percent};
        let dir = tempfile::tempdir().expect("tempdir");
        let history_file = dir.path().join("h.jsonl");
        let owner = Owner::new("orders".into(), Location::File(history_file.clone()), true);
        assert_eq!(
            owner.winner().await.ok(),
            Some(Winner::Source),
            "no history: legacy owns"
        );
        let history = History::file(&history_file);
        let write = async |route: &str, from: State, to: State| {
            history
                .append(&Entry::now("alice", route, from, to, "test"))
                .await
                .expect("append");
        };
        let canary = |p: u8| State::Canary {
            percent: Percent::try_from(p).expect("percent"),
        };
        write("orders", State::Shadow, canary(25)).await;
        write("other", State::Legacy, State::New).await;
        assert_eq!(
            owner.winner().await.ok(),
            Some(Winner::Source),
            "25 %: legacy owns"
        );
        write("orders", canary(25), canary(50)).await;
        assert_eq!(
            owner.winner().await.ok(),
            Some(Winner::Target),
            "half the users on new: new owns, the target (new) wins"
        );
        write("orders", canary(50), State::Legacy).await;
        assert_eq!(
            owner.winner().await.ok(),
            Some(Winner::Source),
            "the last entry counts (rolled back)"
        );
        std::fs::write(&history_file, "{\"route\":\"orders\"}\n").expect("write");
        assert!(
            owner.winner().await.is_err(),
            "a line that is not an entry is an error, not a silent legacy"
        );
    }
}
