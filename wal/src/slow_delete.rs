//! Deleting large files a little at a time.
//!
//! Freeing a file's blocks is not free for the other writers of a disk. On a file system that
//! discards freed blocks as it goes (ext4 mounted with `discard`, as the development VM's root
//! is), the discards of a whole file are issued at the next journal commit, and the device
//! serves them ahead of the writes queued behind: deleting a 200 MB file and syncing the
//! directory held concurrent 4 KiB O_DSYNC writes for up to 15-17 ms there (p50 0.07 ms), and
//! three nodes each replacing a 44-88 MB snapshot file and deleting 64 MiB WAL segments at the
//! same log index stalled every node's group commit for ~60 ms at once. Freeing the same 200 MB
//! in 1 MiB steps, each synced, with a pause between them, kept those writes under 1.4 ms.
//!
//! So files that big are not unlinked where they stop being needed: they are renamed (or
//! hard-linked) to a name ending in [`TRASH_SUFFIX`] and handed to one deleter thread per
//! process, which truncates each by [`STEP_BYTES`] at a time, syncing and pausing
//! [`STEP_PAUSE`] after each step, and unlinks it once empty. A file with other links is only
//! unlinked (truncating it would empty the other names too). A file may wait for a condition
//! first ([`remove_when`]: a snapshot file still mapped must not shrink under its mapping).
//! Trash left by a process that died is found by [`sweep`] when its directory is opened again.
//! Errors are logged and leave the file for the next sweep: nothing depends on the space
//! coming back at once.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Suffix of files waiting to be deleted. Directories that hold trash ignore such files.
pub const TRASH_SUFFIX: &str = ".trash";
/// Bytes freed per step.
pub const STEP_BYTES: u64 = 1 << 20;
/// Pause after each step: with the sync before it, about 80-100 MiB/s freed.
pub const STEP_PAUSE: Duration = Duration::from_millis(10);
/// How often a file waiting for its condition is looked at again.
const RECHECK_EVERY: Duration = Duration::from_millis(50);

/// Whether a file handed to [`remove_when`] may be freed now.
pub type Ready = Box<dyn Fn() -> bool + Send>;

struct Job {
    path: PathBuf,
    ready: Option<Ready>,
}

struct Deleter {
    jobs: Mutex<Sender<Job>>,
    /// Files handed over and not yet done with.
    pending: Mutex<usize>,
    done: Condvar,
}

fn deleter() -> &'static Deleter {
    static DELETER: OnceLock<Deleter> = OnceLock::new();
    DELETER.get_or_init(|| {
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("baton-delete".into())
            .spawn(move || run(rx))
            .expect("spawn the file deleter thread");
        Deleter {
            jobs: Mutex::new(tx),
            pending: Mutex::new(0),
            done: Condvar::new(),
        }
    })
}

/// The trash name of `path`: `path` with [`TRASH_SUFFIX`] appended.
pub fn trash_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(TRASH_SUFFIX);
    PathBuf::from(name)
}

/// Renames `path` to its trash name (so it is gone from under its own name when this returns;
/// the caller syncs the directory if that must be durable) and has the deleter free it.
pub fn remove(path: &Path) -> io::Result<()> {
    let trash = trash_path(path);
    std::fs::rename(path, &trash)?;
    enqueue(trash, None);
    Ok(())
}

/// Has the deleter free `trash` (a name ending in [`TRASH_SUFFIX`]) once `ready` returns true.
pub fn remove_when(trash: PathBuf, ready: Ready) {
    enqueue(trash, Some(ready));
}

/// Hands every trash file in `dir` (left by a process that stopped before it was done) to the
/// deleter; returns how many.
pub fn sweep(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.ends_with(TRASH_SUFFIX))
        {
            enqueue(entry.path(), None);
            n += 1;
        }
    }
    Ok(n)
}

/// Blocks until every file handed over so far is deleted or given up on, or `timeout` passed;
/// returns whether the deleter is idle. For tests and benchmarks.
pub fn wait_idle(timeout: Duration) -> bool {
    let d = deleter();
    let pending = d.pending.lock().expect("deleter lock");
    let (pending, _) = d
        .done
        .wait_timeout_while(pending, timeout, |n| *n > 0)
        .expect("deleter lock");
    *pending == 0
}

