//! Recovery: scanning segment images and judging what a crash left behind.
//!
//! Pure functions over bytes, used by `Wal::open` (which then repairs) and by `baton wal dump`
//! (which only reports).
//!
//! The rules:
//! - Every segment but the last must have a valid header and only valid records, and each segment
//!   must start where the previous one ended. Anything else is [`WalError::Corrupt`]: the node
//!   refuses to start rather than drop data that was acknowledged as durable.
//! - The last segment may end in a *torn tail*: a record that fails its checks because the
//!   process or machine died while the group commit was writing it. It and everything after it
//!   are discarded. A torn write can only damage what was written since the last fdatasync, which
//!   the writer bounds by `torn_window_bytes` (its `pending_bytes_max`, stored in the segment
//!   header). So a bad record followed, further than that window, by a valid record is not a torn
//!   write but corruption of durable data, and is a hard error too.
//! - A last segment whose header is unusable was being created when the crash came (the header is
//!   synced before any record is written to it): the file is removed.

use std::path::{Path, PathBuf};

use crate::error::{Corruption, WalError};
use crate::options::PENDING_BYTES_LIMIT;
use crate::record::{self, RecordCheck, RecordFault, RecordHeader, RECORD_ALIGN_BYTES};
use crate::segment::{self, HeaderFault, SegmentHeader, BLOCK_BYTES};

/// A valid record found by a scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScannedRecord {
    /// Offset of the record in its segment file.
    pub offset: u64,
    /// Its header.
    pub header: RecordHeader,
}

/// How the scan of a segment's records ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Zeros (or the end of the file) after the last record.
    Clean { offset: u64 },
    /// Bytes at `offset` are not a valid record. `last_valid_after` is the offset of the last
    /// valid-looking record found anywhere after it.
    Fault {
        offset: u64,
        fault: RecordFault,
        last_valid_after: Option<u64>,
    },
}

/// What a segment file holds.
#[derive(Clone, Debug)]
pub struct SegmentScan {
    /// The file.
    pub path: PathBuf,
    /// First index according to the file name.
    pub name_index: u64,
    /// The header block, or why it is unusable.
    pub header: Result<SegmentHeader, HeaderFault>,
    /// The valid records, in order, up to the end or the first fault.
    pub records: Vec<ScannedRecord>,
    /// How the scan ended (`Clean` at offset 0 when the header was unusable).
    pub end: ScanEnd,
    /// Size of the file image scanned.
    pub file_bytes: u64,
}

impl SegmentScan {
    /// The index the record after the last valid one would have.
    pub fn next_index(&self) -> u64 {
        self.name_index + self.records.len() as u64
    }

    /// Offset just past the last valid record.
    pub fn valid_end(&self) -> u64 {
        match self.records.last() {
            Some(r) => r.offset + r.header.record_bytes() as u64,
            None => BLOCK_BYTES as u64,
        }
    }
}

/// Scans one segment image (the whole file).
pub fn scan_segment(path: &Path, name_index: u64, bytes: &[u8]) -> SegmentScan {
    let header = SegmentHeader::decode(bytes);
    let mut scan = SegmentScan {
        path: path.to_path_buf(),
        name_index,
        header,
        records: Vec::new(),
        end: ScanEnd::Clean { offset: 0 },
        file_bytes: bytes.len() as u64,
    };
    if scan.header.is_err() {
        return scan;
    }
    let mut pos = BLOCK_BYTES;
    let mut expected = name_index;
    scan.end = loop {
        let fault = match record::check(bytes, pos) {
            RecordCheck::End => break ScanEnd::Clean { offset: pos as u64 },
            // A record of the file's previous life as another segment (recycled files keep
            // their old records; all of them are below the new first index): the end.
            RecordCheck::Record(h) if h.index < name_index => {
                break ScanEnd::Clean { offset: pos as u64 }
            }
            RecordCheck::Record(h) if h.index == expected => {
                scan.records.push(ScannedRecord {
                    offset: pos as u64,
                    header: h,
                });
                pos += h.record_bytes();
                expected += 1;
                continue;
            }
            RecordCheck::Record(h) => RecordFault::IndexMismatch {
                expected,
                found: h.index,
            },
            RecordCheck::Fault(f) => f,
        };
        break ScanEnd::Fault {
            offset: pos as u64,
            fault,
            last_valid_after: last_valid_after(bytes, pos, name_index),
        };
    };
    scan
}

