//! The guest side shared by the `tx_chain` and `rx_fill` targets: memory map, ring placement,
//! a driver that writes whatever the input says (ignoring writes to unmapped memory), the
//! decoding of addresses/lengths/flags, and the pre-run capture the oracles compare against.

use std::collections::VecDeque;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::cursor::Cursor;
use crate::testkit::memory_of;
pub use crate::testkit::ring::{Field, Layout, SplitRing, INDIRECT, NEXT, WRITE};

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

/// Placement `kind` for a queue of `size` (a power of two), and whether the rings lie wholly
/// in mapped memory (a well-behaved placement):
/// 0 at address 0; 1 straddling the two adjacent regions; 2 in the third region;
/// 3 with the used ring's entries running into the hole; 4 with the avail ring running into
/// the hole (and the used ring in it).
pub fn place(kind: u8, size: u16) -> (Layout, bool) {
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
    (Layout::at(start, size), mapped)
}

/// The driver: the kit's ring in lenient mode (writes to unmapped memory are dropped, reads
/// of unmapped fields give `None`).
pub type Driver<'m> = SplitRing<&'m GuestMemoryMmap>;

/// The rings of a target's queue for config byte `cfg` (size `1 << (cfg % 9)`, placement
/// `cfg >> 4`, see [`place`]) over `mem`, zeroed: the driver, the device's queue, and whether
/// the rings lie wholly in mapped memory.
pub fn rings(mem: &GuestMemoryMmap, cfg: u8, event_idx: bool) -> (Driver<'_>, Queue, bool) {
    let (l, mapped) = place(cfg >> 4, 1u16 << (cfg % 9));
    let mut q = l.queue();
    q.set_event_idx(event_idx);
    (Driver::lenient(mem, l), q, mapped)
}

/// Runs the input's ops (at most [`MAX_OPS`]): op `c.u8() % kinds`, the shared driver ops
/// ([`driver_op`], flags xored with `dir`) here, the target's own ops through `own`.
pub fn run_ops(
    c: &mut Cursor<'_>,
    d: &mut Driver<'_>,
    kinds: u8,
    dir: u16,
    mut own: impl FnMut(u8, &mut Cursor<'_>, &Driver<'_>),
) {
    let mut ops = 0;
    while !c.is_empty() && ops < MAX_OPS {
        ops += 1;
        let op = c.u8() % kinds;
        if !driver_op(op, c, d, dir) {
            own(op, c, d);
        }
    }
}

/// The guest-driver ops both ring targets share (numbered as in their module docs): 0 a chain
/// of 1–8 descriptors published, 1 a raw descriptor, 2 publish a head, 3 move `avail.idx`,
/// 4 an indirect chain, 7 set `used_event`, 8 guest writes bytes. `dir` is xored into the
/// descriptors' flags (WRITE for RX, so that flag byte 0 means "device-writable" there).
/// Returns false for an op the target handles itself.
pub fn driver_op(op: u8, c: &mut Cursor<'_>, d: &mut Driver<'_>, dir: u16) -> bool {
    let l = d.layout;
    match op {
        0 => {
            let n = 1 + c.u8() % 8;
            let descs: Vec<_> = (0..n)
                .map(|_| {
                    let (a, n) = (addr(c, &l), len(c));
                    (a, n, (flags(c) ^ dir) & !NEXT)
                })
                .collect();
            d.add_desc_chain(&descs);
        }
        1 => {
            let (i, a, n, f, x) = (c.u16(), addr(c, &l), len(c), flags(c), next(c, l.size));
            d.write_desc(i, a, n, f, x);
        }
        2 => {
            let h = next(c, l.size);
            d.publish(h);
        }
        3 => {
            let b = c.u8();
            let cur = d.get(Field::AvailIdx).unwrap_or(0);
            let v = if b & 0x80 == 0 {
                cur.wrapping_add(u16::from(b))
            } else {
                cur.wrapping_sub(u16::from(b & 0x7f))
            };
            d.set_avail_idx(v);
        }
        4 => indirect(c, d, dir),
        7 => d.set_used_event(c.u16()),
        8 => {
            let a = addr(c, &l);
            let n = usize::from(c.u8());
            write_mapped(d.mem(), a, c.bytes(n));
        }
        _ => return false,
    }
    true
}

