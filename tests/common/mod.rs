//! The end-to-end harness on top of the test kit (`macvhost::testkit`: `require`, the netns and
//! topologies, the macvhost `Daemon` guard, which this module re-exports): the DPDK testpmd
//! guard, tagged test frames, and an AF_PACKET frame generator/checker.
//!
//! Shape of every end-to-end test:
//!
//! ```text
//!  netns mvh-<pid>-<n>                                   root netns
//!  ┌────────────────────────────────────────────┐
//!  │ Peer (AF_PACKET) ─ peer0 ═veth═ lower0      │
//!  │                                   └ mvt0 (macvtap, bridge)
//!  │                                      │ /dev/tapN queue fds
//!  │                               macvhost ── vhost-user socket (tempdir) ── dpdk-testpmd
//!  └────────────────────────────────────────────┘              net_virtio_user0, fwd macswap
//! ```
//!
//! The peer sends frames addressed to the macvtap's MAC; macvhost hands them to the frontend
//! (virtio RX), testpmd swaps the two MAC fields and sends them back (virtio TX), macvhost writes
//! them to the macvtap, and they come out of `lower0` into `peer0`. The checker compares every
//! returned frame byte for byte with the frame it sent (MAC fields swapped).
//!
//! All guards clean up on `Drop`, also while unwinding from a failed assertion, and print the
//! captured logs of macvhost and testpmd when the test is failing.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

// Each suite uses part of this; together they are the harness's vocabulary.
#[allow(unused_imports)]
pub use macvhost::host::MacAddr;
#[allow(unused_imports)]
pub use macvhost::require;
use macvhost::testkit::daemon::terminate;
#[allow(unused_imports)]
pub use macvhost::testkit::daemon::Daemon;
#[allow(unused_imports)]
pub use macvhost::testkit::netns::{
    dev_node, free_ifindex, run_ok, DevNodeGuard, IfaceStats, MacvtapTopo, NetNs, TapTopo,
    GUEST_MAC, LOWER_MAC, PEER_MAC,
};
#[allow(unused_imports)]
pub use macvhost::testkit::{wait_until, Need};
use nix::sys::signal::Signal;

/// What the end-to-end tests need: root, `ip` and DPDK testpmd.
pub const E2E: &[Need] = &[Need::Root, Need::Tool("ip"), Need::Tool("dpdk-testpmd")];
/// What the host tests need: root and `ip` (the frontend is the in-process test driver).
pub const HOST: &[Need] = &[Need::Root, Need::Tool("ip")];

/// The running test's name (libtest names each test's thread after it), for summary lines.
pub fn test_name() -> String {
    std::thread::current().name().unwrap_or("?").to_owned()
}

/// How every privileged test here starts: the clock, a temp dir for sockets and logs, and a
/// fresh network namespace (`mvh-<tag>-…`).
pub fn start(tag: &str) -> (Instant, tempfile::TempDir, NetNs) {
    (
        Instant::now(),
        tempfile::tempdir().expect("tempdir"),
        NetNs::new(tag),
    )
}

/// How long to wait for the datapath to come up (first probe frame echoed back).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Local experimental ethertype used for raw test frames.
pub const TEST_ETHERTYPE: u16 = 0x88B5;
/// UDP destination port of the multiqueue test frames (source port = `UDP_SPORT_BASE + flow`).
pub const UDP_DPORT: u16 = 9999;
pub const UDP_SPORT_BASE: u16 = 10_000;
const MAGIC: [u8; 4] = *b"MVH1";
/// Tag = magic(4) run(4) flow(2) seq(4) len(2).
const TAG_LEN: usize = 16;
const PROBE_RUN: u32 = 0xffff_ffff;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique_suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Last `n` lines of a log file (for failure output).
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {path:?}: {e}>"));
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// dpdk-testpmd guard
// ---------------------------------------------------------------------------------------------

/// Options for a virtio-user testpmd (the frontend, i.e. the "guest").
#[derive(Clone, Debug)]
pub struct TestpmdConfig {
    pub queues: u16,
    /// MAC of the virtio-user port (the guest's MAC).
    pub mac: MacAddr,
    /// `--forward-mode`: `macswap` echoes frames back with the MAC fields swapped.
    pub forward_mode: String,
    /// Extra `net_virtio_user0` devargs, e.g. `packed_vq=1,mrg_rxbuf=0`.
    pub vdev_extra: String,
    /// Extra application arguments (after `--`).
    pub app_extra: Vec<String>,
}

