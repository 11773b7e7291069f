//! Choosing listening ports for local clusters (`baton demo`, the multi-process tests).
//!
//! A port that is free when it is probed can still be taken before the node binds it. The
//! likeliest taker is any process's next outgoing UDP socket: every QUIC client binds an
//! ephemeral port, and the kernel hands those out from `net.ipv4.ip_local_port_range`
//! (32768–60999 by default). Listening ports are therefore chosen outside that range, where only
//! another explicit `bind` can collide with them.

use std::net::{TcpListener, UdpSocket};

/// The kernel's ephemeral port range, `(low, high)` inclusive; the Linux default where it
/// cannot be read.
pub fn ephemeral_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| parse_port_range(&s))
        .unwrap_or((32_768, 60_999))
}

fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    let low = it.next()?.ok()?;
    let high = it.next()?.ok()?;
    (low <= high).then_some((low, high))
}

/// The candidate base ports for `n` consecutive ports, in steps of 8 from 10000, that stay
/// clear of `ephemeral` on either side.
fn candidates(n: u16, ephemeral: (u16, u16)) -> Vec<u16> {
    let n = n.max(1);
    let (low, high) = ephemeral;
    (10_000u32..=u16::MAX as u32 - n as u32 + 1)
        .step_by(8)
        .filter(|&b| b + n as u32 <= low as u32 || b > high as u32)
        .map(|b| b as u16)
        .collect()
}

/// A base port `p` such that UDP ports `p..p + n` on 127.0.0.1 are free now and lie outside the
/// ephemeral range, and TCP ports with the same numbers too (a node's metrics endpoint may use
/// its QUIC port's number, `baton cluster up --metrics`). `seed` (a process id, say) spreads
/// concurrent callers over the candidates so that they rarely probe the same ones.
pub fn free_loopback_udp_ports(n: u16, seed: u32) -> Option<u16> {
    let all = candidates(n, ephemeral_port_range());
    if all.is_empty() {
        return None;
    }
    let start = seed as usize % all.len();
    // A stride coprime with most lengths walks the candidates without clustering.
    (0..all.len().min(256))
        .map(|i| all[(start + i * 37) % all.len()])
        .find(|&base| {
            (0..n).all(|i| {
                UdpSocket::bind(("127.0.0.1", base + i)).is_ok()
                    && TcpListener::bind(("127.0.0.1", base + i)).is_ok()
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_range_file_parses() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32_768, 60_999)));
        assert_eq!(parse_port_range("1024 65535"), Some((1_024, 65_535)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("x"), None);
    }

    #[test]
    fn candidates_never_overlap_the_ephemeral_range() {
        for (n, eph) in [
            (3, (32_768, 60_999)),
            (5, (20_000, 20_100)),
            (1, (10_000, 65_000)),
        ] {
            let c = candidates(n, eph);
            assert!(!c.is_empty(), "{n} {eph:?}");
            for b in c {
                let (first, last) = (b as u32, b as u32 + n as u32 - 1);
                assert!(
                    last < eph.0 as u32 || first > eph.1 as u32,
                    "{b} {n} {eph:?}"
                );
                assert!(last <= u16::MAX as u32);
            }
        }
        // The whole range ephemeral above 10000: no candidate.
        assert!(candidates(3, (1_024, 65_535)).is_empty());
    }

    #[test]
    fn a_chosen_range_is_bindable_and_outside_the_ephemeral_range() {
        let (low, high) = ephemeral_port_range();
        let base = free_loopback_udp_ports(3, std::process::id()).expect("a free range");
        assert!(base as u32 + 2 < low as u32 || base > high);
        for i in 0..3 {
            UdpSocket::bind(("127.0.0.1", base + i)).expect("still free");
            TcpListener::bind(("127.0.0.1", base + i)).expect("free for TCP too");
        }
    }
}
