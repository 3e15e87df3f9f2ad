//! The process-wide budget of open files: segment files being appended to
//! and the dispatcher's journals hold a descriptor only while they are in
//! use, at most [`set_max_open_files`] of them at once.
//!
//! A [`CachedFile`] is a path plus, maybe, an open descriptor. [`CachedFile::get`]
//! returns the descriptor, opening the file again if it was closed, and
//! marks it as the most recently used; when more than the maximum are open,
//! the least recently used ones are closed. A thousand quiet partitions
//! therefore cost no descriptors, and a busy one keeps its descriptor.
//!
//! Invariants:
//! - At most the maximum descriptors are held by the cache; an operation in
//!   flight keeps its own `Arc<File>` until it ends, so a descriptor closed
//!   by the cache is never closed under a running write or fsync.
//! - Closing a descriptor loses nothing: written bytes are in the page
//!   cache, and an `fdatasync` through a descriptor opened later flushes
//!   them (Linux tracks writeback errors per file and reports an error no
//!   descriptor has seen to the next opener).
//! - Lock order: a file's slot lock is never held while the cache's lock is
//!   taken, and the cache's lock is never held while a slot's is taken.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

/// Files held open at most, unless [`set_max_open_files`] says otherwise.
pub const DEFAULT_MAX_OPEN_FILES: usize = 4096;

/// How a [`CachedFile`] is opened again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read and write at positions (segment files).
    ReadWrite,
    /// Appends at the end (journals).
    Append,
}

type Slot = Mutex<Option<Arc<File>>>;

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
        lock(&cache().lru).forget(self.id);
    }

    fn touch(&self) {
        let evicted = lock(&cache().lru).touch(self.id, Arc::downgrade(&self.slot), cache().max());
        for slot in evicted {
            if let Some(slot) = slot.upgrade() {
                lock(&slot).take();
            }
        }
    }
}

impl Drop for CachedFile {
    fn drop(&mut self) {
        // The last clone: the descriptor closes with the slot.
        if Arc::strong_count(&self.slot) == 1 {
            lock(&cache().lru).forget(self.id);
        }
    }
}

#[derive(Debug)]
struct Cache {
    max: AtomicUsize,
    lru: Mutex<Lru>,
}

impl Cache {
    fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }
}

/// Open files by last use.
#[derive(Debug, Default)]
struct Lru {
    next_tick: u64,
    by_tick: BTreeMap<u64, u64>,
    by_id: HashMap<u64, (u64, Weak<Slot>)>,
}

impl Lru {
    /// Marks `id` as just used; returns the slots to close to stay within
    /// `max` (never `id`'s own).
    fn touch(&mut self, id: u64, slot: Weak<Slot>, max: usize) -> Vec<Weak<Slot>> {
        self.next_tick += 1;
        let tick = self.next_tick;
        if let Some((old, _)) = self.by_id.insert(id, (tick, slot)) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(tick, id);
        let mut evicted = Vec::new();
        while self.by_id.len() > max.max(1) {
            let Some((_, oldest)) = self.by_tick.pop_first() else {
                break;
            };
            if let Some((_, slot)) = self.by_id.remove(&oldest) {
                evicted.push(slot);
            }
        }
        evicted
    }

    fn forget(&mut self, id: u64) {
        if let Some((tick, _)) = self.by_id.remove(&id) {
            self.by_tick.remove(&tick);
        }
    }
}

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Cache {
        max: AtomicUsize::new(DEFAULT_MAX_OPEN_FILES),
        lru: Mutex::new(Lru::default()),
    })
}

/// Sets how many files the cache keeps open at most (at least 1). Takes
/// effect at the next use of a file.
pub fn set_max_open_files(max: usize) {
    cache().max.store(max.max(1), Ordering::Relaxed);
}

/// The current maximum.
pub fn max_open_files() -> usize {
    cache().max()
}

/// Files the cache holds open now.
pub fn open_files() -> usize {
    lock(&cache().lru).by_id.len()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_files_are_closed_and_reopened_on_use() {
        let mut lru = Lru::default();
        let slots: Vec<Arc<Slot>> = (0..4).map(|_| Arc::new(Mutex::new(None))).collect();
        for (id, slot) in slots.iter().enumerate() {
            let evicted = lru.touch(id as u64, Arc::downgrade(slot), 3);
            assert_eq!(evicted.len(), usize::from(id == 3), "at {id}");
        }
        // 0 was the oldest; touching 1 makes 2 the oldest.
        assert!(!lru.by_id.contains_key(&0));
        lru.touch(1, Arc::downgrade(&slots[1]), 3);
        let evicted = lru.touch(0, Arc::downgrade(&slots[0]), 3);
        assert_eq!(evicted.len(), 1);
        assert!(Weak::ptr_eq(&evicted[0], &Arc::downgrade(&slots[2])));
        lru.forget(1);
        assert_eq!(lru.by_id.len(), 2);
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
