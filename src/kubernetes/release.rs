//! The service's Helm release: deployed with the real helm CLI (values files included, their
//! `secrets:` turned into environment variables through a Secret), removed, and waited for until
//! it has rolled out, saying what is not ready and why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::wait::await_condition;
use serde_yaml_ng::Value;

use super::access::ClusterError;
use super::pods;
use crate::config::Config;

/// Default separator between nested keys: what .NET configuration binds (`urls__producer`).
#[cfg(test)]
const SEPARATOR: &str = "__";

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("devloop.yaml names no chart")]
    NoChart,
    #[error("cannot read values file {path}: {message}")]
    Values { path: PathBuf, message: String },
    #[error("helm is not installed (or not on PATH)")]
    NoHelm,
    #[error("helm {action} failed: {output}")]
    Helm { action: &'static str, output: String },
    #[error("the rollout of {release} did not finish within {timeout:?}: {why}")]
    Rollout { release: String, timeout: Duration, why: String },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl UpError {
    pub fn hint(&self) -> Option<String> {
        match self {
            UpError::NoChart => Some("run `devloop prep` (it writes charts/NAME and names it in devloop.yaml)".into()),
            UpError::Values { .. } => Some("values files are YAML maps; check the file's syntax".into()),
            UpError::NoHelm => Some("install helm 3 (https://helm.sh/docs/intro/install/) and put it on PATH".into()),
            UpError::Helm { .. } => Some("helm's own message above says what it refused".into()),
            UpError::Rollout { .. } => Some("`kubectl describe pod` and `kubectl logs` show more".into()),
            UpError::Cluster(e) => e.hint(),
            UpError::Io(_) => None,
        }
    }
}

/// What `up` deploys.
#[derive(Debug)]
pub struct Release {
    pub name: String,
    pub namespace: String,
    pub chart: PathBuf,
    pub values: Vec<PathBuf>,
    pub image: Option<String>,
    pub separator: String,
}

impl Release {
    pub fn new(config: &Config, root: &Path, namespace: &str) -> Result<Release, UpError> {
        let chart = root.join(config.chart.as_deref().ok_or(UpError::NoChart)?);
        let mut values: Vec<PathBuf> = config.values_files().iter().map(|v| root.join(v)).collect();
        if config.values.is_empty() {
            // The default values file counts only when it exists.
            values.retain(|v| v.is_file());
        }
        Ok(Release {
            name: config.name.clone(),
            namespace: namespace.to_string(),
            chart,
            values,
            image: config.image.clone(),
            separator: config.secret_separator.clone(),
        })
    }
}

/// The `secrets:` trees of the values files, flattened into environment variables:
/// `secrets: {urls: {producer: X}}` → `urls__producer=X`. Later files win.
pub fn secrets_env(values: &[PathBuf], separator: &str) -> Result<BTreeMap<String, String>, UpError> {
    let mut env = BTreeMap::new();
    for path in values {
        let text = crate::config::read_bounded(path, crate::config::MAX_CONFIG_BYTES * 16)
            .map_err(|e| UpError::Values { path: path.clone(), message: e.to_string() })?;
        let doc: Value = serde_yaml_ng::from_str(&text)
            .map_err(|e| UpError::Values { path: path.clone(), message: e.to_string() })?;
        if let Some(secrets) = doc.get("secrets") {
            flatten(secrets, "", separator, &mut env);
        }
    }
    Ok(env)
}

fn flatten(value: &Value, prefix: &str, separator: &str, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Mapping(map) => {
            for (key, value) in map {
                let key = match key {
                    Value::String(s) => s.clone(),
                    other => serde_yaml_ng::to_string(other).unwrap_or_default().trim().to_string(),
                };
                let key = if prefix.is_empty() { key } else { format!("{prefix}{separator}{key}") };
                flatten(value, &key, separator, out);
            }
        }
        Value::Sequence(items) => {
            for (i, value) in items.iter().enumerate() {
                flatten(value, &format!("{prefix}{separator}{i}"), separator, out);
            }
        }
        Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        Value::Null => {
            out.insert(prefix.to_string(), String::new());
        }
        other => {
            out.insert(prefix.to_string(), serde_yaml_ng::to_string(other).unwrap_or_default().trim().to_string());
        }
    }
}

