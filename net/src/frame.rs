//! Wire framing: every message on a QUIC stream is one frame.
//!
//! ```text
//! offset  size  field
//!      0     4  len      u32 LE: bytes after this field (version + kind + body), ≥ 2
//!      4     1  version  protocol version (WIRE_VERSION)
//!      5     1  kind     message kind (`FrameKind`)
//!      6     …  body     len - 2 bytes
//! ```
//! Frames larger than `FRAME_BYTES_MAX` are refused before any of the body is buffered. The
//! decoder is pure (bytes in, frames out, no I/O), so it is tested without sockets.

use std::collections::VecDeque;

/// Protocol version carried by every frame.
pub const WIRE_VERSION: u8 = 3;
/// Bytes before the body.
pub const FRAME_HEADER_BYTES: usize = 6;
/// Largest frame (header included): a maximum batch (4 MiB) plus room for framing and headers.
pub const FRAME_BYTES_MAX: usize = (4 << 20) + (64 << 10);
/// Largest frame between peers (mutually authenticated): one replication request carries up to
/// `baton_core::raft::wire::APPEND_BYTES_MAX` of entries, plus room for headers.
pub const PEER_FRAME_BYTES_MAX: usize = baton_core::raft::wire::APPEND_BYTES_MAX + (64 << 10);

/// Message kinds. Client kinds are below 64, peer kinds from 64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Client → node: transactions to sequence.
    SubmitRequest = 1,
    /// Node → client: one result per submitted transaction.
    SubmitResponse = 2,
    /// Client → node: cluster status.
    StatusRequest = 3,
    /// Node → client: status.
    StatusResponse = 4,
    /// Either way: a typed error that ends the request.
    Error = 5,
    /// Client → node: a control command (register a rollup, reveal a key).
    CommandRequest = 6,
    /// Node → client: the command's outcome.
    CommandResponse = 7,
    /// Client → node: a read (transaction, block, rollup) at a consistency level.
    ReadRequest = 8,
    /// Node → client: what the read found.
    ReadResponse = 9,
    /// Client → node, opening a stream of its own: a block subscription.
    SubscribeRequest = 10,
    /// Node → client: one block of a subscription.
    BlockEvent = 11,
    /// Client → node: the node's stage latencies since the last such request.
    StagesRequest = 12,
    /// Node → client: the stage latencies.
    StagesResponse = 13,
    /// Client → node: a membership change (add or remove a node; needs a client certificate).
    MemberRequest = 14,
    /// Node → client: the membership after the change, or why it was refused.
    MemberResponse = 15,
    /// Client → node: move leadership to another voter (needs a client certificate).
    LeaderRequest = 16,
    /// Node → client: who leads after the transfer, or why it did not happen.
    LeaderResponse = 17,
    /// Peer → peer: Raft AppendEntries.
    RaftAppend = 64,
    /// Peer → peer: Raft vote.
    RaftVote = 65,
    /// Peer → peer: a snapshot chunk.
    RaftSnapshot = 66,
    /// Peer → peer: a Raft response.
    RaftResponse = 67,
    /// Follower → leader: a sealed batch to propose.
    Forward = 68,
    /// Peer → peer: the first frame on a peer connection (cluster id and node id).
    PeerHello = 69,
    /// Leader → follower: the outcome of a forwarded batch.
    ForwardResponse = 70,
    /// Peer → peer: raw snapshot data following a `RaftSnapshot` header.
    RaftSnapshotChunk = 71,
    /// Follower → leader: confirm leadership and send the read index.
    ReadIndex = 72,
    /// Leader → follower: the read index, or why there is none.
    ReadIndexResponse = 73,
    /// Leader → follower, on a `Forward` stream before its `ForwardResponse`: the leader signed
    /// the forwarded batch (its preconfirmation).
    ForwardSealed = 74,
    /// Leader → follower: take over leadership now (the leader is stopping).
    RaftTransferLeader = 75,
}

