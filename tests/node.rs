//! The real-node tier: a real kubelet with containerd, runc and the CNI bridge, joined to the
//! control plane by tests/cluster/node-up. Pods here run real containers: the image
//! `devloop.local/devbase:1` (busybox, the static agent, the static stand-in app), imported into
//! the node's image store and run with `imagePullPolicy: Never`.
//!
//! `#[ignore]`d for a plain `cargo test`; tests/run runs them, and they fail without the node.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::kubernetes::{client, cluster, AsAdmin, Scratch, SERIAL};
use crate::support::{self, Fixture};

pub(crate) const NODE: &str = "devloop-node";

/// A Deployment of one replica on the real node: `devloop-agent run` as the container's main
/// process, supervising the stand-in app (started on the first sync) on port 8080.
async fn deploy_on_the_real_node(client: &Client, ns: &str, name: &str) -> Pod {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    assert!(
        nodes.get_opt(NODE).await.unwrap().is_some(),
        "the real node {NODE} is not joined: tests/cluster/up joins it (unless DEVLOOP_REAL_NODE=0)"
    );
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": name}},
                "spec": {
                    "nodeSelector": {"devloop.dev/real-node": "true"},
                    "tolerations": [{"key": "devloop.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}],
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "app",
                        "image": "devloop.local/devbase:1",
                        "imagePullPolicy": "Never",
                        "command": ["devloop-agent", "run", "--root", "/app", "--grace", "2s", "--wait",
                                    "--ready", "tcp:8080", "--", "standin", "--port", "8080", "--file", "message.txt"],
                        "ports": [{"containerPort": 8080}]
                    }]
                }
            }
        }
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), ns).create(&PostParams::default(), &deployment).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!("app.kubernetes.io/name={name}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let list = pods.list(&ListParams::default().labels(&selector)).await.unwrap();
        if let Some(pod) = list.items.into_iter().find(devloop::kubernetes::pods::is_ready) {
            assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some(NODE));
            return pod;
        }
        if tokio::time::Instant::now() > deadline {
            let list = pods.list(&ListParams::default().labels(&selector)).await.unwrap();
            let why: Vec<String> = list.items.iter().map(devloop::kubernetes::pods::not_ready_reason).collect();
            panic!("no Ready pod on the real node within 90s: {why:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The host pid of the process whose command line contains all of `words` (the container's
/// processes are the host's, in their own namespaces).
pub(crate) fn host_pid(words: &[&str]) -> i32 {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if words.iter().all(|w| args.iter().any(|a| a == w)) {
            return pid;
        }
    }
    panic!("no process with {words:?}");
}

/// GET / of pod port 8080 through the API server's port-forward (kube-rs), read by Content-Length.
async fn get_through_port_forward(pods: &Api<Pod>, pod: &str) -> String {
    let got = tokio::time::timeout(Duration::from_secs(10), try_get(pods, pod)).await.ok().flatten();
    got.unwrap_or_else(|| panic!("pod {pod} served nothing through the port-forward"))
}

/// `devloop watch --once` against the service's pod (no `--target`), off the async runtime.
async fn once(fx: &Fixture, kubeconfig: &str, ns: &str) -> support::Run {
    let (src, cache) = (fx.src.clone(), fx.dir.path().join("cache"));
    let args: Vec<String> =
        ["--kubeconfig", kubeconfig, "-n", ns, "--json", "watch", "--once"].iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || once_blocking(&src, &cache, &args)).await.unwrap()
}

