//! The certificates Beacon's ACME CA issued, on this node (docs/src/design/acme.md): Beacon
//! names each one (host name, serial, apprepo URL) on the link; this task fetches each one the
//! node does not hold from apprepo with the repository token, keeps it under
//! `state_dir/acme/` (a 0700 directory, 0600 files), and hands it to the proxy's TLS resolver.
//! At start-up the kept ones are served before Beacon or apprepo answer. A certificate Beacon
//! no longer names (its app deleted, its name removed) is no longer served, nor kept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use px_proto::acme::{AcmeCert, AcmeCertVersions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::delivery::{Attempt, authorized, message_of};
use crate::proxy::AcmeAnswers;

/// The directory under `state_dir` holding the certificates.
pub const ACME_DIR: &str = "acme";
/// How often certificates that could not be fetched are tried again.
const RETRY: Duration = Duration::from_secs(10);

fn cert_path(dir: &Path, domain: &str) -> PathBuf {
    dir.join(format!("{domain}.json"))
}

/// Serves every kept certificate; returns each host name with its serial. A file that does
/// not parse is skipped (and logged): Beacon names its certificate again and it is fetched.
pub fn load_kept(state_dir: &Path, answers: &AcmeAnswers) -> BTreeMap<String, String> {
    let dir = state_dir.join(ACME_DIR);
    let mut held = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return held;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let record = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<AcmeCert>(&b).map_err(|e| e.to_string()));
        match record.and_then(|r| {
            answers
                .set_issued(&r.domain, &r.chain_pem, &r.key_pem)
                .map(|()| r)
        }) {
            Ok(record) => {
                held.insert(record.domain, record.serial);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "kept certificate unreadable; fetching it again")
            }
        }
    }
    if !held.is_empty() {
        tracing::info!(count = held.len(), "serving the kept ACME certificates");
    }
    held
}

/// Fetches the certificates Beacon names until `shutdown`.
pub async fn run(
    mut wanted: watch::Receiver<Arc<AcmeCertVersions>>,
    http: reqwest::Client,
    token: Option<String>,
    state_dir: PathBuf,
    answers: Arc<AcmeAnswers>,
    mut held: BTreeMap<String, String>,
    shutdown: CancellationToken,
) {
    let dir = state_dir.join(ACME_DIR);
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The channel's first value is a placeholder, not Beacon's word: until Beacon names its
    // set, nothing kept is dropped.
    let mut heard = wanted.has_changed().unwrap_or(false);
    loop {
        let current = wanted.borrow_and_update().clone();
        if heard {
            let gone: Vec<String> = held
                .keys()
                .filter(|domain| !current.certs.contains_key(*domain))
                .cloned()
                .collect();
            for domain in gone {
                forget(&dir, &domain, &answers).await;
                held.remove(&domain);
            }
        }
        for (domain, version) in &current.certs {
            if held.get(domain) == Some(&version.serial) {
                continue;
            }
            match fetch(&http, token.as_deref(), &version.url, domain).await {
                Ok(record) if record.serial == version.serial => {
                    if let Err(e) = keep(&dir, &record, &answers).await {
                        tracing::warn!(%domain, error = %e, "acme certificate not kept; retrying");
                        continue;
                    }
                    tracing::info!(%domain, serial = %record.serial, "serving the ACME certificate");
                    held.insert(domain.clone(), record.serial);
                }
                // Beacon stored a newer one since it named this one: the next set names it.
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%domain, error = %e, "acme certificate not fetched; retrying")
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = wanted.changed() => {
                if changed.is_err() {
                    return;
                }
                heard = true;
            }
            _ = retry.tick() => {}
        }
    }
}

async fn fetch(
    http: &reqwest::Client,
    token: Option<&str>,
    url: &str,
    domain: &str,
) -> Result<AcmeCert, String> {
    let (status, body) = authorized(token, http.get(url))
        .await
        .map_err(|a| match a {
            Attempt::Retry(m) | Attempt::Stop(m) => m,
        })?;
    if !status.is_success() {
        return Err(format!("GET {url}: {status}: {}", message_of(&body)));
    }
    let record: AcmeCert = serde_json::from_slice(&body)
        .map_err(|e| format!("GET {url}: not a certificate record: {e}"))?;
    if record.domain != domain {
        return Err(format!(
            "GET {url} answered the record of {:?}",
            record.domain
        ));
    }
    Ok(record)
}

