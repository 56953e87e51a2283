//! TOCTOU stress (research class G6): a hostile guest rewrites its descriptor table, its avail
//! ring and its frame bytes (vnet headers included) while the device processes them. Two runs:
//! descriptors never aimed at the rings (the rings stay an oracle), and descriptors also aimed at
//! the guest's own rings (RX then scribbles over them; fewer oracles, same safety checks).
//!
//! `process_tx`/`process_rx` run in a tight loop on queue pair A while a mutator thread keeps
//! rewriting pair A's descriptors (random addresses, lengths, flags, `next`, indirect tables,
//! torn half-written descriptors), avail ring entries, `used_event`, and the buffers the frames
//! and headers live in. Meanwhile pair B, in the same guest memory, carries well-formed traffic
//! on another thread. Unprivileged; runs in a few seconds.
//!
//! What must hold:
//! - nothing panics, every call returns, and no queue is declared broken (the loop keeps
//!   `avail.idx` sane, so a broken ring would mean a mis-read);
//! - the device only reports what it can stand behind: TX used lengths are 0, RX used lengths
//!   never exceed the largest frame, used ids are in range, and for TX every consumed chain is
//!   counted exactly once (`tx_frames` + drops = chains consumed);
//! - nothing outside guest memory is written: pair A's regions sit in the middle of larger host
//!   mappings whose edges are filled with a pattern and checked afterwards. A guest can point a
//!   descriptor anywhere *inside* its memory (it only corrupts itself), so inside the guest the
//!   check is a zone no descriptor of pair A can reach with correct bounds arithmetic (pair B's
//!   region, behind a hole; wrapped or huge ranges aimed at it must be refused);
//! - pair B is unaffected: every frame byte-exact both ways, no drop, no broken ring.
//!
//! Why zero-copy is safe here: the datapath reads each descriptor once (virtio-queue copies it
//! into a local `Descriptor`), checks that copy, and builds the iovecs from it. The guest can
//! still rewrite the *bytes* those iovecs point to while `writev` runs, but the kernel copies
//! them into an skb during the call and validates what it copied (vnet header included): a
//! racing guest can only corrupt its own frame, never make the host read or write outside the
//! ranges that were checked. RX is the mirror image: `readv` writes into ranges checked once,
//! and the only byte the backend writes itself (`num_buffers`) goes into the first buffer of the
//! checked chain.

mod support {
    #[path = "rig.rs"]
    pub mod rig;
    #[path = "vu_driver.rs"]
    pub mod vu_driver;
}

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use macvhost::datapath::{
    process_rx, process_tx, QueueStats, RxOptions, RxScratch, StatsSnapshot, TxOptions, TxScratch,
};
use macvhost::testkit::fuzz::LEN_EDGES;
use macvhost::testkit::ring::{raw_desc, SplitRing, INDIRECT, NEXT, WRITE};
use macvhost::testkit::FakeHostQueue;
use virtio_queue::QueueT;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

const MIB: u64 = 1 << 20;
/// Pair A: two adjacent regions `[0, 1 MiB) [1 MiB, 2 MiB)`, each in the middle of its own host
/// mapping with guard bytes on both sides.
const R0: u64 = 0;
const R1: u64 = MIB;
/// Pair B's region, after a hole `[2 MiB, 4 MiB)`.
const R2: u64 = 4 * MIB;
/// Host guard bytes on each side of R0 and R1.
const GUARD: usize = 64 << 10;
const GUARD_BYTE: u8 = 0xA5;
/// Part of R2 nothing ever legitimately writes.
const CANARY: u64 = R2 + 0x8_0000;
const CANARY_LEN: usize = 0x8_0000;
const CANARY_BYTE: u8 = 0x5A;

const QSIZE: u16 = 256;
const HDR: usize = 12;
/// VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF.
const VERSION_1: u64 = 1 << 32;
const MRG_RXBUF: u64 = 1 << 15;

/// Pair A layout (in R0/R1).
const A_TX_RING: u64 = R0;
const A_RX_RING: u64 = R0 + 0x4000;
/// Indirect tables the mutator fills with junk.
const A_INDIRECT: u64 = R0 + 0x8000;
const A_INDIRECT_LEN: u64 = 0x8000;
/// Frame bytes, spanning the R0/R1 boundary.
const A_DATA: u64 = R0 + 0x1_0000;
const A_DATA_END: u64 = R1 + MIB;

/// Pair B layout (in R2): rings, then 64 buffers of 2 KiB per direction.
const B_TX_RING: u64 = R2;
const B_RX_RING: u64 = R2 + 0x4000;
const B_TX_BUFS: u64 = R2 + 0x1_0000;
const B_RX_BUFS: u64 = R2 + 0x3_0000;
const B_BUF: u64 = 2048;
const B_BATCH: u16 = 16;

/// Largest frame pair A's fake host hands over.
const RX_HOST_MAX: usize = 65562;

