//! Where route toggles are changed: Unleash's admin API, or the flags file the router watches.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::ControlError;
use super::lifecycle::Percent;

/// A toggle as the flag store holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FlagSnapshot {
    /// The toggle exists.
    pub exists: bool,
    /// It is on.
    pub enabled: bool,
    /// Its flexibleRollout percentage, if it has one.
    pub rollout: Option<u8>,
}

/// A place where toggles are read and written.
///
/// Contract: `set` leaves the toggle enabled or disabled as asked and, when `rollout`
/// is given, with exactly one flexibleRollout strategy at that percentage (created,
/// along with the toggle, when missing). Each call is complete on return.
#[async_trait]
pub trait FlagStore: Send + Sync {
    /// For messages, e.g. `unleash http://host:4242 (project default, development)`.
    fn describe(&self) -> String;
    /// Reads a toggle.
    async fn get(&self, flag: &str) -> Result<FlagSnapshot, ControlError>;
    /// Writes a toggle.
    async fn set(
        &self,
        flag: &str,
        enabled: bool,
        rollout: Option<Percent>,
    ) -> Result<(), ControlError>;
}

fn rollout_strategy(flag: &str, percent: Percent) -> Value {
    json!({
        "name": "flexibleRollout",
        "constraints": [],
        "parameters": {"rollout": percent.get().to_string(), "stickiness": "default", "groupId": flag}
    })
}

/// The percentage of the flexibleRollout strategy in a strategies array, if any.
fn rollout_of(strategies: &Value) -> Option<u8> {
    strategies
        .as_array()?
        .iter()
        .find(|s| s["name"] == "flexibleRollout")?["parameters"]["rollout"]
        .as_str()?
        .parse()
        .ok()
}

/// Toggles in a real Unleash, through its admin API.
pub struct UnleashAdmin {
    base: String,
    token: String,
    project: String,
    environment: String,
    http: reqwest::Client,
}

impl UnleashAdmin {
    /// An admin client for `base` (e.g. `http://127.0.0.1:4242`).
    pub fn new(
        base: &str,
        token: &str,
        project: &str,
        environment: &str,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| ControlError::Unleash {
                url: base.to_string(),
                message: e.to_string(),
            })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            project: project.to_string(),
            environment: environment.to_string(),
            http,
        })
    }

    fn feature_path(&self, flag: &str) -> String {
        format!(
            "{}/api/admin/projects/{}/features/{flag}",
            self.base, self.project
        )
    }

    async fn call(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), ControlError> {
        let mut request = self
            .http
            .request(method.clone(), url)
            .header("Authorization", &self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| ControlError::Unleash {
            url: self.base.clone(),
            message: format!(
                "{method} {url}: {}",
                if e.is_timeout() {
                    "timed out".to_string()
                } else {
                    e.to_string()
                }
            ),
        })?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        if status == 401 || status == 403 {
            return Err(ControlError::UnleashAuth {
                url: self.base.clone(),
                status,
            });
        }
        if status >= 400 && status != 404 {
            return Err(ControlError::Unleash {
                url: self.base.clone(),
                message: format!(
                    "{method} {url} returned {status}: {}",
                    text.chars().take(300).collect::<String>()
                ),
            });
        }
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }
}

#[async_trait]
impl FlagStore for UnleashAdmin {
    fn describe(&self) -> String {
        format!(
            "unleash {} (project {}, environment {})",
            self.base, self.project, self.environment
        )
    }

    async fn get(&self, flag: &str) -> Result<FlagSnapshot, ControlError> {
        let (status, feature) = self
            .call(reqwest::Method::GET, &self.feature_path(flag), None)
            .await?;
        if status == 404 {
            return Ok(FlagSnapshot {
                exists: false,
                enabled: false,
                rollout: None,
            });
        }
        let env = feature["environments"]
            .as_array()
            .and_then(|envs| envs.iter().find(|e| e["name"] == self.environment.as_str()));
        let enabled = env.and_then(|e| e["enabled"].as_bool()).unwrap_or(false);
        let rollout = env.and_then(|e| rollout_of(&e["strategies"]));
        Ok(FlagSnapshot {
            exists: true,
            enabled,
            rollout,
        })
    }

    async fn set(
        &self,
        flag: &str,
        enabled: bool,
        rollout: Option<Percent>,
    ) -> Result<(), ControlError> {
        let feature = self.feature_path(flag);
        let (status, _) = self.call(reqwest::Method::GET, &feature, None).await?;
        if status == 404 {
            let create = format!("{}/api/admin/projects/{}/features", self.base, self.project);
            self.call(
                reqwest::Method::POST,
                &create,
                Some(json!({"name": flag, "type": "release"})),
            )
            .await?;
        }
        let strategies = format!("{feature}/environments/{}/strategies", self.environment);
        if let Some(percent) = rollout {
            let (_, existing) = self.call(reqwest::Method::GET, &strategies, None).await?;
            let found = existing
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == "flexibleRollout"))
                .and_then(|s| s["id"].as_str().map(str::to_string));
            match found {
                Some(id) => {
                    self.call(
                        reqwest::Method::PUT,
                        &format!("{strategies}/{id}"),
                        Some(rollout_strategy(flag, percent)),
                    )
                    .await?;
                }
                None => {
                    self.call(
                        reqwest::Method::POST,
                        &strategies,
                        Some(rollout_strategy(flag, percent)),
                    )
                    .await?;
                }
            }
        }
        let switch = format!(
            "{feature}/environments/{}/{}",
            self.environment,
            if enabled { "on" } else { "off" }
        );
        let (status, _) = self.call(reqwest::Method::POST, &switch, None).await?;
        if status == 404 {
            return Err(ControlError::Unleash {
                url: self.base.clone(),
                message: format!(
                    "toggle {flag} or environment {} does not exist in project {}",
                    self.environment, self.project
                ),
            });
        }
        Ok(())
    }
}

