//! baton-net: QUIC endpoints, wire framing, TLS and the client library.
//!
//! So far: the wire framing ([`frame`]), pure code tested without sockets. The QUIC endpoints,
//! TLS and `baton_net::Client` come with the QUIC issue.

pub mod frame;
pub mod msg;
pub mod tls;

pub use frame::{
    encode_frame, Frame, FrameDecoder, FrameKind, ProtocolError, FRAME_BYTES_MAX, WIRE_VERSION,
};
