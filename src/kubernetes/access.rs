//! Reaching a Kubernetes cluster the way kubectl does (kubeconfig, `--context`, `-n`), and
//! turning what the API server says into errors a user can act on.

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Which cluster, as kubectl chooses it.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// `--kubeconfig` (else `$KUBECONFIG`, else `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// `--context` (else the kubeconfig's current context).
    pub context: Option<String>,
    /// `-n` (else the context's namespace, else `default`).
    pub namespace: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no kubeconfig found ({0})")]
    NoKubeconfig(String),
    #[error("cannot read the kubeconfig: {0}")]
    BadKubeconfig(String),
    #[error("the kubeconfig has no context `{0}`")]
    UnknownContext(String),
    #[error("namespace `{0}` does not exist")]
    NoNamespace(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("the cluster does not accept these credentials: {0}")]
    Unauthorized(String),
    #[error("cannot reach the cluster: {0}")]
    Unreachable(String),
    #[error("the API server said: {0}")]
    Api(String),
}

impl ClusterError {
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            ClusterError::NoKubeconfig(_) => {
                "point KUBECONFIG at your cluster's kubeconfig (or pass --kubeconfig), e.g. from `az aks get-credentials`".into()
            }
            ClusterError::BadKubeconfig(_) => "check the file with `kubectl config view`".into(),
            ClusterError::UnknownContext(_) => "list the contexts with `kubectl config get-contexts`".into(),
            ClusterError::NoNamespace(ns) => format!("create it (`kubectl create namespace {ns}`) or pick another with -n"),
            ClusterError::Forbidden(_) => {
                "ask a cluster admin for a Role with that verb on that resource in this namespace, bound to your user".into()
            }
            ClusterError::Unauthorized(_) => {
                "the kubeconfig's token or certificate expired or was revoked: log in again (e.g. `az aks get-credentials`), then check with `kubectl auth whoami`".into()
            }
            ClusterError::Unreachable(_) => "check the cluster is up and `kubectl cluster-info` works".into(),
            ClusterError::Api(_) => return None,
        })
    }
}

/// A client for the selected cluster, and the namespace to work in.
pub async fn connect(selection: &Selection) -> Result<(Client, String), ClusterError> {
    let options = KubeConfigOptions { context: selection.context.clone(), ..KubeConfigOptions::default() };
    let kubeconfig = match &selection.kubeconfig {
        Some(path) => {
            Kubeconfig::read_from(path).map_err(|e| ClusterError::BadKubeconfig(format!("{}: {e}", path.display())))?
        }
        None => Kubeconfig::read().map_err(|e| ClusterError::NoKubeconfig(default_kubeconfig_problem(&e)))?,
    };
    if let Some(context) = &selection.context {
        if !kubeconfig.contexts.iter().any(|c| &c.name == context) {
            return Err(ClusterError::UnknownContext(context.clone()));
        }
    }
    let config = Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| ClusterError::BadKubeconfig(e.to_string()))?;
    let namespace = selection.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = client(config).map_err(|e| ClusterError::Unreachable(e.to_string()))?;
    Ok((client, namespace))
}

/// Where the default kubeconfig was looked for and what went wrong, in plain words (kube's own
/// message quotes the path twice over).
fn default_kubeconfig_problem(err: &kube::config::KubeconfigError) -> String {
    let mut cause: &dyn std::error::Error = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let place = match std::env::var_os("KUBECONFIG") {
        Some(paths) => format!("$KUBECONFIG={}", paths.to_string_lossy()),
        None => "~/.kube/config".to_string(),
    };
    format!("{place}: {cause}")
}

impl ClusterError {
    /// Retrying cannot help: the user has to change something (credentials, rights, names).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, ClusterError::Unreachable(_) | ClusterError::Api(_))
    }
}

/// How long opening a connection to the API server may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// How long data sent to the API server may stay unacknowledged before the connection counts
/// as dead (`TCP_USER_TIMEOUT`): a dropped link fails a request or a stream in seconds instead
/// of after TCP's minutes of retransmissions.
const USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A client built from kube's own layer stack (connect/read/write timeouts, retries of
/// 429/503/504, authentication, impersonation headers), whose connections to the API server
/// send small writes at once (TCP_NODELAY: the agent protocol's frames are small, and with
/// Nagle's algorithm a batch could wait for a delayed ACK, ~40 ms), probe an idle link
/// (keepalive) and give up on a dead one ([`USER_TIMEOUT`]). A kubeconfig with a `proxy-url`
/// gets kube's default client, which speaks to proxies.
fn client(mut config: Config) -> Result<Client, kube::Error> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use kube::client::ConfigExt;
    if config.proxy_url.is_some() {
        return Client::try_from(config);
    }
    config.connect_timeout = Some(config.connect_timeout.map_or(CONNECT_TIMEOUT, |t| t.min(CONNECT_TIMEOUT)));
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(std::time::Duration::from_secs(5)));
    http.set_keepalive_interval(Some(std::time::Duration::from_secs(2)));
    http.set_keepalive_retries(Some(3));
    http.set_tcp_user_timeout(Some(USER_TIMEOUT));
    let https = config.rustls_https_connector_with_connector(http)?;
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    let hyper: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    let retry =
        config.default_retry.then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(hyper);
    Ok(Client::new(service, config.default_namespace))
}

/// What a failed API call means for the user.
pub fn explain(err: kube::Error, namespace: &str) -> ClusterError {
    match err {
        kube::Error::Api(status) if status.code == 404 && status.message.contains("namespaces") => {
            ClusterError::NoNamespace(namespace.to_string())
        }
        kube::Error::Api(status) if status.code == 403 => ClusterError::Forbidden(status.message),
        kube::Error::Api(status) if status.code == 401 => ClusterError::Unauthorized(status.message),
        kube::Error::UpgradeConnection(kube::client::UpgradeConnectionError::ProtocolSwitch(code))
            if code.as_u16() == 403 =>
        {
            ClusterError::Forbidden(format!("the API server refused the stream ({code})"))
        }
        kube::Error::UpgradeConnection(kube::client::UpgradeConnectionError::ProtocolSwitch(code))
            if code.as_u16() == 401 =>
        {
            ClusterError::Unauthorized(format!("the API server refused the stream ({code})"))
        }
        kube::Error::Api(status) => ClusterError::Api(status.message),
        kube::Error::HyperError(e) => ClusterError::Unreachable(e.to_string()),
        kube::Error::Service(e) => ClusterError::Unreachable(e.to_string()),
        other => ClusterError::Api(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, message: &str) -> kube::Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "code": code, "message": message, "reason": ""
        }))
        .unwrap();
        kube::Error::Api(Box::new(status))
    }

    /// A reconnect loop must not retry what only the user can fix.
    #[test]
    fn credentials_and_rights_are_permanent_outages_are_not() {
        let unauthorized = explain(api(401, "Unauthorized"), "ns");
        assert!(matches!(unauthorized, ClusterError::Unauthorized(_)) && unauthorized.is_permanent());
        assert!(unauthorized.hint().unwrap().contains("log in again"));
        let forbidden = explain(api(403, "pods is forbidden"), "ns");
        assert!(matches!(forbidden, ClusterError::Forbidden(_)) && forbidden.is_permanent());
        assert!(explain(api(404, "namespaces \"x\" not found"), "x").is_permanent());
        assert!(!explain(api(500, "etcd is slow"), "ns").is_permanent());
        assert!(!ClusterError::Unreachable("connection refused".into()).is_permanent());
    }
}
