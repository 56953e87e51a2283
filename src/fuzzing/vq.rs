//! The guest side shared by the `tx_chain` and `rx_fill` targets: memory map, ring placement,
//! a driver that writes whatever the input says (ignoring writes to unmapped memory), the
//! decoding of addresses/lengths/flags, and the pre-run capture the oracles compare against.

use std::collections::VecDeque;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::cursor::Cursor;
use crate::datapath::testutil::{memory_of, raw_queue};

/// `[R0, R1)` and `[R1, HOLE)` are adjacent regions; `[HOLE, R2)` is unmapped; `[R2, END)` is
/// the third region.
pub const R0: u64 = 0;
/// Start of the second region (adjacent to the first).
pub const R1: u64 = 0x1_0000;
/// Start of the hole.
pub const HOLE: u64 = 0x2_0000;
/// Start of the third region.
pub const R2: u64 = 0x4_0000;
/// End of guest memory.
pub const END: u64 = 0x5_0000;
/// Where buffers usually go in the first region (rings at 0 end below it).
pub const DATA0: u64 = 0x2000;

/// Descriptor flags.
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// Device-writable.
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Indirect table.
pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Most ops one input may run (keeps every input fast and bounded).
pub const MAX_OPS: usize = 256;
/// Most datapath calls one input may make (the final drain included).
pub const MAX_RUNS: usize = 48;

/// The mapped ranges of guest memory.
pub const REGIONS: [(u64, u64); 3] = [(R0, R1), (R1, HOLE), (R2, END)];

/// Guest memory: two adjacent 64 KiB regions, a 128 KiB hole, a third 64 KiB region. Filled
/// with a position-dependent pattern so that frames have recognisable bytes.
pub fn memory() -> GuestMemoryMmap {
    let mem = memory_of(&[
        (R0, (R1 - R0) as usize),
        (R1, (HOLE - R1) as usize),
        (R2, (END - R2) as usize),
    ]);
    static PATTERN: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    let pattern = PATTERN.get_or_init(|| {
        REGIONS
            .iter()
            .map(|&(start, end)| {
                (start..end)
                    .map(|a| (a as u8).wrapping_mul(151) ^ ((a >> 8) as u8).wrapping_mul(7))
                    .collect()
            })
            .collect()
    });
    for (&(start, _), bytes) in REGIONS.iter().zip(pattern) {
        mem.write_slice(bytes, GuestAddress(start))
            .expect("fill guest memory");
    }
    mem
}

/// Every mapped byte, region by region.
pub fn snapshot(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(s, e)| {
            let mut v = vec![0u8; (e - s) as usize];
            mem.read_slice(&mut v, GuestAddress(s))
                .expect("read guest memory");
            v
        })
        .collect()
}

/// Guest addresses whose bytes differ between two snapshots, as maximal `[start, end)` ranges.
pub fn changed_ranges(before: &[Vec<u8>], after: &[Vec<u8>]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &(start, _)) in REGIONS.iter().enumerate() {
        let (b, a) = (&before[i], &after[i]);
        let mut j = 0;
        while j < b.len() {
            // Skip equal 1 KiB chunks with one memcmp (most of memory never changes).
            if j % 1024 == 0 && j + 1024 <= b.len() && b[j..j + 1024] == a[j..j + 1024] {
                j += 1024;
                continue;
            }
            if b[j] != a[j] {
                let s = j;
                while j < b.len() && b[j] != a[j] {
                    j += 1;
                }
                out.push((start + s as u64, start + j as u64));
            } else {
                j += 1;
            }
        }
    }
    out
}

/// True when `[s, e)` lies within the union of `allowed` ranges.
pub fn covered(allowed: &[(u64, u64)], s: u64, e: u64) -> bool {
    let mut v: Vec<(u64, u64)> = allowed.iter().copied().filter(|r| r.0 < r.1).collect();
    v.sort_unstable();
    let mut at = s;
    for (a, b) in v {
        if a > at {
            break;
        }
        if b > at {
            at = b;
        }
        if at >= e {
            return true;
        }
    }
    at >= e
}

