//! One segment: a data file named by its base offset, its mapping, its four
//! indexes, and how much of it readers may see.
//!
//! Files of the segment with base offset B (20 decimal digits):
//! `B.log` (batches), `B.index` (offset index), `B.timeindex`, `B.idindex`,
//! `B.keyindex`. The active segment's four indexes live in memory and are
//! written out (the id and key indexes sorted) when the segment is sealed:
//! an active segment has only its `.log` file. Sealed index files carry a
//! CRC and are rebuilt from the log whenever they are missing or fail their
//! checks.
//!
//! The active segment's file grows in steps (`LogConfig::grown_capacity`);
//! each growth maps the file again at its new length and later readers use
//! the new mapping, while views of the old one stay valid.
//!
//! Invariants:
//! - Readers never look past `visible_len`, and every batch below it is
//!   complete (written, and durable under `FsyncPolicy::Always`).
//! - `visible_len` and `visible_next_offset` only grow; so does `capacity`
//!   (the mapped, allocated length) while the segment is active.
//! - A sealed segment's file length equals its data length.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use dmq_index::{
    IdIndexBuilder, KeyIndexBuilder, OffsetIndex, SealedIdIndex, SealedKeyIndex, TimeIndex,
};

use crate::batch::{verify_batch, BatchError, BatchHeader, Record, RecordBatch};
use crate::error::{LogError, Result};
use crate::io::SegmentFile;
use crate::message_id::MessageId;
use crate::mmap::SegmentMap;
use crate::resources::{mapped_segments_budget, Evict};
use crate::scan::{find_next_valid_batch, scan_segment, ScanOutcome};

/// File name of the segment data file with this base offset.
pub(crate) fn log_file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.log")
}

/// The checkpoint files of an active segment's indexes, written at a clean
/// close (same order and formats as [`index_paths`]).
pub(crate) fn checkpoint_paths(dir: &Path, base_offset: u64) -> [PathBuf; 4] {
    [
        dir.join(format!("{base_offset:020}.ckpt-index")),
        dir.join(format!("{base_offset:020}.ckpt-timeindex")),
        dir.join(format!("{base_offset:020}.ckpt-idindex")),
        dir.join(format!("{base_offset:020}.ckpt-keyindex")),
    ]
}

/// The index files of a segment, in the order they are created.
pub(crate) fn index_paths(dir: &Path, base_offset: u64) -> [PathBuf; 4] {
    [
        dir.join(format!("{base_offset:020}.index")),
        dir.join(format!("{base_offset:020}.timeindex")),
        dir.join(format!("{base_offset:020}.idindex")),
        dir.join(format!("{base_offset:020}.keyindex")),
    ]
}

/// Message-id lookup of a segment: in memory while active, a file once sealed.
#[derive(Debug)]
pub(crate) enum IdLookup {
    Active(IdIndexBuilder),
    Sealed(SealedIdIndex),
}

/// Key lookup of a segment: in memory while active, a file once sealed.
#[derive(Debug)]
pub(crate) enum KeyLookup {
    Active(KeyIndexBuilder),
    Sealed(SealedKeyIndex),
}

/// The four indexes of a segment plus the state that decides when the sparse
/// ones get their next entry.
#[derive(Debug)]
pub(crate) struct SegmentIndexes {
    pub(crate) offset: OffsetIndex,
    pub(crate) time: TimeIndex,
    pub(crate) ids: IdLookup,
    pub(crate) keys: KeyLookup,
    /// False once a sealed segment's indexes were unloaded (evicted by the
    /// mapped-segments budget): the tables are empty stand-ins until
    /// reloaded. Always true for the active segment.
    resident: bool,
    interval_bytes: u32,
    /// Position of the last offset-index entry (0: the segment start).
    last_offset_entry_position: u64,
    /// End position of the batch that produced the last time-index entry.
    last_time_entry_end: u64,
    /// Largest timestamp seen so far, and the last offset seen.
    max_timestamp_ms: i64,
    last_rel_offset: Option<u32>,
}

impl SegmentIndexes {
    /// Fresh, empty indexes for an active segment.
    pub(crate) fn create_active(
        dir: &Path,
        base_offset: u64,
        capacity_entries: u32,
        interval_bytes: u32,
    ) -> Result<Self> {
        let [offset_path, time_path, id_path, key_path] = index_paths(dir, base_offset);
        // Files of an interrupted seal, or an older version's preallocated
        // active indexes: the indexes are rebuilt from the log, and written
        // again when the segment is sealed.
        for stale in [&offset_path, &time_path, &id_path, &key_path] {
            remove_if_exists(stale)?;
        }
        let offset = OffsetIndex::create(&offset_path, base_offset, capacity_entries)
            .map_err(|e| LogError::index(base_offset, e))?;
        let time = TimeIndex::create(&time_path, base_offset, capacity_entries)
            .map_err(|e| LogError::index(base_offset, e))?;
        Ok(SegmentIndexes {
            offset,
            time,
            ids: IdLookup::Active(IdIndexBuilder::new()),
            keys: KeyLookup::Active(KeyIndexBuilder::new()),
            resident: true,
            interval_bytes,
            last_offset_entry_position: 0,
            last_time_entry_end: 0,
            max_timestamp_ms: i64::MIN,
            last_rel_offset: None,
        })
    }

