//! The driver's side of a split virtqueue — avail ring and descriptor tables — read straight
//! from guest memory.
//!
//! virtio-queue's `AvailIter` and `DescriptorChain` translate a guest address (region lookup,
//! bounds checks, `Result` plumbing) for every avail entry and every descriptor they read; the
//! profile of a saturated TX worker put that walk at ≈ 6 % of its CPU (BENCHMARKS.md, "Where
//! the time goes"). Here the avail ring and the descriptor table are each found once per call
//! (one slice each when they lie in one memory region, the usual case), and every entry is read
//! from that slice. Tables that straddle regions, and memory behind an IOMMU, are read entry by
//! entry through `GuestMemory` as before.
//!
//! The rules are virtio-queue's, so every bad-chain test of [`super::tx`] and [`super::rx`]
//! holds unchanged (and `ring_reader_matches_virtio_queue_on_random_rings` checks it against
//! virtio-queue directly):
//! - the avail index is read once per pop (acquire); more than the queue size ahead of
//!   `next_avail` means a broken ring;
//! - a chain is walked for at most as many descriptors as its table has (a loop ends it there);
//!   a `next` outside the table ends it; an indirect descriptor switches to its table, whose
//!   length must be a non-zero multiple of 16 and at most 65535 entries, and which may not hold
//!   another indirect descriptor (else the chain ends); a total length past `u32::MAX` ends it;
//! - a chain that ends early ends quietly: its last descriptor still says NEXT, which the callers
//!   check (`last_has_next`).
//!
//! Each descriptor is read once (one 16-byte volatile load) into a local copy that the callers
//! use; nothing re-reads it. The slices borrow the caller's memory snapshot for one call only,
//! so no host pointer into guest memory outlives a memory-table update.

use std::num::Wrapping;
use std::sync::atomic::{AtomicU16, Ordering};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::BS;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    VolatileMemory, VolatileSlice,
};

/// Bytes per descriptor.
const DESC_SIZE: usize = 16;
/// `flags` and `idx` before the avail ring's entries.
const AVAIL_HEADER: usize = 4;
/// Bytes per avail ring entry.
const AVAIL_ENTRY: usize = 2;

/// The bitmap slice type of a one-region slice of `M`'s memory.
type RegionBitmap<'m, M> =
    BS<'m, <<<M as GuestMemory>::PhysicalMemory as GuestMemoryBackend>::R as GuestMemoryRegion>::B>;
/// A one-region slice of `M`'s memory.
type Slice<'m, M> = VolatileSlice<'m, RegionBitmap<'m, M>>;

/// `len` bytes of guest memory at `base`: one slice when they lie in one region, else read or
/// written piece by piece through `GuestMemory` (which also reports what is not guest memory).
pub(super) struct Area<'m, M: GuestMemory> {
    mem: &'m M,
    base: GuestAddress,
    slice: Option<Slice<'m, M>>,
}

impl<'m, M: GuestMemory> Area<'m, M> {
    pub(super) fn new(mem: &'m M, base: GuestAddress, len: usize) -> Self {
        let slice = mem
            .physical_memory()
            .and_then(|p| super::one_region_slice(p, base, len));
        Area { mem, base, slice }
    }

    /// The descriptor at byte `off`, read once.
    fn desc(&self, off: usize) -> Option<Descriptor> {
        match &self.slice {
            Some(s) => s.get_ref::<Descriptor>(off).ok().map(|r| r.load()),
            None => self.mem.read_obj(self.base.checked_add(off as u64)?).ok(),
        }
    }

    /// Writes `bytes` at byte `off` (the dirty bitmap of the region is marked as by
    /// `GuestMemory::write_slice`); `None` when they are not all guest memory.
    pub(super) fn write(&self, off: usize, bytes: &[u8]) -> Option<()> {
        match &self.slice {
            Some(s) => s.write_slice(bytes, off).ok(),
            None => self
                .mem
                .write_slice(bytes, self.base.checked_add(off as u64)?)
                .ok(),
        }
    }

