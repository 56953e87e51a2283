//! Scatter/gather I/O straight over guest memory.
//!
//! One of the few modules allowed to hold `unsafe` (with `host::sys` and `dirty_log`).
//! An [`IoVecBuf`] can only be filled from [`VolatileSlice`]s, which vm-memory hands out only for
//! mapped guest memory, and it borrows that memory for `'m`: the iovecs can never outlive the
//! guest-memory snapshot they were built from, so no host pointer survives a memory-table update.

use std::io;
use std::marker::PhantomData;
use std::os::fd::RawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// A reusable list of iovecs pointing into guest memory borrowed for `'m`.
///
/// The backing `Vec` keeps its capacity across frames and batches (see [`IoVecBuf::reuse`]), so
/// the datapath allocates nothing per frame in steady state.
#[derive(Debug)]
pub struct IoVecBuf<'m> {
    iovs: Vec<libc::iovec>,
    total: usize,
    _mem: PhantomData<&'m [u8]>,
}

// SAFETY: the raw pointers inside point into guest memory that is itself `Send + Sync`
// (vm-memory's mmap regions); the buffer only carries them, it never aliases host objects.
unsafe impl Send for IoVecBuf<'_> {}

impl Default for IoVecBuf<'_> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl<'m> IoVecBuf<'m> {
    /// An empty list with room for `n` segments.
    pub fn with_capacity(n: usize) -> Self {
        IoVecBuf {
            iovs: Vec::with_capacity(n),
            total: 0,
            _mem: PhantomData,
        }
    }

    /// Empties the list and rebinds it to another memory snapshot, keeping its allocation.
    pub fn reuse<'n>(mut self) -> IoVecBuf<'n> {
        self.iovs.clear();
        IoVecBuf {
            iovs: self.iovs,
            total: 0,
            _mem: PhantomData,
        }
    }

    /// Empties the list, keeping its allocation and its borrow.
    pub fn clear(&mut self) {
        self.iovs.clear();
        self.total = 0;
    }

    /// Appends one guest-memory segment. Zero-length slices are skipped.
    pub fn push<B: BitmapSlice>(&mut self, slice: &VolatileSlice<'m, B>) {
        if slice.is_empty() {
            return;
        }
        let guard = slice.ptr_guard_mut();
        self.iovs.push(libc::iovec {
            iov_base: guard.as_ptr().cast(),
            iov_len: slice.len(),
        });
        self.total += slice.len();
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.iovs.len()
    }

    /// True when there is no segment.
    pub fn is_empty(&self) -> bool {
        self.iovs.is_empty()
    }

    /// Sum of the segment lengths, in bytes.
    pub fn total_len(&self) -> usize {
        self.total
    }

    /// Drops trailing segments and shortens the last one so the list covers exactly `len` bytes
    /// (or everything, when it is shorter).
    pub fn truncate(&mut self, len: usize) {
        let mut left = len;
        let mut keep = 0;
        for iov in self.iovs.iter_mut() {
            if left == 0 {
                break;
            }
            if iov.iov_len > left {
                iov.iov_len = left;
            }
            left -= iov.iov_len;
            keep += 1;
        }
        self.iovs.truncate(keep);
        self.total = len.min(self.total);
    }

    /// Removes the first `n` segments (all of them when `n` is larger), keeping the allocation.
    /// The RX path uses it to drop the chains a frame consumed from a window's list instead of
    /// translating the rest of the window again.
    pub fn drain_front(&mut self, n: usize) {
        let n = n.min(self.iovs.len());
        let gone: usize = self.iovs[..n].iter().map(|v| v.iov_len).sum();
        self.iovs.drain(..n);
        self.total -= gone;
    }

    /// Walks the list's bytes from byte `offset` for at most `len` bytes, handing `copy` each
    /// piece that lies in one segment: where it starts in guest memory, where it starts in the
    /// caller's `len`-byte buffer, and its length. Returns how many bytes were walked.
    fn for_each_piece(
        &self,
        mut offset: usize,
        len: usize,
        mut copy: impl FnMut(*mut u8, usize, usize),
    ) -> usize {
        let mut done = 0;
        for iov in &self.iovs {
            if done == len {
                break;
            }
            if offset >= iov.iov_len {
                offset -= iov.iov_len;
                continue;
            }
            let n = (iov.iov_len - offset).min(len - done);
            // `offset < iov_len`: the piece starts inside the segment and `n` bytes from there
            // stay inside it.
            copy(iov.iov_base.cast::<u8>().wrapping_add(offset), done, n);
            done += n;
            offset = 0;
        }
        done
    }

    /// Copies `src` into the list's bytes starting at byte `offset`. Returns how many bytes fit.
    /// Used for the few fields the backend itself writes (the RX header's `num_buffers`).
    pub fn write_at(&self, offset: usize, src: &[u8]) -> usize {
        self.for_each_piece(offset, src.len(), |guest, at, n| {
            let src = &src[at..at + n];
            // SAFETY: `guest` lies in a segment `push` built from a VolatileSlice of guest memory
            // that stays mapped for `'m`, with at least `n` bytes left in it (`for_each_piece`).
            // Guest memory may be concurrently modified by the guest, which is why this is a
            // byte copy through a raw pointer and never a Rust reference.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), guest, n) }
        })
    }

    /// Copies the list's bytes from byte `offset` into `dst`. Returns how many bytes were copied.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        self.for_each_piece(offset, dst.len(), |guest, at, n| {
            let dst = &mut dst[at..at + n];
            // SAFETY: as in `write_at`; the source range lies inside one mapped segment and the
            // destination is a distinct host buffer of `n` bytes.
            unsafe { std::ptr::copy_nonoverlapping(guest.cast_const(), dst.as_mut_ptr(), n) }
        })
    }

    /// The raw iovecs, for callers that hand them to the kernel.
    pub fn as_iovecs(&self) -> &[libc::iovec] {
        &self.iovs
    }
}