impl TestpmdConfig {
    pub fn macswap(queues: u16, mac: MacAddr) -> TestpmdConfig {
        TestpmdConfig {
            queues,
            mac,
            forward_mode: "macswap".into(),
            vdev_extra: String::new(),
            app_extra: Vec::new(),
        }
    }
}

/// A running dpdk-testpmd. On drop: SIGINT, wait (then SIGKILL), remove its runtime dir; prints
/// its log when the test is failing.
#[derive(Debug)]
pub struct Testpmd {
    child: Option<Child>,
    log: PathBuf,
    prefix: String,
    name: String,
}

/// Markers in testpmd's output that mean the virtio-user port will never pass traffic.
const TESTPMD_FATAL: [&str; 5] = [
    "virtio_user_dev_init fails",
    "Failed to start device",
    "Failed to setup backend",
    "No probed ethernet devices",
    "EAL: Error",
];

impl Testpmd {
    /// The EAL + app arguments of a virtio-user frontend on `socket`.
    pub fn virtio_user_args(socket: &Path, prefix: &str, cfg: &TestpmdConfig) -> Vec<String> {
        let q = cfg.queues;
        let mut vdev = format!(
            "--vdev=net_virtio_user0,path={},queues={q},mac={}",
            socket.display(),
            cfg.mac
        );
        if !cfg.vdev_extra.is_empty() {
            vdev.push(',');
            vdev.push_str(&cfg.vdev_extra);
        }
        let mut args: Vec<String> = [
            "-l",
            "0,1",
            "--no-huge",
            "-m",
            "1024",
            "--no-pci",
            &format!("--file-prefix={prefix}"),
            &vdev,
            "--",
            "--total-num-mbufs=16384",
            &format!("--forward-mode={}", cfg.forward_mode),
            "--nb-cores=1",
            &format!("--rxq={q}"),
            &format!("--txq={q}"),
            "--auto-start",
            "--stats-period=1",
            "--no-mlockall",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(cfg.app_extra.iter().cloned());
        args
    }

    /// Spawns a virtio-user frontend (in the root namespace) connecting to `socket`.
    pub fn spawn(socket: &Path, dir: &Path, cfg: &TestpmdConfig) -> Testpmd {
        let prefix = format!("mvh{}", unique_suffix().replace('-', "x"));
        let args = Self::virtio_user_args(socket, &prefix, cfg);
        Self::spawn_raw(None, dir, &format!("testpmd-{prefix}"), &prefix, &args)
    }

    /// Spawns `dpdk-testpmd ARGS` (optionally inside `ns`), output to `DIR/NAME.log`. `args`
    /// must contain `--file-prefix=PREFIX`.
    pub fn spawn_raw(
        ns: Option<&NetNs>,
        dir: &Path,
        name: &str,
        prefix: &str,
        args: &[String],
    ) -> Testpmd {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("create testpmd log");
        let mut cmd = match ns {
            Some(ns) => ns.command("dpdk-testpmd"),
            None => Command::new("dpdk-testpmd"),
        };
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log fd"))
            .stderr(out)
            .spawn()
            .expect("spawn dpdk-testpmd");
        Testpmd {
            child: Some(child),
            log,
            prefix: prefix.to_string(),
            name: name.to_string(),
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Panics (with the log) if testpmd exited or logged that its port cannot work.
    pub fn check_alive(&mut self) {
        let child = self.child.as_mut().expect("child");
        let exited = child.try_wait().expect("try_wait");
        let text = self.log_text();
        let fatal = TESTPMD_FATAL.iter().find(|m| text.contains(*m));
        if exited.is_some() || fatal.is_some() {
            panic!(
                "{} is not usable (exit: {exited:?}, log says: {fatal:?}); log {:?}:\n{}",
                self.name,
                self.log,
                tail(&self.log, 120)
            );
        }
    }

    /// Waits until testpmd is forwarding (its log says so).
    pub fn wait_forwarding(&mut self, timeout: Duration) {
        let ok = wait_until(timeout, || {
            self.check_alive();
            self.log_text().contains("start packet forwarding")
        });
        assert!(
            ok,
            "{} did not start forwarding within {timeout:?}",
            self.name
        );
    }

    /// SIGINT, wait up to 30 s for the exit, and parse its final forward statistics.
    pub fn stop(mut self) -> TestpmdStats {
        let mut child = self.child.take().expect("child");
        let status = terminate(&mut child, Signal::SIGINT, Duration::from_secs(30));
        let text = self.log_text();
        match status {
            Ok(s) if s.success() => {}
            other => panic!(
                "{} did not exit cleanly on SIGINT ({other:?}); log:\n{}",
                self.name,
                tail(&self.log, 120)
            ),
        }
        let stats = TestpmdStats::parse(&text);
        stats.unwrap_or_else(|| {
            panic!(
                "no final forward statistics in {} log:\n{}",
                self.name,
                tail(&self.log, 120)
            )
        })
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = terminate(&mut child, Signal::SIGINT, Duration::from_secs(15));
        }
        let _ = fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
        if thread::panicking() {
            eprintln!(
                "---- {} log ({:?}) ----\n{}\n---- end {} log ----",
                self.name,
                self.log,
                tail(&self.log, 150),
                self.name
            );
        }
    }
}

/// testpmd's final "Forward statistics" (printed when forwarding stops), with the per-stream
/// (= per queue pair, for one port) block that testpmd prints when there is more than one
/// stream.
#[derive(Clone, Debug, Default)]
pub struct TestpmdStats {
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
    /// rx queue → (rx_packets, tx_packets, tx_dropped) of the stream RX q → TX q.
    pub per_queue: BTreeMap<u16, (u64, u64, u64)>,
}

impl TestpmdStats {
    /// Parses the last "Forward statistics for port 0" block and all per-stream blocks.
    pub fn parse(text: &str) -> Option<TestpmdStats> {
        let lines: Vec<&str> = text.lines().collect();
        let mut st = TestpmdStats::default();
        let mut found = false;
        for (i, line) in lines.iter().enumerate() {
            if line.contains("Forward statistics for port 0") {
                let rx = fields(lines.get(i + 1)?);
                let tx = fields(lines.get(i + 2)?);
                st.rx_packets = *rx.get("RX-packets")?;
                st.rx_dropped = *rx.get("RX-dropped")?;
                st.tx_packets = *tx.get("TX-packets")?;
                st.tx_dropped = *tx.get("TX-dropped")?;
                found = true;
            } else if let Some(rest) = line.split("Forward Stats for RX Port=").nth(1) {
                // " 0/Queue= 1 -> TX Port= 0/Queue= 1 -------"
                let q: u16 = rest
                    .split("Queue=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()?;
                let f = fields(lines.get(i + 1)?);
                st.per_queue.insert(
                    q,
                    (
                        *f.get("RX-packets")?,
                        *f.get("TX-packets")?,
                        *f.get("TX-dropped")?,
                    ),
                );
            }
        }
        found.then_some(st)
    }
}

/// "RX-packets: 3   TX-packets: 3" → {RX-packets: 3, TX-packets: 3}
fn fields(line: &str) -> BTreeMap<String, u64> {
    let toks: Vec<&str> = line.split_whitespace().collect();
    let mut m = BTreeMap::new();
    for w in toks.windows(2) {
        if let Some(key) = w[0].strip_suffix(':') {
            if let Ok(v) = w[1].parse() {
                m.insert(key.to_string(), v);
            }
        }
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/// What the generator sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Ethernet + [`TEST_ETHERTYPE`] + tag + filler. The kernel's flow hash is the same for all
    /// of them, so macvtap puts them all on one queue.
    Raw,
    /// Ethernet + IPv4 + UDP (source port `UDP_SPORT_BASE + flow`) + tag + filler, so the
    /// kernel's flow hash (and with it macvtap's queue choice) differs per flow.
    Udp,
}

impl FrameKind {
    fn tag_offset(self) -> usize {
        match self {
            FrameKind::Raw => 14,
            FrameKind::Udp => 14 + 20 + 8,
        }
    }

    /// Smallest frame this kind can carry.
    pub fn min_len(self) -> usize {
        (self.tag_offset() + TAG_LEN).max(60)
    }
}

/// Identity of a generated frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    pub kind: FrameKind,
    pub run: u32,
    pub flow: u16,
    pub seq: u32,
    pub len: usize,
}

/// Builds a frame `dst ← src` of exactly `tag.len` bytes: headers, the tag, then filler derived
/// from (run, flow, seq), so the checker can rebuild the exact bytes.
pub fn build_frame(dst: MacAddr, src: MacAddr, tag: &Tag) -> Vec<u8> {
    let len = tag.len;
    assert!(
        len >= tag.kind.min_len() && len <= u16::MAX as usize,
        "len {len}"
    );
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    match tag.kind {
        FrameKind::Raw => f.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes()),
        FrameKind::Udp => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let ip_len = (len - 14) as u16;
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
            ip[4..6].copy_from_slice(&(tag.seq as u16).to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = 17;
            ip[12..16].copy_from_slice(&[10, 77, 0, 1]);
            ip[16..20].copy_from_slice(&[10, 77, 0, 2]);
            let csum = ipv4_checksum(&ip);
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            f.extend_from_slice(&ip);
            let sport = UDP_SPORT_BASE.wrapping_add(tag.flow);
            f.extend_from_slice(&sport.to_be_bytes());
            f.extend_from_slice(&UDP_DPORT.to_be_bytes());
            f.extend_from_slice(&(ip_len - 20).to_be_bytes());
            f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4)
        }
    }
    f.extend_from_slice(&MAGIC);
    f.extend_from_slice(&tag.run.to_be_bytes());
    f.extend_from_slice(&tag.flow.to_be_bytes());
    f.extend_from_slice(&tag.seq.to_be_bytes());
    f.extend_from_slice(&(len as u16).to_be_bytes());
    let mut x = (u64::from(tag.run) << 32) ^ (u64::from(tag.flow) << 48) ^ u64::from(tag.seq);
    while f.len() < len {
        let r = splitmix64(&mut x).to_le_bytes();
        let n = (len - f.len()).min(8);
        f.extend_from_slice(&r[..n]);
    }
    f
}

/// Reads the tag of a generated frame, or None for any other frame.
pub fn parse_tag(frame: &[u8]) -> Option<Tag> {
    if frame.len() < 14 {
        return None;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let kind = match ethertype {
        TEST_ETHERTYPE => FrameKind::Raw,
        0x0800
            if frame.len() >= 42
                && frame[14] == 0x45
                && frame[23] == 17
                && u16::from_be_bytes([frame[36], frame[37]]) == UDP_DPORT =>
        {
            FrameKind::Udp
        }
        _ => return None,
    };
    let t = &frame.get(kind.tag_offset()..kind.tag_offset() + TAG_LEN)?;
    if t[0..4] != MAGIC {
        return None;
    }
    Some(Tag {
        kind,
        run: u32::from_be_bytes(t[4..8].try_into().unwrap()),
        flow: u16::from_be_bytes(t[8..10].try_into().unwrap()),
        seq: u32::from_be_bytes(t[10..14].try_into().unwrap()),
        len: u16::from_be_bytes(t[14..16].try_into().unwrap()) as usize,
    })
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut x = t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32);
    splitmix64(&mut x) ^ u64::from(COUNTER.fetch_add(1, Ordering::Relaxed))
}

// ---------------------------------------------------------------------------------------------
// Peer: AF_PACKET generator / checker
// ---------------------------------------------------------------------------------------------

/// Sockopt from <linux/if_packet.h>: do not deliver our own transmitted frames to this socket.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// An AF_PACKET socket bound to one interface inside a namespace. Sends frames `local → remote`
/// and checks that they come back `remote → local`, byte for byte, with the MAC fields swapped.
#[derive(Debug)]
pub struct Peer {
    fd: OwnedFd,
    pub iface: String,
    pub local: MacAddr,
    pub remote: MacAddr,
}

/// A traffic run.
#[derive(Clone, Debug)]
pub struct Traffic {
    pub kind: FrameKind,
    pub count: u32,
    pub min_len: usize,
    pub max_len: usize,
    /// Flow ids cycle through 0..flows (UDP source ports for [`FrameKind::Udp`]).
    pub flows: u16,
    /// At most this many frames in flight (sent, not yet back): keeps the run below saturation.
    pub window: u32,
    /// Give up waiting for the remaining frames after this long without progress.
    pub drain_timeout: Duration,
}

impl Traffic {
    /// `count` raw frames, 60..=1514 bytes.
    pub fn raw(count: u32) -> Traffic {
        Traffic {
            kind: FrameKind::Raw,
            count,
            min_len: 60,
            max_len: 1514,
            flows: 1,
            window: 32,
            drain_timeout: Duration::from_secs(3),
        }
    }