/// Offset of the last valid record that starts after `pos` (16-byte steps), if any. Records
/// below `name_index` are left over from the file's previous life as another segment: not
/// evidence of anything.
fn last_valid_after(bytes: &[u8], pos: usize, name_index: u64) -> Option<u64> {
    let magic = record::RECORD_MAGIC.to_le_bytes();
    let mut last = None;
    let mut at = pos + RECORD_ALIGN_BYTES;
    while at + record::HEADER_BYTES <= bytes.len() {
        if bytes[at + 24..at + 28] == magic {
            if let RecordCheck::Record(h) = record::check(bytes, at) {
                if h.index >= name_index {
                    last = Some(at as u64);
                }
            }
        }
        at += RECORD_ALIGN_BYTES;
    }
    last
}

/// What recovery will do, when it can proceed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every segment ends cleanly.
    Clean,
    /// The last segment ends in a torn write: it is cut at `offset`.
    TornTail {
        path: PathBuf,
        offset: u64,
        fault: RecordFault,
        discarded_bytes: u64,
    },
    /// The last segment's creation did not complete: the file is removed.
    TornSegment { path: PathBuf, fault: HeaderFault },
}

/// Judges a whole log from its segment scans (in first-index order).
pub fn judge(scans: &[SegmentScan]) -> Result<Verdict, WalError> {
    let mut verdict = Verdict::Clean;
    for (k, scan) in scans.iter().enumerate() {
        let last = k + 1 == scans.len();
        let corrupt = |offset: u64, reason: Corruption| WalError::Corrupt {
            path: scan.path.clone(),
            offset,
            reason,
        };
        if k > 0 {
            let expected = scans[k - 1].next_index();
            if scan.name_index != expected {
                return Err(corrupt(
                    0,
                    Corruption::Gap {
                        expected,
                        found: scan.name_index,
                    },
                ));
            }
        }
        let header = match scan.header {
            Ok(h) => h,
            Err(fault) if last => {
                return Ok(Verdict::TornSegment {
                    path: scan.path.clone(),
                    fault,
                })
            }
            Err(fault) => return Err(corrupt(0, Corruption::Header(fault))),
        };
        if header.first_index != scan.name_index {
            return Err(corrupt(
                0,
                Corruption::NameMismatch {
                    name_index: scan.name_index,
                    header_index: header.first_index,
                },
            ));
        }
        if let ScanEnd::Fault {
            offset,
            fault,
            last_valid_after,
        } = scan.end
        {
            if !last {
                return Err(corrupt(offset, Corruption::Record(fault)));
            }
            let window =
                header.torn_window_bytes.min(PENDING_BYTES_LIMIT as u64) + BLOCK_BYTES as u64;
            let torn_from = offset - offset % BLOCK_BYTES as u64;
            if let Some(valid_at) = last_valid_after.filter(|&v| v >= torn_from + window) {
                return Err(corrupt(
                    offset,
                    Corruption::BeforeTail {
                        fault,
                        valid_record_at: valid_at,
                    },
                ));
            }
            let discarded_bytes = last_valid_after.map_or(record::HEADER_BYTES as u64, |v| {
                v + record::HEADER_BYTES as u64 - offset
            });
            verdict = Verdict::TornTail {
                path: scan.path.clone(),
                offset,
                fault,
                discarded_bytes,
            };
        }
    }
    Ok(verdict)
}

