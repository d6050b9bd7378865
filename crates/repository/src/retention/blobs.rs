//! Phase three of a sweep: bundles and layers no record points to, older than the grace, are
//! marked (`condemned.rs`), and deleted after `condemn_wait` if the records listed again still
//! name none of them, so that a commit through another apprepo sharing the storage either
//! keeps its object or is refused, never left pointing at nothing.

use std::collections::HashSet;
use std::time::SystemTime;

use super::{Known, Policy, SweepReport, describe, remaining};
use crate::builds::Builds;
use crate::error::ApiError;
use crate::releases::{Collection, Releases};
use crate::storage::{Blob, BlobEntry};

/// Every bundle and layer a stored record points to: the bundles and layers of every release
/// record, and the sources of pending builds, in every app directory (even one without
/// `app.json`: its records still name objects). Any failure fails it.
async fn referenced(
    releases: &Releases,
    builds: &Builds,
    known: &mut Known,
) -> Result<(HashSet<String>, HashSet<String>), ApiError> {
    let mut bundles = HashSet::new();
    let mut layers = HashSet::new();
    for app in releases.app_names().await? {
        for names in remaining(releases, &app, known).await? {
            bundles.insert(names.bundle);
            layers.extend(names.layers);
        }
        let listing = builds.listing(&app).await?;
        for number in listing.pending() {
            if let Some(source) = builds.source_of(&app, number).await? {
                bundles.insert(source);
            }
        }
    }
    Ok((bundles, layers))
}

/// One kind of object as this sweep found it.
struct Listed {
    blob: Blob,
    stored: Vec<BlobEntry>,
    /// The unreferenced ones older than the grace, marked.
    condemned: Vec<BlobEntry>,
}

/// Deletes the bundles and layers that no record points to and that are older than the grace,
/// unless a release was committed to one meanwhile.
pub(super) async fn collect_blobs(
    releases: &Releases,
    builds: &Builds,
    policy: &Policy,
    now: SystemTime,
    known: &Known,
    report: &mut SweepReport,
) {
    // Before the listing, so commits that the listing misses are noted by the collection.
    let collection = releases.begin_collection().await;
    let mut known = known.clone();
    let (bundles, layers) = match referenced(releases, builds, &mut known).await {
        Ok(referenced) => referenced,
        Err(e) => {
            report.errors.push(format!(
                "listing release and build records failed, so no bundle or layer was collected: {}",
                describe(&e)
            ));
            return;
        }
    };
    let mut listed = Vec::new();
    for (blob, referenced) in [(Blob::Bundle, &bundles), (Blob::Layer, &layers)] {
        if let Some(kind) = condemn(releases, blob, referenced, policy, now, report).await {
            listed.push(kind);
        }
    }
    // A commit through another apprepo that checked its objects before they were marked has
    // created its record once the wait is over; one that came after took the mark away.
    let marked = listed.iter().any(|kind| !kind.condemned.is_empty());
    let still = if marked {
        tokio::time::sleep(policy.condemn_wait).await;
        match referenced(releases, builds, &mut known).await {
            Ok(referenced) => Some(referenced),
            Err(e) => {
                report.errors.push(format!(
                    "listing release and build records again failed, so no bundle or layer was collected: {}",
                    describe(&e)
                ));
                None
            }
        }
    } else {
        Some((bundles, layers))
    };
    for kind in listed {
        let referenced = still.as_ref().map(|(bundles, layers)| match kind.blob {
            Blob::Bundle => bundles,
            Blob::Layer => layers,
        });
        let swept = delete(releases, &collection, &kind, referenced, report).await;
        match kind.blob {
            Blob::Bundle => {
                report.bundles_swept = true;
                report.bundles_deleted = swept.deleted;
                report.bytes_freed = swept.bytes_freed;
                report.bundles_kept = swept.kept;
                report.bytes_kept = swept.bytes_kept;
            }
            Blob::Layer => {
                report.layers_swept = true;
                report.layers_deleted = swept.deleted;
                report.layer_bytes_freed = swept.bytes_freed;
                report.layers_kept = swept.kept;
                report.layer_bytes_kept = swept.bytes_kept;
            }
        }
    }
}

/// Lists the objects of kind `blob` and marks those not in `referenced` and older than the
/// grace; `None` when they could not be listed.
async fn condemn(
    releases: &Releases,
    blob: Blob,
    referenced: &HashSet<String>,
    policy: &Policy,
    now: SystemTime,
    report: &mut SweepReport,
) -> Option<Listed> {
    let stored = match releases.storage().list_blobs(blob).await {
        Ok(stored) => stored,
        Err(e) => {
            report.errors.push(format!("listing {}s: {e}", blob.noun()));
            return None;
        }
    };
    let mut condemned = Vec::new();
    for entry in &stored {
        let age = now.duration_since(entry.modified).unwrap_or_default();
        if referenced.contains(&entry.sha256) || age < policy.bundle_grace {
            continue;
        }
        match releases.condemn(blob, &entry.sha256).await {
            Ok(()) => condemned.push(entry.clone()),
            Err(e) => report
                .errors
                .push(format!("marking {} {}: {e}", blob.noun(), entry.sha256)),
        }
    }
    Some(Listed {
        blob,
        stored,
        condemned,
    })
}

/// What collecting one kind of object did.
#[derive(Default)]
struct Swept {
    deleted: u64,
    bytes_freed: u64,
    kept: u64,
    bytes_kept: u64,
}

/// Deletes the marked objects `referenced` (the records listed after the wait) still does not
/// name; with no listing, deletes nothing.
async fn delete(
    releases: &Releases,
    collection: &Collection<'_>,
    kind: &Listed,
    referenced: Option<&HashSet<String>>,
    report: &mut SweepReport,
) -> Swept {
    let mut swept = Swept::default();
    let mut deleted = HashSet::new();
    for entry in &kind.condemned {
        let Some(referenced) = referenced else {
            break;
        };
        if referenced.contains(&entry.sha256) {
            // Committed to meanwhile: no longer condemned.
            if let Err(e) = releases.unmark(kind.blob, &entry.sha256).await {
                tracing::debug!(sha256 = %entry.sha256, error = %e, "mark left behind");
            }
            continue;
        }
        match collection.delete_blob(kind.blob, &entry.sha256).await {
            Ok(true) => {
                deleted.insert(entry.sha256.clone());
                swept.deleted += 1;
                swept.bytes_freed += entry.size;
                tracing::info!(kind = kind.blob.noun(), sha256 = %entry.sha256, size = entry.size, "unreferenced object collected");
            }
            Ok(false) => {
                // Kept (a commit took it, or the delete could not start in time): the next
                // sweep judges it afresh.
                if let Err(e) = releases.unmark(kind.blob, &entry.sha256).await {
                    tracing::debug!(sha256 = %entry.sha256, error = %e, "mark left behind");
                }
            }
            Err(e) => report.errors.push(format!(
                "deleting {} {}: {e}",
                kind.blob.noun(),
                entry.sha256
            )),
        }
    }
    for entry in kind.stored.iter().filter(|e| !deleted.contains(&e.sha256)) {
        swept.kept += 1;
        swept.bytes_kept += entry.size;
    }
    swept
}
