//! A small client for the control plane's HTTP API (`--server`, token from `--data-dir`).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use plexus_control::api_types::{ErrorBody, ResourceList};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Failure;

/// Where the control plane is and how to authenticate to it.
#[derive(clap::Args, Clone, Debug)]
pub struct ServerArgs {
    /// The control plane's HTTP API.
    #[arg(long, global = true, env = "PLEXUS_SERVER", default_value = "http://127.0.0.1:7701")]
    pub server: String,
    /// The control plane's data dir (the CLI reads the admin token from it).
    #[arg(long, global = true, env = "PLEXUS_DATA_DIR", default_value = "./.plexus")]
    pub data_dir: PathBuf,
    /// Reach the control plane of a Kubernetes cluster instead: through the API server (a
    /// port-forward to its pod), with the admin token from Secret plexus-admin-token. Env
    /// KUBECONFIG is used when no --server is given.
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Set by [`ServerArgs::new`]: a universal-mode control plane named by the caller
    /// (`plexus run`, the demo's workloads), never redirected by `KUBECONFIG`.
    #[arg(skip)]
    universal: bool,
    /// The cluster's control plane, once found.
    #[arg(skip)]
    cluster: std::sync::Arc<tokio::sync::OnceCell<Result<std::sync::Arc<plexus_k8s::access::ClusterAccess>, String>>>,
}

/// `--server`'s default.
const DEFAULT_SERVER: &str = "http://127.0.0.1:7701";

impl ServerArgs {
    /// A control plane at `server` whose admin token is in `data_dir` (universal mode: an
    /// exported `KUBECONFIG` does not redirect it to a cluster).
    pub fn new(server: String, data_dir: PathBuf) -> ServerArgs {
        ServerArgs { server, data_dir, kubeconfig: None, universal: true, cluster: Default::default() }
    }

    /// The kubeconfig to reach a cluster with: `--kubeconfig`, else `KUBECONFIG` (its first
    /// file) when no `--server` (nor `PLEXUS_SERVER`) is given on the command line.
    pub fn kubeconfig_path(&self) -> Option<PathBuf> {
        self.kubeconfig_with(std::env::var_os("PLEXUS_SERVER").is_some(), std::env::var_os("KUBECONFIG"))
    }

    /// [`ServerArgs::kubeconfig_path`] given the environment.
    fn kubeconfig_with(&self, plexus_server_env: bool, kubeconfig_env: Option<std::ffi::OsString>) -> Option<PathBuf> {
        if let Some(k) = &self.kubeconfig {
            return Some(k.clone());
        }
        if self.universal || self.server != DEFAULT_SERVER || plexus_server_env {
            return None;
        }
        std::env::split_paths(&kubeconfig_env?).find(|p| !p.as_os_str().is_empty())
    }

    /// Where the control plane is, for messages: `--server`, or the cluster's pod.
    pub fn describe(&self) -> String {
        match (self.kubeconfig_path(), self.cluster.get()) {
            (Some(_), Some(Ok(access))) => {
                format!("pod {}/{} (port-forward)", plexus_k8s::install::NAMESPACE, access.pod())
            }
            (Some(k), _) => format!("the cluster of {}", k.display()),
            (None, _) => self.server.clone(),
        }
    }

    /// The cluster's control plane when a kubeconfig is in use (found once per command).
    async fn cluster(&self) -> Result<Option<std::sync::Arc<plexus_k8s::access::ClusterAccess>>, Failure> {
        let Some(path) = self.kubeconfig_path() else { return Ok(None) };
        let found = self
            .cluster
            .get_or_init(
                || async move { plexus_k8s::access::ClusterAccess::connect(&path).await.map(std::sync::Arc::new) },
            )
            .await;
        match found {
            Ok(access) => Ok(Some(access.clone())),
            Err(e) => Err(Failure::runtime(format!("cannot reach the control plane in the cluster: {e}"))),
        }
    }

    fn authority(&self) -> Result<String, Failure> {
        let rest = self
            .server
            .strip_prefix("http://")
            .ok_or_else(|| Failure::usage(format!("--server {:?}: only http:// URLs are supported", self.server)))?;
        Ok(rest.trim_end_matches('/').to_string())
    }

    fn admin_token(&self) -> Result<String, Failure> {
        plexus_control::datadir::read_token(&self.data_dir, plexus_control::datadir::ADMIN_TOKEN).map_err(|e| {
            Failure::runtime(format!(
                "cannot read the admin token from {}: {e}\n  hint: run the command where the control plane's data dir is, or pass --data-dir",
                self.data_dir.join(plexus_control::datadir::ADMIN_TOKEN).display()
            ))
        })
    }

