//! The log itself: appends into DMA buffers, one group-commit task, reads, truncation, purge.
//!
//! Everything runs on one glommio executor (the WAL is `!Send`). `append` copies the payload
//! once, into the open group-commit buffer, and returns; the *syncer* task writes whole buffers
//! with O_DIRECT and makes them durable with one fdatasync per round, however many records the
//! round holds (group commit: appends that arrive while a sync is in flight wait in the next
//! buffer). `durable(index)` resolves when, and only when, that record is on disk.
//!
//! O_DIRECT writes whole 4096-byte blocks, so a buffer starts at the block holding the end of the
//! previous one and carries that block's bytes (the *tail carry*); the rewrite puts back the same
//! bytes, so a torn rewrite cannot damage records that were already durable.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Poll, Waker};

use futures_lite::future::{poll_fn, FutureExt};
use glommio::io::{Directory, DmaBuffer, DmaFile, OpenOptions, ReadResult};

use crate::error::WalError;
use crate::failpoint::{self, points};
use crate::options::{SyncMode, WalOptions};
use crate::record::{self, RecordCheck, HEADER_BYTES};
use crate::recovery::{self, SegmentScan, Verdict};
use crate::segment::{self, SegmentHeader, BLOCK_BYTES};

const BLOCK: u64 = BLOCK_BYTES as u64;

fn align_down(v: u64) -> u64 {
    v - v % BLOCK
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(BLOCK) * BLOCK
}

/// Counters for benchmarks and status pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Records appended since open.
    pub appends: u64,
    /// Payload bytes appended since open.
    pub payload_bytes: u64,
    /// Rounds the group commit made durable: one fdatasync each ([`SyncMode::Fdatasync`]), or
    /// writes that completed durable ([`SyncMode::Dsync`]).
    pub syncs: u64,
    /// DMA writes issued by the group commit.
    pub writes: u64,
    /// Bytes written by those writes (block-rounded, tail rewrites included).
    pub written_bytes: u64,
    /// Segments created since open (from spares or not).
    pub segments_created: u64,
    /// Of those, segments that were spares (written files: their writes overwrite blocks).
    pub segments_from_spares: u64,
    /// Zero-filled spares written by the background task since open.
    pub spares_written: u64,
    /// Purged segments kept as spares since open.
    pub spares_recycled: u64,
    /// Reads of written records served from a recently written buffer kept in memory.
    pub reads_from_memory: u64,
    /// Reads that went to a segment file.
    pub reads_from_file: u64,
}

/// What `Wal::open` found and repaired.
#[derive(Clone, Debug)]
pub struct RecoveryReport {
    /// What recovery concluded (and repaired).
    pub verdict: Verdict,
    /// Segments kept.
    pub segments: usize,
    /// First and last index held after recovery (`None` for an empty log).
    pub first_index: Option<u64>,
    /// Last index held after recovery.
    pub last_index: Option<u64>,
}

/// A record read back from the log; its payload is 16-byte aligned and read in place.
pub struct Record {
    /// Raft index.
    pub index: u64,
    /// Raft term.
    pub term: u64,
    bytes: RecordBytes,
    payload_len: usize,
}

enum RecordBytes {
    /// Read from the segment file (O_DIRECT read buffer).
    Read(ReadResult),
    /// Still in a buffer the group commit is writing.
    Shared(Rc<DmaBuffer>, usize),
    /// Copied out of the open group-commit buffer (not yet handed to the syncer).
    Copied(DmaBuffer),
}

impl Record {
    /// The payload bytes, starting 16-byte aligned.
    pub fn payload(&self) -> &[u8] {
        let whole: &[u8] = match &self.bytes {
            RecordBytes::Read(r) => r,
            RecordBytes::Shared(b, start) => &b.as_bytes()[*start..],
            RecordBytes::Copied(b) => b.as_bytes(),
        };
        &whole[HEADER_BYTES..HEADER_BYTES + self.payload_len]
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("index", &self.index)
            .field("term", &self.term)
            .field("payload_len", &self.payload_len)
            .finish()
    }
}

/// Smallest group-commit buffer allocated.
const FLUSH_BYTES_MIN: usize = 64 << 10;

/// Bytes of written group-commit buffers kept for reads (the newest buffer is kept whatever its
/// size). A record is read back moments after it became durable (Raft applies a committed
/// entry on every node, and a leader sends it to a follower that fell behind): from memory that
/// costs nothing, from the file it is an O_DIRECT read, a trip through the kernel's I/O workers
/// and a wake-up of this thread, on the commit path of every request.
pub const RECENT_BYTES_MAX: usize = 8 << 20;

/// Written buffers kept for reads, at most: the last few rounds are what a commit reads back.
/// Keeping more would hold on to the executor's I/O arena ([`IO_MEMORY_BYTES`]), and new
/// buffers would then come from the heap: fresh pages, faulted and zeroed on every round.
pub const RECENT_BUFFERS_MAX: usize = 4;

/// I/O buffer memory to give the glommio executor that runs a log
/// (`LocalExecutorBuilder::io_memory`; glommio's default is 10 MiB). Group-commit buffers come
/// from this arena while it has room: it is allocated once and never returned, and where the
/// locked-memory limit allows it is registered with io_uring, so its pages are pinned and
/// resident from the start and writes from it skip the kernel's per-write page pinning
/// (otherwise pages become resident as they are first used, and stay). glommio registers the
/// arena with each of its three rings, and without `CAP_IPC_LOCK` (root has it) each
/// registration counts against `ulimit -l`: about three times the arena, for every executor of
/// the process. A buffer that does not fit the arena comes from the heap instead, and a large
/// one then faults and zeroes fresh pages on every round: with 8 MiB rounds that took a third of the log's
/// throughput (`baton wal bench --record-bytes 65536 --in-flight 64`: 1,513–1,826 MiB/s with
/// 10 MiB, 2,758–3,380 MiB/s with 32–96 MiB). 48 MiB holds the newest written buffer kept for
/// reads, a round in flight and the next one filling, at `flush_bytes_max` (8 MiB) each, with
/// room for the allocator's power-of-two rounding.
pub const IO_MEMORY_BYTES: usize = 48 << 20;

/// Smallest arena an executor running a log may be given (glommio's own floor).
pub const IO_MEMORY_BYTES_MIN: usize = 64 << 10;

/// Largest arena: a ceiling that keeps a typo from claiming (and, registered, pinning) the
/// machine's memory.
pub const IO_MEMORY_BYTES_MAX: usize = 1 << 30;

/// Checks an executor I/O arena size for a log against [`IO_MEMORY_BYTES_MIN`] and
/// [`IO_MEMORY_BYTES_MAX`].
pub fn check_io_memory(bytes: usize) -> Result<(), WalError> {
    if (IO_MEMORY_BYTES_MIN..=IO_MEMORY_BYTES_MAX).contains(&bytes) {
        Ok(())
    } else {
        Err(WalError::InvalidOptions {
            reason: "the I/O arena (io_memory_bytes) must be between 65,536 bytes and 1 GiB",
        })
    }
}

/// Segment files kept open at once (the active one included); older ones reopen on read.
const OPEN_SEGMENTS_MAX: usize = 16;

struct Segment {
    first_index: u64,
    path: PathBuf,
    /// `None` until the syncer has created the file, and for old segments closed to bound the
    /// number of open descriptors (see `created`).
    file: Option<Rc<DmaFile>>,
    /// The file exists on disk.
    created: bool,
    /// File offset of each record, for index `first_index + i`.
    offsets: Vec<u64>,
    /// End of the appended data (pending records included).
    end: u64,
    /// Data below this offset is in the file (written, maybe not yet synced).
    written_end: u64,
}

impl Segment {
    fn record_size(&self, i: usize) -> u64 {
        let next = self.offsets.get(i + 1).copied().unwrap_or(self.end);
        next - self.offsets[i]
    }
}

/// One group-commit buffer: a contiguous, block-aligned range of one segment.
struct Flush {
    segment_first: u64,
    /// Block-aligned file offset of `buf[0]`.
    file_pos: u64,
    buf: DmaBuffer,
    used: usize,
    /// Bytes of records appended into this buffer (not counting the carried tail).
    record_bytes: usize,
    last_index: u64,
}

impl Flush {
    fn carry(&self) -> Tail {
        let start = align_down(self.used as u64) as usize;
        Tail {
            file_pos: self.file_pos + start as u64,
            bytes: self.buf.as_bytes()[start..self.used].to_vec(),
        }
    }
}

