//! [`FakeHostQueue`]: the one stand-in for a tap/macvtap queue fd, used by the datapath unit
//! tests, the fuzz targets, the in-process vhost-user suites and the stress tests.
//!
//! A nonblocking `UnixDatagram` pair: the datapath's end (`dev`) and the host's end (`peer`).
//! Datagrams keep frame boundaries like a tap fd; errnos can be queued to fail the next
//! send/recv; a frame larger than the receive buffers is consumed and fails with `EFAULT`, as
//! macvtap does. The control calls ([`QueueControl`]) are recorded, not refused.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::MsgFlags;

use crate::datapath::iovec::{readv_fd, writev_fd};
use crate::datapath::{HostQueue, IoVecBuf};
use crate::host::{QueueControl, VNET_HDR_LEN_V1};

/// A [`HostQueue`] over a datagram socketpair, with fault injection.
#[derive(Debug)]
pub struct FakeHostQueue {
    dev: UnixDatagram,
    peer: UnixDatagram,
    send_faults: Mutex<VecDeque<i32>>,
    recv_faults: Mutex<VecDeque<i32>>,
    send_calls: AtomicUsize,
    recv_calls: AtomicUsize,
    attached: AtomicBool,
    offloads: AtomicU32,
    hdr_len: AtomicUsize,
}

impl Default for FakeHostQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeHostQueue {
    /// A new pair, both ends nonblocking; attached, no offloads, a 12-byte header.
    pub fn new() -> Self {
        let (dev, peer) = UnixDatagram::pair().expect("socketpair");
        dev.set_nonblocking(true).expect("nonblocking");
        peer.set_nonblocking(true).expect("nonblocking");
        FakeHostQueue {
            dev,
            peer,
            send_faults: Mutex::new(VecDeque::new()),
            recv_faults: Mutex::new(VecDeque::new()),
            send_calls: AtomicUsize::new(0),
            recv_calls: AtomicUsize::new(0),
            attached: AtomicBool::new(true),
            offloads: AtomicU32::new(0),
            hdr_len: AtomicUsize::new(VNET_HDR_LEN_V1),
        }
    }

    /// Like [`FakeHostQueue::new`], with the host's end blocking for up to `timeout` per read
    /// (tests that wait for the datapath on another thread).
    pub fn with_peer_timeout(timeout: Duration) -> Self {
        let q = Self::new();
        q.peer.set_nonblocking(false).expect("blocking peer");
        q.peer
            .set_read_timeout(Some(timeout))
            .expect("read timeout");
        q
    }

    /// The host's end: what the datapath sends arrives here; what is sent here, it receives.
    pub fn peer(&self) -> &UnixDatagram {
        &self.peer
    }

    /// The next `send_frame` fails with `errno` (queued: one per call).
    pub fn fail_next_send(&self, errno: i32) {
        self.send_faults.lock().unwrap().push_back(errno);
    }

    /// The next `recv_frame` fails with `errno` (queued: one per call). No frame is consumed.
    pub fn fail_next_recv(&self, errno: i32) {
        self.recv_faults.lock().unwrap().push_back(errno);
    }

    /// Queues a frame (vnet header included) for the datapath to receive.
    pub fn inject_frame(&self, frame: &[u8]) {
        let n = self.peer.send(frame).expect("inject frame");
        assert_eq!(n, frame.len());
    }

    /// The next frame the datapath sent, if any (waits up to the peer's timeout, if one is set).
    pub fn take_frame(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 1 << 17];
        match self.peer.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("fake host queue recv: {e}"),
        }
    }

    /// Every frame the datapath sent so far.
    pub fn take_all_frames(&self) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.take_frame()).collect()
    }

    /// True when a frame injected with [`FakeHostQueue::inject_frame`] is still unread.
    pub fn has_pending_rx(&self) -> bool {
        nix::sys::socket::recv(
            self.dev.as_raw_fd(),
            &mut [],
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )
        .is_ok()
    }

    /// How many times `send_frame` was called.
    pub fn send_calls(&self) -> usize {
        self.send_calls.load(Ordering::Relaxed)
    }

    /// How many times `recv_frame` was called.
    pub fn recv_calls(&self) -> usize {
        self.recv_calls.load(Ordering::Relaxed)
    }

    /// Whether the queue is attached (the last of `attach`/`detach` called, attached at first).
    pub fn is_attached(&self) -> bool {
        self.attached.load(Ordering::SeqCst)
    }

    /// The last `TUN_F_*` offload bits set (0 at first).
    pub fn offloads(&self) -> u32 {
        self.offloads.load(Ordering::SeqCst)
    }

    /// The last vnet header length set (12 at first).
    pub fn vnet_hdr_len(&self) -> usize {
        self.hdr_len.load(Ordering::SeqCst)
    }
}

