//! Leader signatures: secp256k1 ECDSA over a keccak256 digest, Ethereum style.
//!
//! A signature is 65 bytes `r ‖ s ‖ v` with `s` in the lower half of the curve order and
//! `v = 27 + recovery id`, exactly what Solidity's `ecrecover(digest, v, r, s)` takes. The
//! signer's [`Address`] is the last 20 bytes of `keccak256` of its uncompressed public key
//! (without the `0x04` prefix), i.e. an Ethereum address; a verifier recovers it from the
//! signature and compares it with the address it expects, so receipts need not carry a key.
//!
//! Headers are signed, never transactions: one signature per batch and per block.
//!
//! Key file format (`baton keygen`): the 32-byte secret as 64 lower-case hex digits and a
//! newline, file mode 0600.

use core::fmt;
use std::io::Write;
use std::path::Path;

use k256::ecdsa::{RecoveryId, Signature as EcdsaSignature, SigningKey, VerifyingKey};
use k256::elliptic_curve::ops::{MulByGenerator, Reduce};
use k256::elliptic_curve::point::AffineCoordinates;
use k256::elliptic_curve::scalar::IsHigh;
use k256::elliptic_curve::PrimeField;
use k256::{ProjectivePoint, Scalar, U256};

use crate::hash::keccak256;

/// Length of a signature: `r ‖ s ‖ v`.
pub const SIGNATURE_BYTES: usize = 65;

/// An Ethereum-style address: the last 20 bytes of keccak256 of the uncompressed public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Address(pub [u8; 20]);

impl Address {
    /// The address of a public key.
    pub fn of(key: &VerifyingKey) -> Address {
        let point = key.to_encoded_point(false);
        // Uncompressed: 0x04 ‖ x ‖ y; Ethereum hashes x ‖ y.
        let digest = keccak256(&point.as_bytes()[1..]);
        let mut out = [0u8; 20];
        out.copy_from_slice(&digest[12..]);
        Address(out)
    }

    /// Parses `0x`-prefixed (or bare) hex, 40 digits.
    pub fn parse(s: &str) -> Result<Address, SignError> {
        let mut out = [0u8; 20];
        decode_hex(s.strip_prefix("0x").unwrap_or(s), &mut out)
            .map_err(|reason| SignError::BadAddress { reason })?;
        Ok(Address(out))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex(&self.0))
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A 65-byte recoverable signature `r ‖ s ‖ v` (`v` is 27 or 28).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; SIGNATURE_BYTES]);

impl Default for Signature {
    fn default() -> Self {
        Signature([0; SIGNATURE_BYTES])
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex(&self.0))
    }
}

impl Signature {
    /// Parses `0x`-prefixed (or bare) hex, 130 digits.
    pub fn parse(s: &str) -> Result<Signature, SignError> {
        let mut out = [0u8; SIGNATURE_BYTES];
        decode_hex(s.strip_prefix("0x").unwrap_or(s), &mut out)
            .map_err(|reason| SignError::BadSignature { reason })?;
        Ok(Signature(out))
    }

    /// The address whose key made this signature over `digest`.
    pub fn recover(&self, digest: &[u8; 32]) -> Result<Address, SignError> {
        let v = self.0[64];
        let id = match v {
            27 | 28 => v - 27,
            _ => {
                return Err(SignError::BadSignature {
                    reason: "v must be 27 or 28",
                })
            }
        };
        let id = RecoveryId::from_byte(id).ok_or(SignError::BadSignature {
            reason: "recovery id out of range",
        })?;
        let sig =
            EcdsaSignature::from_slice(&self.0[..64]).map_err(|_| SignError::BadSignature {
                reason: "r or s out of range",
            })?;
        // Malleable (high-s) signatures are refused: every signature has one canonical form.
        if sig.normalize_s().is_some() {
            return Err(SignError::BadSignature {
                reason: "s is not in the lower half of the curve order",
            });
        }
        let key = VerifyingKey::recover_from_prehash(digest, &sig, id)
            .map_err(|_| SignError::Unrecoverable)?;
        Ok(Address::of(&key))
    }

    /// Checks that this is `expected`'s signature over `digest`.
    pub fn verify(&self, digest: &[u8; 32], expected: &Address) -> Result<(), SignError> {
        let signer = self.recover(digest)?;
        if signer == *expected {
            Ok(())
        } else {
            Err(SignError::WrongSigner {
                signer,
                expected: *expected,
            })
        }
    }
}

