//! A bounded pool of DMA buffers that finished rounds give back, so large buffers are reused
//! instead of allocated fresh each round (fresh large allocations come as new pages the kernel
//! must clear, which cost a tenth of the cycles of 1 MiB appends before the pool).

use glommio::io::DmaBuffer;

/// Buffers smaller than this are not kept: small allocations come back warm from the allocator.
pub const POOLED_BYTES_MIN: usize = 64 << 10;
/// Most buffers kept, whatever their size.
const POOLED_BUFFERS_MAX: usize = 256;

/// Reusable DMA buffers, at most `bytes_max` bytes of them.
pub struct BufferPool {
    bufs: Vec<DmaBuffer>,
    bytes: usize,
    bytes_max: usize,
}

impl BufferPool {
    /// An empty pool that keeps at most `bytes_max` bytes.
    pub fn new(bytes_max: usize) -> BufferPool {
        BufferPool {
            bufs: Vec::new(),
            bytes: 0,
            bytes_max,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A pooled buffer for a request that needs `len_min` bytes and would like `len_want`: the
    /// smallest of at least `len_want` bytes, else the largest of at least `len_min`. Never one
    /// over four times `len_want` (a small request does not take a buffer a large one wants).
    pub fn take(&mut self, len_min: usize, len_want: usize) -> Option<DmaBuffer> {
        debug_assert!(len_min <= len_want);
        let usable = |b: &DmaBuffer| b.len() >= len_min && b.len() <= len_want.saturating_mul(4);
        let candidates = self.bufs.iter().enumerate().filter(|(_, b)| usable(b));
        let best = candidates
            .clone()
            .filter(|(_, b)| b.len() >= len_want)
            .min_by_key(|(_, b)| b.len())
            .or_else(|| candidates.max_by_key(|(_, b)| b.len()));
        let (k, _) = best?;
        let buf = self.bufs.swap_remove(k);
        self.bytes -= buf.len();
        Some(buf)
    }

    /// Keeps `buf` for reuse if it is large enough to be worth it and the pool has room.
    pub fn put(&mut self, buf: DmaBuffer) {
        let len = buf.len();
        if len >= POOLED_BYTES_MIN
            && self.bytes + len <= self.bytes_max
            && self.bufs.len() < POOLED_BUFFERS_MAX
        {
            self.bytes += len;
            self.bufs.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(len: usize) -> DmaBuffer {
        glommio::allocate_dma_buffer_global(len)
    }

    #[test]
    fn takes_the_best_fit_and_stays_within_its_bounds() {
        let mut pool = BufferPool::new(4 << 20);
        pool.put(buf(4096)); // too small to keep
        pool.put(buf(128 << 10));
        pool.put(buf(1 << 20));
        pool.put(buf(2 << 20));
        assert_eq!(pool.bytes(), (128 << 10) + (3 << 20));
        pool.put(buf(1 << 20)); // over bytes_max
        assert_eq!(pool.bytes(), (128 << 10) + (3 << 20));
        // The smallest that holds what is wanted.
        assert_eq!(pool.take(100 << 10, 1 << 20).unwrap().len(), 1 << 20);
        // Else the largest that holds what is needed, never over 4x what is wanted.
        assert_eq!(pool.take(64 << 10, 3 << 20).unwrap().len(), 2 << 20);
        assert!(
            pool.take(16 << 10, 16 << 10).is_none(),
            "128 KiB is over 4x 16 KiB"
        );
        assert_eq!(pool.take(100 << 10, 100 << 10).unwrap().len(), 128 << 10);
        assert_eq!(pool.bytes(), 0);
        assert!(pool.take(1, 1).is_none());
    }
}
