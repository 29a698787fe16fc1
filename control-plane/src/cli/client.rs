//! Typed client for the control plane's HTTP API (SPEC §4), used by the client verbs.

use std::collections::BTreeMap;
use std::time::Duration;

use actors::model::{LogLine, Resources, RunEvent, RunId, RunRecord, RunState};
use eventsource_stream::Eventsource;
use futures_util::stream::{BoxStream, StreamExt};
use reqwest::header::{HeaderValue, ACCEPT};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Deadline for requests that are not streams.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("invalid server URL '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "cannot reach the codebolt server at {url} ({reason}); is it running? start one with \
         `codebolt server`, or point --server / CODEBOLT_SERVER at it"
    )]
    Unreachable { url: String, reason: String },
    /// The API answered with an error document.
    #[error("{message} ({code})")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("request to {url} failed")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("stream from {url} broke: {reason}")]
    StreamBroken { url: String, reason: String },
    #[error("unexpected response from {url}: {reason}")]
    Decode { url: String, reason: String },
}

impl ClientError {
    /// Whether trying the same request again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. }
            | ClientError::Transport { .. }
            | ClientError::StreamBroken { .. } => true,
            ClientError::Api { status, .. } => status.is_server_error(),
            ClientError::InvalidUrl { .. } | ClientError::Decode { .. } => false,
        }
    }
}

/// Body of `POST /v1/runs`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CreateRun {
    pub agent: String,
    pub task: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
}

/// Filters of `GET /v1/runs`.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub state: Option<RunState>,
    pub agent: Option<String>,
    pub provider: Option<String>,
}

/// One page of `GET /v1/runs`.
#[derive(Debug, Clone, Deserialize)]
pub struct RunPage {
    pub runs: Vec<RunRecord>,
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// One entry of `GET /v1/providers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderStatus {
    pub name: String,
    pub kind: String,
    pub healthy: bool,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub restarts: u64,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub active_runs: u64,
    #[serde(default)]
    pub max_concurrent_runs: Option<u64>,
    /// Fields this client does not know yet, kept for `--output json`.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct ProviderList {
    providers: Vec<ProviderStatus>,
}

#[derive(Debug, Deserialize)]
struct ErrorDocument {
    error: ErrorBody,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
}

/// A stream of decoded `data:` payloads of a server-sent-events response.
pub type SseStream<T> = BoxStream<'static, Result<T, ClientError>>;

