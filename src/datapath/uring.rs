//! Batched TX writes through io_uring (opt-in): one `io_uring_enter` for a whole batch of frames
//! instead of one `writev` per frame.
//!
//! The frames of a batch are submitted as one chain of linked `Writev` requests
//! (`IOSQE_IO_LINK`), so the kernel writes them in order and a failure cancels the rest: their
//! completions say `-ECANCELED` and the datapath gives those chains back to the avail ring, in
//! order, exactly as after an `EAGAIN` on `writev`. The call waits for every completion before
//! it returns, so the iovec lists (guest memory borrowed for the batch) outlive the requests.
//!
//! On Linux 6.x tun and macvtap accept non-blocking issue: the writes run inline in
//! `io_uring_enter`, no io-wq thread is involved (see `benches/uring_probe.rs`).

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types, IoUring};

use super::IoVecBuf;

/// Most frames one batch submits.
pub const URING_BATCH: usize = super::BATCH;

/// One queue pair's ring for TX writes.
pub struct TxRing {
    ring: IoUring,
}

impl std::fmt::Debug for TxRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxRing").finish_non_exhaustive()
    }
}

impl TxRing {
    /// A ring with room for one batch.
    pub fn new() -> io::Result<TxRing> {
        Ok(TxRing {
            ring: IoUring::new(u32::try_from(URING_BATCH * 2).map_err(io::Error::other)?)?,
        })
    }

    /// Writes `frames[i]` for every `i` in `which` (in that order) on `fd`, linked, and stores
    /// each result (bytes written, or `-errno`) in `results[i]`. Returns after every request
    /// completed.
    pub fn write_linked(
        &mut self,
        fd: RawFd,
        frames: &[IoVecBuf<'_>],
        which: &[usize],
        results: &mut [i32],
    ) -> io::Result<()> {
        let n = which.len();
        if n == 0 {
            return Ok(());
        }
        debug_assert!(n <= URING_BATCH);
        for (k, &i) in which.iter().enumerate() {
            let iovs = frames[i].as_iovecs();
            // RWF_NOWAIT: a queue that cannot take the frame now answers -EAGAIN (the datapath
            // then waits for EPOLLOUT) instead of io_uring parking the request on a poll, which
            // would block this thread in io_uring_enter.
            // The kernel refuses a list longer than IOV_MAX (1024) with -EINVAL in the
            // completion, so a length saturated at u32::MAX fails like any other overlong list.
            let count = u32::try_from(iovs.len()).unwrap_or(u32::MAX);
            let mut e = opcode::Writev::new(types::Fd(fd), iovs.as_ptr(), count)
                .rw_flags(libc::RWF_NOWAIT)
                .build()
                .user_data(i as u64);
            if k + 1 < n {
                e = e.flags(squeue::Flags::IO_LINK);
            }
            // SAFETY: the iovec array and the guest memory it points at stay valid until this
            // function returns, and it returns only once every request has completed (below).
            // The ring has room for 2 × URING_BATCH entries and starts each batch empty.
            unsafe {
                self.ring
                    .submission()
                    .push(&e)
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            }
        }
        let mut done = 0;
        while done < n {
            match self.ring.submit_and_wait(n - done) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) =>
                {
                    continue
                }
                // Requests may still be in flight: never hand their buffers back. Leak the
                // ring (the kernel cancels what is left when it goes) and report it.
                Err(e) => {
                    let dead = std::mem::replace(&mut self.ring, IoUring::new(2)?);
                    std::mem::forget(dead);
                    return Err(e);
                }
            }
            for cqe in self.ring.completion() {
                // `user_data` is the frame index set above.
                let i = usize::try_from(cqe.user_data()).ok();
                if let Some(r) = i.and_then(|i| results.get_mut(i)) {
                    *r = cqe.result();
                }
                done += 1;
            }
        }
        Ok(())
    }
}
