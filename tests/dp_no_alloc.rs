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
    tx_no_alloc(TxScratch::new);
}

fn tx_no_alloc(new_scratch: impl Fn() -> TxScratch) {
    for size in [64, 1500, 65536] {
        let mem = memory();
        let mut ring = SplitRing::at(&mem, 0, 256).without_ledger();
        fill::fill_tx(&mut ring, DATA, HDR, &frame(size, 1), 256);
        let mut q = ring.create_queue_event_idx();
        let host = FakeHostQueue::new();
        let stats = QueueStats::default();
        let mut scratch = new_scratch();
        let opts = TxOptions {
            hdr_len: HDR,
            budget: BUDGET,
        };
        let mut sink = vec![0u8; 1 << 17];
        let mut tally = Tally::default();
        while !tally.done() {
            let (out, n) = counted(|| process_tx(&mut q, &mem, &host, &stats, &mut scratch, &opts));
            assert!(out.frames > 0 && !out.broken, "{out:?}");
            tally.add(out.frames, n);
            for _ in 0..out.frames {
                assert_eq!(host.peer().recv(&mut sink).unwrap(), HDR + size);
            }
            ring.recycle();
        }
        tally.assert_none(&format!("TX {size} B"));
        let s = stats.snapshot();
        assert_eq!(s.tx_frames, tally.frames as u64);
        assert_eq!(s.tx_drop_host_error + s.tx_drop_bad_chain, 0, "{s:?}");
    }
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