pub(crate) fn once_blocking(src: &std::path::Path, cache: &std::path::Path, args: &[String]) -> support::Run {
    let output = std::process::Command::new(support::devloop_bin())
        .current_dir(src)
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .output()
        .unwrap();
    support::Run {
        code: output.status.code(),
        events: support::parse_events(&String::from_utf8_lossy(&output.stdout)),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real node: tests/run starts it and runs the ignored tests"]
async fn a_real_container_runs_the_agent_as_pid_1_takes_50_mb_through_exec_and_serves_through_port_forward() {
    let cluster = cluster();
    let _serial = SERIAL.lock().await;
    let (client, _) = client(&cluster, "admin").await;
    let scratch = Scratch::new(&client).await;
    let pod = deploy_on_the_real_node(&client, &scratch.name, "realapp").await;
    let pod_name = pod.metadata.name.clone().unwrap();

    // The agent is the container's main process: PID 1 in its own PID namespace.
    let agent = host_pid(&["devloop-agent", "run", "/app", "--wait", "standin"]);
    let status = std::fs::read_to_string(format!("/proc/{agent}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "{nspid}");

    // ≥ 50 MB through one real exec (containerd's exec stdin is known to drop partial 32 KiB
    // blocks when the command does not answer; the agent answers).
    let fx = Fixture::new("name: realapp\n");
    fx.write("message.txt", "hello from a real container");
    for i in 0..50u32 {
        let body: Vec<u8> = (0..1u32 << 20).map(|j| (j.wrapping_mul(2654435761).wrapping_add(i) >> 13) as u8).collect();
        let path = fx.src.join(format!("blobs/blob{i:02}.bin"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
    let kubeconfig = cluster.kubeconfig.to_str().unwrap().to_string();
    let run = once(&fx, &kubeconfig, &scratch.name).await;
    assert_eq!(run.code, Some(0), "{}\n{:?}", run.stderr, run.events);
    let bytes: u64 = run.of("applied").iter().map(|e| e["bytes"].as_u64().unwrap()).sum();
    assert!(bytes >= 50 << 20, "{bytes} bytes applied");
    // Compared byte for byte through the container's own root, read from the host.
    let app = PathBuf::from(format!("/proc/{agent}/root/app"));
    support::converge(&fx.src, &app, &[]);

    // The app restarted on the sync and serves the synced file, through the API server.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &scratch.name);
    assert_eq!(get_through_port_forward(&pods, &pod_name).await, "hello from a real container");

    // An edit: synced, the app restarted (its whole process tree), the new content served.
    fx.write("message.txt", "edited on the laptop");
    let run = once(&fx, &kubeconfig, &scratch.name).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.of("applied")[0]["files"], 1, "{:?}", run.events);
    assert_eq!(run.of("restarted").len(), 1, "{:?}", run.events);
    assert_eq!(get_through_port_forward(&pods, &pod_name).await, "edited on the laptop");
}

/// `parent/name` as `prep --port 8080 EXTRA…` leaves it (a Python folder), its
/// `Dockerfile.develop` replaced by one the real node builds offline: FROM the busybox base
/// image, the agent devloop puts into the context, the code, `cmd` (a JSON exec-form array) run
/// by the agent.
pub(crate) fn prepped_service(parent: &std::path::Path, name: &str, extra: &[&str], cmd: &str) -> PathBuf {
    let src = parent.join(name);
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("requirements.txt"), "").unwrap();
    let prep = std::process::Command::new(support::devloop_bin())
        .current_dir(&src)
        .args(["prep", "--port", "8080"])
        .args(extra)
        .output()
        .unwrap();
    assert!(prep.status.success(), "{}", String::from_utf8_lossy(&prep.stderr));
    // A line of its own per run: the node may hold the images of earlier runs.
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::fs::write(
        src.join("Dockerfile.develop"),
        format!("# run {run}\n") + "FROM devloop.local/devbase:1\nCOPY devloop-agent /bin/devloop-agent\nCOPY . /app\nWORKDIR /app\n\
         ENTRYPOINT [\"devloop-agent\", \"run\", \"--root\", \"/app\", \"--grace\", \"2s\", \"--ready\", \"tcp:8080\", \"--\"]\n"
            + &format!("CMD {cmd}\n"),
    )
    .unwrap();
    src
}

/// A service folder as `prep` leaves it, with a dev image the real node can build offline:
/// FROM the busybox base image, the agent that devloop puts into the context, the code.
fn built_service(state: &std::path::Path) -> (tempfile::TempDir, PathBuf) {
    built_service_named(
        state,
        "built",
        r#"["standin", "--port", "8080", "--file", "message.txt", "--bind", "0.0.0.0"]"#,
    )
}

/// [`built_service`] named `name`, its app started by `cmd` (a JSON exec-form array).
pub(crate) fn built_service_named(state: &std::path::Path, name: &str, cmd: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = prepped_service(dir.path(), name, &[], cmd);
    std::fs::write(src.join("message.txt"), "built in the cluster").unwrap();
    // The node's containerd socket is found (its kubelet's configz names it); the tier's node
    // has no shared mount at the standard BuildKit root. No registry: the tier publishes one,
    // and these tests are of the no-registry build (tests/article.rs pushes).
    let config = format!(
        "name: {name}\nchart: charts/{name}\nport: 8080\nregistry: none\n\
         builder: {{node: {NODE}, root: {}}}\n",
        state.join("buildkit").display()
    );
    std::fs::write(src.join("devloop.yaml"), config).unwrap();
    (dir, src)
}

pub(crate) async fn up_once(src: &std::path::Path, kubeconfig: &str, ns: &str) -> support::Run {
    let (src, cache) = (src.to_path_buf(), src.parent().unwrap().join("cache"));
    let args: Vec<String> =
        ["--kubeconfig", kubeconfig, "-n", ns, "--json", "up", "--once"].iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || once_blocking(&src, &cache, &args)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real node: tests/run starts it and runs the ignored tests"]
async fn up_builds_the_dev_image_in_the_cluster_and_only_when_its_inputs_change() {
    let admin = AsAdmin::new().await;
    let (cluster, client, scratch, kubeconfig) =
        (&admin.cluster, &admin.client, &admin.scratch, admin.kubeconfig.clone());
    let (_dir, src) = built_service(&cluster.state);

    let first = up_once(&src, &kubeconfig, &scratch.name).await;
    assert_eq!(first.code, Some(0), "{}\n{:#?}", first.stderr, first.events);
    let built = first.of("built");
    assert_eq!(built.len(), 1, "{:?}", first.events);
    let image = built[0]["image"].as_str().unwrap().to_string();
    assert!(image.starts_with("devloop.local/built:"), "{image}");
    assert!(!first.of("build_step").is_empty(), "the build's steps are streamed");
    assert!(first.of("context_synced")[0]["bytes"].as_u64().unwrap() > 0);

    // The pod runs that image from the node's store, never pulled, on the builder's node.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &scratch.name);
    let list = pods.list(&ListParams::default().labels("app.kubernetes.io/name=built")).await.unwrap();
    let pod = list.items.iter().find(|p| devloop::kubernetes::pods::is_ready(p)).expect("a Ready pod");
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(NODE));
    assert_eq!(spec.containers[0].image.as_deref(), Some(image.as_str()));
    assert_eq!(spec.containers[0].image_pull_policy.as_deref(), Some("Never"));
    let pod_name = pod.metadata.name.clone().unwrap();
    assert_eq!(get_through_port_forward(&pods, &pod_name).await, "built in the cluster");
    // Never a registry: no pull was even tried.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &scratch.name);
    let pulls: Vec<_> = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={pod_name}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| matches!(e.reason.as_deref(), Some("Pulling" | "Failed" | "ErrImagePull" | "ErrImageNeverPull")))
        .collect();
    assert!(pulls.is_empty(), "{pulls:?}");

    // Nothing changed: nothing is built.
    let second = up_once(&src, &kubeconfig, &scratch.name).await;
    assert_eq!(second.code, Some(0), "{}", second.stderr);
    assert!(second.of("built").is_empty(), "{:?}", second.events);
    assert_eq!(second.of("build_skipped")[0]["image"], image.as_str());

    // A source edit is a sync, not a build input: still nothing to build.
    std::fs::write(src.join("message.txt"), "edited").unwrap();
    let third = up_once(&src, &kubeconfig, &scratch.name).await;
    assert_eq!(third.code, Some(0), "{}", third.stderr);
    assert!(third.of("built").is_empty());

    // One build input changed: a new image, and only that file travels to the builder.
    let dockerfile = src.join("Dockerfile.develop");
    let mut text = std::fs::read_to_string(&dockerfile).unwrap();
    text.push_str("# a comment changes the build inputs\n");
    std::fs::write(&dockerfile, &text).unwrap();
    let fourth = up_once(&src, &kubeconfig, &scratch.name).await;
    assert_eq!(fourth.code, Some(0), "{}\n{:#?}", fourth.stderr, fourth.events);
    assert_eq!(fourth.of("built").len(), 1);
    assert_ne!(fourth.of("built")[0]["image"], image.as_str());
    let context = fourth.of("context_synced")[0];
    assert_eq!(context["files"], 2, "Dockerfile.develop and message.txt: {context}");
    assert!(context["bytes"].as_u64().unwrap() <= text.len() as u64 + 16, "{context}");

    // `down`: the release, and the builder with it (no other service of the namespace uses it).
    let down = {
        let (src, cache) = (src.clone(), src.parent().unwrap().join("cache"));
        let args: Vec<String> = ["--kubeconfig", &kubeconfig, "-n", &scratch.name, "--json", "down"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        tokio::task::spawn_blocking(move || once_blocking(&src, &cache, &args)).await.unwrap()
    };
    assert_eq!(down.code, Some(0), "{}", down.stderr);
    let removed: Vec<&str> = down.of("removed").iter().map(|e| e["release"].as_str().unwrap()).collect();
    assert_eq!(removed, ["built", "devloop-builder"]);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &scratch.name);
    let left = secrets.list(&ListParams::default().labels("devloop.dev/part=agent")).await.unwrap();
    assert!(left.items.is_empty());
}

/// GET / of the service's newest Ready pod (port 8080, through the API server's port-forward),
/// retried until it answers `want`. Runs on a blocking thread, driving the runtime it came from.
fn served(handle: &tokio::runtime::Handle, pods: &Api<Pod>, want: &str, timeout: Duration) -> Result<(), String> {
    served_by(handle, pods, "built", want, timeout)
}

/// [`served`] by service `name`.
pub(crate) fn served_by(
    handle: &tokio::runtime::Handle,
    pods: &Api<Pod>,
    name: &str,
    want: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = None;
    while std::time::Instant::now() < deadline {
        last = handle.block_on(async {
            let pod = devloop::kubernetes::pods::ready(pods, "", name).await.ok()?;
            let name = pod.metadata.name?;
            tokio::time::timeout(Duration::from_secs(5), try_get(pods, &name)).await.ok()?
        });
        if last.as_deref() == Some(want) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("the pod served {last:?}, not {want:?}"))
}

/// GET / of pod port 8080 through the API server's port-forward, `None` when it fails.
pub(crate) async fn try_get(pods: &Api<Pod>, pod: &str) -> Option<String> {
    let mut forwarder = pods.portforward(pod, &[8080]).await.ok()?;
    let mut stream = forwarder.take_stream(8080)?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
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

/// `up` running on the real node: edits sync and restart, a Dockerfile edit rebuilds and rolls
/// out a new pod without `up` exiting, a broken Dockerfile leaves the old pod serving and shows
/// the failing step, the fix recovers, a values edit upgrades without a build, a deleted pod is
/// followed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real node: tests/run starts it and runs the ignored tests"]
async fn up_rebuilds_on_a_dockerfile_edit_and_a_broken_build_keeps_the_old_pod_serving() {
    let admin = AsAdmin::new().await;
    let (cluster, client, scratch, kubeconfig) =
        (&admin.cluster, &admin.client, &admin.scratch, admin.kubeconfig.clone());
    let (_dir, src) = built_service(&cluster.state);
    let first = up_once(&src, &kubeconfig, &scratch.name).await;
    assert_eq!(first.code, Some(0), "{}\n{:#?}", first.stderr, first.events);

    let ns = scratch.name.clone();
    let mut watch = tokio::task::spawn_blocking(move || {
        let args = ["--kubeconfig", kubeconfig.as_str(), "-n", ns.as_str(), "--json", "up"];
        support::Watch::start(&src.clone(), &args)
    })
    .await
    .unwrap();
    let src = {
        let tunnel = watch.seen.iter().any(|e| e["event"] == "tunnel");
        assert!(tunnel, "{:?}", watch.seen);
        _dir.path().join("built")
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &scratch.name);
    let handle = tokio::runtime::Handle::current();
    let (pods2, handle2) = (pods.clone(), handle.clone());
    let watch = tokio::task::spawn_blocking(move || {
        let served = |want: &str, secs: u64| served(&handle2, &pods2, want, Duration::from_secs(secs));
        served("built in the cluster", 20).unwrap();

        // A source edit: synced, restarted, served.
        std::fs::write(src.join("message.txt"), "edited while up runs").unwrap();
        watch.wait_for("restarted", Duration::from_secs(20));
        served("edited while up runs", 20).unwrap();

        // A Dockerfile edit: rebuilt, a new pod rolled out, served; `up` goes on.
        let dockerfile = src.join("Dockerfile.develop");
        let good = std::fs::read_to_string(&dockerfile).unwrap();
        let with_run = good.replace("WORKDIR /app\n", "WORKDIR /app\nRUN echo a RUN step > /built.txt\n");
        std::fs::write(&dockerfile, &with_run).unwrap();
        let rebuilding = watch.wait_for("rebuilding", Duration::from_secs(20));
        assert_eq!(rebuilding["path"], "Dockerfile.develop");
        watch.wait_for("built", Duration::from_secs(120));
        watch.wait_for("rolled_out", Duration::from_secs(120));
        watch.wait_for("connected", Duration::from_secs(60));
        served("edited while up runs", 30).unwrap();

        // A broken Dockerfile: the failing step is shown, the running pod keeps serving.
        std::fs::write(&dockerfile, with_run.replace("RUN echo a RUN step", "RUN echo about to fail && false &&"))
            .unwrap();
        watch.wait_for("rebuilding", Duration::from_secs(20));
        let error = watch.wait_for("error", Duration::from_secs(120));
        assert!(error["message"].as_str().unwrap().contains("failed"), "{error}");
        assert!(error["message"].as_str().unwrap().contains("about to fail"), "the step's output: {error}");
        watch.wait_for("connected", Duration::from_secs(60));
        served("edited while up runs", 30).unwrap();

        // Fixed: it recovers.
        std::fs::write(&dockerfile, &good).unwrap();
        watch.wait_for("rebuilding", Duration::from_secs(20));
        watch.wait_for("rolled_out", Duration::from_secs(120));
        watch.wait_for("connected", Duration::from_secs(60));
        served("edited while up runs", 30).unwrap();

        // A values edit: the release is upgraded, nothing built.
        let mark = watch.seen.len();
        std::fs::write(src.join("values.dev.yaml"), "replicaCount: 1\nsecrets:\n  greeting: hi\n").unwrap();
        let rebuilding = watch.wait_for("rebuilding", Duration::from_secs(20));
        assert_eq!(rebuilding["path"], "values.dev.yaml");
        watch.wait_for("rolled_out", Duration::from_secs(120));
        watch.wait_for("connected", Duration::from_secs(60));
        assert!(watch.seen[mark..].iter().all(|e| e["event"] != "built"), "{:?}", &watch.seen[mark..]);
        assert!(watch.seen[mark..].iter().any(|e| e["event"] == "build_skipped"));
        watch
    })
    .await
    .unwrap();

    // The pod deleted: `up` follows its replacement and resyncs.
    let list = pods.list(&ListParams::default().labels("app.kubernetes.io/name=built")).await.unwrap();
    for pod in list.items {
        pods.delete(&pod.metadata.name.unwrap(), &Default::default()).await.unwrap();
    }
    let mut watch = watch;
    let watch = tokio::task::spawn_blocking(move || {
        watch.wait_for("reconnecting", Duration::from_secs(30));
        watch.wait_for("connected", Duration::from_secs(90));
        served(&handle, &pods, "edited while up runs", Duration::from_secs(30)).unwrap();
        watch
    })
    .await
    .unwrap();
    assert_eq!(watch.stop(), Some(0));
}

/// The Python example as a new user takes it: `prep`, then `up` — the image built in the cluster
/// FROM a Debian + python3 base (named through the BASE build arg; no registry), the agent PID 1
/// of the real container supervising `python app.py`, `list-uris` naming the localhost tunnel
/// that answers through a real port-forward; `down` removes it all.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real node: tests/run starts it and runs the ignored tests"]
async fn the_python_example_from_prep_to_up_to_down_on_a_real_node() {
    let admin = AsAdmin::new().await;
    let (cluster, scratch, kubeconfig) = (&admin.cluster, &admin.scratch, admin.kubeconfig.clone());
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("hello");
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    for file in ["app.py", "message.txt", "requirements.txt", "static/site.css"] {
        support::write(&src, file, &std::fs::read_to_string(example.join(file)).unwrap());
    }
    let prep = std::process::Command::new(support::devloop_bin())
        .current_dir(&src)
        .args(["prep", "--port", "8080"])
        .output()
        .unwrap();
    assert!(prep.status.success(), "{}", String::from_utf8_lossy(&prep.stderr));
    let mut config = std::fs::read_to_string(src.join("devloop.yaml")).unwrap();
    config.push_str(&format!(
        "registry: none\nbuilder: {{node: {NODE}, root: {}}}\nbuild_args: {{BASE: 'devloop.local/python:3.11'}}\n",
        cluster.state.join("buildkit").display()
    ));
    std::fs::write(src.join("devloop.yaml"), config).unwrap();
    std::fs::write(src.join("message.txt"), "hello from python on a real node").unwrap();
    // A line of its own per run, so that this run builds (the node keeps earlier runs' images).
    let dockerfile = src.join("Dockerfile.develop");
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let text = std::fs::read_to_string(&dockerfile).unwrap() + &format!("# run {run}\n");
    std::fs::write(&dockerfile, text).unwrap();

    let ns = scratch.name.clone();
    let global: Vec<String> =
        ["--kubeconfig", kubeconfig.as_str(), "-n", ns.as_str(), "--json"].iter().map(|a| a.to_string()).collect();
    let (src2, global2) = (src.clone(), global.clone());
    let (watch, uris) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = global2.iter().map(String::as_str).chain(["up"]).collect();
        let watch = support::Watch::start_within(&src2, &args, Duration::from_secs(240));
        assert!(watch.seen.iter().any(|e| e["event"] == "built"), "{:?}", watch.seen);
        // The image holds the code already: the first sync finds the pod up to date.
        assert!(watch.seen.iter().any(|e| e["event"] == "up_to_date"), "{:?}", watch.seen);
        let args: Vec<String> = global2.iter().cloned().chain(["list-uris".to_string()]).collect();
        let uris = once_blocking(&src2, &src2.parent().unwrap().join("cache"), &args);
        (watch, uris)
    })
    .await
    .unwrap();
    let tunnel = uris.events.iter().find(|e| e["kind"] == "tunnel").unwrap_or_else(|| panic!("{:?}", uris.events));
    let url = tunnel["url"].as_str().unwrap().to_string();
    let port: u16 = url.trim_start_matches("http://localhost:").trim_end_matches('/').parse().unwrap();
    let body = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(body) = crate::kubernetes::get_by_length(port) {
                return body;
            }
            assert!(std::time::Instant::now() < deadline, "nothing served at {port}");
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .unwrap();
    assert_eq!(body, "hello from python on a real node");
    let agent = host_pid(&["devloop-agent", "run", "/app", "python", "app.py"]);
    let status = std::fs::read_to_string(format!("/proc/{agent}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "{nspid}");
    assert_eq!(watch.stop(), Some(0));

    let down = tokio::task::spawn_blocking(move || {
        let args: Vec<String> = global.iter().cloned().chain(["down".to_string()]).collect();
        once_blocking(&src, &src.parent().unwrap().join("cache"), &args)
    })
    .await
    .unwrap();
    assert_eq!(down.code, Some(0), "{}", down.stderr);
    let removed: Vec<&str> = down.of("removed").iter().map(|e| e["release"].as_str().unwrap()).collect();
    assert_eq!(removed, ["hello", "devloop-builder"]);
}

/// The release archive (`scripts/release`, which tests/run builds and names in
/// DEVLOOP_TEST_RELEASE), unpacked anywhere: its static CLI finds the static agent beside itself,
/// and the first `up` works with nothing of this checkout in reach.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real node and the release archive: tests/run builds both"]
async fn the_release_archive_installs_a_static_cli_whose_first_up_works() {
    let archive = std::env::var("DEVLOOP_TEST_RELEASE")
        .expect("DEVLOOP_TEST_RELEASE names the archive scripts/release made: run tests/run, which builds it");
    let admin = AsAdmin::new().await;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let unpacked = std::process::Command::new("tar")
        .args(["xzf", &archive, "--strip-components=1", "-C"])
        .arg(&bin)
        .status()
        .unwrap();
    assert!(unpacked.success());
    let cli = bin.join("devloop");
    let ldd = std::process::Command::new("ldd").arg(&cli).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&ldd.stdout).contains("=>"),
        "a static CLI: {}",
        String::from_utf8_lossy(&ldd.stdout)
    );
    for file in [
        "devloop-agent.static",
        "devloop.1",
        "completions/devloop.bash",
        "completions/devloop.zsh",
        "completions/devloop.fish",
    ] {
        assert!(bin.join(file).is_file(), "{file} in the archive");
    }

    let src = crate::article::service(
        dir.path(),
        "released",
        false,
        r#"["standin", "--port", "8080", "--file", "message.txt", "--bind", "0.0.0.0"]"#,
        "",
        &admin.cluster.state,
    );
    std::fs::write(src.join("message.txt"), "served by the released CLI").unwrap();
    let (cli2, src2, kubeconfig, ns) = (cli.clone(), src.clone(), admin.kubeconfig.clone(), admin.scratch.name.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&cli2)
            .current_dir(&src2)
            .args(["--kubeconfig", &kubeconfig, "-n", &ns, "--json", "up", "--once"])
            .env_remove("DEVLOOP_STATIC_AGENT")
            .env("XDG_CACHE_HOME", src2.parent().unwrap().join("cache"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let events = support::parse_events(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(0), "{}\n{events:#?}", String::from_utf8_lossy(&out.stderr));
    let pods: Api<Pod> = Api::namespaced(admin.client.clone(), &admin.scratch.name);
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        served_by(&handle, &pods, "released", "served by the released CLI", Duration::from_secs(20))
    })
    .await
    .unwrap()
    .unwrap();
    let down = crate::article::devloop(&src, &admin.kubeconfig, &admin.scratch.name, &["down"]);
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
}
