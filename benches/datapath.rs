//! Criterion micro-benchmarks of the frame path, without a vhost-user socket or a tap.
//!
//! `cargo bench --bench datapath`
//!
//! Guest memory and the guest's side of each virtqueue come from the test kit
//! (`macvhost::testkit`): its ring driver without the ledger keeps the ring full the way a guest
//! in steady state does (every used chain is reposted at once, `SplitRing::recycle`). One criterion iteration is one
//! `process_tx` / `process_rx` call with the worker's budget (64) plus the guest's repost.
//!
//! Host sides:
//! - `null`: no syscall; TX returns at once, RX copies a template frame into the guest buffers
//!   (the copy the kernel would do). Measures the datapath's own CPU per frame.
//! - `devnull` / `devzero`: one real `writev` to `/dev/null` (no copy) / one `readv` from
//!   `/dev/zero` of exactly the frame length (the kernel fills the guest buffers). Adds the
//!   syscall floor of this machine.
//!
//! Frame sizes are Ethernet bytes behind the 12-byte vnet header: 64, 1500, and 65536 (a GSO
//! frame). RX variants: `nomrg` (one chain per frame: 1530-byte buffers, or 17 × 4 KiB "big
//! packet" chains for GSO), `mrg` (MRG_RXBUF, 1536-byte buffers, MTU-sized max frame) and
//! `mrg_gso` (MRG_RXBUF with GSO acked: every frame needs a window of 43 buffers).
//!
//! `tx/null_watch_unicast`, `tx/null_watch_mcast`: `tx/null` with a TX watch installed (multicast
//! following, `datapath::tx::TxWatch`), every frame unicast from the guest's own MAC / to an IP
//! multicast MAC (copied for the report parser).
//!
//! `mcast`: the guest-TX multicast membership check (`datapath::mcast`), one frame per
//! iteration: the unicast reject (the cost every TX frame would pay), IP multicast that is not a
//! report (a UDP stream, a neighbour solicitation), and reports of 1 and 20 records learned by
//! the membership table (steady state: every group is a refresh).

// `criterion_group!` makes a `pub fn benches` that cannot carry a doc comment.
#![allow(missing_docs)]

use std::fs::File;
use std::hint::black_box;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use macvhost::datapath::tx::{SharedMac, TxWatch};
use macvhost::datapath::vnet::{MAX_GSO_FRAME_LEN, VNET_HDR_LEN_V1};
use macvhost::datapath::{
    process_rx, process_tx, HostQueue, IoVecBuf, QueueStats, RxOptions, RxScratch, TxOptions,
    TxScratch,
};
use macvhost::testkit::ring::{fill, SplitRing};
use macvhost::testkit::{memory_of, pattern_frame};
use vm_memory::GuestMemoryMmap;

const HDR: usize = VNET_HDR_LEN_V1;
/// The worker's per-call budget (`worker::BATCH`).
const BUDGET: usize = macvhost::datapath::BATCH;
const SIZES: [usize; 3] = [64, 1500, 65536];
/// Rings at 0, buffers from 1 MiB, 32 MiB of guest memory in one region.
const DATA: u64 = 1 << 20;
const MEM: usize = 32 << 20;

/// The bench's host queue. TX: `writev` to `/dev/null`, or nothing at all. RX: a frame of
/// `frame.len()` bytes every call, copied in user space or read from `/dev/zero` (exactly the
/// frame's length, so the kernel writes what a tap read would).
struct BenchHost {
    file: File,
    /// The RX frame (empty for a TX bench).
    frame: Vec<u8>,
    syscall: bool,
}

impl BenchHost {
    fn tx(syscall: bool) -> BenchHost {
        let file = File::options().write(true).open("/dev/null").unwrap();
        BenchHost {
            file,
            frame: Vec::new(),
            syscall,
        }
    }

    fn rx(frame: Vec<u8>, syscall: bool) -> BenchHost {
        let file = File::open("/dev/zero").unwrap();
        BenchHost {
            file,
            frame,
            syscall,
        }
    }
}

