//! The agent's TLS client configuration: rustls with the `ring` provider,
//! trusting one of
//! - the public web PKI (webpki-roots), by default;
//! - a CA file (private PKI, the collector's dev CA), `ca_file`;
//! - a CA pinned by its SHA-256 fingerprint, `ca_fingerprint`: the
//!   collector serves its CA in its chain; the certificate there whose
//!   fingerprint matches becomes the only root the chain is verified
//!   against (fully, name and dates included), and is saved to the state
//!   directory, after which it is used like a `ca_file`.
//!
//! The server certificate is always verified; there is no switch to turn
//! that off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime};

/// What the agent trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// webpki-roots.
    WebPki,
    /// A PEM bundle.
    CaFile(PathBuf),
    /// The CA whose DER has this SHA-256, saved to `save_to` once seen.
    Fingerprint {
        /// SHA-256 of the CA certificate's DER.
        sha256: [u8; 32],
        /// Where the pinned CA is kept (PEM).
        save_to: PathBuf,
    },
}

/// SHA-256 of a certificate's DER.
pub fn sha256(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Parses `sha256:<64 hex digits>` (colons between bytes allowed).
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let hex: String = s.strip_prefix("sha256:")?.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("cannot read CA file {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("bad PEM in CA file {}: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("CA file {} holds no certificate", path.display());
    }
    Ok(certs)
}

/// Builds the client config. `ca_file`: PEM bundle; `None` uses webpki-roots.
pub fn client_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<ClientConfig>> {
    match ca_file {
        Some(p) => config_for(&Trust::CaFile(p.to_path_buf())),
        None => config_for(&Trust::WebPki),
    }
}

/// Builds the client config for `trust`.
pub fn config_for(trust: &Trust) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match trust {
        Trust::WebPki => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Trust::CaFile(path) => {
            for cert in read_pem(path)? {
                roots.add(cert)?;
            }
        }
        Trust::Fingerprint { sha256: want, save_to } => {
            // Seen before: the saved CA, if it is still the pinned one.
            if let Ok(certs) = read_pem(save_to) {
                if certs.iter().any(|c| sha256(c.as_ref()) == *want) {
                    return config_for(&Trust::CaFile(save_to.clone()));
                }
            }
            let verifier = PinnedCa { sha256: *want, save_to: save_to.clone(), provider: provider() };
            let config = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .dangerous() // a verifier of our own; it verifies fully
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            return Ok(Arc::new(config));
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Verifies the server's chain against the CA in it whose fingerprint is
/// pinned, then saves that CA.
#[derive(Debug)]
struct PinnedCa {
    sha256: [u8; 32],
    save_to: PathBuf,
    provider: Arc<CryptoProvider>,
}

fn to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn save(path: &Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(pem.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| sha256(c.as_ref()) == self.sha256) else {
            return Err(rustls::Error::General(
                "no certificate in the collector's chain matches ca_fingerprint".into(),
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let others: Vec<CertificateDer<'_>> = intermediates.iter().filter(|c| *c != ca).cloned().collect();
        let verified = inner.verify_server_cert(end_entity, &others, server_name, ocsp_response, now)?;
        if let Err(e) = save(&self.save_to, &to_pem(ca.as_ref())) {
            tracing::warn!(path = %self.save_to.display(), error = %e, "cannot save the pinned CA");
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex = "00".repeat(31) + "ff";
        let mut want = [0u8; 32];
        want[31] = 0xff;
        assert_eq!(parse_fingerprint(&format!("sha256:{hex}")), Some(want));
        let colons: Vec<String> = (0..32).map(|i| hex[2 * i..2 * i + 2].to_string()).collect();
        assert_eq!(parse_fingerprint(&format!("sha256:{}", colons.join(":"))), Some(want));
        assert_eq!(parse_fingerprint(&hex), None, "needs the sha256: prefix");
        assert_eq!(parse_fingerprint("sha256:abc"), None);
        assert_eq!(parse_fingerprint(&format!("sha256:{}", "zz".repeat(32))), None);
    }

    #[test]
    fn pem_round_trips() {
        let der: Vec<u8> = (0..200u8).collect();
        let pem = to_pem(&der);
        let back: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(back[0].as_ref(), der.as_slice());
    }
}
