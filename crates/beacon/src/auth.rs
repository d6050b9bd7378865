//! Who may talk to Beacon: bearer tokens with a role, for the HTTP API and the links.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use px_proto::api::{MAX_MINTED_TOKENS, MintedRole, TokenGrant};
use px_proto::link::MAX_PEER_NAME_LEN;
use px_runtime::tokens::{TokenEntry, TokenTable};
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
    /// The role as a tokens file spells it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Deploy => "deploy",
            Role::Maestro => "maestro",
            Role::Repository => "repository",
        }
    }

    /// Whether this role may read the HTTP API.
    pub(crate) fn may_read(self) -> bool {
        matches!(self, Role::Read | Role::Deploy | Role::Maestro)
    }
}

pub(crate) type Tokens = Arc<TokenTable<Role>>;

/// The problems with the tokens' `node` bindings: a `maestro` token must name the one node it
/// may link as, so that a token taken from one host cannot speak for another; other roles
/// name none.
pub(crate) fn check_nodes(entries: &[TokenEntry<Role>]) -> Vec<String> {
    let mut problems = Vec::new();
    for entry in entries {
        match (&entry.node, entry.role) {
            (None, Role::Maestro) => problems.push(format!(
                "token {:?}: a maestro token must name its node: add `node = \"<the node's name>\"` \
                 (its Maestro's `node_name`) to the entry",
                entry.name
            )),
            (Some(node), Role::Maestro) if !valid_node_name(node) => problems.push(format!(
                "token {:?}: node {node:?} is not a valid node name (1 to {MAX_PEER_NAME_LEN} \
                 characters, no spaces or control characters)",
                entry.name
            )),
            (Some(_), role) if role != Role::Maestro => problems.push(format!(
                "token {:?}: only maestro tokens name a node; remove `node` from this {} token",
                entry.name,
                role.as_str()
            )),
            _ => {}
        }
    }
    problems
}

/// Whether `name` may name a node or repository on a link: what a `Hello` is held to.
pub(crate) fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PEER_NAME_LEN
        && !name.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// The verified caller of an HTTP request, allowed to read.
#[derive(Debug, Clone)]
pub(crate) struct Reader {
    pub(crate) name: String,
    pub(crate) role: Role,
    /// The apps the token is limited to; `None` for every app.
    pub(crate) apps: Option<Vec<String>>,
    /// The token's stored hash, which ties a `maestro` token to the nodes it linked.
    pub(crate) sha256: String,
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
            role: entry.role,
            apps: entry.apps.clone(),
            sha256: entry.sha256.clone(),
        })
    }

    /// Whether the caller's token may see and act on `app` (lists keep only these).
    pub(crate) fn sees(&self, app: &str) -> bool {
        self.apps
            .as_ref()
            .is_none_or(|apps| apps.iter().any(|a| a == app))
    }

    /// Whether the caller sees an event: one of its apps, or for a token of every app, any.
    /// A limited token sees no cluster-wide event (a node lost, an alert of no app).
    pub(crate) fn sees_event(&self, event: &px_proto::beacon::Event) -> bool {
        match &event.app {
            Some(app) => self.sees(app),
            None => self.apps.is_none(),
        }
    }

    /// Refuses an app outside the token's list: the check of every route that names an app.
    pub(crate) fn require_app(&self, app: &str) -> Result<(), ApiError> {
        if self.sees(app) {
            Ok(())
        } else {
            Err(not_its_app(&self.name, self.apps.as_deref(), app))
        }
    }

    /// Refuses a caller that may not change state: only `deploy` tokens restart, run or
    /// otherwise act on an app.
    pub(crate) fn require_deploy(&self, app: &str) -> Result<(), ApiError> {
        if self.role != Role::Deploy {
            return Err(ApiError::Forbidden(format!(
                "token {:?} may only read; this needs a deploy token",
                self.name
            )));
        }
        self.require_app(app)
    }

    /// Refuses a token limited to some apps where every app would show (the status page,
    /// `/metrics`, the nodes and repositories of the cluster as a whole).
    pub(crate) fn require_every_app(&self, what: &str) -> Result<(), ApiError> {
        match &self.apps {
            None => Ok(()),
            Some(apps) => Err(ApiError::Forbidden(format!(
                "token {:?} is limited to its apps ({}); {what} shows every app",
                self.name,
                apps.join(", ")
            ))),
        }
    }
}

/// The refusal of an app outside a token's list, naming the token and the list.
pub(crate) fn not_its_app(token: &str, apps: Option<&[String]>, app: &str) -> ApiError {
    ApiError::Forbidden(format!(
        "token {token:?} is limited to its apps ({}); it may not act on app {app:?}",
        apps.unwrap_or_default().join(", ")
    ))
}

/// Accepts the minted tokens a repository sent (`ToBeacon::Tokens`) in place of those it sent
/// before: each until its expiry, with its role and apps. Returns how many; a list over
/// [`MAX_MINTED_TOKENS`] or with a malformed hash is refused whole.
pub(crate) fn accept_grants(tokens: &Tokens, grants: &[TokenGrant]) -> Result<usize, String> {
    if grants.len() > MAX_MINTED_TOKENS {
        return Err(format!(
            "{} minted tokens; at most {MAX_MINTED_TOKENS} are accepted",
            grants.len()
        ));
    }
    let entries = grants
        .iter()
        .map(|grant| {
            let role = match grant.info.role {
                MintedRole::Read => Role::Read,
                MintedRole::Deploy => Role::Deploy,
            };
            let entry = TokenEntry {
                name: grant.info.name.clone(),
                role,
                sha256: grant.sha256.clone(),
                node: None,
                apps: Some(grant.info.apps.clone()),
            };
            let expires = UNIX_EPOCH + Duration::from_secs(grant.info.expires_at);
            (entry, Some(expires))
        })
        .collect();
    tokens.replace_minted(entries)?;
    Ok(grants.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, role: Role, node: Option<&str>) -> TokenEntry<Role> {
        TokenEntry {
            name: name.into(),
            role,
            sha256: px_runtime::tokens::hash(name),
            node: node.map(str::to_string),
            apps: None,
        }
    }

    #[test]
    fn a_maestro_token_without_its_node_is_refused_saying_how_to_fix_it() {
        let problems = check_nodes(&[
            entry("web-1", Role::Maestro, Some("web-1")),
            entry("old", Role::Maestro, None),
            entry("spaced", Role::Maestro, Some("web 2")),
            entry("em", Role::Deploy, Some("web-1")),
            entry("apprepo", Role::Repository, None),
        ]);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].contains("\"old\"") && problems[0].contains("node = "),
            "{problems:?}"
        );
        assert!(problems[1].contains("\"web 2\""), "{problems:?}");
        assert!(
            problems[2].contains("remove `node`") && problems[2].contains("deploy"),
            "{problems:?}"
        );
    }
}
