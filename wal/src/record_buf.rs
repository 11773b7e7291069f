//! `RecordBuf`: a record built in place in a 4096-aligned DMA buffer, for zero-copy appends.
//!
//! The first 32 bytes are reserved for the record header; the caller writes the payload after
//! them (16-byte aligned, so an rkyv archive can be built there) and hands the buffer to
//! [`Wal::append_buf`](crate::Wal::append_buf), which frames it (header, crc) and writes the
//! buffer itself with O_DIRECT: the payload is never copied. Get one from
//! [`Wal::record_buf`](crate::Wal::record_buf), which reuses the buffers of finished rounds.

use glommio::io::DmaBuffer;

use crate::record::{record_bytes, HEADER_BYTES};
use crate::segment::BLOCK_BYTES;

/// A DMA buffer holding one record: header space, then the payload.
pub struct RecordBuf {
    pub(crate) buf: DmaBuffer,
    payload_len: usize,
}

impl RecordBuf {
    /// Wraps `buf` (4096-aligned, a whole number of blocks that holds at least a header) with an
    /// empty payload.
    pub(crate) fn from_dma(buf: DmaBuffer) -> RecordBuf {
        assert!(
            buf.len() % BLOCK_BYTES == 0 && buf.len() >= BLOCK_BYTES,
            "record buffer of {} bytes is not whole blocks",
            buf.len()
        );
        assert_eq!(
            buf.as_ptr() as usize % BLOCK_BYTES,
            0,
            "record buffer is not block-aligned"
        );
        RecordBuf {
            buf,
            payload_len: 0,
        }
    }

    /// Bytes a buffer for `payload_capacity` bytes of payload needs (whole blocks).
    pub fn buffer_bytes(payload_capacity: usize) -> usize {
        record_bytes(payload_capacity).div_ceil(BLOCK_BYTES) * BLOCK_BYTES
    }

    /// Most payload bytes this buffer can hold.
    pub fn payload_capacity(&self) -> usize {
        self.buf.len() - HEADER_BYTES
    }

    /// The whole payload area (`payload_capacity` bytes, 16-byte aligned); write the payload at
    /// its start, then call [`set_payload_len`](Self::set_payload_len).
    pub fn payload_area_mut(&mut self) -> &mut [u8] {
        &mut self.buf.as_bytes_mut()[HEADER_BYTES..]
    }

    /// Sets how many bytes of the payload area are the payload.
    ///
    /// Panics if `len` exceeds `payload_capacity`.
    pub fn set_payload_len(&mut self, len: usize) {
        assert!(
            len <= self.payload_capacity(),
            "payload of {len} bytes in a buffer for {}",
            self.payload_capacity()
        );
        self.payload_len = len;
    }

    /// Copies `payload` into the payload area and sets the length (for callers that have the
    /// bytes elsewhere; building the payload in place saves this copy).
    ///
    /// Panics if `payload` exceeds `payload_capacity`.
    pub fn set_payload(&mut self, payload: &[u8]) {
        self.set_payload_len(payload.len());
        self.payload_area_mut()[..payload.len()].copy_from_slice(payload);
    }

    /// Payload length.
    pub fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_bytes()[HEADER_BYTES..HEADER_BYTES + self.payload_len]
    }
}

impl std::fmt::Debug for RecordBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordBuf")
            .field("payload_len", &self.payload_len)
            .field("payload_capacity", &self.payload_capacity())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_sizes_are_whole_blocks_holding_the_record() {
        assert_eq!(RecordBuf::buffer_bytes(0), 4096);
        assert_eq!(RecordBuf::buffer_bytes(4096 - 32), 4096);
        assert_eq!(RecordBuf::buffer_bytes(4096 - 31), 8192);
        assert_eq!(RecordBuf::buffer_bytes(1 << 20), (1 << 20) + 4096);
    }
}
