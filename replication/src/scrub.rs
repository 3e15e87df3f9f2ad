//! Re-reading a partition replica's records in the background, to find
//! damage that no open re-reads.
//!
//! An open verifies the active segment's tail and any segment whose index
//! fails its checks; a sealed segment whose index passes is taken as it is,
//! so a bit flipped in it later (a bad sector) is met only by a read: a
//! consumer's, or a peer's that the replica, as leader, would send the
//! damaged batch to. [`ScrubTask`] reads every record from the log's start
//! to its committed end once per [`ScrubConfig::interval`], at most
//! [`ScrubConfig::bytes_per_second`], checking each batch's CRC; and every
//! second it looks at whether a read met damage (`Log::read_damage`).
//!
//! A replica found damaged:
//! 1. writes the offset of the first damaged batch to [`DAMAGE_MARKER`] in
//!    its directory (fsynced);
//! 2. stops its Raft group: it never votes or leads again with the damage
//!    (the other members carry on; a leader's group elects another);
//! 3. at the node's next start, its open reads the marker, cuts the log
//!    there and fetches the committed records from its peers exactly as
//!    for damage found at open (`crate::repair`), then removes the marker.
//!
//! Invariant: the marker names a batch boundary at or below the first
//! damaged batch; it is removed only after the log was cut there.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dmq_log_store::LogError;
use openraft::Raft;

use crate::partition::{PartitionStateMachine, PartitionTypes};

/// The file in a replica's directory that names the offset its log is
/// damaged from, until an open cuts it there.
pub const DAMAGE_MARKER: &str = "damaged_from";

/// How often a replica looks at whether a read met damage.
const READ_DAMAGE_CHECK: Duration = Duration::from_secs(1);

/// Bytes read at a time (then a pause that keeps the rate).
const CHUNK_BYTES: usize = 256 * 1024;

/// How a replica re-reads its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrubConfig {
    /// The pause before each pass (the first starts this long after the
    /// replica).
    pub interval: Duration,
    /// Read at most this many bytes a second.
    pub bytes_per_second: u64,
}

impl Default for ScrubConfig {
    /// A pass a day at 16 MiB/s per replica.
    fn default() -> Self {
        ScrubConfig {
            interval: Duration::from_secs(24 * 60 * 60),
            bytes_per_second: 16 << 20,
        }
    }
}

