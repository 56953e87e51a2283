//! Shared end-to-end harness: network namespaces, veth/macvtap topologies, the macvhost and
//! DPDK testpmd process guards, and an AF_PACKET frame generator/checker.
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
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Env var: when set to `1`, a test that cannot run (not root, tools missing) fails instead of
/// printing `skipped:`. `.ci/run` sets it so CI never passes by skipping.
pub const REQUIRE_ENV: &str = "MACVHOST_E2E_REQUIRED";

/// How long to wait for the datapath to come up (first probe frame echoed back).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// MAC of the peer end of the veth pair (the "outside world").
pub const PEER_MAC: Mac = Mac([0x02, 0x6d, 0x76, 0x68, 0x00, 0x01]);
/// MAC of the macvtap, also given to the virtio-user frontend (the "guest").
pub const GUEST_MAC: Mac = Mac([0x02, 0x6d, 0x76, 0x68, 0x00, 0x02]);
/// MAC of the macvtap's lower device.
pub const LOWER_MAC: Mac = Mac([0x02, 0x6d, 0x76, 0x68, 0x00, 0x03]);

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

// ---------------------------------------------------------------------------------------------
// Preconditions
// ---------------------------------------------------------------------------------------------

/// Returns true when this test can run: effective root, and `ip` and `dpdk-testpmd` on `PATH`.
/// Otherwise prints a `skipped:` line and returns false (the test then returns early) — or, when
/// `MACVHOST_E2E_REQUIRED=1`, panics so CI cannot pass by skipping.
pub fn require_root(test_name: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let tools = which("ip").is_some() && which("dpdk-testpmd").is_some();
    if root && tools {
        return true;
    }
    let msg =
        format!("skipped: {test_name}: needs root and dpdk-testpmd (creates netns, veth, macvtap)");
    if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
        panic!("{msg} [{REQUIRE_ENV}=1: root={root} tools={tools}]");
    }
    print_skip(&msg);
    false
}

/// Writes a skip notice straight to the process's stderr: libtest captures `eprintln!` of
/// passing tests, and a skip must be visible in a plain `cargo test`.
pub fn print_skip(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Looks `program` up on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Runs a command to completion; panics with its stderr when it fails. Returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes. Returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Last `n` lines of a log file (for failure output).
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {path:?}: {e}>"));
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// MAC addresses
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub fn parse(s: &str) -> Mac {
        let mut b = [0u8; 6];
        let parts: Vec<&str> = s.trim().split(':').collect();
        assert_eq!(parts.len(), 6, "bad MAC {s:?}");
        for (i, p) in parts.iter().enumerate() {
            b[i] = u8::from_str_radix(p, 16).unwrap_or_else(|_| panic!("bad MAC {s:?}"));
        }
        Mac(b)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespace guard
// ---------------------------------------------------------------------------------------------

/// A uniquely named network namespace (`mvh-<pid>-<counter>`), deleted with everything in it on
/// drop (also when the test panics). IPv6 is disabled inside so the kernel emits no ND/MLD
/// chatter onto the test links.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = format!("mvh-{}", unique_suffix());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME program` (not yet spawned). Inside, `/sys` shows this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `argv` inside the namespace; panics on failure; returns stdout.
    pub fn exec(&self, argv: &[&str]) -> String {
        run_ok(self.command(argv[0]).args(&argv[1..]))
    }

    /// Runs `argv` inside the namespace and returns its output whatever the status.
    pub fn try_exec(&self, argv: &[&str]) -> Output {
        self.command(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .expect("spawn ip netns exec")
    }

    /// `ip -n NAME args...`; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    pub fn has_iface(&self, iface: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", "dev", iface])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Reads a sysfs (or any) file as seen from inside the namespace, trimmed.
    pub fn read_file(&self, path: &str) -> String {
        self.exec(&["cat", path]).trim().to_string()
    }

    pub fn mac(&self, iface: &str) -> Mac {
        Mac::parse(&self.read_file(&format!("/sys/class/net/{iface}/address")))
    }

    pub fn ifindex(&self, iface: &str) -> u32 {
        self.read_file(&format!("/sys/class/net/{iface}/ifindex"))
            .parse()
            .expect("ifindex")
    }

    /// Kernel counters of `iface` (`/sys/class/net/IFACE/statistics/*`) inside the namespace.
    pub fn stats(&self, iface: &str) -> IfaceStats {
        let files: Vec<String> = IfaceStats::FIELDS
            .iter()
            .map(|f| format!("/sys/class/net/{iface}/statistics/{f}"))
            .collect();
        let mut argv = vec!["cat"];
        argv.extend(files.iter().map(String::as_str));
        let out = self.exec(&argv);
        let v: Vec<u64> = out
            .lines()
            .map(|l| l.trim().parse().expect("counter"))
            .collect();
        assert_eq!(
            v.len(),
            IfaceStats::FIELDS.len(),
            "statistics of {iface}: {out}"
        );
        IfaceStats {
            rx_packets: v[0],
            rx_bytes: v[1],
            rx_dropped: v[2],
            tx_packets: v[3],
            tx_bytes: v[4],
            tx_dropped: v[5],
        }
    }

    /// Runs `f` on a helper thread that has joined this namespace (`setns(CLONE_NEWNET)`).
    /// Sockets created inside `f` stay in this namespace after the thread exits.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::scope(|s| {
            s.spawn(move || {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: setns only changes this helper thread's network namespace; `ns` is an
                // open namespace file descriptor that outlives the call.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns({path}): {}", io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns helper thread panicked")
        })
    }

    /// Pids of processes still running inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Only processes we started can be in our uniquely named namespace.
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = wait_until(Duration::from_secs(5), || self.pids().is_empty());
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not delete netns {}: {status:?}", self.name);
        }
    }
}

