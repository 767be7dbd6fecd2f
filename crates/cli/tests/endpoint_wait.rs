//! A Service with no endpoint (its one replica restarting): requests wait a short, bounded time
//! for one (ResiliencePolicy `timeouts.endpointWait`, default 3 s) instead of failing at once,
//! then get 503 (issue 18, Linkerd's fail-fast model).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use plexus_testkit::{HttpEcho, Proxy, Resources, ServicePort, TempDir, WorkloadSpec};

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");

fn service() -> Resources {
    Resources::new().service("app", &[ServicePort::new("http", 8080, Some("http"))])
}

async fn proxy(resources: &std::path::Path) -> Result<Proxy> {
    let path = resources.to_str().context("path")?;
    Proxy::start_named(
        "proxy",
        PLEXUS,
        ["proxy", "--resources", path, "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0"]
            .into_iter()
            .chain(["--upstream", "app:8080=0"]),
    )
    .await
}

async fn get(proxy: &Proxy) -> Result<(u16, Duration, String)> {
    let started = Instant::now();
    let r =
        plexus_testkit::client::get(proxy.upstream("app.default:8080")?, "app:8080", "/", &[], Duration::from_secs(15))
            .await?;
    let reason = r.header("x-plexus-error").unwrap_or_default().to_string();
    Ok((r.status.as_u16(), started.elapsed(), reason))
}

/// The endpoint appears 1 s after the request arrived: the request waits for it and succeeds.
/// Positive control: with the endpoint there, a request is served at once.
#[tokio::test]
async fn a_request_waits_for_the_endpoint_of_a_restarting_replica() -> Result<()> {
    let dir = TempDir::new("endpoint-wait")?;
    let app = HttpEcho::start("app-1").await?;
    let resources = dir.join("resources.yaml");
    let with_endpoint = service().workload(&WorkloadSpec::plain("app-1", "app", "http", app.port()));
    service().write(&resources)?;
    let proxy = proxy(&resources).await?;

    let waiting = tokio::spawn({
        let upstream = proxy.upstream("app.default:8080")?;
        async move {
            let started = Instant::now();
            let r = plexus_testkit::client::get(upstream, "app:8080", "/", &[], Duration::from_secs(15)).await?;
            anyhow::Ok((r.status.as_u16(), started.elapsed()))
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    with_endpoint.write(&resources)?;
    let (status, took) = waiting.await??;
    assert_eq!(status, 200, "the request that arrived with no endpoint");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{took:?}");
    let (status, took, _) = get(&proxy).await?;
    assert_eq!(status, 200);
    assert!(took < Duration::from_millis(900), "served at once once the endpoint is there: {took:?}");
    Ok(())
}

/// With no endpoint at all, the request gets 503 once the wait is over: after the default 3 s,
/// after `endpointWait` when a ResiliencePolicy sets it, and at once with `0s`.
#[tokio::test]
async fn without_an_endpoint_the_wait_is_bounded_then_503() -> Result<()> {
    let dir = TempDir::new("endpoint-wait-503")?;
    let resources = dir.join("resources.yaml");
    service().write(&resources)?;
    let proxy = proxy(&resources).await?;
    let (status, took, reason) = get(&proxy).await?;
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("no healthy endpoint"), "{reason}");
    assert!(took >= Duration::from_millis(2900) && took < Duration::from_secs(6), "default wait: {took:?}");

    for (wait, min, max) in [("400ms", 350, 2500), ("0s", 0, 600)] {
        let policy = format!(
            "---\napiVersion: plexus.dev/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: app}}\nspec:\n  targetRef: {{kind: Service, name: app}}\n  timeouts: {{endpointWait: {wait}}}\n"
        );
        let mut text = std::fs::read_to_string(&resources)?;
        if let Some(i) = text.find("\n---\napiVersion: plexus.dev/v1alpha1\nkind: ResiliencePolicy") {
            text.truncate(i + 1);
        }
        std::fs::write(&resources, format!("{}{policy}", text.trim_end_matches('\n').to_string() + "\n"))?;
        plexus_testkit::eventually(Duration::from_secs(10), || async {
            let config = proxy.admin_get("/config").await?.text();
            anyhow::ensure!(
                config.contains(&format!("\"endpointWait\":\"{wait}\""))
                    || config.contains(&format!("\"endpointWait\": \"{wait}\"")),
                "policy not loaded yet"
            );
            Ok(())
        })
        .await?;
        let (status, took, _) = get(&proxy).await?;
        assert_eq!(status, 503);
        assert!(
            took >= Duration::from_millis(min) && took < Duration::from_millis(max),
            "endpointWait {wait}: {took:?}"
        );
    }
    Ok(())
}
