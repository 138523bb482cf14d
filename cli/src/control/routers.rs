//! Talking to every router's admin API at once.

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

/// All routers the config lists.
#[derive(Debug, Clone)]
pub struct Fleet {
    urls: Vec<String>,
    token: Option<String>,
    http: reqwest::Client,
}

impl Fleet {
    /// Routers at `urls`, with the admin bearer token if there is one.
    pub fn new(urls: Vec<String>, token: Option<String>, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self { urls, token, http }
    }

    async fn call_all(
        &self,
        method: reqwest::Method,
        path: String,
        body: Option<Value>,
    ) -> Vec<RouterReply> {
        let mut tasks = tokio::task::JoinSet::new();
        for (index, url) in self.urls.iter().enumerate() {
            let http = self.http.clone();
            let token = self.token.clone();
            let full = format!("{url}{path}");
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
        let mut replies: Vec<(usize, RouterReply)> = Vec::with_capacity(self.urls.len());
        while let Some(joined) = tasks.join_next().await {
            if let Ok(reply) = joined {
                replies.push(reply);
            }
        }
        replies.sort_by_key(|(i, _)| *i);
        replies.into_iter().map(|(_, r)| r).collect()
    }

    /// Pushes an override (`legacy` or `new`) for `route` to every router in parallel.
    pub async fn set_override(&self, route: &str, backend: &str) -> Vec<RouterReply> {
        self.call_all(
            reqwest::Method::PUT,
            format!("/routes/{route}/override"),
            Some(json!({ "backend": backend })),
        )
        .await
    }

    /// Clears `route`'s override on every router.
    pub async fn clear_override(&self, route: &str) -> Vec<RouterReply> {
        self.call_all(
            reqwest::Method::DELETE,
            format!("/routes/{route}/override"),
            None,
        )
        .await
    }

    /// GETs an admin path on every router.
    pub async fn get_all(&self, path: &str) -> Vec<RouterReply> {
        self.call_all(reqwest::Method::GET, path.to_string(), None)
            .await
    }

    /// POSTs a JSON body to an admin path on every router.
    pub async fn post_all(&self, path: &str, body: Value) -> Vec<RouterReply> {
        self.call_all(reqwest::Method::POST, path.to_string(), Some(body))
            .await
    }

    /// Every router's view of every route.
    pub async fn routes(&self) -> Vec<RouterReply> {
        self.call_all(reqwest::Method::GET, "/routes".to_string(), None)
            .await
    }
}
