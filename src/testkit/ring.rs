//! The guest's side of one split virtqueue, the one driver every suite uses: datapath unit
//! tests, fuzz targets, benches, the vhost-user test frontend and the TOCTOU stress test.
//!
//! [`Layout`] places the three rings (descriptor table, avail ring, used ring) from a start
//! address, as a Linux guest does. [`SplitRing`] writes descriptors, chains and indirect
//! tables, publishes heads (`avail.idx` with release ordering, so a device on another thread
//! sees the slot first), reads the used ring (acquire) and the event-idx fields, and reposts
//! used buffers. Three modes:
//!
//! - **strict, with a ledger** ([`SplitRing::new`], [`SplitRing::at`]; [`GuestQueue`] in the
//!   unit tests): a write outside guest memory panics (a test bug), and every head published
//!   and returned is logged, so [`SplitRing::assert_popped_returned_once`] can check the device
//!   returned each popped head exactly once;
//! - **without the ledger** ([`SplitRing::without_ledger`]): publishing and [`SplitRing::recycle`]
//!   allocate nothing (benches, the allocation test, long stress runs);
//! - **lenient** ([`SplitRing::lenient`], fuzzing): the rings may lie partly outside guest
//!   memory; writes there are dropped and reads give `None`, as a broken guest would see it.
//!
//! The rings are laid out here rather than with `virtio_queue::mock::MockSplitQueue`: in
//! virtio-queue 0.18 that mock places the used ring over the tail of the avail ring
//! (`SplitQueueRing::end` adds the element count, not the byte size), so used entries overwrite
//! avail slots and `used_event`.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::memory::write_guest;

/// Descriptor flag: chained (set by the chain writers).
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// Descriptor flag: device-writable (an RX buffer).
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the descriptor points at an indirect table.
pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Where one split virtqueue's rings are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Queue size (entries).
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
}

/// A ring field the driver reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `avail.idx` (driver).
    AvailIdx,
    /// `used_event`, after the avail entries (driver, EVENT_IDX).
    UsedEvent,
    /// `used.flags` (device; bit 0 `VRING_USED_F_NO_NOTIFY`).
    UsedFlags,
    /// `used.idx` (device).
    UsedIdx,
    /// `avail_event`, after the used entries (device, EVENT_IDX).
    AvailEvent,
}

impl Layout {
    /// The rings of a `size`-entry queue packed from `start`: descriptor table, avail ring,
    /// used ring at the next 4-byte boundary.
    pub fn at(start: u64, size: u16) -> Layout {
        let n = u64::from(size);
        let avail = start + 16 * n;
        Layout {
            size,
            desc: start,
            avail,
            used: (avail + 6 + 2 * n + 3) & !3,
        }
    }

    /// End of the used ring (`avail_event` included): the first address after the rings.
    pub fn end(&self) -> u64 {
        self.used + 6 + 8 * u64::from(self.size)
    }

    /// The used ring: flags, idx, entries, `avail_event`.
    pub fn used_range(&self) -> (u64, u64) {
        (self.used, self.end())
    }

    /// The descriptor table and the avail ring (`used_event` included).
    pub fn driver_ranges(&self) -> [(u64, u64); 2] {
        let n = u64::from(self.size);
        [
            (self.desc, self.desc + 16 * n),
            (self.avail, self.avail + 6 + 2 * n),
        ]
    }

    /// Guest address of `field`.
    pub fn addr(&self, field: Field) -> u64 {
        let n = u64::from(self.size);
        match field {
            Field::AvailIdx => self.avail + 2,
            Field::UsedEvent => self.avail + 4 + 2 * n,
            Field::UsedFlags => self.used,
            Field::UsedIdx => self.used + 2,
            Field::AvailEvent => self.used + 4 + 8 * n,
        }
    }

    /// Guest address of avail slot `i` (mod size).
    fn avail_slot(&self, i: u16) -> u64 {
        self.avail + 4 + 2 * u64::from(i % self.size)
    }

    /// Guest address of used entry `i` (mod size).
    fn used_slot(&self, i: u16) -> u64 {
        self.used + 4 + 8 * u64::from(i % self.size)
    }

    /// A ready device-side `Queue` over these rings, not validated (rings may be unmapped).
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .expect("desc table address");
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .expect("avail ring address");
        q.try_set_used_ring_address(GuestAddress(self.used))
            .expect("used ring address");
        q.set_ready(true);
        q
    }
}

/// What was published and returned, to check the device returned each popped head once.
#[derive(Debug, Default)]
struct Ledger {
    avail_log: Vec<u16>,
    used_log: Vec<(u16, u32)>,
    outstanding: HashMap<u16, usize>,
}

