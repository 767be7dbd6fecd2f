//! End to end on a real single-node Kubernetes (SPEC §11, issue 19): Plexus installed with
//! `plexus install kubernetes | kubectl apply -f -`, Bookinfo from
//! `examples/kubernetes/bookinfo.yaml` injected, and what a user of the mesh relies on there.
//!
//! These tests are `#[ignore]`d in the default run: they need the lab node, which
//! `scripts/test-kubernetes` builds, starts (and stops), with the image imported; it runs them
//! one at a time (nextest profile `kubernetes`), as they share the cluster. Each test brings the
//! install and Bookinfo to the ready state first (idempotent `kubectl apply`), so any one of them
//! runs alone too, and undoes what it changed.
//!
//! The node runs in its own network namespace (`PLEXUS_K8S_NETNS`): clients that talk to pod
//! IPs, ClusterIPs or the ingress NodePort run inside it (`nsenter --net`); `kubectl` reaches
//! the API from the host (`PLEXUS_K8S_KUBECONFIG`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

#[path = "common/pki.rs"]
mod pki;
use pki::Pki;

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");
const NS: &str = "bookinfo";
/// The ingress gateway's NodePort (examples/kubernetes/bookinfo.yaml) on the node's IP.
const INGRESS: &str = "http://10.10.0.2:30080";
/// The gateway's HTTPS NodePort and the hostname of its HTTPS listener.
const INGRESS_HTTPS_PORT: u16 = 30443;
const INGRESS_HOST: &str = "bookinfo.example";
/// The kubernetes.io/tls Secret the HTTPS listener names, and where it lives (the Gateway's
/// namespace).
const CERT_SECRET: &str = "bookinfo-tls";
const GATEWAY_NS: &str = "plexus-system";
const BOOKINFO_DEPLOYMENTS: [&str; 6] =
    ["productpage-v1", "details-v1", "ratings-v1", "reviews-v1", "reviews-v2", "reviews-v3"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The lab node, as `scripts/test-kubernetes` describes it in the environment.
struct Node {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    netns: PathBuf,
    state: PathBuf,
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).map(PathBuf::from)
}

/// The node, or a skip (a failure under `CI=true`) when the tests run outside
/// `scripts/test-kubernetes`.
fn node() -> Option<Node> {
    let (Some(kubectl), Some(kubeconfig), Some(netns), Some(state)) = (
        env_path("PLEXUS_K8S_KUBECTL"),
        env_path("PLEXUS_K8S_KUBECONFIG"),
        env_path("PLEXUS_K8S_NETNS"),
        env_path("PLEXUS_K8S_STATE"),
    ) else {
        plexus_testkit::skip("no Kubernetes node: run these tests with scripts/test-kubernetes");
        return None;
    };
    Some(Node { kubectl, kubeconfig, netns, state })
}

fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<Output> {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    if let Some(input) = stdin {
        use std::io::Write as _;
        let mut pipe = child.stdin.take().context("stdin")?;
        pipe.write_all(input.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

impl Node {
    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.env("KUBECONFIG", &self.kubeconfig).args(args);
        c
    }

    /// `kubectl ARGS` (with `stdin`), its output; an error with stdout and stderr when it fails.
    fn kubectl_in(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let out = run(&mut self.kubectl_cmd(args), stdin)?;
        ensure!(out.status.success(), "kubectl {} failed: {}", args.join(" "), output_text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_in(args, None)
    }

    /// `kubectl ARGS`, expected to fail: its stderr.
    fn kubectl_fails(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let out = run(&mut self.kubectl_cmd(args), stdin)?;
        ensure!(!out.status.success(), "kubectl {} succeeded: {}", args.join(" "), output_text(&out));
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// A `plexus` command against the cluster (`--kubeconfig`).
    fn plexus(&self, args: &[&str]) -> Result<Output> {
        let mut c = Command::new(PLEXUS);
        c.args(args).arg("--kubeconfig").arg(&self.kubeconfig).current_dir(std::env::temp_dir());
        run(&mut c, None)
    }

    /// A program run inside the node's network namespace (pod IPs, ClusterIPs, NodePorts).
    fn in_node(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns.display())).arg(program).args(args);
        run(&mut c, None)
    }

    /// `sh -c SCRIPT` in a container of a pod (busybox in the Plexus image); its output and
    /// whether it succeeded.
    fn exec(&self, ns: &str, pod: &str, container: &str, script: &str) -> Result<(bool, String)> {
        let out =
            run(&mut self.kubectl_cmd(&["-n", ns, "exec", pod, "-c", container, "--", "sh", "-c", script]), None)?;
        Ok((out.status.success(), output_text(&out)))
    }

    /// The name of a Running pod of a Deployment (by its `app` and `version` labels).
    fn pod_of(&self, app: &str, version: &str) -> Result<String> {
        let name = self.kubectl(&[
            "-n",
            NS,
            "get",
            "pods",
            "-l",
            &format!("app={app},version={version}"),
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])?;
        ensure!(!name.trim().is_empty(), "no running pod for {app} {version}");
        Ok(name.trim().to_string())
    }

    /// Installs Plexus (keeping its identity across runs: `--identity-dir`) and Bookinfo, and
    /// waits until both are ready. Idempotent.
    fn ensure_bookinfo(&self) -> Result<()> {
        self.ensure_installed()?;
        for d in BOOKINFO_DEPLOYMENTS {
            self.kubectl(&["-n", NS, "rollout", "status", &format!("deployment/{d}"), "--timeout=240s"])?;
        }
        self.kubectl(&["-n", "plexus-system", "rollout", "status", "deployment/ingress-gateway", "--timeout=120s"])?;
        // The page answers once every hop is in the mesh's configuration.
        poll(Duration::from_secs(60), || {
            let page = self.get(&format!("{INGRESS}/productpage"), &[])?;
            ensure!(page.contains("Reviews served by: reviews-v"), "productpage not served yet: {page:.200}");
            ensure!(!page.contains("Error fetching product details"), "details not reached yet");
            Ok(())
        })
    }

    /// Creates or replaces the kubernetes.io/tls Secret `name` in the gateway's namespace with
    /// a certificate `pki` issues for `hosts` (common name `cn`).
    fn put_certificate(&self, pki: &Pki, name: &str, cn: &str, hosts: &[&str]) -> Result<()> {
        let yaml = self.certificate_secret(pki, name, cn, hosts)?;
        self.kubectl_in(&["apply", "-f", "-"], Some(&yaml))?;
        Ok(())
    }

    /// The YAML of that Secret (`kubectl create secret tls --dry-run=client`).
    fn certificate_secret(&self, pki: &Pki, name: &str, cn: &str, hosts: &[&str]) -> Result<String> {
        let dir = plexus_testkit::TempDir::new("k8s-cert")?;
        let (crt, key) = pki.issue(cn, hosts)?;
        std::fs::write(dir.join("tls.crt"), crt)?;
        std::fs::write(dir.join("tls.key"), key)?;
        let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        self.kubectl(&[
            "-n",
            GATEWAY_NS,
            "create",
            "secret",
            "tls",
            name,
            "--cert",
            crt.to_str().context("path")?,
            "--key",
            key.to_str().context("path")?,
            "--dry-run=client",
            "-o",
            "yaml",
        ])
    }

    /// Installs Plexus and applies Bookinfo's manifests, waiting for the control plane only.
    fn ensure_installed(&self) -> Result<()> {
        let identity = self.state.join("plexus-identity");
        let mut install = Command::new(PLEXUS);
        install.args(["install", "kubernetes", "--identity-dir"]).arg(&identity);
        if let Ok(image) = std::env::var("PLEXUS_IMAGE") {
            install.args(["--image", &image]);
        }
        let out = run(&mut install, None)?;
        ensure!(out.status.success(), "plexus install kubernetes failed: {}", output_text(&out));
        let manifests = String::from_utf8(out.stdout)?;
        self.kubectl_in(&["apply", "-f", "-"], Some(&manifests))?;
        self.kubectl(&["-n", "plexus-system", "rollout", "status", "deployment/plexus-control", "--timeout=180s"])?;
        let bookinfo = repo_root().join("examples/kubernetes/bookinfo.yaml");
        self.kubectl(&["apply", "-f", &bookinfo.to_string_lossy()])?;
        // The HTTPS listener's certificate, as a user creates it (any CA: the HTTPS test puts
        // its own), so that `plexus check` finds every certificate valid.
        if self.kubectl(&["-n", GATEWAY_NS, "get", "secret", CERT_SECRET]).is_err() {
            self.put_certificate(&Pki::new()?, CERT_SECRET, "bookinfo", &[INGRESS_HOST])?;
        }
        Ok(())
    }

    /// One GET from inside the node (curl); the body, or an error with the status.
    fn get(&self, url: &str, headers: &[&str]) -> Result<String> {
        let mut args = vec!["-sS", "--max-time", "10", "-w", "\n%{http_code}"];
        for h in headers {
            args.extend(["-H", h]);
        }
        args.push(url);
        let out = self.in_node("curl", &args)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        ensure!(out.status.success() && code == "200", "GET {url}: {code} {}", output_text(&out));
        Ok(body.to_string())
    }

    /// `n` page loads through the ingress (keep-alive, from inside the node): how many were
    /// served by each reviews version, plus "error" for answers other than 200.
    fn reviews_versions(
        &self,
        n: usize,
        headers: &[(&str, &str)],
    ) -> Result<std::collections::BTreeMap<String, usize>> {
        let headers = serde_json::to_string(&headers.iter().copied().collect::<std::collections::BTreeMap<_, _>>())?;
        let out = self.in_node("python3", &["-c", COUNT_VERSIONS, "10.10.0.2", "30080", &n.to_string(), &headers])?;
        ensure!(out.status.success(), "page loads failed: {}", output_text(&out));
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// The CA of the gateway's certificates.
impl Pki {
    fn new() -> Result<Pki> {
        Pki::named("kubernetes gateway test CA")
    }
}

/// Page loads over one keep-alive connection: `python3 -c COUNT_VERSIONS HOST PORT N HEADERS_JSON`
/// prints `{"reviews-v1": n1, ..., "error": e}`.
const COUNT_VERSIONS: &str = r#"
import http.client, json, re, sys
host, port, n, headers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
conn, counts = http.client.HTTPConnection(host, port, timeout=15), {}
for _ in range(n):
    try:
        conn.request("GET", "/productpage", headers=headers)
        r = conn.getresponse(); body = r.read().decode()
        m = re.search(r"Reviews served by: (reviews-v\d)", body)
        key = m.group(1) if r.status == 200 and m else "error"
    except Exception:
        conn.close(); conn = http.client.HTTPConnection(host, port, timeout=15); key = "error"
    counts[key] = counts.get(key, 0) + 1
print(json.dumps(counts))
"#;

/// Polls `f` every 200 ms until it succeeds or `timeout` passes (then its last error).
fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e.context(format!("not within {timeout:?}"))),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Applies `yaml` now and deletes it when dropped (the tests share the cluster).
struct Applied<'a> {
    node: &'a Node,
    yaml: String,
    ns: &'a str,
}

impl<'a> Applied<'a> {
    fn new(node: &'a Node, ns: &'a str, yaml: &str) -> Result<Applied<'a>> {
        node.kubectl_in(&["-n", ns, "apply", "-f", "-"], Some(yaml))?;
        Ok(Applied { node, yaml: yaml.to_string(), ns })
    }
}

impl Drop for Applied<'_> {
    fn drop(&mut self) {
        let _ = self.node.kubectl_in(&["-n", self.ns, "delete", "--ignore-not-found", "-f", "-"], Some(&self.yaml));
    }
}

