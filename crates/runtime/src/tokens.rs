//! Bearer tokens: generated at random, stored only as SHA-256 hashes, checked in constant time.
//! SHA-256 (not a slow password hash) is enough because tokens carry 256 random bits; nobody
//! can guess one from its hash.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of every token, so leaked ones are easy to spot by secret scanners.
pub const TOKEN_PREFIX: &str = "pxt_";
/// Longest token accepted on the wire; longer headers are refused before hashing.
pub const MAX_TOKEN_LEN: usize = 256;

/// A new random token (256 bits, hex).
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// The stored form of a token: lowercase hex SHA-256.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// One accepted token, as it is configured: a name for logs and audit, a role, the hash, and
/// optionally the apps it is limited to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry<R> {
    pub name: String,
    pub role: R,
    pub sha256: String,
    /// The one node name a link token may claim (Beacon's `maestro` tokens need it); other
    /// roles leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The apps this token may act on and see; absent means every app. A CI pipeline's token
    /// names its one app, so a leak of it cannot touch the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apps: Option<Vec<String>>,
}

impl<R> TokenEntry<R> {
    /// Whether this token may act on and see `app`.
    pub fn allows_app(&self, app: &str) -> bool {
        self.apps
            .as_ref()
            .is_none_or(|apps| apps.iter().any(|a| a == app))
    }
}

/// The format of a tokens file: `[[token]]` entries with `name`, `role`, `sha256` and maybe
/// `node`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile<R> {
    #[serde(default = "Vec::new")]
    token: Vec<TokenEntry<R>>,
}

/// Gathers a service's tokens: the inline entries of its config, then those of its tokens
/// file. Problems (an unreadable or malformed file, no tokens at all) are returned as
/// sentences naming the file and the fix.
pub fn gather<R: Clone + serde::de::DeserializeOwned>(
    inline: &[TokenEntry<R>],
    file: Option<&std::path::Path>,
    how_to_make_one: &str,
) -> Result<Vec<TokenEntry<R>>, String> {
    let mut entries = inline.to_vec();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("tokens_file {}: {e}", path.display()))?;
        let parsed: TokensFile<R> = toml::from_str(&text)
            .map_err(|e| format!("tokens_file {}: {}", path.display(), e.message()))?;
        entries.extend(parsed.token);
    }
    if entries.is_empty() {
        return Err(format!(
            "no tokens configured: add `[[tokens]]` entries or a `tokens_file` ({how_to_make_one})"
        ));
    }
    Ok(entries)
}

/// One accepted token with its decoded digest, and when it stops being accepted.
#[derive(Debug)]
struct Stored<R> {
    entry: Arc<TokenEntry<R>>,
    digest: [u8; 32],
    expires: Option<SystemTime>,
}

type Layer<R> = RwLock<Arc<Vec<Stored<R>>>>;

/// The tokens a service accepts, in two layers: the configured ones (replaced whole on a
/// reload, [`TokenTable::replace`]) and the minted ones (replaced whole when the minted list
/// changes, [`TokenTable::replace_minted`]), each with an optional expiry. Each check sees the
/// old or the new set of a layer whole.
#[derive(Debug)]
pub struct TokenTable<R> {
    entries: Layer<R>,
    minted: Layer<R>,
}

/// Decodes each entry's hash; an entry whose hash is not 64 hex characters is an error naming it.
fn stored<R>(entries: Vec<(TokenEntry<R>, Option<SystemTime>)>) -> Result<Vec<Stored<R>>, String> {
    let mut table = Vec::with_capacity(entries.len());
    for (entry, expires) in entries {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&entry.sha256, &mut digest).map_err(|_| {
            format!(
                "token {:?}: sha256 must be 64 hex characters (the output of `apprepo token-hash`)",
                entry.name
            )
        })?;
        table.push(Stored {
            entry: Arc::new(entry),
            digest,
            expires,
        });
    }
    Ok(table)
}

