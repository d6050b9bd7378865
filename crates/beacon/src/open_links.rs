//! The control links open now, each with the token it proved, so that a reload closes the
//! links whose token no longer verifies (removed, given another role, or bound to another node).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use px_runtime::tokens::{TokenEntry, TokenTable};
use tokio_util::sync::CancellationToken;

use crate::auth::Role;

/// The open links. Each registered link is an established one, so the map is bounded by
/// `MAX_LINKS`.
#[derive(Default)]
pub struct OpenLinks {
    links: Mutex<HashMap<u64, OpenLink>>,
    next: AtomicU64,
}

struct OpenLink {
    /// The node or repository name its `Hello` gave.
    peer: String,
    /// The token's entry as verified at the handshake, shared with the token table that
    /// verified it rather than copied for every link.
    entry: Arc<TokenEntry<Role>>,
    revoked: CancellationToken,
}

/// A link's place among the open ones, left when dropped. `revoked` is cancelled when a reload
/// no longer accepts the link's token: the link task then closes the link.
pub struct Registered {
    links: Arc<OpenLinks>,
    id: u64,
    pub revoked: CancellationToken,
}

impl OpenLinks {
    /// Registers the link of `peer`, verified with `entry`. Its `revoked` token is a child of
    /// `within` (Beacon's shutdown), so the link task may wait on it alone for both.
    pub fn register(
        self: &Arc<Self>,
        peer: &str,
        entry: Arc<TokenEntry<Role>>,
        within: &CancellationToken,
    ) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let revoked = within.child_token();
        self.lock().insert(
            id,
            OpenLink {
                peer: peer.to_string(),
                entry,
                revoked: revoked.clone(),
            },
        );
        Registered {
            links: self.clone(),
            id,
            revoked,
        }
    }

    /// Checks every open link's token against `tokens` (after a reload replaced them) and
    /// closes the links whose token no longer verifies, logging why; returns how many.
    pub fn recheck(&self, tokens: &TokenTable<Role>) -> usize {
        let mut closed = 0;
        for link in self.lock().values() {
            let Err(reason) = still_admitted(link, tokens) else {
                continue;
            };
            if !link.revoked.is_cancelled() {
                tracing::warn!(peer = %link.peer, token = %link.entry.name, %reason, "closing a link after a reload");
                link.revoked.cancel();
                closed += 1;
            }
        }
        closed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OpenLink>> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether the token `link` proved still admits it under `tokens`.
fn still_admitted(link: &OpenLink, tokens: &TokenTable<Role>) -> Result<(), String> {
    let Some(entry) = tokens.entry_by_hash(&link.entry.sha256) else {
        return Err(format!("token {:?} is no longer accepted", link.entry.name));
    };
    if entry.role != link.entry.role {
        return Err(format!(
            "token {:?} is now a {} token",
            entry.name,
            entry.role.as_str()
        ));
    }
    crate::links::token_admits(&entry, &link.peer)
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.links.lock().remove(&self.id);
    }
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
    fn a_recheck_closes_the_links_whose_token_went_or_moved_and_keeps_the_rest() {
        let links = Arc::new(OpenLinks::default());
        let root = CancellationToken::new();
        let web1 = links.register(
            "web-1",
            Arc::new(entry("a", Role::Maestro, Some("web-1"))),
            &root,
        );
        let web2 = links.register(
            "web-2",
            Arc::new(entry("b", Role::Maestro, Some("web-2"))),
            &root,
        );
        let web3 = links.register(
            "web-3",
            Arc::new(entry("c", Role::Maestro, Some("web-3"))),
            &root,
        );
        let repo = links.register(
            "apprepo",
            Arc::new(entry("r", Role::Repository, None)),
            &root,
        );
        let tokens = TokenTable::new(vec![
            entry("a", Role::Maestro, Some("web-1")),
            // b is gone; c now belongs to another node.
            entry("c", Role::Maestro, Some("web-9")),
            entry("r", Role::Repository, None),
        ])
        .unwrap();
        assert_eq!(links.recheck(&tokens), 2);
        assert!(!web1.revoked.is_cancelled());
        assert!(web2.revoked.is_cancelled());
        assert!(web3.revoked.is_cancelled());
        assert!(!repo.revoked.is_cancelled());
        drop(web2);
        assert_eq!(links.lock().len(), 3);
        root.cancel();
        assert!(web1.revoked.is_cancelled(), "a shutdown ends every link");
    }
}
