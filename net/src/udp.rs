//! The UDP sockets under quinn, with kernel buffers sized for a node's traffic.
//!
//! A node serves clients, its peers' replication and forwarding on one UDP socket. With the
//! kernel's default receive buffer (208 KiB on most distributions) a net thread that is not
//! scheduled for a few milliseconds while a loaded cluster sends it ~100 MB/s overflows it:
//! on the development machine 1 % of datagrams were dropped (`RcvbufErrors` in
//! `/proc/net/snmp`) in a closed-loop run. QUIC recovers each loss, but a lost last packet of a
//! burst is only found by the probe timeout, which waits out the peer's acknowledgement delay
//! (25 ms), so about one request in fifteen took 25 ms longer than the rest.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Receive and send buffer asked for each socket. The kernel caps it at `net.core.rmem_max` /
/// `wmem_max` (docs/operations.md says how to raise them).
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// A UDP socket bound to `addr` whose buffers were asked to be [`UDP_BUFFER_BYTES`]; what the
/// kernel granted is logged when it is less.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Refusals (a sandbox) only leave the defaults: the socket still works.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    // Linux reports twice the size it was given (the doubling covers its bookkeeping).
    let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
    if granted < UDP_BUFFER_BYTES {
        tracing::warn!(
            %addr,
            granted,
            asked = UDP_BUFFER_BYTES,
            "UDP receive buffer capped by the kernel (net.core.rmem_max): bursts may drop packets"
        );
    }
    Ok(socket.into())
}

/// A quinn endpoint on a socket from [`bind`]; call inside the tokio runtime it runs on.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        bind(addr)?,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffers are asked for: the socket gets more than the kernel's usual default
    /// (208 KiB), up to what `rmem_max` allows, and still binds where asked.
    #[test]
    fn sockets_get_bigger_buffers_than_the_default() {
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(socket.local_addr().unwrap().ip().to_string(), "127.0.0.1");
        let granted = Socket::from(socket).recv_buffer_size().unwrap() / 2;
        assert!(granted >= UDP_BUFFER_BYTES.min(cap), "{granted} of {cap}");
    }
}
