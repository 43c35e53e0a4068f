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
    #[error("the rollout of {release} did not finish: {why}")]
    Rollout { release: String, namespace: String, why: String },
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
            UpError::Rollout { release, namespace, why } if why.contains("ImagePullBackOff") || why.contains("ErrImagePull") => Some(format!(
                "the node's container runtime could not pull the image: check that it reaches the registry by the name in the image (the KEP-1755 hostFromContainerRuntime, or `registry: {{pull: …}}` in devloop.yaml); `kubectl describe pods -n {namespace} -l app.kubernetes.io/name={release}` shows the runtime's error"
            )),
            UpError::Rollout { release, namespace, .. } => Some(format!(
                "`kubectl describe pods -n {namespace} -l app.kubernetes.io/name={release}` and `kubectl logs -n {namespace} deploy/{release}` show more"
            )),
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
    let mut values = serde_json::json!({"env": env});
    if let Some(dev) = dev {
        // `REPO:TAG` or `REPO:TAG@DIGEST`: the tag is what follows the last `:` before any `@`.
        let (name, digest) = dev.image.split_once('@').map(|(n, d)| (n, Some(d))).unwrap_or((&dev.image, None));
        let (repository, tag) = name.rsplit_once(':').expect("built images are tagged");
        let tag = match digest {
            Some(digest) => format!("{tag}@{digest}"),
            None => tag.to_string(),
        };
        match &dev.placement {
            super::build::Placement::Pinned { node, tolerations } => {
                values["image"] = serde_json::json!({"repository": repository, "tag": tag, "pullPolicy": "Never"});
                values["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": node});
                values["tolerations"] = serde_json::Value::Array(tolerations.clone());
            }
            // By digest: the reference never moves, pulled once per node.
            super::build::Placement::Pulled => {
                values["image"] =
                    serde_json::json!({"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"});
            }
        }
    }
    // The private values reach helm on its stdin (`--values -`): never a file in $TMPDIR that an
    // interrupted `up` would leave behind, never a command line.
    let document = serde_yaml_ng::to_string(&values).map_err(std::io::Error::other)?;
    let mut args: Vec<String> = vec!["upgrade".into(), "--install".into(), release.name.clone()];
    args.push(release.chart.display().to_string());
    for values in &release.values {
        args.extend(["--values".into(), values.display().to_string()]);
    }
    args.extend(["--values".into(), "-".into()]);
    if let Some(image) = &release.image {
        let (repository, tag) = image.rsplit_once(':').filter(|(_, t)| !t.contains('/')).unwrap_or((image, "latest"));
        args.extend(["--set-string".into(), format!("image.repository={repository},image.tag={tag}")]);
    }
    let secrets: Vec<&str> = env.values().map(String::as_str).filter(|v| v.len() >= 3).collect();
    helm("upgrade", release, &args, kubeconfig, context, &secrets, Some(document)).await
}

/// `helm uninstall`.
pub async fn remove(release: &Release, kubeconfig: Option<&Path>, context: Option<&str>) -> Result<(), UpError> {
    let args = vec!["uninstall".to_string(), release.name.clone(), "--wait".into()];
    helm("uninstall", release, &args, kubeconfig, context, &[], None).await
}

/// Runs helm; `stdin` is what it reads for `--values -`. Killed if this future is dropped
/// (Ctrl+C): no helm outlives devloop.
async fn helm(
    action: &'static str,
    release: &Release,
    args: &[String],
    kubeconfig: Option<&Path>,
    context: Option<&str>,
    redact: &[&str],
    stdin: Option<String>,
) -> Result<(), UpError> {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new("helm");
    command.args(args).args(["--namespace", &release.namespace]);
    if let Some(kubeconfig) = kubeconfig {
        command.arg("--kubeconfig").arg(kubeconfig);
    }
    if let Some(context) = context {
        command.args(["--kube-context", context]);
    }
    command.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    command.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => UpError::NoHelm,
        _ => UpError::Io(e),
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).await?;
        drop(pipe);
    }
    let output = child.wait_with_output().await?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
    for secret in redact {
        text = text.replace(secret, "***");
    }
    Err(UpError::Helm { action, output: text })
}

/// How a rollout ended.
#[derive(Debug, PartialEq)]
pub enum Rollout {
    /// Every replica is updated and available, and no old one is left.
    Done,
    /// A dev pod of the new ReplicaSet runs (its agent answers) but its app is not Ready: `up`
    /// goes on, so that the fix can reach it.
    AppNotReady { pod: String, why: String, last_lines: Vec<String> },
}

