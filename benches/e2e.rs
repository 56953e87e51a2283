//! End-to-end benchmark: macvhost driven by DPDK testpmd's `net_virtio_user`, against the
//! per-syscall limit measured on the very same tap / macvtap queue fds, in one run.
//!
//! ```text
//! sudo cargo bench --bench e2e                       # full matrix (~35 min on 2 vCPUs)
//! sudo cargo bench --bench e2e -- --quick            # 1 rep, 64 B, 1 queue pair
//! sudo cargo bench --bench e2e -- --help
//! ```
//!
//! Needs root, `ip` (iproute2), `dpdk-testpmd` (Debian `dpdk`), `/dev/net/tun`, macvtap + veth.
//! Under `cargo test` (no `--bench` argument) it does nothing.
//!
//! # Shape
//! The process creates a network namespace `mvhb-<pid>` and re-executes itself inside it (`ip
//! netns exec`, so `/sys` shows the namespace). Inside, per device kind:
//! - tap: `ip tuntap add mvb0 mode tap multi_queue`; the tap netdev is the peer;
//! - macvtap: `peer0 ═veth═ lower0`, `mvt0` (macvtap, bridge) on `lower0`; `peer0` is the peer.
//!
//! For each queue-pair count the harness opens the device once with
//! `macvhost::host::HostDevice::open` (exactly as `macvhost --tap/--macvtap` does) and keeps those
//! queue fds for every run: the limit loops use them directly, and macvhost gets duplicates of
//! them through `--tap-fd` — the same open files, so the same kernel queues.
//!
//! Runs alternate (limit, macvhost, limit, macvhost, ...) and the table reports medians.
//! - TX: limit = one thread per queue fd in a tight `writev` loop of a testpmd-identical frame;
//!   macvhost = testpmd `txonly`. Frames counted where they come out: the tap netdev's
//!   `rx_packets` / the veth peer's `rx_packets`.
//! - RX: one generator (AF_PACKET, `PACKET_QDISC_BYPASS`, `sendmmsg`, 64 UDP flows) transmits on
//!   the tap netdev / the veth peer; limit = one thread per fd in a `readv` loop; macvhost =
//!   testpmd `rxonly`. Frames counted as the kernel hands them to the queue fd readers: the tap's
//!   `tx_packets` / the macvtap's `rx_packets` minus its `rx_dropped`.
//! - macswap: generator → RX → frontend swaps MACs → TX → back to the peer (counted there);
//!   limit = `readv` + swap + `writev` on the same fd.
//! - lat: one 64 B frame in flight from the peer (AF_PACKET), echoed by testpmd `macswap`
//!   through macvhost, or by the limit's `readv` → swap → `writev` thread on the same fd (which
//!   sleeps in `poll` between frames, as macvhost sleeps in `epoll_wait`); p50 and p99.
//! - dpdk (tap TX rows): DPDK's own vhost-user backend in the same alternation — a second
//!   testpmd with `net_vhost` on the socket and `net_tap` on a tap of its own (`net_tap` cannot
//!   attach to a vnet-header tap), io forwarding, both lcores on the device CPU; counted where
//!   its tap receives the frames.
//!
//! CPU: the device side (macvhost, or the limit threads) is pinned to CPU 0, testpmd's forwarding
//! lcore and the generator to CPU 1 (`-l 0,1`: lcore 0 is testpmd's mostly idle main lcore).
//! CPU seconds come from `/proc/PID/stat` (utime + stime) of macvhost, or of the limit threads.
//! Drops inside macvhost come from its own per-reason counters (`--control-socket`), and frames
//! testpmd sent/received are compared with the kernel counters over the whole run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use macvhost::host::{HostDevice, HostSpec, TapQueue};
use macvhost::testkit::netns::{self, MacvtapTopo, NetNs};
use macvhost::testkit::{is_root, wait_until, which};

const HDR: usize = 12;
/// MAC of the macvtap = the guest's MAC.
/// The test kit's topology MACs (`MacvtapTopo::create`), as bytes.
const GUEST_MAC: [u8; 6] = netns::GUEST_MAC.0;
const PEER_MAC: [u8; 6] = netns::PEER_MAC.0;
/// Env var naming the namespace the outer process made, for the inner one.
const NETNS_ENV: &str = "MVHB_NETNS";
/// testpmd txonly's default destination (`--eth-peer` default for port 0).
const TESTPMD_PEER: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x00];
const DEV_CPU: usize = 0;
const OTHER_CPU: usize = 1;

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Opts {
    reps: usize,
    secs: f64,
    warmup: f64,
    kinds: Vec<String>,
    queues: Vec<u16>,
    sizes: Vec<usize>,
    modes: Vec<String>,
    /// (name, extra macvhost args; a first argument `@PATH` names another binary)
    variants: Vec<(String, Vec<String>)>,
    rss_queues: u16,
    nice: i32,
    out: Option<PathBuf>,
    macvhost: PathBuf,
    keep_logs: bool,
    /// A DPDK net_vhost + net_tap row on tap TX rows.
    dpdk: bool,
}

const HELP: &str = "\
cargo bench --bench e2e -- [OPTIONS]
  --reps N            alternated limit/macvhost repetitions per row (default 5)
  --secs S            measurement window per run, seconds (default 2)
  --warmup S          traffic before the window opens, seconds (default 1)
  --kinds LIST        tap,macvtap (default both)
  --queues LIST       queue pairs, e.g. 1,2 (default 1,2)
  --sizes LIST        Ethernet frame sizes, e.g. 64,1500,9000 (default all three; 9000 uses MTU 9000)
  --modes LIST        tx,rx,macswap,lat (default all; lat = one 64 B frame in flight through
                      testpmd macswap vs the readv→writev echo, p50/p99)
  --variant NAME=ARGS an extra macvhost row with these extra arguments (space separated),
                      e.g. --variant 'poll50=--poll-us 50'; a first word @PATH runs
                      another macvhost binary (e.g. a build of the previous commit); repeatable
  --rss-queues N      also report macvhost's RSS at N queue pairs (default 8; 0 = skip)
  --nice N            nice value for every benchmark process (default -20; 0 = unchanged)
  --out FILE          also write the markdown table to FILE (default target/e2e-bench.md)
  --macvhost PATH     binary to benchmark (default: the one cargo built)
  --keep-logs         keep the temporary directory with macvhost/testpmd logs
  --no-dpdk           no DPDK net_vhost + net_tap row (tap TX rows have one by default)
  --quick             --reps 1 --secs 1 --sizes 64 --queues 1 --rss-queues 0
";

fn parse_list<T: std::str::FromStr>(s: &str) -> Vec<T> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse()
                .unwrap_or_else(|_| panic!("bad list element {x:?}"))
        })
        .collect()
}

impl Opts {
    fn parse(args: &[String]) -> Opts {
        let mut o = Opts {
            reps: 5,
            secs: 2.0,
            warmup: 1.0,
            kinds: vec!["tap".into(), "macvtap".into()],
            queues: vec![1, 2],
            sizes: vec![64, 1500, 9000],
            modes: vec!["tx".into(), "rx".into(), "macswap".into(), "lat".into()],
            variants: vec![("macvhost".into(), vec![])],
            rss_queues: 8,
            nice: -20,
            out: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/target/e2e-bench.md"
            ))),
            macvhost: PathBuf::from(env!("CARGO_BIN_EXE_macvhost")),
            keep_logs: false,
            dpdk: true,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || {
                it.next()
                    .cloned()
                    .unwrap_or_else(|| panic!("{a} needs a value"))
            };
            match a.as_str() {
                "--reps" => o.reps = val().parse().expect("--reps"),
                "--secs" => o.secs = val().parse().expect("--secs"),
                "--warmup" => o.warmup = val().parse().expect("--warmup"),
                "--kinds" => o.kinds = parse_list(&val()),
                "--queues" => o.queues = parse_list(&val()),
                "--sizes" => o.sizes = parse_list(&val()),
                "--modes" => o.modes = parse_list(&val()),
                "--variant" => {
                    let v = val();
                    let (name, args) = v.split_once('=').expect("--variant NAME=ARGS");
                    o.variants.push((
                        name.to_string(),
                        args.split_whitespace().map(String::from).collect(),
                    ));
                }
                "--rss-queues" => o.rss_queues = val().parse().expect("--rss-queues"),
                "--nice" => o.nice = val().parse().expect("--nice"),
                "--out" => o.out = Some(PathBuf::from(val())),
                "--macvhost" => o.macvhost = PathBuf::from(val()),
                "--keep-logs" => o.keep_logs = true,
                "--no-dpdk" => o.dpdk = false,
                "--quick" => {
                    o.reps = 1;
                    o.secs = 1.0;
                    o.sizes = vec![64];
                    o.queues = vec![1];
                    o.rss_queues = 0;
                }
                "--help" | "-h" => {
                    print!("{HELP}");
                    std::process::exit(0);
                }
                other => panic!("unknown option {other:?}\n{HELP}"),
            }
        }
        o
    }

    fn to_args(&self) -> Vec<String> {
        let j = |v: &[String]| v.join(",");
        let mut a = vec![
            "--reps".into(),
            self.reps.to_string(),
            "--secs".into(),
            self.secs.to_string(),
            "--warmup".into(),
            self.warmup.to_string(),
            "--kinds".into(),
            j(&self.kinds),
            "--queues".into(),
            j(&self
                .queues
                .iter()
                .map(|q| q.to_string())
                .collect::<Vec<_>>()),
            "--sizes".into(),
            j(&self.sizes.iter().map(|q| q.to_string()).collect::<Vec<_>>()),
            "--modes".into(),
            j(&self.modes),
            "--rss-queues".into(),
            self.rss_queues.to_string(),
            "--nice".into(),
            "0".into(),
            "--macvhost".into(),
            self.macvhost.display().to_string(),
        ];
        for (name, args) in self.variants.iter().skip(1) {
            a.push("--variant".into());
            a.push(format!("{name}={}", args.join(" ")));
        }
        if let Some(out) = &self.out {
            a.push("--out".into());
            a.push(out.display().to_string());
        }
        if self.keep_logs {
            a.push("--keep-logs".into());
        }
        if !self.dpdk {
            a.push("--no-dpdk".into());
        }
        a
    }
}

