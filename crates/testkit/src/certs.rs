//! Test certificates made with `openssl`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::{command, run_ok};

/// Certificates made with `openssl` in a directory of their own (tests that present a mesh
/// identity, another trust domain's, or a foreign CA's).
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// Certificates in `dir` (created).
    pub fn new(dir: PathBuf) -> Result<Certs> {
        std::fs::create_dir_all(&dir)?;
        Ok(Certs { dir })
    }

    async fn openssl(&self, args: &[&str]) -> Result<()> {
        let mut cmd = command("openssl");
        cmd.args(args).current_dir(&self.dir);
        run_ok(&mut cmd, Duration::from_secs(30)).await?;
        Ok(())
    }

    /// A leaf for `spiffe_id` signed by `ca`/`ca_key`; the returned certificate file holds the
    /// leaf then the signer (the chain a client sends). `ca` `None`: a self-signed CA of its own.
    pub async fn leaf(&self, name: &str, spiffe_id: &str, ca: Option<(&Path, &Path)>) -> Result<(PathBuf, PathBuf)> {
        let p = |f: &str| self.dir.join(format!("{name}{f}")).display().to_string();
        let (key, csr, leaf, ext, chain) = (p("-key.pem"), p(".csr"), p("-leaf.pem"), p(".ext"), p(".pem"));
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=critical,URI:{spiffe_id}\n"
            ),
        )?;
        self.openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &key]).await?;
        self.openssl(&["req", "-new", "-key", &key, "-subj", &format!("/CN={name}"), "-out", &csr]).await?;
        let (ca_cert, ca_key) = match ca {
            Some((c, k)) => (c.display().to_string(), k.display().to_string()),
            None => {
                let (c, k) = (p("-ca.pem"), p("-ca-key.pem"));
                #[rustfmt::skip]
                self.openssl(&[
                    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", &k, "-out", &c, "-subj", "/O=Elsewhere/CN=foreign", "-days", "2",
                    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                ]).await?;
                (c, k)
            }
        };
        #[rustfmt::skip]
        self.openssl(&[
            "x509", "-req", "-in", &csr, "-CA", &ca_cert, "-CAkey", &ca_key, "-CAcreateserial",
            "-days", "1", "-extfile", &ext, "-out", &leaf,
        ]).await?;
        let both = format!("{}{}", std::fs::read_to_string(&leaf)?, std::fs::read_to_string(&ca_cert)?);
        std::fs::write(&chain, both)?;
        Ok((chain.into(), key.into()))
    }
}
