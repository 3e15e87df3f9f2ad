//! The io_uring append backend: segment writes and fdatasyncs submitted to an
//! io_uring (tokio-uring) owned by one dedicated thread, `dmq-io-uring`.
//!
//! # What it owns
//! - The ring thread: a single-threaded tokio-uring runtime that receives
//!   requests from synchronous callers over a channel and runs each one as
//!   its own task, so several operations are in flight on the ring at once (a
//!   group-commit fdatasync overlaps the next append's write: that overlap is
//!   the point of this backend). Every caller blocks on its own reply.
//! - One ring-side `tokio_uring::fs::File` per segment, made from a
//!   `try_clone` (dup) of the segment's std file the first time a write names
//!   the segment's id, cached by id and dropped on `release`.
//! - A process-wide ring: every [`UringIo`] started while another is alive
//!   shares its thread. When the last one is dropped the request channel
//!   closes, the thread's loop ends and the thread is joined.
//!
//! # Why a separate thread
//! tokio-uring's runtime and files are `!Send` and live on the thread that
//! created the ring, while the log calls its backend synchronously from any
//! thread (appenders, the group-commit leader, the flusher), possibly inside
//! another async runtime. One owner thread turns that into message passing.
//!
//! # Invariants
//! - A write returns only after every byte reached the file (tokio-uring's
//!   `write_all_at` loops on short writes), or with the ring's error.
//! - `sync_data` returns only after an `IORING_OP_FSYNC` with
//!   `IORING_FSYNC_DATASYNC` completed successfully, submitted after every
//!   write that returned before `sync_data` was called.
//! - Errors from the kernel come back as the `io::Error` the ring produced,
//!   unchanged (the log maps ENOSPC to `DiskFull`, fails on fsync errors).
//! - A request never hangs on a dead ring: if the thread or a task ends
//!   without replying, the reply channel closes and the caller gets an error.
//! - The cache holds only files whose segment is alive: entries whose std
//!   file was dropped (a log closed without `release`) are pruned whenever a
//!   new segment registers. A `sync_data` for an id not in the cache (after
//!   `release`) syncs through a one-shot clone that is not cached.
//! - [`UringIo::start`] returns `Err` (never panics, never hangs past
//!   [`START_TIMEOUT`]) when a ring can't be created or can't run a no-op and
//!   a write, e.g. EPERM under seccomp or `kernel.io_uring_disabled`, ENOSYS
//!   on old kernels, EINVAL where `IORING_OP_WRITE` is missing (< 5.6).
//!
//! Dependency added for this module: `tokio` (features `sync`, `time`, already
//! in the tree through tokio-uring) for the request channel into the runtime
//! and the probe's timeout.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::IoBackend;
use crate::io::{AppendIo, SegmentFile};

/// How long the ring thread may take to create its ring and run the probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`UringIo::start`] waits for the ring thread's verdict.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// Submission queue entries. Callers block on their request, so requests in
/// flight are bounded by the number of appending threads; tokio-uring submits
/// and retries when the queue is full.
const RING_ENTRIES: u32 = 256;

/// The ring shared by every live [`UringIo`] in the process.
static SHARED_RING: Mutex<Weak<Ring>> = Mutex::new(Weak::new());

/// The io_uring append backend. Cheap to start while another is alive: they
/// share one ring thread.
#[derive(Debug)]
pub(crate) struct UringIo {
    ring: Arc<Ring>,
}

impl UringIo {
    /// Joins the process's ring, starting its thread if none is running.
    /// `Err` where io_uring can't be used here; never panics.
    pub(crate) fn start() -> io::Result<UringIo> {
        let mut shared = SHARED_RING.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(ring) = shared.upgrade() {
            if !ring.requests.is_closed() {
                return Ok(UringIo { ring });
            }
        }
        let ring = Arc::new(Ring::spawn()?);
        *shared = Arc::downgrade(&ring);
        Ok(UringIo { ring })
    }
}

impl AppendIo for UringIo {
    fn write_all_at(
        &self,
        file: &SegmentFile,
        position: u64,
        data: Vec<u8>,
    ) -> io::Result<Vec<u8>> {
        let (reply, replied) = std_mpsc::sync_channel(1);
        self.ring.send(Request::Write {
            id: file.id,
            file: file.file()?,
            position,
            data,
            reply,
        })?;
        replied.recv().map_err(|_| ring_stopped())?
    }

