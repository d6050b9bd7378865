//! Where Beacon keeps its ACME state: apprepo's `/v1/acme` routes (the account, one record per
//! host name), so every Beacon shares one account and a restarted one orders nothing stored.

use px_proto::acme::{AcmeAccount, AcmeCert};

use crate::reconcile::RepositoryClient;

/// Reads and writes the ACME records through apprepo with Beacon's `beacon` token.
#[derive(Clone)]
pub(crate) struct Store(pub(crate) RepositoryClient);

impl Store {
    pub(crate) async fn account(&self) -> Result<Option<AcmeAccount>, String> {
        self.0.get("/v1/acme/account").await
    }

    /// Stores `account` unless one is stored; `false` when another Beacon's came first.
    pub(crate) async fn create_account(&self, account: &AcmeAccount) -> Result<bool, String> {
        let status = self.0.put("/v1/acme/account", account).await?;
        Ok(status != reqwest::StatusCode::CONFLICT)
    }

    pub(crate) async fn cert(&self, domain: &str) -> Result<Option<AcmeCert>, String> {
        self.0.get(&format!("/v1/acme/certs/{domain}")).await
    }

    pub(crate) async fn put_cert(&self, cert: &AcmeCert) -> Result<(), String> {
        self.0
            .put(&format!("/v1/acme/certs/{}", cert.domain), cert)
            .await
            .map(|_| ())
    }
}
