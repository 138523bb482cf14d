//! Route control: moving routes along their lifecycle through the flag store and the
//! routers' admin APIs, and recording every move.

pub mod announce;
pub mod flagstore;
pub mod routers;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;
use strangler_router::RouterConfig;
use strangler_router::config::{FlagsConfig, RouteConfig};

use flagstore::{FlagSnapshot, FlagStore, FlagsFile, UnleashAdmin};
pub use strangler_model::{history, lifecycle};

use history::{Entry, History};
use lifecycle::State;
use routers::{Fleet, RouterReply};

/// What can go wrong operating routes.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The route is not in the config.
    #[error("no route named {name:?} in the config (routes: {known})")]
    UnknownRoute {
        /// Asked for.
        name: String,
        /// What exists.
        known: String,
    },
    /// Unleash refused the admin token.
    #[error(
        "Unleash at {url} rejected the admin token (HTTP {status}); check the admin token env var"
    )]
    UnleashAuth {
        /// Unleash base URL.
        url: String,
        /// 401 or 403.
        status: u16,
    },
    /// Unleash failed or was unreachable.
    #[error("Unleash at {url}: {message}")]
    Unleash {
        /// Unleash base URL.
        url: String,
        /// What happened.
        message: String,
    },
    /// The admin token for Unleash is not set.
    #[error("the Unleash admin token env var {env} is not set")]
    MissingUnleashToken {
        /// The env var.
        env: String,
    },
    /// No Unleash admin URL could be worked out.
    #[error("flags come from Unleash but no admin URL is known; set control.unleash_admin_url")]
    NoUnleashUrl,
    /// The flags file could not be read or written.
    #[error("flags file {path}: {message}")]
    FlagsFile {
        /// The file.
        path: PathBuf,
        /// What happened.
        message: String,
    },
    /// The history file could not be read or written.
    #[error(transparent)]
    History(#[from] strangler_model::HistoryError),
    /// The config names a credential that cannot be read.
    #[error(transparent)]
    Config(#[from] strangler_router::config::ConfigError),
    /// The route is no longer in the state the move was decided from.
    #[error(
        "{route} moved from {expected} to {now} since this command read it (another operator or a rollout?); nothing changed — look again (`strangler route status {route}`)"
    )]
    Moved {
        /// The route.
        route: String,
        /// What the move expected.
        expected: State,
        /// What it is now.
        now: State,
    },
    /// Another forward move of the route held its lock for the whole timeout.
    #[error("another move of {route} is still in progress; try again")]
    Busy {
        /// The route.
        route: String,
    },
    /// A rollback was recorded while this forward move ran: it wins.
    #[error(
        "a rollback of {route} was recorded while this move ran: the route stays on legacy (this move's flag and override changes were undone)"
    )]
    RolledBackMeanwhile {
        /// The route.
        route: String,
    },
    /// The history has no such entry for this route.
    #[error("route {route} has no history entry #{number} (see `strangler route history {route}`)")]
    NoSuchEntry {
        /// The route.
        route: String,
        /// The entry asked for.
        number: usize,
    },
}

/// The result of a lifecycle move.
#[derive(Debug, Serialize)]
pub struct Outcome {
    /// The route.
    pub route: String,
    /// Before.
    pub from: State,
    /// After.
    pub to: State,
    /// The flag store's result (`None` when it was not touched).
    pub flags: Option<Result<(), String>>,
    /// Each router's confirmation.
    pub routers: Vec<RouterOutcome>,
    /// Milliseconds from start until every part answered.
    pub took_ms: u64,
}

/// One router's part in an outcome.
#[derive(Debug, Serialize)]
pub struct RouterOutcome {
    /// Admin URL.
    pub router: String,
    /// Confirmed.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Milliseconds to confirm.
    pub took_ms: u64,
}

impl Outcome {
    /// Every part confirmed.
    pub fn complete(&self) -> bool {
        self.flags.as_ref().is_none_or(Result::is_ok) && self.routers.iter().all(|r| r.ok)
    }
}

fn router_outcomes(replies: Vec<RouterReply>) -> Vec<RouterOutcome> {
    replies
        .into_iter()
        .map(|r| RouterOutcome {
            router: r.url,
            ok: r.result.is_ok(),
            error: r.result.err(),
            took_ms: u64::try_from(r.took.as_millis()).unwrap_or(u64::MAX),
        })
        .collect()
}

