//! What discovery knows between passes: merging a scope's fresh listing (with the grace period),
//! the snapshot file read at start, and the backoff after failures.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Found, SNAPSHOT_FILE, SNAPSHOT_VERSION, Skipped};
use crate::config::ClusterConfig;

/// Merges one scope's (account, region) fresh listing into what was known: the listed clusters
/// replace that scope's old entries; one no longer listed stays until `grace` has passed since
/// it was last seen.
pub fn merge(known: &[Found], scope: &str, region: &str, fresh: Vec<Found>, now: u64, grace: u64) -> Vec<Found> {
    let mut out: Vec<Found> = known.iter().filter(|f| f.scope != scope || f.region != region).cloned().collect();
    for old in known.iter().filter(|f| f.scope == scope && f.region == region) {
        if fresh.iter().any(|f| f.arn == old.arn) {
            continue;
        }
        if now.saturating_sub(old.last_seen) < grace {
            out.push(old.clone());
        } else {
            tracing::info!(arn = %old.arn, bootstrap = %old.bootstrap, "cluster gone from AWS past the grace period: no longer served");
        }
    }
    out.extend(fresh);
    out.sort_by(|a, b| a.arn.cmp(&b.arn));
    out
}

/// Removes the clusters AWS still lists but no longer selects (untagged, or state DELETING):
/// the operator's decision, applied at once.
pub fn drop_deselected(known: Vec<Found>, skipped: &[Skipped]) -> Vec<Found> {
    known
        .into_iter()
        .filter(|f| {
            let deselected = skipped.iter().any(|s| s.deselected && s.arn == f.arn);
            if deselected {
                tracing::info!(arn = %f.arn, "cluster no longer selected by its tags: no longer served");
            }
            !deselected
        })
        .collect()
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    version: u32,
    written: u64,
    clusters: Vec<Found>,
}

/// Reads the snapshot; `Ok(None)` when there is none yet.
pub fn load_snapshot(dir: &Path) -> Result<Option<Vec<Found>>, String> {
    let path = dir.join(SNAPSHOT_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let file: SnapshotFile = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if file.version != SNAPSHOT_VERSION {
        return Err(format!("{}: version {} (this build reads {SNAPSHOT_VERSION})", path.display(), file.version));
    }
    Ok(Some(file.clusters))
}

/// Writes the snapshot atomically: a temporary file, fsync, rename, fsync of the folder.
pub fn write_snapshot(dir: &Path, clusters: &[Found]) -> std::io::Result<()> {
    let file = SnapshotFile { version: SNAPSHOT_VERSION, written: unix_now(), clusters: clusters.to_vec() };
    let text = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    crate::discovery::write_atomic(dir, SNAPSHOT_FILE, &text)
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The clusters to hand the engine.
pub fn clusters_of(found: &[Found], ttl: u32) -> Vec<ClusterConfig> {
    found.iter().filter_map(|f| f.cluster(ttl)).collect()
}