/// The partial last block of the active segment, which the next buffer must start with.
#[derive(Default)]
struct Tail {
    file_pos: u64,
    bytes: Vec<u8>,
}

/// A written file waiting to become a segment (see `WalOptions::spare_segments`).
struct Spare {
    path: PathBuf,
    /// Highest index a record in the file may carry (0 for a zero-filled one): the file may
    /// become the segment of a higher first index only, so that a scan reads its old records
    /// as the end.
    stale_through: u64,
}

struct Inflight {
    segment_first: u64,
    file_pos: u64,
    buf: Rc<DmaBuffer>,
    /// Bytes of `buf` that hold data; past it is block padding, and records appended since then
    /// live in the next buffer (which carries this one's last block).
    used: usize,
}

struct Inner {
    dir: PathBuf,
    opts: WalOptions,
    directory: Rc<Directory>,
    /// The directory lock; released once the log is closed and idle (see `release_if_done`).
    lock: Option<std::fs::File>,
    segments: VecDeque<Segment>,
    /// Index the next append must carry; 0 while unconstrained (empty, never written).
    next_index: u64,
    /// First index reads may see (raised by purge).
    first_visible: u64,
    durable_index: u64,
    queue: VecDeque<Flush>,
    /// Buffers of the round being written (all of them, so reads find records in any).
    inflight: Vec<Inflight>,
    /// Buffers of earlier rounds, oldest first, kept for reads (`RECENT_BUFFERS_MAX`,
    /// `RECENT_BYTES_MAX`); dropped
    /// when a truncation or purge changes what their bytes mean.
    recent: VecDeque<Inflight>,
    recent_bytes: usize,
    tail: Tail,
    pending_bytes: usize,
    /// Bytes the last group-commit round wrote (sizes the next buffer).
    last_round_bytes: usize,
    syncing: bool,
    /// Closed while truncate/purge rewrite the active segment: appends wait.
    gate_closed: bool,
    failed: Option<Arc<WalError>>,
    closed: bool,
    syncer_waker: Option<Waker>,
    durable_waiters: Vec<(u64, Waker)>,
    waiters: Vec<Waker>,
    /// Spares ready to become segments, oldest first.
    spares: VecDeque<Spare>,
    /// Number of the next spare file.
    spare_seq: u64,
    /// The background task is writing a spare.
    preparing: bool,
    /// Purges moving or deleting files and meta saves in flight (they run beside appends; see
    /// `purge_through`): a shutdown waits for them.
    file_work: usize,
    /// Spare writing failed once: no more (segments are then preallocated on the write path,
    /// where a real problem surfaces as an error of the log).
    spares_failed: bool,
    preparer_waker: Option<Waker>,
    /// Woken when the background task finishes a spare or stops.
    spare_waiters: Vec<Waker>,
    /// A rotation is waiting for the spare being written: the writer stops pacing itself.
    spare_wanted: bool,
    stats: WalStats,
}

type Shared = Rc<RefCell<Inner>>;

impl Inner {
    fn check_usable(&self) -> Result<(), WalError> {
        if let Some(cause) = &self.failed {
            return Err(WalError::Failed {
                cause: cause.clone(),
            });
        }
        if self.closed {
            return Err(WalError::Closed);
        }
        Ok(())
    }

    fn last_index(&self) -> Option<u64> {
        let last = self.next_index.checked_sub(1)?;
        (last >= self.first_visible && last > 0 && !self.segments.is_empty()).then_some(last)
    }

    fn first_index(&self) -> Option<u64> {
        self.last_index().map(|_| self.first_visible)
    }

    fn segment_of(&self, index: u64) -> Option<&Segment> {
        let k = self.segments.partition_point(|s| s.first_index <= index);
        self.segments.get(k.checked_sub(1)?)
    }

    fn wake_all(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
        if let Some(w) = self.syncer_waker.take() {
            w.wake();
        }
        self.wake_preparer();
        self.wake_spare_waiters();
    }

    fn wake_durable(&mut self) {
        let durable = self.durable_index;
        let failed = self.failed.is_some();
        self.durable_waiters.retain(|(i, w)| {
            let done = *i <= durable || failed;
            if done {
                w.wake_by_ref();
            }
            !done
        });
    }

    fn fail(&mut self, e: WalError) -> Arc<WalError> {
        let cause = self.failed.get_or_insert_with(|| Arc::new(e)).clone();
        tracing::error!(error = %cause, "WAL failed; it accepts no more writes until restarted");
        // Nothing queued will be written now; dropping it lets the log count as idle, so a
        // shutdown can release the directory lock.
        self.queue.clear();
        self.wake_durable();
        self.wake_all();
        cause
    }

    /// Keeps a round's written buffers for reads, dropping the oldest beyond
    /// `RECENT_BUFFERS_MAX` buffers or `RECENT_BYTES_MAX` bytes (never the newest).
    fn keep_recent(&mut self, written: Vec<Inflight>) {
        for f in written {
            self.recent_bytes += f.buf.len();
            self.recent.push_back(f);
        }
        while (self.recent_bytes > RECENT_BYTES_MAX || self.recent.len() > RECENT_BUFFERS_MAX)
            && self.recent.len() > 1
        {
            let old = self.recent.pop_front().expect("len > 1");
            self.recent_bytes -= old.buf.len();
        }
    }

    /// Forgets every kept buffer (their records were truncated, or their segment removed).
    fn forget_recent(&mut self) {
        self.recent.clear();
        self.recent_bytes = 0;
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && !self.syncing
    }

    /// Releases the directory lock once the log is closed (or failed) and nothing is being
    /// written: from then on no instance in this process touches the files.
    fn release_if_done(&mut self) {
        if (self.closed || self.failed.is_some())
            && self.is_idle()
            && !self.preparing
            && self.file_work == 0
        {
            self.lock.take();
        }
    }

    /// Spares the background task keeps ready by writing zeros: one. Purges recycle segments
    /// into the pool up to `spare_segments`; writing more zeros ahead would only make purges
    /// delete what they could have recycled.
    fn zero_spares_target(&self) -> usize {
        self.opts.spare_segments.min(1)
    }

    fn wake_spare_waiters(&mut self) {
        for w in self.spare_waiters.drain(..) {
            w.wake();
        }
    }

    fn wake_preparer(&mut self) {
        if let Some(w) = self.preparer_waker.take() {
            w.wake();
        }
    }
}

/// A segmented, O_DIRECT, group-committed write-ahead log. Single-threaded (one glommio
/// executor); see the module docs.
pub struct Wal {
    shared: Shared,
}