/// The driver side of one split virtqueue in guest memory `M` (`&GuestMemoryMmap` or an owned
/// clone, which shares the regions). See the module doc for the three modes.
///
/// Descriptor indices are handed out sequentially (wrapping), so a test must not keep more than
/// `size` descriptors outstanding.
#[derive(Debug)]
pub struct SplitRing<M> {
    mem: M,
    /// Where the rings are.
    pub layout: Layout,
    strict: bool,
    next_desc: u16,
    handed_out: usize,
    used_cursor: u16,
    ledger: Option<Ledger>,
}

/// The unit tests' name for a strict, ledger-keeping ring over borrowed memory.
pub type GuestQueue<'m> = SplitRing<&'m GuestMemoryMmap>;

impl<M: Borrow<GuestMemoryMmap>> SplitRing<M> {
    /// A queue of `size` entries with its rings at guest address 0 (strict, with a ledger).
    pub fn new(mem: M, size: u16) -> Self {
        Self::at(mem, 0, size)
    }

    /// A queue of `size` entries (a power of two) with its rings from guest address `start`
    /// (16-byte aligned), zeroed (strict, with a ledger).
    pub fn at(mem: M, start: u64, size: u16) -> Self {
        assert!(size.is_power_of_two() && start % 16 == 0);
        Self::build(mem, Layout::at(start, size), true)
    }

    /// A driver over rings that may lie partly outside guest memory (fuzzing): the mapped
    /// parts are zeroed, writes elsewhere are dropped, reads give `None`. No ledger.
    pub fn lenient(mem: M, layout: Layout) -> Self {
        Self::build(mem, layout, false).without_ledger()
    }

    fn build(mem: M, layout: Layout, strict: bool) -> Self {
        let r = SplitRing {
            mem,
            layout,
            strict,
            next_desc: 0,
            handed_out: 0,
            used_cursor: 0,
            ledger: Some(Ledger::default()),
        };
        r.zero(layout.desc, layout.end());
        r
    }

    /// Zeroes the mapped part of `[start, end)`; strict rings must be wholly mapped.
    fn zero(&self, start: u64, end: u64) {
        let mut zeroed = 0;
        for region in self.mem().iter() {
            let s = region.start_addr().0;
            let (a, b) = (start.max(s), end.min(s + region.len()));
            if a < b {
                write_guest(self.mem(), a, &vec![0u8; (b - a) as usize]);
                zeroed += b - a;
            }
        }
        assert!(
            !self.strict || zeroed == end - start,
            "rings [{start:#x}, {end:#x}) outside guest memory"
        );
    }

    /// Drops the ledger: from here on nothing allocates per publish or recycle, and returned
    /// heads are not checked.
    pub fn without_ledger(mut self) -> Self {
        self.ledger = None;
        self
    }

    /// The memory the rings live in.
    pub fn mem(&self) -> &GuestMemoryMmap {
        self.mem.borrow()
    }

    fn write<T: ByteValued>(&self, v: T, addr: u64) {
        if let Err(e) = self.mem().write_obj(v, GuestAddress(addr)) {
            assert!(!self.strict, "ring write at {addr:#x}: {e}");
        }
    }

    /// The device-side `Queue`, ready, pointing at these rings (checked to be valid).
    pub fn create_queue(&self) -> Queue {
        let q = self.layout.queue();
        assert!(q.is_valid(self.mem()));
        q
    }

    /// Like [`SplitRing::create_queue`], with `VIRTIO_RING_F_EVENT_IDX` on.
    pub fn create_queue_event_idx(&self) -> Queue {
        let mut q = self.create_queue();
        q.set_event_idx(true);
        q
    }