/// Why a key, address or signature was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The secret is zero or not below the curve order, or not 32 bytes of hex.
    #[error("invalid secret key: {reason}")]
    BadKey {
        /// What is wrong.
        reason: &'static str,
    },
    /// Not a 20-byte hex address.
    #[error("invalid address: {reason}")]
    BadAddress {
        /// What is wrong.
        reason: &'static str,
    },
    /// Not a well-formed 65-byte signature.
    #[error("invalid signature: {reason}")]
    BadSignature {
        /// What is wrong.
        reason: &'static str,
    },
    /// No public key matches the signature and digest.
    #[error("no public key recovers from this signature")]
    Unrecoverable,
    /// A valid signature, by someone else.
    #[error("signed by {signer}, expected {expected}")]
    WrongSigner {
        /// Who signed.
        signer: Address,
        /// Who should have.
        expected: Address,
    },
    /// Reading or writing a key file.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// A node's signing key and its address.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
    address: Address,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("Signer")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A fresh key from the operating system's random source.
    pub fn random() -> Signer {
        Signer::from_key(SigningKey::random(&mut rand_core::OsRng))
    }

    /// The key with this 32-byte secret.
    pub fn from_secret(secret: &[u8; 32]) -> Result<Signer, SignError> {
        let key = SigningKey::from_bytes(secret.into()).map_err(|_| SignError::BadKey {
            reason: "zero or not below the secp256k1 order",
        })?;
        Ok(Signer::from_key(key))
    }

    fn from_key(key: SigningKey) -> Signer {
        let address = Address::of(key.verifying_key());
        Signer { key, address }
    }

    /// This key's address.
    pub fn address(&self) -> Address {
        self.address
    }

    /// Signs a 32-byte digest (the caller hashed the message with keccak256).
    pub fn sign(&self, digest: &[u8; 32]) -> Signature {
        // RFC 6979 deterministic nonces; k256 returns low-s signatures.
        let (sig, id) = self
            .key
            .sign_prehash_recoverable(digest)
            .expect("signing a 32-byte prehash cannot fail");
        let mut out = [0u8; SIGNATURE_BYTES];
        out[..64].copy_from_slice(&sig.to_bytes());
        out[64] = 27 + id.to_byte();
        Signature(out)
    }

    /// Signs a 32-byte digest with a nonce made ahead of time ([`Nonce`]): what is left on the
    /// caller's path is two scalar multiplications and an addition, about a microsecond instead
    /// of the ~34 µs of [`Signer::sign`] (which computes `k·G` and `k⁻¹`). The same signature
    /// format: low `s`, `v = 27 + recovery id`. Consuming the nonce makes reusing it impossible
    /// (a reused nonce reveals the key).
    pub fn sign_with(&self, digest: &[u8; 32], nonce: Nonce) -> Signature {
        let z = <Scalar as Reduce<U256>>::reduce_bytes(digest.into());
        let d: &Scalar = self.key.as_nonzero_scalar();
        let s = nonce.k_inv * (z + nonce.r * d);
        if bool::from(s.is_zero()) {
            // Probability about 2^-256; the deterministic path never yields s = 0.
            return self.sign(digest);
        }
        let high = bool::from(s.is_high());
        let s = if high { -s } else { s };
        let sig = EcdsaSignature::from_scalars(nonce.r, s).expect("r and s are non-zero");
        let mut out = [0u8; SIGNATURE_BYTES];
        out[..64].copy_from_slice(&sig.to_bytes());
        // Negating s mirrors R: the recovery id's y parity flips with it.
        out[64] = 27 + (nonce.y_odd ^ high) as u8;
        Signature(out)
    }

    /// Reads a key file (see the module docs).
    pub fn load(path: &Path) -> Result<Signer, SignError> {
        let io = |source| SignError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(io)?;
        let mut secret = [0u8; 32];
        decode_hex(text.trim(), &mut secret).map_err(|reason| SignError::BadKey { reason })?;
        Signer::from_secret(&secret)
    }

    /// Writes this key to a new file with mode 0600; refuses to overwrite an existing file.
    pub fn save(&self, path: &Path) -> Result<(), SignError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| SignError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let secret = self.key.to_bytes();
        writeln!(file, "{}", hex(&secret)).map_err(io)?;
        file.sync_all().map_err(io)
    }
}

