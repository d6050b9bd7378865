//! What the proxy serves for ACME (docs/src/design/acme.md): the challenge answers Beacon
//! sends on the link (HTTP-01 key authorizations, TLS-ALPN-01 certificates) and the
//! certificates Beacon's CA issued, which the TLS resolver folds into the set it serves beside
//! `certs_dir`'s files (told of each change through [`AcmeAnswers::on_issued_change`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use px_proto::acme::{AcmeChallenges, ChallengeCert};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Where the CA asks for an HTTP-01 answer (RFC 8555 §8.3).
pub(crate) const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";
/// The ALPN protocol of a TLS-ALPN-01 validation (RFC 8737 §6.2).
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The issued certificates by lowercase host name, shared whole with the TLS resolver.
pub(crate) type IssuedCerts = Arc<HashMap<String, Arc<CertifiedKey>>>;
/// What is told of each change of the issued certificates.
type IssuedHook = Box<dyn Fn(&IssuedCerts) + Send + Sync>;

#[derive(Default)]
struct Answers {
    http01: HashMap<String, String>,
    tls_alpn01: HashMap<String, Arc<CertifiedKey>>,
    issued: IssuedCerts,
}

/// The current answers and issued certificates, swapped whole on each change.
pub struct AcmeAnswers {
    provider: Arc<CryptoProvider>,
    answers: RwLock<Arc<Answers>>,
    /// The TLS resolver's hook, once the HTTPS listener serves; called under the write lock
    /// of `answers`, so it sees the changes in the order they were made.
    on_issued: Mutex<Option<IssuedHook>>,
}

impl std::fmt::Debug for AcmeAnswers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeAnswers").finish_non_exhaustive()
    }
}

impl Default for AcmeAnswers {
    fn default() -> Self {
        Self {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            answers: RwLock::default(),
            on_issued: Mutex::new(None),
        }
    }
}

/// Parses a PEM chain and its key into what rustls serves; checks that they match.
pub(crate) fn certified_key(
    chain_pem: &str,
    key_pem: &str,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    let (certs, key) = parse(chain_pem, key_pem)?;
    CertifiedKey::from_der(certs, key, provider)
        .map(Arc::new)
        .map_err(|e| format!("the certificate does not match its key: {e}"))
}

/// A TLS-ALPN-01 challenge certificate: not checked against its key, since the check parses
/// the certificate and refuses its critical acmeIdentifier extension (RFC 8737 §3), which
/// only the CA's validator reads.
fn challenge_key(
    cert_pem: &str,
    key_pem: &str,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    let (certs, key) = parse(cert_pem, key_pem)?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("the key is not usable: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(certs, signing)))
}

fn parse(
    chain_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let certs = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the chain".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("the key is not PEM: {e}"))?;
    Ok((certs, key))
}

impl AcmeAnswers {
    fn read(&self) -> Arc<Answers> {
        self.answers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn swap(&self, change: impl FnOnce(&mut Answers)) {
        let mut guard = self.answers.write().unwrap_or_else(|p| p.into_inner());
        let mut next = Answers {
            http01: guard.http01.clone(),
            tls_alpn01: guard.tls_alpn01.clone(),
            issued: guard.issued.clone(),
        };
        change(&mut next);
        let issued_changed = !Arc::ptr_eq(&next.issued, &guard.issued);
        *guard = Arc::new(next);
        if issued_changed
            && let Some(hook) = self
                .on_issued
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
        {
            hook(&guard.issued);
        }
    }

    /// Calls `hook` with the issued certificates now, then after each change (the TLS
    /// resolver rebuilds the one set a handshake reads).
    pub(crate) fn on_issued_change(&self, hook: IssuedHook) {
        let guard = self.answers.write().unwrap_or_else(|p| p.into_inner());
        hook(&guard.issued);
        *self.on_issued.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Replaces the challenge answers with Beacon's current set. A TLS-ALPN-01 certificate
    /// that does not parse is left out (and logged): its validation fails, the rest answer.
    pub fn set_challenges(&self, set: &AcmeChallenges) {
        let tls_alpn01: HashMap<String, Arc<CertifiedKey>> = set
            .tls_alpn01
            .iter()
            .filter_map(|(domain, ChallengeCert { cert_pem, key_pem })| {
                match challenge_key(cert_pem, key_pem, &self.provider) {
                    Ok(key) => Some((domain.to_ascii_lowercase(), key)),
                    Err(e) => {
                        tracing::warn!(%domain, error = %e, "tls-alpn-01 challenge certificate refused");
                        None
                    }
                }
            })
            .collect();
        let http01 = set
            .http01
            .iter()
            .map(|(t, k)| (t.clone(), k.clone()))
            .collect();
        self.swap(|answers| {
            answers.http01 = http01;
            answers.tls_alpn01 = tls_alpn01;
        });
    }

    /// Serves `chain_pem` for `domain` from the next handshake on.
    pub fn set_issued(&self, domain: &str, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        let key = certified_key(chain_pem, key_pem, &self.provider)?;
        self.swap(|answers| {
            let mut issued = (*answers.issued).clone();
            issued.insert(domain.to_ascii_lowercase(), key);
            answers.issued = Arc::new(issued);
        });
        Ok(())
    }

    /// Stops serving `domain`'s issued certificate from the next handshake on (its app was
    /// deleted or the name removed).
    pub fn remove_issued(&self, domain: &str) {
        let domain = domain.to_ascii_lowercase();
        if !self.read().issued.contains_key(&domain) {
            return;
        }
        self.swap(|answers| {
            let mut issued = (*answers.issued).clone();
            issued.remove(&domain);
            answers.issued = Arc::new(issued);
        });
    }

    /// The key authorization for an HTTP-01 token, if one is pending.
    pub(crate) fn http01(&self, token: &str) -> Option<String> {
        self.read().http01.get(token).cloned()
    }

    /// The TLS-ALPN-01 challenge certificate for `domain`, if one is pending.
    pub(crate) fn tls_alpn01(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        self.read()
            .tls_alpn01
            .get(&domain.trim_end_matches('.').to_ascii_lowercase())
            .cloned()
    }

    /// The issued certificate for `domain`, if the CA issued one (the resolver reads its own
    /// folded set; tests read this).
    #[cfg(test)]
    pub(crate) fn issued(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        self.read()
            .issued
            .get(&domain.trim_end_matches('.').to_ascii_lowercase())
            .cloned()
    }
}
