//! Record framing: one log entry on disk.
//!
//! ```text
//! offset  size  field
//!      0     4  payload_len  u32 LE
//!      4     4  crc32        u32 LE, over bytes 0..4, 8..32 and the payload
//!      8     8  index        u64 LE (Raft index, >= 1)
//!     16     8  term         u64 LE
//!     24     4  magic        u32 LE, RECORD_MAGIC
//!     28     4  reserved     u32, zero
//!     32     n  payload
//!   32+n     …  zero padding up to a multiple of 16 bytes
//! ```
//! The header is 32 bytes so the payload starts 16-byte aligned in an aligned buffer, which lets
//! readers `rkyv::access` it in place. An all-zero header marks the end of the written data
//! (segments are preallocated with zeros, and index 0 is never a valid record).

/// Bytes of a record header.
pub const HEADER_BYTES: usize = 32;
/// Records start and end on this alignment.
pub const RECORD_ALIGN_BYTES: usize = 16;
/// Tags every record header, so garbage is told apart from a record with a bad checksum.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"BtRc");
/// Largest payload one record may carry (a batch is at most 4 MiB; the rest is headroom).
pub const PAYLOAD_BYTES_MAX: usize = (4 << 20) + (64 << 10);

/// Bytes a record with `payload_len` bytes of payload takes on disk, padding included.
pub const fn record_bytes(payload_len: usize) -> usize {
    (HEADER_BYTES + payload_len + RECORD_ALIGN_BYTES - 1) & !(RECORD_ALIGN_BYTES - 1)
}

/// A decoded, checksum-verified record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Payload length in bytes.
    pub payload_len: u32,
    /// Stored crc32.
    pub crc: u32,
    /// Raft index.
    pub index: u64,
    /// Raft term.
    pub term: u64,
}

impl RecordHeader {
    /// Bytes the whole record takes on disk.
    pub fn record_bytes(&self) -> usize {
        record_bytes(self.payload_len as usize)
    }
}

/// Why the bytes at some offset are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordFault {
    /// The magic field does not match.
    #[error("bad magic {found:#010x}")]
    BadMagic { found: u32 },
    /// The length field exceeds the maximum payload.
    #[error("payload length {len} exceeds the maximum {max}")]
    LengthTooLarge { len: u32, max: usize },
    /// The record runs past the end of the readable bytes.
    #[error("record needs {need} bytes but only {have} remain")]
    Truncated { need: usize, have: usize },
    /// The checksum does not match the contents.
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    /// The record is valid but not the index that must come next.
    #[error("index {found} where {expected} was expected")]
    IndexMismatch { expected: u64, found: u64 },
}

/// What lies at an offset of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordCheck {
    /// An all-zero header (or no room for a header): the end of the written data.
    End,
    /// A valid record.
    Record(RecordHeader),
    /// Bytes that are neither zero nor a valid record.
    Fault(RecordFault),
}

fn crc_of(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[0..4]);
    h.update(&header[8..HEADER_BYTES]);
    h.update(payload);
    h.finalize()
}

/// Writes one record (header, payload, zero padding) at the start of `dst`; returns its size.
///
/// Panics if `dst` is shorter than `record_bytes(payload.len())` or the payload is over the
/// maximum: callers check both before reserving space.
pub fn encode(dst: &mut [u8], index: u64, term: u64, payload: &[u8]) -> usize {
    assert!(
        payload.len() <= PAYLOAD_BYTES_MAX,
        "payload over PAYLOAD_BYTES_MAX"
    );
    assert!(index >= 1, "raft indexes start at 1");
    let size = record_bytes(payload.len());
    let dst = &mut dst[..size];
    let (header, rest) = dst.split_at_mut(HEADER_BYTES);
    header[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[8..16].copy_from_slice(&index.to_le_bytes());
    header[16..24].copy_from_slice(&term.to_le_bytes());
    header[24..28].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    header[28..32].fill(0);
    rest[..payload.len()].copy_from_slice(payload);
    rest[payload.len()..].fill(0);
    let crc = crc_of(header, payload);
    header[4..8].copy_from_slice(&crc.to_le_bytes());
    size
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Inspects the bytes at `pos` of `buf` (a segment image, or a record read back from disk).
pub fn check(buf: &[u8], pos: usize) -> RecordCheck {
    let Some(header) = buf.get(pos..pos + HEADER_BYTES) else {
        return RecordCheck::End;
    };
    if header.iter().all(|&b| b == 0) {
        return RecordCheck::End;
    }
    let magic = u32_at(header, 24);
    if magic != RECORD_MAGIC {
        return RecordCheck::Fault(RecordFault::BadMagic { found: magic });
    }
    let payload_len = u32_at(header, 0);
    if payload_len as usize > PAYLOAD_BYTES_MAX {
        return RecordCheck::Fault(RecordFault::LengthTooLarge {
            len: payload_len,
            max: PAYLOAD_BYTES_MAX,
        });
    }
    let have = buf.len() - pos - HEADER_BYTES;
    if (payload_len as usize) > have {
        return RecordCheck::Fault(RecordFault::Truncated {
            need: payload_len as usize,
            have,
        });
    }
    let payload = &buf[pos + HEADER_BYTES..pos + HEADER_BYTES + payload_len as usize];
    let stored = u32_at(header, 4);
    let computed = crc_of(header, payload);
    if stored != computed {
        return RecordCheck::Fault(RecordFault::CrcMismatch { stored, computed });
    }
    RecordCheck::Record(RecordHeader {
        payload_len,
        crc: stored,
        index: u64_at(header, 8),
        term: u64_at(header, 16),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_are_padded_to_sixteen() {
        assert_eq!(record_bytes(0), 32);
        assert_eq!(record_bytes(1), 48);
        assert_eq!(record_bytes(16), 48);
        assert_eq!(record_bytes(17), 64);
    }

    #[test]
    fn zero_header_is_end_and_short_buffer_is_end() {
        assert_eq!(check(&[0u8; 64], 0), RecordCheck::End);
        assert_eq!(check(&[1u8; 16], 0), RecordCheck::End);
    }

    proptest! {
        #[test]
        fn roundtrip(index in 1u64.., term: u64, payload in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut buf = vec![0u8; record_bytes(payload.len()) + 32];
            let n = encode(&mut buf, index, term, &payload);
            prop_assert_eq!(n, record_bytes(payload.len()));
            match check(&buf, 0) {
                RecordCheck::Record(h) => {
                    prop_assert_eq!((h.index, h.term, h.payload_len as usize), (index, term, payload.len()));
                    prop_assert_eq!(&buf[HEADER_BYTES..HEADER_BYTES + payload.len()], &payload[..]);
                }
                other => prop_assert!(false, "{:?}", other),
            }
            prop_assert_eq!(check(&buf, n), RecordCheck::End);
        }

        #[test]
        fn any_single_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..200), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut buf = vec![0u8; record_bytes(payload.len())];
            encode(&mut buf, 7, 3, &payload);
            // Padding bytes are not covered by the crc; flips there are harmless by design.
            let covered = HEADER_BYTES + payload.len();
            let at = at.index(covered);
            buf[at] ^= 1 << bit;
            prop_assert!(!matches!(check(&buf, 0), RecordCheck::Record(_)));
        }

        #[test]
        fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..300), pos in 0usize..300) {
            let _ = check(&buf, pos.min(buf.len()));
        }
    }
}