/// Stops serving `domain`'s certificate and removes the kept copy.
async fn forget(dir: &Path, domain: &str, answers: &AcmeAnswers) {
    answers.remove_issued(domain);
    match tokio::fs::remove_file(cert_path(dir, domain)).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(%domain, error = %e, "cannot remove the kept certificate"),
    }
    tracing::info!(%domain, "no longer serving the ACME certificate: beacon no longer names it");
}

/// Serves the record and keeps it, readable by Maestro alone.
async fn keep(dir: &Path, record: &AcmeCert, answers: &AcmeAnswers) -> Result<(), String> {
    answers.set_issued(&record.domain, &record.chain_pem, &record.key_pem)?;
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| e.to_string())?;
    let dir = dir.to_path_buf();
    let path = cert_path(&dir, &record.domain);
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        px_runtime::fs::write_atomic(&path, &bytes)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use px_proto::acme::CertState;

    use super::*;

    #[tokio::test]
    async fn a_kept_certificate_is_private_and_serves_again_after_a_restart() {
        let state = tempfile::tempdir().unwrap();
        let pki = px_test_support::Pki::new(&["shop.example.com"]).unwrap();
        let record = AcmeCert {
            domain: "shop.example.com".into(),
            state: CertState::Issued,
            chain_pem: std::fs::read_to_string(pki.cert()).unwrap(),
            key_pem: std::fs::read_to_string(pki.key()).unwrap(),
            issuer: "test CA".into(),
            not_before: String::new(),
            not_after: String::new(),
            renew_at: String::new(),
            last_error: String::new(),
            serial: "0a".into(),
        };
        let dir = state.path().join(ACME_DIR);
        keep(&dir, &record, &AcmeAnswers::default()).await.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&cert_path(&dir, "shop.example.com")), 0o600);

        // A new process: the kept certificate serves before any link or apprepo answers.
        let answers = AcmeAnswers::default();
        let held = load_kept(state.path(), &answers);
        assert_eq!(held.get("shop.example.com").map(String::as_str), Some("0a"));
        assert!(answers.issued("shop.example.com").is_some());
        assert!(answers.issued("other.example.com").is_none());
    }

    #[tokio::test]
    async fn a_certificate_beacon_no_longer_names_is_no_longer_served_nor_kept() {
        let state = tempfile::tempdir().unwrap();
        let pki = px_test_support::Pki::new(&["shop.example.com"]).unwrap();
        let record = AcmeCert {
            domain: "shop.example.com".into(),
            state: CertState::Issued,
            chain_pem: std::fs::read_to_string(pki.cert()).unwrap(),
            key_pem: std::fs::read_to_string(pki.key()).unwrap(),
            issuer: "test CA".into(),
            not_before: String::new(),
            not_after: String::new(),
            renew_at: String::new(),
            last_error: String::new(),
            serial: "0a".into(),
        };
        let dir = state.path().join(ACME_DIR);
        keep(&dir, &record, &AcmeAnswers::default()).await.unwrap();
        let answers = Arc::new(AcmeAnswers::default());
        let held = load_kept(state.path(), &answers);
        let (tx, rx) = watch::channel(Arc::new(AcmeCertVersions::default()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            rx,
            reqwest::Client::new(),
            None,
            state.path().to_path_buf(),
            answers.clone(),
            held,
            shutdown.clone(),
        ));
        // Beacon has named nothing yet: the kept certificate serves on.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(answers.issued("shop.example.com").is_some());
        // Beacon names a set without it (the app was deleted).
        tx.send_replace(Arc::new(AcmeCertVersions::default()));
        let path = cert_path(&dir, "shop.example.com");
        for _ in 0..100 {
            if answers.issued("shop.example.com").is_none() && !path.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(answers.issued("shop.example.com").is_none());
        assert!(!path.exists(), "the kept copy is removed");
        shutdown.cancel();
        task.await.unwrap();
    }
}
