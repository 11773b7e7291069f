//! Keccak-256 and the transaction hash newtype.

use core::fmt;

use tiny_keccak::{Hasher, Keccak};

/// Keccak-256 (the Ethereum variant, not NIST SHA3-256) of `bytes`.
pub fn keccak256(bytes: &[u8]) -> [u8; 32] {
    let mut hasher = Keccak::v256();
    hasher.update(bytes);
    let mut out = [0u8; 32];
    hasher.finalize(&mut out);
    out
}

/// Hash of a transaction: `keccak256(tx.bytes)`; for a raw Ethereum transaction, its Ethereum hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TxHash(pub [u8; 32]);

impl TxHash {
    /// Hash of the transaction payload `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(keccak256(bytes))
    }

    /// The 32 hash bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<[u8; 32]> for TxHash {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl From<TxHash> for [u8; 32] {
    fn from(hash: TxHash) -> Self {
        hash.0
    }
}

impl AsRef<[u8]> for TxHash {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for TxHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("0x")?;
        for byte in &self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TxHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TxHash({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keccak256_of_empty_matches_known_vector() {
        // keccak256("") as used throughout Ethereum (e.g. the empty code hash).
        let expected = "0xc5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470";
        assert_eq!(TxHash::of(b"").to_string(), expected);
    }

    #[test]
    fn keccak256_of_abc_matches_known_vector() {
        let expected = "0x4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45";
        assert_eq!(TxHash::of(b"abc").to_string(), expected);
    }

    #[test]
    fn debug_wraps_hex() {
        let hash = TxHash([0xab; 32]);
        let debug = format!("{hash:?}");
        assert!(debug.starts_with("TxHash(0xabab"));
        assert!(debug.ends_with("ab)"));
        assert_eq!(debug.len(), "TxHash(0x)".len() + 64);
    }
}
