//! The ACME routes (docs/src/reference/apprepo.md, "ACME"): Beacon reads and writes its
//! account and the certificates; web servers read a certificate with its key; any reader lists
//! the certificates without keys.

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use px_proto::acme::{AcmeAccount, AcmeCert, AcmeCertSummary};

use super::AppState;
use crate::auth::{Caller, Role};
use crate::error::ApiError;

type JsonBody<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

fn body<T>(body: JsonBody<T>, what: &str) -> Result<T, ApiError> {
    body.map(|Json(b)| b)
        .map_err(|e| ApiError::BadRequest(format!("expected {what} as JSON: {e}")))
}

/// `GET /v1/acme/account`: the account with its private key; Beacon only.
pub async fn get_account(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<AcmeAccount>, ApiError> {
    caller.require(Role::Beacon)?;
    state
        .releases
        .acme_account()
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound("no ACME account is stored yet".into()))
}

/// `PUT /v1/acme/account`: stores the account once (201); 409 when one is stored already.
pub async fn put_account(
    caller: Caller,
    State(state): State<AppState>,
    account: JsonBody<AcmeAccount>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Beacon)?;
    let account = body(account, "an ACME account")?;
    state.releases.create_acme_account(&account).await?;
    tracing::info!(by = %caller.name, directory = %account.directory_url, "acme account stored");
    Ok(StatusCode::CREATED)
}

/// `GET /v1/acme/certs`: every certificate without its key, for any reader; a token limited
/// to some apps sees the certificates of its apps' names alone (their current release's and
/// the added ones).
pub async fn list_certs(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Vec<AcmeCertSummary>>, ApiError> {
    caller.require(Role::Read)?;
    let certs = state.releases.acme_certs().await?;
    let visible = match &caller.apps {
        None => None,
        Some(apps) => {
            let mut names = BTreeSet::new();
            for app in apps {
                match state.releases.domains(app).await {
                    Ok(domains) => names.extend(
                        domains
                            .domains
                            .into_iter()
                            .map(|entry| entry.domain.to_ascii_lowercase()),
                    ),
                    // An app named in the token but not created (or deleted) has no names.
                    Err(ApiError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Some(names)
        }
    };
    Ok(Json(
        certs
            .iter()
            .filter(|cert| {
                visible
                    .as_ref()
                    .is_none_or(|names| names.contains(&cert.domain.to_ascii_lowercase()))
            })
            .map(AcmeCert::summary)
            .collect(),
    ))
}

/// `GET /v1/acme/certs/{domain}`: one certificate with its key, for Beacon and the web
/// servers (a `release` or `build` token: what a Maestro holds).
pub async fn get_cert(
    caller: Caller,
    State(state): State<AppState>,
    Path(domain): Path<String>,
) -> Result<Json<AcmeCert>, ApiError> {
    if !caller.role.reads_certificate_keys() {
        return Err(ApiError::Forbidden(format!(
            "token {:?} has role {}; a certificate's key needs a beacon, release or build token",
            caller.name,
            caller.role.as_str()
        )));
    }
    state
        .releases
        .acme_cert(&domain)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no certificate for {domain:?}")))
}

/// `PUT /v1/acme/certs/{domain}`: creates or replaces one certificate's record; Beacon only.
pub async fn put_cert(
    caller: Caller,
    State(state): State<AppState>,
    Path(domain): Path<String>,
    cert: JsonBody<AcmeCert>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Beacon)?;
    let cert = body(cert, "a certificate record")?;
    if cert.domain != domain {
        return Err(ApiError::BadRequest(format!(
            "the record names {:?}, the path {domain:?}; they must be the same",
            cert.domain
        )));
    }
    state.releases.put_acme_cert(&cert).await?;
    tracing::info!(%domain, state = cert.state.as_str(), "acme certificate record written");
    Ok(StatusCode::OK)
}
