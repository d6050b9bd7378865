//! TLS termination: certificates per domain from a directory (or none, when ACME issues them
//! all) and from ACME, chosen by SNI, reloadable while serving. Both are folded into one set,
//! rebuilt when either changes, so a handshake reads one `Arc` under one lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::ProxyError;
use super::acme::{ACME_TLS_ALPN, AcmeAnswers, IssuedCerts};

/// File stem of the certificate served when no other matches (or the client sent no SNI).
const DEFAULT_STEM: &str = "_default";
/// File stem prefix of a wildcard certificate: `_wildcard.example.com` serves `*.example.com`.
const WILDCARD_PREFIX: &str = "_wildcard.";

/// The certificates of one reading of the directory.
#[derive(Debug, Default)]
struct DirCerts {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the parent domain: `example.com` for `*.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

/// What a handshake chooses from: the directory's certificates and ACME's issued ones.
#[derive(Debug, Default)]
struct CertSet {
    dir: Arc<DirCerts>,
    acme: IssuedCerts,
}

impl CertSet {
    /// The operator's exact or wildcard certificate for `name`, else ACME's, else the default:
    /// an operator's file for a name always wins over one from ACME.
    fn find(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = name {
            if let Some(key) = self.dir.named(name) {
                return Some(key);
            }
            if let Some(key) = self.acme.get(&normalized(name)) {
                return Some(key.clone());
            }
        }
        self.dir.default.clone()
    }

    /// Whether a certificate of `name`'s own (or a wildcard's) is in the set.
    fn covers(&self, name: &str) -> bool {
        self.dir.named(name).is_some() || self.acme.contains_key(&normalized(name))
    }
}

/// A host name as the sets key it: lowercase, without a final dot.
fn normalized(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DirCerts {
    fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len() + usize::from(self.default.is_some())
    }

    /// The certificate issued for `name` itself or for a wildcard covering it; never the
    /// default.
    fn named(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = normalized(name);
        if let Some(key) = self.exact.get(&name) {
            return Some(key.clone());
        }
        // A wildcard covers exactly one label (RFC 6125 §6.4.3).
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).cloned()
    }
}

/// The SNI resolver rustls calls on each handshake; the set behind it is swapped whole when
/// the directory is read again or ACME's certificates change.
#[derive(Debug)]
struct Resolver {
    set: RwLock<Arc<CertSet>>,
    /// The proxy's ACME challenge answers, once the HTTPS listener serves.
    acme: OnceLock<Arc<AcmeAnswers>>,
}

impl Resolver {
    fn current(&self) -> Arc<CertSet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Swaps in a set with one part replaced; writers take the write lock, so a reload and
    /// an ACME change at once both land.
    fn replace(&self, dir: Option<Arc<DirCerts>>, acme: Option<IssuedCerts>) {
        let mut guard = self.set.write().unwrap_or_else(|p| p.into_inner());
        let next = CertSet {
            dir: dir.unwrap_or_else(|| guard.dir.clone()),
            acme: acme.unwrap_or_else(|| guard.acme.clone()),
        };
        *guard = Arc::new(next);
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A TLS-ALPN-01 validation offers `acme-tls/1` alone (RFC 8737 §3) and gets the
        // challenge certificate; no other client ever sees it.
        let only_acme = hello
            .alpn()
            .map(|mut protocols| {
                protocols.next() == Some(ACME_TLS_ALPN) && protocols.next().is_none()
            })
            .unwrap_or(false);
        if only_acme {
            return self
                .acme
                .get()
                .and_then(|a| hello.server_name().and_then(|name| a.tls_alpn01(name)));
        }
        self.current().find(hello.server_name())
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
        let dir_certs = match dir {
            Some(dir) => read_dir(dir, &provider)?,
            None => DirCerts::default(),
        };
        let resolver = Arc::new(Resolver {
            set: RwLock::new(Arc::new(CertSet {
                dir: Arc::new(dir_certs),
                acme: IssuedCerts::default(),
            })),
            acme: OnceLock::new(),
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
        let dir_certs = read_dir(dir, &self.provider)?;
        let count = dir_certs.len();
        self.resolver.replace(Some(Arc::new(dir_certs)), None);
        Ok(count)
    }

    /// How many certificates are loaded from the directory (the default and wildcards
    /// included).
    pub fn len(&self) -> usize {
        self.resolver.current().dir.len()
    }

    /// Whether a certificate for `name` is loaded, its own or a wildcard's from `certs_dir` or
    /// one issued by ACME, not counting the default: the proxy redirects plain HTTP to HTTPS
    /// only for such names, since a browser would refuse the default certificate for any other.
    pub fn covers(&self, name: &str) -> bool {
        self.resolver.current().covers(name)
    }

    /// Whether no certificate is loaded (every handshake would then fail).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Serves ACME's challenge and issued certificates beside the directory's: the issued
    /// ones are folded into the set now and again after each change. A store serves one
    /// proxy's answers; a second call is ignored.
    pub(crate) fn attach_acme(&self, acme: Arc<AcmeAnswers>) {
        if self.resolver.acme.set(acme.clone()).is_err() {
            return;
        }
        let resolver = Arc::downgrade(&self.resolver);
        acme.on_issued_change(Box::new(move |issued| {
            if let Some(resolver) = resolver.upgrade() {
                resolver.replace(None, Some(issued.clone()));
            }
        }));
    }

    /// The server configuration choosing certificates from this store.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }
}

fn read_dir(dir: &Path, provider: &CryptoProvider) -> Result<DirCerts, ProxyError> {
    let dir_error = |source| ProxyError::CertDir {
        path: dir.display().to_string(),
        source,
    };
    let mut set = DirCerts::default();
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pem(pki: &px_test_support::Pki) -> (String, String) {
        (
            std::fs::read_to_string(pki.cert()).unwrap(),
            std::fs::read_to_string(pki.key()).unwrap(),
        )
    }

    #[test]
    fn acme_certificates_join_and_leave_the_one_set_and_a_reload_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let operator = px_test_support::Pki::new(&["files.example.com"]).unwrap();
        std::fs::copy(operator.cert(), dir.path().join("files.example.com.crt")).unwrap();
        std::fs::copy(operator.key(), dir.path().join("files.example.com.key")).unwrap();
        let store = CertStore::load(dir.path()).unwrap();
        let acme = Arc::new(AcmeAnswers::default());
        let issued = px_test_support::Pki::new(&["shop.example.com"]).unwrap();
        let (chain, key) = pem(&issued);
        // Issued before the listener serves: folded in when attached.
        acme.set_issued("shop.example.com", &chain, &key).unwrap();
        assert!(!store.covers("shop.example.com"));
        store.attach_acme(acme.clone());
        assert!(store.covers("shop.example.com"));
        assert!(store.covers("SHOP.example.com."));
        assert!(store.covers("files.example.com"));

        // Issued while serving, then kept across a reload of the directory.
        acme.set_issued("blog.example.com", &chain, &key).unwrap();
        assert!(store.covers("blog.example.com"));
        assert_eq!(store.reload().unwrap(), 1);
        assert!(store.covers("blog.example.com") && store.covers("files.example.com"));

        // Dropped (its name no longer routed): no longer chosen.
        acme.remove_issued("blog.example.com");
        assert!(!store.covers("blog.example.com"));
        assert!(store.covers("shop.example.com"));
        let set = store.resolver.current();
        assert!(
            set.find(Some("blog.example.com")).is_none(),
            "no default here"
        );
        assert!(set.find(Some("shop.example.com")).is_some());
    }
}
