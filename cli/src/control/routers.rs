//! Talking to every router's admin API at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// What one router answered.
#[derive(Debug)]
pub struct RouterReply {
    /// The router's admin URL.
    pub url: String,
    /// Its answer, or why there was none.
    pub result: Result<Value, String>,
    /// How long it took.
    pub took: Duration,
}

/// All routers the config lists, `dns://` entries resolved again at every command.
#[derive(Debug, Clone)]
pub struct Fleet {
    urls: Vec<String>,
    token: Option<String>,
    http: reqwest::Client,
}

impl Fleet {
    /// Routers at `urls` (admin base URLs, or `dns://NAME:PORT`), with the admin
    /// bearer token if there is one.
    pub fn new(urls: Vec<String>, token: Option<String>, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self { urls, token, http }
    }

    /// Every router now: each listed URL, and each address every `dns://` name
    /// resolves to at this moment (A and AAAA; a router rescheduled or scaled out
    /// since the last command is found). A name that resolves to nothing is an
    /// error in its place, so a move counts it as not confirmed.
    pub async fn resolve(&self) -> Vec<Result<String, (String, String)>> {
        let mut out = Vec::new();
        for entry in &self.urls {
            let Some((name, port)) = strangler_model::control::dns_target(entry) else {
                out.push(Ok(entry.clone()));
                continue;
            };
            match resolve_name(name, port).await {
                Ok(addrs) if !addrs.is_empty() => out.extend(addrs.into_iter().map(|a| {
                    Ok(match a {
                        std::net::SocketAddr::V4(v4) => format!("http://{v4}"),
                        std::net::SocketAddr::V6(v6) => {
                            format!("http://[{}]:{}", v6.ip(), v6.port())
                        }
                    })
                })),
                Ok(_) => out.push(Err((
                    entry.clone(),
                    format!("{name} resolved to no address"),
                ))),
                Err(e) => out.push(Err((entry.clone(), format!("cannot resolve {name}: {e}")))),
            }
        }
        out
    }

    /// Calls every router; `path` gives each router's path from its URL.
    async fn call_all(
        &self,
        method: reqwest::Method,
        path: &(dyn Fn(&str) -> String + Sync),
        body: Option<Value>,
    ) -> Vec<RouterReply> {
        let mut tasks = tokio::task::JoinSet::new();
        let mut unresolved = Vec::new();
        let mut urls = Vec::new();
        for target in self.resolve().await {
            match target {
                Ok(url) => urls.push(url),
                Err((url, why)) => unresolved.push(RouterReply {
                    url,
                    result: Err(why),
                    took: Duration::ZERO,
                }),
            }
        }
        for (index, url) in urls.iter().enumerate() {
            let http = self.http.clone();
            let token = self.token.clone();
            let full = format!("{url}{}", path(url));
            let method = method.clone();
            let body = body.clone();
            let url = url.clone();
            tasks.spawn(async move {
                let started = Instant::now();
                let mut request = http.request(method, &full);
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                if let Some(body) = body {
                    request = request.json(&body);
                }
                let result = match request.send().await {
                    Ok(response) => {
                        let status = response.status();
                        let text = response.text().await.unwrap_or_default();
                        if status.is_success() {
                            Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
                        } else if status.as_u16() == 401 {
                            Err("rejected the admin token (401)".to_string())
                        } else {
                            Err(format!("answered {status}: {}", text.trim()))
                        }
                    }
                    Err(e) if e.is_timeout() => Err("did not answer in time".to_string()),
                    Err(e) if e.is_connect() => {
                        Err("is unreachable (connection failed)".to_string())
                    }
                    Err(e) => Err(e.to_string()),
                };
                (
                    index,
                    RouterReply {
                        url,
                        result,
                        took: started.elapsed(),
                    },
                )
            });
        }
        let mut replies: Vec<(usize, RouterReply)> = Vec::with_capacity(urls.len());
        while let Some(joined) = tasks.join_next().await {
            if let Ok(reply) = joined {
                replies.push(reply);
            }
        }
        replies.sort_by_key(|(i, _)| *i);
        replies
            .into_iter()
            .map(|(_, r)| r)
            .chain(unresolved)
            .collect()
    }

    /// Pushes an override (`legacy` or `new`) for `route` to every router in parallel.
    pub async fn set_override(&self, route: &str, backend: &str) -> Vec<RouterReply> {
        let path = format!("/routes/{route}/override");
        self.call_all(
            reqwest::Method::PUT,
            &|_| path.clone(),
            Some(json!({ "backend": backend })),
        )
        .await
    }

    /// Each router's version of `route`'s override, by admin URL (routers that did
    /// not answer are missing).
    pub async fn override_versions(&self, route: &str) -> HashMap<String, String> {
        self.get_all(&format!("/routes/{route}"))
            .await
            .into_iter()
            .filter_map(|r| {
                let version = r.result.ok()?["override_version"].as_str()?.to_string();
                Some((r.url, version))
            })
            .collect()
    }

    /// Clears `route`'s override on every router — on each whose version was read
    /// (`versions`, from [`Fleet::override_versions`]) only if it is still that
    /// version: a router where a rollback set it since answers 409 and keeps it.
    pub async fn clear_override_if(
        &self,
        route: &str,
        versions: &HashMap<String, String>,
    ) -> Vec<RouterReply> {
        let path = format!("/routes/{route}/override");
        self.call_all(
            reqwest::Method::DELETE,
            &|url| match versions.get(url) {
                Some(v) => format!("{path}?if_version={v}"),
                None => path.clone(),
            },
            None,
        )
        .await
    }

    /// GETs an admin path on every router.
    pub async fn get_all(&self, path: &str) -> Vec<RouterReply> {
        self.call_all(reqwest::Method::GET, &|_| path.to_string(), None)
            .await
    }

    /// POSTs a JSON body to an admin path on every router.
    pub async fn post_all(&self, path: &str, body: Value) -> Vec<RouterReply> {
        self.call_all(reqwest::Method::POST, &|_| path.to_string(), Some(body))
            .await
    }

    /// Every router's view of every route.
    pub async fn routes(&self) -> Vec<RouterReply> {
        self.get_all("/routes").await
    }
}

/// Every address `name` has, at `port`: from the hosts override
/// ([`strangler_model::hosts`]) when it lists `name`, else from the system resolver
/// (which reads `/etc/hosts` and DNS), sorted.
async fn resolve_name(name: &str, port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
    let listed = strangler_model::hosts::lookup(name, port);
    if !listed.is_empty() {
        return Ok(listed);
    }
    let mut addrs: Vec<std::net::SocketAddr> =
        tokio::net::lookup_host((name, port)).await?.collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dns_entries_resolve_to_one_router_per_address_and_unknown_names_say_so() {
        let fleet = Fleet::new(
            vec![
                "http://127.0.0.1:1".into(),
                "dns://localhost:9080".into(),
                "dns://no-such-name.invalid:9080".into(),
            ],
            None,
            Duration::from_millis(100),
        );
        let targets = fleet.resolve().await;
        assert_eq!(targets[0], Ok("http://127.0.0.1:1".to_string()));
        assert!(
            targets
                .iter()
                .any(|t| t == &Ok("http://127.0.0.1:9080".to_string())),
            "{targets:?}"
        );
        assert!(
            matches!(targets.last(), Some(Err((url, _))) if url == "dns://no-such-name.invalid:9080"),
            "{targets:?}"
        );
    }
}
