//! Feature flags: where they come from ([`FlagSource`]) and how they are evaluated ([`FlagEngine`]).
//!
//! Evaluation uses Unleash's Yggdrasil engine, the one inside every Unleash SDK
//! (`unleash-api-client` included), so a user lands on the same side here as in an
//! application using an SDK with the same toggle and context. It is called directly
//! rather than through `unleash-api-client`, whose client takes a mutex around the
//! engine and counts every evaluation in a shared map: Yggdrasil's state is an
//! `ArcSwap` inside, so a request evaluates without a lock and without allocating.
//! Sources only deliver client-features documents; a source that fails leaves the
//! last good document in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use unleash_types::client_features::ClientFeatures;
use unleash_yggdrasil::state::{EnrichedContext, PropertiesRef};
use unleash_yggdrasil::{EngineState, UpdateMessage};

/// Why flags could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    /// The flags file could not be read.
    #[error("cannot read flags file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The document is not Unleash client-features JSON.
    #[error("{origin} is not an Unleash client-features document")]
    Parse {
        /// File path or URL.
        origin: String,
        /// Where and what (serde_json gives line and column).
        #[source]
        source: serde_json::Error,
    },
    /// Unleash could not be reached or answered with an error.
    #[error("Unleash at {url}: {message}")]
    Unleash {
        /// The features URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The engine could not be built.
    #[error("cannot set up the Unleash engine: {0}")]
    Engine(String),
}

/// An error and its causes on one line, `outer: inner: innermost`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl FlagError {
    /// Whether trying again later may help (network and I/O), as opposed to a bad document.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Parse { .. } | Self::Engine(_))
    }
}

/// A source of client-features documents.
///
/// Contract: `fetch` returns the whole current document, or `Ok(None)` when it is
/// known to be unchanged since the last successful fetch; `changed` resolves when a
/// new fetch is worth doing (a file event, a poll interval). Both are called from
/// one task, never concurrently.
#[async_trait]
pub trait FlagSource: Send + Sync {
    /// A short description for logs and the admin API, e.g. `file:/etc/flags.json`.
    fn describe(&self) -> String;
    /// Reads the current document.
    async fn fetch(&self) -> Result<Option<ClientFeatures>, FlagError>;
    /// Waits until the document may have changed.
    async fn changed(&self);
}

/// Parses a client-features JSON document.
pub fn parse_features(bytes: &[u8], origin: &str) -> Result<ClientFeatures, FlagError> {
    serde_json::from_slice(bytes).map_err(|source| FlagError::Parse {
        origin: origin.to_string(),
        source,
    })
}

/// Who a flag is evaluated for: the request's stickiness key in the Unleash context
/// field the route's stickiness names. Borrowed from the request, so free to build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagContext<'a> {
    /// `userId` (header stickiness, client IP).
    pub user_id: Option<&'a str>,
    /// `sessionId` (cookie stickiness).
    pub session_id: Option<&'a str>,
    /// `remoteAddress` (client IP stickiness), as the SDK prints a parsed address.
    pub remote_address: Option<String>,
}

/// What the engine decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagDecision {
    /// The toggle exists in the current document.
    pub known: bool,
    /// The toggle is on for this context.
    pub enabled: bool,
    /// The variant, when the toggle has variants.
    pub variant: Option<String>,
}

/// A toggle's state as the admin API reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FlagState {
    /// Exists in the current document.
    pub known: bool,
    /// Enabled in the environment.
    pub enabled: bool,
    /// The flexibleRollout percentage, when there is one.
    pub rollout_percent: Option<u8>,
}

/// How fresh the flags are.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Freshness {
    /// The source description.
    pub source: String,
    /// Milliseconds since the last successful read, `None` before the first.
    pub last_success_age_ms: Option<u64>,
    /// The last error, cleared by a success.
    pub last_error: Option<String>,
    /// Toggles in the current document.
    pub toggles: usize,
}

/// Evaluates toggles against the last good document.
pub struct FlagEngine {
    engine: EngineState,
    document: ArcSwap<ClientFeatures>,
    source: String,
    status: Mutex<SourceStatus>,
}

#[derive(Debug, Default)]
struct SourceStatus {
    last_success: Option<Instant>,
    last_error: Option<String>,
}