impl Wal {
    /// Opens (or creates) the log in `dir`, recovering what a crash left behind.
    ///
    /// Must run inside a glommio executor. Refuses to open a log with corruption before its
    /// tail ([`WalError::Corrupt`]); a torn tail is cut and reported.
    pub async fn open(dir: &Path, opts: WalOptions) -> Result<(Wal, RecoveryReport), WalError> {
        opts.validate()?;
        std::fs::create_dir_all(dir).map_err(|e| WalError::io("create dir", dir, e))?;
        // glommio opens directories relative to no descriptor: relative paths fail (EBADF).
        let dir =
            &std::fs::canonicalize(dir).map_err(|e| WalError::io("canonicalize dir", dir, e))?;
        let lock = lock_dir(dir)?;
        // Segments a purge had handed to the deleter when this log last closed.
        crate::slow_delete::sweep(dir).map_err(|e| WalError::io("sweep trash", dir, e))?;
        probe_filesystem(dir).await?;
        let directory = Directory::open(dir)
            .await
            .map_err(|e| WalError::glommio("open dir", dir, e))?;

        let mut scans: Vec<(Rc<DmaFile>, SegmentScan, Vec<u8>)> = Vec::new();
        for (first, path) in
            segment::list_segments(dir).map_err(|e| WalError::io("list segments", dir, e))?
        {
            let file = open_segment(&path, opts.sync).await?;
            let size = file
                .file_size()
                .await
                .map_err(|e| WalError::glommio("stat segment", &path, e))?;
            let image = file
                .read_at(0, size as usize)
                .await
                .map_err(|e| WalError::glommio("read segment", &path, e))?;
            let scan = recovery::scan_segment(&path, first, &image);
            let end = scan.valid_end();
            // The last record's zero padding may lie past a truncated file's end: pad with zeros.
            let mut tail = vec![0u8; (end - align_down(end)) as usize];
            let have = image.get(align_down(end) as usize..).unwrap_or_default();
            let n = have.len().min(tail.len());
            tail[..n].copy_from_slice(&have[..n]);
            scans.push((Rc::new(file), scan, tail));
        }
        let only_scans: Vec<SegmentScan> = scans.iter().map(|(_, s, _)| s.clone()).collect();
        let verdict = recovery::judge(&only_scans)?;
        match &verdict {
            Verdict::Clean => {}
            Verdict::TornSegment { path, fault } => {
                tracing::warn!(path = %path.display(), %fault, "removing a segment whose creation did not complete");
                let (file, _, _) = scans.pop().expect("torn segment is the last one");
                file.remove()
                    .await
                    .map_err(|e| WalError::glommio("remove torn segment", path, e))?;
                directory
                    .sync()
                    .await
                    .map_err(|e| WalError::glommio("sync dir", dir, e))?;
            }
            Verdict::TornTail {
                path,
                offset,
                fault,
                discarded_bytes,
            } => {
                tracing::warn!(path = %path.display(), offset, %fault, discarded_bytes, "cutting a torn tail");
                let (file, _, _) = scans.last().expect("torn tail is in the last segment");
                cut_segment(file, path, *offset, opts.segment_bytes).await?;
            }
        }

        let mut segments = VecDeque::with_capacity(scans.len());
        let mut tail = Tail::default();
        for (file, scan, tail_bytes) in scans {
            let end = scan.valid_end();
            tail = Tail {
                file_pos: align_down(end),
                bytes: tail_bytes,
            };
            segments.push_back(Segment {
                first_index: scan.name_index,
                path: scan.path.clone(),
                file: Some(file),
                created: true,
                offsets: scan.records.iter().map(|r| r.offset).collect(),
                end,
                written_end: end,
            });
        }
        close_old_segment_files(&mut segments);
        let (found, leftovers) =
            segment::list_spares(dir).map_err(|e| WalError::io("list spares", dir, e))?;
        let spare_seq = found
            .iter()
            .map(|(seq, _, _)| seq.saturating_add(1))
            .max()
            .unwrap_or(0);
        let surplus = found.len().saturating_sub(opts.spare_segments);
        let mut spares = VecDeque::new();
        for (k, (_, stale_through, path)) in found.into_iter().enumerate() {
            if k < surplus {
                std::fs::remove_file(&path).map_err(|e| WalError::io("remove spare", &path, e))?;
            } else {
                spares.push_back(Spare {
                    path,
                    stale_through,
                });
            }
        }
        for path in leftovers {
            std::fs::remove_file(&path).map_err(|e| WalError::io("remove spare", &path, e))?;
        }
        let next_index = segments
            .back()
            .map_or(0, |s| s.first_index + s.offsets.len() as u64);
        let first_visible = segments.front().map_or(0, |s| s.first_index);
        let inner = Inner {
            dir: dir.to_path_buf(),
            opts,
            directory: Rc::new(directory),
            lock: Some(lock),
            segments,
            next_index,
            first_visible,
            durable_index: next_index.saturating_sub(1),
            queue: VecDeque::new(),
            inflight: Vec::new(),
            recent: VecDeque::new(),
            recent_bytes: 0,
            tail,
            pending_bytes: 0,
            last_round_bytes: 0,
            syncing: false,
            gate_closed: false,
            failed: None,
            closed: false,
            syncer_waker: None,
            durable_waiters: Vec::new(),
            waiters: Vec::new(),
            spares,
            spare_seq,
            preparing: false,
            file_work: 0,
            spares_failed: false,
            preparer_waker: None,
            spare_waiters: Vec::new(),
            spare_wanted: false,
            stats: WalStats::default(),
        };
        let report = RecoveryReport {
            verdict,
            segments: inner.segments.len(),
            first_index: inner.first_index(),
            last_index: inner.last_index(),
        };
        let shared = Rc::new(RefCell::new(inner));
        glommio::spawn_local(syncer(Rc::downgrade(&shared))).detach();
        glommio::spawn_local(preparer(Rc::downgrade(&shared))).detach();
        Ok((Wal { shared }, report))
    }

    /// First index held (after purges), or `None` when empty.
    pub fn first_index(&self) -> Option<u64> {
        self.shared.borrow().first_index()
    }

    /// Last index appended (maybe not yet durable), or `None` when empty.
    pub fn last_index(&self) -> Option<u64> {
        self.shared.borrow().last_index()
    }

    /// Highest index known durable (0 when none).
    pub fn durable_index(&self) -> u64 {
        self.shared.borrow().durable_index
    }

    /// A handle that can close this log later, from wherever its owner went.
    pub fn shutdown_handle(&self) -> WalShutdown {
        WalShutdown {
            shared: self.shared.clone(),
        }
    }

    /// True while the group commit has a buffer being written (for tests and status pages).
    pub fn is_writing(&self) -> bool {
        !self.shared.borrow().inflight.is_empty()
    }

    /// Counters since open.
    pub fn stats(&self) -> WalStats {
        self.shared.borrow().stats
    }

    /// Spare segment files ready now.
    pub fn spares_ready(&self) -> usize {
        self.shared.borrow().spares.len()
    }