    /// Sends a request and returns the status and the JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        write: bool,
    ) -> Result<(StatusCode, Value), Failure> {
        self.call_with_headers(method, path, body, write, &[]).await
    }

    /// [`ServerArgs::call`] for an answer read as the typed row `T`: a status other than 2xx is
    /// the API's error ([`api_error`]).
    pub async fn fetch<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        write: bool,
    ) -> Result<T, Failure> {
        let (status, answer) = self.call(method, path, body, write).await?;
        if !status.is_success() {
            return Err(api_error(status, &answer));
        }
        parse_answer(path, answer)
    }

    /// The resources of `kind` in every namespace, and how many of them this CLI cannot read
    /// (written by a newer version).
    pub async fn list_all(&self, kind: plexus_core::Kind) -> Result<(Vec<plexus_core::Resource>, usize), Failure> {
        let path = format!("/api/v1/resources/{}s?namespace=all", kind.as_str().to_ascii_lowercase());
        let list: ResourceList = self.fetch(Method::GET, &path, None, false).await?;
        let total = list.items.len();
        let read: Vec<_> = list.items.into_iter().filter_map(|i| plexus_core::resource_from_value(i).ok()).collect();
        let unreadable = total - read.len();
        Ok((read, unreadable))
    }

    /// [`ServerArgs::call`] with extra request headers.
    pub async fn call_with_headers(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        write: bool,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Value), Failure> {
        let resp = self.send(method, path, body, write, headers).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| self.unreachable(&e))?.to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Ok((status, value))
    }

    /// `GET path` whose answer streams (tap): the response, its body still unread, when it
    /// succeeded; the API's error otherwise.
    pub async fn stream(&self, path: &str) -> Result<Response<Incoming>, Failure> {
        let resp = self.send(Method::GET, path, None, false, &[]).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| self.unreachable(&e))?.to_bytes();
        Err(api_error(status, &serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    fn unreachable(&self, e: &dyn std::fmt::Display) -> Failure {
        Failure::runtime(format!(
            "cannot reach the control plane at {}: {e}\n  hint: start it with `plexus control` (or `plexus demo`), or set --server / PLEXUS_SERVER",
            self.describe()
        ))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        write: bool,
        headers: &[(&str, &str)],
    ) -> Result<Response<Incoming>, Failure> {
        let (mut sender, authority, token) = match self.cluster().await? {
            Some(access) => {
                // Kubernetes: one port-forwarded stream per request, the admin token from its Secret.
                let stream = tokio::time::timeout(Duration::from_secs(10), access.connection())
                    .await
                    .map_err(|_| self.unreachable(&"the port-forward timed out"))?
                    .map_err(|e| self.unreachable(&e))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| self.unreachable(&e))?;
                tokio::spawn(conn);
                (
                    sender,
                    // `localhost`: the API refuses names (DNS rebinding), and the stream is the pod's.
                    format!("localhost:{}", plexus_k8s::access::HTTP_PORT),
                    Some(access.admin_token().to_string()),
                )
            }
            None => {
                let authority = self.authority()?;
                let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(&authority))
                    .await
                    .map_err(|_| self.unreachable(&"connect timed out"))?
                    .map_err(|e| self.unreachable(&e))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| self.unreachable(&e))?;
                tokio::spawn(conn);
                (sender, authority, None)
            }
        };
        let mut builder = Request::builder().method(method).uri(path).header(http::header::HOST, authority.as_str());
        if write {
            let token = match token {
                Some(t) => t,
                None => self.admin_token()?,
            };
            builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let payload = match body {
            Some(v) => {
                builder = builder.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = builder.body(Full::new(payload)).map_err(|e| Failure::runtime(e.to_string()))?;
        tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
            .await
            .map_err(|_| self.unreachable(&"no answer within 30 s"))?
            .map_err(|e| self.unreachable(&e))
    }
}

/// The `error` field of an API error answer, or the status when it has none.
pub fn error_text(status: StatusCode, body: &Value) -> String {
    serde_json::from_value::<ErrorBody>(body.clone())
        .map(|b| b.error)
        .unwrap_or_else(|_| format!("the control plane answered {status}"))
}

/// The `error` field of an API error answer.
pub fn api_error(status: StatusCode, body: &Value) -> Failure {
    let message = error_text(status, body);
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            Failure::runtime(format!("{message}\n  hint: check --data-dir (the admin token is read from it)"))
        }
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => Failure::usage(message),
        _ => Failure::runtime(message),
    }
}

/// An answer of the API as its typed row ([`plexus_control::api_types`]).
pub fn parse_answer<T: DeserializeOwned>(path: &str, body: Value) -> Result<T, Failure> {
    serde_json::from_value(body).map_err(|e| {
        Failure::runtime(format!(
            "cannot read the control plane's answer to {path}: {e}\n  hint: use a plexus CLI of the control plane's version"
        ))
    })
}

#[cfg(test)]
mod kubeconfig_tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerArgs,
    }

    /// An exported KUBECONFIG points a management command without `--server` at the cluster,
    /// but never a universal-mode control plane a command was given (`plexus run`, whose
    /// `--server` the demo passes with the default address), nor an explicit `--server`.
    #[test]
    fn kubeconfig_from_the_environment_redirects_only_commands_without_a_server() {
        let env = Some(std::ffi::OsString::from("/home/u/.kube/config:/other"));
        let cli = |args: &[&str]| Cli::try_parse_from([&["plexus"], args].concat()).expect("parses").server;
        assert_eq!(cli(&[]).kubeconfig_with(false, env.clone()), Some(PathBuf::from("/home/u/.kube/config")));
        assert_eq!(cli(&[]).kubeconfig_with(false, None), None);
        assert_eq!(cli(&[]).kubeconfig_with(true, env.clone()), None, "PLEXUS_SERVER set");
        assert_eq!(cli(&["--server", "http://10.0.0.1:7701"]).kubeconfig_with(false, env.clone()), None);
        assert_eq!(
            cli(&["--kubeconfig", "/k"]).kubeconfig_with(false, None),
            Some(PathBuf::from("/k")),
            "--kubeconfig always"
        );
        let universal = ServerArgs::new(DEFAULT_SERVER.to_string(), PathBuf::from(".plexus"));
        assert_eq!(universal.kubeconfig_with(false, env), None, "plexus run / the demo's workloads");
    }
}
