//! TLS for both listeners (rustls, ring): `--tls-cert` and `--tls-key` (PEM). The gRPC listener
//! takes tonic's own TLS; the backend HTTP listener is wrapped in [`TlsListener`], which runs each
//! handshake on its own task (bounded, with a deadline) so a client that stalls its handshake holds
//! up no one else's.

use std::{io, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; past it, accepting waits for one to finish.
const MAX_HANDSHAKES: usize = 128;

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

/// A listener whose connections arrive after their TLS handshake.
pub struct TlsListener<L: axum::serve::Listener<Addr = SocketAddr>> {
    inner: L,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<L::Io>, SocketAddr)>>,
}

impl<L: axum::serve::Listener<Addr = SocketAddr>> TlsListener<L> {
    pub fn new(inner: L, acceptor: TlsAcceptor) -> Self {
        TlsListener { inner, acceptor, handshakes: JoinSet::new() }
    }
}

impl<L> axum::serve::Listener for TlsListener<L>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    type Io = TlsStream<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let full = self.handshakes.len() >= MAX_HANDSHAKES;
            tokio::select! {
                (io, addr) = self.inner.accept(), if !full => {
                    let acceptor = self.acceptor.clone();
                    self.handshakes.spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                            Ok(Ok(stream)) => Some((stream, addr)),
                            _ => None,
                        }
                    });
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