    /// The little-endian `u16` at byte `off`, read once (plain: avail entries, which the avail
    /// index's acquire load already ordered).
    fn u16_at(&self, off: usize) -> Option<u16> {
        let v = match &self.slice {
            Some(s) => s.get_ref::<u16>(off).ok().map(|r| r.load()),
            None => self
                .mem
                .load::<u16>(self.base.checked_add(off as u64)?, Ordering::Acquire)
                .ok(),
        };
        v.map(u16::from_le)
    }

    /// The little-endian `u16` at byte `off`, with an acquire load (the avail index: the entries
    /// and descriptors read after it are the ones the guest published before it).
    fn u16_acquire(&self, off: usize) -> Option<u16> {
        let v = match &self.slice {
            Some(s) => s
                .get_atomic_ref::<AtomicU16>(off)
                .ok()
                .map(|a| a.load(Ordering::Acquire)),
            None => self
                .mem
                .load::<u16>(self.base.checked_add(off as u64)?, Ordering::Acquire)
                .ok(),
        };
        v.map(u16::from_le)
    }
}

/// One pop from the avail ring: an empty ring, a queue not (or no longer) ready and a broken
/// ring are three different answers.
pub(super) enum Pop<C> {
    Chain(C),
    Empty,
    NotReady,
    Broken,
}

/// Gives the last `n` popped chains back to the avail ring: the next pop returns them again, in
/// the same order. `n` is at most the queue size.
pub(super) fn rewind_avail(queue: &mut Queue, n: usize) {
    // Ring indices count modulo 2^16, so subtracting n's low 16 bits is subtracting n.
    #[allow(clippy::cast_possible_truncation)]
    let n = n as u16;
    queue.set_next_avail(queue.next_avail().wrapping_sub(n));
}

/// One queue's avail ring and descriptor table for one `process_tx`/`process_rx` call.
pub(super) struct Ring<'m, M: GuestMemory> {
    mem: &'m M,
    ready: bool,
    size: u16,
    avail: Area<'m, M>,
    table: GuestAddress,
    descs: Option<Slice<'m, M>>,
}

impl<'m, M: GuestMemory> Ring<'m, M> {
    /// The queue's rings as its addresses say now (they cannot change during a call: the caller
    /// holds the queue).
    pub(super) fn new(queue: &Queue, mem: &'m M) -> Self {
        let size = queue.size();
        let avail_ring = queue.avail_ring();
        let table = GuestAddress(queue.desc_table());
        let n = usize::from(size);
        let descs = Area::new(mem, table, n * DESC_SIZE).slice;
        Ring {
            mem,
            ready: queue.ready() && avail_ring != 0,
            size,
            avail: Area::new(
                mem,
                GuestAddress(avail_ring),
                AVAIL_HEADER + n * AVAIL_ENTRY,
            ),
            table,
            descs,
        }
    }

    /// Pops up to `want` heads (at least one, at most `heads.len()`) into `heads[..n]` with one
    /// read of the avail index, advancing the queue's `next_avail` by `n`: `Chain(n)` with
    /// `n > 0`, or why none came. An entry the index announces but that cannot be read ends the
    /// batch there (as virtio-queue's iterator does; the callers' recheck then calls it broken).
    pub(super) fn pop_batch(
        &self,
        queue: &mut Queue,
        heads: &mut [u16],
        want: usize,
    ) -> Pop<usize> {
        if !self.ready {
            return Pop::NotReady;
        }
        let Some(idx) = self.avail.u16_acquire(2) else {
            return Pop::Broken;
        };
        let next = Wrapping(queue.next_avail());
        let pending = (Wrapping(idx) - next).0;
        if pending > self.size {
            return Pop::Broken;
        }
        let want = want.max(1).min(heads.len()).min(usize::from(pending));
        let mut n = 0;
        while n < want {
            // `size` is not 0 here: `pending` is at least 1 and at most `size`.
            #[allow(clippy::cast_possible_truncation)] // n < heads.len() <= one batch
            let slot = (next + Wrapping(n as u16)).0 % self.size;
            match self
                .avail
                .u16_at(AVAIL_HEADER + usize::from(slot) * AVAIL_ENTRY)
            {
                Some(head) => heads[n] = head,
                None => break,
            }
            n += 1;
        }
        #[allow(clippy::cast_possible_truncation)] // n <= pending <= size
        queue.set_next_avail((next + Wrapping(n as u16)).0);
        if n == 0 {
            Pop::Empty
        } else {
            Pop::Chain(n)
        }
    }