impl FrameKind {
    /// The kind for a byte, if it is one.
    pub fn from_u8(b: u8) -> Option<FrameKind> {
        use FrameKind::*;
        Some(match b {
            1 => SubmitRequest,
            2 => SubmitResponse,
            3 => StatusRequest,
            4 => StatusResponse,
            5 => Error,
            6 => CommandRequest,
            7 => CommandResponse,
            8 => ReadRequest,
            9 => ReadResponse,
            10 => SubscribeRequest,
            11 => BlockEvent,
            12 => StagesRequest,
            13 => StagesResponse,
            14 => MemberRequest,
            15 => MemberResponse,
            16 => LeaderRequest,
            17 => LeaderResponse,
            64 => RaftAppend,
            65 => RaftVote,
            66 => RaftSnapshot,
            67 => RaftResponse,
            68 => Forward,
            69 => PeerHello,
            70 => ForwardResponse,
            71 => RaftSnapshotChunk,
            72 => ReadIndex,
            73 => ReadIndexResponse,
            74 => ForwardSealed,
            75 => RaftTransferLeader,
            _ => return None,
        })
    }
}

/// Why bytes on a stream are not a valid frame. The connection (or stream) that sent them is
/// closed with this reason; nothing is passed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The length field announces more than the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: usize, max: usize },
    /// The length field is too small to hold version and kind.
    #[error("frame length {len} is too small")]
    FrameTooSmall { len: usize },
    /// A version this build does not speak.
    #[error("unsupported protocol version {found} (this build speaks {supported})")]
    UnsupportedVersion { found: u8, supported: u8 },
    /// A kind byte that names no message.
    #[error("unknown message kind {kind}")]
    UnknownKind { kind: u8 },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} of {expected} bytes)")]
    Truncated { buffered: usize, expected: usize },
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Message kind.
    pub kind: FrameKind,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl FrameKind {
    /// Largest frame of this kind: peer kinds (64 and up) may be as large as
    /// `PEER_FRAME_BYTES_MAX`, client kinds `FRAME_BYTES_MAX`.
    pub fn frame_bytes_max(self) -> usize {
        if self as u8 >= 64 {
            PEER_FRAME_BYTES_MAX
        } else {
            FRAME_BYTES_MAX
        }
    }
}

/// The header of a frame whose body is `body_len` bytes, so a sender can write the header and
/// then the body in chunks without copying it; refuses a frame over its kind's maximum.
pub fn frame_header(
    kind: FrameKind,
    body_len: usize,
) -> Result<[u8; FRAME_HEADER_BYTES], ProtocolError> {
    let total = FRAME_HEADER_BYTES.saturating_add(body_len);
    let max = kind.frame_bytes_max();
    if total > max {
        return Err(ProtocolError::FrameTooLarge { len: total, max });
    }
    // Fits: FRAME_BYTES_MAX is far below u32::MAX.
    let len = ((total - 4) as u32).to_le_bytes();
    Ok([len[0], len[1], len[2], len[3], WIRE_VERSION, kind as u8])
}

/// Appends one frame to `out`.
pub fn encode_frame(kind: FrameKind, body: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let header = frame_header(kind, body.len())?;
    out.reserve(FRAME_HEADER_BYTES + body.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    Ok(())
}

/// A body's first allocation when its header arrives: the whole body up to this size, beyond
/// it what has arrived so far (a header alone must not make the node allocate a maximum frame).
const BODY_RESERVE_BYTES: usize = 256 << 10;

/// Incremental decoder for one stream: feed it bytes as they arrive, take frames out.
///
/// Each body is copied once, from the received chunks into a buffer of the body's own size,
/// and handed out as it is: no buffer of the whole stream that grows, is copied out of and
/// shifted down frame by frame.
pub struct FrameDecoder {
    /// The next frame's header bytes received so far (fewer than `FRAME_HEADER_BYTES`).
    head: Vec<u8>,
    /// The frame whose header has been read: its kind, body length and body so far.
    body: Option<(FrameKind, usize, Vec<u8>)>,
    /// Whole frames not yet taken out, in stream order.
    ready: VecDeque<Frame>,
    /// Bytes of the frames in `ready` (headers included).
    ready_bytes: usize,
    /// Largest frame accepted.
    max: usize,
    /// Set at the first invalid header: returned after the frames before it, then for good.
    failed: Option<ProtocolError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::with_max(FRAME_BYTES_MAX)
    }
}