    /// Writes descriptor `index` (mod size), for loops, bad `next` values, indirect heads...
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.layout.desc + 16 * u64::from(index % self.layout.size);
        self.write(raw_desc(addr, len, flags, next), at);
    }

    /// Descriptor `index` as `(addr, len, flags, next)`, if mapped.
    pub fn read_desc(&self, index: u16) -> Option<(u64, u32, u16, u16)> {
        read_raw_desc(self.mem(), self.layout.desc + 16 * u64::from(index))
    }

    /// Writes a descriptor table of `(addr, len, flags)` at guest address `table` (NEXT links
    /// added) for an indirect descriptor.
    pub fn write_indirect_table(&self, table: u64, descs: &[(u64, u32, u16)]) {
        for (i, d) in linked(descs, |k| k as u16).enumerate() {
            self.write(d, table.wrapping_add(16 * i as u64));
        }
    }

    /// Reserves `n` consecutive descriptor indices (wrapping) for hand-written chains; returns
    /// the first.
    pub fn alloc_descs(&mut self, n: u16) -> u16 {
        let first = self.next_desc;
        self.next_desc = self.next_desc.wrapping_add(n) % self.layout.size;
        self.handed_out += usize::from(n);
        first
    }

    /// Descriptor slots never handed out yet (for filling a ring once, without wrapping).
    pub fn free_descs(&self) -> usize {
        usize::from(self.layout.size).saturating_sub(self.handed_out)
    }

    /// Writes a chain of `(addr, len, flags)` descriptors into the next slots (NEXT links
    /// added) without publishing it; returns its head. An empty chain takes one slot.
    pub fn write_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let first = self.alloc_descs(descs.len().max(1) as u16);
        let size = self.layout.size;
        let slot = |i: usize| first.wrapping_add(i as u16) % size;
        for (i, d) in linked(descs, slot).enumerate() {
            self.write(d, self.layout.desc + 16 * u64::from(slot(i)));
        }
        first
    }

    /// Writes a chain (see [`SplitRing::write_chain`]) and publishes its head.
    pub fn add_desc_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.write_chain(descs);
        self.publish(head);
        head
    }

    /// Puts `head` in the next avail slot and bumps `avail.idx`.
    pub fn publish(&mut self, head: u16) {
        let idx = self.get(Field::AvailIdx).unwrap_or(0);
        self.write(head.to_le(), self.layout.avail_slot(idx));
        self.set(Field::AvailIdx, idx.wrapping_add(1));
        if let Some(l) = &mut self.ledger {
            l.avail_log.push(head);
            *l.outstanding.entry(head).or_default() += 1;
        }
    }

    /// Reads a ring field (`None` when it is not mapped).
    pub fn get(&self, field: Field) -> Option<u16> {
        let at = GuestAddress(self.layout.addr(field));
        self.mem()
            .load::<u16>(at, Ordering::Acquire)
            .ok()
            .map(u16::from_le)
    }

    /// Writes a ring field (release ordering: what was written before is seen first).
    pub fn set(&self, field: Field, v: u16) {
        let at = self.layout.addr(field);
        if let Err(e) = self
            .mem()
            .store(v.to_le(), GuestAddress(at), Ordering::Release)
        {
            assert!(!self.strict, "ring write at {at:#x}: {e}");
        }
    }

    /// The guest's `avail.idx`.
    pub fn avail_idx(&self) -> u16 {
        self.get(Field::AvailIdx).expect("avail.idx mapped")
    }

    /// Overwrites `avail.idx` (to simulate a broken or malicious driver).
    pub fn set_avail_idx(&self, idx: u16) {
        self.set(Field::AvailIdx, idx);
    }

    /// Sets `used_event` (EVENT_IDX: "interrupt me once used.idx passes this").
    pub fn set_used_event(&self, v: u16) {
        self.set(Field::UsedEvent, v);
    }

    /// `avail_event` as written by the device (EVENT_IDX: "kick me once avail.idx passes this").
    pub fn avail_event(&self) -> u16 {
        self.get(Field::AvailEvent).expect("avail_event mapped")
    }

    /// `used.flags` as written by the device (bit 0: `VRING_USED_F_NO_NOTIFY`).
    pub fn used_flags(&self) -> u16 {
        self.get(Field::UsedFlags).expect("used.flags mapped")
    }

    /// The device's `used.idx`.
    pub fn used_idx(&self) -> u16 {
        self.get(Field::UsedIdx).expect("used.idx mapped")
    }

    /// Used entry number `i` (mod size) as `(id, len)`, if mapped.
    pub fn used_elem(&self, i: u16) -> Option<(u32, u32)> {
        let slot = self.layout.used_slot(i);
        let id: u32 = self.mem().read_obj(GuestAddress(slot)).ok()?;
        let len: u32 = self.mem().read_obj(GuestAddress(slot + 4)).ok()?;
        Some((u32::from_le(id), u32::from_le(len)))
    }

    /// Logs a returned entry; panics on a head that was not outstanding (a double return or
    /// an unknown head).
    fn note_used(&mut self, id: u32, len: u32) {
        let Some(l) = &mut self.ledger else {
            return;
        };
        let head = u16::try_from(id).expect("used id fits u16");
        let n = l
            .outstanding
            .get_mut(&head)
            .filter(|n| **n > 0)
            .unwrap_or_else(|| panic!("head {head} returned but not outstanding"));
        *n -= 1;
        l.used_log.push((head, len));
    }

    /// The used entries added since the last call, as raw `(id, len)` (ids unchecked unless
    /// the ledger is on).
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let end = self.used_idx();
        let mut out = Vec::new();
        while self.used_cursor != end {
            let (id, len) = self.used_elem(self.used_cursor).expect("used entry mapped");
            self.note_used(id, len);
            out.push((id, len));
            self.used_cursor = self.used_cursor.wrapping_add(1);
        }
        out
    }

    /// [`SplitRing::take_used`] as `(head, len)`, each head checked against the ledger.
    pub fn collect_used(&mut self) -> Vec<(u16, u32)> {
        self.take_used()
            .into_iter()
            .map(|(id, len)| (u16::try_from(id).expect("used id fits u16"), len))
            .collect()
    }

    /// Reposts every chain the device used since the last call (in used order), as a guest in
    /// steady state does, with one `avail.idx` update. Returns how many, and the bytes the device
    /// reported for them. Allocates nothing without the ledger.
    pub fn recycle(&mut self) -> (usize, u64) {
        let end = self.used_idx();
        let mut idx = self.avail_idx();
        let (mut n, mut bytes) = (0, 0u64);
        while self.used_cursor != end {
            let (id, len) = self.used_elem(self.used_cursor).expect("used entry mapped");
            self.note_used(id, len);
            self.used_cursor = self.used_cursor.wrapping_add(1);
            let head = id as u16;
            self.write(head.to_le(), self.layout.avail_slot(idx));
            if let Some(l) = &mut self.ledger {
                l.avail_log.push(head);
                *l.outstanding.entry(head).or_default() += 1;
            }
            idx = idx.wrapping_add(1);
            n += 1;
            bytes += u64::from(len);
        }
        if n > 0 {
            self.set(Field::AvailIdx, idx);
        }
        (n, bytes)
    }

    /// Every head published so far, in avail order (empty without the ledger).
    pub fn avail_log(&self) -> &[u16] {
        self.ledger.as_ref().map_or(&[], |l| &l.avail_log)
    }

    /// Every used entry seen so far, in order (empty without the ledger).
    pub fn used_log(&self) -> &[(u16, u32)] {
        self.ledger.as_ref().map_or(&[], |l| &l.used_log)
    }

    /// Checks the ledger: each head the device popped (avail entries before
    /// `queue.next_avail()`) was returned exactly once, and nothing else was returned.
    pub fn assert_popped_returned_once(&mut self, queue: &Queue) {
        assert!(self.ledger.is_some(), "this ring keeps no ledger");
        self.take_used();
        let log = self.avail_log();
        let pending = usize::from(self.avail_idx().wrapping_sub(queue.next_avail()));
        assert!(
            pending <= log.len(),
            "next_avail {} is beyond avail.idx {}",
            queue.next_avail(),
            self.avail_idx()
        );
        let count = |heads: &mut dyn Iterator<Item = u16>| {
            let mut m: HashMap<u16, usize> = HashMap::new();
            heads.for_each(|h| *m.entry(h).or_default() += 1);
            m
        };
        let want = count(&mut log[..log.len() - pending].iter().copied());
        let got = count(&mut self.used_log().iter().map(|u| u.0));
        assert_eq!(
            got, want,
            "used heads (left) differ from popped heads (right)"
        );
    }
}

