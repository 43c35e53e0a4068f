//! The cluster tier: the real API server (built from upstream modules, kwok as the kubelet),
//! reached through kube-rs the way devloop does.
//!
//! Needs `tests/cluster/up`; `tests/run` starts it, sets DEVLOOP_TEST_KUBECONFIG and
//! DEVLOOP_CLUSTER_STATE and runs these tests, which are `#[ignore]`d for a plain `cargo test`
//! (shown as ignored) and fail when run without the control plane.
//! kwok's kubelet runs `exec` commands locally (PATH starts with STATE/exec-bin), forwards pod
//! port 8080 to 127.0.0.1:18080 and serves STATE/logs/pod.log as every pod's log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use devloop::kubernetes::access::{self as cluster, ClusterError, Selection};
use futures::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, AttachParams, DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// kwok's port-forward target and the shared log file make these tests one-at-a-time.
pub(crate) static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(crate) struct Cluster {
    pub(crate) kubeconfig: PathBuf,
    pub(crate) state: PathBuf,
}

pub(crate) fn cluster() -> Cluster {
    match (std::env::var_os("DEVLOOP_TEST_KUBECONFIG"), std::env::var_os("DEVLOOP_CLUSTER_STATE")) {
        (Some(kubeconfig), Some(state)) => Cluster { kubeconfig: kubeconfig.into(), state: state.into() },
        _ => panic!(
            "the cluster tier needs DEVLOOP_TEST_KUBECONFIG and DEVLOOP_CLUSTER_STATE: run tests/run, which starts the control plane"
        ),
    }
}

/// A client as the admin, or as `restricted` (a user with no RBAC rights at all).
pub(crate) async fn client(cluster: &Cluster, user: &str) -> (Client, String) {
    let kubeconfig = match user {
        "admin" => cluster.kubeconfig.clone(),
        other => cluster.state.join(format!("{other}.kubeconfig")),
    };
    let selection = Selection { kubeconfig: Some(kubeconfig), ..Selection::default() };
    cluster::connect(&selection).await.expect("client")
}

/// The start of a test that deploys as the admin: the tier's cluster, a fresh namespace, the
/// admin's client and kubeconfig, and the serial lock, held until the namespace is deleted.
pub(crate) struct AsAdmin {
    // Dropped in this order: the namespace goes before the next test may begin.
    pub(crate) scratch: Scratch,
    pub(crate) client: Client,
    pub(crate) cluster: Cluster,
    pub(crate) kubeconfig: String,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl AsAdmin {
    pub(crate) async fn new() -> AsAdmin {
        let cluster = cluster();
        let serial = SERIAL.lock().await;
        let (client, _) = client(&cluster, "admin").await;
        let scratch = Scratch::new(&client).await;
        let kubeconfig = cluster.kubeconfig.to_str().unwrap().to_string();
        AsAdmin { scratch, client, cluster, kubeconfig, _serial: serial }
    }
}

/// A fresh namespace, deleted afterwards.
pub(crate) struct Scratch {
    client: Client,
    pub(crate) name: String,
}

impl Scratch {
    pub(crate) async fn new(client: &Client) -> Scratch {
        let name = format!("devloop-test-{}", std::process::id() ^ rand_u32());
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.unwrap();
        Scratch { client: client.clone(), name }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let client = self.client.clone();
        let name = self.name.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let _ = rt.block_on(Api::<Namespace>::all(client).delete(&name, &DeleteParams::default()));
        })
        .join()
        .ok();
    }
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    nanos.wrapping_mul(2654435761)
}

/// Puts `devloop-agent` on the PATH of kwok's exec. kwok runs it on this host, so the wrapper
/// maps the container's `/app` to `STATE/pod-root`, the pod's filesystem as far as tests go.
fn install_agent(cluster: &Cluster) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let pod_root = cluster.state.join("pod-root");
    let wrapper = cluster.state.join("exec-bin/devloop-agent");
    let _ = std::fs::remove_file(&wrapper);
    let script = format!(
        "#!/bin/sh\n# devloop-agent in a kwok pod: the container's /app is {root} on this host.\nn=$#\nwhile [ $n -gt 0 ]; do a=$1; shift; [ \"$a\" = /app ] && a={root}; set -- \"$@\" \"$a\"; n=$((n-1)); done\nexec {agent} \"$@\"\n",
        root = pod_root.display(),
        agent = crate::support::agent_bin().display()
    );
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    pod_root
}

/// What most cluster tests start from: an admin client, a scratch namespace, and the Ready pod of
/// a one-replica Deployment named after the test's app.
struct PodTest {
    client: Client,
    scratch: Scratch,
    pod: Pod,
    pods: Api<Pod>,
}

