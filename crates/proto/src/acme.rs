//! Certificates from ACME (docs/src/design/storage.md, "ACME"): the records Beacon keeps in
//! apprepo's storage (the account, one certificate per host name) and the list any reader
//! sees, without keys.

use serde::{Deserialize, Serialize};

/// Largest stored ACME record (account or certificate) apprepo accepts: a chain of a few
/// certificates and a key are a few KiB; the bound keeps a hostile writer from storing much.
pub const MAX_ACME_RECORD_BYTES: usize = 64 * 1024;
/// Longest last error kept with a certificate: the CA's reason, cut to a readable length.
pub const MAX_ACME_ERROR_LEN: usize = 1024;

/// `acme/account.json`: the ACME account Beacon orders with, shared by every Beacon so that a
/// restarted one (or a second one) uses the same account and its rate limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcmeAccount {
    /// The directory the account was created at; an account is valid only there.
    pub directory_url: String,
    /// The account's credentials as the ACME client serializes them (its id and private key).
    pub credentials: serde_json::Value,
}

/// Where a host name's certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    /// An order is under way (or about to be retried); no certificate was issued yet.
    Pending,
    /// `chain_pem` and `key_pem` hold a certificate the CA issued.
    Issued,
    /// The last order failed (`last_error` says why); a certificate issued before, if any, is
    /// still kept and served until it expires.
    Failed,
}

impl CertState {
    /// The word for it in lists.
    pub fn as_str(self) -> &'static str {
        match self {
            CertState::Pending => "pending",
            CertState::Issued => "issued",
            CertState::Failed => "failed",
        }
    }
}

/// `acme/certs/<domain>.json`: one host name's certificate and its private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeCert {
    /// The host name (lowercase), also the key's name.
    pub domain: String,
    pub state: CertState,
    /// The certificate chain (PEM, leaf first); empty until one was issued.
    #[serde(default)]
    pub chain_pem: String,
    /// Its private key (PEM, PKCS#8); empty until one was issued.
    #[serde(default)]
    pub key_pem: String,
    /// The issuer's name, as the certificate gives it.
    #[serde(default)]
    pub issuer: String,
    /// Validity (RFC 3339, seconds); empty until one was issued.
    #[serde(default)]
    pub not_before: String,
    #[serde(default)]
    pub not_after: String,
    /// When Beacon renews it (RFC 3339): from the CA's renewal information where it offers
    /// it, else two thirds into the lifetime.
    #[serde(default)]
    pub renew_at: String,
    /// The last failure, with the CA's own reason; empty after a success.
    #[serde(default)]
    pub last_error: String,
    /// Changes with every issued certificate: what Maestros compare to fetch a new one.
    #[serde(default)]
    pub serial: String,
}

impl AcmeCert {
    /// The record without its key, as `GET /v1/acme/certs` lists it.
    pub fn summary(&self) -> AcmeCertSummary {
        AcmeCertSummary {
            domain: self.domain.clone(),
            state: self.state,
            issuer: self.issuer.clone(),
            not_after: self.not_after.clone(),
            last_error: self.last_error.clone(),
        }
    }
}

/// One entry of `GET /v1/acme/certs`: what any reader (`em domains list`) may see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeCertSummary {
    pub domain: String,
    pub state: CertState,
    pub issuer: String,
    pub not_after: String,
    pub last_error: String,
}

/// The ACME challenges the cluster answers now, sent whole by Beacon to every Maestro on its
/// link ([`crate::link::FromBeacon::AcmeChallenges`]) whenever the set changes: each web server
/// answers every one, so the CA's check succeeds whichever server it reaches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeChallenges {
    /// HTTP-01: token → key authorization, served at
    /// `/.well-known/acme-challenge/<token>` on the proxy's HTTP listener for any host.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub http01: std::collections::BTreeMap<String, String>,
    /// TLS-ALPN-01: host name → the challenge certificate (RFC 8737), served to a TLS client
    /// that offers only `acme-tls/1` for that name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tls_alpn01: std::collections::BTreeMap<String, ChallengeCert>,
}

/// A TLS-ALPN-01 challenge certificate and its key (PEM): a throwaway, self-signed
/// certificate whose only worth is the key authorization digest it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Most challenges of each kind in one [`AcmeChallenges`]: Beacon keeps far fewer orders in
/// flight; a Maestro refuses a link frame with more.
pub const MAX_ACME_CHALLENGES: usize = 256;

/// The certificates ACME issued for the cluster, by host name, sent whole by Beacon to every
/// Maestro on its link ([`crate::link::FromBeacon::AcmeCertificates`]) whenever one is issued
/// or renewed. A Maestro fetches each one whose serial it does not hold from apprepo.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeCertVersions {
    pub certs: std::collections::BTreeMap<String, CertVersion>,
}

/// One issued certificate: which one, and where its record (with the key) is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertVersion {
    /// The certificate's serial (hex): a new one means a new certificate.
    pub serial: String,
    /// apprepo's `/v1/acme/certs/<domain>`, read with the node's repository token.
    pub url: String,
}

/// Most certificates in one [`AcmeCertVersions`]: as many as apprepo lists.
pub const MAX_ANNOUNCED_CERTS: usize = 10_000;
