//! The process-wide budgets of open files and of mapped sealed segments:
//! what many quiet partitions would otherwise hold for nothing.
//!
//! **Open files.** Segment files being appended to and the dispatcher's
//! journals hold a descriptor only while they are in use, at most
//! [`set_max_open_files`] of them at once. A [`CachedFile`] is a path plus,
//! maybe, an open descriptor: [`CachedFile::get`] returns the descriptor,
//! opening the file again if it was closed, and marks it as the most
//! recently used; when more than the maximum are open, the least recently
//! used ones are closed. A thousand quiet partitions cost no descriptors,
//! and a busy one keeps its descriptor.
//!
//! **Mapped sealed segments.** A sealed segment's data and index files are
//! mapped while it is read and unmapped when it is among the least recently
//! used beyond [`set_max_mapped_segments`] (`crate::segment`); the next read
//! maps and verifies them again. The active segment is always mapped.
//!
//! Invariants:
//! - Each budget tracks at most its maximum entries. Eviction never blocks:
//!   a segment being read when it is chosen stays mapped until that read
//!   ends, and the read's end releases it (unless it was used again since),
//!   so the maximum is passed only while such reads last.
//! - An operation in flight keeps its own `Arc<File>` or mapping until it
//!   ends, so nothing is closed or unmapped under a running write, fsync or
//!   read.
//! - Closing a descriptor loses nothing: written bytes are in the page
//!   cache, and an `fdatasync` through a descriptor opened later flushes
//!   them (Linux tracks writeback errors per file and reports an error no
//!   descriptor has seen to the next opener).
//! - Lock order: an entry's own locks are never held while a budget's lock
//!   is taken, except a segment's index read guard, and eviction only
//!   try-locks indexes; the budget's lock is released before evicting.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Files held open at most, unless [`set_max_open_files`] says otherwise.
pub const DEFAULT_MAX_OPEN_FILES: usize = 4096;
/// Sealed segments mapped at most, unless [`set_max_mapped_segments`] says
/// otherwise. A mapped sealed segment takes up to five mappings (data and
/// four indexes); Linux allows 65,530 per process by default
/// (`vm.max_map_count`).
pub const DEFAULT_MAX_MAPPED_SEGMENTS: usize = 8192;

/// Something a budget can release when it is among the least recently used.
pub(crate) trait Evict: Send + Sync {
    /// Releases what the entry holds, unless it is in use (never blocks).
    fn evict(&self);
}

/// How a [`CachedFile`] is opened again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read and write at positions (segment files).
    ReadWrite,
    /// Appends at the end (journals).
    Append,
}

type Slot = Mutex<Option<Arc<File>>>;

impl Evict for Slot {
    fn evict(&self) {
        lock(self).take();
    }
}

/// A file that holds a descriptor only while it is in use (see the module
/// documentation). Clones share the descriptor.
#[derive(Debug, Clone)]
pub struct CachedFile {
    id: u64,
    path: PathBuf,
    mode: OpenMode,
    slot: Arc<Slot>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl CachedFile {
    /// Takes over `file`, already open at `path` in `mode`.
    pub fn new(file: File, path: PathBuf, mode: OpenMode) -> CachedFile {
        let cached = CachedFile::closed(path, mode);
        *lock(&cached.slot) = Some(Arc::new(file));
        cached.touch();
        cached
    }

    /// A file at `path` that is opened on its first [`CachedFile::get`].
    pub fn closed(path: PathBuf, mode: OpenMode) -> CachedFile {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        CachedFile {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            path,
            mode,
            slot: Arc::new(Mutex::new(None)),
        }
    }

    /// Unique in this process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open descriptor, opening the file again if the cache closed it.
    pub fn get(&self) -> io::Result<Arc<File>> {
        let open = lock(&self.slot).clone();
        let file = match open {
            Some(file) => file,
            None => {
                let file = Arc::new(match self.mode {
                    OpenMode::ReadWrite => {
                        File::options().read(true).write(true).open(&self.path)?
                    }
                    OpenMode::Append => File::options().append(true).open(&self.path)?,
                });
                Arc::clone(lock(&self.slot).get_or_insert(file))
            }
        };
        self.touch();
        Ok(file)
    }

    /// Replaces the descriptor (the file at the path was replaced).
    pub fn replace(&self, file: File) {
        *lock(&self.slot) = Some(Arc::new(file));
        self.touch();
    }

    /// Closes the descriptor now (the file will not be written again for a
    /// while, or ever); a later `get` opens it again.
    pub fn close(&self) {
        lock(&self.slot).take();
        files().forget(self.id);
    }

    fn touch(&self) {
        let slot: Arc<dyn Evict> = self.slot.clone();
        files().touch(self.id, Arc::downgrade(&slot));
    }
}

impl Drop for CachedFile {
    fn drop(&mut self) {
        // The last clone: the descriptor closes with the slot.
        if Arc::strong_count(&self.slot) == 1 {
            files().forget(self.id);
        }
    }
}

/// One budget: a maximum and the entries by last use.
pub(crate) struct Budget {
    max: AtomicUsize,
    lru: Mutex<Lru>,
}

impl Budget {
    const fn new(max: usize) -> Budget {
        Budget {
            max: AtomicUsize::new(max),
            lru: Mutex::new(Lru {
                next_tick: 0,
                by_tick: BTreeMap::new(),
                by_id: None,
            }),
        }
    }

    fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Marks `id` as just used, and evicts the least recently used entries
    /// beyond the maximum (never `id`).
    pub(crate) fn touch(&self, id: u64, entry: Weak<dyn Evict>) {
        let evicted = lock(&self.lru).touch(id, entry, self.max());
        for entry in evicted {
            if let Some(entry) = entry.upgrade() {
                entry.evict();
            }
        }
    }

    /// Stops tracking `id` (released or gone).
    pub(crate) fn forget(&self, id: u64) {
        lock(&self.lru).forget(id);
    }

    fn len(&self) -> usize {
        lock(&self.lru).by_id.as_ref().map_or(0, HashMap::len)
    }
}

/// An entry's last use and what to evict.
type Tracked = (u64, Weak<dyn Evict>);

/// Entries by last use.
#[derive(Default)]
struct Lru {
    next_tick: u64,
    by_tick: BTreeMap<u64, u64>,
    /// `None` until first used (lets the budgets be `static`).
    by_id: Option<HashMap<u64, Tracked>>,
}

impl Lru {
    /// Marks `id` as just used; returns the entries to evict to stay within
    /// `max` (never `id`'s own).
    fn touch(&mut self, id: u64, entry: Weak<dyn Evict>, max: usize) -> Vec<Weak<dyn Evict>> {
        self.next_tick += 1;
        let tick = self.next_tick;
        let by_id = self.by_id.get_or_insert_with(HashMap::new);
        if let Some((old, _)) = by_id.insert(id, (tick, entry)) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(tick, id);
        let mut evicted = Vec::new();
        while by_id.len() > max.max(1) {
            let Some((_, oldest)) = self.by_tick.pop_first() else {
                break;
            };
            if let Some((_, entry)) = by_id.remove(&oldest) {
                evicted.push(entry);
            }
        }
        evicted
    }

    fn forget(&mut self, id: u64) {
        if let Some((tick, _)) = self.by_id.as_mut().and_then(|by_id| by_id.remove(&id)) {
            self.by_tick.remove(&tick);
        }
    }
}

static FILES: Budget = Budget::new(DEFAULT_MAX_OPEN_FILES);
static MAPPED_SEGMENTS: Budget = Budget::new(DEFAULT_MAX_MAPPED_SEGMENTS);

fn files() -> &'static Budget {
    &FILES
}

/// The budget of mapped sealed segments (`crate::segment`).
pub(crate) fn mapped_segments_budget() -> &'static Budget {
    &MAPPED_SEGMENTS
}

/// Sets how many files are kept open at most (at least 1). Takes effect at
/// the next use of a file.
pub fn set_max_open_files(max: usize) {
    FILES.max.store(max.max(1), Ordering::Relaxed);
}

/// The current maximum of open files.
pub fn max_open_files() -> usize {
    FILES.max()
}

/// Files held open now.
pub fn open_files() -> usize {
    FILES.len()
}

/// Sets how many sealed segments are kept mapped at most (at least 1).
/// Takes effect at the next read of a sealed segment.
pub fn set_max_mapped_segments(max: usize) {
    MAPPED_SEGMENTS.max.store(max.max(1), Ordering::Relaxed);
}

/// Sealed segments mapped now.
pub fn mapped_segments() -> usize {
    MAPPED_SEGMENTS.len()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_entries_are_evicted() {
        let mut lru = Lru::default();
        let slots: Vec<Arc<dyn Evict>> = (0..4)
            .map(|_| Arc::new(Mutex::new(None::<Arc<File>>)) as Arc<dyn Evict>)
            .collect();
        for (id, slot) in slots.iter().enumerate() {
            let evicted = lru.touch(id as u64, Arc::downgrade(slot), 3);
            assert_eq!(evicted.len(), usize::from(id == 3), "at {id}");
        }
        let by_id = |lru: &Lru| lru.by_id.as_ref().map_or(0, HashMap::len);
        // 0 was the oldest; touching 1 makes 2 the oldest.
        assert!(!lru.by_id.as_ref().is_some_and(|m| m.contains_key(&0)));
        lru.touch(1, Arc::downgrade(&slots[1]), 3);
        let evicted = lru.touch(0, Arc::downgrade(&slots[0]), 3);
        assert_eq!(evicted.len(), 1);
        assert!(Weak::ptr_eq(&evicted[0], &Arc::downgrade(&slots[2])));
        lru.forget(1);
        assert_eq!(by_id(&lru), 2);
        assert_eq!(lru.by_tick.len(), 2);
    }

    #[test]
    fn a_closed_file_reads_and_writes_the_same_after_reopening() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let cached = CachedFile::new(file, path.clone(), OpenMode::ReadWrite);
        cached.get().unwrap().write_all_at(b"hello", 0).unwrap();
        let in_flight = cached.get().unwrap();
        cached.close();
        // An operation in flight keeps its descriptor.
        in_flight.write_all_at(b"!", 5).unwrap();
        cached.get().unwrap().write_all_at(b"?", 6).unwrap();
        cached.get().unwrap().sync_data().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello!?");
        let journal = CachedFile::closed(path.clone(), OpenMode::Append);
        use std::io::Write;
        (&*journal.get().unwrap()).write_all(b"+").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello!?+");
    }
}
