//! A small metadata blob (the Raft vote, the purge point…) stored atomically next to the log.
//!
//! File `META`: `[8 magic "BATNMETA"][u32 len][u32 crc32 of the bytes][bytes]`. Written to
//! `META.tmp`, fsynced, renamed over `META`, and the directory fsynced: a crash leaves either the
//! old or the new blob, never a mix.

use std::io::Write;
use std::path::Path;

use crate::error::WalError;

const MAGIC: [u8; 8] = *b"BATNMETA";
/// Largest metadata blob.
pub const META_BYTES_MAX: usize = 64 << 10;

/// Writes `bytes` durably and atomically.
pub fn save(dir: &Path, bytes: &[u8]) -> Result<(), WalError> {
    if bytes.len() > META_BYTES_MAX {
        return Err(WalError::PayloadTooLarge {
            len: bytes.len(),
            max: META_BYTES_MAX,
        });
    }
    let tmp = dir.join("META.tmp");
    let path = dir.join("META");
    let mut image = Vec::with_capacity(16 + bytes.len());
    image.extend_from_slice(&MAGIC);
    image.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    image.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    image.extend_from_slice(bytes);
    let mut f = std::fs::File::create(&tmp).map_err(|e| WalError::io("create meta", &tmp, e))?;
    f.write_all(&image)
        .map_err(|e| WalError::io("write meta", &tmp, e))?;
    f.sync_all()
        .map_err(|e| WalError::io("sync meta", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| WalError::io("rename meta", &path, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| WalError::io("sync dir", dir, e))
}

/// Reads the blob; `None` if never written.
pub fn load(dir: &Path) -> Result<Option<Vec<u8>>, WalError> {
    let path = dir.join("META");
    let image = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(WalError::io("read meta", &path, e)),
    };
    let corrupt = || WalError::MetaCorrupt { path: path.clone() };
    if image.len() < 16 || image[..8] != MAGIC {
        return Err(corrupt());
    }
    let len = u32::from_le_bytes(image[8..12].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(image[12..16].try_into().expect("4 bytes"));
    let bytes = image.get(16..16 + len).ok_or_else(corrupt)?;
    if image.len() != 16 + len || crc32fast::hash(bytes) != crc {
        return Err(corrupt());
    }
    Ok(Some(bytes.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        save(dir.path(), b"vote=3").unwrap();
        save(dir.path(), b"vote=4").unwrap();
        assert_eq!(load(dir.path()).unwrap().as_deref(), Some(&b"vote=4"[..]));
        let p = dir.path().join("META");
        let mut img = std::fs::read(&p).unwrap();
        *img.last_mut().unwrap() ^= 1;
        std::fs::write(&p, &img).unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(WalError::MetaCorrupt { .. })
        ));
    }
}