    /// `count` IPv4/UDP frames spread over `flows` source ports, 60..=1514 bytes.
    pub fn udp(count: u32, flows: u16) -> Traffic {
        Traffic {
            kind: FrameKind::Udp,
            flows,
            ..Traffic::raw(count)
        }
    }

    /// Length of frame `seq`: the extremes first, then pseudo-random in between.
    pub fn len_of(&self, seq: u32) -> usize {
        let min = self.min_len.max(self.kind.min_len());
        match seq {
            0 => min,
            1 => self.max_len,
            2 => min + 1,
            3 => self.max_len - 1,
            _ => {
                let mut x = u64::from(seq) ^ 0x5eed;
                min + (splitmix64(&mut x) % (self.max_len - min + 1) as u64) as usize
            }
        }
    }
}

/// Outcome of a traffic run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub sent: u32,
    pub sent_bytes: u64,
    /// Distinct frames of this run that came back byte-exact.
    pub received: u32,
    /// Frames of this run that came back with different bytes.
    pub mismatched: u32,
    /// Frames of this run that came back more than once.
    pub duplicates: u32,
    /// Tagged frames of other runs (probes, earlier runs).
    pub stale: u32,
    /// Untagged frames seen on the interface.
    pub foreign: u32,
    /// Times the sender had to give up on a full window (frames lost in flight).
    pub stalls: u32,
    pub elapsed: Duration,
    /// Frames received per flow id.
    pub per_flow: BTreeMap<u16, u32>,
    pub first_mismatch: Option<String>,
    /// Up to 20 sequence numbers that never came back.
    pub missing: Vec<u32>,
}