const RUN_FOR: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Guest memory with host guard zones
// ---------------------------------------------------------------------------------------------

/// One anonymous host mapping `[guard][region][guard]`; the guards are filled with
/// [`GUARD_BYTE`]. The mapping is never unmapped (it must outlive every `GuestMemoryMmap` clone
/// the test threads hold; the process ends soon after).
struct Guarded {
    base: *mut u8,
    len: usize,
}

// SAFETY: `base` points into a private anonymous mapping that lives for the rest of the process
// and is only read through `guards_intact` (after the writers are joined) or accessed through
// vm-memory's volatile accessors.
unsafe impl Send for Guarded {}

impl Guarded {
    fn new(region_len: usize) -> Guarded {
        let len = region_len + 2 * GUARD;
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        let base = p.cast::<u8>();
        // SAFETY: both guard ranges lie inside the `len`-byte mapping just created.
        unsafe {
            std::ptr::write_bytes(base, GUARD_BYTE, GUARD);
            std::ptr::write_bytes(base.add(GUARD + region_len), GUARD_BYTE, GUARD);
        }
        Guarded { base, len }
    }

    /// The guest region (between the guards) at guest address `gpa`.
    fn region(&self, gpa: u64) -> GuestRegionMmap {
        let size = self.len - 2 * GUARD;
        // SAFETY: `base + GUARD .. + size` lies inside our live mapping (never unmapped), which
        // was created with exactly these protection bits and flags; `build_raw` does not take
        // ownership (it never unmaps a raw mapping).
        let mmap = unsafe {
            MmapRegion::build_raw(
                self.base.add(GUARD),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .expect("raw mmap region");
        GuestRegionMmap::new(mmap, GuestAddress(gpa)).expect("guest region")
    }

    /// Offsets of guard bytes that changed (at most 8), or empty.
    fn damaged_guards(&self) -> Vec<usize> {
        let size = self.len - 2 * GUARD;
        // SAFETY: the whole mapping is live and readable; every thread that wrote to guest
        // memory has been joined, so nothing writes it concurrently.
        let all = unsafe { std::slice::from_raw_parts(self.base, self.len) };
        (0..GUARD)
            .chain(GUARD + size..self.len)
            .filter(|&i| all[i] != GUARD_BYTE)
            .take(8)
            .collect()
    }
}

fn guest_memory() -> (GuestMemoryMmap, Vec<Guarded>) {
    let g0 = Guarded::new(MIB as usize);
    let g1 = Guarded::new(MIB as usize);
    let g2 = Guarded::new(MIB as usize);
    let mem = GuestMemoryMmap::from_regions(vec![g0.region(R0), g1.region(R1), g2.region(R2)])
        .expect("guest memory");
    mem.write_slice(&vec![CANARY_BYTE; CANARY_LEN], GuestAddress(CANARY))
        .unwrap();
    (mem, vec![g0, g1, g2])
}

// ---------------------------------------------------------------------------------------------
// Split rings and host queues
// ---------------------------------------------------------------------------------------------

/// The guest side of a pair-A or pair-B virtqueue at `base`: the kit's ring driver (no ledger).
fn ring_at(mem: &GuestMemoryMmap, base: u64) -> SplitRing<GuestMemoryMmap> {
    SplitRing::at(mem.clone(), base, QSIZE).without_ledger()
}

/// The lengths of the entries a pair-A ring's used ring gained, each id checked to be in
/// range; none when descriptors are aimed at the rings (RX frames then overwrite used rings).
fn used_lengths(ring: &mut SplitRing<GuestMemoryMmap>, aim_at_rings: bool, what: &str) -> Vec<u32> {
    if aim_at_rings {
        return Vec::new();
    }
    let used = ring.take_used();
    for &(id, _) in &used {
        assert!(id < u32::from(QSIZE), "{what} used id {id}");
    }
    used.into_iter().map(|(_, len)| len).collect()
}

/// Every frame dropped either way, plus a broken queue: what a well-behaved pair must never see.
fn harm(s: &StatsSnapshot) -> u64 {
    s.tx_drop_bad_chain
        + s.tx_drop_too_short
        + s.tx_drop_too_big
        + s.tx_drop_host_error
        + s.rx_drop_bad_chain
        + s.rx_drop_buffer_too_small
        + s.rx_drop_host_error
        + s.queue_broken
}

/// A host queue for the datapath calls: the kit's fake, whose `peer()` is the host's end.
fn host_queue() -> Arc<FakeHostQueue> {
    Arc::new(FakeHostQueue::new())
}

// ---------------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn seeded(salt: u64) -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Rng(t ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A descriptor address a hostile guest might use: anywhere in pair A's buffers (the R0/R1 seam
/// included), its indirect tables, with `aim_at_rings` its own rings, the hole, past the end of
/// memory, or near `u64::MAX` so that `addr + len` wraps. Never aimed into pair B's region
/// directly: reaching it would need broken bounds arithmetic.
fn hostile_addr(r: &mut Rng, aim_at_rings: bool) -> u64 {
    match r.below(10) {
        0..=3 => A_DATA + r.below(A_DATA_END - A_DATA),
        4 => R1 - r.below(4096),
        5 if aim_at_rings => R0 + r.below(0x8000),
        5 | 6 => A_INDIRECT + 16 * r.below(A_INDIRECT_LEN / 16),
        7 => 2 * MIB + r.below(2 * MIB),
        8 => 5 * MIB + r.below(1 << 40),
        _ => u64::MAX - r.below(1 << 33),
    }
}

/// A length around the interesting bounds (the fuzz targets' list), 1 MiB, or anything.
fn hostile_len(r: &mut Rng) -> u32 {
    match r.below(18) {
        16 => 1 << 20,
        17 => r.below(1 << 17) as u32,
        i => LEN_EDGES[i as usize],
    }
}

fn hostile_flags(r: &mut Rng) -> u16 {
    match r.below(8) {
        0 => r.next() as u16,
        1 => INDIRECT,
        2 => INDIRECT | NEXT,
        3 | 4 => NEXT | (r.below(2) as u16 * WRITE),
        _ => r.below(2) as u16 * WRITE,
    }
}

fn hostile_next(r: &mut Rng) -> u16 {
    if r.below(8) == 0 {
        r.next() as u16
    } else {
        r.below(u64::from(QSIZE)) as u16
    }
}

/// One mutation of pair A's guest state.
fn mutate(mem: &GuestMemoryMmap, rings: &[(u64, u64, u64)], r: &mut Rng, aim: bool) {
    let (desc, avail, _used) = rings[r.below(rings.len() as u64) as usize];
    match r.below(16) {
        // A whole descriptor at once.
        0..=4 => {
            let i = r.below(u64::from(QSIZE));
            let d = raw_desc(
                hostile_addr(r, aim),
                hostile_len(r),
                hostile_flags(r),
                hostile_next(r),
            );
            mem.write_obj(d, GuestAddress(desc + 16 * i)).unwrap();
        }
        // One field only, so the device may see a descriptor half old, half new.
        5..=6 => {
            let i = desc + 16 * r.below(u64::from(QSIZE));
            match r.below(4) {
                0 => mem
                    .write_obj(hostile_addr(r, aim), GuestAddress(i))
                    .unwrap(),
                1 => mem.write_obj(hostile_len(r), GuestAddress(i + 8)).unwrap(),
                2 => mem
                    .write_obj(hostile_flags(r), GuestAddress(i + 12))
                    .unwrap(),
                _ => mem
                    .write_obj(hostile_next(r), GuestAddress(i + 14))
                    .unwrap(),
            }
        }
        // An avail ring slot: mostly valid heads, some out of range.
        7..=9 => {
            let slot = avail + 4 + 2 * r.below(u64::from(QSIZE));
            let head = if r.below(6) == 0 {
                r.next() as u16
            } else {
                r.below(u64::from(QSIZE)) as u16
            };
            mem.write_obj(head, GuestAddress(slot)).unwrap();
        }
        // used_event and avail.flags.
        10 => {
            let at = if r.below(2) == 0 {
                avail + 4 + 2 * u64::from(QSIZE)
            } else {
                avail
            };
            mem.write_obj(r.next() as u16, GuestAddress(at)).unwrap();
        }
        // An indirect table entry.
        11..=12 => {
            let at = A_INDIRECT + 16 * r.below(A_INDIRECT_LEN / 16);
            let d = raw_desc(
                hostile_addr(r, aim),
                hostile_len(r),
                hostile_flags(r),
                hostile_next(r),
            );
            mem.write_obj(d, GuestAddress(at)).unwrap();
        }
        // Frame bytes and vnet headers: random bytes somewhere in the data area.
        _ => {
            let at = A_DATA + r.below(A_DATA_END - A_DATA - 64);
            let junk: [u8; 32] = std::array::from_fn(|_| r.next() as u8);
            let n = 1 + r.below(32) as usize;
            mem.write_slice(&junk[..n], GuestAddress(at)).unwrap();
        }
    }
}

fn tx_consumed(s: &StatsSnapshot) -> u64 {
    s.tx_frames
        + s.tx_drop_bad_chain
        + s.tx_drop_too_short
        + s.tx_drop_too_big
        + s.tx_drop_host_error
}

/// A recognisable frame for pair B.
fn b_frame(seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as usize).wrapping_mul(131).wrapping_add(i * 7) as u8)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct AReport {
    tx_calls: u64,
    rx_calls: u64,
    tx_used: u64,
    rx_used: u64,
    tx_blocked: u64,
    rx_injected: u64,
    rx_broken_by_guest: u64,
    stats: StatsSnapshot,
}

/// Descriptors never aim at the rings, so the ring itself stays an oracle: no broken queue, used
/// ids in range, TX used lengths 0, RX used lengths bounded.
#[test]
fn concurrent_rewrites_of_rings_and_headers_stay_inside_guest_memory() {
    stress(
        "concurrent_rewrites_of_rings_and_headers_stay_inside_guest_memory",
        false,
    );
}

/// Descriptors may also aim at pair A's own rings, so RX frames land on its avail and used rings
/// (vring class G2): pair A destroys itself, which only weakens what its rings can tell. RX may
/// then find its avail index out of range (broken, allowed only when that index was rewritten
/// during the call); everything else must hold.
#[test]
fn descriptors_aimed_at_their_own_rings_only_hurt_that_guest() {
    stress(
        "descriptors_aimed_at_their_own_rings_only_hurt_that_guest",
        true,
    );
}

fn stress(name: &str, aim_at_rings: bool) {
    let t0 = Instant::now();
    let (mem, guards) = guest_memory();
    let stop = Arc::new(AtomicBool::new(false));
    let mutations = Arc::new(AtomicU64::new(0));

    // Pair A's rings, as the mutator sees them: (desc, avail, used).
    let a_tx = ring_at(&mem, A_TX_RING);
    let a_rx = ring_at(&mem, A_RX_RING);
    let a_rings = vec![
        (a_tx.layout.desc, a_tx.layout.avail, a_tx.layout.used),
        (a_rx.layout.desc, a_rx.layout.avail, a_rx.layout.used),
    ];
    // Start from plausible chains so the early rounds are not all trivially rejected.
    for i in 0..QSIZE {
        let addr = A_DATA + u64::from(i) * 2048;
        a_tx.write_desc(i, addr, 1000, 0, 0);
        a_rx.write_desc(i, addr + 0x8_0000, 1600, WRITE, 0);
    }
    for ring in [&a_tx, &a_rx] {
        for s in 0..QSIZE {
            let slot = ring.layout.avail + 4 + 2 * u64::from(s);
            mem.write_obj(s.to_le(), GuestAddress(slot)).unwrap();
        }
    }

    let mutator = {
        let (mem, stop, count) = (mem.clone(), stop.clone(), mutations.clone());
        thread::spawn(move || {
            let mut r = Rng::seeded(1);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    mutate(&mem, &a_rings, &mut r, aim_at_rings);
                }
                n += 64;
            }
            count.store(n, Ordering::Relaxed);
        })
    };

    // Pair A's TX host side: drain and check what the kernel copied.
    let a_tx_host = host_queue();
    let a_rx_host = host_queue();
    // Set once pair A's loop has returned: every frame it wrote is then in the socket.
    let a_done = Arc::new(AtomicBool::new(false));
    let tx_drain = {
        let (host, stop) = (a_tx_host.clone(), a_done.clone());
        thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 17];
            let (mut n, mut longest) = (0u64, 0usize);
            loop {
                match host.peer().recv(&mut buf) {
                    Ok(len) => {
                        assert!(
                            (HDR..=HDR + 65550).contains(&len),
                            "a {len}-byte TX frame reached the host"
                        );
                        n += 1;
                        longest = longest.max(len);
                    }
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Err(_) => thread::sleep(Duration::from_micros(50)),
                }
            }
            (n, longest)
        })
    };

    let pair_a = {
        let (mem, stop) = (mem.clone(), stop.clone());
        let (txh, rxh) = (a_tx_host.clone(), a_rx_host.clone());
        thread::spawn(move || {
            let mut r = Rng::seeded(2);
            let (mut a_tx, mut a_rx) = (a_tx, a_rx);
            let (mut txq, mut rxq) = (a_tx.create_queue_event_idx(), a_rx.create_queue_event_idx());
            let stats = QueueStats::default();
            let (mut txs, mut rxs) = (TxScratch::new(), RxScratch::new());
            let mut rep = AReport::default();
            let tx_opts = TxOptions::new(VERSION_1, 64);
            while !stop.load(Ordering::Relaxed) {
                // Announce up to a ring's worth of chains (the mutator decides what they are).
                let k = 1 + r.below(u64::from(QSIZE)) as u16;
                a_tx.set_avail_idx(txq.next_avail().wrapping_add(k));
                let (before, na) = (stats.snapshot(), txq.next_avail());
                let out = process_tx(&mut txq, &mem, &*txh, &stats, &mut txs, &tx_opts);
                let after = stats.snapshot();
                assert!(!out.broken, "TX declared broken with a sane avail index");
                assert_eq!(
                    tx_consumed(&after) - tx_consumed(&before),
                    u64::from(txq.next_avail().wrapping_sub(na)),
                    "every consumed TX chain is counted exactly once"
                );
                rep.tx_blocked += u64::from(out.blocked);
                for len in used_lengths(&mut a_tx, aim_at_rings, "TX") {
                    assert_eq!(len, 0, "TX used length");
                    rep.tx_used += 1;
                }
                rep.tx_calls += 1;

                // RX: frames of any size from the host, then buffers the mutator controls.
                for _ in 0..r.below(8) {
                    let len = match r.below(10) {
                        0 => r.below(HDR as u64) as usize,
                        1 => RX_HOST_MAX,
                        _ => HDR + 14 + r.below(1500) as usize,
                    };
                    if rxh.peer().send(&vec![0x33; len]).is_ok() {
                        rep.rx_injected += 1;
                    }
                }
                let mrg = r.below(2) == 0;
                let feats = VERSION_1 | if mrg { MRG_RXBUF } else { 0 };
                let rx_opts = RxOptions::new(feats, 1500, 64);
                let k = 1 + r.below(u64::from(QSIZE)) as u16;
                let rx_avail = rxq.next_avail().wrapping_add(k);
                a_rx.set_avail_idx(rx_avail);
                let out = process_rx(&mut rxq, &mem, &*rxh, &stats, &mut rxs, &rx_opts, None);
                if out.broken {
                    // Legitimate only if the guest made us overwrite its own avail index: an RX
                    // descriptor aimed at the ring, written by our readv. Nothing else in this
                    // test writes that index during a call.
                    assert!(aim_at_rings, "RX declared broken with a sane avail index");
                    assert_ne!(
                        a_rx.avail_idx(),
                        rx_avail,
                        "RX declared broken while the avail index stayed sane"
                    );
                    rep.rx_broken_by_guest += 1;
                }
                for len in used_lengths(&mut a_rx, aim_at_rings, "RX") {
                    // The fake host may hand over frames up to RX_HOST_MAX bytes (a real tap
                    // stays within max_frame_len); a used length can never exceed what was read.
                    assert!(len as usize <= RX_HOST_MAX, "RX used length {len}");
                    rep.rx_used += 1;
                }
                rep.rx_calls += 1;
            }
            rep.stats = stats.snapshot();
            rep
        })
    };

    // Pair B: well-formed traffic, checked byte for byte, on its own thread.
    let pair_b = {
        let (mem, stop) = (mem.clone(), stop.clone());
        thread::spawn(move || {
            let (mut b_tx, mut b_rx) = (ring_at(&mem, B_TX_RING), ring_at(&mem, B_RX_RING));
            let (mut txq, mut rxq) = (b_tx.create_queue_event_idx(), b_rx.create_queue_event_idx());
            let (txh, rxh) = (host_queue(), host_queue());
            let stats = QueueStats::default();
            let (mut txs, mut rxs) = (TxScratch::new(), RxScratch::new());
            let tx_opts = TxOptions::new(VERSION_1, 64);
            let rx_opts = RxOptions::new(VERSION_1, 1500, 64);
            let mut seq = 0u64;
            let mut buf = vec![0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                // TX: a batch of frames, each must reach the host intact.
                let mut sent = Vec::new();
                for i in 0..B_BATCH {
                    let f = b_frame(seq, 60 + (seq as usize * 37) % 1400);
                    seq += 1;
                    let addr = B_TX_BUFS + u64::from(i) * B_BUF;
                    mem.write_slice(&[0u8; HDR], GuestAddress(addr)).unwrap();
                    mem.write_slice(&f, GuestAddress(addr + HDR as u64))
                        .unwrap();
                    b_tx.write_desc(i, addr, (HDR + f.len()) as u32, 0, 0);
                    b_tx.publish(i);
                    sent.push(f);
                }
                let out = process_tx(&mut txq, &mem, &*txh, &stats, &mut txs, &tx_opts);
                assert_eq!(out.frames, usize::from(B_BATCH), "pair B TX: {out:?}");
                for f in &sent {
                    let n = txh.peer().recv(&mut buf).expect("pair B frame on the host");
                    assert_eq!(&buf[HDR..n], &f[..], "pair B TX frame altered");
                }
                let used = b_tx.take_used();
                assert_eq!(used.len(), usize::from(B_BATCH));

                // RX: buffers, then frames from the host, each must reach the guest intact.
                for i in 0..B_BATCH {
                    let addr = B_RX_BUFS + u64::from(i) * B_BUF;
                    b_rx.write_desc(i, addr, B_BUF as u32, WRITE, 0);
                    b_rx.publish(i);
                }
                let mut want = Vec::new();
                for _ in 0..B_BATCH {
                    let f = b_frame(seq, 60 + (seq as usize * 53) % 1400);
                    seq += 1;
                    let mut pkt = vec![0u8; HDR];
                    pkt.extend_from_slice(&f);
                    rxh.peer().send(&pkt).unwrap();
                    want.push(f);
                }
                let out = process_rx(&mut rxq, &mem, &*rxh, &stats, &mut rxs, &rx_opts, None);
                assert_eq!(out.frames, usize::from(B_BATCH), "pair B RX: {out:?}");
                let used = b_rx.take_used();
                assert_eq!(used.len(), usize::from(B_BATCH));
                for ((id, len), f) in used.iter().zip(&want) {
                    assert_eq!(*len as usize, HDR + f.len());
                    let mut got = vec![0u8; *len as usize];
                    let addr = B_RX_BUFS + u64::from(*id) * B_BUF;
                    mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
                    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
                    assert_eq!(&got[HDR..], &f[..], "pair B RX frame altered");
                }
            }
            let s = stats.snapshot();
            (seq, s)
        })
    };

    thread::sleep(RUN_FOR);
    stop.store(true, Ordering::Relaxed);
    // Every loop must come back: a hang here is a failure, not a slow test.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(pair_a.is_finished() && pair_b.is_finished()) {
        assert!(Instant::now() < deadline, "a datapath loop did not return");
        thread::sleep(Duration::from_millis(10));
    }
    let a = pair_a.join().expect("pair A loop panicked");
    a_done.store(true, Ordering::Relaxed);
    let (b_frames, b) = pair_b.join().expect("pair B loop panicked");
    mutator.join().unwrap();
    let (a_host_frames, longest) = tx_drain.join().expect("TX drain");

    let damaged: Vec<(usize, Vec<usize>)> = guards
        .iter()
        .enumerate()
        .map(|(i, g)| (i, g.damaged_guards()))
        .filter(|(_, d)| !d.is_empty())
        .collect();
    assert!(
        damaged.is_empty(),
        "host memory next to guest regions was written: {damaged:?}"
    );
    let mut canary = vec![0u8; CANARY_LEN];
    mem.read_slice(&mut canary, GuestAddress(CANARY)).unwrap();
    let hit = canary.iter().position(|&b| b != CANARY_BYTE);
    assert!(
        hit.is_none(),
        "pair A wrote into pair B's region at {:#x}",
        CANARY + hit.unwrap_or(0) as u64
    );
    assert_eq!(harm(&b), 0, "pair B was affected: {b:?}");
    assert_eq!(a.stats.queue_broken, a.rx_broken_by_guest, "{:?}", a.stats);
    assert!(a.tx_calls > 100 && a.rx_calls > 100, "{a:?}");
    assert_eq!(
        a_host_frames, a.stats.tx_frames,
        "frames counted vs frames written"
    );
    if !aim_at_rings {
        assert!(a.tx_used > 0 && a.rx_used > 0, "{a:?}");
    }
    assert!(b_frames > 0);

    let s = &a.stats;
    println!(
        "{name}: {:.1?}, {} \
         mutations; pair A {} TX + {} RX calls: tx_frames {} (host got {a_host_frames}, longest \
         {longest} B) bad_chain {} too_short {} too_big {} host_error {} eagain {}; rx_frames {} \
         of {} injected, bad_chain {} too_small {} host_error {}, broken by its own writes \
         into the ring {}; used TX {} RX {}; pair B {} \
         frames byte-exact, no drop; guards and canary intact",
        t0.elapsed(),
        mutations.load(Ordering::Relaxed),
        a.tx_calls,
        a.rx_calls,
        s.tx_frames,
        s.tx_drop_bad_chain,
        s.tx_drop_too_short,
        s.tx_drop_too_big,
        s.tx_drop_host_error,
        s.tx_eagain,
        s.rx_frames,
        a.rx_injected,
        s.rx_drop_bad_chain,
        s.rx_drop_buffer_too_small,
        s.rx_drop_host_error,
        a.rx_broken_by_guest,
        a.tx_used,
        a.rx_used,
        b_frames,
    );
}