/// An ECDSA nonce made ahead of a signature: `k⁻¹` and `r = x(k·G) mod n` for a `k` drawn
/// uniformly from the operating system's random source, and the parity of `k·G`'s y. Making one
/// costs what signing used to cost (`k·G`, an inversion); a node makes them on a thread of their
/// own ([`NoncePool`]), so signing a batch on the commit path costs about a microsecond.
///
/// Not `Clone`: a nonce signs once ([`Signer::sign_with`] takes it by value). Nonces are random,
/// not RFC 6979 (a deterministic nonce needs the message, which is not known ahead of time); a
/// signature made with one is as valid and as recoverable as any other, only not reproducible.
pub struct Nonce {
    k_inv: Scalar,
    r: Scalar,
    y_odd: bool,
}

impl Drop for Nonce {
    fn drop(&mut self) {
        // k⁻¹ with a signature made from it gives the private key away: wipe it once used.
        zeroize::Zeroize::zeroize(&mut self.k_inv);
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret half.
        f.debug_struct("Nonce").finish_non_exhaustive()
    }
}

impl Nonce {
    /// A fresh nonce from the operating system's random source.
    pub fn generate() -> Nonce {
        loop {
            let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut *bytes);
            if let Some(n) = Nonce::from_k_bytes(&bytes) {
                return n;
            }
        }
    }

    /// The nonce of `k` (big-endian); `None` when `k` is zero or not below the curve order, or
    /// when `x(k·G)` is not below it (then `v` could not be 27 or 28; probability ~2^-128).
    fn from_k_bytes(bytes: &[u8; 32]) -> Option<Nonce> {
        let k: Option<Scalar> = Scalar::from_repr((*bytes).into()).into();
        let k = k.filter(|k| !bool::from(k.is_zero()))?;
        let big_r = ProjectivePoint::mul_by_generator(&k).to_affine();
        let x = big_r.x();
        let r = <Scalar as Reduce<U256>>::reduce_bytes(&x);
        if r.to_repr() != x {
            return None;
        }
        let k_inv: Option<Scalar> = k.invert().into();
        Some(Nonce {
            k_inv: k_inv?,
            r,
            y_odd: bool::from(big_r.y_is_odd()),
        })
    }
}

/// Nonces made ahead on a thread of their own: it keeps up to `depth` ready, and refills only
/// once fewer than half are left, in one go, so the signer wakes it once per `depth / 2`
/// signatures instead of once per signature (a cross-thread wake-up costs the taking shard a
/// futex syscall and, on a VM, an IPI: one of the ~31 per committed request on 3 nodes,
/// `perf sched timehist -w`). It stops when the pool is dropped. [`NoncePool::take`] never
/// waits: with none ready the caller signs the ordinary way ([`Signer::sign`]).
pub struct NoncePool {
    shared: std::sync::Arc<PoolShared>,
}

struct PoolShared {
    ready: std::sync::Mutex<PoolState>,
    /// Signalled when the ready count falls to the low-water mark, and when the pool is dropped.
    low: std::sync::Condvar,
    depth: usize,
}

struct PoolState {
    nonces: Vec<Nonce>,
    closed: bool,
}

impl NoncePool {
    /// Starts the thread, named `name`. `None` if it cannot be started.
    pub fn spawn(name: String, depth: usize) -> Option<NoncePool> {
        let depth = depth.max(2);
        let shared = std::sync::Arc::new(PoolShared {
            ready: std::sync::Mutex::new(PoolState {
                nonces: Vec::with_capacity(depth),
                closed: false,
            }),
            low: std::sync::Condvar::new(),
            depth,
        });
        let filler = shared.clone();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                // Started from the Raft shard: not on its core when that one is pinned.
                if let Err(e) = crate::cpus::release_current_thread() {
                    tracing::warn!(error = %e, "nonce thread stays on its shard's CPU");
                }
                filler.fill()
            })
            .ok()?;
        Some(NoncePool { shared })
    }

    /// A ready nonce, if there is one.
    pub fn take(&self) -> Option<Nonce> {
        let mut state = self.shared.lock();
        let nonce = state.nonces.pop();
        if nonce.is_some() && state.nonces.len() == self.shared.low_water() {
            self.shared.low.notify_one();
        }
        nonce
    }

    /// Nonces ready now (tests).
    #[cfg(test)]
    fn ready(&self) -> usize {
        self.shared.lock().nonces.len()
    }
}

impl Drop for NoncePool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.low.notify_one();
    }
}