    fn sync_data(&self, file: &SegmentFile) -> io::Result<()> {
        let (reply, replied) = std_mpsc::sync_channel(1);
        self.ring.send(Request::Sync {
            id: file.id,
            file: file.file()?,
            reply,
        })?;
        replied.recv().map_err(|_| ring_stopped())?
    }

    fn release(&self, file: &SegmentFile) {
        // Best effort: if the ring is gone its cache is gone with it.
        let _ = self.ring.send(Request::Release { id: file.id });
    }

    fn kind(&self) -> IoBackend {
        IoBackend::IoUring
    }
}

fn ring_stopped() -> io::Error {
    io::Error::other("the io_uring thread stopped before completing the request")
}

/// One request from a synchronous caller to the ring thread.
enum Request {
    Write {
        id: u64,
        file: Arc<File>,
        position: u64,
        data: Vec<u8>,
        reply: std_mpsc::SyncSender<io::Result<Vec<u8>>>,
    },
    Sync {
        id: u64,
        file: Arc<File>,
        reply: std_mpsc::SyncSender<io::Result<()>>,
    },
    Release {
        id: u64,
    },
}

/// The handle on the ring thread: its request channel and its join handle.
struct Ring {
    requests: mpsc::UnboundedSender<Request>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("closed", &self.requests.is_closed())
            .finish_non_exhaustive()
    }
}

impl Ring {
    /// Starts the ring thread and waits for it to report whether a ring could
    /// be created and used.
    fn spawn() -> io::Result<Ring> {
        let (requests, received) = mpsc::unbounded_channel();
        let (ready, verdict) = std_mpsc::sync_channel::<io::Result<()>>(1);
        let thread = std::thread::Builder::new()
            .name("dmq-io-uring".into())
            .spawn(move || ring_thread(received, ready))?;
        match verdict.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok(Ring {
                requests,
                thread: Some(thread),
            }),
            Ok(Err(error)) => {
                let _ = thread.join();
                Err(error)
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
                Err(io::Error::other("the io_uring thread ended during setup"))
            }
            // The thread is stuck in the kernel: detach it. It exits when its
            // verdict can't be delivered (the receiver is gone).
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "io_uring setup did not finish in time",
            )),
        }
    }

    fn send(&self, request: Request) -> io::Result<()> {
        self.requests.send(request).map_err(|_| ring_stopped())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Close the channel: the thread's loop ends once it drains it. No
        // request can be waiting for a reply (callers borrow a `UringIo`).
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.requests, closed));
        if let Some(thread) = self.thread.take() {
            if std::thread::current().id() != thread.thread().id() {
                let _ = thread.join();
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// The body of `dmq-io-uring`: create the ring, probe it, report, serve.
fn ring_thread(
    requests: mpsc::UnboundedReceiver<Request>,
    ready: std_mpsc::SyncSender<io::Result<()>>,
) {
    let created = catch_unwind(|| {
        let mut builder = tokio_uring::builder();
        builder.entries(RING_ENTRIES);
        tokio_uring::Runtime::new(&builder)
    });
    let runtime = match created {
        Ok(Ok(runtime)) => runtime,
        Ok(Err(error)) => {
            let _ = ready.send(Err(error));
            return;
        }
        Err(panic) => {
            let _ = ready.send(Err(io::Error::other(format!(
                "creating the io_uring runtime panicked: {}",
                panic_message(panic.as_ref())
            ))));
            return;
        }
    };
    let probed = catch_unwind(AssertUnwindSafe(|| runtime.block_on(probe())));
    let verdict = match probed {
        Ok(result) => result,
        Err(panic) => Err(io::Error::other(format!(
            "probing io_uring panicked: {}",
            panic_message(panic.as_ref())
        ))),
    };
    let usable = verdict.is_ok();
    if ready.send(verdict).is_err() || !usable {
        return;
    }
    runtime.block_on(serve(requests));
}

/// Runs a no-op and a one-byte write (to /dev/null) through the ring, so a
/// ring that can be created but not entered, or lacks `IORING_OP_WRITE`, is
/// rejected here rather than failing the first append.
async fn probe() -> io::Result<()> {
    let ops = async {
        tokio_uring::no_op().await?;
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            let null = tokio_uring::fs::File::from_std(null);
            let (result, _) = null.write_all_at(vec![0u8], 0).await;
            result?;
        }
        Ok(())
    };
    match tokio::time::timeout(PROBE_TIMEOUT, ops).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "io_uring operations did not complete",
        )),
    }
}

