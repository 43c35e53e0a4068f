//! The story devloop comes from (`shared/seeds/`), on the tier's realistic cluster: two services in
//! one namespace, the consumer calling `http://producer` (Service DNS: CoreDNS, kube-proxy)
//! through the `urls__producer` secret of its values file, the consumer public (Traefik writes
//! its Ingress's address), both developed at once, their images pushed to the registry the
//! cluster publishes (KEP-1755) and pulled by digest.
//!
//! `#[ignore]`d for a plain `cargo test`; tests/run runs them, and they fail without the node.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event as KubeEvent, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, ListParams};

use crate::kubernetes::AsAdmin;
use crate::node::{up_once, NODE};
use crate::support;

/// The tier's ingress controller's address (tests/cluster/addons-up).
const INGRESS_ADDRESS: &str = "10.213.0.2";

/// A service folder as `prep` leaves it (`--public` for the consumer), with a dev image the tier
/// builds offline (busybox, the agent, the stand-in app) and a values file that puts its pod on
/// the tier's real node (its other node is kwok's: pods there run nothing).
pub(crate) fn service(parent: &Path, name: &str, public: bool, cmd: &str, secrets: &str, state: &Path) -> PathBuf {
    let src = crate::node::prepped_service(parent, name, if public { &["--public"] } else { &[] }, cmd);
    let mut config = std::fs::read_to_string(src.join("devloop.yaml")).unwrap();
    // No `registry:` and no containerd socket: both are found on the cluster.
    config.push_str(&format!("builder: {{node: {NODE}, root: {}}}\n", state.join("buildkit").display()));
    std::fs::write(src.join("devloop.yaml"), config).unwrap();
    std::fs::write(
        src.join("values.dev.yaml"),
        format!(
            "{secrets}nodeSelector: {{devloop.dev/real-node: \"true\"}}\n\
             tolerations: [{{key: devloop.dev/real-node, operator: Exists, effect: NoSchedule}}]\n"
        ),
    )
    .unwrap();
    src
}

pub(crate) fn devloop(src: &Path, kubeconfig: &str, ns: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(support::devloop_bin())
        .current_dir(src)
        .args(["--kubeconfig", kubeconfig, "-n", ns, "--json"])
        .args(args)
        .env("XDG_CACHE_HOME", src.parent().unwrap().join("cache"))
        .output()
        .unwrap()
}