// ---------------------------------------------------------------------------------------------
// The same through the real backend: per-pair worker threads behind a vhost-user socket
// ---------------------------------------------------------------------------------------------

/// The whole backend (serve loop, per-pair workers, fake host queues; `support::rig`) with two
/// queue pairs. Pair 0's guest keeps announcing chains and kicking both queues while a mutator
/// rewrites pair 0's descriptors, avail entries and buffers; pair 1 carries frames both ways,
/// each checked byte for byte, the whole time. Afterwards pair 1's counters are clean, and a new
/// connection gets a working pair 0 (whatever pair 0's guest broke stays with that connection).
#[test]
fn worker_keeps_other_pairs_intact_while_a_guest_rewrites_its_rings() {
    use support::rig::{frame, tx_one_and_check, Rig, ALL};
    use support::vu_driver::{VuGuest, HDR_LEN, MEM_SIZE};

    let t0 = Instant::now();
    let rig = Rig::start(2);
    let mut g = rig.guest(2, ALL);
    // Pair 0 = vrings 0 (RX) and 1 (TX); its buffers end where pair 1's begin.
    let (a_lo, a_hi) = (g.rings[0].bufs, g.rings[2].bufs);
    let a_rings: Vec<(u64, u64, u16)> = (0..2)
        .map(|q| {
            (
                g.rings[q].layout.desc,
                g.rings[q].layout.avail,
                g.rings[q].layout.size,
            )
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mutator = {
        let (mem, stop) = (g.mem.clone(), stop.clone());
        let rings = a_rings.clone();
        thread::spawn(move || {
            let mut r = Rng::seeded(3);
            let mut n = 0u64;
            let addr = |r: &mut Rng| match r.below(6) {
                0..=3 => a_lo + r.below(a_hi - a_lo),
                4 => MEM_SIZE as u64 + r.below(1 << 40),
                _ => u64::MAX - r.below(1 << 33),
            };
            while !stop.load(Ordering::Relaxed) {
                let (desc, avail, size) = rings[r.below(2) as usize];
                match r.below(4) {
                    0 | 1 => {
                        let d = raw_desc(
                            addr(&mut r),
                            hostile_len(&mut r),
                            hostile_flags(&mut r),
                            r.below(u64::from(size) + 4) as u16,
                        );
                        let at = desc + 16 * r.below(u64::from(size));
                        mem.write_obj(d, GuestAddress(at)).unwrap();
                    }
                    2 => {
                        let at = avail + 4 + 2 * r.below(u64::from(size));
                        let head = r.below(u64::from(size) + 8) as u16;
                        mem.write_obj(head, GuestAddress(at)).unwrap();
                    }
                    _ => {
                        let at = a_lo + r.below(a_hi - a_lo - 16);
                        mem.write_obj(r.next(), GuestAddress(at)).unwrap();
                    }
                }
                n += 1;
            }
            n
        })
    };

    rig.peers[0].set_nonblocking(true).unwrap();
    // The mutator keeps a core busy: give pair 1 room on a loaded machine.
    let patience = Duration::from_secs(10);
    rig.peers[1].set_read_timeout(Some(patience)).unwrap();
    let mut r = Rng::seeded(4);
    let mut buf = vec![0u8; 1 << 17];
    let (mut b_tx, mut b_rx, mut a_out) = (0u32, 0u32, 0u64);
    g.post_rx(1, 128, 2048);
    g.kick(g.rx(1));
    let until = Instant::now() + RUN_FOR;
    while Instant::now() < until {
        // Pair 0: announce more chains without ever running more than a ring ahead of the
        // device (avail_event, EVENT_IDX, trails its next_avail), kick, feed and drain its host.
        for q in 0..2 {
            let ring = &g.rings[q];
            let (size, avail_idx) = (ring.layout.size, ring.avail_idx());
            let ahead = avail_idx.wrapping_sub(ring.avail_event());
            if ahead < size {
                let j = 1 + r.below(u64::from(size - ahead)) as u16;
                let idx = avail_idx.wrapping_add(j);
                g.set_avail_idx(q, idx);
            }
            g.kick(q);
        }
        for _ in 0..4 {
            let mut pkt = vec![0u8; HDR_LEN];
            pkt.extend_from_slice(&frame(0, 60 + r.below(1400) as usize));
            let _ = rig.peers[0].send(&pkt);
        }
        while let Ok(n) = rig.peers[0].recv(&mut buf) {
            assert!((HDR_LEN..=HDR_LEN + 65550).contains(&n), "{n}-byte frame");
            a_out += 1;
        }

        // Pair 1: one frame each way, byte-exact.
        let f = frame(b_tx, 60 + (b_tx as usize * 37) % 1400);
        assert!(g.send(1, &f), "pair 1 TX ring full");
        g.kick(g.tx(1));
        let n = rig.peers[1]
            .recv(&mut buf)
            .expect("pair 1 frame on the host");
        assert_eq!(&buf[HDR_LEN..n], &f[..], "pair 1 TX frame {b_tx} altered");
        assert!(g.wait_until(patience, |g| !g.take_used(g.tx(1)).is_empty()));
        b_tx += 1;
        let f = frame(1 << 20 | b_rx, 60 + (b_rx as usize * 53) % 1400);
        let mut pkt = vec![0u8; HDR_LEN];
        pkt.extend_from_slice(&f);
        rig.peers[1].send(&pkt).unwrap();
        let mut got = Vec::new();
        assert!(
            g.wait_until(patience, |g| {
                got.extend(g.recv_frames(1));
                !got.is_empty()
            }),
            "pair 1 RX frame {b_rx} never arrived"
        );
        assert_eq!(got, vec![f], "pair 1 RX frame {b_rx} altered");
        g.post_rx(1, 1, 2048);
        g.kick(g.rx(1));
        b_rx += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mutations = mutator.join().unwrap();
    let (a, b) = (rig.stats[0].snapshot(), rig.stats[1].snapshot());
    assert_eq!(b.tx_frames, u64::from(b_tx), "{b:?}");
    assert_eq!(b.rx_frames, u64::from(b_rx), "{b:?}");
    assert_eq!(harm(&b), 0, "pair 1 was affected: {b:?}");
    // Per round pair 0 gets two kicks and four host frames: a few wake-ups each, never a spin
    // (a broken RX ring with host frames pending used to wake it about a million times a second).
    assert!(
        a.wakeups <= 10 * u64::from(b_tx) + 1000,
        "pair 0 woke {} times in {b_tx} rounds",
        a.wakeups
    );

    // A new connection: pair 0 is fresh and works.
    drop(g);
    // The backend serves one connection at a time: once this one is up, the old workers are
    // gone and nothing stale can still reach the host queue.
    let mut g2: VuGuest = rig.guest(2, ALL);
    while rig.peers[0].recv(&mut buf).is_ok() {}
    rig.peers[0].set_nonblocking(false).unwrap();
    tx_one_and_check(&rig, &mut g2, 7);
    println!(
        "worker_keeps_other_pairs_intact_while_a_guest_rewrites_its_rings: {:.1?}, {mutations} \
         mutations; pair 0: tx_frames {} (host got {a_out}) bad_chain {} too_short {} too_big \
         {}, rx_frames {} bad_chain {} too_small {}, queue_broken {}, wake-ups {}; pair 1: {b_tx} \
         TX + {b_rx} RX frames byte-exact, no drop; new connection: pair 0 works",
        t0.elapsed(),
        a.tx_frames,
        a.tx_drop_bad_chain,
        a.tx_drop_too_short,
        a.tx_drop_too_big,
        a.rx_frames,
        a.rx_drop_bad_chain,
        a.rx_drop_buffer_too_small,
        a.queue_broken,
        a.wakeups,
    );
}

/// Worker wake-ups of pair `i` during `window`.
fn wakeups_over(rig: &support::rig::Rig, i: usize, window: Duration) -> u64 {
    let w0 = rig.stats[i].snapshot().wakeups;
    thread::sleep(window);
    rig.stats[i].snapshot().wakeups - w0
}

/// When nothing will read the host queue (the guest broke its RX ring, or RX is disabled while
/// TX stays enabled), frames waiting on the host fd must not keep waking the worker: epoll is
/// level-triggered, so a still-watched readable fd would spin it at full speed. RX must be
/// watched again once the ring is usable (re-enabled), and TX must keep working throughout.
#[test]
fn host_frames_nobody_can_receive_do_not_spin_the_worker() {
    use support::rig::{frame, tx_one_and_check, Rig, ALL};
    use support::vu_driver::HDR_LEN;
    use vhost::vhost_user::VhostUserFrontend;

    let rig = Rig::start(1);
    let inject = |n: u32| {
        for seq in 0..n {
            let mut pkt = vec![0u8; HDR_LEN];
            pkt.extend_from_slice(&frame(seq, 100));
            rig.peers[0].send(&pkt).unwrap();
        }
    };

    // 1. RX ring broken by the guest (avail index a ring and more ahead), frames pending.
    let mut g = rig.guest(1, ALL);
    g.post_rx(0, 8, 2048);
    g.set_avail_idx(g.rx(0), 1000);
    g.kick(g.rx(0));
    assert!(support::rig::eventually(|| rig.stats[0]
        .snapshot()
        .queue_broken
        == 1));
    inject(8);
    let broken = wakeups_over(&rig, 0, Duration::from_millis(500));
    tx_one_and_check(&rig, &mut g, 1);
    drop(g);

    // 2. RX disabled, TX enabled, frames pending; then RX enabled again and buffers posted.
    let mut g = rig.guest(1, ALL);
    g.frontend
        .set_vring_enable(g.rx(0), false)
        .expect("disable RX");
    thread::sleep(Duration::from_millis(50));
    inject(8);
    let disabled = wakeups_over(&rig, 0, Duration::from_millis(500));
    tx_one_and_check(&rig, &mut g, 2);
    g.frontend
        .set_vring_enable(g.rx(0), true)
        .expect("enable RX");
    g.post_rx(0, 64, 2048);
    g.kick(g.rx(0));
    let mut got = 0;
    assert!(
        g.wait_until(Duration::from_secs(5), |g| {
            got += g.recv_frames(0).len();
            got >= 8 + 8
        }),
        "RX not served after re-enabling: {got} frames"
    );
    println!(
        "host_frames_nobody_can_receive_do_not_spin_the_worker: wake-ups in 500 ms with frames \
         pending: RX ring broken {broken}, RX disabled {disabled}; after re-enabling RX {got} \
         frames delivered"
    );
    assert!(
        broken <= 4,
        "{broken} wake-ups in 500 ms with the RX ring broken"
    );
    assert!(
        disabled <= 4,
        "{disabled} wake-ups in 500 ms with RX disabled"
    );
}
