//! No heap allocation per frame in steady state: a counting global allocator watches
//! `process_tx` / `process_rx` move 10,000 frames each way (after a warm-up that lets the
//! scratch buffers reach their working size) and must see zero allocations.
//!
//! Only allocations made on the test's own thread while the datapath runs are counted (a
//! thread-local switch), so the harness and the guest/host stand-ins around the calls do not
//! count. Runs without root and without features.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use macvhost::datapath::vnet::{MAX_GSO_FRAME_LEN, VNET_HDR_LEN_V1};
use macvhost::datapath::{
    process_rx, process_tx, QueueStats, RxOptions, RxScratch, TxOptions, TxScratch,
};
use macvhost::testkit::ring::{fill, SplitRing};
use macvhost::testkit::{memory_of, FakeHostQueue};
use vm_memory::GuestMemoryMmap;

struct Counting;

thread_local! {
    /// Counting is on for this thread.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    /// Allocations this thread made while counting (tests run on parallel threads).
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the allocator may run while thread-locals are being torn down.
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` with allocation counting on; returns its result and the allocations it made.
fn counted<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCS.with(Cell::get);
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    (r, ALLOCS.with(Cell::get) - before)
}

const HDR: usize = VNET_HDR_LEN_V1;
const FRAMES: usize = 10_000;
const WARMUP: usize = 1_000;
const BUDGET: usize = 64;
const DATA: u64 = 1 << 20;

/// Allocations counted once the warm-up is over.
#[derive(Default)]
struct Tally {
    frames: usize,
    allocs: usize,
}

impl Tally {
    /// One datapath call moved `frames` frames and made `allocs` allocations.
    fn add(&mut self, frames: usize, allocs: usize) {
        if self.frames >= WARMUP {
            self.allocs += allocs;
        }
        self.frames += frames;
    }

    fn done(&self) -> bool {
        self.frames >= WARMUP + FRAMES
    }

    fn assert_none(&self, what: &str) {
        let n = self.allocs;
        assert_eq!(n, 0, "{what}: {n} allocations over {FRAMES} frames");
    }
}

fn memory() -> GuestMemoryMmap {
    // Two adjacent regions, so some buffers straddle a boundary and take two iovecs.
    memory_of(&[(0, 8 << 20), (8 << 20, 8 << 20)])
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..HDR + len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

#[test]
fn tx_allocates_nothing_per_frame() {
    for size in [64, 1500, 65536] {
        tx_no_alloc(&format!("TX {size} B"), TxScratch::new(), &[frame(size, 1)]);
    }
}

/// Sends the `frames` (each behind its vnet header, posted round-robin until the ring is full,
/// then recycled as a guest does) through `process_tx` with `scratch` until [`FRAMES`] went
/// out after the warm-up, and asserts no allocation.
fn tx_no_alloc(what: &str, mut scratch: TxScratch, frames: &[Vec<u8>]) {
    let mem = memory();
    let mut ring = SplitRing::at(&mem, 0, 256).without_ledger();
    // The host-side length of each posted chain, in ring order (the order they go out in).
    let mut lens = Vec::new();
    let mut addr = DATA;
    for f in frames.iter().cycle() {
        if fill::fill_tx(&mut ring, addr, HDR, f, 1) == 0 {
            break;
        }
        lens.push(f.len());
        addr += fill::tx_footprint(f.len() - HDR);
    }
    let mut q = ring.create_queue_event_idx();
    let host = FakeHostQueue::new();
    let stats = QueueStats::default();
    let opts = TxOptions {
        hdr_len: HDR,
        budget: BUDGET,
    };
    let mut sink = vec![0u8; 1 << 17];
    let mut tally = Tally::default();
    while !tally.done() {
        let (out, n) = counted(|| process_tx(&mut q, &mem, &host, &stats, &mut scratch, &opts));
        assert!(out.frames > 0 && !out.broken, "{what}: {out:?}");
        for k in tally.frames..tally.frames + out.frames {
            assert_eq!(host.peer().recv(&mut sink).unwrap(), lens[k % lens.len()]);
        }
        tally.add(out.frames, n);
        ring.recycle();
    }
    tally.assert_none(what);
    let s = stats.snapshot();
    assert_eq!(s.tx_frames, tally.frames as u64);
    assert_eq!(
        s.tx_drop_host_error + s.tx_drop_bad_chain,
        0,
        "{what}: {s:?}"
    );
}

/// The same TX path with the multicast watch installed as a connection installs it
/// ([`GuestL2::watch`](macvhost::worker::l2::GuestL2::watch)): every frame's MACs are read,
/// multicast frames copied, parsed and learned into the real membership table, and each diff
/// applied to a recording filter sink. The guest sends unicast (small, full-size, GSO-sized,
/// one from a MAC not its own) mixed with IGMPv2/v3 and MLDv1/v2 joins and leaves, more groups
/// than the cap (refusals and allmulticast), so every cycle adds and removes groups.
#[cfg(feature = "test-utils")]
#[test]
fn tx_with_the_multicast_watch_allocates_nothing_per_frame() {
    use std::sync::{Arc, Mutex};

    use macvhost::datapath::mcast::frames::{self, Record};
    use macvhost::datapath::mcast::{Diff, TableConfig};
    use macvhost::datapath::tx::SharedMac;
    use macvhost::host::mcfilter::McFilterError;
    use macvhost::worker::l2::{FilterSink, GuestL2, L2Stats};

    /// What the macvtap's filter would hold, in room reserved up front (the sink runs inside
    /// the counted datapath call).
    #[derive(Debug)]
    struct Recording {
        macs: Vec<[u8; 6]>,
        allmulti: bool,
        applied: usize,
    }

    impl FilterSink for Recording {
        fn apply(&mut self, diff: &Diff) -> Result<(), McFilterError> {
            self.macs.retain(|m| !diff.remove.contains(m));
            for m in &diff.add {
                assert!(!self.macs.contains(m), "added twice: {m:02x?}");
                assert!(self.macs.len() < self.macs.capacity(), "past the cap");
                self.macs.push(*m);
            }
            if let Some(on) = diff.allmulti {
                self.allmulti = on;
            }
            self.applied += 1;
            Ok(())
        }
    }

    let cap = 8;
    let filter = Arc::new(Mutex::new(Recording {
        macs: Vec::with_capacity(cap),
        allmulti: false,
        applied: 0,
    }));
    let stats = Arc::new(L2Stats::default());
    let l2 = GuestL2::new(
        TableConfig {
            max_groups: cap,
            ..TableConfig::default()
        },
        Some(filter.clone()),
        Arc::new(SharedMac::new(frames::GUEST_MAC)),
        stats.clone(),
    )
    .unwrap();
    let mut scratch = TxScratch::new();
    scratch.set_watch(Some(l2.watch()));

    // IGMPv3 CHANGE_TO_EXCLUDE({}) joins / CHANGE_TO_INCLUDE({}) leaves (RFC 3376 4.2.12).
    let (to_ex, to_in) = (4, 3);
    let v4 = |i: u8| frames::v4(239, 9, 0, i);
    let v6 = |i: u16| frames::v6(&format!("ff05::9:{i:x}"));
    let igmpv3 = |t, groups: &[u8]| {
        let recs: Vec<Record> = groups.iter().map(|&g| Record::new(t, v4(g), 0)).collect();
        frames::igmpv3_report(&recs, None)
    };
    let mldv2 = |t, groups: &[u16]| {
        let recs: Vec<Record> = groups.iter().map(|&g| Record::new(t, v6(g), 0)).collect();
        frames::mldv2_report(&recs, true, None)
    };
    let mut foreign = frames::unicast_udp(1514);
    foreign[6..12].copy_from_slice(&[0x02, 0x6d, 0x76, 0x68, 0xee, 0xee]);
    let mix = [
        frames::unicast_udp(1514),
        igmpv3(to_ex, &[1, 2, 3, 4]),
        frames::unicast_udp(64),
        mldv2(to_ex, &[1, 2, 3, 4, 5]),
        frames::unicast_udp(1514),
        frames::igmp_v2(0x16, v4(10), None),
        frames::mld_v1(131, v6(10), None),
        frames::unicast_udp(9000),
        frames::igmp_v2(0x17, v4(10), None),
        foreign,
        frames::mld_v1(132, v6(10), None),
        igmpv3(to_in, &[2, 4]),
        mldv2(to_in, &[1, 3, 5]),
        frames::unicast_udp(65536),
    ];
    let mix: Vec<Vec<u8>> = mix
        .into_iter()
        .map(|f| [vec![0u8; HDR], f].concat())
        .collect();
    tx_no_alloc("TX with the multicast watch", scratch, &mix);

    let l2s = stats.snapshot();
    let t = l2s.table;
    let rec = filter.lock().unwrap();
    assert_eq!(t.malformed, 0, "{l2s:?}");
    assert!(
        t.reports > (WARMUP + FRAMES) as u64 / 3 && t.joins > 0 && t.leaves > 0,
        "{l2s:?}"
    );
    assert!(
        t.refused_joins > 0 && t.overflows >= 1 && rec.allmulti,
        "{l2s:?}"
    );
    assert_eq!(l2s.guest_mac_changes_seen, 1, "{l2s:?}");
    // The filter holds what the table holds.
    assert_eq!(rec.macs.len(), l2.groups(), "{rec:?}");
    assert!(rec.applied > 1000, "{rec:?}");
}

/// (name, MRG_RXBUF, max frame, buffer length, descriptors per chain, queue size, sizes)
type RxCase = (&'static str, bool, usize, u32, usize, u16, &'static [usize]);

#[test]
fn rx_allocates_nothing_per_frame() {
    let cases: [RxCase; 4] = [
        (
            "nomrg",
            false,
            HDR + 1518,
            (HDR + 1518) as u32,
            1,
            256,
            &[64, 1500],
        ),
        (
            "nomrg_big",
            false,
            HDR + MAX_GSO_FRAME_LEN,
            4096,
            17,
            1024,
            &[64, 65536],
        ),
        ("mrg", true, HDR + 1518, 1536, 1, 256, &[64, 1500]),
        (
            "mrg_gso",
            true,
            HDR + MAX_GSO_FRAME_LEN,
            1536,
            1,
            1024,
            &[64, 1500, 65536],
        ),
    ];
    for (name, mrg, max_frame, buf_len, descs, qsize, sizes) in cases {
        for &size in sizes {
            let mem = memory();
            let mut ring = SplitRing::at(&mem, 0, qsize).without_ledger();
            fill::fill_rx(&mut ring, DATA, buf_len, descs, usize::MAX);
            let mut q = ring.create_queue_event_idx();
            let host = FakeHostQueue::new();
            // Enough room in the socket for a batch of 64 KiB datagrams.
            let sndbuf = nix::sys::socket::sockopt::SndBuf;
            nix::sys::socket::setsockopt(host.peer(), sndbuf, &(8 << 20)).unwrap();
            let stats = QueueStats::default();
            let mut scratch = RxScratch::new();
            let opts = RxOptions {
                hdr_len: HDR,
                mrg_rxbuf: mrg,
                max_frame_len: max_frame,
                budget: BUDGET,
            };
            let f = frame(size, 2);
            let mut tally = Tally::default();
            while !tally.done() {
                for _ in 0..BUDGET {
                    host.peer().send(&f).unwrap();
                }
                let mut left = BUDGET;
                while left > 0 {
                    let (out, n) = counted(|| {
                        process_rx(&mut q, &mem, &host, &stats, &mut scratch, &opts, None)
                    });
                    assert!(!out.broken && out.host_error.is_none(), "{out:?}");
                    tally.add(out.frames, n);
                    left -= out.frames;
                    ring.recycle();
                }
            }
            tally.assert_none(&format!("RX {name} {size} B"));
            let s = stats.snapshot();
            assert_eq!(s.rx_frames, tally.frames as u64);
            assert_eq!(
                s.rx_drop_bad_chain + s.rx_drop_buffer_too_small + s.rx_drop_host_error,
                0
            );
        }
    }
}

#[test]
fn the_counter_sees_an_allocation() {
    let (v, n) = counted(|| std::hint::black_box(vec![1u8; 100]));
    assert_eq!(v.len(), 100);
    assert_eq!(n, 1);
}

/// The guest-TX multicast check allocates nothing per frame: parsing reports and updating the
/// membership table (joins, refreshes, refusals at the cap, leaves, expiry, clear) with a diff
/// built for the table's cap.
#[cfg(feature = "test-utils")]
#[test]
fn mcast_report_learning_allocates_nothing_per_frame() {
    use macvhost::datapath::mcast::frames::{self, Record};
    use macvhost::datapath::mcast::{Diff, MembershipTable, TableConfig, Verdict};
    use std::time::Duration;

    let cap = 128;
    let mut table = MembershipTable::new(TableConfig {
        max_groups: cap,
        ..TableConfig::default()
    });
    let mut diff = Diff::with_capacity(cap);
    // 10 reports of 20 records over 200 groups (more than the cap); every fifth record leaves
    // a group of the first report (`TO_IN({})`).
    let group = |r: u16, i: u16| frames::v6(&format!("ff05::{:x}", r * 20 + i));
    let reports: Vec<Vec<u8>> = (0..10u16)
        .map(|r| {
            let recs: Vec<Record> = (0..20u16)
                .map(|i| {
                    if r > 0 && (r + i) % 5 == 0 {
                        Record::new(3, group(0, i), 0)
                    } else {
                        Record::new(4, group(r, i), 0)
                    }
                })
                .collect();
            frames::mldv2_report(&recs, r % 2 == 0, None)
        })
        .collect();
    let unicast = frames::unicast_udp(1514);
    let (_, allocs) = counted(|| {
        let mut now = Duration::ZERO;
        for _ in 0..FRAMES / 100 {
            for r in &reports {
                let v = table.learn(r, r.len(), now, &mut diff);
                assert!(matches!(v, Verdict::Report { .. }));
                table.expire(now, &mut diff);
                diff.clear();
                let v = table.learn(&unicast, unicast.len(), now, &mut diff);
                assert_eq!(v, Verdict::NotMulticast);
                now += Duration::from_secs(30);
            }
            table.expire(now, &mut diff);
            diff.clear();
        }
        table.clear(&mut diff);
    });
    assert_eq!(allocs, 0, "{allocs} allocations");
    let c = table.counters();
    assert!(
        c.joins > 0 && c.leaves > 0 && c.expiries > 0 && c.refused_joins > 0,
        "{c:?}"
    );
}