/// The offset a replica's log is damaged from, as its marker says (none
/// when there is no marker).
pub(crate) fn marked_damage(dir: &Path) -> std::io::Result<Option<u64>> {
    match std::fs::read_to_string(dir.join(DAMAGE_MARKER)) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{DAMAGE_MARKER} holds {text:?}, not an offset"),
            )
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// Removes the marker once the log was cut where it says.
pub(crate) fn clear_marked_damage(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(DAMAGE_MARKER)) {
        Ok(()) => std::fs::File::open(dir)?.sync_all(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

fn mark_damage(dir: &Path, offset: u64) -> std::io::Result<()> {
    let path = dir.join(DAMAGE_MARKER);
    let temporary = dir.join(format!("{DAMAGE_MARKER}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    writeln!(file, "{offset}")?;
    file.sync_all()?;
    std::fs::rename(&temporary, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// One pass over `state`'s log, from its start to its committed end:
/// the offset of the first damaged batch, if any.
pub async fn scrub_pass(
    state: &PartitionStateMachine,
    bytes_per_second: u64,
) -> std::io::Result<Option<u64>> {
    let log = state.log();
    let end = state.committed_end();
    let mut offset = log.start_offset()?;
    while offset < end {
        match log.with_log(|log| log.read(offset, CHUNK_BYTES))? {
            Ok(batches) => {
                let Some(last) = batches.last() else {
                    return Ok(None);
                };
                offset = last.header().next_offset();
                let bytes: usize = batches.iter().map(|b| b.as_bytes().len()).sum();
                let pause = bytes as f64 / bytes_per_second.max(1) as f64;
                tokio::time::sleep(Duration::from_secs_f64(pause)).await;
            }
            Err(LogError::Corrupt { .. }) => {
                // The chunk held it: one batch at a time finds which.
                return Ok(Some(first_damaged(state, offset)?));
            }
            // Retention deleted the segment meanwhile.
            Err(LogError::OffsetOutOfRange {
                log_start_offset, ..
            }) if log_start_offset > offset => offset = log_start_offset,
            Err(error) => return Err(std::io::Error::other(error)),
        }
    }
    Ok(None)
}

/// The first damaged batch at or after `from` (a batch boundary before
/// damage that a read met): reads one batch at a time.
fn first_damaged(state: &PartitionStateMachine, from: u64) -> std::io::Result<u64> {
    let log = state.log();
    let mut offset = from;
    loop {
        match log.with_log(|log| log.read(offset, 1))? {
            Ok(batches) => match batches.first() {
                Some(batch) => offset = batch.header().next_offset(),
                // Nothing damaged after all (a segment replaced meanwhile):
                // cutting at `from` loses nothing the peers lack.
                None => return Ok(from),
            },
            Err(LogError::Corrupt { .. }) => return Ok(offset),
            Err(error) => return Err(std::io::Error::other(error)),
        }
    }
}

/// The background task that re-reads a replica (see the module doc).
/// Dropping it stops it.
#[derive(Debug)]
pub(crate) struct ScrubTask(tokio::task::JoinHandle<()>);

impl ScrubTask {
    /// Starts the task for the replica whose Raft is `raft`, state machine
    /// `state` and directory `dir` (group `group`); none without `config`.
    pub(crate) fn start(
        raft: Raft<PartitionTypes>,
        state: PartitionStateMachine,
        dir: PathBuf,
        group: String,
        config: Option<ScrubConfig>,
    ) -> Option<ScrubTask> {
        let config = config?;
        Some(ScrubTask(tokio::spawn(run(
            raft, state, dir, group, config,
        ))))
    }
}

impl Drop for ScrubTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Damage a read met (a consumer's, a peer's fetch) since the last check:
/// the first damaged batch at or after the lowest segment it was met in
/// that the log still holds.
fn damage_reads_met(state: &PartitionStateMachine) -> std::io::Result<Option<u64>> {
    let log = state.log();
    let start = log.start_offset()?;
    let met = log.with_log(|log| {
        log.read_damage()
            .iter()
            .map(|damage| damage.segment_base_offset)
            .filter(|&segment| segment >= start)
            .min()
    })?;
    match met {
        Some(segment) => first_damaged(state, segment).map(Some),
        None => Ok(None),
    }
}

async fn run(
    raft: Raft<PartitionTypes>,
    state: PartitionStateMachine,
    dir: PathBuf,
    group: String,
    config: ScrubConfig,
) {
    let mut next_pass = tokio::time::Instant::now() + config.interval;
    loop {
        tokio::time::sleep(READ_DAMAGE_CHECK.min(config.interval)).await;
        if raft.metrics().borrow().running_state.is_err() {
            return;
        }
        let found = match damage_reads_met(&state) {
            Ok(Some(offset)) => Ok(Some(offset)),
            Ok(None) if tokio::time::Instant::now() >= next_pass => {
                let pass = scrub_pass(&state, config.bytes_per_second).await;
                next_pass = tokio::time::Instant::now() + config.interval;
                pass
            }
            Ok(None) => Ok(None),
            Err(error) => Err(error),
        };
        let offset = match found {
            Ok(None) => continue,
            Ok(Some(offset)) => offset,
            Err(error) => {
                tracing::warn!(group, %error, "re-reading the replica's records failed");
                continue;
            }
        };
        if let Err(error) = mark_damage(&dir, offset) {
            tracing::error!(group, offset, %error, "could not mark the replica damaged");
        }
        tracing::error!(
            group,
            offset,
            "a partition replica's records are damaged: its Raft group stops here so that \
             it never votes or leads with them; restart the node to cut its log there and \
             fetch the records again from its peers"
        );
        let _ = raft.shutdown().await;
        return;
    }
}