/// One raw descriptor, as the guest writes it.
pub fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// `descs` as raw descriptors linked with NEXT to the slot `next_of(i + 1)`; the last one's
/// NEXT is cleared.
fn linked<'a>(
    descs: &'a [(u64, u32, u16)],
    next_of: impl Fn(usize) -> u16 + 'a,
) -> impl Iterator<Item = RawDescriptor> + 'a {
    descs
        .iter()
        .enumerate()
        .map(move |(i, &(addr, len, flags))| {
            if i + 1 < descs.len() {
                raw_desc(addr, len, flags | NEXT, next_of(i + 1))
            } else {
                raw_desc(addr, len, flags & !NEXT, 0)
            }
        })
}

/// Reads one raw descriptor at `at` as `(addr, len, flags, next)`.
pub fn read_raw_desc(mem: &GuestMemoryMmap, at: u64) -> Option<(u64, u32, u16, u16)> {
    let d: RawDescriptor = mem.read_obj(GuestAddress(at)).ok()?;
    let d = SplitDescriptor::from(d);
    Some((d.addr().0, d.len(), d.flags(), d.next()))
}

/// Guest-side buffer layouts for steady-state traffic (benches, the allocation test).
pub mod fill {
    use super::*;

    /// A TX frame of `frame_len` Ethernet bytes behind an `hdr_len` header, as Linux posts it:
    /// header and linear data in one descriptor for small frames; for GSO frames a header
    /// descriptor followed by 4 KiB page fragments.
    pub fn tx_chain(addr: u64, hdr_len: usize, frame_len: usize) -> Vec<(u64, u32, u16)> {
        if frame_len <= 4096 {
            return vec![(addr, (hdr_len + frame_len) as u32, 0)];
        }
        let mut v = vec![(addr, hdr_len as u32, 0)];
        let mut left = frame_len;
        let mut at = addr + 4096;
        while left > 0 {
            let n = left.min(4096);
            v.push((at, n as u32, 0));
            at += 4096;
            left -= n;
        }
        v
    }