/// A route as `route list` / `status` show it.
#[derive(Debug, Serialize)]
pub struct RouteView {
    /// Name.
    pub name: String,
    /// Matcher as written.
    pub path: String,
    /// Lifecycle state.
    pub state: String,
    /// The toggle.
    pub flag: String,
    /// The toggle in the flag store (`None` when the store could not be read).
    pub toggle: Option<FlagSnapshot>,
    /// Why the store could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub toggle_error: Option<String>,
    /// Per router: its override and last-minute numbers.
    pub routers: Vec<RouterView>,
}

/// One router's view of a route.
#[derive(Debug, Serialize)]
pub struct RouterView {
    /// Admin URL.
    pub router: String,
    /// Its override, or its error.
    #[serde(rename = "override")]
    pub override_backend: Option<String>,
    /// Requests to legacy in the last minute.
    pub legacy_requests: u64,
    /// Requests to new in the last minute.
    pub new_requests: u64,
    /// Errors (both sides) in the last minute.
    pub errors: u64,
    /// Why there are no numbers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Operates the routes of one config.
pub struct Controller {
    config: RouterConfig,
    store: Box<dyn FlagStore>,
    fleet: Fleet,
    history: History,
    actor: String,
}

/// Who is acting: `--actor`, else the OS user.
pub fn default_actor() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::Uid::current())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| "unknown".into())
}

impl Controller {
    /// A controller for the routes, flag store and routers `config` names.
    pub fn new(config: RouterConfig, actor: Option<String>) -> Result<Self, ControlError> {
        let control = &config.control;
        let store: Box<dyn FlagStore> = match &config.flags {
            FlagsConfig::File { path } => Box::new(FlagsFile::new(path)),
            FlagsConfig::Unleash { .. } => {
                let url = control
                    .unleash_admin_url
                    .clone()
                    .ok_or(ControlError::NoUnleashUrl)?;
                let token = std::env::var(&control.unleash_admin_token_env)
                    .ok()
                    .filter(|t| !t.trim().is_empty())
                    .ok_or_else(|| ControlError::MissingUnleashToken {
                        env: control.unleash_admin_token_env.clone(),
                    })?;
                Box::new(UnleashAdmin::new(
                    &url,
                    &token,
                    &control.project,
                    &control.environment,
                    control.timeout,
                )?)
            }
        };
        let secrets = strangler_router::config::Secrets::read(&config)?;
        let fleet = Fleet::new(
            control.routers.clone(),
            secrets.admin_token.as_ref().map(|t| t.expose().to_string()),
            control.timeout,
        );
        let history = History::new(&control.history);
        Ok(Self {
            store,
            fleet,
            history,
            actor: actor.unwrap_or_else(default_actor),
            config,
        })
    }