    /// Empty stand-ins for a sealed segment's unloaded indexes (nothing on
    /// disk is touched; `resident` is false).
    fn unloaded(dir: &Path, base_offset: u64, interval_bytes: u32) -> Result<Self> {
        let [offset_path, time_path, _, _] = index_paths(dir, base_offset);
        Ok(SegmentIndexes {
            offset: OffsetIndex::create(&offset_path, base_offset, 0)
                .map_err(|e| LogError::index(base_offset, e))?,
            time: TimeIndex::create(&time_path, base_offset, 0)
                .map_err(|e| LogError::index(base_offset, e))?,
            ids: IdLookup::Active(IdIndexBuilder::new()),
            keys: KeyLookup::Active(KeyIndexBuilder::new()),
            resident: false,
            interval_bytes,
            last_offset_entry_position: 0,
            last_time_entry_end: 0,
            max_timestamp_ms: i64::MIN,
            last_rel_offset: None,
        })
    }

    /// Opens a sealed segment's index files, checking each against the
    /// segment (base offset, data length). Any failure means "rebuild".
    pub(crate) fn open_sealed(
        dir: &Path,
        base_offset: u64,
        segment_bytes: u64,
        interval_bytes: u32,
    ) -> std::result::Result<Self, String> {
        let [offset_path, time_path, id_path, key_path] = index_paths(dir, base_offset);
        let offset =
            OffsetIndex::open_sealed(&offset_path, base_offset).map_err(|e| e.to_string())?;
        let time = TimeIndex::open_sealed(&time_path, base_offset).map_err(|e| e.to_string())?;
        let ids = SealedIdIndex::open(&id_path, base_offset).map_err(|e| e.to_string())?;
        let keys = SealedKeyIndex::open(&key_path, base_offset).map_err(|e| e.to_string())?;
        let lengths = [
            offset.segment_bytes(),
            time.segment_bytes(),
            ids.segment_bytes(),
            keys.segment_bytes(),
        ];
        if lengths.iter().any(|&len| len != segment_bytes) {
            return Err(format!(
                "index describes {lengths:?} bytes, segment has {segment_bytes}"
            ));
        }
        if offset
            .last()
            .is_some_and(|e| u64::from(e.position) >= segment_bytes)
        {
            return Err("offset index points past the segment".into());
        }
        let max_timestamp_ms = time.last().map_or(i64::MIN, |e| e.timestamp_ms);
        let last_rel_offset = time.last().map(|e| e.rel_offset);
        Ok(SegmentIndexes {
            offset,
            time,
            ids: IdLookup::Sealed(ids),
            keys: KeyLookup::Sealed(keys),
            resident: true,
            interval_bytes,
            last_offset_entry_position: 0,
            last_time_entry_end: 0,
            max_timestamp_ms,
            last_rel_offset,
        })
    }

    /// Writes the active indexes as a checkpoint covering the segment's
    /// first `covered_len` bytes (all durable): four files in the sealed
    /// formats, with `segment_bytes = covered_len`. The next open loads
    /// them and scans only what follows (see `Log`'s drop). The indexes
    /// themselves are not changed.
    pub(crate) fn write_checkpoint(
        &self,
        dir: &Path,
        base_offset: u64,
        covered_len: u64,
    ) -> Result<()> {
        let index_error = |e| LogError::index(base_offset, e);
        let [offset_path, time_path, id_path, key_path] = checkpoint_paths(dir, base_offset);
        let (IdLookup::Active(ids), KeyLookup::Active(keys)) = (&self.ids, &self.keys) else {
            return Ok(());
        };
        if !self.resident || self.seal_started() {
            return Ok(());
        }
        let mut offset =
            OffsetIndex::create(&offset_path, base_offset, u32::MAX).map_err(index_error)?;
        for entry in (0..self.offset.len()).filter_map(|i| self.offset.get(i)) {
            offset
                .push(entry.rel_offset, entry.position)
                .map_err(index_error)?;
        }
        offset.seal(covered_len).map_err(index_error)?;
        let mut time = TimeIndex::create(&time_path, base_offset, u32::MAX).map_err(index_error)?;
        for entry in (0..self.time.len()).filter_map(|i| self.time.get(i)) {
            time.push(entry.timestamp_ms, entry.rel_offset)
                .map_err(index_error)?;
        }
        // As at seal: a last entry holds the max timestamp and last offset.
        if let Some(last_rel) = self.last_rel_offset {
            if self.time.last().is_none_or(|e| e.rel_offset < last_rel) {
                let timestamp = self.time.last().map_or(self.max_timestamp_ms, |e| {
                    e.timestamp_ms.max(self.max_timestamp_ms)
                });
                time.push(timestamp, last_rel).map_err(index_error)?;
            }
        }
        time.seal(covered_len).map_err(index_error)?;
        ids.write_sealed(&id_path, base_offset, covered_len)
            .map_err(index_error)?;
        keys.write_sealed(&key_path, base_offset, covered_len)
            .map_err(index_error)?;
        Ok(())
    }