fn read<R>(layer: &Layer<R>) -> Arc<Vec<Stored<R>>> {
    layer.read().unwrap_or_else(PoisonError::into_inner).clone()
}

fn write<R>(layer: &Layer<R>, new: Arc<Vec<Stored<R>>>) {
    *layer.write().unwrap_or_else(PoisonError::into_inner) = new;
}

impl<R: Clone> TokenTable<R> {
    /// Builds the table of configured tokens; an entry whose hash is not 64 hex characters is
    /// an error naming it.
    pub fn new(entries: Vec<TokenEntry<R>>) -> Result<Self, String> {
        let table = stored(entries.into_iter().map(|e| (e, None)).collect())?;
        Ok(Self {
            entries: RwLock::new(Arc::new(table)),
            minted: RwLock::new(Arc::new(Vec::new())),
        })
    }

    /// Accepts `other`'s configured tokens from now on, and no longer the ones configured
    /// before; the minted ones stay.
    pub fn replace(&self, other: TokenTable<R>) {
        write(&self.entries, read(&other.entries));
    }

    /// Accepts these minted tokens, each until its expiry, in place of the minted ones before.
    pub fn replace_minted(
        &self,
        entries: Vec<(TokenEntry<R>, Option<SystemTime>)>,
    ) -> Result<(), String> {
        write(&self.minted, Arc::new(stored(entries)?));
        Ok(())
    }

