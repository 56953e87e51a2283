//! Test doubles for the datapath (unit tests, fuzz targets, benches; feature `test-utils`).
//!
//! - [`FakeHostQueue`]: a [`HostQueue`] over a nonblocking `UnixDatagram` pair. Datagrams keep
//!   frame boundaries like a tap fd; errnos can be queued to fail the next send/recv; a frame larger
//!   than the receive buffers is consumed and fails with `EFAULT`, as macvtap does.
//! - [`GuestQueue`]: the driver side of a split virtqueue in mock guest memory, in the style of
//!   Firecracker's `TestHelper`: chains from `(addr, len, flags)` tuples, used-ring readers and a
//!   shadow ledger checking that every popped head comes back exactly once.
//! - [`test_memory`] and friends: guest memory with two adjacent regions and a hole.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use nix::sys::socket::MsgFlags;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::iovec::{readv_fd, writev_fd};
use super::{HostQueue, IoVecBuf};

/// Descriptor flag: device-writable (an RX buffer).
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flag: chained (set automatically by [`GuestQueue::add_desc_chain`]).
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// End of the first region of [`test_memory`] / start of the second (adjacent) one.
pub const REGION_SPLIT: u64 = 0x10_0000;
/// Start of the unmapped hole in [`test_memory`].
pub const HOLE_START: u64 = 0x20_0000;
/// Start of the third region of [`test_memory`], after the hole.
pub const HIGH_REGION: u64 = 0x40_0000;
/// First address tests should use for buffers (the rings live below it).
pub const DATA_BASE: u64 = 0x1_0000;

/// Guest memory `[0, 1 MiB) [1 MiB, 2 MiB)` (adjacent regions), a hole `[2 MiB, 4 MiB)`, and
/// `[4 MiB, 5 MiB)`. Queues go at 0, buffers from [`DATA_BASE`].
pub fn test_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION_SPLIT as usize),
        (
            GuestAddress(REGION_SPLIT),
            (HOLE_START - REGION_SPLIT) as usize,
        ),
        (GuestAddress(HIGH_REGION), 0x10_0000),
    ])
    .expect("test guest memory")
}

/// Guest memory of the given `(start, len)` ranges.
pub fn memory_of(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
    let r: Vec<_> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    GuestMemoryMmap::from_ranges(&r).expect("test guest memory")
}

/// A recognisable frame: `hdr_len` header bytes (`0xh0, 0xh1...` pattern with `seed`) followed by
/// `payload_len` payload bytes. The header's `gso_type` byte is 0 (no segmentation), as in an
/// ordinary frame.
pub fn pattern_frame(hdr_len: usize, payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..hdr_len + payload_len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    if hdr_len > 1 {
        f[1] = 0;
    }
    f
}

/// Writes `bytes` at `addr` (test setup; panics on unmapped memory).
pub fn write_guest(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(addr))
        .expect("write test guest memory");
}

/// Reads `len` bytes at `addr` (test checks; panics on unmapped memory).
pub fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr))
        .expect("read test guest memory");
    v
}

/// A ready `Queue` with arbitrary ring addresses, not validated (for rings outside memory).
pub fn raw_queue(size: u16, desc_table: u64, avail: u64, used: u64) -> Queue {
    let mut q = Queue::new(size).expect("queue size");
    q.set_size(size);
    q.try_set_desc_table_address(GuestAddress(desc_table))
        .expect("desc table address");
    q.try_set_avail_ring_address(GuestAddress(avail))
        .expect("avail ring address");
    q.try_set_used_ring_address(GuestAddress(used))
        .expect("used ring address");
    q.set_ready(true);
    q
}

/// Guest memory and a 256-entry queue whose avail ring runs off the end of memory after slot
/// 125, with `next_avail` = 200 and `avail.idx` = 201: the index announces a chain whose ring
/// entry cannot be read.
pub fn queue_with_unreadable_avail_entry() -> (GuestMemoryMmap, Queue) {
    let mem = memory_of(&[(0, 0x2000), (0x1_0000, 0x1_0000)]);
    let mut q = raw_queue(256, 0, 0x1f00, 0x1_0000);
    q.set_next_avail(200);
    mem.write_obj(201u16.to_le(), GuestAddress(0x1f02))
        .expect("avail idx");
    (mem, q)
}

/// A [`HostQueue`] over a datagram socketpair, with fault injection.
#[derive(Debug)]
pub struct FakeHostQueue {
    dev: UnixDatagram,
    peer: UnixDatagram,
    send_faults: Mutex<VecDeque<i32>>,
    recv_faults: Mutex<VecDeque<i32>>,
    send_calls: AtomicUsize,
    recv_calls: AtomicUsize,
}