    /// Loads a checkpoint written by [`SegmentIndexes::write_checkpoint`]
    /// as active indexes, with the length it covers; `None` if there is
    /// none or any of its files fails its checks (then the caller scans the
    /// whole segment).
    pub(crate) fn open_checkpoint(
        dir: &Path,
        base_offset: u64,
        capacity_entries: u32,
        interval_bytes: u32,
    ) -> Option<(Self, u64)> {
        let [offset_path, time_path, id_path, key_path] = checkpoint_paths(dir, base_offset);
        let offset = OffsetIndex::open_sealed(&offset_path, base_offset).ok()?;
        let time = TimeIndex::open_sealed(&time_path, base_offset).ok()?;
        let ids = SealedIdIndex::open(&id_path, base_offset).ok()?;
        let keys = SealedKeyIndex::open(&key_path, base_offset).ok()?;
        let covered = offset.segment_bytes();
        let lengths = [
            time.segment_bytes(),
            ids.segment_bytes(),
            keys.segment_bytes(),
        ];
        if covered == 0 || lengths.iter().any(|&len| len != covered) {
            return None;
        }
        let [active_offset_path, active_time_path, _, _] = index_paths(dir, base_offset);
        let mut active = SegmentIndexes {
            offset: OffsetIndex::create(&active_offset_path, base_offset, capacity_entries).ok()?,
            time: TimeIndex::create(&active_time_path, base_offset, capacity_entries).ok()?,
            ids: IdLookup::Active(IdIndexBuilder::new()),
            keys: KeyLookup::Active(KeyIndexBuilder::new()),
            resident: true,
            interval_bytes,
            last_offset_entry_position: offset.last().map_or(0, |e| u64::from(e.position)),
            last_time_entry_end: covered,
            max_timestamp_ms: time.last().map_or(i64::MIN, |e| e.timestamp_ms),
            last_rel_offset: time.last().map(|e| e.rel_offset),
        };
        for entry in (0..offset.len()).filter_map(|i| offset.get(i)) {
            active.offset.push(entry.rel_offset, entry.position).ok()?;
        }
        // The checkpoint's last time entry may be its closing one (the max
        // timestamp, added as at a seal), not spaced an interval from the
        // one before. Kept, it would stay as an active entry, one more per
        // clean restart, until the index (sized for the segment's bytes)
        // was full and an append failed. It is left out: the entries kept
        // are each an interval apart, and `max_timestamp_ms` and
        // `last_rel_offset` above still come from it. Fewer time entries
        // only mean a longer scan in a time lookup, never a wrong answer.
        for entry in (0..time.len().saturating_sub(1)).filter_map(|i| time.get(i)) {
            active
                .time
                .push(entry.timestamp_ms, entry.rel_offset)
                .ok()?;
        }
        if let IdLookup::Active(builder) = &mut active.ids {
            for (id, rel) in ids.iter() {
                builder.insert(id, rel);
            }
        }
        if let KeyLookup::Active(builder) = &mut active.keys {
            for (hash, rel) in keys.iter() {
                builder.insert_hash(hash, rel);
            }
        }
        Some((active, covered))
    }

    /// The offset after the last record the indexes hold.
    pub(crate) fn next_offset(&self, base_offset: u64) -> u64 {
        self.last_rel_offset
            .map_or(base_offset, |rel| base_offset + u64::from(rel) + 1)
    }

    /// Position of the last offset-index entry (0: the segment start).
    pub(crate) fn last_indexed_position(&self) -> u64 {
        self.last_offset_entry_position
    }

