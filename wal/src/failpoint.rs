//! Named fault points for tests (feature `failpoints`).
//!
//! With the feature off, `hit` compiles to nothing. With it on, a test arms a point with an errno
//! and the next operation at that point fails with that error, once or always.

/// Fault points the WAL checks.
pub mod points {
    /// Creating (preallocating) a new segment file.
    pub const SEGMENT_CREATE: &str = "wal::segment_create";
    /// Writing a zero-filled spare segment (background; its failure only disables spares).
    pub const SPARE_WRITE: &str = "wal::spare_write";
    /// Writing a group-commit buffer.
    pub const WRITE: &str = "wal::write";
    /// The fdatasync that makes a group durable.
    pub const FDATASYNC: &str = "wal::fdatasync";
}

#[cfg(feature = "failpoints")]
mod imp {
    use std::cell::RefCell;
    use std::collections::HashMap;

    thread_local! {
        static ARMED: RefCell<HashMap<&'static str, (i32, bool)>> = RefCell::new(HashMap::new());
    }

    /// Makes the next operation at `point` fail with `errno` (every one if `sticky`).
    pub fn arm(point: &'static str, errno: i32, sticky: bool) {
        ARMED.with(|a| a.borrow_mut().insert(point, (errno, sticky)));
    }

    /// Disarms every point.
    pub fn clear() {
        ARMED.with(|a| a.borrow_mut().clear());
    }

    pub(crate) fn hit(point: &'static str) -> std::io::Result<()> {
        ARMED.with(|a| {
            let mut a = a.borrow_mut();
            match a.get(point).copied() {
                Some((errno, sticky)) => {
                    if !sticky {
                        a.remove(point);
                    }
                    Err(std::io::Error::from_raw_os_error(errno))
                }
                None => Ok(()),
            }
        })
    }
}

#[cfg(not(feature = "failpoints"))]
mod imp {
    #[inline(always)]
    pub(crate) fn hit(_point: &'static str) -> std::io::Result<()> {
        Ok(())
    }
}

pub(crate) use imp::hit;
#[cfg(feature = "failpoints")]
pub use imp::{arm, clear};
