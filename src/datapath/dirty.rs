//! Dirty-page logging for live migration (vhost-user `VHOST_F_LOG_ALL`).
//!
//! While the frontend migrates the guest it copies guest memory in rounds and must learn which
//! pages changed since it copied them. The CPU's writes are tracked by the hypervisor; ours
//! (RX buffers written by `readv`, the used rings) are not, so we set one bit per written 4 KiB
//! guest page in the log the frontend shares with `VHOST_USER_SET_LOG_BASE`: bit `n % 8` of byte
//! `n / 8` stands for guest-physical page `n`, as the vhost-user spec and QEMU's `vhost_log`
//! define it. The frontend clears bits as it harvests them, so every bit is set with an atomic OR.
//!
//! The frontend turns logging on with two messages: `VHOST_USER_SET_LOG_BASE` hands over a
//! shared-memory fd holding the bitmap (protocol feature `LOG_SHMFD`), and `SET_FEATURES` with
//! `VHOST_F_LOG_ALL` says "log every write from now on". `SET_FEATURES` without the bit turns it
//! off again (a finished or cancelled migration). Workers log only while both hold.
//! [`DirtyLogState`] is one connection's log (the mapping, and whether logging is on);
//! [`DirtyLog`] is the view a service round marks.
//!
//! Why not vhost-user-backend's own support: it needs the whole datapath typed over
//! `GuestMemoryMmap<BitmapMmapRegion>` (an `RwLock` taken on every guest-memory write), it keeps
//! logging after `LOG_ALL` is cleared, a later memory-table update silently drops the log, and
//! our RX writes go through raw iovecs it cannot see anyway. So the vhost-user shim takes
//! `SET_LOG_BASE` off the wire and gives it to [`DirtyLogState::set_base`], and the backend feeds
//! `LOG_ALL` to [`DirtyLogState::set_log_all`].
//!
//! This module holds the one `unsafe` mapping of the log.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

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

/// Largest log accepted: one bit per 4 KiB page, so 256 MiB covers 8 TiB of guest memory.
pub const MAX_LOG_BYTES: u64 = 256 << 20;

/// Why a `SET_LOG_BASE` could not be used. All are the frontend's fault.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// Zero or above [`MAX_LOG_BYTES`].
    #[error("frontend sent a dirty log of {0} bytes (must be 1..={MAX_LOG_BYTES})")]
    BadSize(u64),
    /// Offset plus size overflow or pass the end of the fd: touching the rest would SIGBUS.
    #[error("frontend's dirty log ({size} bytes at offset {offset}) is larger than its fd ({file_len} bytes)")]
    PastEndOfFile {
        /// Requested size.
        size: u64,
        /// Requested offset.
        offset: u64,
        /// The fd's size.
        file_len: u64,
    },
    /// `fstat` or `mmap` failed.
    #[error("cannot map the frontend's dirty log: {0}")]
    Map(#[source] io::Error),
}

/// A shared mapping of the frontend's log.
#[derive(Debug)]
struct LogMapping {
    /// Start of the mapping (page-aligned, as mmap returned it).
    base: NonNull<u8>,
    /// Mapped length.
    map_len: usize,
    /// Where the bitmap starts inside the mapping (`mmap_offset` modulo the page size).
    skip: usize,
    /// Bitmap bytes.
    len: usize,
}

// SAFETY: the mapping is plain shared memory that is only accessed through `AtomicU8`s; it has
// no thread affinity, and it is unmapped only in `Drop`, when no reference into it remains.
unsafe impl Send for LogMapping {}
// SAFETY: as above; every access is an atomic operation on `AtomicU8`.
unsafe impl Sync for LogMapping {}

impl LogMapping {
    fn map(file: &File, offset: u64, size: u64) -> Result<LogMapping, DirtyLogError> {
        if size == 0 || size > MAX_LOG_BYTES {
            return Err(DirtyLogError::BadSize(size));
        }
        let file_len = file.metadata().map_err(DirtyLogError::Map)?.len();
        let end = offset.checked_add(size);
        if !end.is_some_and(|e| e <= file_len) {
            return Err(DirtyLogError::PastEndOfFile {
                size,
                offset,
                file_len,
            });
        }
        let page = 4096u64;
        let aligned = offset - offset % page;
        // skip < one page and size <= MAX_LOG_BYTES: both fit a usize, the sum cannot overflow.
        let skip = usize::try_from(offset - aligned)
            .map_err(|e| DirtyLogError::Map(io::Error::other(e)))?;
        let len = usize::try_from(size).map_err(|_| DirtyLogError::BadSize(size))?;
        let map_len = skip + len;
        let file_offset =
            libc::off_t::try_from(aligned).map_err(|e| DirtyLogError::Map(io::Error::other(e)))?;
        // SAFETY: a fresh shared mapping of `map_len` bytes of a file we hold; the range was
        // checked to lie within the file above, so no access through it can SIGBUS (QEMU's log
        // memfd is sealed against shrinking). We own the mapping and unmap it in `Drop`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                file_offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DirtyLogError::Map(io::Error::last_os_error()));
        }
        let base = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| DirtyLogError::Map(io::Error::other("mmap returned null")))?;
        Ok(LogMapping {
            base,
            map_len,
            skip,
            len,
        })
    }

    fn bits(&self) -> &[AtomicU8] {
        // SAFETY: `base + skip .. + len` lies inside the live mapping (see `map`), which stays
        // mapped for as long as `self` is borrowed. `AtomicU8` has the layout of `u8`, and the
        // frontend too only touches the log with atomic operations.
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(self.skip).cast::<AtomicU8>(),
                self.len,
            )
        }
    }
}

