//! Who may call the API: bearer tokens with a role, checked by an axum extractor.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use px_runtime::tokens::{TokenEntry, TokenTable};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::http::AppState;

/// What a token may do. `Deploy` includes everything `Read` may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read apps, releases, config and bundles: what Maestros and Beacon need.
    Read,
    /// Also create apps, upload bundles, change config and roll back.
    Deploy,
}

/// The verified caller of a request.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) name: String,
    pub(crate) role: Role,
}

impl Caller {
    /// Refuses the request unless the caller's role includes `needed`.
    pub(crate) fn require(&self, needed: Role) -> Result<(), ApiError> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "token {:?} has role {:?}; this needs a {:?} token",
                self.name, self.role, needed
            )))
        }
    }
}

pub(crate) type Tokens = Arc<TokenTable<Role>>;

pub(crate) fn table(entries: Vec<TokenEntry<Role>>) -> Result<Tokens, String> {
    TokenTable::new(entries).map(Arc::new)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthorized("send `Authorization: Bearer <token>`".into()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into())
            })?;
        let entry = state.tokens.verify(token.trim()).ok_or_else(|| {
            state.metrics.auth_failures.inc();
            ApiError::Unauthorized("unknown token; check `em login` or the token file".into())
        })?;
        Ok(Caller {
            name: entry.name.clone(),
            role: entry.role,
        })
    }
}
