//! One ACME order for one host name: answer its challenge on every web server, let the CA
//! check it, finalize with a fresh key, and read what was issued.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    OrderStatus, RetryPolicy,
};
use px_proto::acme::ChallengeCert;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::challenges::{Challenges, Published};
use crate::config::ChallengeKind;

/// How long the CA gets to check the challenges and the order to become ready; Let's
/// Encrypt's validations take seconds, so a longer wait means the check is stuck.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the CA gets to issue once the order is finalized.
const ISSUANCE_TIMEOUT: Duration = Duration::from_secs(60);
/// First wait between polls of the order; doubled up to the timeouts above.
const POLL_DELAY: Duration = Duration::from_millis(250);

/// A certificate the CA issued, as read from its chain.
pub(crate) struct Issued {
    pub(crate) chain_pem: String,
    pub(crate) key_pem: String,
    pub(crate) issuer: String,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    pub(crate) serial: String,
}

/// What an order needs besides the account.
pub(crate) struct OrderSpec<'a> {
    pub(crate) domain: &'a str,
    pub(crate) challenge: ChallengeKind,
    pub(crate) profile: Option<&'a str>,
    /// The certificate this one replaces (ACME Renewal Information), when the CA offers ARI.
    pub(crate) replaces: Option<CertificateIdentifier<'static>>,
    /// How long Maestros get to take up a published challenge before the CA is told to check.
    pub(crate) publish_delay: Duration,
}

/// Why an order failed, in words a sysadmin can act on: the CA's own reason when it gave one.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OrderError {
    /// The CA refused or could not validate; its problem document, as it gave it.
    #[error("the CA refused: {0}")]
    Ca(String),
    /// The CA lacks something the order asked for (renewal information for `replaces`).
    #[error("the CA does not support {0}")]
    Unsupported(&'static str),
    /// Anything else: the CA unreachable, a timeout, a malformed answer.
    #[error("{0}")]
    Other(String),
}

impl OrderError {
    fn from_acme(context: &str, e: instant_acme::Error) -> Self {
        match e {
            instant_acme::Error::Api(problem) => OrderError::Ca(format!("{context}: {problem}")),
            instant_acme::Error::Unsupported(what) => OrderError::Unsupported(what),
            other => OrderError::Other(format!("{context}: {other}")),
        }
    }
}

/// Orders one certificate for `spec.domain` and waits until it is issued or failed.
pub(crate) async fn order(
    account: &Account,
    challenges: &Challenges,
    spec: OrderSpec<'_>,
) -> Result<Issued, OrderError> {
    let identifiers = [Identifier::Dns(spec.domain.to_string())];
    let mut new = NewOrder::new(&identifiers);
    if let Some(profile) = spec.profile {
        new = new.profile(profile);
    }
    if let Some(replaces) = spec.replaces.clone() {
        new = new.replaces(replaces);
    }
    let mut order = account
        .new_order(&new)
        .await
        .map_err(|e| OrderError::from_acme("new order", e))?;
    // Every challenge this order published; dropped (unpublished) when the order ends.
    let mut published: Vec<Published> = Vec::new();
    let kind = match spec.challenge {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(|e| OrderError::from_acme("authorization", e))?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(OrderError::Ca(format!(
                    "the authorization for {} is {other:?}",
                    spec.domain
                )));
            }
        }
        let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
            OrderError::Ca(format!(
                "the CA offers no {kind:?} challenge for {}",
                spec.domain
            ))
        })?;
        let key_authorization = challenge.key_authorization();
        published.push(match spec.challenge {
            ChallengeKind::Http01 => {
                challenges.http01(&challenge.token, key_authorization.as_str())
            }
            ChallengeKind::TlsAlpn01 => challenges.tls_alpn01(
                spec.domain,
                tls_alpn01_certificate(spec.domain, key_authorization.digest().as_ref())?,
            ),
        });
        // Every Maestro gets the new set on its link at once; this gives their frames time to
        // arrive before the CA's first request does.
        tokio::time::sleep(spec.publish_delay).await;
        challenge
            .set_ready()
            .await
            .map_err(|e| OrderError::from_acme("challenge ready", e))?;
    }
    let retries = RetryPolicy::new()
        .initial_delay(POLL_DELAY)
        .timeout(VALIDATION_TIMEOUT);
    let status = order
        .poll_ready(&retries)
        .await
        .map_err(|e| OrderError::from_acme("waiting for validation", e))?;
    if status != OrderStatus::Ready {
        return Err(OrderError::Ca(
            validation_failure(&mut order, spec.domain).await,
        ));
    }
    drop(published);
    let key = rcgen::KeyPair::generate().map_err(|e| OrderError::Other(format!("key: {e}")))?;
    let mut params = rcgen::CertificateParams::new(vec![spec.domain.to_string()])
        .map_err(|e| OrderError::Other(format!("csr: {e}")))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| OrderError::Other(format!("csr: {e}")))?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(|e| OrderError::from_acme("finalize", e))?;
    let retries = RetryPolicy::new()
        .initial_delay(POLL_DELAY)
        .timeout(ISSUANCE_TIMEOUT);
    let chain_pem = order
        .poll_certificate(&retries)
        .await
        .map_err(|e| OrderError::from_acme("certificate", e))?;
    read_issued(chain_pem, key.serialize_pem()).map_err(OrderError::Other)
}

/// The CA's reason an order did not become ready: the first failed challenge's problem.
async fn validation_failure(order: &mut instant_acme::Order, domain: &str) -> String {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if let Ok(state) = authz.refresh().await
            && let Some(problem) = state.challenges.iter().find_map(|c| c.error.as_ref())
        {
            return problem.to_string();
        }
    }
    format!("the order for {domain} became invalid and the CA gave no reason")
}

/// The RFC 8737 challenge certificate: self-signed for `domain`, carrying the SHA-256 of the
/// key authorization in the critical acmeIdentifier extension.
pub(crate) fn tls_alpn01_certificate(
    domain: &str,
    digest: &[u8],
) -> Result<ChallengeCert, OrderError> {
    let fail = |e: rcgen::Error| OrderError::Other(format!("tls-alpn-01 certificate: {e}"));
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(fail)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(fail)?;
    Ok(ChallengeCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Reads the leaf of an issued chain: its issuer, validity and serial.
pub(crate) fn read_issued(chain_pem: String, key_pem: String) -> Result<Issued, String> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or("the CA's chain holds no certificate")?
        .map_err(|e| format!("the CA's chain is not PEM: {e}"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("the CA's certificate does not parse: {e}"))?;
    let time = |t: &x509_parser::time::ASN1Time| {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let validity = parsed.validity();
    Ok(Issued {
        issuer: parsed.issuer().to_string(),
        not_before: time(&validity.not_before),
        not_after: time(&validity.not_after),
        serial: parsed.raw_serial_as_string(),
        chain_pem,
        key_pem,
    })
}

/// The ARI identifier of a stored chain's leaf, for `renewal_info` and `replaces`.
pub(crate) fn certificate_id(chain_pem: &str) -> Option<CertificateIdentifier<'static>> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()?
        .ok()?;
    CertificateIdentifier::try_from(&leaf)
        .ok()
        .map(|id| id.into_owned())
}