    /// Records one batch (already written at `position`) in every index;
    /// `records` yields each record's offset, id and key.
    pub(crate) fn observe<'k>(
        &mut self,
        base_offset: u64,
        position: u64,
        header: &BatchHeader,
        records: impl IntoIterator<Item = (u64, MessageId, Option<&'k [u8]>)>,
    ) -> Result<()> {
        let rel = rel_offset(base_offset, header.base_offset)?;
        let last_rel = rel_offset(base_offset, header.last_offset())?;
        let position_u32 = u32::try_from(position)
            .map_err(|_| LogError::InvalidBatch("segment position past 4 GiB".into()))?;
        let interval = u64::from(self.interval_bytes);
        if position >= self.last_offset_entry_position + interval {
            self.offset
                .push(rel, position_u32)
                .map_err(|e| LogError::index(base_offset, e))?;
            self.last_offset_entry_position = position;
        }
        self.max_timestamp_ms = self.max_timestamp_ms.max(header.max_timestamp_ms);
        self.last_rel_offset = Some(last_rel);
        let end = position + u64::from(header.batch_len);
        let time_grew = self
            .time
            .last()
            .is_none_or(|e| self.max_timestamp_ms > e.timestamp_ms);
        if end >= self.last_time_entry_end + interval && time_grew {
            self.time
                .push(self.max_timestamp_ms, last_rel)
                .map_err(|e| LogError::index(base_offset, e))?;
            self.last_time_entry_end = end;
        }
        for (offset, id, key) in records {
            let record_rel = rel_offset(base_offset, offset)?;
            if let IdLookup::Active(ids) = &mut self.ids {
                ids.insert(id.0, record_rel);
            }
            if let (KeyLookup::Active(keys), Some(key)) = (&mut self.keys, key) {
                keys.insert(key, record_rel);
            }
        }
        Ok(())
    }

    /// Seals every index for a segment of `segment_bytes` bytes: the time
    /// index gets a last entry holding the segment's max timestamp, and the id
    /// and key indexes are written out sorted.
    pub(crate) fn seal(&mut self, dir: &Path, base_offset: u64, segment_bytes: u64) -> Result<()> {
        let index_error = |e| LogError::index(base_offset, e);
        // A seal that failed (disk full) is retried: every step below is
        // skipped once done, and a table whose seal was attempted is never
        // pushed to or sealed again (the index crate asserts against both).
        if let Some(last_rel) = self.last_rel_offset {
            if !self.time.is_sealed() && self.time.last().is_none_or(|e| e.rel_offset < last_rel) {
                let timestamp = self.time.last().map_or(self.max_timestamp_ms, |e| {
                    e.timestamp_ms.max(self.max_timestamp_ms)
                });
                self.time.push(timestamp, last_rel).map_err(index_error)?;
            }
        }
        if !self.offset.is_sealed() {
            self.offset.seal(segment_bytes).map_err(index_error)?;
        }
        if !self.time.is_sealed() {
            self.time.seal(segment_bytes).map_err(index_error)?;
        }
        let [_, _, id_path, key_path] = index_paths(dir, base_offset);
        if let IdLookup::Active(ids) = &self.ids {
            let sealed = ids
                .write_sealed(&id_path, base_offset, segment_bytes)
                .map_err(index_error)?;
            self.ids = IdLookup::Sealed(sealed);
        }
        if let KeyLookup::Active(keys) = &self.keys {
            let sealed = keys
                .write_sealed(&key_path, base_offset, segment_bytes)
                .map_err(index_error)?;
            self.keys = KeyLookup::Sealed(sealed);
        }
        Ok(())
    }

    /// Whether sealing began (it may have failed half-way): no batch may be
    /// added to this segment any more.
    pub(crate) fn seal_started(&self) -> bool {
        self.offset.is_sealed() || self.time.is_sealed()
    }

    fn id_rel_offset(&self, id: &MessageId) -> Option<u32> {
        match &self.ids {
            IdLookup::Active(ids) => ids.get(&id.0),
            IdLookup::Sealed(ids) => ids.get(&id.0),
        }
    }

    fn key_rel_offsets(&self, key: &[u8]) -> Vec<u32> {
        match &self.keys {
            KeyLookup::Active(keys) => keys.get(key),
            KeyLookup::Sealed(keys) => keys.get(key),
        }
    }
}

fn rel_offset(base_offset: u64, offset: u64) -> Result<u32> {
    offset
        .checked_sub(base_offset)
        .and_then(|rel| u32::try_from(rel).ok())
        .ok_or_else(|| LogError::InvalidBatch("more than 4 billion offsets in one segment".into()))
}

/// Scans a segment's mapping and feeds every valid batch to `indexes`.
pub(crate) fn rebuild_indexes(
    map: &SegmentMap,
    base_offset: u64,
    len: u64,
    indexes: &mut SegmentIndexes,
) -> Result<ScanOutcome> {
    rebuild_indexes_from(map, base_offset, (0, base_offset), len, indexes)
}

