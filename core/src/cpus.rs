//! CPU placement: which CPUs this process may run on, pinning a thread to some of them, and the
//! checks a node's `shard_cpus` / `net_cpus` settings go through before any thread starts.
//!
//! On a machine a node owns, pinning each shard to its own core and the QUIC runtime to others
//! keeps caches warm and threads from migrating or queueing behind one another
//! (docs/performance.md, "Tuning knobs"). Every CPU named must be in the process's affinity mask
//! (`taskset`, cgroup cpusets): a node refuses to start otherwise, with the allowed list in the
//! error, rather than failing in a thread later.
//!
//! A thread inherits its creator's mask, so helper threads a pinned shard starts for work that
//! must stay off the shard's core (the nonce pool, the snapshot encoder) call
//! [`release_current_thread`] first: they go back to the mask the node started with
//! ([`remember_start_mask`]).

use std::io;
use std::sync::OnceLock;

/// The mask of the thread that started the node, before any pinning.
static START_MASK: OnceLock<Vec<usize>> = OnceLock::new();

/// Records the calling thread's mask as the one helper threads go back to. Called by the node
/// before it starts its threads; only the first call records.
pub fn remember_start_mask() {
    if START_MASK.get().is_none() {
        if let Ok(mask) = allowed() {
            let _ = START_MASK.set(mask);
        }
    }
}

/// Puts the calling thread back on the mask recorded by [`remember_start_mask`] (nothing when
/// none was recorded, or when the thread already has it). Errors are the caller's to log.
pub fn release_current_thread() -> io::Result<()> {
    let Some(start) = START_MASK.get() else {
        return Ok(());
    };
    if allowed()? == *start {
        return Ok(());
    }
    pin_current_thread(start)
}

/// The CPUs the calling thread may run on (its affinity mask, the process's unless the thread
/// was pinned), ascending.
pub fn allowed() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

/// Restricts the calling thread to `cpus` (threads it starts later inherit the mask).
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no CPU to pin to",
        ));
    }
    // SAFETY: as in `allowed`; CPU_SET is only called with indices below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            if c >= libc::CPU_SETSIZE as usize {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("CPU {c} is beyond the {} a mask holds", libc::CPU_SETSIZE),
                ));
            }
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Checks a CPU list setting named `what` against `allowed`: non-empty, no CPU twice (when
/// `distinct`), every CPU allowed. The error says which CPU and what is allowed.
pub fn check(what: &str, cpus: &[usize], distinct: bool, allowed: &[usize]) -> Result<(), String> {
    if cpus.is_empty() {
        return Err(format!("{what} is empty: leave it out to not pin"));
    }
    if distinct {
        let mut seen = cpus.to_vec();
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!(
                "{what} names CPU {} twice: one shard per CPU",
                w[0]
            ));
        }
    }
    if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
        return Err(format!(
            "{what}: CPU {c} is not one this process may run on (allowed: {})",
            list(allowed)
        ));
    }
    Ok(())
}

/// `cpus` in the kernel's list format (`0-3,6`), as `/proc/*/status` shows `Cpus_allowed_list`.
pub fn list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        out.push(if sorted[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", sorted[i])
        });
        i += 1;
    }
    out.join(",")
}

/// The `Cpus_allowed_list` (the kernel's list format, as [`list`] writes it) of each thread of
/// process `pid` named `name`: how to see where a node's threads may run (`baton-N-s0`,
/// `baton-N-net`, `baton-N-nonce`). Threads that exit while being read are skipped.
pub fn thread_cpu_lists(pid: u32, name: &str) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        if let Some(l) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            out.push(l.trim().to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_read_as_the_kernel_writes_them() {
        assert_eq!(list(&[]), "");
        assert_eq!(list(&[3]), "3");
        assert_eq!(list(&[0, 1, 2, 3, 6]), "0-3,6");
        assert_eq!(list(&[6, 1, 0, 1, 9, 8]), "0-1,6,8-9");
    }

    #[test]
    fn a_setting_must_name_distinct_allowed_cpus() {
        let allowed = [0, 1, 2, 3];
        assert_eq!(check("shard_cpus", &[2, 3], true, &allowed), Ok(()));
        assert_eq!(check("net_cpus", &[1, 1], false, &allowed), Ok(()));
        let e = check("shard_cpus", &[], true, &allowed).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = check("shard_cpus", &[1, 2, 1], true, &allowed).unwrap_err();
        assert!(e.contains("CPU 1 twice"), "{e}");
        let e = check("net_cpus", &[0, 7], false, &allowed).unwrap_err();
        assert!(
            e.contains("net_cpus: CPU 7") && e.contains("allowed: 0-3"),
            "{e}"
        );
    }

    #[test]
    fn a_pinned_thread_runs_only_where_it_was_pinned() {
        let allowed = allowed().expect("sched_getaffinity");
        assert!(!allowed.is_empty());
        let target = *allowed.last().unwrap();
        let seen = std::thread::Builder::new()
            .name("cpus-pin-test".into())
            .spawn(move || {
                pin_current_thread(&[target]).expect("pin");
                // A thread it starts inherits the mask.
                let child = std::thread::spawn(super::allowed).join().unwrap();
                let shown = thread_cpu_lists(std::process::id(), "cpus-pin-test").expect("/proc");
                (
                    super::allowed().expect("mask"),
                    child.expect("child mask"),
                    shown,
                )
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(seen, (vec![target], vec![target], vec![list(&[target])]));
        // This thread was not touched.
        assert_eq!(super::allowed().unwrap(), allowed);
        assert!(pin_current_thread(&[]).is_err());
        assert!(pin_current_thread(&[1 << 20]).is_err());
    }

    #[test]
    fn a_released_thread_goes_back_to_the_start_mask() {
        remember_start_mask();
        let start = START_MASK.get().expect("recorded").clone();
        let target = *start.last().unwrap();
        let seen = std::thread::spawn(move || {
            pin_current_thread(&[target]).expect("pin");
            std::thread::spawn(|| {
                release_current_thread().expect("release");
                allowed().expect("mask")
            })
            .join()
            .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, start);
    }
}