impl PodTest {
    async fn new(cluster: &Cluster, app: &str) -> PodTest {
        let (client, _) = client(cluster, "admin").await;
        let scratch = Scratch::new(&client).await;
        let pod = ready_pod(&client, &scratch.name, app).await;
        let pods = Api::namespaced(client.clone(), &scratch.name);
        PodTest { client, scratch, pod, pods }
    }
}

/// A one-replica Deployment, and its pod once Ready.
async fn ready_pod(client: &Client, ns: &str, name: &str) -> Pod {
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, "app.kubernetes.io/name": name}},
                "spec": {"containers": [{"name": "app", "image": "localhost/devloop-dev:test", "ports": [{"containerPort": 8080}]}]}
            }
        }
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), ns).create(&PostParams::default(), &deployment).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!("app={name}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list = pods.list(&ListParams::default().labels(&selector)).await.unwrap();
        if let Some(pod) = list.items.into_iter().next() {
            let pod_name = pod.metadata.name.clone().unwrap();
            let ready = await_condition(pods.clone(), &pod_name, conditions::is_pod_running());
            tokio::time::timeout(Duration::from_secs(60), ready).await.expect("pod running").unwrap();
            let pod = pods.get(&pod_name).await.unwrap();
            let is_ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if is_ready {
                return pod;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no Ready pod for deployment {name}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn deployment_gets_a_ready_pod() {
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    let PodTest { client: _client, scratch: _scratch, pod, pods: _pods } = PodTest::new(&cluster, "web").await;
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Running"));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn exec_streams_megabytes_both_ways_and_ends_by_its_own_framing() {
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    let PodTest { client: _client, scratch: _scratch, pod, pods } = PodTest::new(&cluster, "exec").await;

    // `head -c N` ends after N bytes: stdin is never closed by us.
    const N: usize = 4 << 20;
    let payload: Vec<u8> = (0..N).map(|i| (i * 7 + i / 4096) as u8).collect();
    let params = AttachParams::default().stdin(true).stdout(true).stderr(false);
    let mut attached =
        pods.exec(pod.metadata.name.as_deref().unwrap(), ["head", "-c", &N.to_string()], &params).await.unwrap();
    let mut stdin = attached.stdin().unwrap();
    let mut stdout = attached.stdout().unwrap();
    let writer = {
        let payload = payload.clone();
        tokio::spawn(async move {
            stdin.write_all(&payload).await.unwrap();
            stdin.flush().await.unwrap();
            stdin
        })
    };
    let mut echoed = Vec::with_capacity(N);
    tokio::time::timeout(Duration::from_secs(60), stdout.read_to_end(&mut echoed))
        .await
        .expect("echo in time")
        .unwrap();
    let _stdin = writer.await.unwrap();
    assert_eq!(echoed.len(), N);
    assert!(echoed == payload, "bytes came back unchanged");
    let status = attached.take_status().unwrap().await.expect("a status");
    assert_eq!(status.status.as_deref(), Some("Success"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn exec_runs_the_agent_protocol_through_the_api_server() {
    use devloop_agent::protocol::{self, FrameReader, FrameWriter, FromAgent, ToAgent};
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    install_agent(&cluster);
    let PodTest { client: _client, scratch: _scratch, pod, pods } = PodTest::new(&cluster, "agent").await;
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("hello.txt"), "from the pod").unwrap();

    let params = AttachParams::default().stdin(true).stdout(true).stderr(false);
    let command = ["devloop-agent", "serve", "--root", root.path().to_str().unwrap()];
    let mut attached = pods.exec(pod.metadata.name.as_deref().unwrap(), command, &params).await.unwrap();
    let mut reader = attached.stdout().unwrap();
    let mut writer = attached.stdin().unwrap();
    protocol::handshake(&mut reader, &mut writer).await.unwrap();
    let mut frames = FrameReader::new(reader);
    let mut out = FrameWriter::new(writer);
    out.message(&ToAgent::Hello {
        client: "test".into(),
        session: String::new(),
        excludes: vec![],
        docker_context: None,
        ask: false,
    })
    .await
    .unwrap();
    out.flush().await.unwrap();
    let mut paths = Vec::new();
    loop {
        match frames.message::<FromAgent>().await.unwrap() {
            FromAgent::Manifest { records } => paths.extend(records.into_iter().map(|r| r.path)),
            FromAgent::ManifestEnd { .. } => break,
            _ => {}
        }
    }
    assert_eq!(paths, ["hello.txt"]);
    out.message(&ToAgent::Bye).await.unwrap();
    out.flush().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), attached.take_status().unwrap())
        .await
        .expect("the agent ends on Bye, without stdin EOF")
        .expect("a status");
    assert_eq!(status.status.as_deref(), Some("Success"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn port_forward_reaches_a_local_server() {
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    let PodTest { client: _client, scratch: _scratch, pod, pods } = PodTest::new(&cluster, "pf").await;

    // The "app": kwok forwards pod port 8080 here.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:18080").await.unwrap();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 5];
        conn.read_exact(&mut buf).await.unwrap();
        conn.write_all(b"pong:").await.unwrap();
        conn.write_all(&buf).await.unwrap();
    });
    let mut forwarder = pods.portforward(pod.metadata.name.as_deref().unwrap(), &[8080]).await.unwrap();
    let mut stream = forwarder.take_stream(8080).unwrap();
    stream.write_all(b"hello").await.unwrap();
    let mut answer = vec![0u8; 10];
    tokio::time::timeout(Duration::from_secs(20), stream.read_exact(&mut answer)).await.expect("in time").unwrap();
    assert_eq!(&answer, b"pong:hello");
    server.await.unwrap();
    drop(stream);
    forwarder.abort();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn logs_follow_new_lines() {
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    let PodTest { client: _client, scratch: _scratch, pod, pods } = PodTest::new(&cluster, "logs").await;
    let file = cluster.state.join("logs/pod.log");
    let marker = format!("marker-{}", rand_u32());

    let append = |text: &str| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
        writeln!(f, "2026-11-30T07:00:00.000000000Z stdout F {text}").unwrap();
    };
    // The API server answers a follow request once the first bytes exist: one line before, one
    // after the stream opened.
    append(&format!("{marker} one"));
    let params = LogParams { follow: true, ..LogParams::default() };
    let stream = pods.log_stream(pod.metadata.name.as_deref().unwrap(), &params);
    let mut lines =
        tokio::time::timeout(Duration::from_secs(20), stream).await.expect("log stream opens").unwrap().lines();
    append(&format!("{marker} two"));
    let mut seen = Vec::new();
    let read = async {
        while let Some(line) = lines.try_next().await.unwrap() {
            if line.contains(&marker) {
                seen.push(line);
                if seen.len() == 2 {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("followed lines arrive");
    assert_eq!(seen, [format!("{marker} one"), format!("{marker} two")]);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn missing_namespace_and_rbac_refusal_are_clear_errors() {
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    let (admin, _) = client(&cluster, "admin").await;
    let configs: Api<ConfigMap> = Api::namespaced(admin.clone(), "no-such-namespace");
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap();
    let err = configs.create(&PostParams::default(), &cm).await.unwrap_err();
    let err = cluster::explain(err, "no-such-namespace");
    assert!(matches!(err, ClusterError::NoNamespace(ref ns) if ns == "no-such-namespace"), "{err:?}");
    assert!(err.hint().unwrap().contains("kubectl create namespace no-such-namespace"));

    let scratch = Scratch::new(&admin).await;
    let (restricted, _) = client(&cluster, "restricted").await;
    let pods: Api<Pod> = Api::namespaced(restricted, &scratch.name);
    let err = cluster::explain(pods.list(&ListParams::default()).await.unwrap_err(), &scratch.name);
    let ClusterError::Forbidden(message) = &err else { panic!("{err:?}") };
    assert!(message.contains("cannot list resource \"pods\""), "names the verb and the resource: {message}");
    assert!(message.contains(&scratch.name), "{message}");
    assert!(err.hint().is_some());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn helm_installs_upgrades_and_uninstalls_a_chart() {
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    let (client, _) = client(&cluster, "admin").await;
    let scratch = Scratch::new(&client).await;
    let chart = tempfile::tempdir().unwrap();
    std::fs::create_dir(chart.path().join("templates")).unwrap();
    std::fs::write(
        chart.path().join("Chart.yaml"),
        "apiVersion: v2\nname: demo\nversion: 0.1.0\nkubeVersion: '>=1.30.0-0'\n",
    )
    .unwrap();
    std::fs::write(chart.path().join("values.yaml"), "greeting: hello\n").unwrap();
    std::fs::write(
        chart.path().join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-config\ndata:\n  greeting: {{ .Values.greeting | quote }}\n",
    )
    .unwrap();
    let helm = |args: &[&str]| {
        let out = std::process::Command::new("helm")
            .args(args)
            .args(["--namespace", &scratch.name, "--kubeconfig"])
            .arg(cluster.state.join("admin.kubeconfig"))
            .output()
            .expect("helm on PATH (tests/run puts the cluster's bin folder there)");
        assert!(out.status.success(), "helm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), &scratch.name);
    let chart_path = chart.path().to_str().unwrap();
    helm(&["upgrade", "--install", "demo", chart_path, "--wait", "--timeout", "60s"]);
    let cm = configs.get("demo-config").await.unwrap();
    assert_eq!(cm.data.unwrap()["greeting"], "hello");
    helm(&["upgrade", "--install", "demo", chart_path, "--set", "greeting=again", "--wait"]);
    assert_eq!(configs.get("demo-config").await.unwrap().data.unwrap()["greeting"], "again");
    helm(&["uninstall", "demo", "--wait"]);
    assert!(configs.get_opt("demo-config").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn devloop_watch_syncs_into_the_service_pod_and_follows_it_when_replaced() {
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    let pod_root = install_agent(&cluster);
    let _ = std::fs::remove_dir_all(&pod_root);
    let PodTest { client, scratch, pod, pods: _pods } = PodTest::new(&cluster, "shop").await;
    let fx = crate::support::Fixture::new("name: shop\n");
    fx.write("src/Program.cs", "class Program {}");
    fx.write("appsettings.json", "{}");
    let kubeconfig = cluster.kubeconfig.to_str().unwrap().to_string();
    let cluster_args = ["--kubeconfig", kubeconfig.as_str(), "-n", scratch.name.as_str()];

    // --once with no --target: the service's pod, found by its label.
    let once = std::process::Command::new(crate::support::devloop_bin())
        .current_dir(&fx.src)
        .args(cluster_args)
        .args(["--json", "watch", "--once"])
        .env("XDG_CACHE_HOME", fx.dir.path().join("cache"))
        .output()
        .unwrap();
    assert_eq!(once.status.code(), Some(0), "{}", String::from_utf8_lossy(&once.stderr));
    crate::support::converge(&fx.src, &pod_root, &[]);

    let mut args: Vec<String> = cluster_args.iter().map(|s| s.to_string()).collect();
    args.extend(["--json".to_string(), "watch".to_string()]);
    let watch = tokio::task::spawn_blocking({
        let src = fx.src.clone();
        move || crate::support::Watch::start(&src, &args.iter().map(String::as_str).collect::<Vec<&str>>())
    });
    let mut watch = watch.await.unwrap();
    fx.write("src/Program.cs", "class Program { static void Main() {} }");
    crate::support::converge(&fx.src, &pod_root, &[]);

    // The pod is replaced (a fresh container, an empty /app): devloop follows the new pod.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &scratch.name);
    pods.delete(pod.metadata.name.as_deref().unwrap(), &DeleteParams::default()).await.unwrap();
    std::fs::remove_dir_all(&pod_root).unwrap();
    std::fs::create_dir_all(&pod_root).unwrap();
    let connected = tokio::task::spawn_blocking(move || {
        watch.wait_for("reconnecting", Duration::from_secs(30));
        watch.wait_for("connected", Duration::from_secs(60));
        watch
    });
    let watch = connected.await.unwrap();
    crate::support::converge(&fx.src, &pod_root, &[]);
    assert_eq!(tokio::task::spawn_blocking(move || watch.stop()).await.unwrap(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn devloop_watch_says_what_is_missing_in_the_cluster() {
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    let (client, _) = client(&cluster, "admin").await;
    let scratch = Scratch::new(&client).await;
    let fx = crate::support::Fixture::new("name: shop\n");
    let run = |kubeconfig: PathBuf, extra: &[&str]| {
        let out = std::process::Command::new(crate::support::devloop_bin())
            .current_dir(&fx.src)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["-n", &scratch.name])
            .args(extra)
            .args(["watch", "--once"])
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = run(cluster.kubeconfig.clone(), &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no pod labelled app.kubernetes.io/name=shop") && stderr.contains("hint:"), "{stderr}");
    let (code, stderr) = run(cluster.state.join("restricted.kubeconfig"), &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot list resource \"pods\"") && stderr.contains("hint:"), "{stderr}");
    let (code, stderr) = run(cluster.kubeconfig.clone(), &["--context", "nope"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no context `nope`") && stderr.contains("kubectl config get-contexts"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn up_once_deploys_syncs_restarts_and_down_removes_it() {
    use k8s_openapi::api::core::v1::Secret;
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    let Stage { pod_root, client, scratch, supervisor } = Stage::new(&cluster).await;

    // The article's consumer, as `devloop prep --public` left it in examples/, whose
    // values.dev.yaml holds `secrets: {urls: {producer: http://producer}}`.
    let temp = tempfile::tempdir().unwrap();
    let src = temp.path().join("consumer");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/consumer"), &src);
    std::fs::write(src.join("message.txt"), "served from the pod").unwrap();
    let mut config = std::fs::read_to_string(src.join("devloop.yaml")).unwrap();
    config.push_str("image: consumer-dev:test\n");
    std::fs::write(src.join("devloop.yaml"), config).unwrap();
    // A class no controller serves (the tier's Traefik would publish an address for the
    // default one: the article's test covers that): the ingress stays Pending, and says why.
    let mut values = std::fs::read_to_string(src.join("values.dev.yaml")).unwrap();
    values.push_str("ingress:\n  className: devloop-none\n");
    std::fs::write(src.join("values.dev.yaml"), values).unwrap();
    let devloop = {
        let (src, kubeconfig, namespace) = (src.clone(), cluster.kubeconfig.clone(), scratch.name.clone());
        let cache = temp.path().join("cache");
        move |args: &[&str]| {
            std::process::Command::new(crate::support::devloop_bin())
                .current_dir(&src)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["-n", &namespace, "--json"])
                .args(args)
                .env("XDG_CACHE_HOME", &cache)
                .output()
                .unwrap()
        }
    };
    let up = tokio::task::spawn_blocking({
        let devloop = devloop.clone();
        move || devloop(&["up", "--once"])
    });
    let up = up.await.unwrap();
    let stdout = String::from_utf8_lossy(&up.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&up.stderr).into_owned();
    drop(supervisor);
    assert_eq!(up.status.code(), Some(0), "{stdout}\n{stderr}");
    let events = crate::support::parse_events(&stdout);
    for kind in ["deploying", "rolled_out", "connected", "applied", "restarted"] {
        assert!(events.iter().any(|e| e["event"] == kind), "no {kind}: {stdout}");
    }
    assert!(
        !stdout.contains("http://producer") && !stderr.contains("http://producer"),
        "a secret leaked: {stdout}{stderr}"
    );

    // The secret reaches the pod's environment through a Secret, named as .NET binds it.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &scratch.name);
    let secret = secrets.get("consumer-env").await.unwrap();
    let value = secret.data.unwrap().get("urls__producer").cloned().unwrap();
    assert_eq!(String::from_utf8(value.0).unwrap(), "http://producer");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &scratch.name);
    let pod =
        pods.list(&ListParams::default().labels("app.kubernetes.io/name=consumer")).await.unwrap().items.remove(0);
    let env_from = pod.spec.unwrap().containers[0].env_from.clone().unwrap();
    assert_eq!(env_from[0].secret_ref.as_ref().unwrap().name, "consumer-env");
    // The values file holds the secret: it never reaches the container's tree.
    crate::support::converge(&src, &pod_root, &["values.dev.yaml", "devloop.schema.json"]);
    assert!(!pod_root.join("values.dev.yaml").exists(), "secrets stay out of the container");

    // The consumer is public: its ingress shows as Pending until it has an address.
    let uris = tokio::task::spawn_blocking({
        let devloop = devloop.clone();
        move || devloop(&["list-uris"])
    })
    .await
    .unwrap();
    let uris = crate::support::parse_events(&String::from_utf8_lossy(&uris.stdout));
    let public = uris.iter().find(|u| u["name"] == "consumer" && u["kind"] == "public").expect("the public URL");
    assert_eq!(public["url"], "Pending", "{uris:?}");
    assert_eq!(public["address"], "-", "{uris:?}");
    let why = public["status"].as_str().unwrap();
    assert!(why.starts_with("Pending: ") && why.contains("IngressClass devloop-none does not exist"), "{why}");

    let down = tokio::task::spawn_blocking(move || devloop(&["down"])).await.unwrap();
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &scratch.name);
    assert!(deployments.get_opt("consumer").await.unwrap().is_none(), "down removed the release");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn up_keeps_syncing_with_a_tunnel_that_list_commands_show() {
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    let Stage { pod_root, client, scratch, supervisor } = Stage::new(&cluster).await;

    let fx = crate::support::Fixture::new("name: web\n");
    std::fs::remove_file(fx.src.join("devloop.yaml")).unwrap();
    let src = fx.src.join("web");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("package.json"), r#"{"name": "web"}"#).unwrap();
    std::fs::write(src.join("message.txt"), "first").unwrap();
    let kubeconfig = cluster.kubeconfig.clone();
    let namespace = scratch.name.clone();
    // The same cache folder as `Watch::start` gives `up` (the source's parent): the record of the
    // running `up` lives there.
    let cache = fx.src.join("cache");
    let devloop = move |args: &[&str]| {
        std::process::Command::new(crate::support::devloop_bin())
            .current_dir(&src)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["-n", &namespace])
            .args(args)
            .env("XDG_CACHE_HOME", &cache)
            .output()
            .unwrap()
    };
    // The chart forwards the service port to pod port 8080, which kwok sends to 127.0.0.1:18080.
    assert!(devloop(&["prep", "--port", "8080"]).status.success());
    let src = fx.src.join("web");
    // Pods on the kwok node run no container: a named image, not an in-cluster build.
    let config = src.join("devloop.yaml");
    let text = std::fs::read_to_string(&config).unwrap() + "image: web-dev:test\n";
    std::fs::write(&config, text).unwrap();
    let args = ["--kubeconfig", cluster.kubeconfig.to_str().unwrap(), "-n", &scratch.name, "--json", "up"];
    let mut up = {
        let src = src.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            crate::support::Watch::start(&src, &args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap()
    };
    let tunnel = up.seen.iter().find(|e| e["event"] == "tunnel").cloned().expect("a tunnel event");
    let url = tunnel["url"].as_str().unwrap().to_string();
    let port: u16 = url.trim_end_matches('/').rsplit(':').next().unwrap().parse().unwrap();
    // prep's .dockerignore keeps the schema (for editors) out of the image and the sync.
    crate::support::converge(&src, &pod_root, &["devloop.schema.json"]);

    // The tunnel reaches the app (through port-forward to the pod).
    let body = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(body) = get_by_length(port) {
                return body;
            }
            assert!(std::time::Instant::now() < deadline, "the tunnel never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    assert_eq!(body, "first");

    // An edit reaches the pod and restarts the app.
    std::fs::write(src.join("message.txt"), "second").unwrap();
    let mut up = tokio::task::spawn_blocking(move || {
        up.wait_for("restarted", Duration::from_secs(30));
        up
    })
    .await
    .unwrap();
    assert_eq!(get_by_length(port).as_deref(), Some("second"));

    // The pod is replaced (a fresh container, an empty /app): `up` follows the new pod.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &scratch.name);
    let old = pods.list(&ListParams::default().labels("app.kubernetes.io/name=web")).await.unwrap().items.remove(0);
    pods.delete(old.metadata.name.as_deref().unwrap(), &DeleteParams::default()).await.unwrap();
    std::fs::remove_dir_all(&pod_root).unwrap();
    std::fs::create_dir_all(&pod_root).unwrap();
    let mut up = tokio::task::spawn_blocking(move || {
        up.wait_for("reconnecting", Duration::from_secs(30));
        up.wait_for("connected", Duration::from_secs(60));
        up
    })
    .await
    .unwrap();
    // prep's .dockerignore keeps the schema (for editors) out of the image and the sync.
    crate::support::converge(&src, &pod_root, &["devloop.schema.json"]);

    // list-up and list-uris, while `up` runs.
    let list_up = devloop(&["--json", "list-up"]);
    let services = crate::support::parse_events(&String::from_utf8_lossy(&list_up.stdout));
    assert_eq!(services.len(), 1, "{services:?}");
    assert_eq!(services[0]["name"], "web");
    assert_eq!(services[0]["status"], "Running");
    assert_ne!(services[0]["last_sync"], "-", "{services:?}");
    let human = String::from_utf8_lossy(&devloop(&["list-up"]).stdout).into_owned();
    assert!(human.starts_with("NAME") && human.contains("web") && human.contains("Running"), "{human}");
    let list_uris = devloop(&["--json", "list-uris"]);
    let uris = crate::support::parse_events(&String::from_utf8_lossy(&list_uris.stdout));
    assert!(uris.iter().any(|u| u["url"] == url.as_str() && u["kind"] == "tunnel"), "{uris:?}");

    up.drain();
    assert_eq!(tokio::task::spawn_blocking(move || up.stop()).await.unwrap(), Some(0));
    let uris = crate::support::parse_events(&String::from_utf8_lossy(&devloop(&["--json", "list-uris"]).stdout));
    assert!(uris.iter().all(|u| u["kind"] != "tunnel"), "the tunnel is gone with `up`: {uris:?}");
    assert!(devloop(&["down"]).status.success());
    drop(supervisor);
}

/// What the `up` tests share: an empty pod folder, a scratch namespace, and the pod's main
/// process (a supervisor of the stand-in app) running on this host.
struct Stage {
    pod_root: PathBuf,
    client: Client,
    scratch: Scratch,
    supervisor: Supervisor,
}

impl Stage {
    async fn new(cluster: &Cluster) -> Stage {
        let pod_root = install_agent(cluster);
        let _ = std::fs::remove_dir_all(&pod_root);
        std::fs::create_dir_all(&pod_root).unwrap();
        let (client, _) = client(cluster, "admin").await;
        let scratch = Scratch::new(&client).await;
        let supervisor = Supervisor::start(&pod_root, &crate::supervise::standin_bin());
        Stage { pod_root, client, scratch, supervisor }
    }
}

/// The container's main process, played on this host: `devloop-agent run` supervising the
/// stand-in app on the port kwok forwards pod port 8080 to. Stopped with SIGTERM on drop (even
/// when a test fails), as a container runtime stops its main process: the app's group goes too.
struct Supervisor(std::process::Child);

impl Supervisor {
    fn start(root: &std::path::Path, standin: &std::path::Path) -> Supervisor {
        let child = std::process::Command::new(crate::support::agent_bin())
            .arg("run")
            .arg("--root")
            .arg(root)
            .args(["--wait", "--ready", "tcp:18080", "--grace", "2s", "--"])
            .arg(standin)
            .args(["--port", "18080", "--file", "message.txt"])
            .spawn()
            .unwrap();
        let socket = devloop_agent::control::socket_path(root);
        for _ in 0..500 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Supervisor(child)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of a process this test started.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

/// GET / reading the body by its Content-Length, as browsers and curl do: through kube-rs
/// port-forward the server closing its side does not reach the client as EOF.
pub(crate) fn get_by_length(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head.lines().find_map(|l| l.strip_prefix("Content-Length: "))?.trim().parse().ok()?;
            if body.len() >= length {
                return Some(body[..length].to_string());
            }
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Before: a namespace whose Pod Security refuses privileged pods, or a user without the rights,
/// met the builder only when it was created: an RBAC hint, and the agent's Secrets left behind.
/// Now both are checked first, the error says which and what to do, and nothing is made.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn the_builder_is_checked_before_it_is_made() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Patch, PatchParams};
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    let (admin, _) = client(&cluster, "admin").await;
    let scratch = Scratch::new(&admin).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("web");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("devloop.yaml"), "name: web\nchart: charts/web\nport: 8080\n").unwrap();
    std::fs::write(src.join("Dockerfile.develop"), "FROM scratch\n").unwrap();
    let up = |kubeconfig: PathBuf| {
        let out = std::process::Command::new(crate::support::devloop_bin())
            .current_dir(&src)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["-n", &scratch.name, "up", "--once"])
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let label = |level: Option<&str>| serde_json::json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": level}}});
    namespaces.patch(&scratch.name, &PatchParams::default(), &Patch::Merge(&label(Some("baseline")))).await.unwrap();
    let (code, stderr) = up(cluster.kubeconfig.clone());
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("enforces Pod Security `baseline`"), "{stderr}");
    assert!(stderr.contains("hint: ") && stderr.contains("image: REPO:TAG"), "{stderr}");
    assert!(!stderr.contains("ask a cluster admin for a Role"), "not the RBAC hint: {stderr}");

    namespaces.patch(&scratch.name, &PatchParams::default(), &Patch::Merge(&label(None))).await.unwrap();
    let (code, stderr) = up(cluster.state.join("restricted.kubeconfig"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("you may not create pods, create pods/exec, create secrets"), "{stderr}");

    // A node whose runtime is not containerd (kwok's) cannot host the builder: said, with what
    // to do, before anything is made.
    std::fs::write(
        src.join("devloop.yaml"),
        "name: web\nchart: charts/web\nport: 8080\nbuilder: {node: kwok-node-0}\n",
    )
    .unwrap();
    let (code, stderr) = up(cluster.kubeconfig.clone());
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("node kwok-node-0 runs kwok-0.8.0, not containerd"), "{stderr}");
    assert!(stderr.contains("hint: name a containerd node"), "{stderr}");

    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &scratch.name);
    let left = secrets.list(&ListParams::default().labels("devloop.dev/part=agent")).await.unwrap();
    assert!(left.items.is_empty(), "no agent Secret is left behind");
    let pods: Api<Pod> = Api::namespaced(admin, &scratch.name);
    assert!(pods.list(&ListParams::default()).await.unwrap().items.is_empty());
}

/// `devloop doctor` says whether `up` can work, one line a check, and exits 0 only then: here as
/// the admin, then in a namespace whose Pod Security refuses the builder, then as a user without
/// rights.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn doctor_says_what_up_needs_and_what_is_missing() {
    use kube::api::{Patch, PatchParams};
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    let (admin, _) = client(&cluster, "admin").await;
    let scratch = Scratch::new(&admin).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("devloop.yaml"), "name: web\nchart: charts/web\npublic: true\n").unwrap();
    std::fs::write(dir.path().join("Dockerfile.develop"), "FROM scratch\n").unwrap();
    let doctor = |kubeconfig: PathBuf| {
        let out = std::process::Command::new(crate::support::devloop_bin())
            .current_dir(dir.path())
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["-n", &scratch.name, "--json", "doctor"])
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .output()
            .unwrap();
        let checks = crate::support::parse_events(&String::from_utf8_lossy(&out.stdout));
        let failed: Vec<String> =
            checks.iter().filter(|c| c["ok"] == false).map(|c| c["check"].as_str().unwrap().to_owned()).collect();
        (out.status.code(), checks, failed)
    };
    let (code, checks, failed) = doctor(cluster.kubeconfig.clone());
    assert_eq!(code, Some(0), "{checks:#?}");
    assert!(failed.is_empty(), "{checks:#?}");
    // The tier's Traefik: a public service's Ingress gets an address.
    let line = checks.iter().find(|c| c["check"] == "ingress").unwrap();
    assert!(line["found"].as_str().unwrap().contains("IngressClass traefik is the default"), "{line}");
    {
        // No default class: the chart's Ingress (no class) would stay Pending. Restored after.
        use k8s_openapi::api::networking::v1::IngressClass;
        struct Restore(PathBuf);
        impl Drop for Restore {
            fn drop(&mut self) {
                let restored = std::process::Command::new("kubectl")
                    .arg("--kubeconfig")
                    .arg(&self.0)
                    .args(["annotate", "--overwrite", "ingressclass", "traefik"])
                    .arg("ingressclass.kubernetes.io/is-default-class=true")
                    .output();
                assert!(restored.is_ok_and(|o| o.status.success()), "the tier's default IngressClass is restored");
            }
        }
        let classes: Api<IngressClass> = Api::all(admin.clone());
        let unset =
            serde_json::json!({"metadata": {"annotations": {"ingressclass.kubernetes.io/is-default-class": "false"}}});
        classes.patch("traefik", &PatchParams::default(), &Patch::Merge(&unset)).await.unwrap();
        let _restore = Restore(cluster.kubeconfig.clone());
        let (code, checks, failed) = doctor(cluster.kubeconfig.clone());
        assert_eq!((code, failed), (Some(1), vec!["ingress".to_string()]), "{checks:#?}");
        let line = checks.iter().find(|c| c["check"] == "ingress").unwrap();
        assert!(line["found"].as_str().unwrap().contains("no default IngressClass (there are traefik)"), "{line}");
        assert!(line["fix"].as_str().unwrap().contains("ingress.className"), "{line}");
    }
    let names: Vec<&str> = checks.iter().map(|c| c["check"].as_str().unwrap()).collect();
    for name in [
        "cluster",
        "namespace",
        "rights",
        "pod security",
        "node runtimes",
        "registry",
        "ingress",
        "helm",
        "static agent",
        "inotify",
    ] {
        assert!(names.contains(&name), "{name} is checked: {names:?}");
    }

    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let baseline = serde_json::json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "baseline"}}});
    namespaces.patch(&scratch.name, &PatchParams::default(), &Patch::Merge(&baseline)).await.unwrap();
    let (code, checks, failed) = doctor(cluster.kubeconfig.clone());
    assert_eq!(code, Some(1), "{checks:#?}");
    assert_eq!(failed, ["pod security"], "{checks:#?}");
    let line = checks.iter().find(|c| c["check"] == "pod security").unwrap();
    assert!(line["fix"].as_str().unwrap().contains("enforce=privileged"), "{line}");

    let (code, checks, failed) = doctor(cluster.state.join("restricted.kubeconfig"));
    assert_eq!(code, Some(1), "{checks:#?}");
    assert!(failed.contains(&"rights".to_string()), "{checks:#?}");
    let line = checks.iter().find(|c| c["check"] == "rights").unwrap();
    assert!(line["found"].as_str().unwrap().contains("create pods/exec"), "{line}");
}

/// A CLI installed alone (`cargo install --path .`: no static agent beside it, none in reach):
/// the first `up` that must build says what is missing and how to install both.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real control plane: tests/run starts it and runs the ignored tests"]
async fn a_cli_installed_without_its_agent_says_how_to_get_it() {
    let admin = AsAdmin::new().await;
    let dir = tempfile::tempdir().unwrap();
    let cli = dir.path().join("bin/devloop");
    std::fs::create_dir_all(cli.parent().unwrap()).unwrap();
    std::fs::copy(crate::support::devloop_bin(), &cli).unwrap();
    let src = dir.path().join("web");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("devloop.yaml"), "name: web\nchart: charts/web\nport: 8080\n").unwrap();
    std::fs::write(src.join("Dockerfile.develop"), "FROM scratch\n").unwrap();
    let (kubeconfig, ns) = (admin.kubeconfig.clone(), admin.scratch.name.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&cli)
            .current_dir(&src)
            .args(["--kubeconfig", &kubeconfig, "-n", &ns, "up", "--once"])
            .env_remove("DEVLOOP_STATIC_AGENT")
            .env("XDG_CACHE_HOME", src.parent().unwrap().join("cache"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no static devloop-agent to put into the image"), "{stderr}");
    assert!(stderr.contains("hint: install devloop with `scripts/install`"), "{stderr}");
    let pods: Api<Pod> = Api::namespaced(admin.client.clone(), &admin.scratch.name);
    assert!(pods.list(&ListParams::default()).await.unwrap().items.is_empty(), "nothing made");
}