/// A cached ring-side file and the segment file it was cloned from.
struct Registered {
    file: Rc<tokio_uring::fs::File>,
    owner: Weak<File>,
}

/// The ring thread's files, by `SegmentFile` id.
#[derive(Default)]
struct Files {
    by_id: HashMap<u64, Registered>,
}

impl Files {
    /// The cached ring file for `id`, registering a clone of `file` if new.
    fn register(&mut self, id: u64, file: &Arc<File>) -> io::Result<Rc<tokio_uring::fs::File>> {
        if let Some(registered) = self.by_id.get(&id) {
            return Ok(Rc::clone(&registered.file));
        }
        // Forget segments that were dropped without a release.
        self.by_id
            .retain(|_, registered| registered.owner.strong_count() > 0);
        let ring_file = Rc::new(tokio_uring::fs::File::from_std(file.try_clone()?));
        self.by_id.insert(
            id,
            Registered {
                file: Rc::clone(&ring_file),
                owner: Arc::downgrade(file),
            },
        );
        Ok(ring_file)
    }

    /// The cached ring file for `id`, or a one-shot clone of `file`.
    fn get_or_clone(&self, id: u64, file: &File) -> io::Result<Rc<tokio_uring::fs::File>> {
        match self.by_id.get(&id) {
            Some(registered) => Ok(Rc::clone(&registered.file)),
            None => Ok(Rc::new(tokio_uring::fs::File::from_std(file.try_clone()?))),
        }
    }
}