impl Default for FakeHostQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeHostQueue {
    /// A new pair, both ends nonblocking.
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
        }
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

    /// The next frame the datapath sent, if any.
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
}

impl std::os::fd::AsFd for FakeHostQueue {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
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

/// The fake takes every control call (it has no offloads, header size or queue steering).
impl crate::host::QueueControl for FakeHostQueue {
    fn set_offload(&self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
    fn set_vnet_hdr_len(&self, _len: usize) -> io::Result<()> {
        Ok(())
    }
    fn attach(&self) -> io::Result<()> {
        Ok(())
    }
    fn detach(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The driver side of one split virtqueue in mock guest memory.
///
/// Descriptor indices are handed out sequentially (wrapping), so a test must not keep more than
/// `size` descriptors outstanding. Every head published and every used entry read is logged, so
/// [`GuestQueue::assert_popped_returned_once`] can check the device returned each popped head
/// exactly once.
///
/// The rings are laid out here rather than with `virtio_queue::mock::MockSplitQueue`: in
/// virtio-queue 0.18 that mock places the used ring over the tail of the avail ring
/// (`SplitQueueRing::end` adds the element count, not the byte size), so used entries overwrite
/// avail slots and `used_event`.
#[derive(Debug)]
pub struct GuestQueue<'m> {
    mem: &'m GuestMemoryMmap,
    size: u16,
    desc_table: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_log: Vec<u16>,
    used_cursor: u16,
    used_log: Vec<(u16, u32)>,
    outstanding: HashMap<u16, usize>,
}

impl<'m> GuestQueue<'m> {
    /// A queue of `size` entries with its rings at guest address 0.
    pub fn new(mem: &'m GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, 0, size)
    }

    /// A queue of `size` entries (a power of two) with its rings from guest address `start`
    /// (16-byte aligned). The rings are zeroed.
    pub fn at(mem: &'m GuestMemoryMmap, start: u64, size: u16) -> Self {
        assert!(size.is_power_of_two() && start % 16 == 0);
        let n = u64::from(size);
        let desc_table = start;
        let avail = desc_table + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        let end = used + 6 + 8 * n;
        write_guest(mem, start, &vec![0u8; (end - start) as usize]);
        GuestQueue {
            mem,
            size,
            desc_table,
            avail,
            used,
            next_desc: 0,
            avail_log: Vec::new(),
            used_cursor: 0,
            used_log: Vec::new(),
            outstanding: HashMap::new(),
        }
    }

    /// The device-side `Queue`, ready, pointing at this queue's rings.
    pub fn create_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc_table))
            .expect("desc table address");
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .expect("avail ring address");
        q.try_set_used_ring_address(GuestAddress(self.used))
            .expect("used ring address");
        q.set_ready(true);
        assert!(q.is_valid(self.mem));
        q
    }

    /// Like [`GuestQueue::create_queue`], with `VIRTIO_RING_F_EVENT_IDX` on.
    pub fn create_queue_event_idx(&self) -> Queue {
        let mut q = self.create_queue();
        q.set_event_idx(true);
        q
    }