/// True when two ranges intersect.
pub fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 < a.1 && b.0 < b.1
}

/// Writes `bytes` at `addr`, skipping whatever is not mapped.
pub fn write_mapped(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    let end = addr.saturating_add(bytes.len() as u64);
    for (s, e) in REGIONS {
        let (a, b) = (addr.max(s), end.min(e));
        if a < b {
            let off = (a - addr) as usize;
            let _ = mem.write_slice(&bytes[off..off + (b - a) as usize], GuestAddress(a));
        }
    }
}

/// Where one split virtqueue's rings are.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Rings entirely in mapped memory (a well-behaved placement).
    pub mapped: bool,
}

impl Layout {
    fn at(start: u64, size: u16) -> Layout {
        let n = u64::from(size);
        let desc = start;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        Layout {
            size,
            desc,
            avail,
            used,
            mapped: true,
        }
    }

    /// Placement `kind` for a queue of `size` (a power of two):
    /// 0 at address 0; 1 straddling the two adjacent regions; 2 in the third region;
    /// 3 with the used ring's entries running into the hole; 4 with the avail ring running into
    /// the hole (and the used ring in it).
    pub fn place(kind: u8, size: u16) -> Layout {
        let probe = Layout::at(0, size);
        let bytes = probe.end();
        let n = u64::from(size);
        let (start, mapped) = match kind % 5 {
            0 => (R0, true),
            1 => ((R1 - bytes / 2) & !15, true),
            2 => (R2, true),
            3 => ((HOLE - probe.used - 4 - 8 * (n / 2)) & !15, false),
            _ => ((HOLE - probe.avail - 4 - n) & !15, false),
        };
        let mut l = Layout::at(start, size);
        l.mapped = mapped;
        l
    }

    /// End of the used ring (`avail_event` included).
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

    /// A ready device-side queue over these rings (not validated: rings may be unmapped).
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q = raw_queue(self.size, self.desc, self.avail, self.used);
        q.set_event_idx(event_idx);
        q
    }
}

/// The driver: writes descriptors and avail entries as told. Writes to unmapped memory are
/// dropped (a broken placement), reads of unmapped fields give `None`.
#[derive(Debug)]
pub struct Driver<'m> {
    pub mem: &'m GuestMemoryMmap,
    pub l: Layout,
    next_desc: u16,
}

impl<'m> Driver<'m> {
    /// A driver over zeroed rings.
    pub fn new(mem: &'m GuestMemoryMmap, l: Layout) -> Self {
        write_mapped(mem, l.desc, &vec![0u8; (l.end() - l.desc) as usize]);
        Driver {
            mem,
            l,
            next_desc: 0,
        }
    }

