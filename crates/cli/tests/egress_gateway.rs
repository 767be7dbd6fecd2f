//! The egress gateway (`plexus proxy --mode egress`; SPEC §4 ExternalService `egressGateway`):
//! an ExternalService bound to a gateway's Service leaves through that gateway only. Sidecars
//! send its HTTP requests to the gateway over mTLS; the gateway authorizes the calling
//! sidecar's identity (AuthorizationPolicy on its Service), dials out itself, and refuses hosts
//! not bound to it and callers without mTLS. A sidecar never dials a bound host itself (a
//! `CONNECT` to it is refused). Each refusal beside a positive control.

mod common;

use std::time::Duration;

use common::egress::{control_plane, curl};
use common::{PLEXUS, metric_sum, show};
use plexus_testkit::{HttpEcho, Proxy, TempDir, command, eventually, require_tool, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_services_bound_to_an_egress_gateway_leave_through_it_only() {
    if !require_tool("curl") {
        return;
    }
    let api = HttpEcho::start("api-app").await.expect("echo");
    let other = HttpEcho::start("other-app").await.expect("echo");
    let dir = TempDir::new("egress-gateway").expect("dir");
    let (_cp, server, grpc) = control_plane(&dir).await;
    let data = dir.join("data");
    let gateway_port = plexus_testkit::free_port();
    let (a, o) = (api.port(), other.port());
    let yaml = format!(
        r#"apiVersion: plexus.dev/v1alpha1
kind: MeshConfig
metadata: {{name: default}}
spec: {{outboundTrafficPolicy: registryOnly}}
---
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {{name: egress}}
spec: {{selector: {{app: egress}}, ports: [{{port: 7443}}]}}
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {{name: egress-1, labels: {{app: egress}}}}
spec: {{address: 127.0.0.1, ports: [{{port: {gateway_port}}}], serviceAccount: egress, meshed: true}}
---
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {{name: api}}
spec: {{hosts: [localhost], ports: [{{port: {a}, protocol: http}}], egressGateway: egress}}
---
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {{name: other}}
spec: {{hosts: [localhost], ports: [{{port: {o}, protocol: http}}]}}
---
apiVersion: plexus.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: egress-callers}}
spec:
  targetRef: {{kind: Service, name: egress}}
  action: allow
  rules: [{{from: {{serviceAccounts: [client]}}}}]
"#
    );
    let file = dir.join("egress.yaml");
    std::fs::write(&file, yaml).expect("write");
    let plexus = |args: &[&str]| {
        let mut cmd = command(PLEXUS);
        cmd.args(args).env("PLEXUS_SERVER", &server).env("PLEXUS_DATA_DIR", &data);
        cmd
    };
    let out =
        run(&mut plexus(&["apply", "-f", &file.display().to_string()]), Duration::from_secs(30)).await.expect("apply");
    assert!(out.status.success(), "apply\n{}", show(&out));

    let proxy = |account: &'static str, extra: Vec<String>| {
        let (server, data, grpc) = (server.clone(), data.clone(), grpc.clone());
        async move {
            let token =
                plexus_testkit::workload_token(PLEXUS, &server, &data, "default", account).await.expect("token");
            let mut args: Vec<String> = ["proxy", "--control-plane", &grpc, "--token", &token]
                .into_iter()
                .chain(["--service-account", account, "--outbound-port", "0", "--admin-port", "0"])
                .map(String::from)
                .collect();
            args.extend(extra);
            Proxy::start_named(account, PLEXUS, args).await.unwrap_or_else(|e| panic!("{e:#}"))
        }
    };
    let gateway_args = ["--mode", "egress", "--service", "egress", "--inbound-port", &gateway_port.to_string()]
        .map(String::from)
        .to_vec();
    let gateway = proxy("egress", gateway_args).await;
    let to_gateway = ["--inbound-port", "0", "--upstream", "egress:7443=0"].map(String::from).to_vec();
    let client = proxy("client", to_gateway).await;
    let intruder = proxy("intruder", ["--inbound-port", "0"].map(String::from).to_vec()).await;
    let px = format!("http://{}", client.addrs().outbound);
    let api_url = format!("http://localhost:{a}/hello");

    // Positive control: the client's plaintext request leaves through the gateway.
    eventually(Duration::from_secs(20), || async {
        let (status, error, out) = curl(&["-x", &px, &api_url]).await;
        anyhow::ensure!(status == 200, "not yet through the gateway: {status} {error:?}\n{}", show(&out));
        anyhow::ensure!(String::from_utf8_lossy(&out.stdout).contains("api-app"), "{}", show(&out));
        Ok(())
    })
    .await
    .expect("an allowed host through the egress gateway");
    let text = gateway.admin_get("/metrics").await.expect("metrics").text();
    let through = metric_sum(
        &text,
        "plexus_requests_total",
        &["source_principal=\"spiffe://plexus.local/ns/default/sa/client\""],
    );
    assert!(through >= 1.0, "the gateway served the client's request, by its identity:\n{text}");
    assert!(
        metric_sum(&text, "plexus_requests_total", &["destination_service=\"api\"", "response_code=\"200\""]) >= 1.0,
        "the gateway labels the call with the ExternalService:\n{text}"
    );
    let served = api.requests();

    // AuthorizationPolicy on the gateway's Service: another identity is denied there.
    let ipx = format!("http://{}", intruder.addrs().outbound);
    let (status, error, out) = curl(&["-x", &ipx, &api_url]).await;
    assert_eq!(
        (status, error.as_deref()),
        (403, Some("denied by default/egress-callers")),
        "another workload's identity\n{}",
        show(&out)
    );

    // A sidecar never dials a gateway-bound host itself: a CONNECT tunnel is refused.
    let (status, error, out) = curl(&["-p", "-x", &px, &api_url]).await;
    assert_eq!(status, 403, "CONNECT to a gateway-bound host\n{}", show(&out));
    let error = error.unwrap_or_default();
    assert!(error.contains("leaves through egress gateway default/egress"), "{error}");
    // An ExternalService not bound to a gateway still leaves from the sidecar.
    let (status, _, out) = curl(&["-x", &px, &format!("http://localhost:{o}/direct")]).await;
    assert_eq!(status, 200, "an unbound ExternalService\n{}", show(&out));
    assert_eq!(other.requests(), 1);

    // The gateway serves only hosts bound to it: the same mTLS caller (through its bind to the
    // gateway's Service) naming another ExternalService is refused, the bound one served.
    let bind = client.addrs().upstreams.get("egress.default:7443").copied().expect("bind to the gateway");
    let bind_url = format!("http://{bind}/via-bind");
    let (status, error, out) = curl(&[&bind_url, "-H", &format!("Host: localhost:{o}")]).await;
    assert_eq!(status, 403, "a host not bound to the gateway\n{}", show(&out));
    assert!(
        error.as_deref().is_some_and(|e| e.contains(&format!("does not serve localhost:{o}"))),
        "{error:?}\n{}",
        show(&out)
    );
    assert_eq!(other.requests(), 1, "the gateway did not dial it");
    let (status, _, out) = curl(&[&bind_url, "-H", &format!("Host: localhost:{a}")]).await;
    assert_eq!(status, 200, "the bound host through the same bind\n{}", show(&out));

    // A caller without mTLS reaches nothing: plaintext to the gateway is closed unanswered.
    let (status, _, out) =
        curl(&[&format!("http://127.0.0.1:{gateway_port}/plain"), "-H", &format!("Host: localhost:{a}")]).await;
    assert_eq!(status, 0, "plaintext to the egress gateway\n{}", show(&out));
    // Nor does the gateway's own outbound port forward anything.
    let (status, _, out) = curl(&["-x", &format!("http://{}", gateway.addrs().outbound), &api_url]).await;
    assert_eq!(status, 403, "the gateway's outbound port\n{}", show(&out));
    assert_eq!(api.requests(), served + 1, "only the bound request through the bind reached the host");

    // `explain` shows the path.
    let out = run(&mut plexus(&["explain", "--to", &format!("localhost:{a}")]), Duration::from_secs(30))
        .await
        .expect("explain");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("through egress gateway default/egress"), "{}", show(&out));
}