/// [`rebuild_indexes`] from `start` = (position, offset of the batch that
/// starts there) instead of the segment's start: `indexes` already hold
/// everything before it.
pub(crate) fn rebuild_indexes_from(
    map: &SegmentMap,
    base_offset: u64,
    (start_position, start_offset): (u64, u64),
    len: u64,
    indexes: &mut SegmentIndexes,
) -> Result<ScanOutcome> {
    /// Pages this far behind the scan are released from the resident set.
    const RELEASE_BEHIND_BYTES: u64 = 32 << 20;
    let mut first_error = None;
    let mut released_to = start_position;
    let data = &map.as_slice()[..len as usize];
    let start = start_position as usize;
    let outcome = scan_segment(
        data,
        base_offset,
        start,
        start_offset,
        |position, header| {
            if first_error.is_some() {
                return;
            }
            if position >= released_to + 2 * RELEASE_BEHIND_BYTES {
                let until = position - RELEASE_BEHIND_BYTES;
                map.release_pages(released_to as usize, until as usize);
                released_to = until;
            }
            let end = position + u64::from(header.batch_len);
            let batch =
                RecordBatch::from_verified(*header, map.bytes(position as usize, end as usize));
            let observed = batch
                .records()
                .collect::<std::result::Result<Vec<Record>, _>>()
                .map_err(|e| LogError::InvalidBatch(e.to_string()))
                .and_then(|records| {
                    let entries = records.iter().map(|r| (r.offset, r.id, r.key.as_deref()));
                    indexes.observe(base_offset, position, header, entries)
                });
            if let Err(error) = observed {
                first_error = Some(error);
            }
        },
    );
    match first_error {
        Some(error) => Err(error),
        None => Ok(outcome),
    }
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LogError::io("removing a file", path, e)),
    }
}

/// What a segment maps: its data and its indexes. A sealed segment's is
/// released when the mapped-segments budget evicts it, and loaded again
/// (mapped, verified) by its next read.
#[derive(Debug)]
struct Resident {
    /// The current mapping (replaced when the active segment grows; empty
    /// while a sealed segment is unloaded).
    map: Mutex<SegmentMap>,
    indexes: RwLock<SegmentIndexes>,
    /// Set when the budget evicted this segment while it was being read:
    /// the last reader to let go (an [`IndexesGuard`] dropping) releases
    /// it, so no segment stays mapped without being counted. Cleared when
    /// the budget tracks the segment again.
    evict_pending: AtomicBool,
}

impl Evict for Resident {
    fn evict(&self) {
        // Never blocks: a segment being read keeps what it maps, and its
        // readers release it when they are done.
        let mut indexes = match self.indexes.try_write() {
            Ok(indexes) => indexes,
            Err(_) => {
                self.evict_pending.store(true, Ordering::SeqCst);
                // A reader that let go before seeing the flag left the
                // lock free: take it now. A reader still holding it sees
                // the flag when it lets go.
                match self.indexes.try_write() {
                    Ok(indexes) => {
                        self.evict_pending.store(false, Ordering::SeqCst);
                        indexes
                    }
                    Err(_) => return,
                }
            }
        };
        if indexes.resident {
            let (dir, base_offset) = match &indexes.offset.path().parent() {
                Some(dir) => (dir.to_path_buf(), indexes.offset.base_offset()),
                None => return,
            };
            match SegmentIndexes::unloaded(&dir, base_offset, indexes.interval_bytes) {
                Ok(unloaded) => *indexes = unloaded,
                Err(_) => return,
            }
        }
        drop(indexes);
        // The data may be mapped without the indexes (a read that needed
        // only the data): it is released too, or it would stay mapped and
        // no longer counted.
        *self.map.lock().unwrap_or_else(|p| p.into_inner()) = SegmentMap::empty();
    }
}

/// A read of a segment's indexes. When it ends, it releases the segment
/// if the budget chose to while it was being read.
pub(crate) struct IndexesGuard<'a> {
    guard: Option<RwLockReadGuard<'a, SegmentIndexes>>,
    resident: &'a Resident,
}

impl std::ops::Deref for IndexesGuard<'_> {
    type Target = SegmentIndexes;

    fn deref(&self) -> &SegmentIndexes {
        self.guard
            .as_deref()
            .expect("the guard is held until the IndexesGuard drops")
    }
}

impl Drop for IndexesGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        if self.resident.evict_pending.swap(false, Ordering::SeqCst) {
            self.resident.evict();
        }
    }
}

/// One segment of a partition log.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base_offset: u64,
    pub(crate) file: SegmentFile,
    resident: Arc<Resident>,
    /// Bytes allocated and mapped while active: the length of the mapping.
    capacity: AtomicU64,
    /// Blocks of the sealed segment's files (data and indexes), in bytes;
    /// 0 while active.
    sealed_disk_bytes: AtomicU64,
    visible_len: AtomicU64,
    visible_next_offset: AtomicU64,
    max_timestamp_ms: AtomicI64,
    sealed: AtomicBool,
}