    /// Writes descriptor `index % size`.
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        let at = self.l.desc + 16 * u64::from(index % self.l.size);
        let _ = self.mem.write_obj(d, GuestAddress(at));
    }

    /// Reads descriptor `index` as `(addr, len, flags, next)`.
    pub fn read_desc(&self, index: u16) -> Option<(u64, u32, u16, u16)> {
        read_raw_desc(self.mem, self.l.desc + 16 * u64::from(index))
    }

    /// Writes a chain into the next free descriptor slots (NEXT links added) and publishes it.
    pub fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let n = descs.len().max(1) as u16;
        let first = self.next_desc;
        self.next_desc = self.next_desc.wrapping_add(n) % self.l.size;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = first.wrapping_add(i as u16) % self.l.size;
            let nidx = first.wrapping_add(i as u16 + 1) % self.l.size;
            if i + 1 < descs.len() {
                self.write_desc(idx, addr, len, flags | NEXT, nidx);
            } else {
                self.write_desc(idx, addr, len, flags & !NEXT, 0);
            }
        }
        self.publish(first);
        first
    }

    /// Writes an indirect table of `descs` at `table` (NEXT links added, unmapped parts
    /// dropped).
    pub fn write_indirect(&self, table: u64, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = if i + 1 < descs.len() {
                (flags | NEXT, i as u16 + 1)
            } else {
                (flags & !NEXT, 0)
            };
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            let at = table.wrapping_add(16 * i as u64);
            let _ = self.mem.write_obj(d, GuestAddress(at));
        }
    }

    /// Reserves one descriptor slot.
    pub fn alloc(&mut self) -> u16 {
        let i = self.next_desc;
        self.next_desc = (self.next_desc + 1) % self.l.size;
        i
    }

    /// Puts `head` in the next avail slot and bumps `avail.idx`.
    pub fn publish(&self, head: u16) {
        let idx = self.avail_idx().unwrap_or(0);
        let slot = self.l.avail + 4 + 2 * u64::from(idx % self.l.size);
        let _ = self.mem.write_obj(head.to_le(), GuestAddress(slot));
        self.set_avail_idx(idx.wrapping_add(1));
    }

    pub fn avail_idx(&self) -> Option<u16> {
        self.read_u16(self.l.avail + 2)
    }

    pub fn set_avail_idx(&self, v: u16) {
        self.write_u16(self.l.avail + 2, v);
    }

    pub fn set_used_event(&self, v: u16) {
        self.write_u16(self.l.avail + 4 + 2 * u64::from(self.l.size), v);
    }

    pub fn used_event(&self) -> Option<u16> {
        self.read_u16(self.l.avail + 4 + 2 * u64::from(self.l.size))
    }

    pub fn used_flags(&self) -> Option<u16> {
        self.read_u16(self.l.used)
    }

    pub fn used_idx(&self) -> Option<u16> {
        self.read_u16(self.l.used + 2)
    }

    pub fn avail_event(&self) -> Option<u16> {
        self.read_u16(self.l.end() - 2)
    }

    /// Used entry number `i` (mod size) as `(id, len)`.
    pub fn used_elem(&self, i: u16) -> Option<(u32, u32)> {
        let slot = self.l.used + 4 + 8 * u64::from(i % self.l.size);
        let id: u32 = self.mem.read_obj(GuestAddress(slot)).ok()?;
        let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).ok()?;
        Some((u32::from_le(id), u32::from_le(len)))
    }

    fn read_u16(&self, a: u64) -> Option<u16> {
        self.mem
            .read_obj::<u16>(GuestAddress(a))
            .ok()
            .map(u16::from_le)
    }

    fn write_u16(&self, a: u64, v: u16) {
        let _ = self.mem.write_obj(v.to_le(), GuestAddress(a));
    }
}

/// Reads one raw descriptor at `at` as `(addr, len, flags, next)`.
pub fn read_raw_desc(mem: &GuestMemoryMmap, at: u64) -> Option<(u64, u32, u16, u16)> {
    let d: RawDescriptor = mem.read_obj(GuestAddress(at)).ok()?;
    let d = SplitDescriptor::from(d);
    Some((d.addr().0, d.len(), d.flags(), d.next()))
}

/// An address somewhere interesting: buffers in each region, across the region boundary,
/// into the hole, off the end, inside the rings, or anything.
pub fn addr(c: &mut Cursor<'_>, l: &Layout) -> u64 {
    let kind = c.u8();
    let off = u64::from(c.u16());
    match kind % 8 {
        0 => DATA0 + off % (R1 - DATA0),
        1 => R1 - 0x1000 + off % 0x2000,
        2 => HOLE - 0x1000 + off % 0x2000,
        3 => R2 + off % (END - R2),
        4 => l.desc + off % (l.end() - l.desc),
        5 => END - 0x1000 + off % 0x2000,
        6 => R1 + off % (HOLE - R1),
        _ => c.u64(),
    }
}