    /// Writes a chain of `(addr, len, flags)` descriptors (NEXT links added) and publishes its head.
    pub fn add_desc_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        assert!(!descs.is_empty());
        let first = self.alloc_descs(descs.len() as u16);
        let idx: Vec<u16> = (0..descs.len())
            .map(|i| first.wrapping_add(i as u16) % self.size)
            .collect();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = if i + 1 < descs.len() {
                (flags | NEXT, idx[i + 1])
            } else {
                (flags & !NEXT, 0)
            };
            self.write_desc(idx[i], addr, len, flags, next);
        }
        self.publish(idx[0]);
        idx[0]
    }

    /// Writes one raw descriptor at `index` (for loops, bad `next` values, indirect tables...).
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(index < self.size);
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.mem
            .write_obj(d, GuestAddress(self.desc_table + 16 * u64::from(index)))
            .expect("descriptor table");
    }

    /// Writes a descriptor table of `(addr, len, flags)` at guest address `table` (NEXT links
    /// added) for an indirect descriptor.
    pub fn write_indirect_table(&self, table: u64, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = if i + 1 < descs.len() {
                (flags | NEXT, i as u16 + 1)
            } else {
                (flags & !NEXT, 0)
            };
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.mem
                .write_obj(d, GuestAddress(table + 16 * i as u64))
                .expect("indirect table in guest memory");
        }
    }

    /// Reserves `n` consecutive descriptor indices (wrapping) for hand-written chains; returns
    /// the first.
    pub fn alloc_descs(&mut self, n: u16) -> u16 {
        let first = self.next_desc;
        self.next_desc = (self.next_desc + n) % self.size;
        first
    }

    /// Puts `head` in the next avail ring slot and bumps `avail.idx`.
    pub fn publish(&mut self, head: u16) {
        let idx = self.avail_idx();
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail slot");
        self.set_avail_idx(idx.wrapping_add(1));
        self.avail_log.push(head);
        *self.outstanding.entry(head).or_default() += 1;
    }

    /// The guest's `avail.idx`.
    pub fn avail_idx(&self) -> u16 {
        self.read_u16(self.avail + 2)
    }

    /// Overwrites `avail.idx` (to simulate a broken or malicious driver).
    pub fn set_avail_idx(&self, idx: u16) {
        self.write_u16(self.avail + 2, idx);
    }

    /// Sets `used_event` (EVENT_IDX: "interrupt me once used.idx passes this").
    pub fn set_used_event(&self, v: u16) {
        self.write_u16(self.avail + 4 + 2 * u64::from(self.size), v);
    }

    /// `avail_event` as written by the device (EVENT_IDX: "kick me once avail.idx passes this").
    pub fn avail_event(&self) -> u16 {
        self.read_u16(self.used + 4 + 8 * u64::from(self.size))
    }

    /// `used.flags` as written by the device (bit 0: `VRING_USED_F_NO_NOTIFY`).
    pub fn used_flags(&self) -> u16 {
        self.read_u16(self.used)
    }

    /// The device's `used.idx`.
    pub fn used_idx(&self) -> u16 {
        self.read_u16(self.used + 2)
    }

    /// Reads the used entries added since the last call, as `(head, len)`, and checks each
    /// returned head was outstanding (panics on a double return or an unknown head).
    pub fn collect_used(&mut self) -> Vec<(u16, u32)> {
        let end = self.used_idx();
        let mut out = Vec::new();
        while self.used_cursor != end {
            let slot = self.used + 4 + 8 * u64::from(self.used_cursor % self.size);
            let id: u32 = u32::from_le(self.mem.read_obj(GuestAddress(slot)).expect("used id"));
            let len: u32 =
                u32::from_le(self.mem.read_obj(GuestAddress(slot + 4)).expect("used len"));
            let head = u16::try_from(id).expect("used id fits u16");
            let n = self
                .outstanding
                .get_mut(&head)
                .filter(|n| **n > 0)
                .unwrap_or_else(|| panic!("head {head} returned but not outstanding"));
            *n -= 1;
            out.push((head, len));
            self.used_cursor = self.used_cursor.wrapping_add(1);
        }
        self.used_log.extend_from_slice(&out);
        out
    }

    /// Every head published so far, in avail order.
    pub fn avail_log(&self) -> &[u16] {
        &self.avail_log
    }

    /// Every used entry seen so far, in order.
    pub fn used_log(&self) -> &[(u16, u32)] {
        &self.used_log
    }

    /// Checks the shadow ledger: each head the device popped (avail entries before
    /// `queue.next_avail()`) was returned exactly once, and nothing else was returned.
    pub fn assert_popped_returned_once(&mut self, queue: &Queue) {
        self.collect_used();
        let pending = usize::from(self.avail_idx().wrapping_sub(queue.next_avail()));
        assert!(
            pending <= self.avail_log.len(),
            "next_avail {} is beyond avail.idx {}",
            queue.next_avail(),
            self.avail_idx()
        );
        let popped = &self.avail_log[..self.avail_log.len() - pending];
        let mut want: HashMap<u16, usize> = HashMap::new();
        for h in popped {
            *want.entry(*h).or_default() += 1;
        }
        let mut got: HashMap<u16, usize> = HashMap::new();
        for (h, _) in &self.used_log {
            *got.entry(*h).or_default() += 1;
        }
        assert_eq!(
            got, want,
            "used heads (left) differ from popped heads (right)"
        );
    }

    /// The memory this queue lives in.
    pub fn mem(&self) -> &'m GuestMemoryMmap {
        self.mem
    }

    fn read_u16(&self, addr: u64) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(addr)).expect("ring field"))
    }

    fn write_u16(&self, addr: u64, v: u16) {
        self.mem
            .write_obj(v.to_le(), GuestAddress(addr))
            .expect("ring field");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

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
    fn guest_queue_ledger_catches_double_returns() {
        use virtio_queue::QueueOwnedT;
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let h = gq.add_desc_chain(&[(DATA_BASE, 64, 0), (DATA_BASE + 64, 64, 0)]);
        let mut q = gq.create_queue();
        let c = q.iter(&mem).unwrap().next().unwrap();
        assert_eq!(c.head_index(), h);
        assert_eq!(c.count(), 2);
        q.add_used(&mem, h, 0).unwrap();
        gq.assert_popped_returned_once(&q);
        q.add_used(&mem, h, 0).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gq.collect_used()));
        assert!(r.is_err());
    }
}
