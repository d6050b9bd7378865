//! Who may call the API: bearer tokens with a role, checked by an axum extractor.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use px_runtime::tokens::{TokenEntry, TokenTable};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::http::AppState;

/// What a token may do. `Deploy`, `Build` and `Release` each include everything `Read` may,
/// and nothing of each other (but `Build` includes `Release`): a builder (a node that runs
/// builds) cannot deploy, a deploy token cannot pass off layers as a build's output, and
/// neither can a deploy token report a release phase it never ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read apps, releases, builds, config, bundles and layers: what Maestros and Beacon need.
    Read,
    /// Also create apps, upload bundles, change config and roll back.
    Deploy,
    /// Also upload layers, and finish or fail builds: what a node that may build needs. It
    /// includes `release`: a node trusted with builds runs release phases too.
    Build,
    /// Also claim and end release phases: what a node that runs them needs (a web server).
    Release,
    /// Read, with config values: what Beacon's reconciler holds, since it hands each node the
    /// environment of the apps it runs. It changes nothing.
    Beacon,
}

impl Role {
    /// Whether a token of this role may do what needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self == needed || needed == Role::Read || (self == Role::Build && needed == Role::Release)
    }

    /// The role's name, as in the tokens file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Deploy => "deploy",
            Role::Build => "build",
            Role::Release => "release",
            Role::Beacon => "beacon",
        }
    }

    /// Whether a token of this role reads a certificate's private key: Beacon, which orders
    /// them, and the web servers (`release` and `build` are node roles), which serve them.
    pub fn reads_certificate_keys(self) -> bool {
        matches!(self, Role::Beacon | Role::Release | Role::Build)
    }

    /// Whether a token of this role sees config values: the people who set them and Beacon,
    /// which passes them to the nodes. Every other role sees their names only.
    pub fn sees_config_values(self) -> bool {
        matches!(self, Role::Deploy | Role::Beacon)
    }
}

/// The verified caller of a request.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) name: String,
    pub(crate) role: Role,
    /// The apps the token is limited to; `None` for every app.
    pub(crate) apps: Option<Vec<String>>,
}

impl Caller {
    /// Refuses the request unless the caller's role includes `needed` and its token may act
    /// on `app`: the check of every route that names an app.
    pub(crate) fn require_app(&self, needed: Role, app: &str) -> Result<(), ApiError> {
        self.require(needed)?;
        if self.sees(app) {
            Ok(())
        } else {
            Err(self.not_its_app(app))
        }
    }

    /// Whether the caller's token may see and act on `app` (lists keep only these).
    pub(crate) fn sees(&self, app: &str) -> bool {
        self.apps
            .as_ref()
            .is_none_or(|apps| apps.iter().any(|a| a == app))
    }

    /// Hides a release's config values unless the caller's role may see them.
    pub(crate) fn shown(&self, mut release: px_proto::api::Release) -> px_proto::api::Release {
        if !self.role.sees_config_values() {
            release.hide_config_values();
        }
        release
    }

    /// The refusal of an app outside the token's list.
    pub(crate) fn not_its_app(&self, app: &str) -> ApiError {
        ApiError::Forbidden(format!(
            "token {:?} is limited to its apps ({}); it may not act on app {app:?}",
            self.name,
            self.apps.as_deref().unwrap_or_default().join(", ")
        ))
    }

    /// Refuses the request unless the caller's role includes `needed`.
    pub(crate) fn require(&self, needed: Role) -> Result<(), ApiError> {
        if self.role.allows(needed) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "token {:?} has role {}; this needs a {} token",
                self.name,
                self.role.as_str(),
                needed.as_str()
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
            apps: entry.apps.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use px_runtime::tokens::{gather, hash};

    use super::*;

    #[test]
    fn the_build_role_is_read_from_the_tokens_file_and_an_unknown_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens.toml");
        let entry = |role: &str| {
            format!(
                "[[token]]\nname = \"web-1\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
                hash("secret")
            )
        };
        std::fs::write(&file, entry("build")).unwrap();
        let tokens = table(gather::<Role>(&[], Some(&file), "").unwrap()).unwrap();
        assert_eq!(tokens.verify("secret").unwrap().role, Role::Build);
        std::fs::write(&file, entry("admin")).unwrap();
        let err = gather::<Role>(&[], Some(&file), "").unwrap_err();
        assert!(err.contains("admin"), "{err}");
    }

    #[test]
    fn deploy_and_build_each_include_read_and_not_each_other() {
        let cases = [
            (Role::Read, Role::Read, true),
            (Role::Read, Role::Deploy, false),
            (Role::Read, Role::Build, false),
            (Role::Deploy, Role::Read, true),
            (Role::Deploy, Role::Deploy, true),
            (Role::Deploy, Role::Build, false),
            (Role::Build, Role::Read, true),
            (Role::Build, Role::Build, true),
            (Role::Build, Role::Deploy, false),
            // A build node runs release phases too; a web server's release token does
            // nothing else, and a deploy token cannot report a phase it never ran.
            (Role::Build, Role::Release, true),
            (Role::Release, Role::Read, true),
            (Role::Release, Role::Release, true),
            (Role::Release, Role::Build, false),
            (Role::Release, Role::Deploy, false),
            (Role::Deploy, Role::Release, false),
            (Role::Read, Role::Release, false),
            (Role::Beacon, Role::Read, true),
            (Role::Beacon, Role::Deploy, false),
            (Role::Beacon, Role::Release, false),
            (Role::Deploy, Role::Beacon, false),
        ];
        for (role, needed, allowed) in cases {
            assert_eq!(role.allows(needed), allowed, "{role:?} for {needed:?}");
        }
    }
}
