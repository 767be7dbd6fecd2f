//! Shared setup for the end-to-end tests: mesh topologies around one Service, and running
//! the real peers (curl, h2load, Python) with timeouts.
#![allow(dead_code)]

pub mod egress;
pub mod pki;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use plexus_testkit::{Background, Proxy, Resources, ServicePort, TempDir, WorkloadSpec, command, peers_dir, run};

/// The binary under test.
pub const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");

/// Backstop for a whole test; individual steps have shorter timeouts of their own.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(240);

/// Default timeout for one peer command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// The configuration generation a proxy runs (admin `/config`), which each reload increases.
pub async fn config_generation(proxy: &Proxy) -> anyhow::Result<u64> {
    let config = proxy.admin_get("/config").await?.json()?;
    config["generation"].as_u64().ok_or_else(|| anyhow::anyhow!("no generation in /config"))
}

/// The mesh topology between the client and the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hops {
    /// client → plexus (outbound / `--upstream` bind) → app; the Workload is `meshed: false`.
    One,
    /// client → client sidecar → server sidecar inbound (`--app-port`) → app; the Workload is
    /// `meshed: true` with `port` = the server sidecar's inbound port.
    Two,
}

/// One Service (`<name>.default:<port>`) with one Workload whose application listens on
/// `127.0.0.1:<app_port>`, reached through one or two `plexus proxy` processes.
pub struct Mesh {
    pub hops: Hops,
    pub dir: TempDir,
    pub resources: PathBuf,
    /// The proxy the client talks to.
    pub client: Proxy,
    /// The sidecar in front of the app (two hops only).
    pub server: Option<Proxy>,
    /// `name.default:port`.
    pub key: String,
}

impl Mesh {
    /// Writes the resources file and starts the proxies. The client proxy gets
    /// `--upstream <name>:<port>=0`; `extra_args` go to every proxy.
    pub async fn start(hops: Hops, name: &str, port: ServicePort, app_port: u16, extra_args: &[&str]) -> Mesh {
        let dir = TempDir::new(&format!("mesh-{name}")).expect("temp dir");
        let resources = dir.join("resources.yaml");
        let svc_port = port.port;
        let port_name = port.name.clone();
        let service_only = Resources::new().service(name, std::slice::from_ref(&port));

        let server = match hops {
            Hops::One => {
                service_only
                    .workload(&WorkloadSpec::plain(&format!("{name}-1"), name, &port_name, app_port))
                    .write(&resources)
                    .expect("write resources");
                None
            }
            Hops::Two => {
                // Start the server sidecar first; once it reports its inbound port, register
                // the meshed workload behind it.
                service_only.write(&resources).expect("write resources");
                let app = app_port.to_string();
                let mut args = vec![
                    "proxy",
                    "--resources",
                    resources.to_str().expect("utf-8 path"),
                    "--outbound-port",
                    "0",
                    "--inbound-port",
                    "0",
                    "--admin-port",
                    "0",
                    "--app-port",
                    &app,
                ];
                args.extend_from_slice(extra_args);
                let server =
                    Proxy::start_named("server-sidecar", PLEXUS, &args).await.expect("start the server sidecar");
                let before = config_generation(&server).await.expect("the server sidecar's /config");
                service_only
                    .workload(&WorkloadSpec::meshed(
                        &format!("{name}-1"),
                        name,
                        &port_name,
                        server.inbound().port(),
                        app_port,
                    ))
                    .write(&resources)
                    .expect("write resources");
                // The server sidecar polls the file: a test must not start while its reload is
                // still to come (it would land in the middle of whatever the test measures).
                plexus_testkit::eventually(Duration::from_secs(10), || async {
                    let now = config_generation(&server).await?;
                    anyhow::ensure!(now > before, "the server sidecar still runs config generation {now}");
                    Ok(())
                })
                .await
                .expect("the server sidecar loads the registered workload");
                Some(server)
            }
        };

        let upstream = format!("{name}:{svc_port}=0");
        let mut args = vec![
            "proxy",
            "--resources",
            resources.to_str().expect("utf-8 path"),
            "--outbound-port",
            "0",
            "--inbound-port",
            "0",
            "--admin-port",
            "0",
            "--upstream",
            &upstream,
        ];
        args.extend_from_slice(extra_args);
        let client_name = match hops {
            Hops::One => "proxy",
            Hops::Two => "client-sidecar",
        };
        let client = Proxy::start_named(client_name, PLEXUS, &args).await.expect("start the client proxy");
        Mesh { hops, dir, resources, client, server, key: format!("{name}.default:{svc_port}") }
    }

