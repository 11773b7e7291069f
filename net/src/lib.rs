//! baton-net: QUIC endpoints, wire framing, TLS and the client library.
//!
//! - [`frame`], [`msg`]: the wire format (pure, tested without sockets); Raft message bodies are
//!   in `baton_core::raft::wire`.
//! - [`tls`]: the cluster CA, certificates and rustls/quinn configurations.
//! - [`server`]: a node's QUIC endpoint serving clients and peers; [`peer`]: dialing peers
//!   (openraft's network, forwarding); [`node`]: a networked node (core node + QUIC runtime).
//! - [`client`]: `Client`, for any tokio application.
//! - [`ports`]: listening ports for local clusters, chosen outside the kernel's ephemeral range.

pub mod client;
pub mod frame;
pub mod leader_msg;
pub mod member_msg;
pub mod metrics;
pub mod msg;
pub mod node;
pub mod peer;
pub mod ports;
pub mod rollup_msg;
pub mod server;
pub mod stream;
pub mod tls;
pub mod udp;

pub use client::{BlockStream, Client, ClientError, ClientOptions};
pub use frame::{
    encode_frame, Frame, FrameDecoder, FrameKind, ProtocolError, FRAME_BYTES_MAX, WIRE_VERSION,
};
pub use node::{NetNode, NetNodeConfig, NetNodeError, TlsPaths};