    /// Waits until the background task has nothing left to write: a spare is ready (or
    /// writing it failed, or the log closed, or spares are off). For benchmarks and tests that want
    /// to start from a steady state.
    pub async fn spares_settled(&self) {
        poll_fn(|cx| {
            let mut inner = self.shared.borrow_mut();
            let done = inner.closed
                || inner.failed.is_some()
                || inner.spares_failed
                || (!inner.preparing && inner.spares.len() >= inner.zero_spares_target());
            if done {
                Poll::Ready(())
            } else {
                inner.spare_waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Directory of the log.
    pub fn dir(&self) -> PathBuf {
        self.shared.borrow().dir.clone()
    }

    /// Appends a record. Returns once it is buffered (so it can be read back), which may wait
    /// for space when `pending_bytes_max` is reached; await [`Wal::durable`] for durability.
    ///
    /// `index` must follow the last index (any index ≥ 1 for a log that was never written).
    pub async fn append(&self, index: u64, term: u64, payload: &[u8]) -> Result<(), WalError> {
        let max = self.shared.borrow().opts.payload_bytes_max;
        if payload.len() > max {
            return Err(WalError::PayloadTooLarge {
                len: payload.len(),
                max,
            });
        }
        if index == 0 {
            return Err(WalError::ZeroIndex);
        }
        let size = record::record_bytes(payload.len());
        self.wait_for_room(size).await?;
        let mut guard = self.shared.borrow_mut();
        let inner = &mut *guard;
        inner.check_usable()?;
        if inner.next_index != 0 && index != inner.next_index {
            return Err(WalError::NonContiguous {
                expected: inner.next_index,
                got: index,
            });
        }
        let was_empty = inner.last_index().is_none();
        let segment_bytes = inner.opts.segment_bytes;
        let rotate = match inner.segments.back() {
            None => true,
            Some(s) => s.end + size as u64 > segment_bytes,
        };
        if rotate {
            inner.segments.push_back(Segment {
                first_index: index,
                path: segment::segment_path(&inner.dir, index),
                file: None,
                created: false,
                offsets: Vec::new(),
                end: BLOCK,
                written_end: BLOCK,
            });
            inner.tail = Tail {
                file_pos: BLOCK,
                bytes: Vec::new(),
            };
        }
        let active_first = inner.segments.back().expect("active segment").first_index;
        // One block of slack: a buffer whose data ends on a block boundary is written with one
        // more zero block (see `run_round`).
        let fits = matches!(inner.queue.back(), Some(f) if f.segment_first == active_first && f.used + size + BLOCK_BYTES <= f.buf.len());
        if !fits {
            let carry = match inner.queue.back() {
                Some(f) if f.segment_first == active_first => f.carry(),
                _ => std::mem::take(&mut inner.tail),
            };
            // Size the buffer for what recent rounds needed, not the maximum: small buffers come
            // back warm from the allocator, 8 MiB ones fault in fresh pages every time.
            let want = (2 * inner.last_round_bytes)
                .max(carry.bytes.len() + size + BLOCK_BYTES)
                .max(FLUSH_BYTES_MIN);
            let capacity = (align_up(want as u64) as usize).min(inner.opts.flush_bytes_max);
            let mut buf = glommio::allocate_dma_buffer(capacity);
            buf.as_bytes_mut()[..carry.bytes.len()].copy_from_slice(&carry.bytes);
            inner.queue.push_back(Flush {
                segment_first: active_first,
                file_pos: carry.file_pos,
                buf,
                used: carry.bytes.len(),
                record_bytes: 0,
                last_index: 0,
            });
        }
        let flush = inner.queue.back_mut().expect("open flush");
        let at = flush.used;
        let written = record::encode(&mut flush.buf.as_bytes_mut()[at..], index, term, payload);
        debug_assert_eq!(written, size);
        flush.used += size;
        flush.record_bytes += size;
        flush.last_index = index;
        let segment = inner.segments.back_mut().expect("active segment");
        debug_assert_eq!(
            segment.end,
            flush.file_pos + at as u64,
            "buffer and segment agree on the end"
        );
        segment.offsets.push(segment.end);
        segment.end += size as u64;
        if was_empty {
            inner.first_visible = index;
        }
        inner.next_index = index + 1;
        inner.pending_bytes += size;
        inner.stats.appends += 1;
        inner.stats.payload_bytes += payload.len() as u64;
        if let Some(w) = inner.syncer_waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// Appends a record and waits until it is durable.
    pub async fn append_durable(
        &self,
        index: u64,
        term: u64,
        payload: &[u8],
    ) -> Result<(), WalError> {
        self.append(index, term, payload).await?;
        self.durable(index).await
    }

    async fn wait_for_room(&self, size: usize) -> Result<(), WalError> {
        poll_fn(|cx| {
            let mut inner = self.shared.borrow_mut();
            inner.check_usable()?;
            let room = inner.pending_bytes == 0
                || inner.pending_bytes + size <= inner.opts.pending_bytes_max;
            if room && !inner.gate_closed {
                Poll::Ready(Ok(()))
            } else {
                inner.waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Resolves once every record up to `index` is durable (fdatasync'd).
    pub fn durable(
        &self,
        index: u64,
    ) -> impl std::future::Future<Output = Result<(), WalError>> + 'static {
        let shared = self.shared.clone();
        poll_fn(move |cx| {
            let mut inner = shared.borrow_mut();
            if let Some(cause) = &inner.failed {
                return Poll::Ready(Err(WalError::Failed {
                    cause: cause.clone(),
                }));
            }
            if inner.durable_index >= index {
                return Poll::Ready(Ok(()));
            }
            if inner.next_index == 0 || index >= inner.next_index {
                return Poll::Ready(Err(WalError::NotFound {
                    index,
                    first: inner.first_visible,
                    last: inner.next_index.saturating_sub(1),
                }));
            }
            inner.durable_waiters.push((index, cx.waker().clone()));
            Poll::Pending
        })
    }

    /// Waits until everything appended so far is durable.
    pub async fn sync(&self) -> Result<(), WalError> {
        poll_fn(|cx| {
            let mut inner = self.shared.borrow_mut();
            if let Some(cause) = &inner.failed {
                return Poll::Ready(Err(WalError::Failed {
                    cause: cause.clone(),
                }));
            }
            if inner.is_idle() {
                Poll::Ready(Ok(()))
            } else {
                inner.waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Reads the record at `index`. Records already written are read from the file with
    /// O_DIRECT and checked (crc); records still in the group-commit buffers are served from
    /// memory.
    pub async fn read(&self, index: u64) -> Result<Record, WalError> {
        enum Source {
            File(Option<Rc<DmaFile>>, PathBuf, u64, usize),
            Ready(Record),
        }
        let source = {
            let inner = self.shared.borrow();
            let not_found = || WalError::NotFound {
                index,
                first: inner.first_visible,
                last: inner.next_index.saturating_sub(1),
            };
            if inner.last_index().is_none_or(|last| index > last) || index < inner.first_visible {
                return Err(not_found());
            }
            let seg = inner.segment_of(index).ok_or_else(not_found)?;
            let i = (index - seg.first_index) as usize;
            let (offset, size) = (seg.offsets[i], seg.record_size(i));
            let holds = |f: &&Inflight| {
                f.segment_first == seg.first_index
                    && offset >= f.file_pos
                    && offset + size <= f.file_pos + f.used as u64
            };
            // Newest first: a later buffer rewrote the block an earlier one ended in.
            let inflight = inner
                .inflight
                .iter()
                .find(holds)
                .or_else(|| inner.recent.iter().rev().find(holds));
            if offset + size <= seg.written_end && inflight.is_none() {
                Source::File(seg.file.clone(), seg.path.clone(), offset, size as usize)
            } else {
                let bytes = match inflight {
                    Some(f) => RecordBytes::Shared(f.buf.clone(), (offset - f.file_pos) as usize),
                    _ => {
                        let f = inner
                            .queue
                            .iter()
                            .find(|f| {
                                f.segment_first == seg.first_index
                                    && offset >= f.file_pos
                                    && offset + size <= f.file_pos + f.used as u64
                            })
                            .unwrap_or_else(|| {
                                panic!(
                                    "record {index} at {offset}+{size} (written_end {}) not in flight {:?} nor queued {:?}",
                                    seg.written_end,
                                    inner.inflight.iter().map(|f| (f.file_pos, f.used)).collect::<Vec<_>>(),
                                    inner.queue.iter().map(|f| (f.file_pos, f.used)).collect::<Vec<_>>()
                                )
                            });
                        let start = (offset - f.file_pos) as usize;
                        let mut copy = glommio::allocate_dma_buffer(size as usize);
                        copy.as_bytes_mut()
                            .copy_from_slice(&f.buf.as_bytes()[start..start + size as usize]);
                        RecordBytes::Copied(copy)
                    }
                };
                let whole: &[u8] = match &bytes {
                    RecordBytes::Shared(b, s) => &b.as_bytes()[*s..*s + size as usize],
                    RecordBytes::Copied(b) => b.as_bytes(),
                    RecordBytes::Read(_) => unreachable!("memory sources only"),
                };
                // Bytes this process encoded moments ago: a mismatch is a bug, not bad input.
                let header = match record::check(whole, 0) {
                    RecordCheck::Record(h) if h.index == index => h,
                    other => panic!("record {index} in memory is not valid: {other:?}"),
                };
                Source::Ready(Record {
                    index,
                    term: header.term,
                    payload_len: header.payload_len as usize,
                    bytes,
                })
            }
        };
        match source {
            Source::Ready(r) => {
                self.shared.borrow_mut().stats.reads_from_memory += 1;
                Ok(r)
            }
            Source::File(file, path, offset, size) => {
                self.shared.borrow_mut().stats.reads_from_file += 1;
                let file = match file {
                    Some(f) => f,
                    // An old segment whose descriptor was closed: open it for this read only.
                    None => match DmaFile::open(&path).await {
                        Ok(f) => Rc::new(f),
                        Err(e) => {
                            // Purged (renamed or removed) meanwhile?
                            self.not_found_if_purged(index)?;
                            return Err(WalError::glommio("open segment", &path, e));
                        }
                    },
                };
                let read = file
                    .read_at(offset, size)
                    .await
                    .map_err(|e| WalError::glommio("read record", &path, e))?;
                let check = record::check(&read, 0);
                if !matches!(check, RecordCheck::Record(h) if h.index == index) {
                    // Purged while the read was in flight: the file may have been recycled and
                    // rewritten since. The record is gone, not corrupt.
                    self.not_found_if_purged(index)?;
                }
                match check {
                    RecordCheck::Record(h) if h.index == index => Ok(Record {
                        index,
                        term: h.term,
                        payload_len: h.payload_len as usize,
                        bytes: RecordBytes::Read(read),
                    }),
                    RecordCheck::Record(h) => Err(WalError::Corrupt {
                        path,
                        offset,
                        reason: crate::error::Corruption::Record(
                            record::RecordFault::IndexMismatch {
                                expected: index,
                                found: h.index,
                            },
                        ),
                    }),
                    RecordCheck::Fault(f) => Err(WalError::Corrupt {
                        path,
                        offset,
                        reason: crate::error::Corruption::Record(f),
                    }),
                    RecordCheck::End => Err(WalError::Corrupt {
                        path,
                        offset,
                        reason: crate::error::Corruption::Record(record::RecordFault::Truncated {
                            need: size,
                            have: 0,
                        }),
                    }),
                }
            }
        }
    }

    /// `NotFound` if `index` has been purged (for reads that raced with a purge).
    fn not_found_if_purged(&self, index: u64) -> Result<(), WalError> {
        let inner = self.shared.borrow();
        if index < inner.first_visible {
            return Err(WalError::NotFound {
                index,
                first: inner.first_visible,
                last: inner.next_index.saturating_sub(1),
            });
        }
        Ok(())
    }

    /// Removes every record after `index`, durably, before returning (Raft's conflict
    /// truncation). Waits for in-flight appends first; appends wait while it runs.
    pub async fn truncate_after(&self, index: u64) -> Result<(), WalError> {
        let _gate = self.close_gate_and_drain().await?;
        let (first, last) = {
            let inner = self.shared.borrow();
            (inner.first_visible, inner.next_index.saturating_sub(1))
        };
        if inner_is_empty(&self.shared) || index >= last {
            return Ok(());
        }
        if index + 1 < first {
            return Err(WalError::BadRange {
                op: "truncate_after",
                index,
                first,
                last,
            });
        }
        let result = self.cut_after(index).await;
        if let Err(e) = result {
            let cause = self.shared.borrow_mut().fail(e);
            return Err(WalError::Failed { cause });
        }
        Ok(())
    }

    async fn cut_after(&self, index: u64) -> Result<(), WalError> {
        // Records after `index` are about to be rewritten with other bytes at the same offsets.
        self.shared.borrow_mut().forget_recent();
        // Later segments go first, newest first: a crash part-way leaves a prefix of the old log.
        loop {
            let seg = {
                let mut inner = self.shared.borrow_mut();
                match inner.segments.back() {
                    Some(s) if s.first_index > index => inner.segments.pop_back(),
                    _ => None,
                }
            };
            let Some(seg) = seg else { break };
            remove_segment_file(&seg).await?;
        }
        let directory = self.shared.borrow().directory.clone();
        let dir = self.dir();
        directory
            .sync()
            .await
            .map_err(|e| WalError::glommio("sync dir", &dir, e))?;
        let cut = {
            let mut inner = self.shared.borrow_mut();
            inner.next_index = index + 1;
            inner.durable_index = index;
            match inner.segments.back_mut() {
                None => {
                    inner.tail = Tail::default();
                    None
                }
                Some(seg) => {
                    let keep = (index + 1 - seg.first_index) as usize;
                    // When the cut falls on a segment boundary this segment keeps every record,
                    // but the tail carry still describes the deleted one: cut here at its own
                    // end, which rewrites its last block and gives the right carry.
                    let cut = seg.offsets.get(keep).copied().unwrap_or(seg.end);
                    seg.offsets.truncate(keep);
                    seg.end = cut;
                    seg.written_end = cut;
                    Some((seg.file.clone(), seg.path.clone(), cut))
                }
            }
        };
        if let Some((file, path, offset)) = cut {
            let file = match file {
                Some(f) => f,
                None => {
                    let sync = self.shared.borrow().opts.sync;
                    let f = Rc::new(open_segment(&path, sync).await?);
                    if let Some(seg) = self.shared.borrow_mut().segments.back_mut() {
                        seg.file = Some(f.clone());
                    }
                    f
                }
            };
            let segment_bytes = self.shared.borrow().opts.segment_bytes;
            let tail = cut_segment(&file, &path, offset, segment_bytes).await?;
            self.shared.borrow_mut().tail = Tail {
                file_pos: align_down(offset),
                bytes: tail,
            };
        }
        Ok(())
    }

    /// Drops records up to and including `index`: whole segments are deleted (the active one
    /// never, unless `index` is at or past the last index, which empties the log; the next
    /// append must then carry `index + 1`).
    ///
    /// A purge that keeps the active segment (nearly every one: the log behind a snapshot)
    /// touches nothing appends write, so appends go on meanwhile: its segments leave the log at
    /// once, and on the blocking thread pool their files are renamed into spares or handed to
    /// the file deleter ([`crate::slow_delete`]: deleting a 64 MiB segment at once stalls the
    /// disk's other writers), then the directory is synced. Only segments whose records are all
    /// durable go (none is being written); the rest go at a later purge. A purge that empties
    /// the log closes the append gate and drains pending appends first, since it moves the next
    /// index. [`WalShutdown::shutdown`] waits for purges in flight.
    pub async fn purge_through(&self, index: u64) -> Result<(), WalError> {
        let empties_now = {
            let inner = self.shared.borrow();
            inner.check_usable()?;
            inner.next_index == 0 || index + 1 >= inner.next_index
        };
        // Under the gate, with pending appends drained, whether the purge empties the log is
        // decided again on the log as it is then. Without it, nothing is awaited before the
        // decision below, so it stands.
        let _gate = if empties_now {
            Some(self.close_gate_and_drain().await?)
        } else {
            None
        };
        let (removed, stale_through) = {
            let mut inner = self.shared.borrow_mut();
            let last_before = inner.next_index.saturating_sub(1);
            let empties = inner.next_index == 0 || index + 1 >= inner.next_index;
            let mut removed = Vec::new();
            if empties {
                removed.extend(inner.segments.drain(..));
                inner.next_index = index + 1;
                inner.durable_index = index;
                inner.tail = Tail::default();
            } else {
                // Only segments whose records are all durable: no round is writing to them
                // (openraft may purge what a quorum holds before this node's own sync).
                let through = index.min(inner.durable_index);
                while inner.segments.len() > 1 && inner.segments[1].first_index <= through + 1 {
                    removed.push(inner.segments.pop_front().expect("checked len"));
                }
            }
            inner.first_visible = inner.first_visible.max(index + 1);
            if !removed.is_empty() {
                let first_kept = inner.segments.front().map(|s| s.first_index);
                inner
                    .recent
                    .retain(|f| first_kept.is_some_and(|k| f.segment_first >= k));
                inner.recent_bytes = inner.recent.iter().map(|f| f.buf.len()).sum();
            }
            // Every record of a removed segment has an index at most this.
            let stale_through = match inner.segments.front() {
                Some(kept) if !empties => kept.first_index - 1,
                _ => index.max(last_before),
            };
            (removed, stale_through)
        };
        let _work = FileWork::start(&self.shared);
        let any_removed = !removed.is_empty();
        let result = async {
            for seg in removed {
                // Keep it as a spare while there is room (its blocks are written: overwriting
                // them later costs no extent conversion), else delete it.
                let spare = {
                    let mut inner = self.shared.borrow_mut();
                    let room = inner.spares.len() < inner.opts.spare_segments;
                    (room && seg.created).then(|| {
                        let seq = inner.spare_seq;
                        inner.spare_seq += 1;
                        segment::spare_path(&inner.dir, seq, stale_through)
                    })
                };
                // The segment's descriptors close here, before its file is moved or deleted.
                let (from, created) = (seg.path.clone(), seg.created);
                drop(seg);
                match spare {
                    Some(path) => {
                        let to = path.clone();
                        glommio::executor()
                            .spawn_blocking(move || {
                                std::fs::rename(&from, &to)
                                    .map_err(|e| WalError::io("recycle segment", &from, e))
                            })
                            .await?;
                        let mut inner = self.shared.borrow_mut();
                        inner.spares.push_back(Spare {
                            path,
                            stale_through,
                        });
                        inner.stats.spares_recycled += 1;
                        inner.wake_spare_waiters();
                    }
                    // Freed a step at a time (`slow_delete`): deleting a 64 MiB segment at once
                    // stalls the disk's other writers, this log's group commit first.
                    None => {
                        glommio::executor()
                            .spawn_blocking(move || match crate::slow_delete::remove(&from) {
                                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !created => {
                                    Ok(())
                                }
                                result => {
                                    result.map_err(|e| WalError::io("remove segment", &from, e))
                                }
                            })
                            .await?
                    }
                }
            }
            if any_removed {
                let directory = self.shared.borrow().directory.clone();
                directory
                    .sync()
                    .await
                    .map_err(|e| WalError::glommio("sync dir", self.dir(), e))?;
            }
            Ok::<(), WalError>(())
        }
        .await;
        if let Err(e) = result {
            let cause = self.shared.borrow_mut().fail(e);
            return Err(WalError::Failed { cause });
        }
        Ok(())
    }

    async fn close_gate_and_drain(&self) -> Result<GateGuard, WalError> {
        poll_fn(|cx| {
            let mut inner = self.shared.borrow_mut();
            inner.check_usable()?;
            if inner.gate_closed {
                inner.waiters.push(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        })
        .await?;
        self.shared.borrow_mut().gate_closed = true;
        let guard = GateGuard {
            shared: self.shared.clone(),
        };
        self.sync().await?;
        Ok(guard)
    }

    /// Waits for pending appends to become durable, then stops the group-commit task.
    pub async fn close(self) -> Result<(), WalError> {
        let synced = self.sync().await;
        // Stop the spare writer before the lock goes (Drop releases it once both tasks rest).
        {
            let mut inner = self.shared.borrow_mut();
            inner.closed = true;
            inner.wake_all();
        }
        wait_preparer_stopped(&self.shared).await;
        synced
        // Drop lets the syncer exit and releases the directory lock.
    }

    /// Writes the small metadata blob (e.g. the Raft vote) atomically and durably.
    pub async fn save_meta(&self, bytes: &[u8]) -> Result<(), WalError> {
        // A closed log may already belong to a new instance in this directory.
        self.shared.borrow().check_usable()?;
        let _work = FileWork::start(&self.shared);
        let dir = self.dir();
        let bytes = bytes.to_vec();
        glommio::executor()
            .spawn_blocking(move || crate::meta::save(&dir, &bytes))
            .await
    }

    /// Reads the metadata blob, `None` if it was never written.
    pub async fn load_meta(&self) -> Result<Option<Vec<u8>>, WalError> {
        self.shared.borrow().check_usable()?;
        let dir = self.dir();
        glommio::executor()
            .spawn_blocking(move || crate::meta::load(&dir))
            .await
    }
}

fn inner_is_empty(shared: &Shared) -> bool {
    shared.borrow().last_index().is_none()
}

/// Reopens the append gate when truncate/purge finish, even on error.
struct GateGuard {
    shared: Shared,
}

impl Drop for GateGuard {
    fn drop(&mut self) {
        let mut inner = self.shared.borrow_mut();
        inner.gate_closed = false;
        inner.wake_all();
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        let mut inner = self.shared.borrow_mut();
        inner.closed = true;
        inner.release_if_done();
        inner.wake_all();
    }
}

/// Closes a log from outside its owner (e.g. after the Raft instance that owns it stopped, when
/// tasks of that instance may still hold it): the log drains, then refuses every further
/// operation with [`WalError::Closed`] and releases its directory lock, so the directory can be
/// opened again even if some task never drops its handle.
pub struct WalShutdown {
    shared: Shared,
}

impl WalShutdown {
    /// Drains pending appends (errors are ignored: the log may have failed), then closes.
    pub async fn shutdown(self) {
        let _ = poll_fn(|cx| {
            let mut inner = self.shared.borrow_mut();
            if (inner.is_idle() || inner.failed.is_some()) && inner.file_work == 0 {
                Poll::Ready(())
            } else {
                inner.waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        {
            let mut inner = self.shared.borrow_mut();
            inner.closed = true;
            inner.wake_all();
        }
        wait_preparer_stopped(&self.shared).await;
        let mut inner = self.shared.borrow_mut();
        inner.release_if_done();
        inner.wake_durable();
        inner.wake_all();
    }
}

/// Waits until the spare writer is not writing (it stops at its next chunk once the log closed).
async fn wait_preparer_stopped(shared: &Shared) {
    poll_fn(|cx| {
        let mut inner = shared.borrow_mut();
        if inner.preparing {
            inner.spare_waiters.push(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await
}

/// The group-commit task: writes queued buffers, one fdatasync per round.
async fn syncer(weak: Weak<RefCell<Inner>>) {
    loop {
        let has_work = poll_fn(|cx| {
            let Some(shared) = weak.upgrade() else {
                return Poll::Ready(false);
            };
            let mut inner = shared.borrow_mut();
            if inner.failed.is_some() {
                return Poll::Ready(false);
            }
            if !inner.queue.is_empty() {
                inner.syncing = true;
                return Poll::Ready(true);
            }
            if inner.closed {
                return Poll::Ready(false);
            }
            inner.syncer_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        let Some(shared) = weak.upgrade() else { return };
        if !has_work {
            shared.borrow_mut().release_if_done();
            return;
        }
        let result = run_round(&shared).await;
        let mut inner = shared.borrow_mut();
        inner.syncing = false;
        let written = std::mem::take(&mut inner.inflight);
        if result.is_ok() {
            inner.keep_recent(written);
        }
        if let Err(e) = result {
            inner.fail(e);
            return;
        }
        inner.wake_durable();
        inner.wake_all();
    }
}

async fn run_round(shared: &Shared) -> Result<(), WalError> {
    // Take every queued buffer of the front segment; new appends open a fresh buffer. Each one
    // is published as in flight at once (before the segment is created or anything written), so
    // reads keep finding its records.
    let (segment_first, round) = {
        let mut guard = shared.borrow_mut();
        let inner = &mut *guard;
        let first = inner.queue.front().expect("work").segment_first;
        let mut flushes = Vec::new();
        while inner
            .queue
            .front()
            .is_some_and(|f| f.segment_first == first)
        {
            flushes.push(inner.queue.pop_front().expect("front"));
        }
        let active = inner.segments.back().map(|s| s.first_index);
        if inner.queue.is_empty() && active == Some(first) {
            inner.tail = flushes.last().expect("one").carry();
        }
        let segment_bytes = inner.opts.segment_bytes;
        let mut round = Vec::with_capacity(flushes.len());
        for mut flush in flushes {
            let mut len = align_up(flush.used as u64) as usize;
            // After the last record on disk there must be a zero header (or the end of the
            // segment): a recycled file holds old bytes past it, which a scan would otherwise
            // take for a torn write. Data ending on a block boundary gets one zero block more.
            if flush.used == len
                && flush.file_pos + (len as u64) < segment_bytes
                && len + BLOCK_BYTES <= flush.buf.len()
            {
                len += BLOCK_BYTES;
            }
            flush.buf.as_bytes_mut()[flush.used..len].fill(0);
            flush.buf.trim_to_size(len);
            let buf = Rc::new(flush.buf);
            inner.inflight.push(Inflight {
                segment_first: first,
                file_pos: flush.file_pos,
                buf: buf.clone(),
                used: flush.used,
            });
            round.push((
                buf,
                len,
                flush.file_pos,
                flush.used,
                flush.last_index,
                flush.record_bytes,
            ));
        }
        (first, round)
    };
    let (file, path, created) = {
        let inner = shared.borrow();
        let seg = inner
            .segments
            .iter()
            .find(|s| s.first_index == segment_first)
            .expect("segment of a queued buffer");
        (seg.file.clone(), seg.path.clone(), seg.created)
    };
    let file = match file {
        Some(f) => f,
        None if created => {
            let sync = shared.borrow().opts.sync;
            Rc::new(open_segment(&path, sync).await?)
        }
        None => {
            let f = Rc::new(new_segment(shared, &path, segment_first).await?);
            let mut inner = shared.borrow_mut();
            inner.stats.segments_created += 1;
            if let Some(seg) = inner
                .segments
                .iter_mut()
                .find(|s| s.first_index == segment_first)
            {
                seg.file = Some(f.clone());
                seg.created = true;
            }
            close_old_segment_files(&mut inner.segments);
            f
        }
    };
    let mut last_index = 0;
    let mut record_bytes = 0;
    let mut round_bytes = 0;
    for (buf, len, file_pos, used, flush_last_index, flush_record_bytes) in round {
        failpoint::hit(points::WRITE).map_err(|e| WalError::io("write", &path, e))?;
        let n = file
            .write_rc_at(buf, file_pos)
            .await
            .map_err(|e| WalError::glommio("write", &path, e))?;
        if n != len {
            return Err(WalError::io(
                "write",
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("short write: {n} of {len} bytes"),
                ),
            ));
        }
        let mut inner = shared.borrow_mut();
        inner.stats.writes += 1;
        inner.stats.written_bytes += len as u64;
        if let Some(seg) = inner
            .segments
            .iter_mut()
            .find(|s| s.first_index == segment_first)
        {
            seg.written_end = seg.written_end.max(file_pos + used as u64);
        }
        last_index = flush_last_index;
        record_bytes += flush_record_bytes;
        round_bytes += len;
    }
    failpoint::hit(points::FDATASYNC).map_err(|e| WalError::io("fdatasync", &path, e))?;
    let sync = shared.borrow().opts.sync;
    match sync {
        // Every write above returned once durable (the descriptor is O_DSYNC).
        SyncMode::Dsync => {}
        SyncMode::Fdatasync => file
            .fdatasync()
            .await
            .map_err(|e| WalError::glommio("fdatasync", &path, e))?,
    }
    let mut inner = shared.borrow_mut();
    inner.stats.syncs += 1;
    inner.last_round_bytes = round_bytes;
    debug_assert!(
        last_index > inner.durable_index || inner.next_index <= last_index,
        "durability only moves forward"
    );
    inner.durable_index = inner.durable_index.max(last_index);
    inner.pending_bytes -= record_bytes;
    Ok(())
}

/// Rounds smaller than this wait for a spare being written rather than preallocate a segment.
const SPARE_WAIT_ROUND_BYTES: usize = 1 << 20;

/// Makes the segment file for `first_index`: from a spare when one is ready, else preallocated
/// anew. It waits for a spare being written only while rounds are small (a log that just
/// opened, or one serving sequential commits, where every fdatasync counts): a log that fills
/// segments faster than zeros can be written ahead streams large rounds, which amortize the
/// extent conversion of a preallocated segment, and waiting would only stall it.
async fn new_segment(shared: &Shared, path: &Path, first_index: u64) -> Result<DmaFile, WalError> {
    let (segment_bytes, window, directory, sync) = {
        let inner = shared.borrow();
        (
            inner.opts.segment_bytes,
            inner.opts.pending_bytes_max as u64,
            inner.directory.clone(),
            inner.opts.sync,
        )
    };
    loop {
        let spare = poll_fn(|cx| {
            let mut inner = shared.borrow_mut();
            if let Some(spare) = inner.spares.pop_front() {
                inner.spare_wanted = false;
                inner.wake_preparer();
                return Poll::Ready(Some(spare));
            }
            if inner.preparing && inner.last_round_bytes < SPARE_WAIT_ROUND_BYTES {
                inner.spare_wanted = true;
                inner.spare_waiters.push(cx.waker().clone());
                return Poll::Pending;
            }
            inner.spare_wanted = false;
            inner.wake_preparer();
            Poll::Ready(None)
        })
        .await;
        let header = SegmentHeader {
            first_index,
            segment_bytes,
            torn_window_bytes: window,
        };
        let Some(spare) = spare else {
            return create_segment(path, header, &directory, sync).await;
        };
        if spare.stale_through >= first_index {
            // Its old records could pass for this segment's: never reuse it for this index.
            tracing::warn!(spare = %spare.path.display(), stale_through = spare.stale_through, first_index, "removing a spare whose records are not older than the new segment");
            std::fs::remove_file(&spare.path)
                .map_err(|e| WalError::io("remove spare", &spare.path, e))?;
            continue;
        }
        let file = adopt_spare(&spare.path, path, header, &directory, sync).await?;
        shared.borrow_mut().stats.segments_from_spares += 1;
        return Ok(file);
    }
}

/// Turns a spare into the segment at `path`: new header (synced), then the rename (synced).
/// A crash before the rename leaves a spare; after it, an empty segment.
async fn adopt_spare(
    spare: &Path,
    path: &Path,
    header: SegmentHeader,
    directory: &Directory,
    sync: SyncMode,
) -> Result<DmaFile, WalError> {
    let segment_bytes = header.segment_bytes;
    failpoint::hit(points::SEGMENT_CREATE).map_err(|e| WalError::io("create segment", path, e))?;
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(true)
        .custom_flags(sync_flags(sync));
    let file = dma_open(&options, spare, "open spare").await?;
    let result = async {
        let size = file
            .file_size()
            .await
            .map_err(|e| WalError::glommio("stat spare", spare, e))?;
        if size > segment_bytes {
            // Old records past the segment's end would be read as its own.
            file.truncate(segment_bytes)
                .await
                .map_err(|e| WalError::glommio("truncate spare", spare, e))?;
        } else if size < segment_bytes {
            file.pre_allocate(segment_bytes, false)
                .await
                .map_err(|e| WalError::glommio("preallocate spare", spare, e))?;
        }
        write_header(&file, spare, header).await?;
        if sync == SyncMode::Fdatasync || size != segment_bytes {
            file.fdatasync()
                .await
                .map_err(|e| WalError::glommio("fdatasync segment header", spare, e))?;
        }
        Ok(())
    }
    .await;
    // glommio's DmaFile keeps its path for metadata calls: reopen under the new name.
    let _ = file.close().await;
    let result = match result {
        Ok(()) => {
            async {
                std::fs::rename(spare, path).map_err(|e| WalError::io("rename spare", spare, e))?;
                directory
                    .sync()
                    .await
                    .map_err(|e| WalError::glommio("sync dir", path, e))?;
                open_segment(path, sync).await
            }
            .await
        }
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(spare);
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Bytes of zeros the spare writer puts down per write: small enough that a group-commit round
/// queued behind one at the device waits little.
const SPARE_CHUNK_BYTES: usize = 256 << 10;

/// Least of the spare writer's pace: it writes zeros at most this many bytes a second, or twice
/// the rate the log filled its segments at since the previous spare, if more (2 s for a 64 MiB
/// segment on a quiet log). Written as fast as the device takes them, the zeros of one spare per
/// node (the nodes of a cluster rotate segments at the same index) held every node's group
/// commit for 50-90 ms at once on the development VM. A rotation that waits for the spare
/// being written (a log whose rounds are small, see `new_segment`) has the rest written at full
/// speed.
pub const SPARE_WRITE_BYTES_PER_S: u64 = 32 << 20;

/// The spare writer: keeps one spare ready (when spares are on), writing a zero-filled file
/// when neither a purge nor an earlier write left one.
async fn preparer(weak: Weak<RefCell<Inner>>) {
    let mut zeros: Option<Rc<DmaBuffer>> = None;
    // The log's write rate since the previous spare began (its pace, see below).
    let mut since: Option<(std::time::Instant, u64)> = None;
    loop {
        let job = poll_fn(|cx| {
            let Some(shared) = weak.upgrade() else {
                return Poll::Ready(None);
            };
            let mut inner = shared.borrow_mut();
            if inner.closed || inner.failed.is_some() || inner.spares_failed {
                return Poll::Ready(None);
            }
            if inner.spares.len() < inner.zero_spares_target() {
                inner.preparing = true;
                let seq = inner.spare_seq;
                inner.spare_seq += 1;
                return Poll::Ready(Some((
                    inner.dir.clone(),
                    seq,
                    inner.opts.segment_bytes,
                    inner.directory.clone(),
                )));
            }
            inner.preparer_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        let Some((dir, seq, segment_bytes, directory)) = job else {
            return;
        };
        let zeros = zeros
            .get_or_insert_with(|| {
                let mut b = glommio::allocate_dma_buffer(SPARE_CHUNK_BYTES);
                b.as_bytes_mut().fill(0);
                Rc::new(b)
            })
            .clone();
        // At least twice as fast as the log has been filling segments, so the spare is ready
        // well before the next rotation needs it.
        let now = std::time::Instant::now();
        let written = weak.upgrade().map_or(0, |s| s.borrow().stats.written_bytes);
        let log_rate = since.map_or(0.0, |(t, w)| {
            written.saturating_sub(w) as f64 / now.duration_since(t).as_secs_f64().max(0.1)
        });
        since = Some((now, written));
        let pace = (SPARE_WRITE_BYTES_PER_S as f64).max(2.0 * log_rate);
        let result =
            write_zero_spare(&weak, &dir, seq, segment_bytes, &directory, zeros, pace).await;
        let Some(shared) = weak.upgrade() else { return };
        let mut inner = shared.borrow_mut();
        inner.preparing = false;
        match result {
            Ok(Some(path)) => {
                inner.spares.push_back(Spare {
                    path,
                    stale_through: 0,
                });
                inner.stats.spares_written += 1;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "writing a spare segment failed; new segments are preallocated on the write path from now on");
                inner.spares_failed = true;
            }
        }
        inner.wake_spare_waiters();
        inner.release_if_done();
    }
}

/// Writes a zero-filled spare (under a temporary name, then renamed). `Ok(None)` when the log
/// closed meanwhile (the partial file is removed).
async fn write_zero_spare(
    weak: &Weak<RefCell<Inner>>,
    dir: &Path,
    seq: u64,
    segment_bytes: u64,
    directory: &Directory,
    zeros: Rc<DmaBuffer>,
    bytes_per_s: f64,
) -> Result<Option<PathBuf>, WalError> {
    let tmp = segment::spare_tmp_path(dir, seq);
    failpoint::hit(points::SPARE_WRITE).map_err(|e| WalError::io("write spare", &tmp, e))?;
    // This task runs in the background, maybe after its log was dropped and its directory
    // removed: `dma_open` turns glommio's panic on that into an error.
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(true);
    let file = dma_open(&options, &tmp, "create spare").await?;
    let result = async {
        file.pre_allocate(segment_bytes, false)
            .await
            .map_err(|e| WalError::glommio("preallocate spare", &tmp, e))?;
        let mut pos = 0;
        let started = std::time::Instant::now();
        while pos < segment_bytes {
            let wanted = weak.upgrade().is_some_and(|s| s.borrow().spare_wanted);
            let due = started + std::time::Duration::from_secs_f64(pos as f64 / bytes_per_s);
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                if !wanted {
                    glommio::timer::sleep(wait).await;
                }
            }
            let stop = weak
                .upgrade()
                .is_none_or(|s| s.borrow().closed || s.borrow().failed.is_some());
            if stop {
                return Ok(false);
            }
            let n = file
                .write_rc_at(zeros.clone(), pos)
                .await
                .map_err(|e| WalError::glommio("write spare", &tmp, e))?;
            if n == 0 {
                return Err(WalError::io(
                    "write spare",
                    &tmp,
                    std::io::Error::new(std::io::ErrorKind::WriteZero, "wrote nothing"),
                ));
            }
            pos += n as u64;
        }
        file.truncate(segment_bytes)
            .await
            .map_err(|e| WalError::glommio("truncate spare", &tmp, e))?;
        file.fdatasync()
            .await
            .map_err(|e| WalError::glommio("fdatasync spare", &tmp, e))?;
        Ok(true)
    }
    .await;
    let _ = file.close().await;
    match result {
        Ok(true) => {
            let path = segment::spare_path(dir, seq, 0);
            std::fs::rename(&tmp, &path).map_err(|e| WalError::io("rename spare", &tmp, e))?;
            directory
                .sync()
                .await
                .map_err(|e| WalError::glommio("sync dir", dir, e))?;
            Ok(Some(path))
        }
        Ok(false) => {
            let _ = std::fs::remove_file(&tmp);
            Ok(None)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Extra open flags of a segment's descriptor for `sync`.
fn sync_flags(sync: SyncMode) -> i32 {
    match sync {
        SyncMode::Dsync => libc::O_DSYNC,
        SyncMode::Fdatasync => 0,
    }
}

/// `options.dma_open(path)`, with glommio's panic when the directory disappears between its
/// open and its `statfs` of the path (an unwrap) turned into an error of `op`.
async fn dma_open(
    options: &OpenOptions,
    path: &Path,
    op: &'static str,
) -> Result<DmaFile, WalError> {
    match std::panic::AssertUnwindSafe(options.dma_open(path))
        .catch_unwind()
        .await
    {
        Ok(opened) => opened.map_err(|e| WalError::glommio(op, path, e)),
        Err(_) => Err(WalError::io(
            op,
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the directory disappeared while the file was opened",
            ),
        )),
    }
}

/// Opens an existing segment for reading and writing (`O_DSYNC` in [`SyncMode::Dsync`]).
async fn open_segment(path: &Path, sync: SyncMode) -> Result<DmaFile, WalError> {
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(true)
        .custom_flags(sync_flags(sync));
    dma_open(&options, path, "open segment").await
}

/// Writes a segment's header block (not synced).
async fn write_header(file: &DmaFile, path: &Path, header: SegmentHeader) -> Result<(), WalError> {
    let mut block = file.alloc_dma_buffer(BLOCK_BYTES);
    header.encode(block.as_bytes_mut());
    file.write_at(block, 0)
        .await
        .map_err(|e| WalError::glommio("write segment header", path, e))?;
    Ok(())
}

/// Creates a segment: preallocate, write the header block, sync file and directory.
async fn create_segment(
    path: &Path,
    header: SegmentHeader,
    directory: &Directory,
    sync: SyncMode,
) -> Result<DmaFile, WalError> {
    failpoint::hit(points::SEGMENT_CREATE).map_err(|e| WalError::io("create segment", path, e))?;
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(sync_flags(sync));
    let file = dma_open(&options, path, "create segment").await?;
    let result = async {
        file.pre_allocate(header.segment_bytes, false)
            .await
            .map_err(|e| WalError::glommio("preallocate segment", path, e))?;
        write_header(&file, path, header).await?;
        file.fdatasync()
            .await
            .map_err(|e| WalError::glommio("fdatasync segment header", path, e))?;
        directory
            .sync()
            .await
            .map_err(|e| WalError::glommio("sync dir", path, e))
    }
    .await;
    if let Err(e) = result {
        // Leave no half-made segment behind (recovery would remove it anyway).
        let _ = file.remove().await;
        let _ = file.close().await;
        return Err(e);
    }
    Ok(file)
}

/// Cuts a segment at `offset`: the block holding it keeps its prefix and is zeroed after it, the
/// rest of the file is deallocated (reads as zeros), and it is all synced. Returns the prefix.
async fn cut_segment(
    file: &DmaFile,
    path: &Path,
    offset: u64,
    segment_bytes: u64,
) -> Result<Vec<u8>, WalError> {
    let block_pos = align_down(offset);
    let keep = (offset - block_pos) as usize;
    let old = file
        .read_at_aligned(block_pos, BLOCK_BYTES)
        .await
        .map_err(|e| WalError::glommio("read tail block", path, e))?;
    let prefix = old.get(..keep).unwrap_or_default().to_vec();
    let mut block = file.alloc_dma_buffer(BLOCK_BYTES);
    block.as_bytes_mut().fill(0);
    block.as_bytes_mut()[..prefix.len()].copy_from_slice(&prefix);
    file.write_at(block, block_pos)
        .await
        .map_err(|e| WalError::glommio("rewrite tail block", path, e))?;
    let rest = block_pos + BLOCK;
    let size = file
        .file_size()
        .await
        .map_err(|e| WalError::glommio("stat segment", path, e))?
        .max(segment_bytes);
    if size > rest {
        file.deallocate(rest, size - rest)
            .await
            .map_err(|e| WalError::glommio("deallocate tail", path, e))?;
    }
    file.fdatasync()
        .await
        .map_err(|e| WalError::glommio("fdatasync cut", path, e))?;
    Ok(prefix)
}

async fn remove_segment_file(seg: &Segment) -> Result<(), WalError> {
    match std::fs::remove_file(&seg.path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !seg.created => Ok(()),
        Err(e) => Err(WalError::io("remove segment", &seg.path, e)),
    }
}

/// A purge moving or deleting files, or a meta save, counted while it lives (even if it
/// unwinds), so that a shutdown waits for it and the directory lock is released only after it.
struct FileWork {
    shared: Shared,
}

impl FileWork {
    fn start(shared: &Shared) -> FileWork {
        shared.borrow_mut().file_work += 1;
        FileWork {
            shared: shared.clone(),
        }
    }
}

impl Drop for FileWork {
    fn drop(&mut self) {
        let mut inner = self.shared.borrow_mut();
        inner.file_work -= 1;
        inner.release_if_done();
        inner.wake_all();
    }
}

/// Drops the descriptors of all but the newest `OPEN_SEGMENTS_MAX` segments.
fn close_old_segment_files(segments: &mut VecDeque<Segment>) {
    let keep_from = segments.len().saturating_sub(OPEN_SEGMENTS_MAX);
    for seg in segments.iter_mut().take(keep_from) {
        seg.file = None;
    }
}

/// Takes an exclusive advisory lock on `dir/LOCK` so two processes never share a log.
fn lock_dir(dir: &Path) -> Result<std::fs::File, WalError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| WalError::io("open lock", &path, e))?;
    // SAFETY: flock on a valid, owned descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => Err(WalError::Locked {
                path: dir.to_path_buf(),
            }),
            _ => Err(WalError::io("lock", &path, e)),
        };
    }
    Ok(file)
}

/// glommio decides once per device whether polled I/O works by reading the first DmaFile opened;
/// an empty or write-only file misleads it. Open a non-empty file on this filesystem first.
async fn probe_filesystem(dir: &Path) -> Result<(), WalError> {
    let path = dir.join("PROBE");
    let ok = std::fs::metadata(&path)
        .map(|m| m.len() >= BLOCK)
        .unwrap_or(false);
    if !ok {
        std::fs::write(&path, vec![b'p'; BLOCK_BYTES])
            .map_err(|e| WalError::io("write probe", &path, e))?;
    }
    let probe = DmaFile::open(&path)
        .await
        .map_err(|e| WalError::glommio("open probe", &path, e))?;
    probe
        .close()
        .await
        .map_err(|e| WalError::glommio("close probe", &path, e))
}