/// How long a running dev pod may stay not Ready before `up` goes on without it.
const NOT_READY_GRACE: Duration = Duration::from_secs(4);

/// Waits until the release's Deployment has rolled out. A new pod that cannot start
/// (ErrImageNeverPull, CrashLoopBackOff, unschedulable) or a Deployment past its progress
/// deadline is an error naming the reason; with `dev`, a new pod whose container runs but whose
/// app stays not Ready ends the wait too ([`Rollout::AppNotReady`]).
pub async fn wait_rollout(
    client: &kube::Client,
    release: &Release,
    timeout: Duration,
    dev: bool,
) -> Result<Rollout, UpError> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &release.namespace);
    let rolled_out = await_condition(deployments, &release.name, is_rolled_out);
    let failed =
        |why: String| UpError::Rollout { release: release.name.clone(), namespace: release.namespace.clone(), why };
    tokio::select! {
        done = rolled_out => match done {
            Ok(_) => Ok(Rollout::Done),
            Err(e) => Err(failed(e.to_string())),
        },
        trouble = trouble(client, release, dev) => trouble.map_err(failed),
        _ = tokio::time::sleep(timeout) => {
            let waited = format!("not done within {timeout:?}");
            let found = pods::current(client, &release.namespace, &release.name).await.map_err(UpError::Cluster)?;
            let why = match found.first() {
                Some(pod) => {
                    format!("{waited}; pod {}: {}", pod.metadata.name.as_deref().unwrap_or("?"), pods::not_ready_reason(pod))
                }
                None => format!("{waited}; no pod was created (check the ReplicaSet's events: quota, admission)"),
            };
            Err(failed(why))
        }
    }
}

/// Watches the newest pod of a rollout for what ends it without success (`Err`, the reason),
/// and, for a dev pod, for an app that stays not Ready while its container runs. Never
/// resolves otherwise. (It reads the Deployment, its current ReplicaSet and its pods: a
/// quarter-second look at all three.)
async fn trouble(client: &kube::Client, release: &Release, dev: bool) -> Result<Rollout, String> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &release.namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &release.namespace);
    let mut running_since: Option<(String, tokio::time::Instant)> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(Some(deployment)) = deployments.get_opt(&release.name).await else { continue };
        if let Some(why) = progress_failed(&deployment) {
            return Err(why);
        }
        let Ok(found) = pods::current(client, &release.namespace, &release.name).await else { continue };
        // The newest pod of the current ReplicaSet: the one the rollout waits for.
        let Some(pod) = found.first() else { continue };
        let name = pod.metadata.name.clone().unwrap_or_default();
        if let Some(why) = cannot_start(pod) {
            return Err(format!("pod {name}: {why}"));
        }
        if !dev || pods::is_ready(pod) || !pods::is_running(pod, &release.name) {
            running_since = None;
            continue;
        }
        let since = match &running_since {
            Some((seen, since)) if *seen == name => *since,
            _ => {
                running_since = Some((name.clone(), tokio::time::Instant::now()));
                continue;
            }
        };
        if since.elapsed() >= NOT_READY_GRACE {
            let container = pods::dev_container(pod, &release.name);
            let params = kube::api::LogParams { container, tail_lines: Some(10), ..Default::default() };
            let log = pods.logs(&name, &params).await.unwrap_or_default();
            let last_lines = log.lines().map(str::to_owned).collect();
            return Ok(Rollout::AppNotReady { pod: name, why: pods::not_ready_reason(pod), last_lines });
        }
    }
}

/// Why a Deployment's rollout stopped progressing (`Progressing` false, as
/// ProgressDeadlineExceeded), if it did.
fn progress_failed(deployment: &Deployment) -> Option<String> {
    let conditions = deployment.status.as_ref()?.conditions.as_ref()?;
    let stalled = conditions
        .iter()
        .find(|c| c.type_.as_deref() == Some("Progressing") && c.status.as_deref() == Some("False"))?;
    Some(format!(
        "{}: {}",
        stalled.reason.as_deref().unwrap_or("not progressing"),
        stalled.message.as_deref().unwrap_or("")
    ))
}