/// Interface counters from sysfs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
}

impl IfaceStats {
    const FIELDS: [&'static str; 6] = [
        "rx_packets",
        "rx_bytes",
        "rx_dropped",
        "tx_packets",
        "tx_bytes",
        "tx_dropped",
    ];

    /// `self - earlier`, field by field.
    pub fn since(&self, earlier: &IfaceStats) -> IfaceStats {
        IfaceStats {
            rx_packets: self.rx_packets - earlier.rx_packets,
            rx_bytes: self.rx_bytes - earlier.rx_bytes,
            rx_dropped: self.rx_dropped - earlier.rx_dropped,
            tx_packets: self.tx_packets - earlier.tx_packets,
            tx_bytes: self.tx_bytes - earlier.tx_bytes,
            tx_dropped: self.tx_dropped - earlier.tx_dropped,
        }
    }
}

impl fmt::Display for IfaceStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rx {}p/{}B drop {}, tx {}p/{}B drop {}",
            self.rx_packets,
            self.rx_bytes,
            self.rx_dropped,
            self.tx_packets,
            self.tx_bytes,
            self.tx_dropped
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Topologies
// ---------------------------------------------------------------------------------------------

/// `peer0 ═veth═ lower0`, and `mvt0` = macvtap on `lower0`, all up, inside one namespace.
#[derive(Clone, Debug)]
pub struct MacvtapTopo {
    pub peer: &'static str,
    pub lower: &'static str,
    pub macvtap: &'static str,
    pub peer_mac: Mac,
    pub macvtap_mac: Mac,
    /// The macvtap's ifindex; its character device is `/dev/tap<ifindex>`.
    pub ifindex: u32,
}

impl MacvtapTopo {
    /// Creates the topology with a macvtap in `mode` (bridge, vepa, private, passthru).
    ///
    /// The macvtap gets an explicit ifindex whose `/dev/tapN` does not exist yet: `/dev` is
    /// shared by all namespaces, ifindexes are per namespace, so the kernel-chosen index (4 in a
    /// fresh namespace) routinely collides with another namespace's macvtap and its node.
    pub fn create(ns: &Netns, mode: &str) -> MacvtapTopo {
        Self::create_with_ifindex(ns, mode, pick_free_tap_index())
    }

    /// As [`MacvtapTopo::create`], with the macvtap's ifindex chosen by the caller.
    pub fn create_with_ifindex(ns: &Netns, mode: &str, ifindex: u32) -> MacvtapTopo {
        let topo = MacvtapTopo {
            peer: "peer0",
            lower: "lower0",
            macvtap: "mvt0",
            peer_mac: PEER_MAC,
            macvtap_mac: GUEST_MAC,
            ifindex,
        };
        let (peer_mac, lower_mac, mvt_mac) = (
            topo.peer_mac.to_string(),
            LOWER_MAC.to_string(),
            topo.macvtap_mac.to_string(),
        );
        ns.ip(&[
            "link", "add", topo.peer, "address", &peer_mac, "type", "veth", "peer", "name",
            topo.lower, "address", &lower_mac,
        ]);
        let index = ifindex.to_string();
        ns.ip(&[
            "link",
            "add",
            "link",
            topo.lower,
            "name",
            topo.macvtap,
            "index",
            &index,
            "address",
            &mvt_mac,
            "type",
            "macvtap",
            "mode",
            mode,
        ]);
        for iface in [topo.peer, topo.lower, topo.macvtap] {
            ns.ip(&["link", "set", iface, "up"]);
        }
        assert_eq!(ns.ifindex(topo.macvtap), ifindex);
        topo
    }

