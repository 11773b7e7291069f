//! Segment files: naming and the header block.
//!
//! A segment is a preallocated file named `{first_index:020}.wal`. Its first 4096 bytes are a
//! header block; records start at offset 4096 and are packed back to back (see `record.rs`).
//!
//! ```text
//! offset  size  field
//!      0     8  magic           b"BATONWAL"
//!      8     4  format version  u32 LE (1)
//!     12     4  crc32           u32 LE, over bytes 0..12 and 16..40
//!     16     8  first_index     u64 LE, index of the segment's first record
//!     24     8  segment_bytes   u64 LE, preallocated size
//!     32     8  torn_window     u64 LE, most bytes the writer leaves unsynced (see recovery.rs)
//!     40  4056  zero
//! ```

use std::path::{Path, PathBuf};

/// Size of the header block; also the O_DIRECT alignment every write uses.
pub const BLOCK_BYTES: usize = 4096;
/// Magic at the start of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"BATONWAL";
/// On-disk format version written by this code.
pub const FORMAT_VERSION: u32 = 1;
/// File name suffix of segments.
pub const SEGMENT_SUFFIX: &str = ".wal";

/// The decoded header block of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Index of the first record the segment holds.
    pub first_index: u64,
    /// Preallocated size of the file.
    pub segment_bytes: u64,
    /// Most bytes its writer could leave written but not yet synced at any time.
    pub torn_window_bytes: u64,
}

/// Why a segment header block is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderFault {
    /// The block is all zero: the file was created but its header never reached the disk.
    #[error("header block is zero (segment creation did not complete)")]
    Zero,
    /// The file is shorter than a header block.
    #[error("file is shorter than the header block")]
    Short,
    /// Magic mismatch: not a baton segment.
    #[error("not a baton WAL segment (bad magic)")]
    BadMagic,
    /// Written by an unknown format version.
    #[error("unsupported format version {version}")]
    Version { version: u32 },
    /// Checksum mismatch.
    #[error("header crc mismatch")]
    Crc,
}

fn header_crc(block: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&block[0..12]);
    h.update(&block[16..40]);
    h.finalize()
}

impl SegmentHeader {
    /// Writes the header block into `block` (at least BLOCK_BYTES long).
    pub fn encode(&self, block: &mut [u8]) {
        let block = &mut block[..BLOCK_BYTES];
        block.fill(0);
        block[0..8].copy_from_slice(&SEGMENT_MAGIC);
        block[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        block[16..24].copy_from_slice(&self.first_index.to_le_bytes());
        block[24..32].copy_from_slice(&self.segment_bytes.to_le_bytes());
        block[32..40].copy_from_slice(&self.torn_window_bytes.to_le_bytes());
        let crc = header_crc(block);
        block[12..16].copy_from_slice(&crc.to_le_bytes());
    }

    /// Reads and checks the header block at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, HeaderFault> {
        let block = bytes.get(..BLOCK_BYTES).ok_or(HeaderFault::Short)?;
        if block.iter().all(|&b| b == 0) {
            return Err(HeaderFault::Zero);
        }
        if block[0..8] != SEGMENT_MAGIC {
            return Err(HeaderFault::BadMagic);
        }
        let u64_at = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(block[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(HeaderFault::Version { version });
        }
        let stored = u32::from_le_bytes(block[12..16].try_into().expect("4 bytes"));
        if stored != header_crc(block) {
            return Err(HeaderFault::Crc);
        }
        Ok(SegmentHeader {
            first_index: u64_at(16),
            segment_bytes: u64_at(24),
            torn_window_bytes: u64_at(32),
        })
    }
}

/// Path of the segment whose first record has `first_index`.
pub fn segment_path(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(format!("{first_index:020}{SEGMENT_SUFFIX}"))
}

/// Parses a segment file name back into its first index; `None` for other files.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Segment files in `dir`, sorted by first index.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(first) = entry.file_name().to_str().and_then(parse_segment_name) {
            out.push((first, entry.path()));
        }
    }
    out.sort_by_key(|(first, _)| *first);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_faults() {
        let h = SegmentHeader {
            first_index: 42,
            segment_bytes: 1 << 20,
            torn_window_bytes: 8 << 20,
        };
        let mut block = vec![0u8; BLOCK_BYTES];
        h.encode(&mut block);
        assert_eq!(SegmentHeader::decode(&block), Ok(h));
        assert_eq!(
            SegmentHeader::decode(&block[..100]),
            Err(HeaderFault::Short)
        );
        assert_eq!(
            SegmentHeader::decode(&vec![0u8; BLOCK_BYTES]),
            Err(HeaderFault::Zero)
        );
        let mut bad = block.clone();
        bad[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&bad), Err(HeaderFault::Crc));
        let mut bad = block.clone();
        bad[0] = b'X';
        assert_eq!(SegmentHeader::decode(&bad), Err(HeaderFault::BadMagic));
    }

    #[test]
    fn names_roundtrip() {
        let p = segment_path(Path::new("/x"), 17);
        assert_eq!(
            p.file_name().unwrap().to_str().unwrap(),
            "00000000000000000017.wal"
        );
        assert_eq!(parse_segment_name("00000000000000000017.wal"), Some(17));
        assert_eq!(parse_segment_name("17.wal"), None);
        assert_eq!(parse_segment_name("0000000000000000001x.wal"), None);
        assert_eq!(parse_segment_name("00000000000000000017.tmp"), None);
    }
}
