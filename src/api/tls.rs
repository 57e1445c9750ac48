//! TLS (rustls): the server's certificate chain and key and, for mutual TLS, the CA that
//! client certificates must chain to, read from PEM files; the handshake of each accepted
//! connection; and reloads of the files that change only the
//! connections accepted after them (open connections and their streams keep theirs).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, crypto};
use tokio_rustls::server::TlsStream;

use super::connections::Connection;

/// Longest TLS handshake: a client that connects and sends nothing must not hold a task
/// and a socket for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{what} {path}: {source}")]
    Read {
        /// Which file it is (certificate, key, client CA).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM of its kind.
    #[error("{what} {path}: {reason}")]
    Invalid {
        /// Which file it is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the combination (a key that does not match the certificate, say).
    #[error("tls configuration: {0}")]
    Config(String),
}

/// Where the PEM files are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to; with it, every client must
    /// present one (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files, for the reload watcher.
    pub fn paths(&self) -> Vec<PathBuf> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// The server's TLS configuration, replaced whole when its files change.
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Reads the files; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// The files it reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Reads the files again. New connections get the new configuration; on an error the
    /// old one stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        what,
        path: path.to_owned(),
        reason,
    };
    let pem = read(what, path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid(error.to_string()))?;
    if certificates.is_empty() {
        return Err(invalid("no PEM certificate in it".into()));
    }
    Ok(certificates)
}

fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let chain = certificates("certificate", &files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read("key", &files.key)?).map_err(|error| {
        TlsError::Invalid {
            what: "key",
            path: files.key.clone(),
            reason: error.to_string(),
        }
    })?;
    let provider = Arc::new(crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for certificate in certificates("client CA", path)? {
                roots.add(certificate).map_err(|error| TlsError::Invalid {
                    what: "client CA",
                    path: path.clone(),
                    reason: error.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| TlsError::Config(error.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|error| TlsError::Config(error.to_string()))?;
    // gRPC runs on HTTP/2; clients ask for it by ALPN.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The TLS handshake of a connection accepted now, with the configuration current now;
/// for [`super::connections::incoming`]. A client that says nothing for
/// `HANDSHAKE_TIMEOUT` is dropped.
pub fn handshake(
    tls: Arc<ServerTls>,
) -> impl Fn(Connection) -> Pin<Box<dyn Future<Output = io::Result<TlsStream<Connection>>> + Send>>
+ Send
+ 'static {
    move |connection| {
        let acceptor = tls.acceptor();
        Box::pin(async move {
            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(connection))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
        })
    }
}
