//! The CLI's admin API client: finds the URL and token, sends JSON.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::server::{ADMIN_TOKEN_FILE, RUN_FILE};

/// Default admin URL.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:9180";

/// An authenticated admin API client.
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// An error answer of the API, with its HTTP status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The `error` field of the answer.
    pub message: String,
}

impl Client {
    /// Resolves the admin URL (`--admin`, else the running collector's
    /// `run.json` in the data dir, else the default) and the token
    /// (`<data-dir>/admin.token`, else `PULSEBELL_ADMIN_TOKEN`).
    pub fn new(admin: Option<&str>, data_dir: &Path) -> anyhow::Result<Client> {
        let base = match admin {
            Some(a) => a.to_string(),
            None => std::fs::read(data_dir.join(RUN_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["admin_url"].as_str().map(str::to_string))
                .unwrap_or_else(|| DEFAULT_ADMIN.to_string()),
        };
        let token_path = data_dir.join(ADMIN_TOKEN_FILE);
        let token = match std::fs::read_to_string(&token_path) {
            Ok(t) => t.trim().to_string(),
            Err(_) => match std::env::var("PULSEBELL_ADMIN_TOKEN") {
                Ok(t) if !t.is_empty() => t,
                _ => bail!(
                    "no admin token: {} is not readable and PULSEBELL_ADMIN_TOKEN is not set (use --data-dir)",
                    token_path.display()
                ),
            },
        };
        Client::with_token(&base, &token)
    }

    /// A client for `base` with `token`.
    pub fn with_token(base: &str, token: &str) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build()?;
        Ok(Client { base: base.trim_end_matches('/').to_string(), token: token.to_string(), http })
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the collector's admin API at {}", self.base))?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
            return Err(ApiError { status: status.as_u16(), message }.into());
        }
        serde_json::from_slice(&bytes).context("the admin API answered something that is not the expected JSON")
    }

    /// GET `path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    /// POST `body` to `path`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body)).await
    }

    /// DELETE `path`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.delete(format!("{}{path}", self.base))).await
    }
}
