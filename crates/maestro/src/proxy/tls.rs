//! TLS termination: certificates per domain from a directory (or none, when ACME issues them
//! all), chosen by SNI, reloadable while serving.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::ProxyError;
use super::acme::{ACME_TLS_ALPN, AcmeAnswers};

/// File stem of the certificate served when no other matches (or the client sent no SNI).
const DEFAULT_STEM: &str = "_default";
/// File stem prefix of a wildcard certificate: `_wildcard.example.com` serves `*.example.com`.
const WILDCARD_PREFIX: &str = "_wildcard.";

/// The certificates of one reading of the directory.
#[derive(Debug, Default)]
struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the parent domain: `example.com` for `*.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertSet {
    fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len() + usize::from(self.default.is_some())
    }

    /// The operator's exact or wildcard certificate for `name`, else ACME's, else the default:
    /// an operator's file for a name always wins over one from ACME.
    fn find(&self, name: Option<&str>, acme: Option<&AcmeAnswers>) -> Option<Arc<CertifiedKey>> {
        if let Some(key) = name.and_then(|name| self.named(name)) {
            return Some(key);
        }
        if let (Some(name), Some(acme)) = (name, acme)
            && let Some(key) = acme.issued(name)
        {
            return Some(key);
        }
        self.default.clone()
    }

    /// The certificate issued for `name` itself or for a wildcard covering it; never the
    /// default.
    fn named(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return Some(key.clone());
        }
        // A wildcard covers exactly one label (RFC 6125 §6.4.3).
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).cloned()
    }
}

/// The SNI resolver rustls calls on each handshake; the set behind it is swapped whole on
/// reload.
#[derive(Debug)]
struct Resolver {
    set: RwLock<Arc<CertSet>>,
    /// The proxy's ACME answers and issued certificates, once the HTTPS listener serves.
    acme: RwLock<Option<Arc<AcmeAnswers>>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = self.acme.read().unwrap_or_else(|p| p.into_inner()).clone();
        // A TLS-ALPN-01 validation offers `acme-tls/1` alone (RFC 8737 §3) and gets the
        // challenge certificate; no other client ever sees it.
        let only_acme = hello
            .alpn()
            .map(|mut protocols| {
                protocols.next() == Some(ACME_TLS_ALPN) && protocols.next().is_none()
            })
            .unwrap_or(false);
        if only_acme {
            return acme.and_then(|a| hello.server_name().and_then(|name| a.tls_alpn01(name)));
        }
        let set = self.set.read().unwrap_or_else(|p| p.into_inner()).clone();
        set.find(hello.server_name(), acme.as_deref())
    }
}

/// Certificates per domain from a directory: `<dir>/<domain>.crt` + `<dir>/<domain>.key` (PEM),
/// an optional `_default.crt`/`.key` for anything else, and `_wildcard.example.com.crt`/`.key`
/// for `*.example.com`. [`CertStore::reload`] re-reads the directory (on SIGHUP). A store
/// without a directory ([`CertStore::acme_only`]) serves only what ACME issued.
#[derive(Debug)]
pub struct CertStore {
    dir: Option<PathBuf>,
    provider: Arc<CryptoProvider>,
    resolver: Arc<Resolver>,
    config: Arc<rustls::ServerConfig>,
}

impl CertStore {
    /// Reads every certificate in `dir`; any unreadable or mismatched pair is an error.
    pub fn load(dir: &Path) -> Result<Arc<Self>, ProxyError> {
        Self::new(Some(dir))
    }

    /// A store with no files of the operator's: it serves the certificates ACME issued (and
    /// its challenge certificates), and a handshake for any other name fails.
    pub fn acme_only() -> Result<Arc<Self>, ProxyError> {
        Self::new(None)
    }

    fn new(dir: Option<&Path>) -> Result<Arc<Self>, ProxyError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let set = match dir {
            Some(dir) => read_dir(dir, &provider)?,
            None => CertSet::default(),
        };
        let resolver = Arc::new(Resolver {
            set: RwLock::new(Arc::new(set)),
            acme: RwLock::new(None),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // HTTP/2 first, then HTTP/1.1; each connection is served in what it chose.
        // `acme-tls/1` is chosen only by a TLS-ALPN-01 validation, which offers nothing else.
        config.alpn_protocols = super::protocol::alpn_protocols();
        config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
        Ok(Arc::new(Self {
            dir: dir.map(Path::to_path_buf),
            provider,
            resolver,
            config: Arc::new(config),
        }))
    }

    /// Re-reads the directory and serves its certificates from the next handshake on; returns
    /// how many there are. On error the certificates in use stay as they were. Without a
    /// directory there is nothing to read (ACME's certificates come over Beacon's link).
    pub fn reload(&self) -> Result<usize, ProxyError> {
        let Some(dir) = &self.dir else {
            return Ok(0);
        };
        let set = read_dir(dir, &self.provider)?;
        let count = set.len();
        *self.resolver.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        Ok(count)
    }

    /// How many certificates are loaded (the default and wildcards included).
    pub fn len(&self) -> usize {
        self.resolver
            .set
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Whether a certificate for `name` is loaded, its own or a wildcard's from `certs_dir` or
    /// one issued by ACME, not counting the default: the proxy redirects plain HTTP to HTTPS
    /// only for such names, since a browser would refuse the default certificate for any other.
    pub fn covers(&self, name: &str) -> bool {
        let named = self
            .resolver
            .set
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .named(name)
            .is_some();
        named
            || self
                .resolver
                .acme
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|acme| acme.issued(name).is_some())
    }

    /// Whether no certificate is loaded (every handshake would then fail).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Serves ACME's challenge and issued certificates beside the directory's.
    pub(crate) fn attach_acme(&self, acme: Arc<AcmeAnswers>) {
        *self
            .resolver
            .acme
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(acme);
    }

    /// The server configuration choosing certificates from this store.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }
}

fn read_dir(dir: &Path, provider: &CryptoProvider) -> Result<CertSet, ProxyError> {
    let dir_error = |source| ProxyError::CertDir {
        path: dir.display().to_string(),
        source,
    };
    let mut set = CertSet::default();
    for entry in std::fs::read_dir(dir).map_err(dir_error)? {
        let path = entry.map_err(dir_error)?.path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".crt"))
            .filter(|stem| !stem.is_empty())
        else {
            continue;
        };
        let stem = stem.to_ascii_lowercase();
        let key = load_pair(&path, &dir.join(format!("{stem}.key")), provider)?;
        if stem == DEFAULT_STEM {
            set.default = Some(key);
        } else if let Some(parent) = stem.strip_prefix(WILDCARD_PREFIX) {
            set.wildcard.insert(parent.to_string(), key);
        } else {
            set.exact.insert(stem, key);
        }
    }
    Ok(set)
}

fn load_pair(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, ProxyError> {
    let cert_error = |path: &Path, detail: String| ProxyError::Cert {
        path: path.display().to_string(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| cert_error(cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_error(cert_path, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| cert_error(key_path, format!("cannot read the private key: {e}")))?;
    let certified = CertifiedKey::from_der(certs, key, provider)
        .map_err(|e| cert_error(cert_path, format!("does not match its key: {e}")))?;
    Ok(Arc::new(certified))
}
