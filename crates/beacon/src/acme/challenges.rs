//! What every Maestro link gets from ACME, each set published whole (level-triggered: a
//! Maestro that connects late, or lost a frame, gets the current sets): the challenges the
//! cluster answers now, and the certificates issued.

use std::sync::Arc;

use px_proto::acme::{AcmeCertVersions, AcmeChallenges, ChallengeCert};
use tokio::sync::watch;

/// The current sets; orders add their challenge and take it away when the CA has checked it,
/// and the ACME task names every certificate it holds.
#[derive(Clone)]
pub(crate) struct Challenges {
    tx: Arc<watch::Sender<Arc<AcmeChallenges>>>,
    certs: Arc<watch::Sender<Arc<AcmeCertVersions>>>,
}

impl Default for Challenges {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(Arc::new(AcmeChallenges::default()))),
            certs: Arc::new(watch::Sender::new(Arc::new(AcmeCertVersions::default()))),
        }
    }
}

/// What one order published; dropping it takes the challenge away again, so an order that
/// fails or is cancelled leaves nothing behind.
pub(crate) struct Published {
    challenges: Challenges,
    http01_token: Option<String>,
    tls_alpn01_domain: Option<String>,
}

impl Drop for Published {
    fn drop(&mut self) {
        let token = self.http01_token.take();
        let domain = self.tls_alpn01_domain.take();
        self.challenges.modify(|set| {
            if let Some(token) = &token {
                set.http01.remove(token);
            }
            if let Some(domain) = &domain {
                set.tls_alpn01.remove(domain);
            }
        });
    }
}

impl Challenges {
    /// A receiver for one link: it sees the current set first, then every change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<AcmeChallenges>> {
        self.tx.subscribe()
    }

    /// A receiver of the issued certificates for one link.
    pub(crate) fn subscribe_certs(&self) -> watch::Receiver<Arc<AcmeCertVersions>> {
        self.certs.subscribe()
    }

    /// Names the certificates held now; links hear of it only when the set changed.
    pub(crate) fn set_certs(&self, versions: AcmeCertVersions) {
        self.certs.send_if_modified(|current| {
            if **current == versions {
                return false;
            }
            *current = Arc::new(versions);
            true
        });
    }

    /// The set now (tests).
    #[cfg(test)]
    pub(crate) fn current(&self) -> Arc<AcmeChallenges> {
        self.tx.borrow().clone()
    }

    fn modify(&self, change: impl FnOnce(&mut AcmeChallenges)) {
        self.tx.send_modify(|set| change(Arc::make_mut(set)));
    }

    /// Publishes an HTTP-01 answer until the returned guard is dropped.
    pub(crate) fn http01(&self, token: &str, key_authorization: &str) -> Published {
        self.modify(|set| {
            set.http01
                .insert(token.to_string(), key_authorization.to_string());
        });
        Published {
            challenges: self.clone(),
            http01_token: Some(token.to_string()),
            tls_alpn01_domain: None,
        }
    }

    /// Publishes a TLS-ALPN-01 certificate for `domain` until the returned guard is dropped.
    pub(crate) fn tls_alpn01(&self, domain: &str, cert: ChallengeCert) -> Published {
        self.modify(|set| {
            set.tls_alpn01.insert(domain.to_string(), cert);
        });
        Published {
            challenges: self.clone(),
            http01_token: None,
            tls_alpn01_domain: Some(domain.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_challenge_is_seen_by_links_and_gone_once_its_order_ends() {
        let challenges = Challenges::default();
        let mut link = challenges.subscribe();
        let published = challenges.http01("tok", "tok.thumb");
        assert!(link.has_changed().unwrap());
        assert_eq!(
            link.borrow_and_update()
                .http01
                .get("tok")
                .map(String::as_str),
            Some("tok.thumb")
        );
        drop(published);
        assert!(link.has_changed().unwrap());
        assert!(challenges.current().http01.is_empty());
    }
}