    /// `major:minor` of the macvtap's character device, from sysfs inside the namespace.
    pub fn chardev(&self, ns: &Netns) -> (u64, u64) {
        let s = ns.read_file(&format!(
            "/sys/class/net/{}/macvtap/tap{}/dev",
            self.macvtap, self.ifindex
        ));
        let (maj, min) = s.split_once(':').expect("major:minor");
        (maj.parse().unwrap(), min.parse().unwrap())
    }
}

/// A pseudo-random ifindex in 20000..60000 for which `/dev/tapN` does not exist.
pub fn pick_free_tap_index() -> u32 {
    let mut x = seed();
    loop {
        let n = 20_000 + (splitmix64(&mut x) % 40_000) as u32;
        if fs::symlink_metadata(format!("/dev/tap{n}")).is_err() {
            return n;
        }
    }
}

/// `(is_char_device, major, minor)` of a device node, or None if the path does not exist.
pub fn dev_node(path: &Path) -> Option<(bool, u64, u64)> {
    let m = fs::symlink_metadata(path).ok()?;
    let rdev = m.rdev();
    Some((
        m.file_type().is_char_device(),
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev),
    ))
}

/// A character device node the test created; removed on drop only if it is still exactly the
/// node we made (same type and numbers).
#[derive(Debug)]
pub struct DevNodeGuard {
    pub path: PathBuf,
    pub major: u64,
    pub minor: u64,
}

impl DevNodeGuard {
    /// `mknod PATH c MAJOR MINOR`; panics if PATH exists.
    pub fn create_char(path: &Path, major: u64, minor: u64) -> DevNodeGuard {
        assert!(dev_node(path).is_none(), "{path:?} already exists");
        nix::sys::stat::mknod(
            path,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(major, minor),
        )
        .unwrap_or_else(|e| panic!("mknod {path:?} c {major} {minor}: {e}"));
        DevNodeGuard {
            path: path.to_path_buf(),
            major,
            minor,
        }
    }

    pub fn is_unchanged(&self) -> bool {
        dev_node(&self.path) == Some((true, self.major, self.minor))
    }
}

impl Drop for DevNodeGuard {
    fn drop(&mut self) {
        if self.is_unchanged() {
            let _ = fs::remove_file(&self.path);
        } else {
            eprintln!(
                "note: {:?} is no longer the c {}:{} node the test made ({:?}); left alone",
                self.path,
                self.major,
                self.minor,
                dev_node(&self.path)
            );
        }
    }
}

/// A tap created by macvhost (`--tap NAME`) inside the namespace. The test uses the tap's own
/// netdev as the peer: frames sent on it with AF_PACKET are transmitted by the netdev, i.e.
/// handed to the tap fd (macvhost RX); frames macvhost writes to the fd are received by the
/// netdev, where the AF_PACKET socket sees them.
#[derive(Clone, Debug)]
pub struct TapTopo {
    pub tap: String,
    pub tap_mac: Mac,
}

impl TapTopo {
    /// Waits for `tap` to appear (macvhost creates it), then sets it up.
    pub fn attach(ns: &Netns, tap: &str, timeout: Duration) -> TapTopo {
        assert!(
            wait_until(timeout, || ns.has_iface(tap)),
            "tap {tap} did not appear in netns {} within {timeout:?}",
            ns.name()
        );
        ns.ip(&["link", "set", tap, "up"]);
        TapTopo {
            tap: tap.to_string(),
            tap_mac: ns.mac(tap),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// macvhost process guard
// ---------------------------------------------------------------------------------------------

/// A running `macvhost` inside a namespace, serving a vhost-user socket in `dir`.
/// On drop: SIGTERM, wait (then SIGKILL); prints its log when the test is failing.
#[derive(Debug)]
pub struct Macvhost {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    netns: String,
}

impl Macvhost {
    /// The binary under test: `$MACVHOST_BIN` if set (e.g. an installed build), else the one
    /// cargo built for this test run.
    pub fn binary() -> PathBuf {
        std::env::var_os("MACVHOST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_macvhost")))
    }

    /// Spawns `ip netns exec NS macvhost --socket-path DIR/vhost.sock ARGS... --log-level debug`
    /// and waits until the socket file exists.
    pub fn spawn(ns: &Netns, dir: &Path, args: &[&str]) -> Macvhost {
        Self::spawn_named(ns, dir, "macvhost", args)
    }

    /// As [`Macvhost::spawn`]; `name` distinguishes the socket and log files of several
    /// instances in one tempdir.
    pub fn spawn_named(ns: &Netns, dir: &Path, name: &str, args: &[&str]) -> Macvhost {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("create macvhost log");
        let child = ns
            .command(Self::binary())
            .arg("--socket-path")
            .arg(&socket)
            .args(args)
            .args(["--log-level", "debug"])
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log fd"))
            .stderr(out)
            .spawn()
            .expect("spawn macvhost");
        let mut m = Macvhost {
            child: Some(child),
            socket,
            log,
            netns: ns.name().to_string(),
        };
        let up = wait_until(Duration::from_secs(15), || {
            m.check_alive();
            fs::symlink_metadata(&m.socket)
                .map(|md| md.file_type().is_socket())
                .unwrap_or(false)
        });
        assert!(up, "macvhost did not create {:?} within 15 s", m.socket);
        m
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Panics (with the log) if macvhost has exited.
    pub fn check_alive(&mut self) {
        let child = self.child.as_mut().expect("child");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!(
                "macvhost exited unexpectedly ({status}); log {:?}:\n{}",
                self.log,
                tail(&self.log, 200)
            );
        }
    }

    /// SIGTERM, then wait up to 10 s. Returns the exit status (panics on timeout).
    pub fn shutdown(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("child");
        match terminate(&mut child, Signal::SIGTERM, Duration::from_secs(10)) {
            Ok(status) => status,
            Err(status) => panic!(
                "macvhost did not exit within 10 s of SIGTERM (killed: {status}); log:\n{}",
                tail(&self.log, 200)
            ),
        }
    }

    /// [`Macvhost::shutdown`] and assert exit code 0.
    pub fn shutdown_clean(self) {
        let log = self.log.clone();
        let status = self.shutdown();
        assert!(
            status.success(),
            "macvhost exited with {status} after SIGTERM; log:\n{}",
            tail(&log, 200)
        );
    }
}

impl Drop for Macvhost {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = terminate(&mut child, Signal::SIGTERM, Duration::from_secs(5));
        }
        if thread::panicking() {
            eprintln!(
                "---- macvhost log (netns {}, {:?}) ----\n{}\n---- end macvhost log ----",
                self.netns,
                self.log,
                tail(&self.log, 300)
            );
        }
    }
}

