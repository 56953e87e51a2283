//! Dirty-page logging for live migration (vhost-user `VHOST_F_LOG_ALL`).
//!
//! While the frontend migrates the guest it copies guest memory in rounds and must learn which
//! pages changed since it copied them. The CPU's writes are tracked by the hypervisor; ours
//! (RX buffers written by `readv`, the used rings) are not, so we set one bit per written 4 KiB
//! guest page in the log the frontend shares with `VHOST_USER_SET_LOG_BASE`: bit `n % 8` of byte
//! `n / 8` stands for guest-physical page `n`, as the vhost-user spec and QEMU's `vhost_log`
//! define it. The frontend clears bits as it harvests them, so every bit is set with an atomic OR.
//!
//! [`DirtyLog`] is only a view over those bytes: the mapping itself belongs to
//! `crate::dirty_log`, which also decides whether logging is on.

use std::sync::atomic::{AtomicU8, Ordering};

/// Size of a logged page (`VHOST_LOG_PAGE`).
pub const LOG_PAGE_SIZE: u64 = 0x1000;

/// A view over the frontend's dirty-page bitmap.
#[derive(Debug, Clone, Copy)]
pub struct DirtyLog<'a> {
    bits: &'a [AtomicU8],
}

impl<'a> DirtyLog<'a> {
    /// A log over `bits` (page `n` is bit `n % 8` of `bits[n / 8]`).
    pub fn new(bits: &'a [AtomicU8]) -> Self {
        DirtyLog { bits }
    }

    /// Guest-physical bytes this log covers.
    pub fn covers(&self) -> u64 {
        (self.bits.len() as u64).saturating_mul(8 * LOG_PAGE_SIZE)
    }

    /// Marks every page touched by `len` bytes at guest-physical `gpa`. Pages past the end of
    /// the log are not marked: the frontend sizes the log for all of guest memory, and we only
    /// write to ranges that translated to guest memory.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        // The bytes were written just before (readv, used entries). Without a full fence the
        // load below may run ahead of those stores (x86 lets loads pass older stores), see a
        // bit the frontend is about to harvest, and skip setting it again: the frontend could
        // then copy the page before our stores land and never copy it again.
        std::sync::atomic::fence(Ordering::SeqCst);
        let first = gpa / LOG_PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
        for page in first..=last {
            let Some(byte) = usize::try_from(page / 8)
                .ok()
                .and_then(|i| self.bits.get(i))
            else {
                break;
            };
            let bit = 1u8 << (page % 8);
            // A plain load first: most marks hit pages already dirty in this round, and a load
            // does not take the cache line away from the frontend's harvesting thread.
            if byte.load(Ordering::Relaxed) & bit == 0 {
                byte.fetch_or(bit, Ordering::Relaxed);
            }
        }
    }

    /// Whether page `page` is marked (tests and diagnostics).
    pub fn is_marked(&self, page: u64) -> bool {
        usize::try_from(page / 8)
            .ok()
            .and_then(|i| self.bits.get(i))
            .is_some_and(|b| b.load(Ordering::Relaxed) & (1 << (page % 8)) != 0)
    }

    /// The marked pages, in order (tests and diagnostics).
    pub fn marked_pages(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for (i, b) in self.bits.iter().enumerate() {
            let b = b.load(Ordering::Relaxed);
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    v.push(i as u64 * 8 + bit);
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(n: usize) -> Vec<AtomicU8> {
        (0..n).map(|_| AtomicU8::new(0)).collect()
    }

    #[test]
    fn mark_sets_one_bit_per_touched_page() {
        let b = bits(4);
        let log = DirtyLog::new(&b);
        // 0x1ff0..0x2010 touches pages 1 and 2.
        log.mark(0x1ff0, 0x20);
        assert_eq!(log.marked_pages(), vec![1, 2]);
        log.mark(9 * LOG_PAGE_SIZE, 1);
        assert_eq!(log.marked_pages(), vec![1, 2, 9]);
        assert_eq!(b[1].load(Ordering::Relaxed), 0b10);
    }

    #[test]
    fn mark_of_zero_bytes_marks_nothing() {
        let b = bits(1);
        DirtyLog::new(&b).mark(0x3000, 0);
        assert!(DirtyLog::new(&b).marked_pages().is_empty());
    }

    #[test]
    fn mark_past_the_end_of_the_log_is_ignored() {
        let b = bits(1); // pages 0..8
        let log = DirtyLog::new(&b);
        assert_eq!(log.covers(), 8 * LOG_PAGE_SIZE);
        log.mark(7 * LOG_PAGE_SIZE, 3 * LOG_PAGE_SIZE);
        assert_eq!(log.marked_pages(), vec![7]);
        log.mark(u64::MAX - 10, 100);
        assert_eq!(log.marked_pages(), vec![7]);
    }

    #[test]
    fn mark_keeps_bits_the_frontend_left_set() {
        let b = bits(1);
        b[0].store(0b1000_0001, Ordering::Relaxed);
        DirtyLog::new(&b).mark(2 * LOG_PAGE_SIZE, 1);
        assert_eq!(b[0].load(Ordering::Relaxed), 0b1000_0101);
    }
}