    /// The descriptors of the chain starting at `head`.
    pub(super) fn chain(&self, head: u16) -> Chain<'m, M> {
        Chain {
            table: Area {
                mem: self.mem,
                base: self.table,
                slice: self.descs.clone(),
            },
            entries: self.size,
            next: head,
            ttl: self.size,
            yielded: 0,
            indirect: false,
        }
    }
}

/// A chain's descriptors, each read once, in chain order (the rules are in the module doc).
pub(super) struct Chain<'m, M: GuestMemory> {
    table: Area<'m, M>,
    entries: u16,
    next: u16,
    ttl: u16,
    yielded: u32,
    indirect: bool,
}

impl<M: GuestMemory> Chain<'_, M> {
    /// Ends the chain: every later `next` returns `None`.
    fn end(&mut self) -> Option<Descriptor> {
        self.ttl = 0;
        None
    }

    /// Moves to the indirect table `desc` points at; `None` when that table is not acceptable.
    fn enter_indirect(&mut self, desc: &Descriptor) -> Option<()> {
        let len = desc.len() as usize;
        if self.indirect || len % DESC_SIZE != 0 {
            return None;
        }
        let entries = u16::try_from(len / DESC_SIZE).ok()?;
        self.table = Area::new(self.table.mem, desc.addr(), len);
        self.entries = entries;
        self.next = 0;
        self.ttl = entries;
        self.indirect = true;
        Some(())
    }
}