// ---------------------------------------------------------------------------------------------
// Entry
// ---------------------------------------------------------------------------------------------

fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let is_bench = all.iter().any(|a| a == "--bench");
    let args: Vec<String> = all.into_iter().filter(|a| a != "--bench").collect();
    if args.first().map(String::as_str) == Some("__inside") {
        let opts = Opts::parse(&args[1..]);
        inside(&opts);
        return;
    }
    if !is_bench {
        // `cargo test --all-targets` runs bench targets without `--bench`: nothing to do.
        println!("e2e: not run (use `cargo bench --bench e2e` as root)");
        return;
    }
    let opts = Opts::parse(&args);
    outer(&opts);
}

fn outer(opts: &Opts) {
    if !is_root() || which("ip").is_none() || which("dpdk-testpmd").is_none() {
        eprintln!(
            "e2e: needs root, `ip` (iproute2) and `dpdk-testpmd` (Debian package `dpdk`); skipped"
        );
        std::process::exit(if std::env::var_os("MACVHOST_BENCH_REQUIRED").is_some() {
            1
        } else {
            0
        });
    }
    // With CONFIG_SCHED_AUTOGROUP, CPU time is shared fairly between sessions first and a
    // process's nice value only counts inside its session's group: raise the group too.
    let autogroup_before = fs::read_to_string("/proc/self/autogroup")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .last()
                .and_then(|n| n.parse::<i32>().ok())
        });
    if opts.nice != 0 {
        // SAFETY: setpriority on this process; children inherit the nice value.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, opts.nice) };
        let _ = fs::write("/proc/self/autogroup", opts.nice.to_string());
    }
    // Deleted on drop, with everything still in it.
    let ns = NetNs::quiet("bench");
    // A Ctrl-C reaches the inner process (same process group), which stops its children; this
    // process only waits for it and then removes the namespace with everything in it.
    // SAFETY: ignoring SIGINT/SIGTERM in this process only; no handler runs.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    let me = std::env::current_exe().expect("current exe");
    let mut cmd = ns.command(me);
    cmd.arg("__inside")
        .args(opts.to_args())
        .env(NETNS_ENV, ns.name());
    // SAFETY: only resets two signal dispositions (async-signal-safe) between fork and exec, so
    // the inner run stops on Ctrl-C / SIGTERM while this process waits to clean up.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            Ok(())
        });
    }
    let status = cmd.status();
    drop(ns);
    if let Some(n) = autogroup_before {
        let _ = fs::write("/proc/self/autogroup", n.to_string());
    }
    match status {
        Ok(s) if s.success() => {}
        other => {
            eprintln!("e2e: inner run failed: {other:?}");
            std::process::exit(1);
        }
    }
}

/// The namespace this (inner) process runs in, made by the outer one.
fn bench_ns() -> NetNs {
    NetNs::attach(&std::env::var(NETNS_ENV).expect("run inside the bench's namespace"))
}

// ---------------------------------------------------------------------------------------------
// Inside the namespace
// ---------------------------------------------------------------------------------------------

/// One device kind's topology.
#[derive(Debug, Clone)]
struct Topo {
    kind: &'static str,
    /// The interface macvhost serves.
    dev: &'static str,
    /// Where the generator transmits and where TX frames come out.
    peer: &'static str,
    /// Every link whose MTU follows the frame size.
    links: Vec<&'static str>,
    /// Destination MAC of generated frames.
    gen_dst: [u8; 6],
}

impl Topo {
    fn create(kind: &str) -> Topo {
        let ns = bench_ns();
        match kind {
            "tap" => {
                ns.add_tap("mvb0", true);
                ns.set_mac("mvb0", netns::PEER_MAC);
                ns.set_up(&["mvb0"]);
                Topo {
                    kind: "tap",
                    dev: "mvb0",
                    peer: "mvb0",
                    links: vec!["mvb0"],
                    gen_dst: GUEST_MAC,
                }
            }
            "macvtap" => {
                let t = MacvtapTopo::create(&ns, "bridge");
                Topo {
                    kind: "macvtap",
                    dev: t.macvtap,
                    peer: t.peer,
                    links: vec![t.peer, t.lower, t.macvtap],
                    gen_dst: GUEST_MAC,
                }
            }
            other => panic!("unknown kind {other}"),
        }
    }

    fn destroy(&self) {
        let _ = bench_ns().try_ip(&["link", "del", self.links[0]]);
    }

    fn set_mtu(&self, mtu: usize) {
        for l in &self.links {
            bench_ns().ip(&["link", "set", l, "mtu", &mtu.to_string()]);
        }
    }

    /// Opens the device with `nq` queue pairs exactly as macvhost does: the device and its
    /// queue fds.
    fn open(&self, nq: u16) -> (HostDevice, Vec<Arc<TapQueue>>) {
        let dev = HostDevice::open(&self.spec(), nq).expect("open host device");
        let queues = dev.queues().to_vec();
        (dev, queues)
    }

    fn spec(&self) -> HostSpec {
        match self.kind {
            "tap" => HostSpec::Tap {
                iface: self.dev.into(),
            },
            _ => HostSpec::Macvtap {
                iface: self.dev.into(),
            },
        }
    }

    /// Links whose queue length bounds the RX backlog.
    fn backlog_links(&self) -> Vec<&'static str> {
        vec![self.dev]
    }

    /// Whether a kernel counter moves as the fd readers take frames (tun counts `tx_packets` at
    /// read time; macvtap counts `rx_packets` when it queues a frame, and nothing at read time).
    fn rx_counted_by_kernel(&self) -> bool {
        self.kind == "tap"
    }

    /// Frames the kernel dropped because the device's queues were full.
    fn backlog_drops(&self) -> u64 {
        match self.kind {
            "tap" => read_counter(self.dev, "tx_dropped"),
            _ => read_counter(self.dev, "rx_dropped"),
        }
    }

    /// (frames, bytes) counted where `mode`'s frames end up: "tx" and "macswap" where frames
    /// written to the fd come out, "rx" as the kernel hands frames to the fd readers.
    fn counter(&self, mode: &str) -> (u64, u64) {
        let c = |i: &str, f: &str| read_counter(i, f);
        match (self.kind, mode) {
            // Written to the fd: received by the tap netdev / out of the veth peer.
            ("tap", "tx" | "macswap") => (c(self.dev, "rx_packets"), c(self.dev, "rx_bytes")),
            ("macvtap", "tx" | "macswap") => (c(self.peer, "rx_packets"), c(self.peer, "rx_bytes")),
            // Handed to the fd readers.
            ("tap", _) => (c(self.dev, "tx_packets"), c(self.dev, "tx_bytes")),
            _ => (
                c(self.dev, "rx_packets") - c(self.dev, "rx_dropped"),
                c(self.dev, "rx_bytes"),
            ),
        }
    }
}