impl std::fmt::Debug for FlagEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlagEngine")
            .field("source", &self.source)
            .finish()
    }
}

impl FlagEngine {
    /// An engine with no toggles yet: every flag evaluates to off.
    pub fn new(source: impl Into<String>) -> Result<Self, FlagError> {
        let empty = ClientFeatures {
            version: 2,
            features: vec![],
            segments: None,
            query: None,
            meta: None,
        };
        Ok(Self {
            engine: EngineState::default(),
            document: ArcSwap::from_pointee(empty),
            source: source.into(),
            status: Mutex::new(SourceStatus::default()),
        })
    }

    /// Installs a new document.
    pub fn apply(&self, features: ClientFeatures) -> Result<(), FlagError> {
        if let Some(warnings) = self
            .engine
            .take_state(UpdateMessage::FullResponse(features.clone()))
        {
            for w in warnings {
                tracing::warn!(toggle = w.toggle_name, "flag document: {}", w.message);
            }
        }
        self.document.store(Arc::new(features));
        self.mark_success();
        Ok(())
    }

    /// Records a successful read that found no change.
    pub fn mark_success(&self) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(err) = status.last_error.take() {
            tracing::info!(source = %self.source, "flag source recovered (was: {err})");
        }
        status.last_success = Some(Instant::now());
    }

    /// Records a failed read; the last good document stays in force.
    pub fn mark_error(&self, error: &FlagError) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let first = status.last_error.is_none();
        status.last_error = Some(error_chain(error));
        if first {
            let age = status
                .last_success
                .map(|t| format!("{:.1}s old", t.elapsed().as_secs_f64()))
                .unwrap_or_else(|| "none yet: every route stays on legacy".into());
            tracing::warn!(
                source = %self.source,
                "cannot read flags, keeping the last good state ({age}): {}",
                error_chain(error)
            );
        }
    }

    /// Evaluates `flag` for `context`.
    pub fn evaluate(&self, flag: &str, context: &FlagContext<'_>) -> FlagDecision {
        // The same context `unleash-api-client` hands the engine for a default
        // SDK context carrying these fields (empty environment, app name, properties).
        let no_properties = std::collections::HashMap::new();
        let enriched = EnrichedContext {
            user_id: context.user_id,
            session_id: context.session_id,
            environment: Some(""),
            app_name: Some(""),
            current_time: None,
            remote_address: context.remote_address.as_deref(),
            properties: Some(PropertiesRef::Strings(&no_properties)),
            external_results: None,
            toggle_name: flag,
            runtime_hostname: None,
        };
        let Some(enabled) = self.engine.check_enabled(&enriched) else {
            return FlagDecision {
                known: false,
                enabled: false,
                variant: None,
            };
        };
        let variant = if enabled {
            self.engine
                .check_variant(&enriched)
                .filter(|v| v.enabled && v.name != "disabled")
                .map(|v| v.name)
        } else {
            None
        };
        FlagDecision {
            known: true,
            enabled,
            variant,
        }
    }

    /// The toggle's configured state (not evaluated for anyone).
    pub fn state(&self, flag: &str) -> FlagState {
        let document = self.document.load();
        let Some(feature) = document.features.iter().find(|f| f.name == flag) else {
            return FlagState {
                known: false,
                enabled: false,
                rollout_percent: None,
            };
        };
        let rollout_percent = feature.strategies.iter().flatten().find_map(|s| {
            (s.name == "flexibleRollout")
                .then(|| s.parameters.as_ref()?.get("rollout")?.parse::<u8>().ok())
                .flatten()
        });
        FlagState {
            known: true,
            enabled: feature.enabled,
            rollout_percent,
        }
    }

    /// How fresh the document is.
    pub fn freshness(&self) -> Freshness {
        let status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        Freshness {
            source: self.source.clone(),
            last_success_age_ms: status
                .last_success
                .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
            last_error: status.last_error.clone(),
            toggles: self.document.load().features.len(),
        }
    }
}