impl FrameDecoder {
    /// A decoder for a new client stream (frames up to `FRAME_BYTES_MAX`).
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// A decoder accepting frames up to `max` bytes (peer streams: `PEER_FRAME_BYTES_MAX`).
    pub fn with_max(max: usize) -> FrameDecoder {
        FrameDecoder {
            head: Vec::with_capacity(FRAME_HEADER_BYTES),
            body: None,
            ready: VecDeque::new(),
            ready_bytes: 0,
            max,
            failed: None,
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.failed.is_none() {
            if let Some((_, len, body)) = &mut self.body {
                let n = (*len - body.len()).min(bytes.len());
                if body.capacity() - body.len() < n {
                    // Grows with what arrives, never past the body's length.
                    let want = (body.capacity() * 2).max(body.len() + n).min(*len);
                    body.reserve_exact(want - body.len());
                }
                body.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                self.take_complete_body();
                continue;
            }
            let n = (FRAME_HEADER_BYTES - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            match check_header(&self.head, self.max) {
                Err(e) => {
                    self.failed = Some(e);
                    self.head = Vec::new();
                }
                Ok(Some((kind, len))) => {
                    self.head.clear();
                    let first = len.min(BODY_RESERVE_BYTES.max(bytes.len()));
                    self.body = Some((kind, len, Vec::with_capacity(first)));
                    self.take_complete_body();
                }
                Ok(None) => {}
            }
        }
    }

    /// Moves the body being read to `ready` if it is whole.
    fn take_complete_body(&mut self) {
        if let Some((kind, len, body)) = self.body.take_if(|(_, len, body)| body.len() == *len) {
            self.ready_bytes += FRAME_HEADER_BYTES + len;
            self.ready.push_back(Frame { kind, body });
        }
    }

    /// Bytes buffered and not yet returned in a frame: at most the frames completed by the
    /// last push, and one frame's header and part of its body.
    pub fn buffered(&self) -> usize {
        let partial = match &self.body {
            Some((_, _, body)) => FRAME_HEADER_BYTES + body.len(),
            None => self.head.len(),
        };
        self.ready_bytes + partial
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error every call
    /// returns that error (once the frames before the bad one are taken).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if let Some(frame) = self.ready.pop_front() {
            self.ready_bytes -= FRAME_HEADER_BYTES + frame.body.len();
            return Ok(Some(frame));
        }
        match self.failed {
            Some(e) => {
                self.body = None;
                Err(e)
            }
            None => Ok(None),
        }
    }

    /// Call when the stream ended: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let (buffered, expected) = match &self.body {
            Some((_, len, body)) => (FRAME_HEADER_BYTES + body.len(), FRAME_HEADER_BYTES + len),
            None if self.head.is_empty() => return Ok(()),
            None => {
                let expected = match self.head.get(..4) {
                    Some(b) => 4 + u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
                    None => 4,
                };
                (self.head.len(), expected)
            }
        };
        Err(ProtocolError::Truncated { buffered, expected })
    }
}