/// Sends `sig`, waits up to `timeout`; on timeout SIGKILLs and returns Err(status).
fn terminate(child: &mut Child, sig: Signal, timeout: Duration) -> Result<ExitStatus, ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Ok(status);
    }
    let _ = kill(Pid::from_raw(child.id() as i32), sig);
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Err(child.wait().expect("wait"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// dpdk-testpmd guard
// ---------------------------------------------------------------------------------------------

/// Options for a virtio-user testpmd (the frontend, i.e. the "guest").
#[derive(Clone, Debug)]
pub struct TestpmdConfig {
    pub queues: u16,
    /// MAC of the virtio-user port (the guest's MAC).
    pub mac: Mac,
    /// `--forward-mode`: `macswap` echoes frames back with the MAC fields swapped.
    pub forward_mode: String,
    /// Extra `net_virtio_user0` devargs, e.g. `packed_vq=1,mrg_rxbuf=0`.
    pub vdev_extra: String,
    /// Extra application arguments (after `--`).
    pub app_extra: Vec<String>,
}

impl TestpmdConfig {
    pub fn macswap(queues: u16, mac: Mac) -> TestpmdConfig {
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
        ns: Option<&Netns>,
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
pub fn build_frame(dst: Mac, src: Mac, tag: &Tag) -> Vec<u8> {
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
    pub local: Mac,
    pub remote: Mac,
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
    pub fn open(ns: &Netns, iface: &str, local: Mac, remote: Mac) -> Peer {
        let name = iface.to_string();
        let fd = ns.run_in(move || open_packet_socket(&name));
        Peer {
            fd: fd.unwrap_or_else(|e| panic!("AF_PACKET socket on {iface}: {e}")),
            iface: iface.to_string(),
            local,
            remote,
        }
    }

    /// Sends one frame (retries briefly on ENOBUFS).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        for _ in 0..100 {
            // SAFETY: `frame` is a valid buffer of `frame.len()` bytes for the duration of the
            // call; the fd is an open socket owned by self.
            let n =
                unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n == frame.len() as isize {
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
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
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
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
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
    sll.sll_ifindex = ifindex as i32;
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
    pub fn start(ns: &Netns, iface: &str) -> Reflector {
        Self::start_with(ns, iface, |_, f| Some(f.to_vec()))
    }

    /// Reflects `mutate(n, frame)` (frame already MAC-swapped, `n` counts received frames);
    /// `None` drops the frame. Used to prove the checker notices loss and corruption.
    pub fn start_with(
        ns: &Netns,
        iface: &str,
        mut mutate: impl FnMut(u64, &[u8]) -> Option<Vec<u8>> + Send + 'static,
    ) -> Reflector {
        let peer = Peer::open(ns, iface, Mac([0; 6]), Mac([0; 6]));
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
    ns: &Netns,
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

impl MacvtapReflector {
    pub fn start(ns: &Netns, topo: &MacvtapTopo, dir: &Path, queues: usize) -> MacvtapReflector {
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
