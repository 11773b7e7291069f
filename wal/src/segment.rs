//! Segment files: naming and the header block.
//!
//! A segment is a preallocated file named `{first_index:020}.wal`. Its first 4096 bytes are a
//! header block; records start at offset 4096 and are packed back to back (see `record.rs`).
//! A segment file may be *recycled*: a purged segment, renamed to a spare
//! (`{seq:020}-{stale_through:020}.spare`) and later given a new header and name. Its old records
//! stay in place past the new ones; every one of them has an index at most `stale_through`, below
//! the new first index, and a scan reads such a record as the end of the segment.
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

/// File name suffix of spares: written files waiting to become segments (see `wal.rs`).
pub const SPARE_SUFFIX: &str = ".spare";
/// File name suffix of a spare being written; a leftover one is removed on open.
pub const SPARE_TMP_SUFFIX: &str = ".spare-tmp";

/// Path of spare number `seq`, whose records (if any) all have an index at most `stale_through`.
pub fn spare_path(dir: &Path, seq: u64, stale_through: u64) -> PathBuf {
    dir.join(format!("{seq:020}-{stale_through:020}{SPARE_SUFFIX}"))
}

/// Path of spare number `seq` while it is being written.
pub fn spare_tmp_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}{SPARE_TMP_SUFFIX}"))
}

/// Parses a spare file name into `(seq, stale_through)`; `None` for other files.
pub fn parse_spare_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(SPARE_SUFFIX)?;
    let (seq, stale) = stem.split_once('-')?;
    let digits = |d: &str| d.len() == 20 && d.bytes().all(|b| b.is_ascii_digit());
    if !digits(seq) || !digits(stale) {
        return None;
    }
    Some((seq.parse().ok()?, stale.parse().ok()?))
}

/// Spare files in `dir` as `(seq, stale_through, path)`, sorted by seq, and leftover temporary
/// spares (to remove).
#[allow(clippy::type_complexity)]
pub fn list_spares(dir: &Path) -> std::io::Result<(Vec<(u64, u64, PathBuf)>, Vec<PathBuf>)> {
    let mut spares = Vec::new();
    let mut leftovers = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((seq, stale)) = parse_spare_name(name) {
            spares.push((seq, stale, entry.path()));
        } else if name.ends_with(SPARE_TMP_SUFFIX) {
            leftovers.push(entry.path());
        }
    }
    spares.sort_by_key(|(seq, _, _)| *seq);
    Ok((spares, leftovers))
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
        let p = spare_path(Path::new("/x"), 3, 99);
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, "00000000000000000003-00000000000000000099.spare");
        assert_eq!(parse_spare_name(name), Some((3, 99)));
        assert_eq!(parse_segment_name(name), None);
        assert_eq!(parse_spare_name("00000000000000000017.wal"), None);
        assert_eq!(parse_spare_name("3-99.spare"), None);
        let tmp = spare_tmp_path(Path::new("/x"), 3);
        assert_eq!(
            parse_spare_name(tmp.file_name().unwrap().to_str().unwrap()),
            None
        );
    }
}