fn read_counter(iface: &str, field: &str) -> u64 {
    fs::read_to_string(format!("/sys/class/net/{iface}/statistics/{field}"))
        .unwrap_or_else(|e| panic!("{iface}/{field}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

/// A UDP/IPv4 Ethernet frame of `len` bytes (testpmd txonly's addresses unless told).
fn eth_frame(len: usize, dst: [u8; 6], src: [u8; 6], sport: u16) -> Vec<u8> {
    let len = len.max(60);
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    let iph = &mut f[14..34];
    iph[0] = 0x45;
    iph[2..4].copy_from_slice(&ip_len.to_be_bytes());
    iph[8] = 64;
    iph[9] = 17;
    iph[12..16].copy_from_slice(&[198, 18, 0, 1]);
    iph[16..20].copy_from_slice(&[198, 18, 0, 2]);
    let mut sum = 0u32;
    for i in (0..20).step_by(2) {
        sum += u32::from(u16::from_be_bytes([iph[i], iph[i + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    iph[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&9u16.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it; sched_setaffinity(0) applies
    // to the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// utime + stime of a process or thread, seconds (`/proc/.../stat` fields 14 and 15).
fn cpu_secs(stat_path: &str) -> f64 {
    let s = fs::read_to_string(stat_path).unwrap_or_default();
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state).
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("RssAnon:"))
}

// ---------------------------------------------------------------------------------------------
// Limit loops and the generator (threads of this process)
// ---------------------------------------------------------------------------------------------

struct Workers {
    stop: Arc<AtomicBool>,
    handles: Vec<thread::JoinHandle<()>>,
    tids: Arc<std::sync::Mutex<Vec<i32>>>,
    sent: Arc<AtomicU64>,
}

impl Workers {
    fn new() -> Workers {
        Workers {
            stop: Arc::new(AtomicBool::new(false)),
            handles: Vec::new(),
            tids: Arc::new(std::sync::Mutex::new(Vec::new())),
            sent: Arc::new(AtomicU64::new(0)),
        }
    }

    fn spawn(&mut self, cpu: usize, f: impl FnOnce(&AtomicBool, &AtomicU64) + Send + 'static) {
        let (stop, tids, sent) = (self.stop.clone(), self.tids.clone(), self.sent.clone());
        self.handles.push(thread::spawn(move || {
            pin_to(cpu);
            tids.lock().unwrap().push(gettid());
            f(&stop, &sent)
        }));
    }

    fn cpu(&self) -> f64 {
        self.tids
            .lock()
            .unwrap()
            .iter()
            .map(|t| cpu_secs(&format!("/proc/self/task/{t}/stat")))
            .sum()
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            h.join().unwrap();
        }
    }
}

fn wait_fd(fd: RawFd, events: i16) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd; 50 ms timeout so the stop flag is seen.
    unsafe { libc::poll(&mut p, 1, 50) };
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Tight `writev` of `frame` (vnet header included) on `fd`.
fn limit_tx(fd: RawFd, frame: Vec<u8>, stop: &AtomicBool) {
    let iov = libc::iovec {
        iov_base: frame.as_ptr() as *mut _,
        iov_len: frame.len(),
    };
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..64 {
            // SAFETY: `iov` points at `frame`, alive for the loop; the kernel only reads it.
            let r = unsafe { libc::writev(fd, &iov, 1) };
            if r < 0 && errno() == libc::EAGAIN {
                wait_fd(fd, libc::POLLOUT);
            }
        }
    }
}

/// `readv` loop on `fd` into one buffer of `buf_len`; with `echo`, swap the MACs and write the
/// frame back on the same fd.
/// Frames read are added to `reads` (in batches of 16).
fn limit_rx(fd: RawFd, buf_len: usize, echo: bool, stop: &AtomicBool, reads: &AtomicU64) {
    let mut buf = vec![0u8; buf_len];
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut local = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `iov` covers `buf`, which outlives the loop.
        let n = unsafe { libc::readv(fd, &iov, 1) };
        if n < 0 {
            reads.fetch_add(std::mem::take(&mut local), Ordering::Relaxed);
            if errno() == libc::EAGAIN {
                wait_fd(fd, libc::POLLIN);
            }
            continue;
        }
        local += 1;
        if local == 16 {
            reads.fetch_add(std::mem::take(&mut local), Ordering::Relaxed);
        }
        if echo && n as usize >= HDR + 12 {
            // SAFETY: `buf` holds at least HDR + 12 bytes just read; swap the two MAC fields in
            // place through the same pointer the iovec uses.
            unsafe {
                let p = iov.iov_base.cast::<u8>().add(HDR);
                std::ptr::swap_nonoverlapping(p, p.add(6), 6);
            }
            let out = libc::iovec {
                iov_base: iov.iov_base,
                iov_len: n as usize,
            };
            // SAFETY: `out` covers the `n` bytes just read into `buf`.
            while unsafe { libc::writev(fd, &out, 1) } < 0 && errno() == libc::EAGAIN {
                wait_fd(fd, libc::POLLOUT);
            }
        }
    }
}

/// An AF_PACKET socket on `iface` (protocol `proto`), bypassing the qdisc, with the extra
/// `(level, option, value)` options set, bound to IPv4 frames of that link.
fn packet_socket(iface: &str, proto: u16, opts: &[(i32, i32, i32)]) -> OwnedFd {
    let ifindex = read_ifindex(iface);
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto.to_be())) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a new socket nobody else owns; the OwnedFd closes it.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    set_int_opt(fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1);
    for &(level, opt, value) in opts {
        set_int_opt(fd, level, opt, value);
    }
    // SAFETY: a zeroed sockaddr_ll is valid; fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    sll.sll_ifindex = ifindex;
    // SAFETY: `sll` is a valid sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
    sock
}

/// AF_PACKET generator on `iface`: `sendmmsg` batches of 64 frames over 64 UDP flows.
fn generator(iface: &str, len: usize, dst: [u8; 6], stop: &AtomicBool, sent: &AtomicU64) {
    // Queued frames stay charged to this socket until read: allow a large backlog.
    let sock = packet_socket(
        iface,
        libc::ETH_P_ALL as u16,
        &[(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 1 << 30)],
    );
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let frames: Vec<Vec<u8>> = (0..64)
        .map(|i| eth_frame(len, dst, PEER_MAC, 10_000 + i))
        .collect();
    let mut iovs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut _,
            iov_len: f.len(),
        })
        .collect();
    // SAFETY: zeroed mmsghdr values are valid; each points at one iovec below.
    let mut msgs: Vec<libc::mmsghdr> = (0..64).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `msgs` holds 64 valid headers whose iovecs point at live frames.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), 64, libc::MSG_DONTWAIT) };
        if n > 0 {
            sent.fetch_add(n as u64, Ordering::Relaxed);
        } else if n < 0 && errno() != libc::ENOBUFS && errno() != libc::EAGAIN {
            panic!("sendmmsg: {}", std::io::Error::last_os_error());
        } else if n < 0 {
            thread::sleep(Duration::from_micros(200));
        }
    }
}