impl Drop for LogMapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_len` are exactly what mmap returned, and `bits()` borrows `self`,
        // so no slice into the mapping outlives this call.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.map_len);
        }
    }
}

/// Whether and where one connection logs its writes (shared by the shim, the backend and the
/// workers of that connection).
#[derive(Debug, Default)]
pub struct DirtyLogState {
    /// `VHOST_F_LOG_ALL` is in the acked features.
    log_all: AtomicBool,
    /// The last log the frontend set. Workers hold the read lock for a whole service round, so
    /// a new log replaces the old one only between rounds: no mark can land in a log the
    /// frontend has already harvested and dropped.
    mapping: RwLock<Option<LogMapping>>,
    /// `SET_LOG_BASE` messages taken.
    bases_set: AtomicU64,
}

/// A worker's hold on the log for one service round (see [`DirtyLogState::active`]).
#[derive(Debug)]
pub struct ActiveLog<'a> {
    guard: RwLockReadGuard<'a, Option<LogMapping>>,
}

impl ActiveLog<'_> {
    /// The bitmap view the datapath marks.
    pub fn view(&self) -> Option<DirtyLog<'_>> {
        self.guard.as_ref().map(|m| DirtyLog::new(m.bits()))
    }
}

impl DirtyLogState {
    /// A connection that has not asked for logging.
    pub fn new() -> Self {
        Self::default()
    }

    /// `SET_LOG_BASE`: maps the frontend's log (replacing any earlier one once no worker is
    /// mid-round).
    pub fn set_base(&self, file: &File, offset: u64, size: u64) -> Result<(), DirtyLogError> {
        let m = LogMapping::map(file, offset, size)?;
        *self.mapping.write().unwrap_or_else(|e| e.into_inner()) = Some(m);
        self.bases_set.fetch_add(1, Ordering::Relaxed);
        tracing::info!(bytes = size, offset, "frontend set the dirty-page log");
        Ok(())
    }

    /// `SET_FEATURES`: logging follows `VHOST_F_LOG_ALL`.
    pub fn set_log_all(&self, on: bool) {
        let was = self.log_all.swap(on, Ordering::SeqCst);
        if was != on {
            tracing::info!(
                "dirty-page logging {}",
                if on { "started (migration)" } else { "stopped" }
            );
        }
    }

    /// Whether writes are being logged now.
    pub fn logging(&self) -> bool {
        self.log_all.load(Ordering::Relaxed)
            && self
                .mapping
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    /// For one service round: `Some` while logging is on (hold it for the round and mark through
    /// [`ActiveLog::view`]); `None` otherwise, at the cost of one atomic load.
    pub fn active(&self) -> Option<ActiveLog<'_>> {
        if !self.log_all.load(Ordering::Relaxed) {
            return None;
        }
        let guard = self.mapping.read().unwrap_or_else(|e| e.into_inner());
        guard.is_some().then_some(ActiveLog { guard })
    }

    /// `SET_LOG_BASE` messages taken on this connection.
    pub fn bases_set(&self) -> u64 {
        self.bases_set.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn log_file(len: usize) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0u8; len]).unwrap();
        f
    }

    #[test]
    fn logging_needs_both_log_all_and_a_base() {
        let s = DirtyLogState::new();
        assert!(s.active().is_none());
        s.set_log_all(true);
        assert!(s.active().is_none(), "LOG_ALL without a base logs nowhere");
        s.set_base(&log_file(64), 0, 64).unwrap();
        assert!(s.logging());
        s.set_log_all(false);
        assert!(s.active().is_none() && !s.logging());
    }

    #[test]
    fn marks_land_in_the_frontends_file() {
        let f = log_file(8192);
        let s = DirtyLogState::new();
        s.set_base(&f, 4096 + 16, 32).unwrap();
        s.set_log_all(true);
        let a = s.active().unwrap();
        // Page 9 = bit 1 of byte 1 of the bitmap, which starts at file offset 4112.
        a.view().unwrap().mark(9 * 4096, 1);
        drop(a);
        let mut buf = vec![0u8; 8192];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0).unwrap();
        let set: Vec<usize> = buf
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != 0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(set, vec![4096 + 16 + 1]);
        assert_eq!(buf[4113], 0b10);
    }

    #[test]
    fn log_larger_than_its_fd_is_refused() {
        let s = DirtyLogState::new();
        let e = s.set_base(&log_file(100), 0, 4096).unwrap_err();
        assert!(matches!(e, DirtyLogError::PastEndOfFile { .. }), "{e}");
        let e = s.set_base(&log_file(100), u64::MAX, 2).unwrap_err();
        assert!(matches!(e, DirtyLogError::PastEndOfFile { .. }), "{e}");
        assert!(!s.logging());
    }

    #[test]
    fn log_of_zero_or_absurd_size_is_refused() {
        let s = DirtyLogState::new();
        assert!(matches!(
            s.set_base(&log_file(10), 0, 0),
            Err(DirtyLogError::BadSize(0))
        ));
        assert!(matches!(
            s.set_base(&log_file(10), 0, MAX_LOG_BYTES + 1),
            Err(DirtyLogError::BadSize(_))
        ));
    }

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