impl Drop for Segment {
    fn drop(&mut self) {
        mapped_segments_budget().forget(self.file.id);
    }
}

impl Segment {
    pub(crate) fn new(
        base_offset: u64,
        file: SegmentFile,
        map: SegmentMap,
        indexes: SegmentIndexes,
        visible_len: u64,
        visible_next_offset: u64,
        sealed: bool,
    ) -> Self {
        assert!(visible_len <= map.len() as u64);
        assert!(visible_next_offset >= base_offset);
        Segment {
            base_offset,
            file,
            capacity: AtomicU64::new(map.len() as u64),
            sealed_disk_bytes: AtomicU64::new(0),
            visible_len: AtomicU64::new(visible_len),
            visible_next_offset: AtomicU64::new(visible_next_offset),
            max_timestamp_ms: AtomicI64::new(indexes.max_timestamp_ms),
            sealed: AtomicBool::new(sealed),
            resident: Arc::new(Resident {
                map: Mutex::new(map),
                indexes: RwLock::new(indexes),
                evict_pending: AtomicBool::new(false),
            }),
        }
    }

    /// Bytes the mapping covers (the active segment's allocated room).
    pub(crate) fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Bytes the segment takes on disk: its allocated room while active;
    /// once sealed, the blocks of its data and index files.
    pub(crate) fn disk_bytes(&self) -> u64 {
        match self.sealed_disk_bytes.load(Ordering::Acquire) {
            0 => self.capacity(),
            sealed => sealed,
        }
    }

    /// Reads the blocks the sealed segment's files hold (called once it is
    /// sealed; a file that cannot be read counts as its length or 0).
    pub(crate) fn note_sealed_disk_bytes(&self, dir: &Path) {
        use std::os::unix::fs::MetadataExt;
        let blocks = |path: &Path| std::fs::metadata(path).map_or(0, |m| m.blocks() * 512);
        let data = blocks(&self.file.path).max(self.visible_len());
        let indexes: u64 = index_paths(dir, self.base_offset)
            .iter()
            .map(|path| blocks(path))
            .sum();
        self.sealed_disk_bytes
            .store((data + indexes).max(1), Ordering::Release);
    }

    /// The current mapping, mapped again if the budget unmapped this sealed
    /// segment. A clone is an `Arc` clone: the views it hands out stay
    /// valid after a growth replaces it or an eviction drops it.
    pub(crate) fn map(&self) -> Result<SegmentMap> {
        let map = {
            let mut current = self.resident.map.lock().unwrap_or_else(|p| p.into_inner());
            let len = self.visible_len();
            if self.is_sealed() && current.len() == 0 && len > 0 {
                let path = &self.file.path;
                let file = std::fs::File::open(path)
                    .map_err(|e| LogError::io("opening a sealed segment", path, e))?;
                *current = SegmentMap::new(&file, len)
                    .map_err(|e| LogError::io("mapping a sealed segment", path, e))?;
            }
            current.clone()
        };
        self.note_used();
        Ok(map)
    }

    /// Marks a sealed segment as just used in the mapped-segments budget
    /// (which may unmap the least recently used others).
    pub(crate) fn note_used(&self) {
        if self.is_sealed() {
            self.resident.evict_pending.store(false, Ordering::SeqCst);
            let resident: Arc<dyn Evict> = self.resident.clone();
            mapped_segments_budget().touch(self.file.id, Arc::downgrade(&resident));
        }
    }

    /// Releases the segment as the budget does when it is among the least
    /// recently used.
    #[cfg(test)]
    pub(crate) fn evict_as_budget(&self) {
        self.resident.evict();
    }

    /// Whether the segment holds its indexes or its data mapped.
    #[cfg(test)]
    pub(crate) fn is_resident(&self) -> bool {
        let indexes = self
            .resident
            .indexes
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let map = self.resident.map.lock().unwrap_or_else(|p| p.into_inner());
        indexes.resident || map.len() > 0
    }

    /// Installs the mapping of the grown file. Only the writer calls it,
    /// after allocating the file to `map.len()` bytes.
    pub(crate) fn grow(&self, map: SegmentMap) {
        let mut current = self.resident.map.lock().unwrap_or_else(|p| p.into_inner());
        assert!(
            map.len() >= current.len(),
            "a segment's mapping never shrinks"
        );
        self.capacity.store(map.len() as u64, Ordering::Release);
        *current = map;
    }

    pub(crate) fn visible_len(&self) -> u64 {
        self.visible_len.load(Ordering::Acquire)
    }

    pub(crate) fn visible_next_offset(&self) -> u64 {
        self.visible_next_offset.load(Ordering::Acquire)
    }

