//! ACME state in the repository's storage (docs/src/design/storage.md, "ACME"): Beacon's
//! account (`acme/account.json`) and one record per host name (`acme/certs/<domain>.json`),
//! so every web server serves the same certificate and a restarted Beacon orders nothing the
//! storage already holds.

use bytes::Bytes;
use px_proto::acme::{AcmeAccount, AcmeCert, MAX_ACME_ERROR_LEN};

use crate::error::ApiError;
use crate::releases::Releases;
use crate::storage::StorageError;

/// Where the account lives.
pub const ACCOUNT_KEY: &str = "acme/account.json";
/// Where the certificate records live, one `<domain>.json` each.
pub const CERTS_PREFIX: &str = "acme/certs/";
/// Most certificate records listed: far more host names than one cluster serves, and a bound
/// on what one list request reads from storage.
pub const MAX_LISTED_CERTS: usize = 10_000;
/// Attempts at replacing a certificate record before giving up; each failure means another
/// write of the same record came in between, which only a second Beacon makes.
const MAX_WRITE_ATTEMPTS: usize = 8;

fn cert_key(domain: &str) -> String {
    format!("{CERTS_PREFIX}{domain}.json")
}

/// Refuses a host name that is no valid lowercase DNS name (so it cannot name another key).
pub(crate) fn check_domain(domain: &str) -> Result<(), ApiError> {
    px_proto::names::check_domain(domain).map_err(|m| ApiError::BadRequest(format!("domain: {m}")))
}

fn corrupt(key: &str, e: serde_json::Error) -> ApiError {
    ApiError::Internal(format!("{key} is not valid JSON: {e}"))
}

impl Releases {
    /// The stored account, if one was created.
    pub(crate) async fn acme_account(&self) -> Result<Option<AcmeAccount>, ApiError> {
        match self.count_storage_error(self.storage().read(ACCOUNT_KEY).await)? {
            None => Ok(None),
            Some(stored) => serde_json::from_slice(&stored.bytes)
                .map(Some)
                .map_err(|e| corrupt(ACCOUNT_KEY, e)),
        }
    }

    /// Stores the account only if none is stored: of two Beacons that both created one, the
    /// second is refused and uses the first one's.
    pub(crate) async fn create_acme_account(&self, account: &AcmeAccount) -> Result<(), ApiError> {
        let bytes =
            serde_json::to_vec_pretty(account).map_err(|e| ApiError::Internal(e.to_string()))?;
        match self.count_storage_error(self.storage().create(ACCOUNT_KEY, bytes.into()).await) {
            Ok(()) => Ok(()),
            Err(StorageError::AlreadyExists(_)) => Err(ApiError::Conflict(
                "an ACME account is stored already; read it with GET /v1/acme/account".into(),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// One host name's record, with its key.
    pub(crate) async fn acme_cert(&self, domain: &str) -> Result<Option<AcmeCert>, ApiError> {
        check_domain(domain)?;
        let key = cert_key(domain);
        match self.count_storage_error(self.storage().read(&key).await)? {
            None => Ok(None),
            Some(stored) => serde_json::from_slice(&stored.bytes)
                .map(Some)
                .map_err(|e| corrupt(&key, e)),
        }
    }

    /// Writes one host name's record, creating or replacing it.
    pub(crate) async fn put_acme_cert(&self, cert: &AcmeCert) -> Result<(), ApiError> {
        check_domain(&cert.domain)?;
        if cert.last_error.len() > MAX_ACME_ERROR_LEN {
            return Err(ApiError::BadRequest(format!(
                "last_error is {} bytes, more than the limit of {MAX_ACME_ERROR_LEN}; cut it",
                cert.last_error.len()
            )));
        }
        let key = cert_key(&cert.domain);
        let bytes: Bytes = serde_json::to_vec_pretty(cert)
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .into();
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let written = match self.count_storage_error(self.storage().read(&key).await)? {
                None => self.storage().create(&key, bytes.clone()).await,
                Some(stored) => {
                    self.storage()
                        .replace(&key, bytes.clone(), &stored.version)
                        .await
                }
            };
            match self.count_storage_error(written) {
                Ok(()) => return Ok(()),
                Err(StorageError::AlreadyExists(_) | StorageError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Conflict(format!(
            "{key} changed {MAX_WRITE_ATTEMPTS} times while being written; retry"
        )))
    }

    /// Every host name's record, sorted by name (at most [`MAX_LISTED_CERTS`]).
    pub(crate) async fn acme_certs(&self) -> Result<Vec<AcmeCert>, ApiError> {
        let names = self.count_storage_error(self.storage().list(CERTS_PREFIX).await)?;
        let mut certs = Vec::new();
        for name in names.iter().take(MAX_LISTED_CERTS) {
            // Anything else a tool left under the prefix is not a record.
            let Some(domain) = name.strip_suffix(".json") else {
                continue;
            };
            if px_proto::names::check_domain(domain).is_err() {
                continue;
            }
            // A record deleted between the list and the read is simply left out.
            if let Some(cert) = self.acme_cert(domain).await? {
                certs.push(cert);
            }
        }
        Ok(certs)
    }
}