fn enqueue(path: PathBuf, ready: Option<Ready>) {
    let d = deleter();
    *d.pending.lock().expect("deleter lock") += 1;
    let sent = d
        .jobs
        .lock()
        .expect("deleter lock")
        .send(Job { path, ready });
    if let Err(std::sync::mpsc::SendError(job)) = sent {
        tracing::warn!(path = %job.path.display(), "file deleter gone; trash left for the next sweep");
        finished(d);
    }
}

fn finished(d: &Deleter) {
    let mut pending = d.pending.lock().expect("deleter lock");
    *pending -= 1;
    if *pending == 0 {
        d.done.notify_all();
    }
}

fn run(rx: Receiver<Job>) {
    let d = deleter();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        // New work, or (with files waiting for their condition) a recheck after a while.
        let next = if waiting.is_empty() {
            rx.recv().map_err(|_| ())
        } else {
            match rx.recv_timeout(RECHECK_EVERY) {
                Ok(job) => Ok(job),
                Err(RecvTimeoutError::Timeout) => Err(()),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        match next {
            Ok(job) => waiting.push_back(job),
            Err(()) if waiting.is_empty() => return,
            Err(()) => {}
        }
        for _ in 0..waiting.len() {
            let job = waiting.pop_front().expect("counted");
            if job.ready.as_ref().is_some_and(|ready| !ready()) {
                waiting.push_back(job);
                continue;
            }
            if let Err(e) = free(&job.path) {
                tracing::warn!(path = %job.path.display(), error = %e, "could not delete trash file; left for the next sweep");
            }
            finished(d);
        }
    }
}

/// Truncates `path` a step at a time, then unlinks it. Gone already is fine.
fn free(path: &Path) -> io::Result<()> {
    let file = match OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    // Another name still holds the blocks: dropping this one frees nothing.
    if meta.nlink() == 1 {
        let mut len = meta.len();
        while len > 0 {
            len = len.saturating_sub(STEP_BYTES);
            file.set_len(len)?;
            file.sync_all()?;
            std::thread::sleep(STEP_PAUSE);
        }
    }
    drop(file);
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    fn file_of(path: &Path, len: usize) {
        std::fs::write(path, vec![7u8; len]).unwrap();
    }

    // The deleter is one per process and the tests share it: each waits for it to be idle, so
    // a test's files are done with when it looks.
    const IDLE: Duration = Duration::from_secs(30);

    #[test]
    fn a_removed_file_is_gone_at_once_and_its_trash_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment");
        file_of(&path, (3 * STEP_BYTES + 100) as usize);
        remove(&path).unwrap();
        assert!(!path.exists());
        assert!(wait_idle(IDLE));
        assert!(!trash_path(&path).exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_file_waits_for_its_condition() {
        let dir = tempfile::tempdir().unwrap();
        let trash = dir.path().join("old").with_extension("trash");
        file_of(&trash, 4096);
        let open = Arc::new(AtomicBool::new(false));
        let flag = open.clone();
        remove_when(trash.clone(), Box::new(move || flag.load(Ordering::SeqCst)));
        assert!(!wait_idle(Duration::from_millis(300)));
        assert_eq!(std::fs::metadata(&trash).unwrap().len(), 4096);
        open.store(true, Ordering::SeqCst);
        assert!(wait_idle(IDLE));
        assert!(!trash.exists());
    }

    #[test]
    fn a_trash_name_of_a_file_with_another_name_leaves_that_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let keep = dir.path().join("SNAPSHOT");
        file_of(&keep, (2 * STEP_BYTES) as usize);
        let trash = trash_path(&keep);
        std::fs::hard_link(&keep, &trash).unwrap();
        remove_when(trash.clone(), Box::new(|| true));
        assert!(wait_idle(IDLE));
        assert!(!trash.exists());
        assert_eq!(std::fs::metadata(&keep).unwrap().len(), 2 * STEP_BYTES);
    }

    #[test]
    fn sweep_deletes_trash_left_behind_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.wal.trash", "SNAPSHOT.1.trash"] {
            file_of(&dir.path().join(name), 10_000);
        }
        file_of(&dir.path().join("00000000000000000001.wal"), 10_000);
        assert_eq!(sweep(dir.path()).unwrap(), 2);
        assert!(wait_idle(IDLE));
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec!["00000000000000000001.wal".to_string()]);
    }
}