    /// Lets readers see everything up to `len` bytes / `next_offset`.
    /// Callers publish only complete (and, if required, durable) batches.
    pub(crate) fn publish(&self, len: u64, next_offset: u64) {
        assert!(len <= self.capacity());
        self.visible_len.fetch_max(len, Ordering::AcqRel);
        self.visible_next_offset
            .fetch_max(next_offset, Ordering::AcqRel);
    }

    pub(crate) fn max_timestamp_ms(&self) -> i64 {
        self.max_timestamp_ms.load(Ordering::Acquire)
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    pub(crate) fn mark_sealed(&self) {
        self.sealed.store(true, Ordering::Release);
    }

    /// The segment's indexes, loaded (mapped and verified) again if the
    /// budget unloaded this sealed segment; the guard keeps them loaded.
    pub(crate) fn indexes(&self) -> Result<IndexesGuard<'_>> {
        loop {
            let indexes = self
                .resident
                .indexes
                .read()
                .unwrap_or_else(|p| p.into_inner());
            if indexes.resident {
                self.note_used();
                return Ok(IndexesGuard {
                    guard: Some(indexes),
                    resident: &self.resident,
                });
            }
            drop(indexes);
            let mut indexes = self.indexes_mut();
            if !indexes.resident {
                *indexes = self.reload_indexes(indexes.interval_bytes)?;
            }
        }
    }

    /// Whether sealing this (active) segment began: no batch may be added.
    pub(crate) fn seal_started(&self) -> bool {
        self.resident
            .indexes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .seal_started()
    }

    /// The writer's access to the active segment's indexes.
    pub(crate) fn indexes_mut(&self) -> RwLockWriteGuard<'_, SegmentIndexes> {
        self.resident
            .indexes
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A sealed segment's indexes from its files, or rebuilt from its data
    /// (and written again) if they fail their checks.
    fn reload_indexes(&self, interval_bytes: u32) -> Result<SegmentIndexes> {
        let dir = self.file.path.parent().unwrap_or(Path::new("."));
        let len = self.visible_len();
        match SegmentIndexes::open_sealed(dir, self.base_offset, len, interval_bytes) {
            Ok(indexes) => Ok(indexes),
            Err(reason) => {
                tracing::warn!(
                    segment = self.base_offset,
                    %reason,
                    "rebuilding a sealed segment's indexes"
                );
                let capacity =
                    u32::try_from(len / u64::from(interval_bytes) + 2).unwrap_or(u32::MAX);
                let mut indexes =
                    SegmentIndexes::create_active(dir, self.base_offset, capacity, interval_bytes)?;
                let map = self.map()?;
                rebuild_indexes(&map, self.base_offset, len, &mut indexes)?;
                indexes.seal(dir, self.base_offset, len)?;
                Ok(indexes)
            }
        }
    }

    /// Updates the segment's max timestamp after an append.
    pub(crate) fn note_timestamp(&self, timestamp_ms: i64) {
        self.max_timestamp_ms
            .fetch_max(timestamp_ms, Ordering::AcqRel);
    }

    fn corrupt(&self, position: u64, next: Option<u64>, error: BatchError) -> LogError {
        LogError::Corrupt {
            segment_base_offset: self.base_offset,
            position,
            next_readable_offset: next,
            error,
        }
    }

    /// Position to start scanning for `offset`: the greatest indexed batch at
    /// or before it, else the segment start.
    fn start_position(&self, offset: u64) -> Result<u64> {
        let rel = u32::try_from(offset - self.base_offset).unwrap_or(u32::MAX);
        Ok(self
            .indexes()?
            .offset
            .lookup(rel)
            .map_or(0, |entry| u64::from(entry.position)))
    }

    /// The verified batch containing `offset` and its position, found by
    /// walking forward from `position`. Damage on the way is stepped over when
    /// a later valid batch still lies at or before `offset`.
    fn locate(&self, offset: u64, mut position: u64) -> Result<Option<(u64, BatchHeader)>> {
        let visible = self.visible_len() as usize;
        let map = self.map()?;
        let data = &map.as_slice()[..visible];
        loop {
            let at = position as usize;
            if at >= visible {
                let error = BatchError::Malformed("offsets missing from the segment");
                let next = Some(self.visible_next_offset());
                return Err(self.corrupt(position, next, error));
            }
            let error = match verify_batch(&data[at..]) {
                Ok(header) if header.next_offset() <= offset => {
                    position += u64::from(header.batch_len);
                    continue;
                }
                Ok(header) if header.base_offset <= offset => return Ok(Some((position, header))),
                Ok(header) => {
                    let error = BatchError::Malformed("the batch holding the offset is missing");
                    return Err(self.corrupt(position, Some(header.base_offset), error));
                }
                Err(error) => error,
            };
            match find_next_valid_batch(data, at + 1, visible, self.base_offset) {
                Some((next, header)) if header.base_offset <= offset => position = next as u64,
                Some((_, header)) => {
                    return Err(self.corrupt(position, Some(header.base_offset), error))
                }
                None => return Err(self.corrupt(position, None, error)),
            }
        }
    }

