//! A minimal split-virtqueue *driver* (the guest's side) for benches and the allocation test.
//!
//! Unlike `datapath::testutil::GuestQueue` it keeps no ledger, so republishing buffers in a loop
//! allocates nothing and costs a few guest-memory writes: chains are written once with fixed head
//! indices, and [`Ring::recycle`] hands every used chain straight back to the avail ring, which is
//! what a guest in steady state does (TX: the frame was sent, post the next one in the same
//! buffer; RX: the frame was consumed, repost the buffer).
#![allow(dead_code)]

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Descriptor flag: chained.
pub const NEXT: u16 = 1;
/// Descriptor flag: device-writable (RX buffer).
pub const WRITE: u16 = 2;

/// The driver side of one split virtqueue whose rings live at `base` in guest memory.
#[derive(Debug)]
pub struct Ring {
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_cursor: u16,
}

impl Ring {
    /// Rings for `size` entries (a power of two) from `base` (16-byte aligned), zeroed.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Ring {
        assert!(size.is_power_of_two() && base % 16 == 0);
        let n = u64::from(size);
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        let end = used + 6 + 8 * n;
        mem.write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base))
            .expect("rings in guest memory");
        Ring {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_cursor: 0,
        }
    }

    /// First guest address after the rings.
    pub fn end(&self) -> u64 {
        self.used + 6 + 8 * u64::from(self.size)
    }

    /// The device-side queue over these rings.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .expect("desc table");
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .expect("avail ring");
        q.try_set_used_ring_address(GuestAddress(self.used))
            .expect("used ring");
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    /// Free descriptor slots left for [`Ring::add_chain`].
    pub fn free_descs(&self) -> usize {
        usize::from(self.size - self.next_desc)
    }

    /// Writes a chain of `(addr, len, flags)` descriptors (NEXT links added); returns its head.
    /// Does not publish it.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u16 {
        assert!(!descs.is_empty() && descs.len() <= self.free_descs());
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = head + i as u16;
            let (flags, next) = if i + 1 < descs.len() {
                (flags | NEXT, idx + 1)
            } else {
                (flags & !NEXT, 0)
            };
            let at = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
            mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
            mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
        }
        self.next_desc += descs.len() as u16;
        head
    }

    /// Puts `head` in the next avail slot and publishes the new `avail.idx`.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        self.put(mem, head);
        self.flush(mem);
    }

    /// Host pointer to `len` bytes of guest memory at `addr` (all within one region).
    fn host(mem: &GuestMemoryMmap, addr: u64, len: usize) -> *mut u8 {
        mem.get_slice(GuestAddress(addr), len)
            .expect("ring inside one region")
            .ptr_guard_mut()
            .as_ptr()
    }

    fn put(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        let p = Self::host(mem, slot, 2).cast::<u16>();
        // SAFETY: `p` points at 2 mapped, aligned bytes of guest memory (an avail slot); only
        // this thread drives the ring.
        unsafe { p.write_volatile(head.to_le()) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    fn flush(&self, mem: &GuestMemoryMmap) {
        let p = Self::host(mem, self.avail + 2, 2).cast::<u16>();
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: `p` is `avail.idx`, 2 mapped and aligned bytes of guest memory.
        unsafe { p.write_volatile(self.avail_idx.to_le()) };
    }

    /// The device's `used.idx`.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        let p = Self::host(mem, self.used + 2, 2).cast::<u16>();
        // SAFETY: `p` is `used.idx`, 2 mapped and aligned bytes of guest memory.
        let v = u16::from_le(unsafe { p.read_volatile() });
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        v
    }

    /// Reposts every chain the device used since the last call (in used order). Returns how
    /// many, and the bytes the device reported for them.
    pub fn recycle(&mut self, mem: &GuestMemoryMmap) -> (usize, u64) {
        let end = self.used_idx(mem);
        let mut n = 0;
        let mut bytes = 0u64;
        while self.used_cursor != end {
            let slot = self.used + 4 + 8 * u64::from(self.used_cursor % self.size);
            let p = Self::host(mem, slot, 8).cast::<u32>();
            // SAFETY: `p` points at one 8-byte, 4-aligned used element in mapped guest memory.
            let (id, len) = unsafe { (p.read_volatile(), p.add(1).read_volatile()) };
            let (id, len) = (u32::from_le(id), u32::from_le(len));
            self.put(mem, id as u16);
            self.used_cursor = self.used_cursor.wrapping_add(1);
            n += 1;
            bytes += u64::from(len);
        }
        if n > 0 {
            self.flush(mem);
        }
        (n, bytes)
    }
}

/// Guest-side buffer layouts used by the benches and the allocation test.
pub mod layout {
    use super::*;

    /// A TX frame of `frame_len` Ethernet bytes behind a 12-byte header, as Linux posts it:
    /// header and linear data in one descriptor for small frames; for GSO frames a header
    /// descriptor followed by 4 KiB page fragments. Returns the descriptors.
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

    /// Fills `ring` with as many TX chains of `frame_len` bytes as fit (at most `max`), from
    /// guest address `data`, each holding `frame` (header included), and publishes them.
    pub fn fill_tx(
        mem: &GuestMemoryMmap,
        ring: &mut Ring,
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
                mem.write_slice(&frame[off..off + l as usize], GuestAddress(a))
                    .unwrap();
                off += l as usize;
            }
            let head = ring.add_chain(mem, &descs);
            ring.publish(mem, head);
            addr += tx_footprint(frame_len);
            n += 1;
        }
        n
    }

    /// Fills `ring` with RX chains (at most `max`), each `descs_per_chain` device-writable
    /// descriptors of `buf_len` bytes, from guest address `data`, and publishes them.
    pub fn fill_rx(
        mem: &GuestMemoryMmap,
        ring: &mut Ring,
        data: u64,
        buf_len: u32,
        descs_per_chain: usize,
        max: usize,
    ) -> usize {
        let stride = u64::from(buf_len).next_multiple_of(64);
        let mut n = 0;
        let mut addr = data;
        let mut descs = Vec::with_capacity(descs_per_chain);
        while n < max && ring.free_descs() >= descs_per_chain {
            descs.clear();
            for _ in 0..descs_per_chain {
                descs.push((addr, buf_len, WRITE));
                addr += stride;
            }
            let head = ring.add_chain(mem, &descs);
            ring.publish(mem, head);
            n += 1;
        }
        n
    }
}
