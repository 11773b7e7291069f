//! Frames over one QUIC stream: a reader that yields whole frames (bounded by the frame maximum)
//! and writers that send a frame's header and body chunks without copying the body.

use bytes::Bytes;

use crate::frame::{
    frame_header, Frame, FrameDecoder, FrameKind, ProtocolError, PEER_FRAME_BYTES_MAX,
};

/// Bytes asked of the stream per read.
const READ_CHUNK_BYTES: usize = 256 << 10;

/// Why a stream stopped carrying frames.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The bytes are not a valid frame.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// Reading failed (connection lost, stream reset).
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing failed (connection lost, stream stopped).
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was already finished or reset.
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// Opening a stream or connecting failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A frame of a kind this side did not expect here.
    #[error("unexpected {kind:?} frame")]
    Unexpected { kind: FrameKind },
    /// The stream ended where a frame was required.
    #[error("stream ended before a {expected} frame")]
    Ended { expected: &'static str },
}

/// Reads frames from a receive stream.
pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FrameReader {
    /// Wraps a client stream's receive side (frames up to `FRAME_BYTES_MAX`).
    pub fn new(recv: quinn::RecvStream) -> FrameReader {
        FrameReader {
            recv,
            decoder: FrameDecoder::new(),
        }
    }

    /// Wraps a peer stream's receive side (frames up to `PEER_FRAME_BYTES_MAX`).
    pub fn peer(recv: quinn::RecvStream) -> FrameReader {
        FrameReader {
            recv,
            decoder: FrameDecoder::with_max(PEER_FRAME_BYTES_MAX),
        }
    }

    /// The next frame; `Ok(None)` when the peer finished the stream between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, StreamError> {
        loop {
            if let Some(f) = self.decoder.next_frame()? {
                return Ok(Some(f));
            }
            match self.recv.read_chunk(READ_CHUNK_BYTES, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    /// The next frame, which must exist.
    pub async fn expect(&mut self, expected: &'static str) -> Result<Frame, StreamError> {
        self.next().await?.ok_or(StreamError::Ended { expected })
    }

    /// Tells the peer to stop sending (e.g. after a protocol error).
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }
}

/// Writes one frame whose body is `body`.
pub async fn write_frame(
    send: &mut quinn::SendStream,
    kind: FrameKind,
    body: &[u8],
) -> Result<(), StreamError> {
    let header = frame_header(kind, body.len())?;
    // One buffer for small frames: one write, one packet.
    if body.len() <= 4096 {
        let mut buf = Vec::with_capacity(header.len() + body.len());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(body);
        send.write_all(&buf).await?;
    } else {
        send.write_all(&header).await?;
        send.write_all(body).await?;
    }
    Ok(())
}

/// Writes one frame whose body is the concatenation of `chunks`; the chunks are handed to
/// QUIC as they are (no copy).
pub async fn write_frame_chunks(
    send: &mut quinn::SendStream,
    kind: FrameKind,
    chunks: Vec<Bytes>,
) -> Result<(), StreamError> {
    let len = chunks.iter().map(Bytes::len).sum();
    let header = frame_header(kind, len)?;
    let mut all = Vec::with_capacity(chunks.len() + 1);
    all.push(Bytes::copy_from_slice(&header));
    all.extend(chunks.into_iter().filter(|c| !c.is_empty()));
    send.write_all_chunks(&mut all).await?;
    Ok(())
}
