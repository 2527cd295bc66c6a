//! TLS for a listener: a certificate chain and its key from PEM files, read again whenever
//! either file changes (looked at every `reload_every`), so a renewed certificate is served
//! without a restart. A file that does not read keeps the certificate served so far, says so
//! in the log and counts `checkplane_tls_reload_failures_total`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// Where a listener's certificate and key are, and how often they are looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often the files are looked at for a change.
    pub reload_every: Duration,
}

/// Why a certificate and key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path}: the key does not match the certificate ({reason})")]
    Mismatch { path: PathBuf, reason: String },
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Read the chain and key of `files` into a key rustls can serve.
pub fn load(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| file_error(&files.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(&files.cert, e))?;
    if chain.is_empty() {
        return Err(file_error(&files.cert, "no CERTIFICATE in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_error(&files.key, e))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError::Mismatch {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(certified)
}

/// The certificate being served, swapped when its files change.
#[derive(Debug)]
pub struct Reloading {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' modification times when last read.
    stamp: RwLock<Option<(SystemTime, SystemTime)>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Reloading {
    /// The certificate of `files`, read now.
    pub fn new(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let stamp = modified(&files.cert).zip(modified(&files.key));
        let current = load(&files)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(current)),
            stamp: RwLock::new(stamp),
        }))
    }

    /// Read the files again if either changed since they were last read: whether the served
    /// certificate changed.
    pub fn reload_if_changed(&self) -> bool {
        let now = modified(&self.files.cert).zip(modified(&self.files.key));
        if now.is_none() || now == *self.stamp.read().unwrap_or_else(PoisonError::into_inner) {
            return false;
        }
        match load(&self.files) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
                *self.stamp.write().unwrap_or_else(PoisonError::into_inner) = now;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(error) => {
                // Half-written (the certificate renewed before its key): tried again next
                // time, as the stamp stays.
                metrics::counter!("checkplane_tls_reload_failures_total").increment(1);
                tracing::warn!(%error, "TLS certificate not reloaded; serving the previous one");
                false
            }
        }
    }

    /// Look at the files every `reload_every` until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.files.reload_every) => {}
            }
            self.reload_if_changed();
        }
    }

    /// A server configuration serving this certificate (HTTP/1.1 only, as the listener).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}