/// Writes an indirect table and publishes a descriptor pointing at it. `dir` is xored into the
/// table entries' flags.
fn indirect(c: &mut Cursor<'_>, d: &mut Driver<'_>, dir: u16) {
    let l = d.layout;
    let table = addr(c, &l);
    let n = c.u8() % 9;
    let descs: Vec<_> = (0..n)
        .map(|_| (addr(c, &l), len(c), (flags(c) ^ dir) & !NEXT))
        .collect();
    d.write_indirect_table(table, &descs);
    let b = c.u8();
    let tlen = if b & 1 == 0 {
        16 * u32::from(n)
    } else {
        len(c)
    };
    // Bits 1..: extra flags on the indirect descriptor itself (NEXT, WRITE), usually none.
    let extra = u16::from(b >> 1) & (NEXT | WRITE);
    let slot = d.alloc_descs(1);
    d.write_desc(
        slot,
        table,
        tlen,
        INDIRECT | extra,
        slot.wrapping_add(1) % l.size,
    );
    d.publish(slot);
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

/// Descriptor lengths around the interesting bounds: empty, one byte, around both vnet header
/// lengths, a minimal frame, around an MTU-sized frame, a page, around the largest GSO frame.
pub const LEN_EDGES: [u32; 16] = [
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

/// A descriptor length: small, medium, around the interesting bounds, or anything.
pub fn len(c: &mut Cursor<'_>) -> u32 {
    match c.u8() % 6 {
        0 => u32::from(c.u8()),
        1 => u32::from(c.u16()),
        2 => LEN_EDGES[usize::from(c.u8() % 16)],
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
        let l = d.layout;
        let mut shadow = l.queue();
        shadow.set_next_avail(q.next_avail());
        let mut chains = Vec::new();
        if let Ok(it) = shadow.iter(d.mem()) {
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
        let avail_idx = d.get(Field::AvailIdx);
        Pre {
            chains,
            announced: avail_idx.map_or(0, |a| a.wrapping_sub(q.next_avail())),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            used_event: d.get(Field::UsedEvent),
            mem: snapshot(d.mem()),
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
            d.get(Field::AvailEvent),
            d.get(Field::AvailIdx),
            "{what}: avail_event must name the guest's avail index or the next kick is lost"
        );
    } else {
        assert_eq!(
            d.get(Field::UsedFlags).map(|f| f & 1),
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

/// What both ring targets keep across their datapath calls, and the checks around each call
/// they share.
#[derive(Debug)]
pub struct Calls {
    /// Host faults queued on the fake host queue.
    pub faults: Faults,
    pub event_idx: bool,
    /// The rings lie wholly in mapped memory.
    pub mapped: bool,
    /// The ring broke: no more calls.
    pub stopped: bool,
    pub runs: usize,
}

impl Calls {
    pub fn new(event_idx: bool, mapped: bool) -> Calls {
        Calls {
            faults: Faults::default(),
            event_idx,
            mapped,
            stopped: false,
            runs: 0,
        }
    }

    /// The world before the next call, or `None` when no call makes sense any more (the ring
    /// broke, or the input made its [`MAX_RUNS`] calls).
    pub fn next(&mut self, d: &Driver<'_>, q: &Queue) -> Option<Pre> {
        if self.stopped || self.runs >= MAX_RUNS {
            return None;
        }
        self.runs += 1;
        Some(Pre::capture(d, q))
    }

    /// After a call: the notification decision, guest kicks enabled when the device went
    /// `idle` waiting for the guest (`what` says why), and no more calls on a broken ring.
    pub fn finish(
        &mut self,
        d: &Driver<'_>,
        pre: &Pre,
        q: &Queue,
        out: (bool, bool),
        idle: bool,
        what: &str,
    ) {
        let (notify, broken) = out;
        check_notify(pre, q, self.event_idx, notify, broken);
        if idle && !broken {
            check_kicks_enabled(d, self.event_idx, what);
        }
        self.stopped |= broken;
    }
}

/// Chains a call consumed (`next_avail` moved past them); never more than were announced.
pub fn consumed(pre: &Pre, q: &Queue) -> usize {
    let n = usize::from(q.next_avail().wrapping_sub(pre.next_avail));
    assert!(
        n <= pre.chains.len(),
        "consumed {n} chains, only {} were announced",
        pre.chains.len()
    );
    n
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