    /// Reads whole batches from the one holding `offset`, up to `max_bytes`
    /// (at least one batch), stopping early at damage after the first batch.
    pub(crate) fn read(&self, offset: u64, max_bytes: usize) -> Result<Vec<RecordBatch>> {
        if offset < self.base_offset || offset >= self.visible_next_offset() {
            return Ok(Vec::new());
        }
        let Some((mut position, mut header)) = self.locate(offset, self.start_position(offset)?)?
        else {
            return Ok(Vec::new());
        };
        let visible = self.visible_len();
        let map = self.map()?;
        let mut batches = Vec::new();
        let mut total = 0usize;
        loop {
            let end = position + u64::from(header.batch_len);
            let bytes = map.bytes(position as usize, end as usize);
            let batch = RecordBatch::from_verified(header, bytes);
            total += batch.as_bytes().len();
            let next_offset = header.next_offset();
            batches.push(batch);
            if total >= max_bytes || end >= visible {
                break;
            }
            match verify_batch(&map.as_slice()[end as usize..visible as usize]) {
                Ok(next) if next.base_offset == next_offset => {
                    position = end;
                    header = next;
                }
                // Damage: return what we have; the next read reports it.
                _ => break,
            }
        }
        Ok(batches)
    }

    /// The record at `offset`, if visible.
    pub(crate) fn read_record(&self, offset: u64) -> Result<Option<Record>> {
        let batches = self.read(offset, 1)?;
        let Some(batch) = batches.first() else {
            return Ok(None);
        };
        batch
            .record(offset)
            .transpose()
            .map_err(|e| self.corrupt(0, None, e))
    }

    /// The first visible offset whose timestamp is at least `timestamp_ms`.
    pub(crate) fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>> {
        let start_rel = self
            .indexes()?
            .time
            .last_before(timestamp_ms)
            .map_or(0, |entry| entry.rel_offset.saturating_add(1));
        let mut offset = self.base_offset + u64::from(start_rel);
        let end = self.visible_next_offset();
        while offset < end {
            let batches = self.read(offset, 64 * 1024)?;
            if batches.is_empty() {
                return Ok(None);
            }
            for batch in &batches {
                if batch.header().max_timestamp_ms < timestamp_ms {
                    continue;
                }
                for record in batch.records() {
                    let record = record.map_err(|e| self.corrupt(0, None, e))?;
                    if record.offset >= offset && record.timestamp_ms >= timestamp_ms {
                        return Ok(Some(record.offset));
                    }
                }
            }
            offset = batches
                .last()
                .map_or(end, |batch| batch.header().next_offset());
        }
        Ok(None)
    }

    /// The visible record with this id, checked against the record itself.
    pub(crate) fn find_by_id(&self, id: &MessageId) -> Result<Option<Record>> {
        let Some(rel) = self.indexes()?.id_rel_offset(id) else {
            return Ok(None);
        };
        let record = self.read_record(self.base_offset + u64::from(rel))?;
        Ok(record.filter(|record| record.id == *id))
    }

    /// The offset of the visible record with this id, from the id index
    /// alone: the index is exact (whole ids, rebuilt from the records at
    /// open), so nothing is read or checked. Unlike
    /// [`find_by_id`](Self::find_by_id) it costs no CRC over the batch
    /// holding the record, which for a batch of thousands of records is
    /// thousands of times the record's size.
    pub(crate) fn offset_of_id(&self, id: &MessageId) -> Result<Option<u64>> {
        let Some(rel) = self.indexes()?.id_rel_offset(id) else {
            return Ok(None);
        };
        let offset = self.base_offset + u64::from(rel);
        Ok((offset < self.visible_next_offset()).then_some(offset))
    }

    /// Visible records whose key is `key`, at offset `from` or later, in
    /// offset order, at most `limit`. Candidates below `from` are not read.
    pub(crate) fn find_by_key(&self, key: &[u8], from: u64, limit: usize) -> Result<Vec<Record>> {
        let candidates = self.indexes()?.key_rel_offsets(key);
        let mut found = Vec::new();
        for rel in candidates {
            if found.len() >= limit {
                break;
            }
            if self.base_offset + u64::from(rel) < from {
                continue;
            }
            if let Some(record) = self.read_record(self.base_offset + u64::from(rel))? {
                if record.key.as_deref() == Some(key) {
                    found.push(record);
                }
            }
        }
        Ok(found)
    }
}