    /// Guest bytes a [`tx_chain`] of `frame_len` occupies from its address.
    pub fn tx_footprint(frame_len: usize) -> u64 {
        if frame_len <= 4096 {
            4096
        } else {
            4096 + (frame_len as u64).div_ceil(4096) * 4096
        }
    }

    /// Fills `ring` with as many TX chains as fit (at most `max`), from guest address `data`,
    /// each holding `frame` (an `hdr_len` header included), and publishes them.
    pub fn fill_tx<M: Borrow<GuestMemoryMmap>>(
        ring: &mut SplitRing<M>,
        data: u64,
        hdr_len: usize,
        frame: &[u8],
        max: usize,
    ) -> usize {
        let frame_len = frame.len() - hdr_len;
        let per = tx_chain(0, hdr_len, frame_len).len();
        let mut n = 0;
        let mut addr = data;
        while n < max && ring.free_descs() >= per {
            let descs = tx_chain(addr, hdr_len, frame_len);
            let mut off = 0;
            for &(a, l, _) in &descs {
                ring.mem()
                    .write_slice(&frame[off..off + l as usize], GuestAddress(a))
                    .expect("TX buffer in guest memory");
                off += l as usize;
            }
            ring.add_desc_chain(&descs);
            addr += tx_footprint(frame_len);
            n += 1;
        }
        n
    }

    /// Fills `ring` with RX chains (at most `max`), each `descs_per_chain` device-writable
    /// descriptors of `buf_len` bytes, from guest address `data`, and publishes them.
    pub fn fill_rx<M: Borrow<GuestMemoryMmap>>(
        ring: &mut SplitRing<M>,
        data: u64,
        buf_len: u32,
        descs_per_chain: usize,
        max: usize,
    ) -> usize {
        let stride = u64::from(buf_len).next_multiple_of(64);
        let mut n = 0;
        let mut addr = data;
        while n < max && ring.free_descs() >= descs_per_chain {
            let descs: Vec<_> = (0..descs_per_chain as u64)
                .map(|i| (addr + i * stride, buf_len, WRITE))
                .collect();
            addr += stride * descs_per_chain as u64;
            ring.add_desc_chain(&descs);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::memory::*;
    use virtio_queue::QueueOwnedT;

    #[test]
    fn guest_queue_ledger_catches_double_returns() {
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

    #[test]
    fn recycle_reposts_used_heads_in_used_order() {
        let mem = test_memory();
        let mut ring = SplitRing::at(&mem, 0x8000, 8).without_ledger();
        let heads: Vec<u16> = (0..3)
            .map(|i| ring.add_desc_chain(&[(DATA_BASE + 64 * i, 64, WRITE)]))
            .collect();
        let mut q = ring.create_queue();
        let popped: Vec<u16> = q.iter(&mem).unwrap().map(|c| c.head_index()).collect();
        assert_eq!(popped, heads);
        q.add_used(&mem, heads[2], 10).unwrap();
        q.add_used(&mem, heads[0], 20).unwrap();
        assert_eq!(ring.recycle(), (2, 30));
        assert_eq!(ring.avail_idx(), 5);
        let again: Vec<u16> = q.iter(&mem).unwrap().map(|c| c.head_index()).collect();
        assert_eq!(again, [heads[2], heads[0]]);
        assert_eq!(ring.recycle(), (0, 0), "nothing new used");
    }

    #[test]
    fn lenient_ring_drops_writes_outside_memory() {
        let mem = memory_of(&[(0, 0x900)]);
        // 128 entries from 0: the avail ring's tail and the whole used ring are unmapped.
        let mut ring = SplitRing::lenient(&mem, Layout::at(0, 128));
        ring.publish(3);
        assert_eq!(ring.get(Field::AvailIdx), Some(1));
        assert_eq!(ring.get(Field::UsedIdx), None);
        ring.set(Field::AvailEvent, 7);
        assert_eq!(ring.used_elem(0), None);
    }
}