/// A descriptor length: small, medium, around the interesting bounds, or anything.
pub fn len(c: &mut Cursor<'_>) -> u32 {
    const EDGES: [u32; 16] = [
        0,
        1,
        9,
        10,
        11,
        12,
        13,
        60,
        1514,
        1526,
        1530,
        4096,
        65550,
        65562,
        65563,
        u32::MAX,
    ];
    match c.u8() % 6 {
        0 => u32::from(c.u8()),
        1 => u32::from(c.u16()),
        2 => EDGES[usize::from(c.u8() % 16)],
        3 => c.u32(),
        4 => u32::from(c.u16()) % 2048,
        _ => 12 + u32::from(c.u8()),
    }
}

/// Descriptor flags: NEXT/WRITE/INDIRECT from the low bits, or a raw `u16` when bit 7 is set.
pub fn flags(c: &mut Cursor<'_>) -> u16 {
    let b = c.u8();
    if b & 0x80 != 0 {
        c.u16()
    } else {
        u16::from(b) & 7
    }
}

/// A `next` index: in range most of the time, anything otherwise.
pub fn next(c: &mut Cursor<'_>, size: u16) -> u16 {
    let raw = c.u16();
    if raw & 0x8000 == 0 {
        raw % size
    } else {
        raw
    }
}

/// An errno a host queue may return.
pub fn errno(c: &mut Cursor<'_>) -> i32 {
    const E: [i32; 8] = [
        libc::EAGAIN,
        libc::EINTR,
        libc::EIO,
        libc::EINVAL,
        libc::ENOBUFS,
        libc::EFAULT,
        libc::EMSGSIZE,
        libc::EBADFD,
    ];
    E[usize::from(c.u8() % 8)]
}

/// One chain as the device will see it, popped from a shadow queue before the datapath runs.
#[derive(Debug, Clone)]
pub struct Chain {
    pub head: u16,
    /// `(addr, len, device-writable)` in chain order (indirect tables expanded).
    pub descs: Vec<(u64, u32, bool)>,
    /// The walk stopped while the last descriptor still claimed a successor (loop, `next` out
    /// of range, bad indirect table).
    pub cut: bool,
}

impl Chain {
    /// Mapped and within `max_segments` slices: every non-empty descriptor is mapped memory.
    pub fn mapped_segments(&self, mem: &GuestMemoryMmap) -> Option<usize> {
        let mut n = 0;
        for &(addr, len, _) in &self.descs {
            if len == 0 {
                continue;
            }
            let slices = mem
                .get_slices(GuestAddress(addr), len as usize, Permissions::Read)
                .ok()?;
            for s in slices {
                s.ok()?;
                n += 1;
            }
        }
        Some(n)
    }

    /// The non-empty descriptor ranges `[addr, addr + len)`, of one direction.
    pub fn ranges(&self, writable: bool) -> Vec<(u64, u64)> {
        self.descs
            .iter()
            .filter(|d| d.2 == writable && d.1 > 0)
            .map(|&(a, l, _)| (a, a.saturating_add(u64::from(l))))
            .collect()
    }

    /// Sum of descriptor lengths.
    pub fn total(&self) -> u64 {
        self.descs.iter().map(|d| u64::from(d.1)).sum()
    }

    /// The first `n` bytes the chain's descriptors of one direction cover, read from `mem`.
    pub fn read(&self, mem: &GuestMemoryMmap, writable: bool, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        for (a, b) in self.ranges(writable) {
            if out.len() >= n {
                break;
            }
            let take = ((b - a) as usize).min(n - out.len());
            let mut buf = vec![0u8; take];
            mem.read_slice(&mut buf, GuestAddress(a))
                .expect("oracle reads a mapped chain");
            out.extend_from_slice(&buf);
        }
        out
    }
}

/// The state of the world just before a datapath call.
#[derive(Debug)]
pub struct Pre {
    /// Chains the avail index announces, from `next_avail` on, in avail order.
    pub chains: Vec<Chain>,
    /// `avail.idx - next_avail` (wrapping), as the device would compute it.
    pub announced: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub used_event: Option<u16>,
    pub mem: Vec<Vec<u8>>,
    /// Ranges of every indirect table the descriptor table points at.
    pub indirect_tables: Vec<(u64, u64)>,
}

