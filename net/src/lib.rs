//! baton-net: QUIC endpoints, wire framing, TLS and the client library.
//!
//! Empty until the QUIC issue lands; the crate exists so the workspace layout is final.
