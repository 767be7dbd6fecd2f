//! `plexus inject -f FILE|-`: the webhook's injection, offline, on a YAML stream (for
//! `kubectl apply -f -`). Every Pod and every workload's pod template (Deployment,
//! StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob) is injected unless
//! annotated `plexus.dev/inject: disabled` or already injected; other documents pass through.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;

use plexus_k8s::inject::{Decision, INJECT_KEY, InjectConfig, inject_object};

use crate::Failure;

#[derive(clap::Args)]
pub struct InjectArgs {
    /// The YAML stream (`-`: standard input).
    #[arg(short = 'f', long = "filename")]
    file: String,
    /// The mesh's trust anchor (PEM) the proxies verify the control plane with (the control
    /// plane's `trust-anchor.pem`, or `ca.crt` of the `plexus-identity` Secret).
    #[arg(long)]
    trust_anchor: PathBuf,
    /// The control plane as the proxies reach it (without cluster DNS: its Service's ClusterIP).
    #[arg(long, default_value = "https://plexus-control.plexus-system.svc:7700")]
    control_plane: String,
    /// The cluster's Kubernetes version: native sidecars from 1.29.
    #[arg(long, default_value = "1.20")]
    kubernetes_version: String,
    /// The image of the injected containers.
    #[arg(long, default_value_t = plexus_k8s::install::default_image())]
    image: String,
}

pub async fn run(args: InjectArgs) -> Result<(), Failure> {
    let text = if args.file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| Failure::usage(format!("-f -: {e}")))?;
        s
    } else {
        std::fs::read_to_string(&args.file).map_err(|e| Failure::usage(format!("-f {}: {e}", args.file)))?
    };
    let trust_anchor_pem = std::fs::read_to_string(&args.trust_anchor)
        .map_err(|e| Failure::usage(format!("--trust-anchor {}: {e}", args.trust_anchor.display())))?;
    if !trust_anchor_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(Failure::usage(format!(
            "--trust-anchor {}: no PEM certificate in it",
            args.trust_anchor.display()
        )));
    }
    let native_sidecars = InjectConfig::native_sidecars_for_version(&args.kubernetes_version)
        .map_err(|e| Failure::usage(format!("--kubernetes-version: {e}")))?;
    let config = InjectConfig {
        image: args.image,
        image_pull_policy: "IfNotPresent".into(),
        control_plane: args.control_plane,
        trust_anchor_pem,
        native_sidecars,
    };
    print!("{}", inject_stream(&args.file, &text, &config)?);
    Ok(())
}

/// Injects every document of a YAML stream that has a pod; the whole stream, re-rendered.
pub fn inject_stream(file: &str, text: &str, config: &InjectConfig) -> Result<String, Failure> {
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| Failure::usage(format!("{file}: not YAML: {e}")))?;
    // Offline there is no namespace to read: every pod counts as opted in (its own
    // `disabled` annotation still opts out).
    let opted_in: BTreeMap<String, String> = [(INJECT_KEY.to_string(), "enabled".to_string())].into();
    let mut out = String::new();
    for (i, mut doc) in documents.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or("?").to_string();
        let decision = inject_object(&mut doc, &opted_in, config)
            .map_err(|e| Failure::usage(format!("{file}: document {} ({kind}): {e}", i + 1)))?;
        if let Decision::Skip(why) = decision
            && why != "not a pod or pod template"
        {
            eprintln!("{file}: document {} ({kind}) not injected: {why}", i + 1);
        }
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&doc).map_err(|e| Failure::runtime(format!("cannot render YAML: {e}")))?);
    }
    Ok(out)
}
