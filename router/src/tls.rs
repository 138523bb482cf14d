//! TLS termination on the client listener (rustls through pingora), with the
//! certificate swapped in place on reload: new handshakes get the new certificate,
//! established connections keep theirs, and a bad PEM file leaves the old one serving.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, ResolvesServerCert};

use crate::config::TlsConfig;

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("TLS: {path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The key does not suit rustls (unsupported algorithm) or does not match.
    #[error("TLS: key {path} cannot be used: {message}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// rustls' reason.
        message: String,
    },
}

/// The certificate currently served, replaceable while the listener runs.
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    files: ArcSwap<TlsConfig>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("files", &self.files.load())
            .finish()
    }
}

impl CertStore {
    /// Loads the certificate chain and key named in `files`.
    pub fn load(files: &TlsConfig) -> Result<Self, TlsError> {
        let key = certified_key(files)?;
        Ok(Self {
            current: ArcSwap::from_pointee(key),
            files: ArcSwap::from_pointee(files.clone()),
        })
    }

    /// Re-reads the PEM files (possibly at new paths). On error the previous
    /// certificate keeps serving.
    pub fn reload(&self, files: &TlsConfig) -> Result<(), TlsError> {
        let key = certified_key(files)?;
        self.current.store(Arc::new(key));
        self.files.store(Arc::new(files.clone()));
        Ok(())
    }

    /// The files last loaded, for the reload watcher.
    pub fn files(&self) -> TlsConfig {
        TlsConfig::clone(&self.files.load())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified_key(files: &TlsConfig) -> Result<CertifiedKey, TlsError> {
    let pem_error = |path: &Path, message: String| TlsError::Pem {
        path: path.to_path_buf(),
        message,
    };
    let (Some(cert), Some(key)) = (files.cert.to_str(), files.key.to_str()) else {
        return Err(pem_error(&files.cert, "path is not UTF-8".into()));
    };
    for path in [&files.cert, &files.key] {
        if let Err(e) = std::fs::metadata(path) {
            return Err(pem_error(path, e.to_string()));
        }
    }
    let (chain, private) = match pingora::tls::load_certs_and_key_files(cert, key) {
        Ok(Some(pair)) => pair,
        Ok(None) => {
            return Err(pem_error(
                &files.cert,
                format!(
                    "no certificate in it, or no PKCS#8/PKCS#1/SEC1 private key in {}",
                    files.key.display()
                ),
            ));
        }
        Err(e) => return Err(pem_error(&files.cert, e.to_string())),
    };
    pingora::tls::install_default_crypto_provider();
    let provider = pingora::tls::CryptoProvider::get_default().ok_or_else(|| TlsError::Key {
        path: files.key.clone(),
        message: "no rustls crypto provider".into(),
    })?;
    let key_err = |e: pingora::tls::RusTlsError| TlsError::Key {
        path: files.key.clone(),
        message: e.to_string(),
    };
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(key_err)?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(key_err)?;
    Ok(certified)
}

/// pingora listener settings serving from `store`, with HTTP/2 offered by ALPN.
pub fn listener_settings(
    store: Arc<CertStore>,
) -> Result<pingora::listeners::tls::TlsSettings, TlsError> {
    let mut settings =
        pingora::listeners::tls::TlsSettings::intermediate("", "").map_err(|e| TlsError::Pem {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
    settings.set_cert_resolver(store);
    settings.enable_h2();
    Ok(settings)
}
