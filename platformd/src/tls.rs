//! TLS for both listeners (rustls, ring): `--tls-cert` and `--tls-key` (PEM). The gRPC listener
//! takes tonic's own TLS; the backend HTTP listener's accept loop (the platform crate's) runs the
//! [`Identity::acceptor`]'s handshake on each connection's own task, within its header deadline,
//! so a client that stalls its handshake holds up no one else's.

use std::{path::Path, sync::Arc};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::TlsAcceptor;

/// The certificate chain and key, as read from their files.
#[derive(Clone)]
pub struct Identity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity(..)")
    }
}

impl Identity {
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, String> {
        let cert_pem = std::fs::read(cert).map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
        let key_pem = std::fs::read(key).map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
        let identity = Identity { cert_pem, key_pem };
        identity.acceptor()?;
        Ok(identity)
    }

    /// tonic's TLS settings for the gRPC listener.
    pub fn tonic(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
    }

    /// An acceptor for the backend HTTP listener (HTTP/1.1 over TLS).
    pub fn acceptor(&self) -> Result<TlsAcceptor, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--tls-cert: {e}"))?;
        if certs.is_empty() {
            return Err("--tls-cert: no certificate in the file".into());
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| format!("--tls-key: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}