    /// How many configured tokens are accepted.
    pub fn len(&self) -> usize {
        read(&self.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        read(&self.entries).is_empty()
    }

    /// Finds the entry for a presented token that has not expired. Every entry is compared, in
    /// constant time, so timing says nothing about which or how many tokens exist.
    pub fn verify(&self, presented: &str) -> Option<Arc<TokenEntry<R>>> {
        if presented.len() > MAX_TOKEN_LEN {
            return None;
        }
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let now = SystemTime::now();
        let mut found = None;
        for layer in [read(&self.entries), read(&self.minted)] {
            for stored in layer.iter() {
                if bool::from(stored.digest.ct_eq(&digest))
                    && stored.expires.is_none_or(|expires| now < expires)
                {
                    found = Some(stored.entry.clone());
                }
            }
        }
        found
    }
}

impl<R: Clone> TokenTable<R> {
    /// The entry stored with `sha256` (lowercase hex), if any: how a service checks again,
    /// after a reload, a token it verified before. Both sides are stored hashes, so the
    /// comparison needs no constant time.
    pub fn entry_by_hash(&self, sha256: &str) -> Option<Arc<TokenEntry<R>>> {
        let now = SystemTime::now();
        [read(&self.entries), read(&self.minted)]
            .iter()
            .flat_map(|layer| layer.iter())
            .find(|stored| {
                stored.entry.sha256.eq_ignore_ascii_case(sha256)
                    && stored.expires.is_none_or(|expires| now < expires)
            })
            .map(|stored| stored.entry.clone())
    }
}

impl<R> Clone for TokenTable<R> {
    /// A table with the same tokens, replaced independently of this one.
    fn clone(&self) -> Self {
        Self {
            entries: RwLock::new(read(&self.entries)),
            minted: RwLock::new(read(&self.minted)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_only_the_right_token() {
        let deploy = generate();
        let read = generate();
        assert_ne!(deploy, read);
        assert!(deploy.starts_with(TOKEN_PREFIX));
        let table = TokenTable::new(vec![
            TokenEntry {
                name: "ci".into(),
                role: "deploy",
                sha256: hash(&deploy),
                node: None,
                apps: None,
            },
            TokenEntry {
                name: "maestro".into(),
                role: "read",
                sha256: hash(&read),
                node: None,
                apps: None,
            },
        ])
        .unwrap();
        assert_eq!(table.verify(&deploy).unwrap().name, "ci");
        assert_eq!(table.verify(&read).unwrap().role, "read");
        assert!(table.verify("pxt_wrong").is_none());
        assert!(table.verify("").is_none());
        assert!(table.verify(&"a".repeat(MAX_TOKEN_LEN + 1)).is_none());
    }

    #[test]
    fn gather_joins_inline_and_file_entries_and_names_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens.toml");
        std::fs::write(
            &file,
            format!(
                "[[token]]\nname = \"ci\"\nrole = \"deploy\"\nsha256 = \"{}\"\n",
                hash("x")
            ),
        )
        .unwrap();
        let inline = vec![TokenEntry {
            name: "me".to_string(),
            role: "read".to_string(),
            sha256: hash("y"),
            node: None,
            apps: None,
        }];
        let all = gather(&inline, Some(&file), "make one").unwrap();
        assert_eq!(
            all.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["me", "ci"]
        );
        std::fs::write(&file, "[[token]]\nname = 1\n").unwrap();
        let err = gather(&inline, Some(&file), "make one").unwrap_err();
        assert!(err.contains("tokens.toml"), "{err}");
        let err = gather::<String>(&[], None, "make one").unwrap_err();
        assert!(
            err.contains("no tokens configured") && err.contains("make one"),
            "{err}"
        );
    }

    #[test]
    fn replaced_tables_accept_only_the_new_tokens() {
        let (old, new) = (generate(), generate());
        let entry = |name: &str, token: &str| TokenEntry {
            name: name.into(),
            role: "read",
            sha256: hash(token),
            node: None,
            apps: None,
        };
        let table = TokenTable::new(vec![entry("old", &old)]).unwrap();
        let copy = table.clone();
        table.replace(TokenTable::new(vec![entry("new", &new), entry("other", "x")]).unwrap());
        assert!(table.verify(&old).is_none());
        assert_eq!(table.verify(&new).unwrap().name, "new");
        assert!(table.entry_by_hash(&hash(&old)).is_none());
        assert_eq!(table.entry_by_hash(&hash(&new)).unwrap().name, "new");
        assert_eq!(table.len(), 2);
        // A clone taken before is a table of its own.
        assert_eq!(copy.verify(&old).unwrap().name, "old");
        assert!(copy.verify(&new).is_none());
    }

    #[test]
    fn minted_tokens_are_accepted_until_they_expire_or_are_replaced() {
        let (configured, minted, expired) = (generate(), generate(), generate());
        let entry = |name: &str, token: &str| TokenEntry {
            name: name.into(),
            role: "deploy",
            sha256: hash(token),
            apps: Some(vec!["shop".into()]),
            node: None,
        };
        let table = TokenTable::new(vec![entry("file", &configured)]).unwrap();
        let hour = std::time::Duration::from_secs(3600);
        table
            .replace_minted(vec![
                (entry("ci", &minted), Some(SystemTime::now() + hour)),
                (entry("old", &expired), Some(SystemTime::now() - hour)),
            ])
            .unwrap();
        assert_eq!(table.verify(&minted).unwrap().name, "ci");
        assert!(
            table.verify(&expired).is_none(),
            "an expired token is refused"
        );
        // A reload of the configured tokens keeps the minted ones, and the other way round.
        table.replace(TokenTable::new(vec![entry("file", &configured)]).unwrap());
        assert_eq!(table.verify(&minted).unwrap().name, "ci");
        table.replace_minted(Vec::new()).unwrap();
        assert!(
            table.verify(&minted).is_none(),
            "a revoked token is refused"
        );
        assert_eq!(table.verify(&configured).unwrap().name, "file");
    }

    #[test]
    fn malformed_hash_is_refused_by_name() {
        let err = TokenTable::new(vec![TokenEntry {
            name: "bad".into(),
            role: (),
            sha256: "xyz".into(),
            node: None,
            apps: None,
        }])
        .unwrap_err();
        assert!(err.contains("bad"), "{err}");
    }
}