    /// The client proxy's `--upstream` bind for the Service.
    pub fn upstream(&self) -> SocketAddr {
        self.client.upstream(&self.key).expect("upstream bind")
    }

    /// The client proxy's outbound listener (explicit HTTP proxy, Host routing).
    pub fn outbound(&self) -> SocketAddr {
        self.client.outbound()
    }

    /// Every proxy process in the path.
    pub fn proxies(&self) -> Vec<&Proxy> {
        self.server.iter().chain(Some(&self.client)).collect()
    }

    /// Checks, with the metrics of §5 ("each request is counted once by the source sidecar
    /// (`direction="outbound"`) and once by the destination sidecar (`direction="inbound"`)"),
    /// that the traffic really took the path of the topology: the client proxy counted
    /// outbound traffic and, over two hops, the server sidecar counted inbound traffic (so
    /// the client sidecar did not bypass it by dialling the app's port directly).
    pub async fn assert_traversed(&self) {
        assert_counted(&self.client, "outbound").await;
        if let Some(server) = &self.server {
            assert_counted(server, "inbound").await;
        }
    }

    /// Stderr of every proxy, for failure messages.
    pub fn stderr(&self) -> String {
        self.proxies()
            .iter()
            .map(|p| format!("--- {} stderr ---\n{}", p.name(), p.stderr_tail(4000)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Runs a peer command with [`CMD_TIMEOUT`], returning its output whatever the exit status.
pub async fn run_peer(program: &str, args: &[&str]) -> Output {
    let mut cmd = command(program);
    cmd.args(args);
    run(&mut cmd, CMD_TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}"))
}

/// Text of stdout and stderr of a command for messages.
pub fn show(out: &Output) -> String {
    format!(
        "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `curl -sS --max-time 30 <args>`; panics (showing the output) unless it exits 0.
pub async fn curl_ok(args: &[&str]) -> Output {
    let mut all = vec!["-sS", "--max-time", "30"];
    all.extend_from_slice(args);
    let out = run_peer("curl", &all).await;
    assert!(out.status.success(), "curl {} failed\n{}", all.join(" "), show(&out));
    out
}

/// Starts a Python peer server (`tests/peers/<script> server --port 0 --name <name>`) and
/// returns it with its port.
pub async fn python_server(script: &str, name: &str) -> (Background, u16) {
    let mut cmd = command("python3");
    cmd.arg("-u").arg(peers_dir().join(script)).args(["server", "--port", "0", "--name", name]);
    let bg = Background::start(name, cmd, "ready", Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{e:#}"));
    let port = bg.ready_port().expect("port in ready line");
    (bg, port)
}

/// Runs a Python peer client; panics with its output unless it exits 0.
pub async fn python_client(script: &str, args: &[&str], context: &str) -> Output {
    let mut cmd = command("python3");
    cmd.arg("-u").arg(peers_dir().join(script)).arg("client").args(args);
    let out = run(&mut cmd, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("{context}: {e:#}"));
    assert!(out.status.success(), "{context}: {script} client {} reported failures\n{}", args.join(" "), show(&out));
    out
}

pub use plexus_testkit::metric_sum;

/// Panics unless `proxy` counted requests or TCP connections in `direction`.
pub async fn assert_counted(proxy: &Proxy, direction: &str) {
    let label = format!("direction=\"{direction}\"");
    let metrics = plexus_testkit::eventually(Duration::from_secs(5), || async {
        let m = proxy.admin_get("/metrics").await?;
        let text = m.text();
        let n = metric_sum(&text, "plexus_requests_total", &[&label])
            + metric_sum(&text, "plexus_tcp_connections_opened_total", &[&label]);
        anyhow::ensure!(n > 0.0, "nothing counted yet:\n{text}");
        Ok(text)
    })
    .await;
    if let Err(e) = metrics {
        panic!(
            "{} counted no {direction} requests or TCP connections (plexus_requests_total / \
             plexus_tcp_connections_opened_total with {label}): the traffic did not go \
             through it\n{e:#}",
            proxy.name()
        );
    }
}