/// Toggles in the client-features JSON file the router watches.
pub struct FlagsFile {
    path: PathBuf,
}

impl FlagsFile {
    /// The file at `path` (created on first write if missing).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    fn read(&self) -> Result<Value, ControlError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ControlError::FlagsFile {
                path: self.path.clone(),
                message: format!("not valid JSON: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(json!({"version": 2, "features": []}))
            }
            Err(e) => Err(ControlError::FlagsFile {
                path: self.path.clone(),
                message: e.to_string(),
            }),
        }
    }

    /// Writes through a temp file and a rename, so the router never reads half a file.
    fn write_atomically(&self, doc: &Value) -> Result<(), ControlError> {
        let err = |e: std::io::Error| ControlError::FlagsFile {
            path: self.path.clone(),
            message: e.to_string(),
        };
        let tmp = self.path.with_extension("json.strangler-tmp");
        let mut file = File::create(&tmp).map_err(err)?;
        let bytes = serde_json::to_vec_pretty(doc).map_err(|e| ControlError::FlagsFile {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        file.write_all(&bytes).map_err(err)?;
        file.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)
    }
}

fn find_feature<'a>(doc: &'a Value, flag: &str) -> Option<&'a Value> {
    doc["features"]
        .as_array()?
        .iter()
        .find(|f| f["name"] == flag)
}

#[async_trait]
impl FlagStore for FlagsFile {
    fn describe(&self) -> String {
        format!("flags file {}", self.path.display())
    }

    async fn get(&self, flag: &str) -> Result<FlagSnapshot, ControlError> {
        let doc = self.read()?;
        Ok(match find_feature(&doc, flag) {
            None => FlagSnapshot {
                exists: false,
                enabled: false,
                rollout: None,
            },
            Some(f) => FlagSnapshot {
                exists: true,
                enabled: f["enabled"].as_bool().unwrap_or(false),
                rollout: rollout_of(&f["strategies"]),
            },
        })
    }

    async fn set(
        &self,
        flag: &str,
        enabled: bool,
        rollout: Option<Percent>,
    ) -> Result<(), ControlError> {
        // One writer at a time: a lock file beside the flags file.
        let lock_path = self.path.with_extension("json.lock");
        let lock = File::create(&lock_path).map_err(|e| ControlError::FlagsFile {
            path: lock_path.clone(),
            message: e.to_string(),
        })?;
        lock.lock().map_err(|e| ControlError::FlagsFile {
            path: lock_path.clone(),
            message: e.to_string(),
        })?;
        let mut doc = self.read()?;
        if !doc["features"].is_array() {
            doc["features"] = json!([]);
        }
        let features = doc["features"]
            .as_array_mut()
            .ok_or_else(|| ControlError::FlagsFile {
                path: self.path.clone(),
                message: "\"features\" is not an array".into(),
            })?;
        let index = match features.iter().position(|f| f["name"] == flag) {
            Some(i) => i,
            None => {
                features.push(
                    json!({"name": flag, "type": "release", "enabled": false, "strategies": []}),
                );
                features.len() - 1
            }
        };
        let feature = &mut features[index];
        feature["enabled"] = Value::Bool(enabled);
        if let Some(percent) = rollout {
            let mut strategies: Vec<Value> = feature["strategies"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|s| s["name"] != "flexibleRollout")
                .collect();
            strategies.push(rollout_strategy(flag, percent));
            feature["strategies"] = Value::Array(strategies);
        } else if feature["strategies"].as_array().is_none_or(Vec::is_empty) {
            // An enabled toggle without strategies is on for everyone; keep it explicit.
            feature["strategies"] = json!([rollout_strategy(flag, Percent::ALL)]);
        }
        self.write_atomically(&doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flags_file_creates_updates_and_keeps_other_toggles() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("flags.json");
        std::fs::write(&path, r#"{"version":2,"features":[{"name":"other","enabled":true,"strategies":[{"name":"default"}]}]}"#)
            .expect("write");
        let store = FlagsFile::new(&path);
        assert!(!store.get("strangler.orders").await.expect("get").exists);
        store
            .set(
                "strangler.orders",
                true,
                Some(Percent::try_from(10).expect("pct")),
            )
            .await
            .expect("set");
        assert_eq!(
            store.get("strangler.orders").await.expect("get"),
            FlagSnapshot {
                exists: true,
                enabled: true,
                rollout: Some(10)
            }
        );
        store
            .set("strangler.orders", false, None)
            .await
            .expect("disable");
        assert_eq!(
            store.get("strangler.orders").await.expect("get"),
            FlagSnapshot {
                exists: true,
                enabled: false,
                rollout: Some(10)
            }
        );
        assert!(store.get("other").await.expect("get").enabled);
        // What we write is a document the router's parser takes.
        let bytes = std::fs::read(&path).expect("read");
        let parsed = strangler_router::flags::parse_features(&bytes, "flags.json")
            .expect("router parses it");
        assert_eq!(parsed.features.len(), 2);
    }

    #[tokio::test]
    async fn a_corrupt_flags_file_is_reported_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("flags.json");
        std::fs::write(&path, "{ nope").expect("write");
        let store = FlagsFile::new(&path);
        let err = store.set("f", true, None).await.expect_err("corrupt");
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "{ nope");
    }
}
