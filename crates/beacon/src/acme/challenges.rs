//! What every Maestro link gets from ACME, each set published whole (level-triggered: a
//! Maestro that connects late, or lost a frame, gets the current sets): the challenges the
//! cluster answers now, and the certificates issued. Each set is encoded as a frame once, for
//! every link ([`Shared`]).

use std::sync::Arc;

use px_proto::acme::{AcmeCertVersions, AcmeChallenges, ChallengeCert};
use px_proto::link::FromBeacon;
use tokio::sync::watch;

use crate::frames::Shared;

/// The challenge set as links send it.
pub(crate) type SharedChallenges = Arc<Shared<AcmeChallenges>>;
/// The certificate set as links send it; `None` until the ACME task has named every
/// certificate of the routed names once, so that a link never tells a Maestro to drop a
/// certificate Beacon has not read yet.
pub(crate) type SharedCerts = Option<Arc<Shared<AcmeCertVersions>>>;

/// The current sets; orders add their challenge and take it away when the CA has checked it,
/// and the ACME task names every certificate it holds.
#[derive(Clone)]
pub(crate) struct Challenges {
    tx: Arc<watch::Sender<SharedChallenges>>,
    certs: Arc<watch::Sender<SharedCerts>>,
}

impl Default for Challenges {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(Arc::new(Shared::new(
                AcmeChallenges::default(),
                FromBeacon::AcmeChallenges,
            )))),
            certs: Arc::new(watch::Sender::new(None)),
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
    pub(crate) fn subscribe(&self) -> watch::Receiver<SharedChallenges> {
        self.tx.subscribe()
    }

    /// A receiver of the issued certificates for one link.
    pub(crate) fn subscribe_certs(&self) -> watch::Receiver<SharedCerts> {
        self.certs.subscribe()
    }

    /// Names the certificates held now; links hear of it only when the set changed.
    pub(crate) fn set_certs(&self, versions: AcmeCertVersions) {
        self.certs.send_if_modified(|current| {
            if current.as_ref().is_some_and(|c| c.value == versions) {
                return false;
            }
            *current = Some(Arc::new(Shared::new(
                versions,
                FromBeacon::AcmeCertificates,
            )));
            true
        });
    }

    /// The set now (tests).
    #[cfg(test)]
    pub(crate) fn current(&self) -> AcmeChallenges {
        self.tx.borrow().value.clone()
    }

    fn modify(&self, change: impl FnOnce(&mut AcmeChallenges)) {
        self.tx.send_modify(|set| {
            let mut next = set.value.clone();
            change(&mut next);
            *set = Arc::new(Shared::new(next, FromBeacon::AcmeChallenges));
        });
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
                .value
                .http01
                .get("tok")
                .map(String::as_str),
            Some("tok.thumb")
        );
        drop(published);
        assert!(link.has_changed().unwrap());
        assert!(challenges.current().http01.is_empty());
    }

    #[test]
    fn no_certificate_set_reaches_a_link_before_the_first_announcement_and_then_only_changes() {
        let challenges = Challenges::default();
        let mut link = challenges.subscribe_certs();
        assert!(link.borrow_and_update().is_none());
        challenges.set_certs(AcmeCertVersions::default());
        assert!(
            link.has_changed().unwrap(),
            "an empty set, once announced, is sent"
        );
        let first = link.borrow_and_update().clone().unwrap();
        challenges.set_certs(AcmeCertVersions::default());
        assert!(
            !link.has_changed().unwrap(),
            "the same set is not sent again"
        );
        assert!(first.frame().is_ok());
    }
}
