//! The device listener's TLS: a configured certificate, or a dev CA and
//! server certificate generated on first start.
//!
//! The dev CA's key stays in `<data-dir>/tls/ca-key.pem` (0600) so the
//! server certificate can be re-issued (new names) without re-distributing
//! the CA to every agent.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// What the device listener serves.
pub struct Tls {
    /// rustls config for the acceptor.
    pub config: Arc<ServerConfig>,
    /// The generated dev CA agents must trust, if one is in use.
    pub dev_ca: Option<PathBuf>,
    /// `sha256:<hex>` of the CA at the end of the served chain, if the chain
    /// has one (agents' `ca_fingerprint`).
    pub ca_fingerprint: Option<String>,
}

/// `sha256:<hex>` of a certificate's DER.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(cert.as_ref())))
}

/// Loads the configured certificate or generates the dev one.
pub fn load(tls: &TlsConfig, data_dir: &Path) -> anyhow::Result<Tls> {
    let (cert, key, dev_ca) = match (&tls.cert_file, &tls.key_file) {
        (Some(c), Some(k)) => (c.clone(), k.clone(), None),
        _ => {
            let dir = data_dir.join("tls");
            let ca = ensure_dev_certs(&dir, &tls.names)?;
            (dir.join("cert.pem"), dir.join("key.pem"), Some(ca))
        }
    };
    let mut chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .with_context(|| format!("cannot read certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad PEM in {}", cert.display()))?;
    if let Some(ca) = &dev_ca {
        // Serve the dev CA too, so agents can pin it by fingerprint
        // (`ca_fingerprint`) without a copy of the file.
        let ca: CertificateDer<'static> =
            CertificateDer::from_pem_file(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        chain.push(ca);
    }
    // The CA agents can pin: the last certificate of a served chain.
    let ca_fingerprint = (chain.len() > 1).then(|| fingerprint(chain.last().expect("len > 1")));
    let key =
        PrivateKeyDer::from_pem_file(&key).with_context(|| format!("cannot read private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("certificate and key do not match")?;
    // Agents send HTTP/1.1 upgrades only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls { config: Arc::new(config), dev_ca, ca_fingerprint })
}

/// Makes sure `dir` holds a dev CA and a server certificate naming
/// localhost, 127.0.0.1, ::1, this host and `extra` names. Returns the CA path.
pub fn ensure_dev_certs(dir: &Path, extra: &[String]) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca-key.pem");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    let names_path = dir.join("names.txt");
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Ok(host) = fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() && !names.iter().any(|n| n == host) {
            names.push(host.to_string());
        }
    }
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let wanted = names.join("\n");

    let issuer = if ca_path.exists() && ca_key_path.exists() {
        let key = KeyPair::from_pem(&fs::read_to_string(&ca_key_path)?).context("bad dev CA key")?;
        Issuer::from_ca_cert_pem(&fs::read_to_string(&ca_path)?, key).context("bad dev CA")?
    } else {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Pulsebell dev CA");
        dn.push(DnType::OrganizationName, "Pulsebell");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2046, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        write_private(&ca_key_path, key.serialize_pem().as_bytes())?;
        fs::write(&ca_path, cert.pem())?;
        // A new CA invalidates any old server certificate.
        let _ = fs::remove_file(&cert_path);
        Issuer::new(params, key)
    };

    let current = fs::read_to_string(&names_path).unwrap_or_default();
    if cert_path.exists() && key_path.exists() && current == wanted {
        return Ok(ca_path);
    }
    let mut params = CertificateParams::new(names.clone())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names.last().cloned().unwrap_or_else(|| "localhost".into()));
    params.distinguished_name = dn;
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    fs::write(&cert_path, cert.pem())?;
    fs::write(&names_path, wanted)?;
    Ok(ca_path)
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certs_are_generated_once_and_reissued_for_new_names() {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        let ca = ensure_dev_certs(&tls_dir, &[]).unwrap();
        let ca_pem = fs::read_to_string(&ca).unwrap();
        let cert_pem = fs::read_to_string(tls_dir.join("cert.pem")).unwrap();
        ensure_dev_certs(&tls_dir, &[]).unwrap();
        assert_eq!(fs::read_to_string(tls_dir.join("cert.pem")).unwrap(), cert_pem, "unchanged");
        ensure_dev_certs(&tls_dir, &["collector.lan".into()]).unwrap();
        assert_ne!(fs::read_to_string(tls_dir.join("cert.pem")).unwrap(), cert_pem, "re-issued");
        assert_eq!(fs::read_to_string(&ca).unwrap(), ca_pem, "same CA");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(tls_dir.join("key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        load(&TlsConfig::default(), dir.path()).unwrap();
    }
}
