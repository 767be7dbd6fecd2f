//! A test certificate authority issuing ECDSA P-256 server certificates (rcgen), for the
//! gateway's HTTPS listeners in universal mode and on Kubernetes.

use anyhow::Result;

/// A self-signed CA and its PEM.
pub struct Pki {
    pub ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub ca_pem: String,
}

impl Pki {
    /// A new CA whose common name is `cn`.
    pub fn named(cn: &str) -> Result<Pki> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key)?;
        let ca_pem = cert.pem();
        Ok(Pki { ca: rcgen::Issuer::new(params, key), ca_pem })
    }

    /// A certificate for `hosts` whose common name is `cn`: (chain PEM, key PEM).
    pub fn issue(&self, cn: &str, hosts: &[&str]) -> Result<(String, String)> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}