/// Clamps an iovec count to what one `readv`/`writev` accepts.
fn iov_count(buf: &IoVecBuf<'_>) -> io::Result<libc::c_int> {
    // IOV_MAX is 1024 on Linux; a longer list is a guest-built chain we refuse rather than cut.
    match libc::c_int::try_from(buf.len()) {
        Ok(n) if n <= 1024 => Ok(n),
        _ => Err(io::Error::from_raw_os_error(libc::EMSGSIZE)),
    }
}

/// Gathers the list into one `writev` on `fd`. Returns bytes written.
pub fn writev_fd(fd: RawFd, buf: &IoVecBuf<'_>) -> io::Result<usize> {
    let cnt = iov_count(buf)?;
    // SAFETY: every iovec points at `iov_len` readable bytes of guest memory mapped for the
    // buffer's lifetime `'m` (see `IoVecBuf::push`); the kernel only reads them.
    let ret = unsafe { libc::writev(fd, buf.iovs.as_ptr(), cnt) };
    // Negative (-1) is the one failure, and errno names it.
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// Scatters one `readv` on `fd` into the list. Returns bytes read.
pub fn readv_fd(fd: RawFd, buf: &IoVecBuf<'_>) -> io::Result<usize> {
    let cnt = iov_count(buf)?;
    // SAFETY: every iovec points at `iov_len` bytes of guest memory mapped for `'m`; the datapath
    // only builds RX lists from device-writable descriptors, so the kernel may write all of them.
    let ret = unsafe { libc::readv(fd, buf.iovs.as_ptr(), cnt) };
    // Negative (-1) is the one failure, and errno names it.
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap()
    }

    /// The list covering `len` bytes of `m` from `addr` (one segment per region it crosses).
    fn list_over(m: &GuestMemoryMmap, addr: u64, len: usize) -> IoVecBuf<'_> {
        let mut buf = IoVecBuf::with_capacity(4);
        for s in m.get_slices(GuestAddress(addr), len) {
            buf.push(&s.unwrap());
        }
        buf
    }

    #[test]
    fn write_and_read_across_segments() {
        let m = mem();
        let buf = list_over(&m, 0xff8, 16);
        assert_eq!(buf.len(), 2);
        assert_eq!(buf.total_len(), 16);
        assert_eq!(buf.write_at(6, &[1, 2, 3, 4]), 4);
        let mut out = [0u8; 4];
        assert_eq!(buf.read_at(6, &mut out), 4);
        assert_eq!(out, [1, 2, 3, 4]);
        assert_eq!(m.read_obj::<u32>(GuestAddress(0xffe)).unwrap(), 0x0403_0201);
    }

    #[test]
    fn truncate_cuts_last_segment() {
        let m = mem();
        let mut buf = list_over(&m, 0xff0, 64);
        buf.truncate(20);
        assert_eq!(buf.len(), 2);
        assert_eq!(buf.as_iovecs()[1].iov_len, 4);
        assert_eq!(buf.total_len(), 20);
    }

    #[test]
    fn drain_front_drops_leading_segments() {
        let m = mem();
        let mut buf = IoVecBuf::with_capacity(4);
        buf.push(&m.get_slice(GuestAddress(0x10), 8).unwrap());
        buf.push(&m.get_slice(GuestAddress(0x100), 16).unwrap());
        buf.push(&m.get_slice(GuestAddress(0x200), 32).unwrap());
        m.write_slice(&[9u8; 16], GuestAddress(0x100)).unwrap();
        buf.drain_front(1);
        assert_eq!(buf.len(), 2);
        assert_eq!(buf.total_len(), 48);
        let mut out = [0u8; 4];
        assert_eq!(buf.read_at(0, &mut out), 4);
        assert_eq!(out, [9u8; 4]);
        buf.drain_front(5);
        assert!(buf.is_empty());
        assert_eq!(buf.total_len(), 0);
    }

    #[test]
    fn writev_and_readv_roundtrip_over_socketpair() {
        let m = mem();
        m.write_slice(b"hello, guest", GuestAddress(0x10)).unwrap();
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        use std::os::fd::AsRawFd;
        let mut tx = IoVecBuf::with_capacity(2);
        tx.push(&m.get_slice(GuestAddress(0x10), 12).unwrap());
        assert_eq!(writev_fd(a.as_raw_fd(), &tx).unwrap(), 12);
        let mut rx = IoVecBuf::with_capacity(2);
        rx.push(&m.get_slice(GuestAddress(0x1ff0), 12).unwrap());
        assert_eq!(readv_fd(b.as_raw_fd(), &rx).unwrap(), 12);
        let mut out = [0u8; 12];
        m.read_slice(&mut out, GuestAddress(0x1ff0)).unwrap();
        assert_eq!(&out, b"hello, guest");
    }
}