impl Pre {
    /// Pops every announced chain from a shadow queue (same rings, same `next_avail`) without
    /// touching guest memory, and snapshots memory.
    pub fn capture(d: &Driver<'_>, q: &Queue) -> Pre {
        let l = d.l;
        let mut shadow = raw_queue(l.size, l.desc, l.avail, l.used);
        shadow.set_next_avail(q.next_avail());
        let mut chains = Vec::new();
        if let Ok(it) = shadow.iter(d.mem) {
            for c in it {
                let head = c.head_index();
                let mut descs = Vec::new();
                let mut last_next = false;
                for desc in c {
                    last_next = desc.has_next();
                    descs.push((desc.addr().0, desc.len(), desc.is_write_only()));
                }
                let cut = last_next || descs.is_empty();
                chains.push(Chain { head, descs, cut });
            }
        }
        let mut indirect_tables = Vec::new();
        for i in 0..l.size {
            if let Some((a, len, f, _)) = d.read_desc(i) {
                if f & INDIRECT != 0 {
                    indirect_tables.push((a, a.saturating_add(u64::from(len))));
                }
            }
        }
        let avail_idx = d.avail_idx();
        Pre {
            chains,
            announced: avail_idx.map_or(0, |a| a.wrapping_sub(q.next_avail())),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            used_event: d.used_event(),
            mem: snapshot(d.mem),
            indirect_tables,
        }
    }
}

/// The used entries the device added during one call, read from the used ring.
pub fn new_used(d: &Driver<'_>, pre: &Pre, q: &Queue) -> Vec<(u32, u32)> {
    let n = q.next_used().wrapping_sub(pre.next_used);
    (0..n)
        .map(|i| {
            d.used_elem(pre.next_used.wrapping_add(i))
                .expect("a used entry the device wrote is mapped")
        })
        .collect()
}

/// Checks the notification decision of one call (`notify`) against the virtio rules: no
/// entries, no notification; without EVENT_IDX always; with it when `used_event` was crossed.
pub fn check_notify(pre: &Pre, q: &Queue, event_idx: bool, notify: bool, broken: bool) {
    let added = q.next_used().wrapping_sub(pre.next_used);
    if added == 0 {
        assert!(!notify, "notified without adding used entries");
        return;
    }
    if broken {
        return;
    }
    let want = if event_idx {
        match pre.used_event {
            Some(ev) => q.next_used().wrapping_sub(ev).wrapping_sub(1) < added,
            None => true,
        }
    } else {
        true
    };
    assert_eq!(notify, want, "notify decision (event_idx {event_idx})");
}

/// Checks that guest kicks are enabled when the device went idle waiting for the guest: without
/// EVENT_IDX `used.flags` has no `NO_NOTIFY`; with it `avail_event` is the guest's avail index.
pub fn check_kicks_enabled(d: &Driver<'_>, event_idx: bool, what: &str) {
    if event_idx {
        assert_eq!(
            d.avail_event(),
            d.avail_idx(),
            "{what}: avail_event must name the guest's avail index or the next kick is lost"
        );
    } else {
        assert_eq!(
            d.used_flags().map(|f| f & 1),
            Some(0),
            "{what}: VRING_USED_F_NO_NOTIFY left set"
        );
    }
}

/// Multiset equality of two head lists.
pub fn same_heads(mut a: Vec<u16>, mut b: Vec<u16>) -> bool {
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// Queued host faults, mirrored so the oracles know which call got which errno.
#[derive(Debug, Default)]
pub struct Faults(pub VecDeque<i32>);

impl Faults {
    /// Takes the faults the next `calls` host calls consumed, one per call (None: no fault).
    pub fn take(&mut self, calls: usize) -> Vec<Option<i32>> {
        (0..calls).map(|_| self.0.pop_front()).collect()
    }
}
