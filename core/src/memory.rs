//! Process-wide memory settings.
//!
//! Transparent huge pages are off in every baton process, except for what a node allocates
//! while it starts (`huge_pages_at_start` in node.toml, on by default) or, if its configuration
//! asks, everything (`transparent_huge_pages`). The allocator (mimalloc) asks for huge pages on
//! the large regions it maps; each first touch of one then clears 2 MiB, and memory the
//! allocator returns and takes back is cleared again. Under 2x overload on the development
//! machine that made every node stall for up to 1.9 s at once, the leader lost its followers,
//! and the cluster went through elections and sequenced nothing for seconds at a time
//! (34k–55k tx/s; 124k–164k with huge pages off, docs/performance.md); with the index reserved
//! at start, the open loop still saw 0.5–1.1 s stalls.
//!
//! A node's largest structures, though, are allocated and written once at start and probed at
//! random for every transaction: the idempotency index (~240 MiB) and each shard's dedup window
//! (64 MiB). On 4 KiB pages nearly every probe also misses the TLB. So a node allows huge pages
//! until it has started ([`set_transparent_huge_pages`]`(true)`, its tables are written), then
//! forbids them: what is already on huge pages stays there, nothing mapped later is, and no huge
//! page is faulted in while the node serves. Closed loop on the development VM: +11% (median of
//! five interleaved pairs), with no stall in the open loop.

use std::io;

/// Allows (`true`) or forbids (`false`) transparent huge pages for this process's memory,
/// mappings made before included (`prctl(PR_SET_THP_DISABLE)`; inherited by child processes).
pub fn set_transparent_huge_pages(enabled: bool) -> io::Result<()> {
    let disable = libc::c_ulong::from(!enabled);
    // SAFETY: PR_SET_THP_DISABLE only sets a flag on this process's memory map; the unused
    // arguments are zero as the call requires.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_THP_DISABLE,
            disable,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether transparent huge pages are allowed for this process (`prctl(PR_GET_THP_DISABLE)`).
pub fn transparent_huge_pages() -> io::Result<bool> {
    // SAFETY: PR_GET_THP_DISABLE reads a flag of this process's memory map.
    let rc = unsafe {
        libc::prctl(
            libc::PR_GET_THP_DISABLE,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    match rc {
        0 => Ok(true),
        1 => Ok(false),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pages_can_be_forbidden_and_allowed_again() {
        // A test thread shares the process with others; put the flag back as it was.
        let before = transparent_huge_pages().expect("read");
        set_transparent_huge_pages(false).expect("forbid");
        assert!(!transparent_huge_pages().unwrap());
        set_transparent_huge_pages(true).expect("allow");
        assert!(transparent_huge_pages().unwrap());
        set_transparent_huge_pages(before).expect("restore");
    }
}