/// `setsockopt` of an int option (best effort: the generator works without either).
fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, val: libc::c_int) {
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` is a valid c_int for the duration of the call and `len` is its size.
    unsafe { libc::setsockopt(fd, level, name, (&val as *const libc::c_int).cast(), len) };
}

fn read_ifindex(iface: &str) -> i32 {
    fs::read_to_string(format!("/sys/class/net/{iface}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// macvhost + testpmd
// ---------------------------------------------------------------------------------------------

struct Procs {
    macvhost: Child,
    testpmd: Child,
    /// testpmd's command input (interactive mode); kept open while it runs.
    stdin: Option<std::process::ChildStdin>,
    tp_log: PathBuf,
    ctl: PathBuf,
    /// testpmd's `--file-prefix` (its runtime directory under /var/run/dpdk).
    prefix: String,
}

impl Procs {
    fn tp_text(&self) -> String {
        fs::read_to_string(&self.tp_log).unwrap_or_default()
    }

    /// testpmd's RX-packets of port 0 now (asks with `show port stats 0`).
    fn rx_packets_now(&mut self) -> u64 {
        let before = self.tp_text().len();
        self.command("show port stats 0");
        let end = Instant::now() + Duration::from_millis(500);
        while Instant::now() < end {
            let t = self.tp_text();
            if let Some(new) = t.get(before..) {
                if let (Some(i), true) = (new.find("RX-packets:"), new.contains("TX-packets:")) {
                    let v = new[i + "RX-packets:".len()..].split_whitespace().next();
                    if let Some(v) = v.and_then(|v| v.parse().ok()) {
                        return v;
                    }
                }
            }
            thread::sleep(Duration::from_micros(500));
        }
        0
    }

    /// `quit`, wait for testpmd to exit (SIGINT after 15 s), and remove its DPDK runtime dir.
    fn quit_testpmd(&mut self) {
        self.command("quit");
        let tp = &mut self.testpmd;
        wait_until(Duration::from_secs(15), || {
            matches!(tp.try_wait(), Ok(Some(_)))
        });
        stop_child(&mut self.testpmd, libc::SIGINT, Duration::from_secs(20));
        let _ = fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }

    /// `stop`, and wait for the statistics it prints.
    fn stop_forwarding(&mut self) {
        let before = self.tp_text().len();
        self.command("stop");
        wait_until(Duration::from_secs(10), || {
            self.tp_text()
                .get(before..)
                .is_some_and(|t| t.contains("Accumulated forward statistics for all ports"))
        });
    }

    fn command(&mut self, cmd: &str) {
        if let Some(i) = self.stdin.as_mut() {
            let _ = writeln!(i, "{cmd}");
            let _ = i.flush();
        }
    }
}

fn spawn_pinned(cmd: &mut Command, cpu: Option<usize>, log: &Path) -> Child {
    let out = File::create(log).unwrap();
    cmd.stdout(out.try_clone().unwrap()).stderr(out);
    if let Some(cpu) = cpu {
        // SAFETY: the closure only calls sched_setaffinity (async-signal-safe) between fork and
        // exec.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                Ok(())
            });
        }
    }
    cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// Duplicates `fd` without CLOEXEC so a child inherits it.
fn inheritable_dup(fd: RawFd) -> OwnedFd {
    // SAFETY: dup of an fd we own; the result is owned by the returned OwnedFd.
    let d = unsafe { libc::dup(fd) };
    assert!(d >= 0);
    // SAFETY: `d` was just returned by dup and is owned by nobody else.
    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(d) }
}

fn forward_mode(mode: &str) -> &'static str {
    match mode {
        "tx" => "txonly",
        "rx" => "rxonly",
        _ => "macswap",
    }
}

/// Starts macvhost on duplicates of `queues` (`--tap-fd`) and a testpmd `net_virtio_user`
/// frontend in interactive mode (`-i --auto-start`, commands through a pipe), and waits until
/// testpmd forwards.
fn start_macvhost_testpmd(ctx: &Ctx<'_>, tag: &str, extra: &[String]) -> Procs {
    let dir = ctx.dir;
    let sock = dir.join(format!("{tag}.sock"));
    let ctl = dir.join(format!("{tag}.ctl"));
    let _ = fs::remove_file(&sock);
    let _ = fs::remove_file(&ctl);
    let dups: Vec<OwnedFd> = ctx
        .queues
        .iter()
        .map(|q| inheritable_dup(q.as_raw_fd()))
        .collect();
    let fdlist = macvhost::testkit::fd_list(&dups);
    let q = ctx.queues.len().to_string();
    let mvh_log = dir.join(format!("{tag}.mvh.log"));
    let (bin, extra) = match extra.first().and_then(|a| a.strip_prefix('@')) {
        Some(path) => (PathBuf::from(path), &extra[1..]),
        None => (ctx.opts.macvhost.clone(), extra),
    };
    // Arguments `env:NAME=VALUE` set an environment variable instead.
    let (envs, extra): (Vec<&String>, Vec<&String>) =
        extra.iter().partition(|a| a.starts_with("env:"));
    let mut cmd = Command::new(bin);
    for e in envs {
        if let Some((k, v)) = e["env:".len()..].split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.args(["--socket-path", sock.to_str().unwrap()])
        .args(["--tap-fd", &fdlist, "--queues", &q])
        .args(["--control-socket", ctl.to_str().unwrap()])
        .args(["--mac", &netns::GUEST_MAC.to_string(), "--log-level"])
        .arg(std::env::var("MVHB_MACVHOST_LOG").unwrap_or_else(|_| "warn".into()))
        .args(extra)
        .stdin(Stdio::null());
    let macvhost = spawn_pinned(&mut cmd, Some(DEV_CPU), &mvh_log);
    drop(dups);
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "macvhost did not create {sock:?}; log: {}",
        fs::read_to_string(&mvh_log).unwrap_or_default()
    );
    let (testpmd, stdin, tp_log, prefix) = start_frontend(ctx, tag, &sock);
    Procs {
        macvhost,
        testpmd,
        stdin,
        tp_log,
        ctl,
        prefix,
    }
}

/// Starts testpmd's `net_virtio_user` frontend on the vhost-user socket `sock` in interactive
/// mode (`-i --auto-start`, commands through the returned pipe) and waits for its prompt.
/// Returns (testpmd, its stdin, its log, its `--file-prefix`).
fn start_frontend(
    ctx: &Ctx<'_>,
    tag: &str,
    sock: &Path,
) -> (Child, Option<std::process::ChildStdin>, PathBuf, String) {
    let q = ctx.queues.len().to_string();
    let prefix = format!("mvhb{}{tag}", std::process::id());
    let mut args: Vec<String> = vec![
        "-l".into(),
        "0,1".into(),
        "--no-huge".into(),
        "-m".into(),
        "1024".into(),
        "--no-pci".into(),
        format!("--file-prefix={prefix}"),
        format!(
            "--vdev=net_virtio_user0,path={},queues={q},mac={}",
            sock.display(),
            netns::GUEST_MAC
        ),
        "--".into(),
        "-i".into(),
        "--auto-start".into(),
        // Keep frames already in the RX ring when forwarding (re)starts: they are counted.
        "--no-flush-rx".into(),
        "--total-num-mbufs=16384".into(),
    ];
    if ctx.size > 1500 {
        // Before --txpkts: testpmd checks the TX length against the mbuf size it knows so far
        // (and silently keeps 64 B when it does not fit).
        args.push("--mbuf-size=10240".into());
        args.push(format!("--max-pkt-len={}", ctx.size + 18));
    }
    args.extend([
        format!("--forward-mode={}", forward_mode(ctx.mode)),
        format!("--txpkts={}", ctx.size),
        "--nb-cores=1".into(),
        format!("--rxq={q}"),
        format!("--txq={q}"),
    ]);
    let tp_log = ctx.dir.join(format!("{tag}.testpmd.log"));
    // Line-buffered stdout (stdbuf), so answers to commands reach the log at once.
    let mut tcmd = Command::new("stdbuf");
    tcmd.args(["-oL", "dpdk-testpmd"])
        .args(&args)
        .stdin(Stdio::piped());
    let mut testpmd = spawn_pinned(&mut tcmd, None, &tp_log);
    let stdin = testpmd.stdin.take();
    let ok = wait_until(Duration::from_secs(60), || {
        if let Ok(Some(st)) = testpmd.try_wait() {
            panic!(
                "testpmd exited ({st}):\n{}",
                fs::read_to_string(&tp_log).unwrap_or_default()
            );
        }
        fs::read_to_string(&tp_log)
            .unwrap_or_default()
            .contains("testpmd> ")
    });
    assert!(
        ok,
        "testpmd did not start:\n{}",
        fs::read_to_string(&tp_log).unwrap_or_default()
    );
    (testpmd, stdin, tp_log, prefix)
}

/// testpmd's accumulated totals after `stop`: (RX-packets, TX-packets).
fn testpmd_totals(log: &str) -> Option<(u64, u64)> {
    let i = log.rfind("Accumulated forward statistics for all ports")?;
    let tail = &log[i..];
    let grab = |key: &str| -> Option<u64> {
        let j = tail.find(key)? + key.len();
        tail[j..].split_whitespace().next()?.parse().ok()
    };
    Some((grab("RX-packets:")?, grab("TX-packets:")?))
}

/// `a - b` of two frame counters, signed (saturating; counters stay far below 2^63).
fn signed_gap(a: u64, b: u64) -> i64 {
    let d = i128::from(a) - i128::from(b);
    i64::try_from(d).unwrap_or(if d < 0 { i64::MIN } else { i64::MAX })
}

fn stop_child(c: &mut Child, sig: i32, timeout: Duration) {
    if let Ok(Some(_)) = c.try_wait() {
        return;
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(c.id()).expect("Linux pids fit pid_t"), sig) };
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

// ---------------------------------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Sample {
    mpps: f64,
    /// Mean Ethernet bytes per frame by the kernel's byte counter (the frame size when the
    /// kernel does not count the frames at that point).
    frame_bytes: f64,
    cpu_per_mframe: f64,
    rss_kib: u64,
    anon_kib: u64,
    /// Drops counted by macvhost (all reasons).
    drops: u64,
    /// Frames that went into macvhost (from the guest on TX, from the kernel on RX) and did not
    /// come out the other side, over the whole run, by the kernel's and testpmd's counts.
    unaccounted: i64,
    note: String,
}

struct Ctx<'a> {
    opts: &'a Opts,
    dir: &'a Path,
    topo: &'a Topo,
    queues: &'a [Arc<TapQueue>],
    size: usize,
    mode: &'a str,
}

impl<'a> Ctx<'a> {
    /// `mode` frames of `size` bytes through `queues` of `topo`.
    fn new(
        (opts, dir): (&'a Opts, &'a Path),
        topo: &'a Topo,
        queues: &'a [Arc<TapQueue>],
        size: usize,
        mode: &'a str,
    ) -> Ctx<'a> {
        Ctx {
            opts,
            dir,
            topo,
            queues,
            size,
            mode,
        }
    }
}

/// TX: rate over a fixed window after a warm-up. Returns (Mpps, CPU seconds, frames).
fn measure_window(ctx: &Ctx<'_>, cpu: &dyn Fn() -> f64) -> (f64, f64, f64) {
    measure_window_on(ctx, &|| ctx.topo.counter(ctx.mode).0, cpu)
}

/// [`measure_window`] counting frames with `frames`.
fn measure_window_on(
    ctx: &Ctx<'_>,
    frames: &dyn Fn() -> u64,
    cpu: &dyn Fn() -> f64,
) -> (f64, f64, f64) {
    thread::sleep(Duration::from_secs_f64(ctx.opts.warmup));
    let f0 = frames();
    let c0 = cpu();
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs_f64(ctx.opts.secs));
    let f1 = frames();
    let c1 = cpu();
    let dt = t0.elapsed().as_secs_f64();
    let frames = (f1 - f0) as f64;
    (frames / dt / 1e6, c1 - c0, frames)
}

/// RX / macswap: the queues hold a backlog (see [`prefill`]); the consumer drains it. Rate and
/// CPU between 10% and 90% of the frames drained. Returns (Mpps, CPU seconds, frames).
fn measure_drain(progress: &mut dyn FnMut() -> u64, cpu: &dyn Fn() -> f64) -> (f64, f64, f64) {
    let start = progress();
    let mut samples: Vec<(Instant, u64, f64)> = Vec::new();
    let mut last_move = Instant::now();
    let begin = Instant::now();
    let mut last = start;
    loop {
        let c = progress();
        let now = Instant::now();
        samples.push((now, c, cpu()));
        if c != last {
            last = c;
            last_move = now;
        }
        let idle = now.duration_since(last_move);
        if (c > start && idle > Duration::from_millis(300))
            || now.duration_since(begin) > Duration::from_secs(60)
        {
            break;
        }
        thread::sleep(Duration::from_millis(2));
    }
    let total = last - start;
    if total < 1000 {
        return (0.0, 0.0, total as f64);
    }
    let at = |frac: f64| {
        let want = start + (total as f64 * frac) as u64;
        samples.iter().find(|s| s.1 >= want).copied().unwrap()
    };
    let (a, b) = (at(0.1), at(0.9));
    let frames = (b.1 - a.1) as f64;
    let dt = b.0.duration_since(a.0).as_secs_f64().max(1e-6);
    (frames / dt / 1e6, b.2 - a.2, frames)
}

/// Frames of backlog per run (all queues), by frame size: about a second of draining.
fn backlog_frames(size: usize) -> u64 {
    match size {
        0..=128 => 600_000,
        129..=2048 => 300_000,
        _ => 100_000,
    }
}

/// Fills the device's queues with a backlog of generated frames while nobody reads them.
fn prefill(ctx: &Ctx<'_>) {
    let nq = ctx.queues.len() as u64;
    // tun refuses rings much larger than 2^18 entries.
    let per_queue = (backlog_frames(ctx.size) / nq).min(1 << 18);
    for l in ctx.topo.backlog_links() {
        bench_ns().ip(&["link", "set", l, "txqueuelen", &per_queue.to_string()]);
    }
    let drops0 = ctx.topo.backlog_drops();
    let mut gen = Workers::new();
    let (peer, size, dst) = (ctx.topo.peer.to_string(), ctx.size, ctx.topo.gen_dst);
    gen.spawn(OTHER_CPU, move |stop, sent| {
        generator(&peer, size, dst, stop, sent)
    });
    // Full when the kernel starts dropping at the queues, or once enough frames went out.
    let target = per_queue * nq;
    let sent = gen.sent.clone();
    wait_until(Duration::from_secs(20), || {
        ctx.topo.backlog_drops() > drops0 + 20_000
            || sent.load(Ordering::Relaxed) > target + target / 10
    });
    gen.stop();
    thread::sleep(Duration::from_millis(100));
}

fn run_limit(ctx: &Ctx<'_>) -> Sample {
    attach_and_drain(ctx.queues, true);
    if ctx.mode != "tx" {
        prefill(ctx);
    }
    let mut w = Workers::new();
    let buf_len = (ctx.size + HDR + 64).max(2048);
    for q in ctx.queues {
        let fd = q.as_raw_fd();
        match ctx.mode {
            "tx" => {
                let mut frame = vec![0u8; HDR];
                frame.extend(eth_frame(ctx.size, TESTPMD_PEER, GUEST_MAC, 9));
                w.spawn(DEV_CPU, move |stop, _| limit_tx(fd, frame, stop));
            }
            m => {
                let echo = m == "macswap";
                w.spawn(DEV_CPU, move |stop, reads| {
                    limit_rx(fd, buf_len, echo, stop, reads)
                });
            }
        }
    }
    let reads = w.sent.clone();
    let before = ctx.topo.counter(ctx.mode);
    let (mpps, cpu, frames) = if ctx.mode == "tx" {
        measure_window(ctx, &|| w.cpu())
    } else if ctx.topo.rx_counted_by_kernel() || ctx.mode == "macswap" {
        measure_drain(&mut || ctx.topo.counter(ctx.mode).0, &|| w.cpu())
    } else {
        measure_drain(&mut || reads.load(Ordering::Relaxed), &|| w.cpu())
    };
    w.stop();
    Sample {
        mpps,
        frame_bytes: frame_bytes(ctx, before),
        cpu_per_mframe: cpu / (frames / 1e6),
        ..Default::default()
    }
}

/// Mean bytes per frame counted by the kernel since `before` (frames, bytes), or the nominal
/// size where the kernel's counter does not see the frames as they are read.
fn frame_bytes(ctx: &Ctx<'_>, before: (u64, u64)) -> f64 {
    let (f, b) = ctx.topo.counter(ctx.mode);
    if f <= before.0 || (ctx.mode == "rx" && !ctx.topo.rx_counted_by_kernel()) {
        return ctx.size as f64;
    }
    (b - before.1) as f64 / (f - before.0) as f64
}

/// Reads and discards whatever sits in the queues.
/// Attaches every queue and empties it. `for_limit`: the limit reads and writes the fds itself,
/// so it also sets the vnet header length and no offloads (macvhost sets its own).
fn attach_and_drain(queues: &[Arc<TapQueue>], for_limit: bool) {
    for q in queues {
        q.attach().expect("attach queue");
        if for_limit {
            q.set_vnet_hdr_len(HDR).expect("vnet hdr");
            q.set_offload(0).expect("offloads");
        }
    }
    drain(queues);
}

fn drain(queues: &[Arc<TapQueue>]) {
    let mut buf = vec![0u8; 65536 + 64];
    for q in queues {
        // SAFETY: reads into `buf`, which is large enough for any frame.
        while unsafe { libc::read(q.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

fn run_macvhost(ctx: &Ctx<'_>, tag: &str, extra: &[String]) -> Sample {
    attach_and_drain(ctx.queues, false);
    let mut in0 = ctx.topo.counter("rx").0;
    let mut out0 = ctx.topo.counter("tx").0;
    let mut p = start_macvhost_testpmd(ctx, tag, extra);
    if ctx.mode != "tx" {
        // macvhost detaches its queues while no frontend uses them (which empties them), so
        // the backlog goes in once it serves the frontend, while the frontend is paused: the
        // RX ring fills up and macvhost stops reading until `start`.
        p.stop_forwarding();
        in0 = ctx.topo.counter("rx").0;
        out0 = ctx.topo.counter("tx").0;
    }
    if ctx.mode != "tx" {
        prefill(ctx);
        p.command("start");
    }
    let pid = p.macvhost.id();
    let stat = format!("/proc/{pid}/stat");
    let before = ctx.topo.counter(ctx.mode);
    let (mpps, cpu, frames) = if ctx.mode == "tx" {
        measure_window(ctx, &|| cpu_secs(&stat))
    } else if ctx.topo.rx_counted_by_kernel() || ctx.mode == "macswap" {
        measure_drain(&mut || ctx.topo.counter(ctx.mode).0, &|| cpu_secs(&stat))
    } else {
        // macvtap counts frames as it queues them, not as they are read: take the frontend's
        // count of frames received instead.
        measure_drain(&mut || p.rx_packets_now(), &|| cpu_secs(&stat))
    };
    let bytes_per_frame = frame_bytes(ctx, before);
    let (rss, anon) = rss_kib(pid);
    // Stop the frontend's forwarding, let what it queued come out, then count.
    p.stop_forwarding();
    thread::sleep(Duration::from_millis(300));
    let into_macvhost_rx = ctx.topo.counter("rx").0 - in0;
    let out_of_macvhost_tx = ctx.topo.counter("tx").0 - out0;
    let report = macvhost::control::fetch_stats(&p.ctl).ok();
    p.quit_testpmd();
    let log = p.tp_text();
    stop_child(&mut p.macvhost, libc::SIGTERM, Duration::from_secs(10));
    if let Some(r) = &report {
        let _ = fs::write(
            ctx.dir.join(format!("{tag}.stats.txt")),
            macvhost::control::render_table(r),
        );
    }
    let mut s = Sample {
        mpps,
        frame_bytes: bytes_per_frame,
        cpu_per_mframe: cpu / (frames / 1e6),
        rss_kib: rss,
        anon_kib: anon,
        ..Default::default()
    };
    let mut sum = BTreeMap::<String, u64>::new();
    if let Some(r) = &report {
        for q in &r.queues {
            for (k, v) in &q.counters {
                *sum.entry(k.clone()).or_default() += v;
            }
        }
    }
    s.drops = sum
        .iter()
        .filter(|(k, _)| k.contains("_drop_"))
        .map(|(_, v)| v)
        .sum();
    match testpmd_totals(&log) {
        Some((tp_rx, tp_tx)) => {
            let rx_gap = signed_gap(into_macvhost_rx, tp_rx);
            let tx_gap = signed_gap(tp_tx, out_of_macvhost_tx);
            s.unaccounted = match ctx.mode {
                "tx" => tx_gap,
                "rx" => rx_gap,
                _ => rx_gap + tx_gap,
            };
        }
        None => s.note = "no testpmd totals".into(),
    }
    if s.drops > 0 {
        let reasons: Vec<String> = sum
            .iter()
            .filter(|(k, v)| k.contains("_drop_") && **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        s.note = reasons.join(" ");
    }
    if report.is_none() {
        s.note.push_str(" no macvhost stats");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// DPDK's own vhost-user backend as a peer row
// ---------------------------------------------------------------------------------------------

/// The tap DPDK's `net_tap` creates (it cannot attach to a tap opened with a vnet header:
/// TUNSETIFF answers EINVAL), counted where its frames come out like the harness's tap.
const DPDK_TAP: &str = "dvt0";

/// TX through DPDK's vhost-user backend: a second testpmd with `net_vhost` (the socket) and
/// `net_tap` (its own tap) in io forwarding, both lcores on the device CPU, driven by the same
/// `net_virtio_user` frontend as macvhost. Frames counted as the tap netdev receives them.
fn run_dpdk(ctx: &Ctx<'_>, tag: &str) -> Sample {
    let dir = ctx.dir;
    let sock = dir.join(format!("{tag}.sock"));
    let _ = fs::remove_file(&sock);
    let q = ctx.queues.len();
    let prefix = format!("mvhb{}{tag}b", std::process::id());
    let mut args: Vec<String> = vec![
        // Main lcore 0 and forwarding lcore 1, both on the device CPU, as macvhost is.
        format!("--lcores=0@{DEV_CPU},1@{DEV_CPU}"),
        "--no-huge".into(),
        "-m".into(),
        "512".into(),
        "--no-pci".into(),
        format!("--file-prefix={prefix}"),
        format!("--vdev=net_vhost0,iface={},queues={q}", sock.display()),
        format!("--vdev=net_tap0,iface={DPDK_TAP}"),
        "--".into(),
        "-i".into(),
        "--auto-start".into(),
        "--forward-mode=io".into(),
        "--nb-cores=1".into(),
        format!("--rxq={q}"),
        format!("--txq={q}"),
        "--total-num-mbufs=16384".into(),
    ];
    if ctx.size > 1500 {
        args.push("--mbuf-size=10240".into());
        args.push(format!("--max-pkt-len={}", ctx.size + 18));
    }
    let log = dir.join(format!("{tag}.dpdk.log"));
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", "dpdk-testpmd"])
        .args(&args)
        .stdin(Stdio::piped());
    let mut backend = spawn_pinned(&mut cmd, Some(DEV_CPU), &log);
    let mut backend_in = backend.stdin.take();
    let text = || fs::read_to_string(&log).unwrap_or_default();
    let up = wait_until(Duration::from_secs(60), || {
        if let Ok(Some(st)) = backend.try_wait() {
            panic!("DPDK backend exited ({st}):\n{}", text());
        }
        text().contains("testpmd> ") && sock.exists()
    });
    assert!(up, "DPDK backend did not start:\n{}", text());
    let counter = || read_counter(DPDK_TAP, "rx_packets");
    let bytes = || read_counter(DPDK_TAP, "rx_bytes");
    let out0 = counter();
    let (f0, b0) = (counter(), bytes());
    let (mut testpmd, mut stdin, tp_log, fe_prefix) = start_frontend(ctx, tag, &sock);
    let stat = format!("/proc/{}/stat", backend.id());
    let (mpps, cpu, frames) = measure_window_on(ctx, &counter, &|| cpu_secs(&stat));
    let frame_bytes = {
        let (f, b) = (counter() - f0, bytes() - b0);
        if f > 0 {
            b as f64 / f as f64
        } else {
            ctx.size as f64
        }
    };
    let (rss, anon) = rss_kib(backend.id());
    let say = |i: &mut Option<std::process::ChildStdin>, c: &str| {
        if let Some(i) = i.as_mut() {
            let _ = writeln!(i, "{c}");
            let _ = i.flush();
        }
    };
    say(&mut stdin, "stop");
    wait_until(Duration::from_secs(10), || {
        fs::read_to_string(&tp_log)
            .unwrap_or_default()
            .contains("Accumulated forward statistics for all ports")
    });
    thread::sleep(Duration::from_millis(300));
    let out = counter() - out0;
    let fe_log = fs::read_to_string(&tp_log).unwrap_or_default();
    say(&mut stdin, "quit");
    stop_child(&mut testpmd, libc::SIGINT, Duration::from_secs(20));
    say(&mut backend_in, "quit");
    stop_child(&mut backend, libc::SIGINT, Duration::from_secs(20));
    for p in [&fe_prefix, &prefix] {
        let _ = fs::remove_dir_all(format!("/var/run/dpdk/{p}"));
    }
    let mut s = Sample {
        mpps,
        frame_bytes,
        cpu_per_mframe: cpu / (frames / 1e6),
        rss_kib: rss,
        anon_kib: anon,
        ..Default::default()
    };
    match testpmd_totals(&fe_log) {
        Some((_, tp_tx)) => {
            s.unaccounted =
                i64::try_from(tp_tx).unwrap_or(i64::MAX) - i64::try_from(out).unwrap_or(i64::MAX)
        }
        None => s.note = "no testpmd totals".into(),
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Latency: one frame in flight
// ---------------------------------------------------------------------------------------------

/// Round trips of one frame at a time from the peer side: an AF_PACKET socket on `iface` sends
/// a 64 B frame to `dst` and waits for it to come back with the MACs swapped (the device side
/// echoes it), `secs` long after `warmup` seconds. Returns the round-trip times in µs; a frame
/// not back within 100 ms counts as lost (and is not a sample).
fn ping_pong(iface: &str, dst: [u8; 6], warmup: f64, secs: f64) -> (Vec<f64>, u64) {
    // Our own frames would otherwise come back on this socket as outgoing copies.
    let sock = packet_socket(
        iface,
        libc::ETH_P_IP as u16,
        &[(libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1)],
    );
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let mut frame = eth_frame(64, dst, PEER_MAC, 7);
    let mut buf = vec![0u8; 2048];
    let mut rtts = Vec::with_capacity(200_000);
    let mut lost = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(warmup + secs);
    let mut seq = 0u64;
    while Instant::now() < end {
        seq += 1;
        frame[42..50].copy_from_slice(&seq.to_be_bytes());
        let t0 = Instant::now();
        // SAFETY: sends `frame`, alive for the call.
        let n = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), 0) };
        assert!(n > 0, "send: {}", std::io::Error::last_os_error());
        let back = loop {
            let left = Duration::from_millis(100).saturating_sub(t0.elapsed());
            if left.is_zero() {
                break false;
            }
            wait_fd(fd, libc::POLLIN);
            // SAFETY: reads into `buf`, which is large enough for any frame here.
            let n =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n >= 50 && buf[0..6] == PEER_MAC && buf[42..50] == seq.to_be_bytes() {
                break true;
            }
        };
        let rtt = t0.elapsed();
        if !back {
            lost += 1;
        } else if t0.duration_since(start).as_secs_f64() >= warmup {
            rtts.push(rtt.as_secs_f64() * 1e6);
        }
    }
    (rtts, lost)
}

/// p-th percentile (0..=100) of `v`.
fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() - 1) as f64 * p / 100.0).round() as usize;
    v[i]
}

/// A latency sample from round-trip times: p50 and p99 in µs (in `mpps` and `cpu_per_mframe`,
/// which the latency table reads as such), round trips in `frame_bytes`.
fn latency_sample(rtts: Vec<f64>, lost: u64) -> Sample {
    let n = rtts.len();
    Sample {
        mpps: percentile(rtts.clone(), 50.0),
        cpu_per_mframe: percentile(rtts, 99.0),
        frame_bytes: n as f64,
        unaccounted: i64::try_from(lost).unwrap_or(i64::MAX),
        ..Default::default()
    }
}

/// The pinger, on the device CPU (the device side sleeps between frames, as the pinger does;
/// testpmd's busy lcore owns the other CPU).
fn ping_from_peer(ctx: &Ctx<'_>) -> Sample {
    let (peer, dst) = (ctx.topo.peer.to_string(), ctx.topo.gen_dst);
    let (warm, secs) = (ctx.opts.warmup, ctx.opts.secs);
    let (rtts, lost) = thread::spawn(move || {
        pin_to(DEV_CPU);
        ping_pong(&peer, dst, warm, secs)
    })
    .join()
    .unwrap();
    latency_sample(rtts, lost)
}

/// The limit: `readv`, swap the MACs, `writev` back on the same fd, one thread per fd that
/// sleeps in `poll` between frames.
fn run_latency_limit(ctx: &Ctx<'_>) -> Sample {
    attach_and_drain(ctx.queues, true);
    let mut w = Workers::new();
    for q in ctx.queues {
        let fd = q.as_raw_fd();
        w.spawn(DEV_CPU, move |stop, reads| {
            limit_rx(fd, 2048, true, stop, reads)
        });
    }
    let s = ping_from_peer(ctx);
    w.stop();
    s
}

/// macvhost under testpmd macswap (a busy-polling frontend on the other CPU).
fn run_latency_macvhost(ctx: &Ctx<'_>, tag: &str, extra: &[String]) -> Sample {
    attach_and_drain(ctx.queues, false);
    let mut p = start_macvhost_testpmd(ctx, tag, extra);
    let s = ping_from_peer(ctx);
    p.stop_forwarding();
    p.quit_testpmd();
    stop_child(&mut p.macvhost, libc::SIGTERM, Duration::from_secs(10));
    s
}

/// A note when the kernel counted frames of another mean size than asked for.
fn size_note(size: usize, seen: Vec<f64>) -> String {
    let m = median(seen);
    if (m - size as f64).abs() > size as f64 * 0.01 {
        format!("kernel counted {m:.0} B/frame")
    } else {
        String::new()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    // total_cmp: a ratio over a zero rate (NaN) sorts last instead of panicking.
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Row {
    kind: String,
    queues: u16,
    size: usize,
    mode: String,
    who: String,
    mpps: f64,
    gbps: f64,
    ratio: f64,
    cpu: f64,
    rss_mib: f64,
    drops: u64,
    unaccounted: i64,
    runs: Vec<f64>,
    note: String,
}

/// A table cell: `value()` when it means something for this row, else a dash.
fn cell(applies: bool, value: impl FnOnce() -> String) -> String {
    if applies {
        value()
    } else {
        "—".to_string()
    }
}

/// Each repetition's figure with `decimals` decimals, space separated.
fn join_runs(runs: &[f64], decimals: usize) -> String {
    runs.iter()
        .map(|x| format!("{x:.decimals$}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn fmt_row(r: &Row) -> String {
    let ratio = cell(!r.ratio.is_nan(), || format!("{:.2}", r.ratio));
    let rss = cell(r.rss_mib > 0.0, || format!("{:.1}", r.rss_mib));
    let drops = cell(r.who != "limit", || {
        format!("{} / {}", r.drops, r.unaccounted)
    });
    let runs = join_runs(&r.runs, 3);
    format!(
        "| {} | {} | {} | {} | {} | {:.3} | {:.2} | {} | {:.2} | {} | {} | {} | {} |",
        r.kind,
        r.queues,
        r.size,
        r.mode,
        r.who,
        r.mpps,
        r.gbps,
        ratio,
        r.cpu,
        rss,
        drops,
        runs,
        r.note
    )
}

/// One latency row: round trips of one frame in flight (64 B), µs.
struct LatRow {
    kind: String,
    queues: u16,
    who: String,
    p50: f64,
    p99: f64,
    /// Median over repetitions of (this p50 − the limit's p50 of the same repetition).
    over_limit: f64,
    rounds: u64,
    lost: u64,
    runs: Vec<f64>,
}

const LAT_HEAD: &str = "\
| device | qp | latency, one 64 B frame in flight | p50 µs | p99 µs | p50 over the limit, µs | round trips | lost | runs (p50 µs) |
|---|---|---|---|---|---|---|---|---|";

fn fmt_lat(r: &LatRow, is_limit: bool) -> String {
    let over = cell(!is_limit, || format!("{:+.1}", r.over_limit));
    let runs = join_runs(&r.runs, 1);
    format!(
        "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} |",
        r.kind, r.queues, r.who, r.p50, r.p99, over, r.rounds, r.lost, runs
    )
}

const TABLE_HEAD: &str = "\
| device | qp | frame B | mode | who | Mpps | Gbps | ratio | CPU s/Mframe | RSS MiB | drops / unaccounted | runs (Mpps) | note |
|---|---|---|---|---|---|---|---|---|---|---|---|---|";

fn inside(opts: &Opts) {
    let dir = tempfile::Builder::new()
        .prefix("mvhb-")
        .tempdir()
        .expect("tempdir");
    let dirp = dir.path().to_path_buf();
    // Benchmark a private copy: a rebuild during the run must not change the binary mid-way.
    let mut opts = opts.clone();
    let copy = dirp.join("macvhost");
    fs::copy(&opts.macvhost, &copy).expect("copy the macvhost binary");
    opts.macvhost = copy;
    let opts = &opts;
    // The namespace came with IPv6 off (no chatter on the test links) and loopback up.
    if std::env::var_os("MVHB_PROBE").is_some() {
        probe_counters(opts, &dirp);
        return;
    }
    let started = chrono_now();
    println!("{TABLE_HEAD}");
    let mut rows: Vec<Row> = Vec::new();
    let mut lat_rows: Vec<LatRow> = Vec::new();
    let mut tagn = 0;
    for kind in &opts.kinds {
        let topo = Topo::create(kind);
        for &nq in &opts.queues {
            let (dev, queues) = topo.open(nq);
            for &size in &opts.sizes {
                topo.set_mtu(if size > 1500 { 9000 } else { 1500 });
                for mode in &opts.modes {
                    let lat = mode == "lat";
                    // Latency: 64 B frames, once per device and pair count.
                    if lat && size != opts.sizes[0] {
                        continue;
                    }
                    let size = if lat { 64 } else { size };
                    let ctx = Ctx::new((opts, &dirp), &topo, &queues, size, mode);
                    let mut lim: Vec<Sample> = Vec::new();
                    let mut mv: Vec<Vec<Sample>> = vec![Vec::new(); opts.variants.len()];
                    // DPDK's backend has a TX row on tap only (net_tap makes its own tap; it
                    // cannot drive a macvtap, and its RX is signal-driven, see BENCHMARKS.md).
                    let dpdk = opts.dpdk && kind == "tap" && mode == "tx";
                    let mut dp: Vec<Sample> = Vec::new();
                    for _rep in 0..opts.reps {
                        lim.push(if lat {
                            run_latency_limit(&ctx)
                        } else {
                            run_limit(&ctx)
                        });
                        for (vi, (_, extra)) in opts.variants.iter().enumerate() {
                            tagn += 1;
                            let tag = format!("r{tagn}");
                            mv[vi].push(if lat {
                                run_latency_macvhost(&ctx, &tag, extra)
                            } else {
                                run_macvhost(&ctx, &tag, extra)
                            });
                        }
                        if dpdk {
                            tagn += 1;
                            dp.push(run_dpdk(&ctx, &format!("r{tagn}")));
                        }
                    }
                    if lat {
                        let mut push = |who: &str, s: &[Sample]| {
                            let r = LatRow {
                                kind: kind.clone(),
                                queues: nq,
                                who: who.to_string(),
                                p50: median(s.iter().map(|x| x.mpps).collect()),
                                p99: median(s.iter().map(|x| x.cpu_per_mframe).collect()),
                                over_limit: median(
                                    s.iter().zip(&lim).map(|(m, l)| m.mpps - l.mpps).collect(),
                                ),
                                rounds: s.iter().map(|x| x.frame_bytes).sum::<f64>() as u64,
                                lost: s.iter().map(|x| x.unaccounted.max(0) as u64).sum(),
                                runs: s.iter().map(|x| x.mpps).collect(),
                            };
                            println!("{}", fmt_lat(&r, who == "limit"));
                            lat_rows.push(r);
                        };
                        push("limit", &lim);
                        for (vi, (name, _)) in opts.variants.iter().enumerate() {
                            push(name, &mv[vi]);
                        }
                        continue;
                    }
                    // A row of `s`'s medians, its rate against the limit of the same repetition.
                    let measured = |who: &str, s: &[Sample]| Row {
                        kind: kind.clone(),
                        queues: nq,
                        size,
                        mode: mode.clone(),
                        who: who.to_string(),
                        mpps: median(s.iter().map(|x| x.mpps).collect()),
                        gbps: median(s.iter().map(|x| x.mpps * x.frame_bytes * 8e-3).collect()),
                        ratio: median(s.iter().zip(&lim).map(|(m, l)| m.mpps / l.mpps).collect()),
                        cpu: median(s.iter().map(|x| x.cpu_per_mframe).collect()),
                        rss_mib: median(s.iter().map(|x| x.rss_kib as f64).collect()) / 1024.0,
                        drops: s.iter().map(|x| x.drops).sum(),
                        unaccounted: s.iter().map(|x| x.unaccounted).max().unwrap_or(0),
                        runs: s.iter().map(|x| x.mpps).collect(),
                        note: String::new(),
                    };
                    let lim_row = Row {
                        ratio: f64::NAN,
                        rss_mib: 0.0,
                        drops: 0,
                        unaccounted: 0,
                        note: size_note(size, lim.iter().map(|s| s.frame_bytes).collect()),
                        ..measured("limit", &lim)
                    };
                    println!("{}", fmt_row(&lim_row));
                    rows.push(lim_row);
                    for (vi, (name, _)) in opts.variants.iter().enumerate() {
                        let s = &mv[vi];
                        let size_seen = size_note(size, s.iter().map(|x| x.frame_bytes).collect());
                        let notes: Vec<&str> = s
                            .iter()
                            .map(|x| x.note.as_str())
                            .chain(std::iter::once(size_seen.as_str()))
                            .filter(|n| !n.is_empty())
                            .collect();
                        let row = Row {
                            note: notes.join("; "),
                            ..measured(name, s)
                        };
                        println!("{}", fmt_row(&row));
                        rows.push(row);
                    }
                    if dpdk {
                        // Each macvhost run against the DPDK run of the same repetition.
                        let mv0 = &mv[0];
                        let rate: Vec<f64> =
                            mv0.iter().zip(&dp).map(|(m, d)| m.mpps / d.mpps).collect();
                        let cpu: Vec<f64> = mv0
                            .iter()
                            .zip(&dp)
                            .map(|(m, d)| m.cpu_per_mframe / d.cpu_per_mframe)
                            .collect();
                        let row = Row {
                            drops: 0,
                            note: format!(
                                "{}/dpdk: Mpps {:.2}, CPU per frame {:.2}",
                                opts.variants[0].0,
                                median(rate),
                                median(cpu)
                            ),
                            ..measured("dpdk", &dp)
                        };
                        println!("{}", fmt_row(&row));
                        rows.push(row);
                    }
                }
            }
            drop(queues);
            drop(dev);
        }
        topo.destroy();
    }
    let mut rss_line = String::new();
    if opts.rss_queues > 0 {
        rss_line = rss_at(opts, &dirp, opts.rss_queues);
        println!("\n{rss_line}");
    }
    if let Some(out) = &opts.out {
        let mut md = String::new();
        let _ = writeln!(md, "<!-- e2e bench, started {started} -->");
        let _ = writeln!(
            md,
            "reps {}, window {} s after {} s warm-up, kernel {}, {}",
            opts.reps,
            opts.secs,
            opts.warmup,
            uname_r(),
            cpu_model()
        );
        let _ = writeln!(md, "\n{TABLE_HEAD}");
        for r in &rows {
            let _ = writeln!(md, "{}", fmt_row(r));
        }
        if !lat_rows.is_empty() {
            let _ = writeln!(md, "\n{LAT_HEAD}");
            for r in &lat_rows {
                let _ = writeln!(md, "{}", fmt_lat(r, r.who == "limit"));
            }
        }
        if !rss_line.is_empty() {
            let _ = writeln!(md, "\n{rss_line}");
        }
        if let Some(p) = out.parent() {
            let _ = fs::create_dir_all(p);
        }
        fs::write(out, md).expect("write --out");
        println!("\nwritten: {}", out.display());
    }
    if opts.keep_logs {
        let kept = dir.keep();
        println!("logs kept in {}", kept.display());
    }
}

/// RSS of macvhost serving `nq` queue pairs (macvtap) under testpmd txonly traffic.
fn rss_at(opts: &Opts, dir: &Path, nq: u16) -> String {
    let topo = Topo::create("macvtap");
    let (dev, queues) = topo.open(nq);
    let ctx = Ctx::new((opts, dir), &topo, &queues, 64, "tx");
    let mut lines = Vec::new();
    for (name, extra) in &opts.variants {
        let s = run_macvhost(&ctx, &format!("rss{nq}{name}"), extra);
        lines.push(format!(
            "RSS of macvhost ({name}) at {nq} queue pairs (macvtap, testpmd txonly 64 B, {:.3} Mpps): \
             VmRSS {:.1} MiB, of which anonymous {:.1} MiB (the rest is guest memory it touched).",
            s.mpps,
            s.rss_kib as f64 / 1024.0,
            s.anon_kib as f64 / 1024.0
        ));
    }
    drop(queues);
    drop(dev);
    topo.destroy();
    lines.join("\n")
}

fn uname_r() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn cpu_model() -> String {
    let n = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = BufReader::new(File::open("/proc/cpuinfo").unwrap())
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':').map(|(_, m)| m.trim().to_string()))
        .unwrap_or_default();
    format!("{n} × {model}")
}

fn chrono_now() -> String {
    let out = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[allow(dead_code)]
fn flush() {
    let _ = std::io::stdout().flush();
}

/// Debug aid (`MVHB_PROBE=1`): how the kernel counts a backlog and its drain.
fn probe_counters(opts: &Opts, dir: &Path) {
    for kind in &opts.kinds {
        let topo = Topo::create(kind);
        let (dev, queues) = topo.open(1);
        let ctx = Ctx::new((opts, dir), &topo, &queues, 64, "rx");
        let show = |what: &str| {
            let f = ["rx_packets", "rx_dropped", "tx_packets", "tx_dropped"];
            let v: Vec<String> = topo
                .links
                .iter()
                .map(|l| {
                    format!(
                        "{l}: {}",
                        f.iter()
                            .map(|x| format!("{x}={}", read_counter(l, x)))
                            .collect::<Vec<_>>()
                            .join(" ")
                    )
                })
                .collect();
            println!("{kind} {what}: {}", v.join(" | "));
        };
        show("start");
        prefill(&ctx);
        show("after prefill");
        let mut buf = vec![0u8; 4096];
        let mut n = 0u64;
        // SAFETY: reads into buf.
        while unsafe { libc::read(queues[0].as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {
            n += 1;
        }
        println!("read {n}");
        show("after drain");
        drop(queues);
        drop(dev);
        topo.destroy();
    }
}