impl Report {
    pub fn lost(&self) -> u32 {
        self.sent - self.received
    }

    /// All frames back, byte-exact, once.
    pub fn is_lossless_byte_exact(&self) -> bool {
        self.mismatched == 0 && self.duplicates == 0 && self.received == self.sent
    }

    /// Panics with the details unless [`Report::is_lossless_byte_exact`].
    pub fn assert_lossless_byte_exact(&self) {
        assert!(
            self.is_lossless_byte_exact(),
            "traffic run failed: {self}\nfirst mismatch: {}\nmissing (first 20): {:?}",
            self.first_mismatch.as_deref().unwrap_or("-"),
            self.missing
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {} ({} B), back {} exact, {} mismatched, {} dup, {} lost, {} stale, {} foreign, \
             {} stalls, {} flows, {:.2?}",
            self.sent,
            self.sent_bytes,
            self.received,
            self.mismatched,
            self.duplicates,
            self.lost(),
            self.stale,
            self.foreign,
            self.stalls,
            self.per_flow.len(),
            self.elapsed
        )
    }
}

impl Peer {
    /// Opens an AF_PACKET socket on `iface` inside `ns`. Frames go `local → remote`.
    pub fn open(ns: &NetNs, iface: &str, local: MacAddr, remote: MacAddr) -> Peer {
        let name = iface.to_string();
        let fd = ns.run(move || open_packet_socket(&name));
        Peer {
            fd: fd.unwrap_or_else(|e| panic!("AF_PACKET socket on {iface}: {e}")),
            iface: iface.to_string(),
            local,
            remote,
        }
    }