impl AsRawFd for BenchHost {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl HostQueue for BenchHost {
    fn send_frame(&self, frame: &IoVecBuf<'_>) -> io::Result<usize> {
        if self.syscall {
            macvhost::datapath::iovec::writev_fd(self.file.as_raw_fd(), frame)
        } else {
            Ok(black_box(frame.total_len()))
        }
    }

    fn recv_frame(&self, bufs: &IoVecBuf<'_>) -> io::Result<usize> {
        let want = self.frame.len();
        if want > bufs.total_len() {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        if !self.syscall {
            return Ok(bufs.write_at(0, &self.frame));
        }
        // The iovecs covering exactly `want` bytes, on the stack.
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 64];
        let mut left = want;
        let mut n = 0;
        for iov in bufs.as_iovecs() {
            if left == 0 || n == iovs.len() {
                break;
            }
            let len = iov.iov_len.min(left);
            iovs[n] = libc::iovec {
                iov_base: iov.iov_base,
                iov_len: len,
            };
            left -= len;
            n += 1;
        }
        let cnt = libc::c_int::try_from(n).expect("at most 64 iovecs");
        // SAFETY: every iovec is a prefix of one of `bufs`' segments, which point at mapped,
        // device-writable guest memory for the duration of this call.
        let r = unsafe { libc::readv(self.file.as_raw_fd(), iovs.as_ptr(), cnt) };
        usize::try_from(r).map_err(|_| io::Error::last_os_error())
    }
}

/// Criterion measurement: CPU time of the benchmarking thread (`CLOCK_THREAD_CPUTIME_ID`).
///
/// This machine's two vCPUs are shared with other work; wall time counts the time the thread
/// was descheduled, thread CPU time does not. Set `MACVHOST_BENCH_CLOCK=wall` for wall time.
struct ThreadCpu {
    wall: WallTime,
    use_wall: bool,
}

fn thread_cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Measurement for ThreadCpu {
    type Intermediate = (Duration, std::time::Instant);
    type Value = Duration;
    fn start(&self) -> Self::Intermediate {
        (thread_cpu_now(), std::time::Instant::now())
    }
    fn end(&self, i: Self::Intermediate) -> Duration {
        if self.use_wall {
            i.1.elapsed()
        } else {
            thread_cpu_now() - i.0
        }
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        self.wall.formatter()
    }
}

fn measurement() -> ThreadCpu {
    ThreadCpu {
        wall: WallTime,
        use_wall: std::env::var("MACVHOST_BENCH_CLOCK").as_deref() == Ok("wall"),
    }
}

/// Benchmarks `call` (one datapath call plus the guest's repost; returns the frames it moved)
/// as `id`, `per_call` frames each.
fn bench_calls<M: Measurement>(
    g: &mut BenchmarkGroup<'_, M>,
    id: BenchmarkId,
    per_call: usize,
    mut call: impl FnMut() -> usize,
) {
    g.throughput(Throughput::Elements(per_call as u64));
    g.bench_function(id, |b| {
        b.iter(|| {
            let n = call();
            debug_assert_eq!(n, per_call);
            n
        })
    });
}

/// Frames dropped either way: a bench that drops measures the wrong thing.
fn drops(stats: &QueueStats) -> u64 {
    let s = stats.snapshot();
    s.tx_drop_bad_chain
        + s.tx_drop_too_big
        + s.tx_drop_host_error
        + s.rx_drop_bad_chain
        + s.rx_drop_buffer_too_small
        + s.rx_drop_host_error
}

fn guest() -> GuestMemoryMmap {
    memory_of(&[(0, MEM)])
}

/// One TX benchmark: a full ring of `frame`, `process_tx` into `host` with `scratch` (a TX
/// watch installed or not), the ring refilled after each call. No frame may be dropped; returns
/// the queue's counters for further checks.
fn bench_tx_frame(
    g: &mut BenchmarkGroup<'_, ThreadCpu>,
    id: BenchmarkId,
    frame: &[u8],
    host: &BenchHost,
    mut scratch: TxScratch,
) -> QueueStats {
    let mem = guest();
    let mut ring = SplitRing::at(&mem, 0, 256).without_ledger();
    let posted = fill::fill_tx(&mut ring, DATA, HDR, frame, 256);
    let mut q = ring.create_queue_event_idx();
    let stats = QueueStats::default();
    let opts = TxOptions {
        hdr_len: HDR,
        budget: BUDGET,
    };
    bench_calls(g, id, posted.min(BUDGET), || {
        let n = process_tx(&mut q, &mem, host, &stats, &mut scratch, &opts).frames;
        ring.recycle();
        n
    });
    assert_eq!(drops(&stats), 0);
    stats
}

fn bench_tx(c: &mut Criterion<ThreadCpu>) {
    let mut g = c.benchmark_group("tx");
    for syscall in [false, true] {
        let host_name = if syscall { "devnull" } else { "null" };
        for size in SIZES {
            let id = BenchmarkId::new(host_name, size);
            let frame = pattern_frame(HDR, size, 7);
            bench_tx_frame(
                &mut g,
                id,
                &frame,
                &BenchHost::tx(syscall),
                TxScratch::new(),
            );
        }
    }
    // The TX watch (multicast following, `TxWatch`): the same call with a watch installed.
    // `unicast`: every frame from the guest's own MAC to a unicast MAC — the 12-byte MAC read
    // and two compares each frame pays; `mcast`: every frame to an IP multicast MAC, copied for
    // the report parser (a sink that only looks at it).
    for (name, dst) in [
        ("null_watch_unicast", [0x52, 0x54, 0, 0, 0, 2]),
        ("null_watch_mcast", [0x01, 0x00, 0x5e, 0x01, 0x02, 0x03]),
    ] {
        for size in [64, 1500] {
            let own = [0x52, 0x54, 0, 0, 0, 1];
            let mut frame = pattern_frame(HDR, size, 7);
            frame[HDR..HDR + 6].copy_from_slice(&dst);
            frame[HDR + 6..HDR + 12].copy_from_slice(&own);
            let mut scratch = TxScratch::new();
            scratch.set_watch(Some(TxWatch::new(
                Arc::new(SharedMac::new(own)),
                Box::new(|f, n| {
                    black_box((f.first(), n));
                }),
                Box::new(|m| {
                    black_box(m);
                }),
            )));
            let id = BenchmarkId::new(name, size);
            let stats = bench_tx_frame(&mut g, id, &frame, &BenchHost::tx(false), scratch);
            assert_eq!(stats.snapshot().tx_foreign_src_mac, 0);
        }
    }
    g.finish();
}

/// One RX layout: name, MRG_RXBUF, max frame length, buffer length, descriptors per chain,
/// queue size, and the frame sizes it takes.
struct RxCase {
    name: &'static str,
    mrg: bool,
    max_frame: usize,
    buf_len: u32,
    descs: usize,
    qsize: u16,
    sizes: &'static [usize],
}

const RX_CASES: [RxCase; 4] = [
    RxCase {
        name: "nomrg",
        mrg: false,
        max_frame: HDR + 1518,
        buf_len: (HDR + 1518) as u32,
        descs: 1,
        qsize: 256,
        sizes: &[64, 1500],
    },
    RxCase {
        name: "nomrg_big",
        mrg: false,
        max_frame: HDR + MAX_GSO_FRAME_LEN,
        buf_len: 4096,
        descs: 17,
        qsize: 1024,
        sizes: &[64, 1500, 65536],
    },
    RxCase {
        name: "mrg",
        mrg: true,
        max_frame: HDR + 1518,
        buf_len: 1536,
        descs: 1,
        qsize: 256,
        sizes: &[64, 1500],
    },
    RxCase {
        name: "mrg_gso",
        mrg: true,
        max_frame: HDR + MAX_GSO_FRAME_LEN,
        buf_len: 1536,
        descs: 1,
        qsize: 1024,
        sizes: &[64, 1500, 65536],
    },
];

fn bench_rx(c: &mut Criterion<ThreadCpu>) {
    let mut g = c.benchmark_group("rx");
    for case in &RX_CASES {
        for syscall in [false, true] {
            let host_name = if syscall { "devzero" } else { "null" };
            for &size in case.sizes {
                let host = BenchHost::rx(pattern_frame(HDR, size, 9), syscall);
                let opts = RxOptions {
                    hdr_len: HDR,
                    mrg_rxbuf: case.mrg,
                    max_frame_len: case.max_frame,
                    budget: BUDGET,
                };
                let (stats, mut scratch) = (QueueStats::default(), RxScratch::new());
                let mem = guest();
                let mut ring = SplitRing::at(&mem, 0, case.qsize).without_ledger();
                fill::fill_rx(&mut ring, DATA, case.buf_len, case.descs, usize::MAX);
                let mut q = ring.create_queue_event_idx();
                // Warm up and learn how many frames one call moves in steady state.
                let mut per_call = 0;
                for _ in 0..4 {
                    per_call =
                        process_rx(&mut q, &mem, &host, &stats, &mut scratch, &opts, None).frames;
                    ring.recycle();
                }
                assert!(per_call > 0, "{} {size}: no frame per call", case.name);
                let id = BenchmarkId::new(format!("{}/{host_name}", case.name), size);
                bench_calls(&mut g, id, per_call, || {
                    let out = process_rx(&mut q, &mem, &host, &stats, &mut scratch, &opts, None);
                    ring.recycle();
                    out.frames
                });
                assert_eq!(drops(&stats), 0);
            }
        }
    }
    g.finish();
}

fn bench_mcast(c: &mut Criterion<ThreadCpu>) {
    use macvhost::datapath::mcast::frames::{self, Record};
    use macvhost::datapath::mcast::{parse_report, Diff, MembershipTable, TableConfig, COPY_LEN};

    let mut g = c.benchmark_group("mcast");
    g.throughput(Throughput::Elements(1));
    // Not reports: the verdict only.
    let mut udp = frames::igmp_v2(0x16, frames::v4(239, 1, 1, 1), None);
    udp[14 + 9] = 17;
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0x56]);
    let ns = frames::ipv6_icmp(frames::v6("ff02::1:ff12:3456"), ns, false, None);
    let cases: [(&str, Vec<u8>); 3] = [
        ("unicast_reject", frames::unicast_udp(1514)),
        ("multicast_udp", udp),
        ("neighbour_solicitation", ns),
    ];
    for (name, f) in &cases {
        let copy = &f[..f.len().min(COPY_LEN)];
        g.bench_function(*name, |b| {
            b.iter(|| {
                parse_report(black_box(copy), black_box(f.len()), |m| {
                    black_box(m);
                })
            })
        });
    }
    // Reports, learned by a table that already holds their groups.
    let v4 = |n: u8| -> Vec<Record> {
        (0..n)
            .map(|i| Record::new(2, frames::v4(239, 0, 0, i), 0))
            .collect()
    };
    let v6 = |n: u8| -> Vec<Record> {
        (0..n)
            .map(|i| Record::new(2, frames::v6(&format!("ff02::1:ff00:{i:x}")), 0))
            .collect()
    };
    let reports: [(&str, Vec<u8>); 4] = [
        ("igmpv3_report/1", frames::igmpv3_report(&v4(1), None)),
        ("igmpv3_report/20", frames::igmpv3_report(&v4(20), None)),
        ("mldv2_report/1", frames::mldv2_report(&v6(1), true, None)),
        ("mldv2_report/20", frames::mldv2_report(&v6(20), true, None)),
    ];
    for (name, f) in &reports {
        let mut table = MembershipTable::new(TableConfig::default());
        let mut diff = Diff::with_capacity(TableConfig::default().max_groups);
        let now = Duration::from_secs(1);
        table.learn(f, f.len(), now, &mut diff);
        diff.clear();
        g.bench_function(*name, |b| {
            b.iter(|| {
                let v = table.learn(black_box(f), f.len(), now, &mut diff);
                debug_assert!(diff.is_empty());
                v
            })
        });
        assert!(table.counters().malformed == 0 && table.groups() > 0);
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .with_measurement(measurement())
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_tx, bench_rx, bench_mcast
}
// `cargo test --all-targets` runs bench targets with libtest's flags, which criterion refuses;
// only `cargo bench` (which passes `--bench`) measures.
fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("datapath: not run (use `cargo bench --features test-utils --bench datapath`)");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