/// Checks a frame header as far as it has arrived (`head`: up to `FRAME_HEADER_BYTES`); its
/// kind and body length once it is whole. Every check runs as soon as its byte is there, so a
/// bad frame is refused before any of its body is buffered.
fn check_header(head: &[u8], max: usize) -> Result<Option<(FrameKind, usize)>, ProtocolError> {
    let Some(b) = head.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    if 4 + len > max {
        return Err(ProtocolError::FrameTooLarge { len: 4 + len, max });
    }
    if len < 2 {
        return Err(ProtocolError::FrameTooSmall { len });
    }
    if let Some(&version) = head.get(4) {
        if version != WIRE_VERSION {
            return Err(ProtocolError::UnsupportedVersion {
                found: version,
                supported: WIRE_VERSION,
            });
        }
    }
    let Some(&kind) = head.get(5) else {
        return Ok(None);
    };
    let kind = FrameKind::from_u8(kind).ok_or(ProtocolError::UnknownKind { kind })?;
    Ok(Some((kind, len - 2)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kinds() -> impl Strategy<Value = FrameKind> {
        prop::sample::select(vec![
            FrameKind::SubmitRequest,
            FrameKind::SubmitResponse,
            FrameKind::StatusRequest,
            FrameKind::StatusResponse,
            FrameKind::Error,
            FrameKind::RaftAppend,
            FrameKind::RaftVote,
            FrameKind::RaftSnapshot,
            FrameKind::RaftResponse,
            FrameKind::Forward,
            FrameKind::PeerHello,
            FrameKind::ForwardResponse,
            FrameKind::RaftSnapshotChunk,
        ])
    }

    proptest! {
        /// Frames survive any split of the byte stream into chunks.
        #[test]
        fn frames_roundtrip_through_any_chunking(
            frames in prop::collection::vec((kinds(), prop::collection::vec(any::<u8>(), 0..300)), 0..20),
            cuts in prop::collection::vec(1usize..64, 1..50),
        ) {
            let mut wire = Vec::new();
            for (k, body) in &frames {
                encode_frame(*k, body, &mut wire).unwrap();
            }
            let mut d = FrameDecoder::new();
            let mut out = Vec::new();
            let mut at = 0;
            for c in cuts.iter().cycle() {
                if at >= wire.len() { break; }
                let end = (at + c).min(wire.len());
                d.push(&wire[at..end]);
                at = end;
                while let Some(f) = d.next_frame().unwrap() {
                    out.push((f.kind, f.body));
                }
            }
            prop_assert!(d.finish().is_ok());
            prop_assert_eq!(out, frames);
        }

        /// Garbage never panics and never buffers more than one maximum frame.
        #[test]
        fn garbage_is_refused_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
            let mut d = FrameDecoder::new();
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame() {}
            prop_assert!(d.buffered() <= FRAME_BYTES_MAX);
            let _ = d.finish();
        }
    }

    #[test]
    fn bad_frames_get_typed_errors() {
        let mut d = FrameDecoder::new();
        d.push(&(u32::MAX).to_le_bytes());
        assert_eq!(
            d.next_frame(),
            Err(ProtocolError::FrameTooLarge {
                len: 4 + u32::MAX as usize,
                max: FRAME_BYTES_MAX
            })
        );
        // The error sticks; later bytes are ignored.
        d.push(&[1, 2, 3]);
        assert!(d.next_frame().is_err());

        let mut d = FrameDecoder::new();
        d.push(&[1, 0, 0, 0, 1]);
        assert_eq!(d.next_frame(), Err(ProtocolError::FrameTooSmall { len: 1 }));

        let mut d = FrameDecoder::new();
        d.push(&[2, 0, 0, 0, 9, 1]);
        assert_eq!(
            d.next_frame(),
            Err(ProtocolError::UnsupportedVersion {
                found: 9,
                supported: WIRE_VERSION
            })
        );

        let mut d = FrameDecoder::new();
        d.push(&[2, 0, 0, 0, WIRE_VERSION, 200]);
        assert_eq!(
            d.next_frame(),
            Err(ProtocolError::UnknownKind { kind: 200 })
        );

        let mut d = FrameDecoder::new();
        let mut wire = Vec::new();
        encode_frame(FrameKind::SubmitRequest, b"hello", &mut wire).unwrap();
        d.push(&wire[..wire.len() - 2]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(
            d.finish(),
            Err(ProtocolError::Truncated {
                buffered: wire.len() - 2,
                expected: wire.len()
            })
        );

        let big = vec![0u8; FRAME_BYTES_MAX];
        assert!(matches!(
            encode_frame(FrameKind::SubmitRequest, &big, &mut Vec::new()),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn frames_before_a_bad_header_come_out_before_its_error() {
        let mut wire = Vec::new();
        encode_frame(FrameKind::SubmitRequest, b"one", &mut wire).unwrap();
        encode_frame(FrameKind::StatusRequest, b"", &mut wire).unwrap();
        wire.extend_from_slice(&[2, 0, 0, 0, WIRE_VERSION, 200]);
        encode_frame(FrameKind::SubmitRequest, b"after", &mut wire).unwrap();
        let mut d = FrameDecoder::new();
        d.push(&wire);
        let first = d.next_frame().unwrap().unwrap();
        assert_eq!(
            (first.kind, first.body.as_slice()),
            (FrameKind::SubmitRequest, &b"one"[..])
        );
        let second = d.next_frame().unwrap().unwrap();
        assert_eq!(
            (second.kind, second.body.len()),
            (FrameKind::StatusRequest, 0)
        );
        assert_eq!(
            d.next_frame(),
            Err(ProtocolError::UnknownKind { kind: 200 })
        );
        assert_eq!(
            d.next_frame(),
            Err(ProtocolError::UnknownKind { kind: 200 })
        );
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn a_body_is_allocated_by_what_arrives_and_never_past_its_length() {
        // A header alone announcing a 4 MiB body: the decoder holds far less than that.
        let len = FRAME_BYTES_MAX - FRAME_HEADER_BYTES;
        let mut d = FrameDecoder::new();
        d.push(&frame_header(FrameKind::SubmitRequest, len).unwrap());
        let capacity = |d: &FrameDecoder| d.body.as_ref().map(|(_, _, b)| b.capacity());
        assert_eq!(capacity(&d), Some(BODY_RESERVE_BYTES));
        // Fed in 1,200-byte pieces (QUIC packets), the buffer ends exactly the body's size.
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        for piece in body.chunks(1200) {
            d.push(piece);
            assert!(capacity(&d).is_none_or(|c| c <= len));
        }
        let frame = d.next_frame().unwrap().unwrap();
        assert_eq!(frame.body.capacity(), len);
        assert!(frame.body == body);
        assert_eq!(d.finish(), Ok(()));
        // A small frame gets its whole body at once.
        d.push(&frame_header(FrameKind::SubmitRequest, 1000).unwrap());
        assert_eq!(capacity(&d), Some(1000));
    }

    #[test]
    fn header_then_body_chunks_is_a_frame() {
        let chunks: [&[u8]; 3] = [b"abc", b"", b"defg"];
        let body: Vec<u8> = chunks.concat();
        let mut wire = frame_header(FrameKind::RaftAppend, body.len())
            .unwrap()
            .to_vec();
        for c in chunks {
            wire.extend_from_slice(c);
        }
        let mut expected = Vec::new();
        encode_frame(FrameKind::RaftAppend, &body, &mut expected).unwrap();
        assert_eq!(wire, expected);

        let largest = FRAME_BYTES_MAX - FRAME_HEADER_BYTES;
        assert!(frame_header(FrameKind::SubmitRequest, largest).is_ok());
        assert_eq!(
            frame_header(FrameKind::SubmitRequest, largest + 1),
            Err(ProtocolError::FrameTooLarge {
                len: FRAME_BYTES_MAX + 1,
                max: FRAME_BYTES_MAX
            })
        );
        // Peer frames may be larger (replication requests of many batches).
        let largest = PEER_FRAME_BYTES_MAX - FRAME_HEADER_BYTES;
        assert!(frame_header(FrameKind::RaftAppend, largest).is_ok());
        assert_eq!(
            frame_header(FrameKind::RaftAppend, largest + 1),
            Err(ProtocolError::FrameTooLarge {
                len: PEER_FRAME_BYTES_MAX + 1,
                max: PEER_FRAME_BYTES_MAX
            })
        );
        let mut d = FrameDecoder::new();
        d.push(&frame_header(FrameKind::RaftAppend, FRAME_BYTES_MAX).unwrap());
        assert!(matches!(
            d.next_frame(),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        let mut d = FrameDecoder::with_max(PEER_FRAME_BYTES_MAX);
        d.push(&frame_header(FrameKind::RaftAppend, FRAME_BYTES_MAX).unwrap());
        assert_eq!(d.next_frame(), Ok(None));
        assert!(frame_header(FrameKind::Forward, usize::MAX).is_err());
    }

    #[test]
    fn every_kind_byte_round_trips() {
        for b in 0..=u8::MAX {
            if let Some(kind) = FrameKind::from_u8(b) {
                assert_eq!(kind as u8, b);
            }
        }
        for kind in [
            FrameKind::PeerHello,
            FrameKind::ForwardResponse,
            FrameKind::RaftSnapshotChunk,
        ] {
            assert_eq!(FrameKind::from_u8(kind as u8), Some(kind));
        }
    }
}
