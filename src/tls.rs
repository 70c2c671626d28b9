//! TLS for the API: the client's HTTPS (rustls, the system's roots plus an optional private CA)
//! and the coordinator's own listener (a certificate chain and key from PEM files).
//!
//! One crypto provider for the process, *ring*: it builds with a C compiler alone, where the
//! aws-lc provider would need CMake on the build machine.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{0}")]
    Config(String),
}

/// Make *ring* the process's provider (once; later calls and other installers are fine).
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Read {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// What an HTTPS client trusts: the system's roots, and `ca_cert` (a PEM file, e.g. a private
/// CA) when given.
pub fn client_config(ca_cert: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    install_provider();
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped: a private CA may be all a deployment needs.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_cert {
        for cert in read_certs(path, "CA certificate")? {
            roots
                .add(cert)
                .map_err(|e| TlsError::Config(format!("CA certificate {}: {e}", path.display())))?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::Config(
            "no trusted root certificate: the system has none readable; pass a CA certificate"
                .into(),
        ));
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(Arc::new(roots))
        .with_no_client_auth())
}

/// The coordinator's TLS listener: `cert` (PEM chain, leaf first) and `key` (PEM private key).
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    install_provider();
    let chain = read_certs(cert, "TLS certificate")?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Read {
        what: "TLS private key",
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("TLS certificate and key: {e}")))
}