/// Why a new pod cannot start and waiting will not help: the image cannot be had, the
/// container keeps dying, no node takes the pod.
pub fn cannot_start(pod: &Pod) -> Option<String> {
    const FATAL: [&str; 7] = [
        "ErrImageNeverPull",
        "InvalidImageName",
        "ImagePullBackOff",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    ];
    let status = pod.status.as_ref()?;
    for container in status.container_statuses.iter().flatten() {
        let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) else { continue };
        let reason = waiting.reason.as_deref().unwrap_or_default();
        if FATAL.contains(&reason) {
            let message = waiting.message.as_deref().unwrap_or_default();
            return Some(format!("container {} is {reason} {message}", container.name).trim().to_string());
        }
    }
    let unschedulable =
        status.conditions.iter().flatten().find(|c| {
            c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
        })?;
    Some(format!("no node can run it: {}", unschedulable.message.as_deref().unwrap_or("Unschedulable")))
}

/// A Deployment rolled out as `kubectl rollout status` sees it: its controller saw the latest
/// spec, every replica is updated, no old one is left, and every updated one is available.
fn is_rolled_out(deployment: Option<&Deployment>) -> bool {
    let Some(deployment) = deployment else { return false };
    let wanted = deployment.spec.replicas.unwrap_or(1);
    let generation = deployment.metadata.generation.unwrap_or(0);
    deployment.status.as_ref().is_some_and(|status| {
        let updated = status.updated_replicas.unwrap_or(0);
        status.observed_generation.unwrap_or(0) >= generation
            && updated >= wanted
            && status.replicas.unwrap_or(0) <= updated
            && status.available_replicas.unwrap_or(0) >= updated
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(
        generation: i64,
        observed: i64,
        replicas: i32,
        updated: i32,
        available: i32,
        total: i32,
    ) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "generation": generation},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
            "status": {
                "observedGeneration": observed,
                "updatedReplicas": updated,
                "availableReplicas": available,
                "replicas": total
            }
        }))
        .unwrap()
    }

    /// A hint names a command that works as it is: in the service's namespace, not the default one.
    #[test]
    fn hints_name_commands_for_the_right_namespace() {
        let rollout = UpError::Rollout { release: "web".into(), namespace: "team-a".into(), why: "x".into() };
        let hint = rollout.hint().unwrap();
        assert!(hint.contains("kubectl describe pods -n team-a -l app.kubernetes.io/name=web"), "{hint}");
        assert!(hint.contains("kubectl logs -n team-a deploy/web"), "{hint}");
        let pod =
            super::pods::PodError::NotRunning { namespace: "team-a".into(), pod: "web-1".into(), why: "x".into() };
        assert!(pod.hint().unwrap().contains("kubectl describe pod web-1 -n team-a"));
        let builder = super::super::build::BuildError::Builder { namespace: "team-a".into(), message: "x".into() };
        assert!(builder.hint().unwrap().contains("kubectl logs devloop-builder -n team-a"));
    }

    /// What `kubectl rollout status` waits for, case by case.
    #[test]
    fn rolled_out_as_kubectl_sees_it() {
        assert!(is_rolled_out(Some(&deployment(2, 2, 1, 1, 1, 1))));
        assert!(!is_rolled_out(None));
        assert!(!is_rolled_out(Some(&deployment(3, 2, 1, 1, 1, 1))), "the controller has not seen the new spec");
        assert!(!is_rolled_out(Some(&deployment(2, 2, 1, 0, 1, 1))), "no replica is updated yet");
        assert!(!is_rolled_out(Some(&deployment(2, 2, 1, 1, 1, 2))), "the old pod is still counted");
        assert!(!is_rolled_out(Some(&deployment(2, 2, 1, 1, 0, 1))), "the new pod is not available");
        assert!(!is_rolled_out(Some(&deployment(2, 2, 2, 2, 1, 2))), "one of two updated is not available");
    }

    #[test]
    fn a_new_pod_that_cannot_start_says_why() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1"},
            "status": {"containerStatuses": [{
                "name": "web", "image": "devloop.local/web:1", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "image is not present with pull policy of Never"}}
            }]}
        }))
        .unwrap();
        assert_eq!(
            cannot_start(&pod).unwrap(),
            "container web is ErrImageNeverPull image is not present with pull policy of Never"
        );
        let unschedulable: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1"},
            "status": {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."
            }]}
        }))
        .unwrap();
        assert!(cannot_start(&unschedulable).unwrap().contains("didn't match"), "{:?}", cannot_start(&unschedulable));
        let starting: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1"},
            "status": {"phase": "Pending", "containerStatuses": [{
                "name": "web", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}
            }]}
        }))
        .unwrap();
        assert_eq!(cannot_start(&starting), None);
    }

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
