//! Transaction generation: distinct, deterministic transactions of a fixed size with a rollup mix
//! and a share of encrypted ones.

use baton_core::encrypted::{self, KEY_BYTES, NONCE_BYTES, OVERHEAD_BYTES};
use baton_core::{Transaction, TxKind};
use serde::{Deserialize, Serialize};

/// The smallest transaction the generator makes: its run seed and sequence number must fit, and
/// an encrypted one also its nonce and tag.
pub const TX_BYTES_MIN: usize = 16 + OVERHEAD_BYTES;

/// A rollup and its share of the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollupShare {
    /// Rollup id.
    pub id: u64,
    /// Relative weight.
    pub weight: u32,
}

/// Parses `ID[:WEIGHT],...` (weight 1 when left out), e.g. `1:3,2`.
pub fn parse_rollups(s: &str) -> Result<Vec<RollupShare>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, weight) = match part.split_once(':') {
            Some((i, w)) => (i, w.parse::<u32>().map_err(|e| format!("{part}: {e}"))?),
            None => (part, 1),
        };
        let id = id.parse::<u64>().map_err(|e| format!("{part}: {e}"))?;
        if weight == 0 {
            return Err(format!("{part}: a weight must be at least 1"));
        }
        out.push(RollupShare { id, weight });
    }
    if out.is_empty() {
        return Err("at least one rollup is needed".into());
    }
    Ok(out)
}

/// What to generate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TxShape {
    /// Bytes per transaction (ciphertext included for encrypted ones).
    pub tx_bytes: usize,
    /// Rollups and their shares.
    pub rollups: Vec<RollupShare>,
    /// Percentage (0–100) of encrypted transactions.
    pub encrypted_pct: u8,
}

/// Makes the transactions of a run: transaction `n` is the same for the same seed, and no two
/// transactions of a run (or of two runs with different seeds) share bytes.
#[derive(Clone, Debug)]
pub struct TxGen {
    shape: TxShape,
    seed: u64,
    weight_total: u64,
}

/// A 64-bit mix (splitmix64's finalizer): cheap, deterministic, well spread.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl TxGen {
    /// A generator of `shape` for the run identified by `seed`.
    pub fn new(shape: TxShape, seed: u64) -> Result<TxGen, String> {
        if shape.tx_bytes < TX_BYTES_MIN {
            return Err(format!(
                "transactions must be at least {TX_BYTES_MIN} bytes (got {})",
                shape.tx_bytes
            ));
        }
        if shape.encrypted_pct > 100 {
            return Err("the encrypted share is a percentage (0-100)".into());
        }
        if shape.rollups.is_empty() {
            return Err("at least one rollup is needed".into());
        }
        let weight_total = shape.rollups.iter().map(|r| r.weight as u64).sum();
        Ok(TxGen {
            shape,
            seed,
            weight_total,
        })
    }

    /// The shape.
    pub fn shape(&self) -> &TxShape {
        &self.shape
    }

    fn rollup(&self, n: u64) -> u64 {
        let mut pick = mix64(n ^ self.seed.rotate_left(17)) % self.weight_total;
        for r in &self.shape.rollups {
            if pick < r.weight as u64 {
                return r.id;
            }
            pick -= r.weight as u64;
        }
        unreachable!("pick < total weight")
    }

    fn encrypted(&self, n: u64) -> bool {
        mix64(n ^ self.seed.rotate_left(41)) % 100 < self.shape.encrypted_pct as u64
    }

    /// Transaction number `n`.
    pub fn tx(&self, n: u64) -> Transaction {
        let rollup_id = self.rollup(n);
        let encrypted = self.encrypted(n);
        let plain_len = if encrypted {
            self.shape.tx_bytes - OVERHEAD_BYTES
        } else {
            self.shape.tx_bytes
        };
        let mut plain = Vec::with_capacity(plain_len);
        plain.extend_from_slice(&self.seed.to_le_bytes());
        plain.extend_from_slice(&n.to_le_bytes());
        plain.resize(plain_len, (n % 251) as u8);
        if !encrypted {
            return Transaction {
                rollup_id,
                kind: TxKind::Raw,
                bytes: plain,
            };
        }
        let mut key = [0u8; KEY_BYTES];
        for (i, chunk) in key.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&mix64(self.seed ^ mix64(n) ^ i as u64).to_le_bytes());
        }
        let mut nonce = [0u8; NONCE_BYTES];
        nonce[..8].copy_from_slice(&n.to_le_bytes());
        encrypted::encrypted_transaction(rollup_id, &key, &nonce, &plain)
    }

    /// The `count` transactions from number `first` on.
    pub fn txs(&self, first: u64, count: usize) -> Vec<Transaction> {
        (first..first + count as u64).map(|n| self.tx(n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(encrypted_pct: u8) -> TxShape {
        TxShape {
            tx_bytes: 128,
            rollups: parse_rollups("1:3,2").unwrap(),
            encrypted_pct,
        }
    }

    #[test]
    fn transactions_are_distinct_sized_and_deterministic() {
        let g = TxGen::new(shape(30), 42).unwrap();
        let txs = g.txs(0, 2_000);
        let hashes: std::collections::HashSet<_> = txs
            .iter()
            .map(|t| baton_core::keccak256(&t.bytes))
            .collect();
        assert_eq!(hashes.len(), 2_000);
        assert!(txs.iter().all(|t| t.bytes.len() == 128));
        assert_eq!(g.tx(17), txs[17]);
        let other_run = TxGen::new(shape(30), 43).unwrap();
        assert_ne!(other_run.tx(17).bytes, txs[17].bytes);
    }

    #[test]
    fn mix_follows_the_weights_and_the_encrypted_share() {
        let g = TxGen::new(shape(30), 7).unwrap();
        let txs = g.txs(0, 10_000);
        let r1 = txs.iter().filter(|t| t.rollup_id == 1).count();
        let enc: Vec<_> = txs
            .iter()
            .filter_map(|t| match t.kind {
                TxKind::Encrypted { key_commitment } => Some((key_commitment, t)),
                TxKind::Raw => None,
            })
            .collect();
        assert!((7_000..8_000).contains(&r1), "rollup 1 got {r1} of 10,000");
        assert!(
            (2_500..3_500).contains(&enc.len()),
            "{} encrypted",
            enc.len()
        );
        assert!(txs.iter().all(|t| t.rollup_id == 1 || t.rollup_id == 2));
        // Encrypted ones carry a commitment to a key that is not in the bytes, and raw ones never.
        let (commitment, tx) = enc[0];
        assert!(!tx.bytes.windows(8).any(|w| w == 7u64.to_le_bytes()));
        assert_ne!(commitment, [0; 32]);
        assert!(TxGen::new(shape(0), 1)
            .unwrap()
            .txs(0, 1_000)
            .iter()
            .all(|t| t.kind == TxKind::Raw));
    }

    #[test]
    fn bad_shapes_and_rollup_lists_are_refused() {
        assert!(parse_rollups("").is_err());
        assert!(parse_rollups("1:0").is_err());
        assert!(parse_rollups("x").is_err());
        assert_eq!(
            parse_rollups("5, 6:2").unwrap(),
            vec![
                RollupShare { id: 5, weight: 1 },
                RollupShare { id: 6, weight: 2 }
            ]
        );
        let mut s = shape(0);
        s.tx_bytes = TX_BYTES_MIN - 1;
        assert!(TxGen::new(s, 1).is_err());
        assert!(TxGen::new(shape(101), 1).is_err());
    }
}