    /// Who acts: `--actor`, else the OS user.
    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// The configuration the controller works from.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// The route named `name`.
    pub fn route(&self, name: &str) -> Result<&RouteConfig, ControlError> {
        self.config
            .routes
            .iter()
            .find(|r| r.name.as_str() == name)
            .ok_or_else(|| ControlError::UnknownRoute {
                name: name.to_string(),
                known: self
                    .config
                    .routes
                    .iter()
                    .map(|r| r.name.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Route names in config order.
    pub fn route_names(&self) -> Vec<String> {
        self.config
            .routes
            .iter()
            .map(|r| r.name.to_string())
            .collect()
    }

    /// The routers.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The flag store's description.
    pub fn store_description(&self) -> String {
        self.store.describe()
    }

    fn shadow_flag(route: &RouteConfig) -> String {
        format!("{}.shadow", route.flag)
    }

    /// The route's lifecycle state: the last recorded one, or what the flags imply.
    pub async fn current_state(&self, route: &RouteConfig) -> Result<State, ControlError> {
        if let Some(state) = self.history.last_state(route.name.as_str()).await? {
            return Ok(state);
        }
        let main = self.store.get(&route.flag).await?;
        let shadow = self.store.get(&Self::shadow_flag(route)).await?;
        Ok(State::from_flags(
            main.enabled,
            main.rollout,
            shadow.enabled,
        ))
    }

    async fn apply_flags(&self, route: &RouteConfig, to: State) -> Result<(), ControlError> {
        let target = to.flags();
        self.store
            .set(&route.flag, target.enabled, target.rollout)
            .await?;
        if let Some(shadow) = target.shadow {
            let flag = Self::shadow_flag(route);
            // Turning off a shadow toggle that was never created is a no-op.
            if shadow || self.store.get(&flag).await?.exists {
                self.store
                    .set(&flag, shadow, Some(lifecycle::Percent::ALL))
                    .await?;
            }
        }
        Ok(())
    }

    /// Moves `route` to `to`, refused (nothing changed) unless the route is still in
    /// `expected`, the state the caller decided the move from. Toward legacy, the
    /// flags and every router's override change in parallel and the call returns
    /// when all confirmed or timed out; forward, the flags change first and then the
    /// routers' overrides are cleared so the flag rules. Forward moves of a route run
    /// one at a time (a lock beside the history); a rollback takes no lock and waits
    /// for nothing.
    pub async fn transition_expecting(
        &self,
        route_name: &str,
        to: State,
        action: &str,
        reason: Option<String>,
        expected: Option<State>,
    ) -> Result<Outcome, ControlError> {
        self.move_route(route_name, to, action, reason, None, expected)
            .await
    }

    /// [`Controller::transition_expecting`] without an expected state, recording the
    /// numbers the change was decided on (the rollout controller, which holds the
    /// route's lease).
    pub async fn transition_with_evidence(
        &self,
        route_name: &str,
        to: State,
        action: &str,
        reason: Option<String>,
        evidence: Option<serde_json::Value>,
    ) -> Result<Outcome, ControlError> {
        self.move_route(route_name, to, action, reason, evidence, None)
            .await
    }

    /// Undoes a forward move's writes: the flags to legacy and every router's
    /// override to legacy, as a rollback does (best effort: the rollback that
    /// called for it already did the same).
    async fn reassert_legacy(&self, route: &RouteConfig, route_name: &str) {
        let (flags, _) = tokio::join!(
            self.apply_flags(route, State::Legacy),
            self.fleet.set_override(route_name, "legacy")
        );
        if let Err(e) = flags {
            eprintln!("warning: re-applying the rollback of {route_name} to the flags: {e}");
        }
    }

    async fn move_route(
        &self,
        route_name: &str,
        to: State,
        action: &str,
        reason: Option<String>,
        evidence: Option<serde_json::Value>,
        expected: Option<State>,
    ) -> Result<Outcome, ControlError> {
        let started = Instant::now();
        let route = self.route(route_name)?;
        let forward = to != State::Legacy;
        let _lock = if forward {
            let wait = self.config.control.timeout * 5;
            match self.history.move_lock(route_name, wait).await? {
                Some(lock) => Some(lock),
                None => {
                    return Err(ControlError::Busy {
                        route: route_name.to_string(),
                    });
                }
            }
        } else {
            None
        };
        // The routers' override versions, read before the history: an override a
        // rollback sets after this is never cleared by this move (its clear is
        // conditional on these versions).
        let versions = if forward {
            self.fleet.override_versions(route_name).await
        } else {
            HashMap::new()
        };
        // What the history held before this move wrote anything.
        let recorded = self.history.for_route(route_name).await?;
        let seen = recorded.len();
        // The last recorded state, else what the flags imply; a rollback must not
        // wait on (or fail with) a store that may be down.
        let from = match recorded.last() {
            Some(e) => e.to,
            None if forward => self.current_state(route).await?,
            None => self.current_state(route).await.unwrap_or(State::Legacy),
        };
        if forward
            && let Some(expected) = expected
            && from != expected
        {
            return Err(ControlError::Moved {
                route: route_name.to_string(),
                expected,
                now: from,
            });
        }
        let (flags, replies) = if to == State::Legacy {
            let (flags, replies) = tokio::join!(
                self.apply_flags(route, to),
                self.fleet.set_override(route_name, "legacy")
            );
            (flags, replies)
        } else {
            self.apply_flags(route, to).await?;
            (Ok(()), Vec::new())
        };
        let mut routers = router_outcomes(replies);
        let took_effect = flags.is_ok() || routers.iter().any(|r| r.ok);
        // The change took effect here; recording and announcing it is not part of its time.
        let mut took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if took_effect {
            let entry = Entry {
                reason,
                evidence,
                ..Entry::now(&self.actor, route_name, from, to, action)
            };
            // A rollback always wins. Checked and written under the history's lock,
            // so of a forward move and a rollback running at once, whichever records
            // second sees the other: a forward move that finds a rollback recorded
            // since it began undoes its writes and records nothing; a rollback that
            // finds a forward move recorded since it began applies itself again
            // (after that move's writes, which precede its record).
            let (appended, entries) = self
                .history
                .append_if(&entry, |entries| {
                    !(forward && entries.iter().skip(seen).any(|e| e.to == State::Legacy))
                })
                .await?;
            if !appended {
                self.reassert_legacy(route, route_name).await;
                return Err(ControlError::RolledBackMeanwhile {
                    route: route_name.to_string(),
                });
            }
            // A forward move lifts the routers' overrides only now, recorded with no
            // rollback since it began, and on each router only if no rollback set
            // one since it read its version: until then a rollback's override holds,
            // so nothing is served by the new side after a rollback returned.
            if forward {
                routers =
                    router_outcomes(self.fleet.clear_override_if(route_name, &versions).await);
                took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            }
            if !forward && entries.iter().skip(seen).any(|e| e.to != State::Legacy) {
                self.reassert_legacy(route, route_name).await;
            }
            if let Some(endpoint) = &self.config.telemetry.otlp_endpoint
                && let Err(e) = announce::send(
                    endpoint,
                    &entry,
                    &self.config.telemetry.service_name,
                    self.config.control.timeout,
                )
                .await
            {
                eprintln!(
                    "warning: the change is in the history, but the collector at {endpoint} did not take it ({e}); dashboards will not mark it"
                );
            }
        } else if let Err(e) = flags {
            return Err(e);
        }
        Ok(Outcome {
            route: route_name.to_string(),
            from,
            to,
            flags: Some(flags.map_err(|e| e.to_string())),
            routers,
            took_ms,
        })
    }

    /// The state recorded in history entry `number` of `route`.
    pub async fn recorded_state(&self, route: &str, number: usize) -> Result<State, ControlError> {
        self.history
            .for_route(route)
            .await?
            .into_iter()
            .find(|e| e.number == number)
            .map(|e| e.to)
            .ok_or_else(|| ControlError::NoSuchEntry {
                route: route.to_string(),
                number,
            })
    }

    /// Every route (or one) with its state, toggle and each router's view.
    pub async fn views(&self, only: Option<&str>) -> Result<Vec<RouteView>, ControlError> {
        let routes: Vec<&RouteConfig> = match only {
            Some(name) => vec![self.route(name)?],
            None => self.config.routes.iter().collect(),
        };
        let replies = self.fleet.routes().await;
        let mut views = Vec::with_capacity(routes.len());
        for route in routes {
            let (toggle, toggle_error) = match self.store.get(&route.flag).await {
                Ok(t) => (Some(t), None),
                Err(e) => (None, Some(e.to_string())),
            };
            let state = match self.history.last_state(route.name.as_str()).await? {
                Some(s) => s.to_string(),
                None => match &toggle {
                    Some(t) => {
                        let shadow = self
                            .store
                            .get(&Self::shadow_flag(route))
                            .await
                            .is_ok_and(|s| s.enabled);
                        State::from_flags(t.enabled, t.rollout, shadow).to_string()
                    }
                    None => "unknown".into(),
                },
            };
            let routers = replies
                .iter()
                .map(|reply| match &reply.result {
                    Ok(doc) => {
                        let view = doc["routes"]
                            .as_array()
                            .and_then(|rs| rs.iter().find(|r| r["name"] == route.name.as_str()));
                        let n = |v: Option<&Value>, side: &str, key: &str| {
                            v.and_then(|v| v[side][key].as_u64()).unwrap_or(0)
                        };
                        RouterView {
                            router: reply.url.clone(),
                            override_backend: view
                                .and_then(|v| v["override"].as_str().map(str::to_string)),
                            legacy_requests: n(view, "legacy", "requests"),
                            new_requests: n(view, "new", "requests"),
                            errors: n(view, "legacy", "errors") + n(view, "new", "errors"),
                            error: view
                                .is_none()
                                .then(|| "router does not know this route".to_string()),
                        }
                    }
                    Err(e) => RouterView {
                        router: reply.url.clone(),
                        override_backend: None,
                        legacy_requests: 0,
                        new_requests: 0,
                        errors: 0,
                        error: Some(e.clone()),
                    },
                })
                .collect();
            views.push(RouteView {
                name: route.name.to_string(),
                path: route.path_text.clone(),
                state,
                flag: route.flag.clone(),
                toggle,
                toggle_error,
                routers,
            });
        }
        Ok(views)
    }
}