/// GET http://ADDRESS/ through the ingress controller, as a browser would reach the public URL.
fn get_public(address: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&format!("{address}:80").parse().ok()?, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(format!("GET / HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

fn public_until(address: &str, want: &str, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < timeout {
        last = get_public(address);
        if last.as_deref() == Some(want) {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("the public URL served {last:?}, not {want:?}"))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real node: tests/run starts it and runs the ignored tests"]
async fn two_services_call_each_other_by_service_dns_behind_a_public_url_from_the_clusters_registry() {
    let admin = AsAdmin::new().await;
    let (cluster, client, ns, kubeconfig) =
        (&admin.cluster, &admin.client, admin.scratch.name.clone(), admin.kubeconfig.clone());
    let dir = tempfile::tempdir().unwrap();
    let producer = service(
        dir.path(),
        "producer",
        false,
        r#"["standin", "--port", "8080", "--file", "message.txt", "--bind", "0.0.0.0"]"#,
        "",
        &cluster.state,
    );
    let consumer = service(
        dir.path(),
        "consumer",
        true,
        r#"["standin", "--port", "8080", "--file", "message.txt", "--bind", "0.0.0.0", "--upstream", "urls__producer"]"#,
        "secrets:\n  urls:\n    producer: http://producer\n",
        &cluster.state,
    );
    std::fs::write(producer.join("message.txt"), "weather: sunny").unwrap();
    std::fs::write(consumer.join("message.txt"), "forecast").unwrap();

    // Both `up` at once, each from nothing (no builder, no image, no release).
    let start_both = || -> Vec<std::thread::JoinHandle<support::Watch>> {
        [&producer, &consumer]
            .into_iter()
            .map(|src| {
                let (src, kubeconfig, ns) = (src.clone(), kubeconfig.clone(), ns.clone());
                std::thread::spawn(move || {
                    let args = ["--kubeconfig", &kubeconfig, "-n", &ns, "--json", "up"];
                    support::Watch::start_within(&src, &args, Duration::from_secs(240))
                })
            })
            .collect()
    };
    let started = Instant::now();
    let mut ups: Vec<support::Watch> = start_both().into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!("both services from nothing to watching: {:?}", started.elapsed());

    // Registry mode, found on the cluster and said so; each pod pulled its image by digest from
    // the registry's runtime name, not pinned to the builder's node.
    for up in &ups {
        let said = up.seen.iter().find(|e| e["event"] == "image_destination").expect("up says where the image goes");
        assert!(said["destination"].as_str().unwrap().starts_with(&format!("10.213.0.1:5000/{ns}/")), "{said}");
        assert!(said["why"].as_str().unwrap().contains("kube-public/local-registry-hosting"), "{said}");
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let events: Api<KubeEvent> = Api::namespaced(client.clone(), &ns);
    for name in ["producer", "consumer"] {
        let pod = devloop::kubernetes::pods::ready(&pods, &ns, name).await.unwrap();
        let spec = pod.spec.as_ref().unwrap();
        let image = spec.containers[0].image.clone().unwrap();
        assert!(image.starts_with(&format!("localhost:5000/{ns}/{name}:")) && image.contains("@sha256:"), "{image}");
        assert_eq!(spec.containers[0].image_pull_policy.as_deref(), Some("IfNotPresent"));
        let selector = spec.node_selector.clone().unwrap_or_default();
        assert!(!selector.contains_key("kubernetes.io/hostname"), "not pinned: {selector:?}");
        let pod_name = pod.metadata.name.clone().unwrap();
        let pulled = events
            .list(&ListParams::default().fields(&format!("involvedObject.name={pod_name}")))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("Pulled"))
            .filter_map(|e| e.message)
            .collect::<Vec<_>>();
        assert!(pulled.iter().any(|m| m.contains("Successfully pulled image")), "the node pulled it: {pulled:?}");
        // The registry holds it, as the host reaches it.
        let (repository, _) = image.split_once('@').unwrap();
        let tag = repository.rsplit_once(':').unwrap().1;
        let manifest = std::process::Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "-H", "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json"])
            .arg(format!("http://127.0.0.1:5000/v2/{ns}/{name}/manifests/{tag}"))
            .status()
            .unwrap();
        assert!(manifest.success(), "{image} is not in the registry");
    }

    // The secret became the consumer's environment; the consumer reaches the producer by name.
    let secret = Api::<Secret>::namespaced(client.clone(), &ns).get("consumer-env").await.unwrap();
    assert_eq!(secret.data.unwrap()["urls__producer"].0, b"http://producer");
    let handle = tokio::runtime::Handle::current();
    let pods2 = pods.clone();
    let through = tokio::task::spawn_blocking(move || {
        crate::node::served_by(&handle, &pods2, "consumer", "forecast <- weather: sunny", Duration::from_secs(20))
    });
    through.await.unwrap().unwrap();

    // list-uris: the consumer's public URL with the controller's address, and both tunnels.
    let deadline = Instant::now() + Duration::from_secs(20);
    let uris = loop {
        let out = devloop(&consumer, &kubeconfig, &ns, &["list-uris"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let uris = support::parse_events(&String::from_utf8_lossy(&out.stdout));
        let public = uris.iter().find(|u| u["kind"] == "public").cloned();
        if public.as_ref().is_some_and(|p| p["url"] != "Pending") || Instant::now() > deadline {
            break uris;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let public = uris.iter().find(|u| u["kind"] == "public").expect("a public URL");
    assert_eq!(public["name"], "consumer", "{uris:?}");
    assert_eq!(public["url"], format!("http://{INGRESS_ADDRESS}/"), "{uris:?}");
    assert_eq!(public["address"], INGRESS_ADDRESS, "{uris:?}");
    assert_eq!(public["status"], "Available", "{uris:?}");
    for name in ["producer", "consumer"] {
        assert!(uris.iter().any(|u| u["name"] == name && u["kind"] == "tunnel"), "{uris:?}");
    }
    let human = String::from_utf8_lossy(
        &std::process::Command::new(support::devloop_bin())
            .current_dir(&consumer)
            .args(["--kubeconfig", &kubeconfig, "-n", &ns, "list-uris"])
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(human.contains("ADDRESS") && human.contains(INGRESS_ADDRESS), "{human}");

    // The public URL answers with the producer's data; an edit to the producer shows through it.
    let public_url_took = public_until(INGRESS_ADDRESS, "forecast <- weather: sunny", Duration::from_secs(10)).unwrap();
    eprintln!("public URL answering after list-uris showed it: {public_url_took:?}");
    let saved = Instant::now();
    std::fs::write(producer.join("message.txt"), "weather: rain").unwrap();
    public_until(INGRESS_ADDRESS, "forecast <- weather: rain", Duration::from_secs(10)).unwrap();
    eprintln!("producer edit -> through the consumer's public URL: {:?}", saved.elapsed());

    // Consumer → producer through Service DNS, from inside the consumer's pod (its own app's
    // GET timed by the stand-in: one public GET carries one call).
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(get_public(INGRESS_ADDRESS).as_deref(), Some("forecast <- weather: rain"));
        latencies.push(t.elapsed());
    }
    latencies.sort();
    eprintln!("public GET through consumer -> producer, median of 20: {:?}", latencies[10]);

    // list-up lists both.
    let out = devloop(&consumer, &kubeconfig, &ns, &["list-up"]);
    let rows = support::parse_events(&String::from_utf8_lossy(&out.stdout));
    for name in ["producer", "consumer"] {
        assert!(rows.iter().any(|r| r["name"] == name && r["status"] == "Running"), "{rows:?}");
    }

    // Stopped and started again (warm: the builder, the images and the releases are there):
    // nothing is built.
    for up in ups.drain(..) {
        assert_eq!(tokio::task::spawn_blocking(move || up.stop()).await.unwrap(), Some(0));
    }
    let started = Instant::now();
    let mut ups: Vec<support::Watch> = start_both().into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!("both services, warm, to watching: {:?}", started.elapsed());
    for up in &ups {
        assert!(up.seen.iter().any(|e| e["event"] == "build_skipped"), "{:?}", up.seen);
    }
    let handle = tokio::runtime::Handle::current();
    let pods2 = pods.clone();
    tokio::task::spawn_blocking(move || {
        crate::node::served_by(&handle, &pods2, "consumer", "forecast <- weather: rain", Duration::from_secs(20))
    })
    .await
    .unwrap()
    .unwrap();

    // Stop both, `down` each: nothing of either is left (the pushed images stay in the registry).
    for up in ups.drain(..) {
        assert_eq!(tokio::task::spawn_blocking(move || up.stop()).await.unwrap(), Some(0));
    }
    // A public URL whose Service has no Ready pod says so (scaled to none here).
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let patch = serde_json::json!({"spec": {"replicas": 0}});
    deployments.patch("consumer", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = devloop(&consumer, &kubeconfig, &ns, &["list-uris"]);
        let uris = support::parse_events(&String::from_utf8_lossy(&out.stdout));
        let public = uris.iter().find(|u| u["kind"] == "public").expect("a public URL").clone();
        if public["status"].as_str().unwrap().starts_with("no ready endpoints: Service consumer") {
            break;
        }
        assert!(Instant::now() < deadline, "{public}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    for src in [&producer, &consumer] {
        let out = devloop(src, &kubeconfig, &ns, &["down"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let deployments =
            Api::<Deployment>::namespaced(client.clone(), &ns).list(&Default::default()).await.unwrap().items.len();
        let services =
            Api::<Service>::namespaced(client.clone(), &ns).list(&Default::default()).await.unwrap().items.len();
        let ingresses =
            Api::<Ingress>::namespaced(client.clone(), &ns).list(&Default::default()).await.unwrap().items.len();
        let secrets = Api::<Secret>::namespaced(client.clone(), &ns)
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|s| s.type_.as_deref() != Some("kubernetes.io/service-account-token"))
            .count();
        let left = pods.list(&Default::default()).await.unwrap().items.len();
        if deployments + services + ingresses + secrets + left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left after down: {deployments} deployments, {services} services, {ingresses} ingresses, {secrets} secrets, {left} pods"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn set_registry(src: &Path, registry: &str) {
    let config = std::fs::read_to_string(src.join("devloop.yaml")).unwrap();
    let kept: String = config.lines().filter(|l| !l.starts_with("registry:")).map(|l| format!("{l}\n")).collect();
    std::fs::write(src.join("devloop.yaml"), format!("{kept}registry: {registry}\n")).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real node: tests/run starts it and runs the ignored tests"]
async fn registry_mode_pushes_nothing_unchanged_and_says_what_to_check_when_a_push_or_a_pull_fails() {
    let admin = AsAdmin::new().await;
    let (cluster, client, ns, kubeconfig) =
        (&admin.cluster, &admin.client, admin.scratch.name.clone(), admin.kubeconfig.clone());
    let dir = tempfile::tempdir().unwrap();
    let src = service(
        dir.path(),
        "solo",
        false,
        r#"["standin", "--port", "8080", "--file", "message.txt", "--bind", "0.0.0.0"]"#,
        "",
        &cluster.state,
    );
    std::fs::write(src.join("message.txt"), "solo").unwrap();
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);

    // A registry that does not answer: the push fails, says which registry to check, and
    // nothing is deployed.
    set_registry(&src, "'10.213.0.1:5999'");
    let run = up_once(&src, &kubeconfig, &ns).await;
    assert_eq!(run.code, Some(1), "{}\n{:#?}", run.stderr, run.events);
    let error = run.of("error");
    let message = error[0]["message"].as_str().unwrap();
    assert!(message.contains(&format!("could not push 10.213.0.1:5999/{ns}/solo:")), "{message}");
    let hint = error[0]["hint"].as_str().unwrap();
    assert!(hint.contains("registry 10.213.0.1:5999 answers from the cluster's pods"), "{hint}");
    assert!(deployments.get_opt("solo").await.unwrap().is_none(), "nothing deployed after a failed push");

    // A registry the nodes cannot pull from: the rollout ends with the runtime's reason and a
    // hint about the name the nodes pull by.
    set_registry(&src, "{push: '10.213.0.1:5000', pull: 'localhost:5999'}");
    let started = Instant::now();
    let run = up_once(&src, &kubeconfig, &ns).await;
    assert_eq!(run.code, Some(1), "{}\n{:#?}", run.stderr, run.events);
    let error = run.of("error");
    let message = error[0]["message"].as_str().unwrap();
    assert!(message.contains("ImagePullBackOff") || message.contains("ErrImagePull"), "{message}");
    assert!(error[0]["hint"].as_str().unwrap().contains("hostFromContainerRuntime"), "{:?}", error[0]);
    eprintln!("an image the node cannot pull, reported after {:?}", started.elapsed());

    // The published registry pushes to the same host: the image the last run pushed is
    // reused (nothing built or pushed), now pulled by the runtime's name, and serves.
    set_registry(&src, "auto");
    let reused = up_once(&src, &kubeconfig, &ns).await;
    assert_eq!(reused.code, Some(0), "{}\n{:#?}", reused.stderr, reused.events);
    assert!(reused.of("built").is_empty() && reused.of("build_step").is_empty(), "{:#?}", reused.events);
    let skipped = reused.of("build_skipped");
    assert_eq!(skipped[0]["pushed"], true, "{:#?}", reused.events);
    let image = skipped[0]["image"].as_str().unwrap();
    assert!(image.starts_with(&format!("localhost:5000/{ns}/solo:")) && image.contains("@sha256:"), "{image}");

    // Changed inputs: built and pushed once; the same inputs again build and push nothing and
    // deploy the same digest.
    let dockerfile = std::fs::read_to_string(src.join("Dockerfile.develop")).unwrap();
    std::fs::write(src.join("Dockerfile.develop"), format!("{dockerfile}# changed\n")).unwrap();
    let changed = up_once(&src, &kubeconfig, &ns).await;
    assert_eq!(changed.code, Some(0), "{}\n{:#?}", changed.stderr, changed.events);
    let built = changed.of("built");
    assert_eq!(built.len(), 1, "{:#?}", changed.events);
    assert_ne!(built[0]["image"].as_str(), Some(image), "a new digest");
    let again = up_once(&src, &kubeconfig, &ns).await;
    assert_eq!(again.code, Some(0), "{}\n{:#?}", again.stderr, again.events);
    assert!(again.of("built").is_empty() && again.of("build_step").is_empty(), "{:#?}", again.events);
    assert_eq!(again.of("build_skipped")[0]["image"], built[0]["image"]);
    let deployed = deployments.get("solo").await.unwrap().spec.template.spec.unwrap().containers[0].image.clone();
    assert_eq!(deployed.as_deref(), built[0]["image"].as_str());

    let out = devloop(&src, &kubeconfig, &ns, &["down"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(deployments.get_opt("solo").await.unwrap().is_none());
}