impl AsFd for FakeHostQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.dev.as_fd()
    }
}

impl AsRawFd for FakeHostQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }
}

impl HostQueue for FakeHostQueue {
    fn send_frame(&self, frame: &IoVecBuf<'_>) -> io::Result<usize> {
        self.send_calls.fetch_add(1, Ordering::Relaxed);
        if let Some(errno) = self.send_faults.lock().unwrap().pop_front() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        writev_fd(self.dev.as_raw_fd(), frame)
    }

    fn recv_frame(&self, bufs: &IoVecBuf<'_>) -> io::Result<usize> {
        self.recv_calls.fetch_add(1, Ordering::Relaxed);
        if let Some(errno) = self.recv_faults.lock().unwrap().pop_front() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let fd = self.dev.as_raw_fd();
        // MSG_TRUNC makes a datagram socket report the real length of the next datagram.
        let len = nix::sys::socket::recv(
            fd,
            &mut [],
            MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        if len > bufs.total_len() {
            // macvtap semantics: the frame is consumed and the read fails.
            let _ = nix::sys::socket::recv(fd, &mut [], MsgFlags::MSG_DONTWAIT);
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        readv_fd(fd, bufs)
    }
}

/// Records every control call (the fake has no offloads, header size or queue steering to
/// program) so tests can check what the backend asked for.
impl QueueControl for FakeHostQueue {
    fn set_offload(&self, tun_flags: u32) -> io::Result<()> {
        self.offloads.store(tun_flags, Ordering::SeqCst);
        Ok(())
    }
    fn set_vnet_hdr_len(&self, len: usize) -> io::Result<()> {
        self.hdr_len.store(len, Ordering::SeqCst);
        Ok(())
    }
    fn attach(&self) -> io::Result<()> {
        self.attached.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn detach(&self) -> io::Result<()> {
        self.attached.store(false, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::memory::*;
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    #[test]
    fn fake_host_queue_round_trips_and_injects_faults() {
        let mem = test_memory();
        let host = FakeHostQueue::new();
        write_guest(&mem, DATA_BASE, b"0123456789abcdef");
        let mut iov = IoVecBuf::with_capacity(2);
        iov.push(&mem.get_slice(GuestAddress(DATA_BASE), 16).unwrap());
        host.fail_next_send(libc::EIO);
        assert_eq!(
            host.send_frame(&iov).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert_eq!(host.send_frame(&iov).unwrap(), 16);
        assert_eq!(host.take_frame().unwrap(), b"0123456789abcdef");
        assert!(host.take_frame().is_none());

        host.inject_frame(b"xyz");
        assert!(host.has_pending_rx());
        assert_eq!(host.recv_frame(&iov).unwrap(), 3);
        assert!(!host.has_pending_rx());
        assert_eq!(
            host.recv_frame(&iov).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // Too big for the buffers: consumed, EFAULT.
        host.inject_frame(&[7u8; 17]);
        assert_eq!(
            host.recv_frame(&iov).unwrap_err().raw_os_error(),
            Some(libc::EFAULT)
        );
        assert!(!host.has_pending_rx());
        assert_eq!(host.send_calls(), 2);
        assert_eq!(host.recv_calls(), 3);
    }

    #[test]
    fn control_calls_are_recorded() {
        let host = FakeHostQueue::new();
        assert!(host.is_attached());
        host.detach().unwrap();
        host.set_offload(0x13).unwrap();
        host.set_vnet_hdr_len(10).unwrap();
        assert!(!host.is_attached());
        assert_eq!((host.offloads(), host.vnet_hdr_len()), (0x13, 10));
        host.attach().unwrap();
        assert!(host.is_attached());
    }
}