impl PoolShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // Nonces and a flag: nothing a panic elsewhere could have left half-written.
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ready count at or below which the filler runs again.
    fn low_water(&self) -> usize {
        self.depth / 2
    }

    /// The filler thread: tops the pool up to `depth`, made outside the lock, then sleeps
    /// until it is down to the low-water mark again.
    fn fill(&self) {
        loop {
            let missing = {
                let mut state = self.lock();
                while !state.closed && state.nonces.len() > self.low_water() {
                    state = self.low.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                if state.closed {
                    return;
                }
                self.depth - state.nonces.len()
            };
            for _ in 0..missing {
                let nonce = Nonce::generate();
                let mut state = self.lock();
                if state.closed {
                    return;
                }
                // Each one is usable as soon as it is made.
                state.nonces.push(nonce);
            }
        }
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Decodes exactly `out.len()` bytes of hex (either case) from `s`.
pub fn decode_hex(s: &str, out: &mut [u8]) -> Result<(), &'static str> {
    let s = s.as_bytes();
    if s.len() != out.len() * 2 {
        return Err("wrong number of hex digits");
    }
    fn nibble(c: u8) -> Result<u8, &'static str> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err("not a hex digit"),
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nibble(s[2 * i])? << 4) | nibble(s[2 * i + 1])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(byte: u8) -> Signer {
        Signer::from_secret(&[byte; 32]).unwrap()
    }

    #[test]
    fn address_matches_a_known_ethereum_key() {
        // The widely published test key 0x4c0883a6...; its Ethereum address is
        // 0x2c7536E3605D9C16a7a3D7b1898e529396a65c23.
        let mut secret = [0u8; 32];
        decode_hex(
            "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318",
            &mut secret,
        )
        .unwrap();
        let s = Signer::from_secret(&secret).unwrap();
        assert_eq!(
            s.address(),
            Address::parse("0x2c7536E3605D9C16a7a3D7b1898e529396a65c23").unwrap()
        );
    }

    #[test]
    fn sign_then_recover_gives_the_signer() {
        let s = signer(7);
        let digest = keccak256(b"batch header");
        let sig = s.sign(&digest);
        assert!(sig.0[64] == 27 || sig.0[64] == 28);
        assert_eq!(sig.recover(&digest).unwrap(), s.address());
        sig.verify(&digest, &s.address()).unwrap();
        // Deterministic (RFC 6979).
        assert_eq!(s.sign(&digest), sig);
    }

    #[test]
    fn other_digest_or_signer_fails() {
        let (a, b) = (signer(1), signer(2));
        let digest = keccak256(b"x");
        let sig = a.sign(&digest);
        let other = keccak256(b"y");
        assert!(matches!(
            sig.verify(&other, &a.address()),
            Err(SignError::WrongSigner { .. }) | Err(SignError::Unrecoverable)
        ));
        assert!(matches!(
            sig.verify(&digest, &b.address()),
            Err(SignError::WrongSigner { signer, .. }) if signer == a.address()
        ));
    }

    #[test]
    fn malformed_signatures_are_typed_errors() {
        let s = signer(3);
        let digest = keccak256(b"z");
        let good = s.sign(&digest);
        let mut bad_v = good;
        bad_v.0[64] = 29;
        assert!(matches!(
            bad_v.recover(&digest),
            Err(SignError::BadSignature { .. })
        ));
        let zero = Signature::default();
        assert!(zero.recover(&digest).is_err());
        // High-s twin of a valid signature: refused (malleability).
        let sig = EcdsaSignature::from_slice(&good.0[..64]).unwrap();
        let (r, s_) = sig.split_scalars();
        let high = EcdsaSignature::from_scalars(r, -*s_).unwrap();
        let mut twin = good;
        twin.0[..64].copy_from_slice(&high.to_bytes());
        twin.0[64] ^= 1; // the twin recovers with the other parity
        assert!(matches!(
            twin.recover(&digest),
            Err(SignError::BadSignature { .. })
        ));
    }

    #[test]
    fn keys_and_hex_parse_strictly() {
        assert!(Signer::from_secret(&[0; 32]).is_err());
        assert!(Signer::from_secret(&[0xff; 32]).is_err());
        assert!(Address::parse("0x12").is_err());
        assert!(Address::parse(&format!("0x{}", "g".repeat(40))).is_err());
        let a = signer(9).address();
        assert_eq!(Address::parse(&a.to_string()).unwrap(), a);
        let sig = signer(9).sign(&[1; 32]);
        assert_eq!(Signature::parse(&format!("{sig:?}")).unwrap(), sig);
    }

    #[test]
    fn key_file_round_trips_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let s = Signer::random();
        s.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Signer::load(&path).unwrap().address(), s.address());
        assert!(matches!(s.save(&path), Err(SignError::Io { .. })));
        std::fs::write(&path, "nothex\n").unwrap();
        assert!(matches!(Signer::load(&path), Err(SignError::BadKey { .. })));
    }

    /// The signature k256 makes with nonce `k` (its hazmat path, low-s normalized).
    fn reference(secret: &[u8; 32], k: &[u8; 32], digest: &[u8; 32]) -> Option<[u8; 65]> {
        use k256::ecdsa::hazmat::SignPrimitive;
        let d: Option<Scalar> = Scalar::from_repr((*secret).into()).into();
        let k: Option<Scalar> = Scalar::from_repr((*k).into()).into();
        let (sig, id) = d?.try_sign_prehashed(k?, digest.into()).ok()?;
        let mut out = [0u8; 65];
        out[..64].copy_from_slice(&sig.to_bytes());
        out[64] = 27 + id?.to_byte();
        Some(out)
    }

    proptest::proptest! {
        /// With the same k, a precomputed nonce gives exactly k256's signature.
        #[test]
        fn a_precomputed_nonce_signs_exactly_like_k256(
            secret in proptest::array::uniform32(1u8..),
            k in proptest::array::uniform32(1u8..),
            digest in proptest::array::uniform32(proptest::num::u8::ANY),
        ) {
            let Ok(s) = Signer::from_secret(&secret) else { return Ok(()) };
            let Some(nonce) = Nonce::from_k_bytes(&k) else { return Ok(()) };
            let ours = s.sign_with(&digest, nonce);
            proptest::prop_assert_eq!(Some(ours.0), reference(&secret, &k, &digest));
            proptest::prop_assert_eq!(ours.recover(&digest).unwrap(), s.address());
        }
    }

    /// Polls `pool` for a nonce for at most `limit`.
    fn take_within(pool: &NoncePool, limit: std::time::Duration) -> Nonce {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(n) = pool.take() {
                return n;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no nonce within {limit:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Waits (bounded) until `pool` has `n` nonces ready.
    fn wait_ready(pool: &NoncePool, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pool.ready() != n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} ready, not {n}",
                pool.ready()
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// The filler tops the pool up to its depth, sleeps while more than half are left, and
    /// refills once the signer takes it down to half.
    #[test]
    fn the_nonce_pool_refills_only_below_half_and_then_to_the_full_depth() {
        let pool = NoncePool::spawn("nonce-test".into(), 8).expect("thread");
        wait_ready(&pool, 8);
        for left in (5..8).rev() {
            pool.take().expect("ready");
            assert_eq!(pool.ready(), left);
        }
        // Above the low-water mark: nothing wakes the filler. (An absence, so a pause: a pool
        // that refilled after every take, as before, is back at 8 by now.)
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(pool.ready(), 5);
        pool.take().expect("ready");
        wait_ready(&pool, 8);
    }

    #[test]
    fn pooled_random_nonces_make_valid_distinct_signatures() {
        let s = signer(5);
        let pool = NoncePool::spawn("nonce-test".into(), 4).expect("thread");
        let digest = keccak256(b"batch header");
        let mut seen = std::collections::HashSet::new();
        let mut low_and_high_parity = [false; 2];
        for _ in 0..64 {
            // Waiting only in the test: for the thread to make one.
            let nonce = take_within(&pool, std::time::Duration::from_secs(10));
            let sig = s.sign_with(&digest, nonce);
            sig.verify(&digest, &s.address()).unwrap();
            low_and_high_parity[(sig.0[64] - 27) as usize] = true;
            assert!(seen.insert(sig.0[..32].to_vec()), "a nonce was used twice");
        }
        assert_eq!(low_and_high_parity, [true, true], "both recovery ids occur");
        // The ordinary path still works, and take() never blocks.
        let _ = pool.take();
        s.sign(&digest).verify(&digest, &s.address()).unwrap();
    }

    #[test]
    fn nonces_out_of_range_are_refused() {
        assert!(Nonce::from_k_bytes(&[0; 32]).is_none());
        assert!(Nonce::from_k_bytes(&[0xff; 32]).is_none());
        let mut one = [0u8; 32];
        one[31] = 1;
        assert!(Nonce::from_k_bytes(&one).is_some());
    }
}