    /// The peer on `topo`'s veth end, sending to the macvtap's MAC.
    pub fn on_macvtap(ns: &NetNs, topo: &MacvtapTopo) -> Peer {
        Peer::open(ns, topo.peer, topo.peer_mac, topo.macvtap_mac)
    }

    /// The peer on a tap's own netdev, sending to [`GUEST_MAC`].
    pub fn on_tap(ns: &NetNs, tap: &TapTopo) -> Peer {
        Peer::open(ns, &tap.tap, PEER_MAC, GUEST_MAC)
    }

    /// Sends one frame (retries briefly on ENOBUFS).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        for _ in 0..100 {
            // SAFETY: `frame` is a valid buffer of `frame.len()` bytes for the duration of the
            // call; the fd is an open socket owned by self.
            let n =
                unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if usize::try_from(n) == Ok(frame.len()) {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if n >= 0 {
                return Err(io::Error::other(format!("short send {n}/{}", frame.len())));
            }
            if err.raw_os_error() != Some(libc::ENOBUFS) && err.kind() != io::ErrorKind::WouldBlock
            {
                return Err(err);
            }
            thread::sleep(Duration::from_millis(1));
        }
        Err(io::Error::other("send: ENOBUFS for 100 ms"))
    }

    /// Receives one frame, waiting at most `timeout`.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is a valid pollfd array of length 1 for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            return nothing_unless_worse_than(io::ErrorKind::Interrupted);
        }
        if rc == 0 {
            return Ok(None);
        }
        // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes for the call.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            return nothing_unless_worse_than(io::ErrorKind::WouldBlock);
        }
        Ok(Some(n as usize))
    }

    /// The frame this peer sends for `tag`.
    pub fn frame_out(&self, tag: &Tag) -> Vec<u8> {
        build_frame(self.remote, self.local, tag)
    }

    /// The frame this peer expects back for `tag` (MAC fields swapped).
    pub fn frame_back(&self, tag: &Tag) -> Vec<u8> {
        build_frame(self.local, self.remote, tag)
    }

    /// Sends a probe frame every 100 ms until one comes back (any of them); returns how long
    /// that took. Calls `check` between probes (to fail fast when a process died); panics on
    /// timeout.
    pub fn wait_for_echo(
        &self,
        kind: FrameKind,
        timeout: Duration,
        mut check: impl FnMut(),
    ) -> Duration {
        let start = Instant::now();
        let mut buf = vec![0u8; 65536];
        let mut seq = 0;
        while start.elapsed() < timeout {
            check();
            let tag = Tag {
                kind,
                run: PROBE_RUN,
                flow: 0,
                seq,
                len: kind.min_len(),
            };
            seq += 1;
            self.send(&self.frame_out(&tag)).expect("send probe");
            let until = Instant::now() + Duration::from_millis(100);
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                if let Some(n) = self.recv(&mut buf, left).expect("recv") {
                    if let Some(t) = parse_tag(&buf[..n.min(buf.len())]) {
                        if t.run == PROBE_RUN && buf[..6] == self.local.0 {
                            return start.elapsed();
                        }
                    }
                }
            }
        }
        panic!(
            "no probe frame came back on {} within {timeout:?} ({seq} probes sent)",
            self.iface
        );
    }

    /// One round against testpmd: `count` raw frames, every one back byte-exact, then testpmd
    /// stopped. Returns the round's summary line.
    pub fn lossless_round(&self, round: usize, count: u32, pmd: Testpmd) -> String {
        let rep = self.roundtrip(&Traffic::raw(count));
        rep.assert_lossless_byte_exact();
        let st = pmd.stop();
        format!("round {round}: [{rep}] testpmd rx {}", st.rx_packets)
    }

    /// Sends `t.count` frames with at most `t.window` in flight and checks every returned
    /// frame. Never panics on loss: inspect (or assert on) the [`Report`].
    pub fn roundtrip(&self, t: &Traffic) -> Report {
        let run = (seed() as u32) & 0x7fff_ffff;
        let n = t.count as usize;
        let mut seen = vec![false; n];
        let mut rep = Report::default();
        let mut buf = vec![0u8; 65536];
        let mut written_off: u32 = 0;
        let start = Instant::now();
        let mut last_progress = Instant::now();
        let tag_of = |seq: u32| Tag {
            kind: t.kind,
            run,
            flow: (seq % u32::from(t.flows.max(1))) as u16,
            seq,
            len: t.len_of(seq),
        };
        loop {
            while rep.sent < t.count
                && rep.sent.saturating_sub(rep.received + written_off) < t.window
            {
                let frame = self.frame_out(&tag_of(rep.sent));
                self.send(&frame).expect("send");
                rep.sent += 1;
                rep.sent_bytes += frame.len() as u64;
            }
            if rep.received == t.count {
                break;
            }
            let mut progress = false;
            if let Some(len) = self
                .recv(&mut buf, Duration::from_millis(20))
                .expect("recv")
            {
                progress = self.classify(&buf[..len.min(buf.len())], len, run, &mut seen, &mut rep);
            }
            if progress {
                last_progress = Instant::now();
            } else if rep.sent == t.count {
                if last_progress.elapsed() > t.drain_timeout {
                    break;
                }
            } else if last_progress.elapsed() > Duration::from_millis(500) {
                // The window is full and nothing came back for 500 ms: count the in-flight
                // frames as lost (for pacing only) and carry on.
                written_off = rep.sent - rep.received;
                rep.stalls += 1;
                last_progress = Instant::now();
            }
        }
        // Linger briefly to catch duplicates.
        let linger = Instant::now() + Duration::from_millis(100);
        while let Some(left) = linger.checked_duration_since(Instant::now()) {
            if let Some(len) = self.recv(&mut buf, left).expect("recv") {
                self.classify(&buf[..len.min(buf.len())], len, run, &mut seen, &mut rep);
            }
        }
        rep.elapsed = start.elapsed();
        rep.missing = (0..n)
            .filter(|&i| i < rep.sent as usize && !seen[i])
            .take(20)
            .map(|i| i as u32)
            .collect();
        rep
    }

    /// Accounts one received frame; returns true if it was a new frame of this run.
    fn classify(
        &self,
        frame: &[u8],
        wire_len: usize,
        run: u32,
        seen: &mut [bool],
        rep: &mut Report,
    ) -> bool {
        let Some(tag) = parse_tag(frame) else {
            rep.foreign += 1;
            return false;
        };
        if tag.run != run {
            rep.stale += 1;
            return false;
        }
        let seq = tag.seq as usize;
        if seq >= seen.len() {
            rep.mismatched += 1;
            return false;
        }
        let expected = self.frame_back(&tag);
        if wire_len != frame.len() || frame != expected.as_slice() {
            rep.mismatched += 1;
            if rep.first_mismatch.is_none() {
                let at = frame
                    .iter()
                    .zip(expected.iter())
                    .position(|(a, b)| a != b)
                    .unwrap_or(frame.len().min(expected.len()));
                rep.first_mismatch = Some(format!(
                    "seq {} len {} (expected {}): first difference at byte {at}; got {:02x?}, \
                     expected {:02x?}",
                    tag.seq,
                    wire_len,
                    expected.len(),
                    &frame[at.saturating_sub(4)..(at + 12).min(frame.len())],
                    &expected[at.saturating_sub(4)..(at + 12).min(expected.len())],
                ));
            }
            return false;
        }
        if seen[seq] {
            rep.duplicates += 1;
            return false;
        }
        seen[seq] = true;
        rep.received += 1;
        *rep.per_flow.entry(tag.flow).or_default() += 1;
        true
    }
}