fn example(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn install_and_injected_bookinfo_serve_the_product_page_through_the_ingress() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_bookinfo()?;
    // The control plane runs from the image, as `plexus install kubernetes` rendered it.
    let images =
        node.kubectl(&["-n", "plexus-system", "get", "pods", "-o", "jsonpath={.items[*].spec.containers[*].image}"])?;
    ensure!(images.contains("plexus:"), "control plane image: {images}");
    // Every Bookinfo pod got the init container and the proxy from the webhook.
    let pods = node.kubectl(&["-n", NS, "get", "pods", "-o", "json"])?;
    let pods: serde_json::Value = serde_json::from_str(&pods)?;
    let items = pods["items"].as_array().context("pods")?;
    ensure!(items.len() >= BOOKINFO_DEPLOYMENTS.len(), "{} pods", items.len());
    for pod in items {
        let name = pod["metadata"]["name"].as_str().unwrap_or("?");
        // (name, image, first argument) of each container of a list.
        let list = |key: &str| -> Vec<(String, String, String)> {
            pod["spec"][key]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
                    (s(&c["name"]), s(&c["image"]), s(&c["args"][0]))
                })
                .collect()
        };
        let init = list("initContainers");
        let containers = list("containers");
        ensure!(
            init.iter().any(|(n, image, arg)| n == "plexus-init" && image.contains("plexus:") && arg == "init"),
            "{name}: no `plexus init` init container: {init:?}"
        );
        ensure!(
            containers.iter().any(|(n, image, _)| n == "plexus-proxy" && image.contains("plexus:")),
            "{name}: no proxy container: {containers:?}"
        );
        ensure!(
            containers.iter().any(|(_, _, arg)| arg == "sample"),
            "{name}: the app container is gone: {containers:?}"
        );
        ensure!(pod["metadata"]["annotations"]["plexus.dev/injected"].is_string(), "{name}: not marked injected");
    }
    // The binaries run inside a pod.
    let pod = node.pod_of("details", "v1")?;
    let (ok, out) = node.exec(NS, &pod, "details", "plexus version")?;
    ensure!(ok && out.contains("plexus"), "plexus version in a pod: {out}");
    // productpage through the ingress gateway, with details and reviews behind it.
    let page = node.get(&format!("{INGRESS}/productpage"), &[])?;
    ensure!(page.contains("Reviews served by: reviews-v"), "{page:.300}");
    ensure!(!page.contains("Error fetching product details"), "{page:.300}");
    ensure!(!page.contains("Sorry, product reviews are currently unavailable"), "{page:.300}");
    Ok(())
}

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn httproute_shifts_reviews_80_20_and_sends_jason_to_v3() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_bookinfo()?;
    // With no route every version takes a share (SPEC §9): v3 shows up.
    poll(Duration::from_secs(30), || {
        let c = node.reviews_versions(30, &[])?;
        ensure!(c.contains_key("reviews-v3"), "no v3 without routes: {c:?}");
        Ok(())
    })?;
    {
        let _route = Applied::new(&node, NS, &example("examples/bookinfo/route-80-20.yaml"))?;
        // Once every request lands on v1 or v2, the route is in force.
        poll(Duration::from_secs(30), || {
            let c = node.reviews_versions(30, &[])?;
            ensure!(c.keys().all(|k| k == "reviews-v1" || k == "reviews-v2"), "{c:?}");
            Ok(())
        })?;
        let c = node.reviews_versions(1000, &[])?;
        let v1 = c.get("reviews-v1").copied().unwrap_or(0);
        let v2 = c.get("reviews-v2").copied().unwrap_or(0);
        ensure!(v1 + v2 == 1000, "answers other than v1/v2: {c:?}");
        ensure!((750..=850).contains(&v1), "v1 got {v1}/1000, not 80% ± 5%: {c:?}");
        ensure!((150..=250).contains(&v2), "v2 got {v2}/1000, not 20% ± 5%: {c:?}");
    }
    let _route = Applied::new(&node, NS, &example("examples/bookinfo/route-jason-v3.yaml"))?;
    poll(Duration::from_secs(30), || {
        let jason = node.reviews_versions(20, &[("end-user", "jason")])?;
        ensure!(jason.get("reviews-v3") == Some(&20), "jason: {jason:?}");
        let others = node.reviews_versions(20, &[("end-user", "alice")])?;
        ensure!(others.get("reviews-v1") == Some(&20), "alice: {others:?}");
        let anonymous = node.reviews_versions(20, &[])?;
        ensure!(anonymous.get("reviews-v1") == Some(&20), "no end-user: {anonymous:?}");
        Ok(())
    })?;
    // The red stars of v3 reach jason's page.
    let page = node.get(&format!("{INGRESS}/productpage"), &["end-user: jason"])?;
    ensure!(page.contains("stars: red"), "{page:.300}");
    Ok(())
}

/// `printf 'GET PATH HTTP/1.0...' | nc -w 3 HOST 9080` in a pod: the status line (empty when
/// the connection was closed without an answer). The request's stdin stays open for 2 s: busybox
/// nc half-closes the connection at stdin's end, which the proxy takes for the client leaving.
fn http_from_pod(node: &Node, ns: &str, pod: &str, container: &str, host: &str, path: &str) -> Result<String> {
    let script = format!(
        "(printf 'GET {path} HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n'; sleep 2) | nc -w 3 {host} 9080 | head -1"
    );
    let (_, out) = node.exec(ns, pod, container, &script)?;
    Ok(out.trim().to_string())
}

const PLAIN_POD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: plain}
spec:
  terminationGracePeriodSeconds: 0
  containers:
  - name: plain
    image: IMAGE
    imagePullPolicy: IfNotPresent
    command: [sleep, "3600"]
"#;

fn image() -> String {
    std::env::var("PLEXUS_IMAGE").unwrap_or_else(|_| format!("plexus:{}", env!("CARGO_PKG_VERSION")))
}

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn strict_mtls_refuses_a_pod_without_a_sidecar_and_serves_meshed_ones() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_bookinfo()?;
    node.kubectl_in(&["apply", "-f", "-"], Some(&PLAIN_POD.replace("IMAGE", &image())))?;
    node.kubectl(&["-n", "plain", "wait", "pod/plain", "--for=condition=Ready", "--timeout=120s"])?;
    let plain = node.kubectl(&["-n", "plain", "get", "pod", "plain", "-o", "jsonpath={.spec.containers[*].name}"])?;
    ensure!(plain.trim() == "plain", "the pod outside the labelled namespace was injected: {plain}");
    let details_ip =
        node.kubectl(&["-n", NS, "get", "pod", &node.pod_of("details", "v1")?, "-o", "jsonpath={.status.podIP}"])?;
    let details_cluster_ip =
        node.kubectl(&["-n", NS, "get", "service", "details", "-o", "jsonpath={.spec.clusterIP}"])?;
    let productpage = node.pod_of("productpage", "v1")?;
    // Permissive (the default): the plain pod is served.
    let status = http_from_pod(&node, "plain", "plain", "plain", details_ip.trim(), "/details/0")?;
    ensure!(status.contains("200"), "permissive mTLS, plain pod -> details pod: {status:?}");

    let strict = Applied::new(&node, "plexus-system", &example("examples/bookinfo/mtls-strict.yaml"))?;
    poll(Duration::from_secs(20), || {
        for target in [details_ip.trim(), details_cluster_ip.trim()] {
            let status = http_from_pod(&node, "plain", "plain", "plain", target, "/details/0")?;
            ensure!(status.is_empty(), "strict mTLS, plain pod -> {target}: answered {status:?}");
        }
        Ok(())
    })?;
    // Positive control: the meshed productpage reaches details by name, through its sidecar.
    let status = http_from_pod(&node, NS, &productpage, "productpage", "details", "/details/0")?;
    ensure!(status.contains("200"), "strict mTLS, meshed productpage -> details: {status:?}");
    let page = node.get(&format!("{INGRESS}/productpage"), &[])?;
    ensure!(!page.contains("Error fetching product details"), "{page:.300}");
    drop(strict);
    node.kubectl(&["delete", "namespace", "plain", "--wait=false"])?;
    Ok(())
}

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn authorization_policy_by_service_account_denies_another_pod() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_bookinfo()?;
    let productpage = node.pod_of("productpage", "v1")?;
    let details = node.pod_of("details", "v1")?;
    let ratings = node.pod_of("ratings", "v1")?;
    // Before the policy, details may call reviews.
    let status = http_from_pod(&node, NS, &details, "details", "reviews", "/reviews/0")?;
    ensure!(status.contains("200"), "details -> reviews before the policy: {status:?}");
    let _policy = Applied::new(&node, NS, &example("examples/bookinfo/authz-reviews.yaml"))?;
    poll(Duration::from_secs(20), || {
        for (pod, container) in [(&details, "details"), (&ratings, "ratings")] {
            let status = http_from_pod(&node, NS, pod, container, "reviews", "/reviews/0")?;
            ensure!(status.contains("403"), "{container} -> reviews under the policy: {status:?}");
        }
        Ok(())
    })?;
    // productpage (service account productpage) still is allowed, directly and for the page.
    let status = http_from_pod(&node, NS, &productpage, "productpage", "reviews", "/reviews/0")?;
    ensure!(status.contains("200"), "productpage -> reviews under the policy: {status:?}");
    let page = node.get(&format!("{INGRESS}/productpage"), &[])?;
    ensure!(!page.contains("Sorry, product reviews are currently unavailable"), "{page:.300}");
    Ok(())
}

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn a_job_with_an_injected_sidecar_completes() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_bookinfo()?;
    // Two Jobs: one whose app succeeds (through the mesh), one whose app fails. Each proxy must
    // exit once its app container has, and the Job must report the app's outcome (the
    // proxy's exit 0 must not turn a failure into a success).
    let job = |name: &str, script: &str| {
        format!(
            r#"
apiVersion: batch/v1
kind: Job
metadata: {{name: {name}}}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: fetch
        image: {image}
        imagePullPolicy: IfNotPresent
        command: [sh, -c, "{script}"]
"#,
            image = image()
        )
    };
    let jobs = [
        job(
            "fetch-details",
            r"(printf 'GET /details/0 HTTP/1.0\r\nHost: details\r\n\r\n'; sleep 2) | nc -w 5 details 9080 | head -1 | grep -q ' 200 '",
        ),
        job("fail-details", "exit 3"),
    ]
    .join("---");
    let _ = node.kubectl(&["-n", NS, "delete", "job", "fetch-details", "fail-details", "--ignore-not-found"]);
    let applied = Applied::new(&node, NS, &jobs)?;
    node.kubectl(&["-n", NS, "wait", "job/fetch-details", "--for=condition=complete", "--timeout=120s"])
        .context("the Job did not complete: its proxy must exit once the app container has")?;
    node.kubectl(&["-n", NS, "wait", "job/fail-details", "--for=condition=failed", "--timeout=60s"])
        .context("the failing Job was not reported failed: its proxy must exit once the app container has")?;
    for (name, phase, app_exit) in [("fetch-details", "Succeeded", 0), ("fail-details", "Failed", 3)] {
        let pod = node.kubectl(&["-n", NS, "get", "pods", "-l", &format!("job-name={name}"), "-o", "json"])?;
        let pod: serde_json::Value = serde_json::from_str(&pod)?;
        let pod = &pod["items"][0];
        let containers = pod["spec"]["containers"].as_array().context("containers")?;
        ensure!(containers.len() >= 2, "{name}: the Job's pod was not injected: {containers:?}");
        ensure!(pod["status"]["phase"] == phase, "{name}: phase {}", pod["status"]["phase"]);
        let exit = |container: &str| {
            pod["status"]["containerStatuses"]
                .as_array()
                .and_then(|s| s.iter().find(|c| c["name"] == container))
                .map(|c| c["state"]["terminated"]["exitCode"].clone())
        };
        ensure!(exit("fetch") == Some(app_exit.into()), "{name}: app exit {:?}", exit("fetch"));
        ensure!(exit("plexus-proxy") == Some(0.into()), "{name}: the proxy exited {:?}", exit("plexus-proxy"));
    }
    drop(applied);
    Ok(())
}

