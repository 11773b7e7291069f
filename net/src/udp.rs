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

/// Who a socket is for: a node's (warned about when its buffer is capped) or a client's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A node's endpoint: clients, peers, replication.
    Node,
    /// A client's endpoint. IPv6 sockets also reach IPv4 endpoints (as quinn's own client
    /// endpoints do), since a client may fail over to any endpoint of its list.
    Client,
}

/// A UDP socket bound to `addr` whose buffers were asked to be [`UDP_BUFFER_BYTES`]. A node
/// logs a warning when the kernel granted less (a client, of which tools make many, only a
/// debug line).
pub fn bind(addr: SocketAddr, role: Role) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if role == Role::Client && addr.is_ipv6() {
        if let Err(e) = socket.set_only_v6(false) {
            tracing::debug!(%addr, error = %e, "IPv6 client socket stays IPv6-only");
        }
    }
    // Refusals (a sandbox) only leave the defaults: the socket still works.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    let granted = granted(&socket);
    if granted < UDP_BUFFER_BYTES {
        let why =
            "UDP receive buffer capped by the kernel (net.core.rmem_max): bursts may drop packets";
        match role {
            Role::Node => tracing::warn!(%addr, granted, asked = UDP_BUFFER_BYTES, "{why}"),
            Role::Client => tracing::debug!(%addr, granted, asked = UDP_BUFFER_BYTES, "{why}"),
        }
    }
    Ok(socket.into())
}

/// The receive buffer the kernel granted `socket`, in the units it was asked in.
fn granted(socket: &Socket) -> usize {
    let reported = socket.recv_buffer_size().unwrap_or(0);
    // Linux reports twice the size it was given (the doubling covers its bookkeeping).
    if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    }
}

/// A quinn endpoint on a socket from [`bind`] (a node's when `server` is given). Must run
/// inside the tokio runtime the endpoint will use: outside one it is an error, not a panic.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other(
            "no tokio runtime to run the QUIC endpoint on",
        ));
    }
    let role = if server.is_some() {
        Role::Node
    } else {
        Role::Client
    };
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        bind(addr, role)?,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both buffers are asked for: where `rmem_max` allows more than the usual default
    /// (208 KiB), the socket gets more, up to [`UDP_BUFFER_BYTES`]; and it binds where asked.
    #[test]
    fn sockets_get_bigger_buffers_than_the_default() {
        const DEFAULT: usize = 212_992;
        let cap = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
        };
        let socket = bind("127.0.0.1:0".parse().unwrap(), Role::Node).unwrap();
        assert_eq!(socket.local_addr().unwrap().ip().to_string(), "127.0.0.1");
        let socket = Socket::from(socket);
        match (cap("rmem_max"), cap("wmem_max")) {
            (Some(r), Some(w)) if r > DEFAULT && w > DEFAULT => {
                assert!(granted(&socket) >= UDP_BUFFER_BYTES.min(r), "rmem_max {r}");
                let send = socket.send_buffer_size().unwrap() / 2;
                assert!(send >= UDP_BUFFER_BYTES.min(w), "{send} of wmem_max {w}");
            }
            caps => eprintln!("skipped: the kernel allows no more than the default ({caps:?})"),
        }
    }

    #[test]
    fn an_endpoint_outside_a_runtime_is_an_error() {
        let e = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap_err();
        assert!(e.to_string().contains("tokio runtime"), "{e}");
    }
}