/// After a failed call: `Ok(None)` (nothing received) when errno is of the `benign` kind, the
/// error otherwise.
fn nothing_unless_worse_than(benign: io::ErrorKind) -> io::Result<Option<usize>> {
    let e = io::Error::last_os_error();
    if e.kind() == benign {
        Ok(None)
    } else {
        Err(e)
    }
}

fn open_packet_socket(iface: &str) -> io::Result<OwnedFd> {
    let ifindex = nix::net::if_::if_nametoindex(iface).map_err(io::Error::from)?;
    // SAFETY: plain socket(2) call; the returned fd is checked and then owned.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a freshly created, valid fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let setopt = |level: libc::c_int, name: libc::c_int, val: libc::c_int| -> io::Result<()> {
        // SAFETY: `val` is a valid c_int for the duration of the call and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    setopt(libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)?;
    setopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20)?;
    setopt(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 4 << 20)?;
    // Created with protocol 0 (receives nothing) and bound with ETH_P_ALL + ifindex, so no frame
    // from another interface is ever queued on it.
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid initial value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = i32::try_from(ifindex).map_err(io::Error::other)?;
    // SAFETY: `sll` is a valid sockaddr_ll and its exact size is passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

// ---------------------------------------------------------------------------------------------
// Stand-ins (harness self-tests only)
// ---------------------------------------------------------------------------------------------