/// Builds the Unleash context for a request from its stickiness key.
pub fn context_for<'a>(
    sticky: &crate::config::Stickiness,
    key: Option<&'a str>,
) -> FlagContext<'a> {
    use crate::config::Stickiness;
    let mut ctx = FlagContext::default();
    let Some(key) = key else {
        return ctx;
    };
    match sticky {
        Stickiness::Header(_) => ctx.user_id = Some(key),
        Stickiness::Cookie(_) => ctx.session_id = Some(key),
        Stickiness::ClientIp => {
            ctx.user_id = Some(key);
            ctx.remote_address = key
                .parse::<std::net::IpAddr>()
                .ok()
                .map(|ip| ip.to_string());
        }
    }
    ctx
}

/// Keeps `engine` up to date from `source` until the task is dropped.
pub async fn drive(source: Arc<dyn FlagSource>, engine: Arc<FlagEngine>) {
    loop {
        match source.fetch().await {
            Ok(Some(features)) => {
                let count = features.features.len();
                match engine.apply(features) {
                    Ok(()) => tracing::debug!(toggles = count, "flags updated"),
                    Err(e) => engine.mark_error(&e),
                }
            }
            Ok(None) => engine.mark_success(),
            Err(e) => engine.mark_error(&e),
        }
        source.changed().await;
    }
}

/// Flags from a file in Unleash's client-features format, re-read when it changes.
pub struct FileFlagSource {
    path: PathBuf,
    changed: Arc<tokio::sync::Notify>,
    _watcher: Option<notify::RecommendedWatcher>,
}

/// A file event may be missed (e.g. the directory was replaced); re-read at least this often.
const FILE_RESCAN: Duration = Duration::from_secs(5);

impl FileFlagSource {
    /// Watches `path` (through its directory, so atomic renames are seen).
    pub fn new(path: &Path) -> Self {
        let changed = Arc::new(tokio::sync::Notify::new());
        let notify_on = Arc::clone(&changed);
        let file_name = path.file_name().map(|n| n.to_os_string());
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Only writes, creations, renames and removals: our own reads of the file
            // raise access events, which must not trigger another read.
            if let Ok(event) = event
                && (event.kind.is_modify() || event.kind.is_create() || event.kind.is_remove())
                && event
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_os_string()) == file_name)
            {
                notify_on.notify_one();
            }
        });
        let watcher = match watcher {
            Ok(mut w) => {
                use notify::Watcher;
                let dir = path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                match w.watch(dir, notify::RecursiveMode::NonRecursive) {
                    Ok(()) => Some(w),
                    Err(e) => {
                        tracing::warn!(
                            "cannot watch {}: {e}; re-reading every {FILE_RESCAN:?}",
                            dir.display()
                        );
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!("no file watcher: {e}; re-reading every {FILE_RESCAN:?}");
                None
            }
        };
        Self {
            path: path.to_path_buf(),
            changed,
            _watcher: watcher,
        }
    }
}

#[async_trait]
impl FlagSource for FileFlagSource {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    async fn fetch(&self) -> Result<Option<ClientFeatures>, FlagError> {
        let bytes = tokio::fs::read(&self.path)
            .await
            .map_err(|source| FlagError::Read {
                path: self.path.clone(),
                source,
            })?;
        parse_features(&bytes, &self.path.display().to_string()).map(Some)
    }