/// `helm upgrade --install`, the secrets passed in a private temporary values file that is
/// removed right after; helm's output is redacted of every secret value. With a `dev` image
/// built in the cluster, the same file pins the pod to the builder's node and runs the image
/// without ever pulling it.
pub async fn deploy(
    release: &Release,
    dev: Option<&super::build::DevImage>,
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> Result<(), UpError> {
    let env = secrets_env(&release.values, &release.separator)?;
    let secrets_file = tempfile::Builder::new().prefix("devloop-secrets-").suffix(".yaml").tempfile()?;
    let mut values = serde_json::json!({"env": env});
    if let Some(dev) = dev {
        let (repository, tag) = dev.image.rsplit_once(':').expect("built images are tagged");
        values["image"] = serde_json::json!({"repository": repository, "tag": tag, "pullPolicy": "Never"});
        values["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": dev.node});
        values["tolerations"] = serde_json::Value::Array(dev.tolerations.clone());
    }
    let document = serde_yaml_ng::to_string(&values).map_err(std::io::Error::other)?;
    std::fs::write(secrets_file.path(), document)?;
    let mut args: Vec<String> = vec!["upgrade".into(), "--install".into(), release.name.clone()];
    args.push(release.chart.display().to_string());
    for values in &release.values {
        args.extend(["--values".into(), values.display().to_string()]);
    }
    args.extend(["--values".into(), secrets_file.path().display().to_string()]);
    if let Some(image) = &release.image {
        let (repository, tag) = image.rsplit_once(':').filter(|(_, t)| !t.contains('/')).unwrap_or((image, "latest"));
        args.extend(["--set-string".into(), format!("image.repository={repository},image.tag={tag}")]);
    }
    let secrets: Vec<&str> = env.values().map(String::as_str).filter(|v| v.len() >= 3).collect();
    helm("upgrade", release, &args, kubeconfig, context, &secrets).await
}

/// `helm uninstall`.
pub async fn remove(release: &Release, kubeconfig: Option<&Path>, context: Option<&str>) -> Result<(), UpError> {
    let args = vec!["uninstall".to_string(), release.name.clone(), "--wait".into()];
    helm("uninstall", release, &args, kubeconfig, context, &[]).await
}

async fn helm(
    action: &'static str,
    release: &Release,
    args: &[String],
    kubeconfig: Option<&Path>,
    context: Option<&str>,
    redact: &[&str],
) -> Result<(), UpError> {
    let mut command = tokio::process::Command::new("helm");
    command.args(args).args(["--namespace", &release.namespace]);
    if let Some(kubeconfig) = kubeconfig {
        command.arg("--kubeconfig").arg(kubeconfig);
    }
    if let Some(context) = context {
        command.args(["--kube-context", context]);
    }
    let output = command.stdin(Stdio::null()).output().await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => UpError::NoHelm,
        _ => UpError::Io(e),
    })?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
    for secret in redact {
        text = text.replace(secret, "***");
    }
    Err(UpError::Helm { action, output: text })
}

/// Waits until the release's Deployment has rolled out; on timeout says why its pods are not Ready.
pub async fn wait_rollout(client: &kube::Client, release: &Release, timeout: Duration) -> Result<(), UpError> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &release.namespace);
    let rolled_out = await_condition(deployments, &release.name, is_rolled_out);
    match tokio::time::timeout(timeout, rolled_out).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(UpError::Rollout { release: release.name.clone(), timeout, why: e.to_string() }),
        Err(_) => {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &release.namespace);
            let found = pods::of_service(&pods, &release.namespace, &release.name).await.map_err(UpError::Cluster)?;
            let why = match found.first() {
                Some(pod) => {
                    format!("pod {}: {}", pod.metadata.name.as_deref().unwrap_or("?"), pods::not_ready_reason(pod))
                }
                None => "no pod was created (check the ReplicaSet's events: quota, admission)".into(),
            };
            Err(UpError::Rollout { release: release.name.clone(), timeout, why })
        }
    }
}

/// A Deployment whose controller saw its latest spec and whose replicas are all updated and
/// available (what `kubectl rollout status` waits for).
fn is_rolled_out(deployment: Option<&Deployment>) -> bool {
    let Some(deployment) = deployment else { return false };
    let wanted = deployment.spec.replicas.unwrap_or(1);
    let generation = deployment.metadata.generation.unwrap_or(0);
    deployment.status.as_ref().is_some_and(|status| {
        status.observed_generation.unwrap_or(0) >= generation
            && status.updated_replicas.unwrap_or(0) >= wanted
            && status.available_replicas.unwrap_or(0) >= wanted
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_flatten_the_way_dotnet_binds_them() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("values.yaml");
        let b = dir.path().join("values.dev.yaml");
        std::fs::write(&a, "secrets:\n  urls:\n    producer: http://old\n  retries: 3\nreplicaCount: 1\n").unwrap();
        std::fs::write(&b, "secrets:\n  urls:\n    producer: http://producer\n  hosts: [a, b]\n").unwrap();
        let env = secrets_env(&[a, b], SEPARATOR).unwrap();
        let expected: BTreeMap<String, String> =
            [("hosts__0", "a"), ("hosts__1", "b"), ("retries", "3"), ("urls__producer", "http://producer")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(env, expected);
    }

    #[test]
    fn a_broken_values_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("values.dev.yaml");
        std::fs::write(&bad, "secrets: [unclosed\n").unwrap();
        let err = secrets_env(std::slice::from_ref(&bad), SEPARATOR).unwrap_err();
        assert!(err.to_string().contains("values.dev.yaml"), "{err}");
    }
}
