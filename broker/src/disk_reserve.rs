//! Room on the data disk for what must still work when it is full: acks,
//! deletions, metadata and recovery.
//!
//! Two mechanisms, both sized by `disk_reserve_bytes`:
//! - partition logs never create a segment that would leave less than that
//!   free (`LogConfig::min_free_bytes`): produces are refused with DiskFull
//!   first, while the broker's small writes still fit;
//! - a file `<data_dir>/reserve` of that size holds room back against other
//!   writers. At start, if the disk has less free than the reserve, the file
//!   is deleted (loudly), so that a broker restarted on a full disk can
//!   serve reads, acks and deletions; it is made again at a later start
//!   once there is room.

use std::path::{Path, PathBuf};

/// The reserve file's name under the data directory.
pub const RESERVE_FILE: &str = "reserve";

/// What [`prepare`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveAction {
    /// The reserve was in place (or none is configured).
    Kept,
    /// The reserve was made.
    Created,
    /// The disk was full: the reserve was deleted to give its room.
    Released,
    /// No reserve and no room to make one.
    Missing,
}

fn reserve_path(data_dir: &Path) -> PathBuf {
    data_dir.join(RESERVE_FILE)
}

/// Makes or releases the reserve of `bytes` under `data_dir` (created if
/// missing), as the module doc says.
pub fn prepare(data_dir: &Path, bytes: u64) -> std::io::Result<ReserveAction> {
    std::fs::create_dir_all(data_dir)?;
    let path = reserve_path(data_dir);
    if bytes == 0 {
        return Ok(ReserveAction::Kept);
    }
    let free = dmq_log_store::available_bytes(data_dir)?;
    let exists = path.exists();
    if exists && free < bytes {
        std::fs::remove_file(&path)?;
        tracing::warn!(
            free,
            released = bytes,
            "the data disk is full: the reserve file is deleted so that acks, deletions \
             and metadata can be written; free space, then restart to make it again"
        );
        return Ok(ReserveAction::Released);
    }
    if exists {
        return Ok(ReserveAction::Kept);
    }
    if free < bytes.saturating_mul(2) {
        tracing::warn!(free, reserve = bytes, "no room for the disk reserve");
        return Ok(ReserveAction::Missing);
    }
    if let Err(error) = dmq_log_store::allocate_file(&path, bytes) {
        let _ = std::fs::remove_file(&path);
        return Err(error);
    }
    Ok(ReserveAction::Created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            prepare(dir.path(), 1 << 20).unwrap(),
            ReserveAction::Created
        );
        let len = std::fs::metadata(reserve_path(dir.path())).unwrap().len();
        assert_eq!(len, 1 << 20);
        assert_eq!(prepare(dir.path(), 1 << 20).unwrap(), ReserveAction::Kept);
        assert_eq!(prepare(dir.path(), 0).unwrap(), ReserveAction::Kept);
    }
}
