//! Peers outside the mesh for the egress tests: a test PKI and a TLS echo server.

use std::path::PathBuf;

use plexus_testkit::{TempDir, command};

/// A CA and certificates signed by it, as PEM files in a directory.
pub struct Pki {
    pub ca: PathBuf,
    /// (cert, key) for the names given, signed by `ca`.
    pub good: (PathBuf, PathBuf),
    /// The same names, signed by another CA.
    pub foreign: (PathBuf, PathBuf),
    /// Signed by `ca`, for another name.
    pub misnamed: (PathBuf, PathBuf),
}

impl Pki {
    /// Writes the CA and certificates for `names` (DNS names or IP addresses) into `dir`.
    pub fn new(dir: &TempDir, names: &[&str]) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        // A CA: its PEM file, and the issuer that signs with it.
        let make_ca = |name: &str, file: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            let key = KeyPair::generate().expect("key");
            let cert = p.self_signed(&key).expect("ca");
            (write(file, cert.pem()), Issuer::new(p, key))
        };
        let (ca_pem, ca) = make_ca("egress test CA", "ca.pem");
        let (_, other) = make_ca("another CA", "other-ca.pem");
        let leaf = |names: &[&str], issuer: &Issuer<'_, KeyPair>, file: &str| {
            let p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
            let key = KeyPair::generate().expect("key");
            let cert = p.signed_by(&key, issuer).expect("leaf");
            (write(&format!("{file}.crt"), cert.pem()), write(&format!("{file}.key"), key.serialize_pem()))
        };
        Pki {
            ca: ca_pem,
            good: leaf(names, &ca, "good"),
            foreign: leaf(names, &other, "foreign"),
            misnamed: leaf(&["other.test"], &ca, "misnamed"),
        }
    }
}

/// `python3 -c TLS_ECHO CERT KEY BIND_ADDR [PORT]`: a TLS server that prints `ready PORT`, then
/// answers each connection's first bytes with `tls-echo:<bytes>` (proof they arrived over
/// TLS) and closes it.
pub const TLS_ECHO: &str = r#"
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 0))
s.listen(16)
print("ready", s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(5)
    try:
        t = ctx.wrap_socket(c, server_side=True)
        t.sendall(b"tls-echo:" + t.recv(100))
        t.close()
    except Exception:
        c.close()
"#;

/// A `plexus control` on free ports with its own data dir: `(process, http URL, grpc URL)`.
pub async fn control_plane(dir: &TempDir) -> (plexus_testkit::Background, String, String) {
    let data = dir.join("data");
    let http = format!("127.0.0.1:{}", plexus_testkit::free_port());
    let mut cmd = command(super::PLEXUS);
    cmd.args(["control", "--http-addr", &http, "--grpc-addr", "127.0.0.1:0", "--data-dir"]).arg(&data);
    let proc = plexus_testkit::Background::start("control", cmd, "{", std::time::Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let ready: serde_json::Value = serde_json::from_str(proc.ready_line()).expect("ready line");
    let grpc = format!("http://{}", ready["grpc"].as_str().expect("grpc address"));
    (proc, format!("http://{http}"), grpc)
}

/// `curl -sS -v --max-time 10 ARGS`: the last response status curl saw (a CONNECT's own when
/// the tunnel was refused), its `x-plexus-error`, and the output.
pub async fn curl(args: &[&str]) -> (u16, Option<String>, std::process::Output) {
    let mut all = vec!["-sS", "-v", "--max-time", "10"];
    all.extend_from_slice(args);
    let out = super::run_peer("curl", &all).await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let status = stderr
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("< HTTP/"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .next()
        .unwrap_or(0);
    let error = stderr
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("< "))
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-plexus-error"))
        .map(|(_, v)| v.trim().to_string())
        .next();
    (status, error, out)
}