/// Serves requests until every sender is gone, one task per request.
async fn serve(mut requests: mpsc::UnboundedReceiver<Request>) {
    let files = RefCell::new(Files::default());
    while let Some(request) = requests.recv().await {
        match request {
            Request::Write {
                id,
                file,
                position,
                data,
                reply,
            } => match files.borrow_mut().register(id, &file) {
                Ok(ring_file) => {
                    tokio_uring::spawn(async move {
                        let (result, data) = ring_file.write_all_at(data, position).await;
                        let _ = reply.send(result.map(|()| data));
                    });
                }
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
            },
            Request::Sync { id, file, reply } => match files.borrow().get_or_clone(id, &file) {
                Ok(ring_file) => {
                    tokio_uring::spawn(async move {
                        let _ = reply.send(ring_file.sync_data().await);
                    });
                }
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
            },
            Request::Release { id } => {
                // In-flight tasks keep their own `Rc`; the fd closes after them.
                files.borrow_mut().by_id.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::path::Path;
    use std::time::Instant;

    fn segment(path: &Path) -> SegmentFile {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .expect("open temp file");
        SegmentFile::new(file, path.to_path_buf())
    }

    fn read_all(file: &SegmentFile, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        file.file()
            .expect("open")
            .read_exact_at(&mut buf, 0)
            .expect("read back");
        buf
    }

    #[test]
    fn start_succeeds_here_and_reports_io_uring() {
        let io = UringIo::start().expect("io_uring is available on this machine");
        assert_eq!(io.kind(), IoBackend::IoUring);
        let again = UringIo::start().expect("second start");
        assert!(
            Arc::ptr_eq(&io.ring, &again.ring),
            "live backends share one ring"
        );
    }

    #[test]
    fn write_and_sync_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = segment(&dir.path().join("a.log"));
        let io = UringIo::start().expect("start");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let returned = io.write_all_at(&file, 0, data.clone()).expect("write at 0");
        assert_eq!(returned, data, "the buffer comes back unchanged");
        let returned = io
            .write_all_at(&file, 10_000, b"tail".to_vec())
            .expect("write at 10000");
        assert_eq!(returned, b"tail");
        io.sync_data(&file).expect("sync_data");
        let on_disk = read_all(&file, 10_004);
        assert_eq!(&on_disk[..10_000], &data[..]);
        assert_eq!(&on_disk[10_000..], b"tail");
    }

    #[test]
    fn release_then_sync_and_write_still_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = segment(&dir.path().join("r.log"));
        let io = UringIo::start().expect("start");
        io.write_all_at(&file, 0, b"sealed".to_vec())
            .expect("write");
        io.release(&file);
        io.sync_data(&file).expect("sync after release");
        io.write_all_at(&file, 6, b"!".to_vec())
            .expect("write after release");
        io.release(&file);
        io.release(&file);
        assert_eq!(read_all(&file, 7), b"sealed!");
    }

    #[test]
    fn ring_errors_come_back_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ro.log");
        std::fs::write(&path, b"x").expect("create");
        let read_only = File::open(&path).expect("open read-only");
        let file = SegmentFile::new(read_only, path);
        let io = UringIo::start().expect("start");
        let error = io
            .write_all_at(&file, 0, b"nope".to_vec())
            .expect_err("writing a read-only fd fails");
        assert_eq!(error.raw_os_error(), Some(libc::EBADF), "{error:?}");
    }

    #[test]
    fn concurrent_writers_and_syncs_from_several_threads() {
        const THREADS: u64 = 4;
        const WRITES: u64 = 64;
        const LEN: u64 = 512;
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = segment(&dir.path().join("shared.log"));
        let io = Arc::new(UringIo::start().expect("start"));
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let io = Arc::clone(&io);
                let shared = shared.clone();
                let own = segment(&dir.path().join(format!("own-{t}.log")));
                scope.spawn(move || {
                    let mut buffer = Vec::new();
                    for i in 0..WRITES {
                        buffer.clear();
                        buffer.resize(LEN as usize, (t * WRITES + i) as u8);
                        let slot = (i * THREADS + t) * LEN;
                        buffer = io.write_all_at(&shared, slot, buffer).expect("write");
                        buffer = io.write_all_at(&own, i * LEN, buffer).expect("write");
                        if i % 8 == t {
                            io.sync_data(&shared).expect("sync shared");
                            io.sync_data(&own).expect("sync own");
                        }
                    }
                    io.sync_data(&own).expect("final sync");
                    let on_disk = read_all(&own, (WRITES * LEN) as usize);
                    for i in 0..WRITES {
                        let chunk = &on_disk[(i * LEN) as usize..((i + 1) * LEN) as usize];
                        assert!(chunk.iter().all(|&b| b == (t * WRITES + i) as u8));
                    }
                    io.release(&own);
                });
            }
        });
        io.sync_data(&shared).expect("final sync");
        let on_disk = read_all(&shared, (THREADS * WRITES * LEN) as usize);
        for t in 0..THREADS {
            for i in 0..WRITES {
                let slot = ((i * THREADS + t) * LEN) as usize;
                let chunk = &on_disk[slot..slot + LEN as usize];
                assert!(
                    chunk.iter().all(|&b| b == (t * WRITES + i) as u8),
                    "thread {t} write {i}"
                );
            }
        }
    }

    #[test]
    fn a_private_ring_thread_ends_when_dropped() {
        let ring = Ring::spawn().expect("spawn");
        let thread = ring
            .thread
            .as_ref()
            .map(|t| t.thread().id())
            .expect("thread handle");
        assert_ne!(thread, std::thread::current().id());
        let io = UringIo {
            ring: Arc::new(ring),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let file = segment(&dir.path().join("d.log"));
        io.write_all_at(&file, 0, b"bye".to_vec()).expect("write");
        let started = Instant::now();
        drop(io); // joins the thread: returns only once it has ended
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    /// Informal: one write + fdatasync through the ring vs pwrite + fdatasync.
    #[test]
    fn informal_latency_of_write_and_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = segment(&dir.path().join("lat.log"));
        let io = UringIo::start().expect("start");
        let portable = crate::io::PortableIo;
        let rounds = 50u32;
        let mut buffer = vec![7u8; 1024];
        let time = |io: &dyn AppendIo, buffer: &mut Vec<u8>, base: u64| {
            let started = Instant::now();
            for i in 0..u64::from(rounds) {
                *buffer = io
                    .write_all_at(&file, base + i * 1024, std::mem::take(buffer))
                    .expect("write");
                io.sync_data(&file).expect("sync");
            }
            started.elapsed() / rounds
        };
        let uring = time(&io, &mut buffer, 0);
        let pwrite = time(&portable, &mut buffer, 1 << 20);
        eprintln!("append+fdatasync: io_uring {uring:?}, portable {pwrite:?}");
    }
}