impl<M: GuestMemory> Iterator for Chain<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.entries {
                return self.end();
            }
            let Some(desc) = self.table.desc(usize::from(self.next) * DESC_SIZE) else {
                return self.end();
            };
            if desc.refers_to_indirect_table() {
                if self.enter_indirect(&desc).is_none() {
                    return self.end();
                }
                continue;
            }
            let Some(total) = self.yielded.checked_add(desc.len()) else {
                return self.end();
            };
            self.yielded = total;
            if desc.has_next() {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::fuzz::hostile::Rng;
    use crate::testkit::ring::{raw_desc, Layout};
    use crate::testkit::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use virtio_queue::QueueOwnedT;
    use vm_memory::{Bytes, GuestMemoryMmap};

    /// What virtio-queue's own iterator yields for every pending chain (heads, then descriptors
    /// as `(addr, len, flags, next)`) of a fresh queue over `layout`.
    fn reference(layout: &Layout, mem: &GuestMemoryMmap) -> Option<Vec<(u16, Vec<[u64; 4]>)>> {
        let mut q = layout.queue();
        let it = q.iter(mem).ok()?;
        Some(
            it.map(|c| {
                let head = c.head_index();
                (head, c.map(|d| fields(&d)).collect())
            })
            .collect(),
        )
    }

    fn fields(d: &Descriptor) -> [u64; 4] {
        [
            d.addr().0,
            u64::from(d.len()),
            u64::from(d.flags()),
            u64::from(d.next()),
        ]
    }

    fn ours(layout: &Layout, mem: &GuestMemoryMmap) -> Option<Vec<(u16, Vec<[u64; 4]>)>> {
        let mut q = layout.queue();
        let ring = Ring::new(&q, mem);
        let mut out = Vec::new();
        let mut heads = [0u16; 64];
        loop {
            match ring.pop_batch(&mut q, &mut heads, 64) {
                Pop::Chain(n) => {
                    for &h in &heads[..n] {
                        out.push((h, ring.chain(h).map(|d| fields(&d)).collect()));
                    }
                }
                Pop::Empty => return Some(out),
                Pop::NotReady | Pop::Broken => return None,
            }
        }
    }

    #[test]
    fn ring_reader_matches_virtio_queue_on_random_rings() {
        // Random tables: loops, `next` out of range, indirect tables of every shape (nested,
        // odd lengths, out of memory, straddling the region hole), heads out of range.
        // The test kit's generator, fixed seed: the same rings every run.
        let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
        let mut chains = 0usize;
        for _round in 0..300 {
            let mem = test_memory();
            let size = [4u16, 16, 64, 256][rng.below(4) as usize];
            let mut gq = GuestQueue::new(&mem, size);
            let table = gq.layout.desc;
            for i in 0..size {
                let shape = match rng.below(10) {
                    0..=4 => 0,
                    5..=7 => VRING_DESC_F_NEXT as u16,
                    8 => VRING_DESC_F_INDIRECT as u16,
                    _ => (VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT) as u16,
                };
                let flags = shape | if rng.below(2) == 0 { 0 } else { WRITE };
                let next = if rng.below(8) == 0 {
                    size + rng.below(4) as u16
                } else {
                    rng.below(u64::from(size)) as u16
                };
                let addr = match rng.below(6) {
                    0 => HOLE_START - 16 * rng.below(4),
                    1 => u64::MAX - rng.below(64),
                    2 => table,
                    _ => DATA_BASE + 16 * rng.below(0x1000),
                };
                let len = match rng.below(5) {
                    0 => 16 * (1 + rng.below(8)) as u32,
                    1 => rng.below(40) as u32,
                    2 => u32::MAX - rng.below(3) as u32,
                    _ => 64 + rng.below(2000) as u32,
                };
                gq.write_desc(i, addr, len, flags, next);
            }
            // Indirect tables land at DATA_BASE..: give them random descriptors too.
            for k in 0..0x100u64 {
                let flags = match rng.below(6) {
                    0 => VRING_DESC_F_INDIRECT as u16,
                    1 | 2 => VRING_DESC_F_NEXT as u16,
                    _ => 0,
                };
                let d = raw_desc(
                    DATA_BASE + rng.below(0x10000),
                    rng.below(3000) as u32,
                    flags,
                    rng.below(12) as u16,
                );
                mem.write_obj(d, GuestAddress(DATA_BASE + 16 * k)).unwrap();
            }
            let pending = rng.below(u64::from(size) + 1) as u16;
            for _ in 0..pending {
                let head = if rng.below(10) == 0 {
                    size + rng.below(3) as u16
                } else {
                    rng.below(u64::from(size)) as u16
                };
                gq.publish(head);
            }
            let want = reference(&gq.layout, &mem);
            let got = ours(&gq.layout, &mem);
            assert_eq!(got, want, "size {size}");
            chains += want.map_or(0, |w| w.len());
        }
        assert!(chains > 10_000, "only {chains} chains compared");
    }

    #[test]
    fn avail_index_more_than_the_queue_size_ahead_is_broken() {
        let mem = test_memory();
        let gq = GuestQueue::new(&mem, 16);
        gq.set_avail_idx(17);
        let mut q = gq.create_queue();
        let ring = Ring::new(&q, &mem);
        let mut heads = [0u16; 8];
        assert!(matches!(ring.pop_batch(&mut q, &mut heads, 8), Pop::Broken));
        assert_eq!(q.next_avail(), 0, "nothing popped");
    }

    #[test]
    fn descriptor_table_straddling_two_regions_reads_the_same_chains() {
        // The table's first half in one region, its second half in the next: entry-by-entry
        // reads through GuestMemory, same descriptors.
        let mem = test_memory();
        let mut gq = GuestQueue::at(&mem, REGION_SPLIT - 8 * 16, 16);
        for k in 0..16u64 {
            gq.add_desc_chain(&[(DATA_BASE + 0x100 * k, 60 + k as u32, 0)]);
        }
        let q = gq.create_queue();
        assert!(
            Ring::new(&q, &mem).descs.is_none(),
            "the table must straddle the regions for this test"
        );
        let want = reference(&gq.layout, &mem).unwrap();
        assert_eq!(want.len(), 16);
        assert_eq!(ours(&gq.layout, &mem).unwrap(), want);
    }
}
