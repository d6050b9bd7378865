//! Who may talk to Beacon: bearer tokens with a role, for the HTTP API and the links.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use px_runtime::tokens::TokenTable;
use serde::{Deserialize, Serialize};

use crate::http::{ApiError, AppState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read nodes, apps, events (`em status`, `em logs`, dashboards).
    Read,
    /// What `em` holds: reads too.
    Deploy,
    /// A web server's Maestro: opens a control link, reads app configs.
    Maestro,
    /// An apprepo: opens a link to announce releases.
    Repository,
}

impl Role {
    /// Whether this role may read the HTTP API.
    pub(crate) fn may_read(self) -> bool {
        matches!(self, Role::Read | Role::Deploy | Role::Maestro)
    }
}

pub(crate) type Tokens = Arc<TokenTable<Role>>;

/// The verified caller of an HTTP request, allowed to read.
#[derive(Debug, Clone)]
pub(crate) struct Reader {
    pub(crate) name: String,
}

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::Unauthorized("send `Authorization: Bearer <token>`".into()))?;
        Reader::verify(state, token)
    }
}

impl Reader {
    /// The caller `token` names, if it may read: the check behind the header and the status
    /// page's cookie alike.
    pub(crate) fn verify(state: &AppState, token: &str) -> Result<Self, ApiError> {
        let entry = state.tokens.verify(token.trim()).ok_or_else(|| {
            ApiError::Unauthorized("unknown token; check `em login` or the token file".into())
        })?;
        if !entry.role.may_read() {
            return Err(ApiError::Forbidden(format!(
                "token {:?} may not read the API",
                entry.name
            )));
        }
        Ok(Reader {
            name: entry.name.clone(),
        })
    }
}