/// Reflects every frame received on `iface` back out of it with the MAC fields swapped, on a
/// background thread, until dropped. Lets the generator/checker be tested over a bare veth pair.
#[derive(Debug)]
pub struct Reflector {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<thread::JoinHandle<u64>>,
}

impl Reflector {
    /// Reflects every frame, unchanged apart from the MAC swap.
    pub fn start(ns: &NetNs, iface: &str) -> Reflector {
        Self::start_with(ns, iface, |_, f| Some(f.to_vec()))
    }

    /// Reflects `mutate(n, frame)` (frame already MAC-swapped, `n` counts received frames);
    /// `None` drops the frame. Used to prove the checker notices loss and corruption.
    pub fn start_with(
        ns: &NetNs,
        iface: &str,
        mut mutate: impl FnMut(u64, &[u8]) -> Option<Vec<u8>> + Send + 'static,
    ) -> Reflector {
        let peer = Peer::open(ns, iface, MacAddr([0; 6]), MacAddr([0; 6]));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                if let Ok(Some(len)) = peer.recv(&mut buf, Duration::from_millis(20)) {
                    let f = &mut buf[..len];
                    if f.len() >= 14 {
                        let mut dst = [0u8; 6];
                        dst.copy_from_slice(&f[0..6]);
                        f.copy_within(6..12, 0);
                        f[6..12].copy_from_slice(&dst);
                        if let Some(out) = mutate(n, f) {
                            peer.send(&out).expect("reflect");
                        }
                        n += 1;
                    }
                }
            }
            n
        });
        Reflector {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the thread; returns how many frames it reflected.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// DPDK's own vhost-user backend standing in for macvhost: `net_vhost0` on `socket` forwarded
/// (io mode) to a DPDK `net_tap0` that creates `tap` in `ns`. Serves the same role as
/// `macvhost --tap TAP`, so the virtio-user side of the harness can be validated without the
/// real binary.
pub fn spawn_dpdk_vhost_standin(
    ns: &NetNs,
    dir: &Path,
    socket: &Path,
    tap: &str,
    queues: u16,
) -> Testpmd {
    let prefix = format!("mvhvh{}", unique_suffix().replace('-', "x"));
    let args: Vec<String> = vec![
        "-l".into(),
        "0,1".into(),
        "--no-huge".into(),
        "-m".into(),
        "512".into(),
        "--no-pci".into(),
        format!("--file-prefix={prefix}"),
        format!(
            "--vdev=net_vhost0,iface={},queues={queues}",
            socket.display()
        ),
        format!("--vdev=net_tap0,iface={tap}"),
        "--".into(),
        "--total-num-mbufs=16384".into(),
        "--forward-mode=io".into(),
        "--nb-cores=1".into(),
        format!("--rxq={queues}"),
        format!("--txq={queues}"),
        "--auto-start".into(),
        "--stats-period=1".into(),
    ];
    let mut pmd = Testpmd::spawn_raw(Some(ns), dir, "dpdk-vhost-standin", &prefix, &args);
    let up = wait_until(Duration::from_secs(20), || {
        pmd.check_alive();
        socket.exists()
    });
    assert!(up, "stand-in did not create {socket:?}");
    pmd
}

/// Stands in for macvhost's host side with `queues` macvtap queues: opens the macvtap's
/// character device once per queue (through a private node made from the sysfs major:minor, not
/// through the shared `/dev/tapN`) and reflects every frame with the MAC fields swapped, counting
/// frames per queue. Proves the topology and macvtap's flow-hash queue selection without
/// macvhost.
#[derive(Debug)]
pub struct MacvtapReflector {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handles: Vec<thread::JoinHandle<u64>>,
}

/// `topo`'s macvtap character device as a private node in `dir` (made on first use): `/dev`
/// may lack `/dev/tapN`, or hold another namespace's. Each open of it adds one queue.
pub fn macvtap_node(ns: &NetNs, topo: &MacvtapTopo, dir: &Path) -> PathBuf {
    let (major, minor) = topo.chardev(ns);
    let node = dir.join(format!("macvtap-{major}-{minor}"));
    if !node.exists() {
        nix::sys::stat::mknod(
            &node,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(major, minor),
        )
        .expect("mknod private macvtap node");
    }
    node
}

impl MacvtapReflector {
    pub fn start(ns: &NetNs, topo: &MacvtapTopo, dir: &Path, queues: usize) -> MacvtapReflector {
        let node = macvtap_node(ns, topo, dir);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut handles = Vec::new();
        for _ in 0..queues {
            // Each open of the macvtap device adds one queue. Default flags: IFF_TAP |
            // IFF_NO_PI | IFF_VNET_HDR with a 10-byte virtio_net_hdr in front of every frame.
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&node)
                .unwrap_or_else(|e| panic!("open {node:?}: {e}"));
            let stop = stop.clone();
            handles.push(thread::spawn(move || {
                use std::io::{Read, Write};
                let mut file = file;
                let mut buf = vec![0u8; 65536];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd: file.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: `pfd` is a valid pollfd array of length 1 for the call.
                    if unsafe { libc::poll(&mut pfd, 1, 20) } <= 0 {
                        continue;
                    }
                    let Ok(len) = file.read(&mut buf) else {
                        continue;
                    };
                    const VNET: usize = 10;
                    if len < VNET + 14 {
                        continue;
                    }
                    let f = &mut buf[VNET..len];
                    let mut dst = [0u8; 6];
                    dst.copy_from_slice(&f[0..6]);
                    f.copy_within(6..12, 0);
                    f[6..12].copy_from_slice(&dst);
                    buf[..VNET].fill(0);
                    file.write_all(&buf[..len]).expect("macvtap write");
                    n += 1;
                }
                n
            }));
        }
        MacvtapReflector { stop, handles }
    }

    /// Stops the threads; returns the frames reflected per queue.
    pub fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .drain(..)
            .map(|h| h.join().expect("reflector thread"))
            .collect()
    }
}

impl Drop for MacvtapReflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