/// A read-only look at a log directory: what each segment holds and what recovery would do.
#[derive(Debug)]
pub struct Inspection {
    /// One scan per segment file, in order.
    pub segments: Vec<SegmentScan>,
    /// What `Wal::open` would do (it refuses to open on `Err`).
    pub verdict: Result<Verdict, WalError>,
}

/// Reads every segment of `dir` with plain file I/O and judges it, changing nothing.
pub fn inspect(dir: &Path) -> Result<Inspection, WalError> {
    let files = segment::list_segments(dir).map_err(|e| WalError::io("list segments", dir, e))?;
    let mut segments = Vec::with_capacity(files.len());
    for (first, path) in files {
        let bytes = std::fs::read(&path).map_err(|e| WalError::io("read segment", &path, e))?;
        segments.push(scan_segment(&path, first, &bytes));
    }
    let verdict = judge(&segments);
    Ok(Inspection { segments, verdict })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{encode, record_bytes};

    fn image(first: u64, payload_sizes: &[usize], file_bytes: usize) -> (Vec<u8>, Vec<u64>) {
        let mut img = vec![0u8; file_bytes];
        SegmentHeader {
            first_index: first,
            segment_bytes: file_bytes as u64,
            torn_window_bytes: 8192,
        }
        .encode(&mut img);
        let mut pos = BLOCK_BYTES;
        let mut offsets = Vec::new();
        for (i, &n) in payload_sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..n).map(|b| (b + i) as u8).collect();
            offsets.push(pos as u64);
            pos += encode(&mut img[pos..], first + i as u64, 1, &payload);
        }
        (img, offsets)
    }

    fn scan(first: u64, img: &[u8]) -> SegmentScan {
        scan_segment(Path::new("seg"), first, img)
    }

    #[test]
    fn clean_segments_chain() {
        let (a, _) = image(1, &[10, 20, 30], 64 << 10);
        let (b, _) = image(4, &[5], 64 << 10);
        let scans = [scan(1, &a), scan(4, &b)];
        assert_eq!(scans[0].records.len(), 3);
        assert_eq!(judge(&scans).unwrap(), Verdict::Clean);
    }

    #[test]
    fn gap_between_segments_is_corruption() {
        let (a, _) = image(1, &[10, 20], 64 << 10);
        let (b, _) = image(4, &[5], 64 << 10);
        let err = judge(&[scan(1, &a), scan(4, &b)]).unwrap_err();
        assert!(
            matches!(
                err,
                WalError::Corrupt {
                    reason: Corruption::Gap {
                        expected: 3,
                        found: 4
                    },
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn flipped_last_record_is_a_torn_tail() {
        let (mut a, offs) = image(1, &[10, 20, 30], 64 << 10);
        a[offs[2] as usize + 40] ^= 0xff;
        let s = scan(1, &a);
        assert_eq!(s.records.len(), 2);
        match judge(&[s]).unwrap() {
            Verdict::TornTail { offset, .. } => assert_eq!(offset, offs[2]),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn bad_record_far_before_a_valid_one_is_corruption() {
        // Window is 8192 + one block; put a valid record 64 KiB after the fault.
        let sizes = vec![1000; 70];
        let (mut a, offs) = image(1, &sizes, 128 << 10);
        a[offs[3] as usize + 40] ^= 0xff;
        let err = judge(&[scan(1, &a)]).unwrap_err();
        assert!(
            matches!(
                err,
                WalError::Corrupt {
                    reason: Corruption::BeforeTail { .. },
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn bad_record_in_earlier_segment_is_corruption() {
        let (mut a, offs) = image(1, &[10, 20, 30], 64 << 10);
        let (b, _) = image(4, &[5], 64 << 10);
        a[offs[2] as usize + 40] ^= 0xff;
        let err = judge(&[scan(1, &a), scan(4, &b)]).unwrap_err();
        assert!(
            matches!(
                err,
                WalError::Corrupt {
                    reason: Corruption::Record(RecordFault::CrcMismatch { .. }),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn zero_header_on_last_segment_is_torn_creation() {
        let (a, _) = image(1, &[10], 64 << 10);
        let b = vec![0u8; 64 << 10];
        assert!(matches!(
            judge(&[scan(1, &a), scan(2, &b)]).unwrap(),
            Verdict::TornSegment {
                fault: HeaderFault::Zero,
                ..
            }
        ));
        let err = judge(&[scan(2, &b), scan(1, &a)]).unwrap_err();
        assert!(matches!(err, WalError::Corrupt { .. }));
    }

    /// A recycled file: the records of its previous life (indexes 1..=70, 1000 bytes each), then
    /// a new header and `new` records from index 500 written over its start, in whole blocks
    /// (the writer zero-pads its last block, and adds a zero block when the data ends on one).
    fn recycled(new: &[usize]) -> (Vec<u8>, Vec<u64>) {
        let (mut img, _) = image(1, &[1000; 70], 128 << 10);
        let (fresh, offs) = image(500, new, 128 << 10);
        let end = offs.last().map_or(BLOCK_BYTES, |&o| {
            o as usize + record_bytes(*new.last().unwrap())
        });
        let end = (end / BLOCK_BYTES + 1) * BLOCK_BYTES;
        img[..end].copy_from_slice(&fresh[..end]);
        (img, offs)
    }

    #[test]
    fn records_left_from_a_recycled_life_read_as_the_end() {
        let (img, offs) = recycled(&[10, 2000, 30]);
        let s = scan(500, &img);
        assert_eq!(s.records.len(), 3);
        assert_eq!(
            s.end,
            ScanEnd::Clean {
                offset: s.valid_end()
            }
        );
        assert_eq!(s.next_index(), 503);
        assert_eq!(judge(&[s]).unwrap(), Verdict::Clean);
        // An empty recycled segment (header only) is clean and empty too.
        let (img, _) = recycled(&[]);
        let s = scan(500, &img);
        assert!(s.records.is_empty());
        assert_eq!(judge(&[s]).unwrap(), Verdict::Clean);
        // Mid-log, a recycled segment followed by the next one chains as usual.
        let (img, _) = recycled(&[10, 20]);
        let (next, _) = image(502, &[5], 64 << 10);
        assert_eq!(
            judge(&[scan(500, &img), scan(502, &next)]).unwrap(),
            Verdict::Clean
        );
        let _ = offs;
    }

    #[test]
    fn a_torn_record_in_a_recycled_file_is_a_tail_whatever_old_records_follow() {
        // Old records with valid checksums lie far past the torn one: not corruption.
        let (mut img, offs) = recycled(&[10, 20, 30]);
        img[offs[2] as usize + 40] ^= 0xff;
        let s = scan(500, &img);
        assert_eq!(s.records.len(), 2);
        match judge(&[s]).unwrap() {
            Verdict::TornTail { offset, .. } => assert_eq!(offset, offs[2]),
            v => panic!("{v:?}"),
        }
        // A record of the current life far past a bad one still is.
        let sizes = vec![1000; 70];
        let (mut img, offs) = image(500, &sizes, 128 << 10);
        img[offs[3] as usize + 40] ^= 0xff;
        assert!(matches!(
            judge(&[scan(500, &img)]).unwrap_err(),
            WalError::Corrupt {
                reason: Corruption::BeforeTail { .. },
                ..
            }
        ));
    }

    #[test]
    fn record_sizes_match_scan_offsets() {
        let (a, offs) = image(9, &[0, 1, 15, 16, 17], 64 << 10);
        let s = scan(9, &a);
        let got: Vec<u64> = s.records.iter().map(|r| r.offset).collect();
        assert_eq!(got, offs);
        assert_eq!(s.valid_end(), offs[4] + record_bytes(17) as u64);
    }
}