/// Scales the control plane back to one replica (and waits for it) when dropped.
struct ControlPlaneDown<'a>(&'a Node);

impl Drop for ControlPlaneDown<'_> {
    fn drop(&mut self) {
        let _ = self.0.kubectl(&["-n", "plexus-system", "scale", "deployment/plexus-control", "--replicas=1"]);
        let _ = self.0.kubectl(&[
            "-n",
            "plexus-system",
            "rollout",
            "status",
            "deployment/plexus-control",
            "--timeout=180s",
        ]);
    }
}

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn a_pod_of_a_labelled_namespace_is_not_admitted_unmeshed_while_the_webhook_is_down() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_installed()?;
    // Server-side dry runs go through the admission webhooks and create nothing.
    let pod = |ns: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: webhook-probe, namespace: {ns}, annotations: {{plexus.dev/inject: enabled}}}}\nspec:\n  containers:\n  - {{name: app, image: {image}, command: [sleep, '60']}}\n",
            image = image()
        )
    };
    let dry_run = ["apply", "--dry-run=server", "-o", "json", "-f", "-"];
    let containers = |json: &str| -> Result<Vec<String>> {
        let pod: serde_json::Value = serde_json::from_str(json)?;
        let names = pod["spec"]["containers"].as_array().context("containers")?;
        Ok(names.iter().filter_map(|c| c["name"].as_str().map(str::to_string)).collect())
    };
    // Positive control: with the webhook up, the labelled namespace's pod gets its proxy.
    let admitted = node.kubectl_in(&dry_run, Some(&pod(NS)))?;
    ensure!(containers(&admitted)?.contains(&"plexus-proxy".to_string()), "not injected: {admitted:.300}");

    node.kubectl(&["-n", "plexus-system", "scale", "deployment/plexus-control", "--replicas=0"])?;
    let down = ControlPlaneDown(&node);
    // The labelled namespace (failurePolicy Fail): refused, naming the webhook.
    let refused = poll(Duration::from_secs(60), || node.kubectl_fails(&dry_run, Some(&pod(NS))))?;
    ensure!(refused.contains("namespace.inject.plexus.dev"), "refused for another reason: {refused}");
    // An unlabelled namespace, opted in by annotation only (failurePolicy Ignore): admitted,
    // without a proxy, so an outage never blocks pods that did not opt in by namespace.
    let annotated = node.kubectl_in(&dry_run, Some(&pod("default")))?;
    ensure!(containers(&annotated)? == ["app"], "{annotated:.300}");
    drop(down);

    // Back up: admitted with the proxy again.
    let admitted = poll(Duration::from_secs(60), || node.kubectl_in(&dry_run, Some(&pod(NS))))?;
    ensure!(containers(&admitted)?.contains(&"plexus-proxy".to_string()), "not injected: {admitted:.300}");
    Ok(())
}

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn invalid_crd_objects_are_rejected_by_the_api_servers_schema() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_installed()?;
    // Positive control: the valid route passes the server's validation.
    node.kubectl_in(
        &["-n", NS, "apply", "--dry-run=server", "-f", "-"],
        Some(&example("examples/bookinfo/route-80-20.yaml")),
    )?;
    let cases = [
        // A weight that is not a number.
        (
            example("examples/bookinfo/route-80-20.yaml").replace("weight: 80", "weight: heavy"),
            // (1.20 names list fields without indices)
            "spec.rules.backendRefs.weight",
        ),
        // An action outside the enum.
        (example("examples/bookinfo/authz-reviews.yaml").replace("action: allow", "action: maybe"), "spec.action"),
        // A required field missing (a policy with no target).
        (
            example("examples/bookinfo/rate-limit.yaml")
                .replace("  targetRef: {kind: Service, name: productpage, port: 9080}\n", ""),
            "spec.targetRef",
        ),
    ];
    for (yaml, field) in cases {
        let err = node.kubectl_fails(&["-n", NS, "apply", "--validate=false", "-f", "-"], Some(&yaml))?;
        ensure!(err.contains(field), "the API server's error does not name {field}: {err}");
        ensure!(
            ["Invalid value", "Unsupported value", "Required value"].iter().any(|m| err.contains(m)),
            "unclear error: {err}"
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn httproute_status_conditions_are_written_back() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_installed()?;
    let _good = Applied::new(&node, NS, &example("examples/bookinfo/route-all-v1.yaml"))?;
    let missing = example("examples/bookinfo/route-all-v1.yaml")
        .replace("name: reviews}", "name: reviews-missing}")
        .replace("{name: reviews-v1, port: 9080}", "{name: reviews-v9, port: 9080}");
    let _bad = Applied::new(&node, NS, &missing)?;
    poll(Duration::from_secs(30), || {
        let yaml = node.kubectl(&["-n", NS, "get", "httproute", "reviews", "-o", "yaml"])?;
        ensure!(yaml.contains("type: Accepted") && yaml.contains("type: ResolvedRefs"), "{yaml}");
        let conditions = conditions_of(&node, "reviews")?;
        ensure!(conditions.iter().all(|(_, status, _)| status == "True"), "reviews: {conditions:?}");
        let conditions = conditions_of(&node, "reviews-missing")?;
        let resolved = conditions.iter().find(|(t, _, _)| t == "ResolvedRefs").context("no ResolvedRefs")?;
        ensure!(resolved.1 == "False" && resolved.2 == "BackendNotFound", "reviews-missing: {conditions:?}");
        Ok(())
    })
}

/// (type, status, reason) of every status condition of HTTPRoute `name`.
fn conditions_of(node: &Node, name: &str) -> Result<Vec<(String, String, String)>> {
    let route: serde_json::Value =
        serde_json::from_str(&node.kubectl(&["-n", NS, "get", "httproute", name, "-o", "json"])?)?;
    let mut out = Vec::new();
    // Gateway API: status.parents[].conditions; a flat status.conditions is read too.
    let lists = route["status"]["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| &p["conditions"])
        .chain(std::iter::once(&route["status"]["conditions"]));
    for list in lists {
        for c in list.as_array().into_iter().flatten() {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            out.push((s("type"), s("status"), s("reason")));
        }
    }
    if out.is_empty() {
        bail!("HTTPRoute {name} has no status conditions yet: {}", route["status"]);
    }
    Ok(out)
}

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn plexus_check_passes_and_names_a_missing_webhook_certificate() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_bookinfo()?;
    let out = poll(Duration::from_secs(60), || {
        let out = node.plexus(&["check"])?;
        ensure!(out.status.success(), "plexus check on the healthy install: {}", output_text(&out));
        Ok(out)
    })?;
    let text = output_text(&out);
    ensure!(text.contains('✓') && !text.contains('✗'), "{text}");
    // Without the webhook's serving certificate, check fails and says so.
    let secret = node.kubectl(&["-n", "plexus-system", "get", "secret", "plexus-webhook-tls", "-o", "json"])?;
    let mut secret: serde_json::Value = serde_json::from_str(&secret)?;
    for k in ["resourceVersion", "uid", "creationTimestamp", "managedFields"] {
        if let Some(m) = secret["metadata"].as_object_mut() {
            m.remove(k);
        }
    }
    node.kubectl(&["-n", "plexus-system", "delete", "secret", "plexus-webhook-tls"])?;
    let broken = node.plexus(&["check"]);
    // Put it back before judging, so a failure here leaves the cluster as it was.
    node.kubectl_in(&["apply", "-f", "-"], Some(&secret.to_string()))?;
    let broken = broken?;
    let text = output_text(&broken);
    ensure!(!broken.status.success(), "plexus check passed without the webhook certificate: {text}");
    ensure!(text.contains('✗') && text.to_lowercase().contains("webhook"), "{text}");
    ensure!(text.contains("plexus-webhook-tls"), "the failure does not name the Secret: {text}");
    Ok(())
}

/// The IPs of the running Bookinfo app pods (not being deleted), by pod name.
fn bookinfo_pod_ips(node: &Node) -> Result<Vec<(String, String)>> {
    let out = node.kubectl(&[
        "-n",
        NS,
        "get",
        "pods",
        "--field-selector=status.phase=Running",
        "-l",
        "app in (productpage,details,ratings,reviews)",
        "-o",
        r#"jsonpath={range .items[*]}{.metadata.name}{" "}{.status.podIP}{" "}{.metadata.deletionTimestamp}{"\n"}{end}"#,
    ])?;
    // (Pods being deleted still say Running: left out.)
    Ok(out
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .filter(|f| f.len() == 3 && !f[1].is_empty() && f[2].is_empty())
        .map(|f| (f[0].to_string(), f[1].to_string()))
        .collect())
}

/// A proxy's Prometheus metrics, from its admin port on the pod IP.
fn proxy_metrics(node: &Node, pod_ip: &str) -> Result<String> {
    let out = node.in_node("curl", &["-sS", "--max-time", "3", &format!("http://{pod_ip}:7712/metrics")])?;
    ensure!(out.status.success(), "metrics of {pod_ip}: {}", output_text(&out));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `plexus_balancer_endpoints{destination_service=SERVICE,state="ready"}` in `metrics`.
fn ready_endpoints(metrics: &str, service: &str) -> Option<u64> {
    let prefix = "plexus_balancer_endpoints{";
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(prefix)?;
        let (labels, value) = rest.split_once("} ")?;
        (labels.contains(&format!("destination_service=\"{service}\"")) && labels.contains("state=\"ready\""))
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn a_deleted_pod_leaves_every_proxy_within_five_seconds() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_bookinfo()?;
    // One more reviews v1 pod, outside any Deployment: nothing re-creates it once deleted.
    let extra = format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: reviews-extra
  labels: {{app: reviews, version: v1}}
spec:
  serviceAccountName: reviews
  terminationGracePeriodSeconds: 15
  containers:
  - name: reviews
    image: {image}
    imagePullPolicy: IfNotPresent
    args: [sample, reviews, --version, v1, --port, "9080"]
    ports: [{{containerPort: 9080}}]
    readinessProbe: {{httpGet: {{path: /health, port: 9080}}, periodSeconds: 2}}
"#,
        image = image()
    );
    let _ = node.kubectl(&["-n", NS, "delete", "pod", "reviews-extra", "--ignore-not-found", "--wait=true"]);
    let applied = Applied::new(&node, NS, &extra)?;
    node.kubectl(&["-n", NS, "wait", "pod/reviews-extra", "--for=condition=Ready", "--timeout=120s"])?;
    // Every proxy that knows reviews (productpage's, at least: load the page) sees 4 endpoints.
    let pods: Vec<_> = bookinfo_pod_ips(&node)?.into_iter().filter(|(n, _)| n != "reviews-extra").collect();
    let knowing = poll(Duration::from_secs(30), || {
        node.get(&format!("{INGRESS}/productpage"), &[])?;
        let mut knowing = Vec::new();
        for (name, ip) in &pods {
            if let Some(n) = ready_endpoints(&proxy_metrics(&node, ip)?, "reviews") {
                ensure!(n == 4, "{name}'s proxy has {n} reviews endpoints, not 4");
                knowing.push((name.clone(), ip.clone()));
            }
        }
        ensure!(knowing.iter().any(|(n, _)| n.starts_with("productpage")), "productpage's proxy does not know reviews");
        Ok(knowing)
    })?;
    let started = Instant::now();
    node.kubectl(&["-n", NS, "delete", "pod", "reviews-extra", "--wait=false"])?;
    poll(Duration::from_secs(5), || {
        for (name, ip) in &knowing {
            let n = ready_endpoints(&proxy_metrics(&node, ip)?, "reviews");
            ensure!(n == Some(3), "{name}'s proxy still has {n:?} reviews endpoints");
        }
        Ok(())
    })
    .context("the deleted pod's endpoint did not leave every proxy within 5 s")?;
    println!(
        "the deleted pod left {} proxies in {} ms ({:?})",
        knowing.len(),
        started.elapsed().as_millis(),
        knowing.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    // The page keeps working meanwhile and after.
    node.get(&format!("{INGRESS}/productpage"), &[])?;
    drop(applied);
    Ok(())
}

/// Measures how long HTTPRoute changes take to reach the Bookinfo proxies, from inside the
/// node: `python3 -c ROUTE_PROPAGATION KUBECTL KUBECONFIG CHANGES POD_IP...` applies
/// `CHANGES` HTTPRoute changes to reviews, one at a time, and after each polls every proxy's
/// `plexus_config_version` (its admin port) every 10 ms until the proxies that received the
/// change have all moved on; prints one JSON line per change:
/// `{"apply_ms": kubectl's own time, "proxies": {ip: ms from the start of the apply}}`.
const ROUTE_PROPAGATION: &str = r#"
import json, re, subprocess, sys, time, urllib.request
kubectl, kubeconfig, changes, ips = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
def version(ip):
    try:
        text = urllib.request.urlopen(f"http://{ip}:7712/metrics", timeout=2).read().decode()
        return int(re.search(r"^plexus_config_version (\d+)", text, re.M).group(1))
    except Exception:
        return None
ROUTE = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 9080, weight: %d}, {name: reviews-v2, port: 9080, weight: %d}]
"""
for i in range(changes):
    before = {ip: version(ip) for ip in ips}
    w = 80 - i  # every change differs from the one before
    start = time.monotonic()
    subprocess.run([kubectl, "--kubeconfig", kubeconfig, "apply", "-f", "-"], input=(ROUTE % (w, 100 - w)).encode(),
                   check=True, stdout=subprocess.DEVNULL)
    applied = time.monotonic()
    seen = {}
    while time.monotonic() - start < 5 and len(seen) < len(ips):
        for ip in ips:
            if ip not in seen:
                v = version(ip)
                if v is not None and before[ip] is not None and v > before[ip]:
                    seen[ip] = round((time.monotonic() - start) * 1000, 1)
        time.sleep(0.01)
    print(json.dumps({"apply_ms": round((applied - start) * 1000, 1), "proxies": seen}), flush=True)
    time.sleep(0.5)
"#;

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn httproute_changes_reach_the_bookinfo_proxies_within_a_second() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_bookinfo()?;
    // A proxy holds reviews' configuration once its workload has called reviews (discovery on
    // demand): make every Bookinfo pod call it, so this test does not depend on what earlier
    // tests happened to call (run alone, details' and ratings' proxies never asked for it).
    node.get(&format!("{INGRESS}/productpage"), &[])?;
    let pods = bookinfo_pod_ips(&node)?;
    for (pod, _) in &pods {
        let container = pod.split("-v").next().unwrap_or(pod);
        let status = http_from_pod(&node, NS, pod, container, "reviews", "/reviews/0")?;
        ensure!(status.contains("200"), "{pod} -> reviews: {status:?}");
    }
    let ips: Vec<&str> = pods.iter().map(|(_, ip)| ip.as_str()).collect();
    let kubeconfig = node.state.join("admin.kubeconfig");
    let mut args = vec![
        "-c",
        ROUTE_PROPAGATION,
        node.kubectl.to_str().context("kubectl path")?,
        kubeconfig.to_str().context("kubeconfig path")?,
        "20",
    ];
    args.extend(&ips);
    let out = node.in_node("python3", &args);
    let _ = node.kubectl(&["-n", NS, "delete", "httproute", "reviews", "--ignore-not-found"]);
    let out = out?;
    ensure!(out.status.success(), "{}", output_text(&out));
    // Per change, the last proxy to take it: from the start of `kubectl apply` (kubectl's own
    // start-up and round trips included) and from its return (the object stored).
    let (mut from_start, mut from_stored) = (Vec::new(), Vec::new());
    let mut reached = std::collections::BTreeMap::<String, usize>::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let change: serde_json::Value = serde_json::from_str(line)?;
        let proxies = change["proxies"].as_object().context("proxies")?;
        ensure!(proxies.len() == pods.len(), "a change did not reach every proxy within 5 s: {line}");
        for ip in proxies.keys() {
            let name = pods.iter().find(|(_, p)| p == ip).map(|(n, _)| n.clone()).unwrap_or_default();
            *reached.entry(name).or_default() += 1;
        }
        let last = proxies.values().filter_map(|v| v.as_f64()).fold(0.0, f64::max);
        from_start.push(last);
        from_stored.push((last - change["apply_ms"].as_f64().context("apply_ms")?).max(0.0));
    }
    ensure!(from_start.len() == 20, "{} changes measured", from_start.len());
    from_start.sort_by(f64::total_cmp);
    from_stored.sort_by(f64::total_cmp);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "HTTPRoute change -> every Bookinfo proxy ({} of them): from the stored object p50 {:.0} ms, p99 (max of 20) {:.0} ms; \
         from the start of kubectl apply p50 {:.0} ms, p99 {:.0} ms; proxies reached: {reached:?}; load {}",
        pods.len(),
        from_stored[9],
        from_stored[19],
        from_start[9],
        from_start[19],
        load.split_whitespace().next().unwrap_or("?")
    );
    // The control plane's memory with Bookinfo (its process in the pod, seen from the host).
    let pgrep = Command::new("pgrep").args(["-f", "^/usr/local/bin/plexus control --store kubernetes"]).output()?;
    for pid in String::from_utf8_lossy(&pgrep.stdout).split_whitespace() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or("VmRSS: ?");
        println!("control plane (pid {pid}) with Bookinfo: {rss}");
    }
    let p99 = from_stored[19];
    ensure!(p99 <= 1000.0, "p99 {p99} ms over 20 changes, not within 1 s (all: {from_stored:?})");
    Ok(())
}

impl Node {
    /// `curl https://HOST:30443PATH` from inside the node, the name resolved to the node's IP
    /// and the certificate checked against `ca`: (exit status, HTTP status, body).
    fn https(&self, ca: &Path, host: &str, path: &str) -> Result<(bool, String, String)> {
        let resolve = format!("{host}:{INGRESS_HTTPS_PORT}:10.10.0.2");
        let url = format!("https://{host}:{INGRESS_HTTPS_PORT}{path}");
        let ca = ca.to_str().context("CA path")?;
        let out = self.in_node(
            "curl",
            &["-sS", "--max-time", "10", "--resolve", &resolve, "--cacert", ca, "-w", "\n%{http_code}", &url],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let body = if out.status.success() { body.to_string() } else { output_text(&out) };
        Ok((out.status.success(), code.to_string(), body))
    }

    /// The subject of the certificate a new TLS connection to the gateway's HTTPS port gets
    /// for `server_name` (`openssl s_client`); empty when it gets none.
    fn served_subject(&self, server_name: &str) -> Result<String> {
        let script = format!(
            "openssl s_client -connect 10.10.0.2:{INGRESS_HTTPS_PORT} -servername {server_name} </dev/null 2>/dev/null | openssl x509 -noout -subject 2>/dev/null"
        );
        let out = self.in_node("sh", &["-c", &script])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// Holds one HTTPS connection to the gateway while the certificate Secret is replaced:
/// `python3 -c REPLACE_UNDER_CONNECTION CA KUBECTL KUBECONFIG NEW_SECRET_YAML`. It makes a
/// request on the connection, applies the new Secret, then until new connections get the new
/// certificate (at most 30 s) keeps making requests on the held connection and opening new
/// ones; prints `{"held": subject, "new": subject, "requests": n, "failures": [...], "ms": t}`.
const REPLACE_UNDER_CONNECTION: &str = r#"
import http.client, json, socket, ssl, subprocess, sys, time
ca, kubectl, kubeconfig, new_secret = sys.argv[1:5]
HOST, ADDR = "bookinfo.example", ("10.10.0.2", 30443)
ctx = ssl.create_default_context(cafile=ca)
def connect():
    s = ctx.wrap_socket(socket.create_connection(ADDR, timeout=10), server_hostname=HOST)
    c = http.client.HTTPSConnection(HOST, ADDR[1], context=ctx, timeout=10)
    c.sock = s
    return c
def subject(c):
    return dict(x[0] for x in c.sock.getpeercert()["subject"]).get("commonName", "")
def get(c):
    c.request("GET", "/productpage")
    r = c.getresponse(); body = r.read().decode()
    return r.status, "Reviews served by" in body
held = connect()
held_subject = subject(held)
failures, requests = [], 0
status, ok = get(held); requests += 1
if status != 200 or not ok: failures.append(f"before: {status}")
subprocess.run([kubectl, "--kubeconfig", kubeconfig, "apply", "-f", new_secret], check=True, capture_output=True)
start, new_subject = time.monotonic(), ""
while time.monotonic() - start < 30:
    try:
        status, ok = get(held); requests += 1
        if status != 200 or not ok: failures.append(f"held connection: {status}")
    except Exception as e:
        failures.append(f"held connection: {e!r}"); break
    try:
        fresh = connect(); new_subject = subject(fresh); fresh.close()
    except Exception as e:
        failures.append(f"new connection: {e!r}")
    if new_subject != held_subject: break
    time.sleep(0.1)
still = subject(held)
try:
    status, ok = get(held); requests += 1
    if status != 200 or not ok: failures.append(f"after: {status}")
except Exception as e:
    failures.append(f"after: {e!r}")
print(json.dumps({"held": held_subject, "held_after": still, "new": new_subject, "requests": requests,
                  "failures": failures, "ms": round((time.monotonic() - start) * 1000)}))
"#;

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn productpage_over_https_with_the_certificate_from_a_secret_replaced_without_dropping_connections() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_bookinfo()?;
    let dir = plexus_testkit::TempDir::new("k8s-https")?;
    let pki = Pki::new()?;
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem)?;
    node.put_certificate(&pki, CERT_SECRET, "bookinfo v1", &[INGRESS_HOST])?;
    // productpage over HTTPS, the certificate checked against the CA that issued the Secret's.
    poll(Duration::from_secs(30), || {
        let (ok, code, body) = node.https(&ca, INGRESS_HOST, "/productpage")?;
        ensure!(ok && code == "200", "HTTPS productpage: {code} {body:.300}");
        ensure!(body.contains("Reviews served by: reviews-v"), "{body:.300}");
        Ok(())
    })?;
    ensure!(
        node.served_subject(INGRESS_HOST)?.contains("bookinfo v1"),
        "s_client: {}",
        node.served_subject(INGRESS_HOST)?
    );
    // The HTTP listener beside it keeps serving the same page.
    let page = node.get(&format!("{INGRESS}/productpage"), &[])?;
    ensure!(page.contains("Reviews served by: reviews-v"), "{page:.300}");
    // A client trusting another CA refuses the certificate (curl: 60, not verified).
    let other_ca = dir.join("other-ca.pem");
    std::fs::write(&other_ca, &Pki::named("another CA")?.ca_pem)?;
    let (ok, code, out) = node.https(&other_ca, INGRESS_HOST, "/productpage")?;
    ensure!(!ok && code == "000" && out.contains("(60)"), "verified against the wrong CA: {out:.300}");
    // A name no listener serves gets no certificate at all, never bookinfo's.
    let unknown = node.served_subject("unknown.example")?;
    ensure!(unknown.is_empty(), "unknown.example was served {unknown:?}");

    // The Secret replaced while a connection is open: new connections get the new certificate,
    // the open one keeps its own and keeps being served.
    let v2 = dir.join("v2.yaml");
    std::fs::write(&v2, node.certificate_secret(&pki, CERT_SECRET, "bookinfo v2", &[INGRESS_HOST])?)?;
    let kubeconfig = node.state.join("admin.kubeconfig");
    let out = node.in_node(
        "python3",
        &[
            "-c",
            REPLACE_UNDER_CONNECTION,
            ca.to_str().context("path")?,
            node.kubectl.to_str().context("path")?,
            kubeconfig.to_str().context("path")?,
            v2.to_str().context("path")?,
        ],
    )?;
    ensure!(out.status.success(), "{}", output_text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    println!("Secret replaced under an open connection: {r}");
    ensure!(r["held"] == "bookinfo v1" && r["held_after"] == "bookinfo v1", "{r}");
    ensure!(r["new"] == "bookinfo v2", "new connections did not get the new certificate within 30 s: {r}");
    ensure!(r["failures"].as_array().is_some_and(Vec::is_empty) && r["requests"].as_u64() >= Some(2), "{r}");
    ensure!(node.served_subject(INGRESS_HOST)?.contains("bookinfo v2"), "s_client after the replacement");
    let (ok, code, body) = node.https(&ca, INGRESS_HOST, "/productpage")?;
    ensure!(ok && code == "200", "after the replacement: {code} {body:.300}");
    Ok(())
}

/// Re-applies the example's objects (the Gateway, its Role) when dropped, and deletes `secrets`.
struct RestoreExample<'a> {
    node: &'a Node,
    secrets: &'a [&'a str],
}

impl Drop for RestoreExample<'_> {
    fn drop(&mut self) {
        let bookinfo = repo_root().join("examples/kubernetes/bookinfo.yaml");
        let _ = self.node.kubectl(&["apply", "-f", &bookinfo.to_string_lossy()]);
        for s in self.secrets {
            let _ = self.node.kubectl(&["-n", GATEWAY_NS, "delete", "secret", s, "--ignore-not-found"]);
        }
    }
}

/// The example's Gateway `ingress` with `extra` listeners appended.
fn gateway_with(extra: &str) -> Result<String> {
    let example = example("examples/kubernetes/bookinfo.yaml");
    let doc =
        example.split("\n---\n").find(|d| d.contains("\nkind: Gateway\n")).context("no Gateway in the example")?;
    Ok(format!("{}\n{extra}", doc.trim_end()))
}

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn a_listener_naming_a_missing_or_unreadable_secret_serves_no_certificate_and_check_says_why() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_bookinfo()?;
    let dir = plexus_testkit::TempDir::new("k8s-missing-secret")?;
    let pki = Pki::new()?;
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem)?;
    node.put_certificate(&pki, CERT_SECRET, "bookinfo", &[INGRESS_HOST])?;
    // `other-tls` exists but the gateway's Role does not name it: the gateway cannot read it.
    let _restore = RestoreExample { node: &node, secrets: &["other-tls"] };
    node.put_certificate(&pki, "other-tls", "other", &["other.example"])?;
    // The Role allows `missing-tls` (which does not exist), not `other-tls`.
    let example = example("examples/kubernetes/bookinfo.yaml");
    let role = example.split("\n---\n").find(|d| d.contains("\nkind: Role\n")).context("no Role in the example")?;
    ensure!(role.contains("resourceNames: [bookinfo-tls]"), "{role}");
    let role = role.replace("resourceNames: [bookinfo-tls]", "resourceNames: [bookinfo-tls, missing-tls]");
    node.kubectl_in(&["apply", "-f", "-"], Some(&role))?;
    let gateway = gateway_with(
        "  - {name: missing, port: 8443, protocol: HTTPS, hostname: missing.example, tls: {certificateRefs: [{name: missing-tls}]}}\n\
         \x20 - {name: forbidden, port: 8443, protocol: HTTPS, hostname: other.example, tls: {certificateRefs: [{name: other-tls}]}}\n\
         \x20 - {name: elsewhere, port: 8443, protocol: HTTPS, hostname: elsewhere.example, tls: {certificateRefs: [{name: bookinfo-tls, namespace: bookinfo}]}}\n",
    )?;
    node.kubectl_in(&["apply", "-f", "-"], Some(&gateway))?;
    let text = poll(Duration::from_secs(60), || {
        let out = node.plexus(&["check"])?;
        let text = output_text(&out);
        ensure!(!out.status.success(), "plexus check passed: {text}");
        ensure!(text.contains("plexus-system/missing-tls") && text.contains("not found"), "{text}");
        ensure!(text.contains("plexus-system/other-tls") && text.contains("forbidden"), "{text}");
        ensure!(text.contains("ReferenceGrant"), "{text}");
        Ok(text)
    })?;
    ensure!(text.contains("kubectl create secret tls"), "no hint: {text}");
    // No certificate for those names; bookinfo.example is still served (positive control).
    for name in ["missing.example", "other.example", "elsewhere.example"] {
        let subject = node.served_subject(name)?;
        ensure!(subject.is_empty(), "{name} was served {subject:?}");
    }
    let (ok, code, body) = node.https(&ca, INGRESS_HOST, "/productpage")?;
    ensure!(ok && code == "200", "bookinfo.example beside them: {code} {body:.300}");
    // The Gateway's status: the refused cross-namespace reference, and the Secrets the gateway
    // reports it cannot load; the listener with a readable Secret resolved.
    poll(Duration::from_secs(60), || {
        let gateway = node.kubectl(&["-n", GATEWAY_NS, "get", "gateway", "ingress", "-o", "json"])?;
        let gateway: serde_json::Value = serde_json::from_str(&gateway)?;
        let resolved = |name: &str| -> Result<(String, String, String)> {
            let listener = gateway["status"]["listeners"]
                .as_array()
                .and_then(|l| l.iter().find(|l| l["name"] == name))
                .with_context(|| format!("no status for listener {name}: {}", gateway["status"]))?;
            let c = listener["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "ResolvedRefs"))
                .with_context(|| format!("{listener}"))?;
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            Ok((s("status"), s("reason"), s("message")))
        };
        let (status, reason, _) = resolved("elsewhere")?;
        ensure!(status == "False" && reason == "RefNotPermitted", "elsewhere: {status} {reason}");
        let (status, reason, message) = resolved("missing")?;
        ensure!(
            status == "False" && reason == "InvalidCertificateRef" && message.contains("not found"),
            "missing: {status} {reason} {message}"
        );
        let (status, reason, message) = resolved("forbidden")?;
        ensure!(status == "False" && message.contains("forbidden"), "forbidden: {status} {reason} {message}");
        let (status, _, message) = resolved("https")?;
        ensure!(status == "True", "https: {status} {message}");
        Ok(())
    })?;
    Ok(())
}

#[test]
#[ignore = "needs the lab Kubernetes node: scripts/test-kubernetes"]
fn an_httproute_attached_to_the_gateway_reaches_it_and_leaves_it() -> Result<()> {
    let Some(node) = node() else { return Ok(()) };
    node.ensure_bookinfo()?;
    let status_of = |path: &str| -> Result<String> {
        let out = node.in_node(
            "curl",
            &["-s", "-o", "/dev/null", "--max-time", "10", "-w", "%{http_code}", &format!("{INGRESS}{path}")],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    ensure!(status_of("/reviews/0")? == "404", "/reviews/0 is routed before any route sends it");
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: gateway-reviews, namespace: bookinfo}\n\
                 spec:\n  parentRefs: [{kind: Gateway, name: ingress, namespace: plexus-system, sectionName: http}]\n  \
                 rules:\n  - matches: [{path: {type: PathPrefix, value: /reviews}}]\n    backendRefs: [{name: reviews, port: 9080}]\n";
    {
        let _route = Applied::new(&node, NS, route)?;
        poll(Duration::from_secs(20), || {
            let body = node.get(&format!("{INGRESS}/reviews/0"), &[])?;
            ensure!(body.contains("reviews"), "{body:.200}");
            Ok(())
        })?;
        ensure!(
            node.get(&format!("{INGRESS}/productpage"), &[])?.contains("Reviews served by"),
            "productpage beside it"
        );
    }
    poll(Duration::from_secs(20), || {
        let code = status_of("/reviews/0")?;
        ensure!(code == "404", "/reviews/0 still routed after the HTTPRoute was deleted: {code}");
        Ok(())
    })?;
    ensure!(node.get(&format!("{INGRESS}/productpage"), &[])?.contains("Reviews served by"), "productpage after");
    Ok(())
}