/// The control plane's HTTP API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(server: &str, token: Option<String>) -> Result<Self, ClientError> {
        let parsed = Url::parse(server).map_err(|err| ClientError::InvalidUrl {
            url: server.to_string(),
            reason: err.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ClientError::InvalidUrl {
                url: server.to_string(),
                reason: "expected an http:// or https:// URL".to_string(),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("codebolt/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ClientError::Transport {
                url: server.to_string(),
                source,
            })?;
        Ok(ApiClient {
            base: server.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            http,
        })
    }

    pub async fn create_run(
        &self,
        body: &CreateRun,
        idempotency_key: Option<&str>,
    ) -> Result<RunRecord, ClientError> {
        let url = self.url("/v1/runs");
        let mut request = self.http.post(&url).json(body).timeout(REQUEST_TIMEOUT);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let response = self.send(request, &url).await?;
        decode(response, &url).await
    }

    pub async fn get_run(&self, id: RunId) -> Result<RunRecord, ClientError> {
        let url = self.url(&format!("/v1/runs/{id}"));
        let response = self
            .send(self.http.get(&url).timeout(REQUEST_TIMEOUT), &url)
            .await?;
        decode(response, &url).await
    }

    pub async fn list_runs(
        &self,
        filter: &RunFilter,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> Result<RunPage, ClientError> {
        let url = self.url("/v1/runs");
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(state) = filter.state {
            query.push(("state", state.as_str().to_string()));
        }
        if let Some(agent) = &filter.agent {
            query.push(("agent", agent.clone()));
        }
        if let Some(provider) = &filter.provider {
            query.push(("provider", provider.clone()));
        }
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor.to_string()));
        }
        let request = self.http.get(&url).query(&query).timeout(REQUEST_TIMEOUT);
        let response = self.send(request, &url).await?;
        decode(response, &url).await
    }

    /// `POST /v1/runs/{id}/stop`; the run moves to `stopping` and ends later.
    pub async fn stop_run(&self, id: RunId, grace_s: Option<u64>) -> Result<(), ClientError> {
        let url = self.url(&format!("/v1/runs/{id}/stop"));
        let body = match grace_s {
            Some(grace_s) => serde_json::json!({ "grace_s": grace_s }),
            None => serde_json::json!({}),
        };
        let request = self.http.post(&url).json(&body).timeout(REQUEST_TIMEOUT);
        self.send(request, &url).await.map(drop)
    }

    /// `POST /v1/runs/{id}/kill`.
    pub async fn kill_run(&self, id: RunId) -> Result<(), ClientError> {
        let url = self.url(&format!("/v1/runs/{id}/kill"));
        let request = self.http.post(&url).timeout(REQUEST_TIMEOUT);
        self.send(request, &url).await.map(drop)
    }

    pub async fn providers(&self) -> Result<Vec<ProviderStatus>, ClientError> {
        let url = self.url("/v1/providers");
        let response = self
            .send(self.http.get(&url).timeout(REQUEST_TIMEOUT), &url)
            .await?;
        let list: ProviderList = decode(response, &url).await?;
        Ok(list.providers)
    }

    /// `GET /v1/runs/{id}/events`: the run's history, then (with `follow`) new events as they come.
    /// `after` is the last index already seen, passed as `Last-Event-ID`; the server may replay it
    /// anyway, so callers still skip indices they have.
    pub async fn events(
        &self,
        id: RunId,
        follow: bool,
        after: Option<u64>,
    ) -> Result<SseStream<RunEvent>, ClientError> {
        let url = self.url(&format!("/v1/runs/{id}/events"));
        let request = self.http.get(&url).query(&[("follow", follow)]);
        self.sse(request, url, after).await
    }

    /// `GET /v1/runs/{id}/logs`: one log of a run, line by line.
    pub async fn logs(
        &self,
        id: RunId,
        source: &str,
        follow: bool,
        after: Option<u64>,
    ) -> Result<SseStream<LogLine>, ClientError> {
        let url = self.url(&format!("/v1/runs/{id}/logs"));
        let request = self.http.get(&url).query(&[
            ("source", source),
            ("follow", if follow { "true" } else { "false" }),
        ]);
        self.sse(request, url, after).await
    }

    async fn sse<T: DeserializeOwned + Send + 'static>(
        &self,
        mut request: RequestBuilder,
        url: String,
        after: Option<u64>,
    ) -> Result<SseStream<T>, ClientError> {
        request = request.header(ACCEPT, HeaderValue::from_static("text/event-stream"));
        if let Some(after) = after {
            request = request.header("Last-Event-ID", after.to_string());
        }
        let response = self.send(request, &url).await?;
        let stream = response
            .bytes_stream()
            .eventsource()
            .filter_map(move |item| {
                let decoded = match item {
                    Ok(event) if event.data.trim().is_empty() => None,
                    Ok(event) => Some(serde_json::from_str::<T>(&event.data).map_err(|err| {
                        ClientError::Decode {
                            url: url.clone(),
                            reason: format!("{err} in event data {:?}", truncate(&event.data)),
                        }
                    })),
                    Err(err) => Some(Err(ClientError::StreamBroken {
                        url: url.clone(),
                        reason: err.to_string(),
                    })),
                };
                std::future::ready(decoded)
            });
        Ok(stream.boxed())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends with the API token and turns transport failures and error statuses into
    /// [`ClientError`]s.
    async fn send(&self, request: RequestBuilder, url: &str) -> Result<Response, ClientError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.map_err(|source| {
            if source.is_connect() {
                ClientError::Unreachable {
                    url: self.base.clone(),
                    reason: root_cause(&source),
                }
            } else {
                ClientError::Transport {
                    url: url.to_string(),
                    source,
                }
            }
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        Err(api_error(status, &body))
    }
}

/// The error a non-success response stands for: the API's `{error: {code, message}}` document,
/// or the status itself when something else (a proxy, an old server) answered.
fn api_error(status: StatusCode, body: &str) -> ClientError {
    match serde_json::from_str::<ErrorDocument>(body) {
        Ok(doc) => ClientError::Api {
            status,
            code: doc.error.code,
            message: doc.error.message,
        },
        Err(_) => {
            let reason = status.canonical_reason().unwrap_or("error");
            let body = body.trim();
            let message = if body.is_empty() {
                format!("server answered {} {reason}", status.as_u16())
            } else {
                format!(
                    "server answered {} {reason}: {}",
                    status.as_u16(),
                    truncate(body)
                )
            };
            ClientError::Api {
                status,
                code: format!("http_{}", status.as_u16()),
                message,
            }
        }
    }
}

async fn decode<T: DeserializeOwned>(response: Response, url: &str) -> Result<T, ClientError> {
    let bytes = response
        .bytes()
        .await
        .map_err(|source| ClientError::Transport {
            url: url.to_string(),
            source,
        })?;
    serde_json::from_slice(&bytes).map_err(|err| ClientError::Decode {
        url: url.to_string(),
        reason: err.to_string(),
    })
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

fn truncate(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_documents_keep_code_and_message() {
        let err = api_error(
            StatusCode::NOT_FOUND,
            r#"{"error":{"code":"not_found","message":"no run 42"}}"#,
        );
        assert_eq!(err.to_string(), "no run 42 (not_found)");
        assert!(!err.is_retryable());
    }

    #[test]
    fn other_error_bodies_name_the_status() {
        let err = api_error(StatusCode::BAD_GATEWAY, "<html>bad gateway</html>");
        assert_eq!(
            err.to_string(),
            "server answered 502 Bad Gateway: <html>bad gateway</html> (http_502)"
        );
        assert!(err.is_retryable());
    }

    #[test]
    fn create_run_omits_what_was_not_given() {
        let body = CreateRun {
            agent: "explorer".into(),
            task: "look".into(),
            resources: Some(Resources {
                memory_mb: Some(512),
                ..Resources::default()
            }),
            ..CreateRun::default()
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"agent": "explorer", "task": "look", "resources": {"memory_mb": 512}})
        );
    }

    #[test]
    fn server_urls_are_checked() {
        assert!(ApiClient::new("localhost:7420", None).is_err());
        assert!(ApiClient::new("ftp://host", None).is_err());
        let client = ApiClient::new("http://127.0.0.1:7420/", Some(String::new())).unwrap();
        assert_eq!(client.url("/v1/runs"), "http://127.0.0.1:7420/v1/runs");
        assert!(client.token.is_none());
    }

    #[test]
    fn provider_status_keeps_unknown_fields() {
        let json = serde_json::json!({
            "name": "local", "kind": "local", "healthy": true, "message": null,
            "restarts": 0, "last_error": null, "active_runs": 1, "max_concurrent_runs": null,
            "region": "eu"
        });
        let status: ProviderStatus = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(status.extra.get("region"), Some(&Value::from("eu")));
        assert_eq!(serde_json::to_value(&status).unwrap(), json);
    }
}