    async fn changed(&self) {
        let _ = tokio::time::timeout(FILE_RESCAN, self.changed.notified()).await;
        // Editors and `cp` write in several steps; let a burst of events settle.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Flags polled from an Unleash server's client API.
pub struct UnleashFlagSource {
    url: String,
    token: String,
    app_name: String,
    interval: Duration,
    http: reqwest::Client,
    etag: Mutex<Option<String>>,
}

impl UnleashFlagSource {
    /// Polls `{api_url}client/features` every `interval`.
    pub fn new(
        api_url: &str,
        token: &str,
        app_name: &str,
        interval: Duration,
    ) -> Result<Self, FlagError> {
        let http = reqwest::Client::builder()
            // A poll must not outlive the next one by much.
            .timeout(interval.max(Duration::from_secs(2)))
            .build()
            .map_err(|e| FlagError::Engine(e.to_string()))?;
        Ok(Self {
            url: format!("{api_url}client/features"),
            token: token.to_string(),
            app_name: app_name.to_string(),
            interval,
            http,
            etag: Mutex::new(None),
        })
    }
}

#[async_trait]
impl FlagSource for UnleashFlagSource {
    fn describe(&self) -> String {
        format!("unleash:{}", self.url)
    }

    async fn fetch(&self) -> Result<Option<ClientFeatures>, FlagError> {
        let err = |message: String| FlagError::Unleash {
            url: self.url.clone(),
            message,
        };
        let mut request = self
            .http
            .get(&self.url)
            .header("Authorization", &self.token)
            .header("UNLEASH-APPNAME", &self.app_name)
            .header("UNLEASH-INSTANCEID", "strangler-router");
        let etag = self.etag.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(etag) = etag {
            request = request.header("If-None-Match", etag);
        }
        let response = request.send().await.map_err(|e| err(e.to_string()))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(err(format!(
                "HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            )));
        }
        let etag = response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = response.bytes().await.map_err(|e| err(e.to_string()))?;
        let features = parse_features(&bytes, &self.url)?;
        *self.etag.lock().unwrap_or_else(|p| p.into_inner()) = etag;
        Ok(Some(features))
    }

    async fn changed(&self) {
        tokio::time::sleep(self.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Stickiness;

    fn doc(rollout: u8, enabled: bool) -> ClientFeatures {
        let json = serde_json::json!({
            "version": 2,
            "features": [{
                "name": "strangler.orders",
                "type": "release",
                "enabled": enabled,
                "strategies": [{
                    "name": "flexibleRollout",
                    "parameters": {"rollout": rollout.to_string(), "stickiness": "default", "groupId": "strangler.orders"}
                }]
            }]
        });
        parse_features(json.to_string().as_bytes(), "test").expect("valid document")
    }

    fn share_enabled(engine: &FlagEngine, users: usize) -> usize {
        (0..users)
            .filter(|u| {
                let user = format!("user-{u}");
                let ctx = context_for(&Stickiness::Header("x-user-id".into()), Some(&user));
                engine.evaluate("strangler.orders", &ctx).enabled
            })
            .count()
    }

    #[test]
    fn rollout_percentage_splits_users_and_each_user_is_sticky() {
        let engine = FlagEngine::new("test").expect("engine");
        engine.apply(doc(30, true)).expect("apply");
        let on = share_enabled(&engine, 2_000);
        assert!((500..=700).contains(&on), "30% of 2000 users, got {on}");
        let sides = || -> Vec<bool> {
            (0..200)
                .map(|u| {
                    engine
                        .evaluate(
                            "strangler.orders",
                            &context_for(&Stickiness::Header("h".into()), Some(&u.to_string())),
                        )
                        .enabled
                })
                .collect()
        };
        let (first, again) = (sides(), sides());
        assert_eq!(first, again);
    }

    #[test]
    fn disabled_or_unknown_toggle_sends_nobody_to_new() {
        let engine = FlagEngine::new("test").expect("engine");
        assert_eq!(share_enabled(&engine, 100), 0);
        assert!(
            !engine
                .evaluate("strangler.orders", &FlagContext::default())
                .known
        );
        engine.apply(doc(100, false)).expect("apply");
        assert_eq!(share_enabled(&engine, 100), 0);
        engine.apply(doc(100, true)).expect("apply");
        assert_eq!(share_enabled(&engine, 100), 100);
        assert_eq!(
            engine.state("strangler.orders"),
            FlagState {
                known: true,
                enabled: true,
                rollout_percent: Some(100)
            }
        );
    }

    #[test]
    fn a_bad_document_is_a_parse_error_with_position() {
        let err =
            parse_features(b"{\"version\": 2, \"features\": [}", "flags.json").expect_err("bad");
        assert!(!err.is_retryable());
        assert!(error_chain(&err).contains("line 1"), "{err}");
    }

    #[test]
    fn errors_keep_the_last_good_state_and_report_freshness() {
        let engine = FlagEngine::new("test").expect("engine");
        engine.apply(doc(100, true)).expect("apply");
        engine.mark_error(&FlagError::Unleash {
            url: "u".into(),
            message: "refused".into(),
        });
        assert_eq!(share_enabled(&engine, 10), 10);
        let f = engine.freshness();
        assert_eq!(f.toggles, 1);
        assert!(f.last_error.is_some_and(|e| e.contains("refused")));
        engine.mark_success();
        assert!(engine.freshness().last_error.is_none());
    }
}
