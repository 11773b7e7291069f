//! `WalOptions`: sizes and limits, each with its unit in the name and a documented default.

use crate::error::WalError;
use crate::record::{record_bytes, PAYLOAD_BYTES_MAX};
use crate::segment::BLOCK_BYTES;

/// Upper bound of `pending_bytes_max`, and so of how much a crash can tear (see recovery.rs).
pub const PENDING_BYTES_LIMIT: usize = 256 << 20;

/// How a group-commit round is made durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncMode {
    /// Segment files are written through descriptors opened `O_DSYNC`: each O_DIRECT write
    /// completes once its data is durable (the kernel issues the write and the cache flush as
    /// one request), so a round is one io_uring operation and one completion, not two. The
    /// default.
    #[default]
    Dsync,
    /// Plain O_DIRECT writes, then one `fdatasync` per round.
    Fdatasync,
}

impl std::str::FromStr for SyncMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dsync" => Ok(SyncMode::Dsync),
            "fdatasync" => Ok(SyncMode::Fdatasync),
            other => Err(format!("unknown sync mode {other:?} (dsync or fdatasync)")),
        }
    }
}

/// Most spare segment files a log keeps.
pub const SPARE_SEGMENTS_LIMIT: usize = 16;

/// Options of a write-ahead log.
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// Largest payload `append` accepts. Default and upper bound: `record::PAYLOAD_BYTES_MAX`.
    pub payload_bytes_max: usize,
    /// Preallocated size of each segment file. Default 64 MiB.
    pub segment_bytes: u64,
    /// Largest single write of the group commit (one DMA buffer). Default 8 MiB; at least one
    /// maximum-size record plus two blocks.
    pub flush_bytes_max: usize,
    /// Most bytes appended but not yet durable; `append` waits for space beyond this
    /// (back-pressure). Also bounds what one crash can tear. Default 32 MiB.
    pub pending_bytes_max: usize,
    /// How rounds are made durable. Default [`SyncMode::Dsync`].
    pub sync: SyncMode,
    /// Spare segment files kept, already written end to end, for the next segments: purged
    /// segments are recycled into spares up to this many, and when none is ready a background
    /// task writes a zero-filled one. A new segment then overwrites written blocks, so its
    /// fdatasyncs have no extent conversion to journal (on ext4 a 4 KiB write+fdatasync takes
    /// about half as long). 0 disables spares: segments are preallocated (unwritten) on the
    /// write path. Default 2, at most 16.
    pub spare_segments: usize,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            payload_bytes_max: PAYLOAD_BYTES_MAX,
            segment_bytes: 64 << 20,
            flush_bytes_max: 8 << 20,
            pending_bytes_max: 32 << 20,
            sync: SyncMode::default(),
            spare_segments: 2,
        }
    }
}

impl WalOptions {
    /// Checks that the options can work together.
    pub fn validate(&self) -> Result<(), WalError> {
        let bad = |reason| Err(WalError::InvalidOptions { reason });
        if self.payload_bytes_max > PAYLOAD_BYTES_MAX {
            return bad("payload_bytes_max exceeds the format limit record::PAYLOAD_BYTES_MAX");
        }
        let record_max = record_bytes(self.payload_bytes_max);
        if self.flush_bytes_max < record_max + 2 * BLOCK_BYTES {
            return bad("flush_bytes_max must hold a maximum-size record plus two blocks");
        }
        if !self.flush_bytes_max.is_multiple_of(BLOCK_BYTES) {
            return bad("flush_bytes_max must be a multiple of 4096");
        }
        if self.pending_bytes_max < self.flush_bytes_max
            || self.pending_bytes_max > PENDING_BYTES_LIMIT
        {
            return bad("pending_bytes_max must be between flush_bytes_max and 256 MiB");
        }
        if self.segment_bytes < (BLOCK_BYTES + record_max + BLOCK_BYTES) as u64
            || !self.segment_bytes.is_multiple_of(BLOCK_BYTES as u64)
        {
            return bad(
                "segment_bytes must be a multiple of 4096 that holds a maximum-size record",
            );
        }
        if self.spare_segments > SPARE_SEGMENTS_LIMIT {
            return bad("spare_segments must be at most 16");
        }
        Ok(())
    }

    /// Small sizes for tests: many segments and flushes with little data.
    pub fn small_for_tests() -> WalOptions {
        WalOptions {
            payload_bytes_max: 16 << 10,
            segment_bytes: 128 << 10,
            flush_bytes_max: 64 << 10,
            pending_bytes_max: 128 << 10,
            sync: SyncMode::default(),
            spare_segments: 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_test_options_are_valid() {
        WalOptions::default().validate().unwrap();
        WalOptions::small_for_tests().validate().unwrap();
        let o = WalOptions {
            flush_bytes_max: 4096,
            ..WalOptions::default()
        };
        assert!(matches!(o.validate(), Err(WalError::InvalidOptions { .. })));
    }
}
