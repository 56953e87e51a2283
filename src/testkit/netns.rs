//! A network namespace per test, and the topologies the privileged suites build in it: veth
//! pairs, macvtaps on a fresh `/dev/tapN`, bridges, taps. Used by the host and netlink unit
//! tests, the end-to-end and host suites (`tests/common`), the QEMU guest harness and the
//! end-to-end bench. Needs root (`require(&[Need::Root, Need::Tool("ip")])` first).
//!
//! - [`NetNs::new`] makes `mvh-<tag>-<pid>-<n>` (loopback up) and deletes it on drop, killing
//!   whatever still runs in it: only processes the test started can be in a namespace of that
//!   name. Namespaces left by test processes that died (SIGKILL, a crash) are removed when the
//!   next one is made. [`NetNs::quiet`] also turns IPv6 off, so the kernel sends no ND/MLD
//!   chatter onto the test links (for tests that count frames).
//! - How code under test sees the namespace: [`NetNs::run`] runs a closure on a helper thread
//!   that `setns(CLONE_NEWNET)`s into it, so sockets, tun devices and interface ioctls it makes
//!   belong there while the test process stays put. sysfs shows the namespace that *mounted*
//!   it, not the reader's, so the thread also `unshare(CLONE_NEWNS)`s (its own mount table),
//!   makes every mount a slave so nothing propagates back, and mounts a fresh sysfs on /sys, as
//!   `ip netns exec` does. `/dev` stays shared, which is what the stale-`/dev/tapN` tests need.
//! - `/dev` is shared by all namespaces but ifindexes are not, so a kernel-chosen macvtap index
//!   (4 in a fresh namespace) routinely collides with another namespace's `/dev/tap4`:
//!   [`NetNs::add_macvtap`] always gives the macvtap an index whose node does not exist yet.

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::host::MacAddr;

/// MAC of the veth peer in [`MacvtapTopo::create`] (the "outside world").
pub const PEER_MAC: MacAddr = MacAddr([0x02, 0x6d, 0x76, 0x68, 0x00, 0x01]);
/// MAC of the macvtap in [`MacvtapTopo::create`], also the guest's.
pub const GUEST_MAC: MacAddr = MacAddr([0x02, 0x6d, 0x76, 0x68, 0x00, 0x02]);
/// MAC of the macvtap's lower device in [`MacvtapTopo::create`].
pub const LOWER_MAC: MacAddr = MacAddr([0x02, 0x6d, 0x76, 0x68, 0x00, 0x03]);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs a command to completion; its stdout, or an error carrying its stderr.
pub fn run_checked(cmd: &mut Command) -> io::Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command to completion; panics with its output when it fails. Returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    run_checked(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// `ip` from `PATH` or the sbin directories.
pub fn ip_command() -> Command {
    Command::new(super::which("ip").unwrap_or_else(|| PathBuf::from("/usr/sbin/ip")))
}

/// `ip ARGS...` in the current namespace; panics with its stderr on failure.
pub fn ip(args: &[&str]) -> String {
    run_ok(ip_command().args(args))
}

/// A network namespace made for one test (see the module doc).
#[derive(Debug)]
pub struct NetNs {
    name: String,
    owned: bool,
}

impl NetNs {
    /// Creates `mvh-<tag>-<pid>-<n>` with loopback up.
    pub fn new(tag: &str) -> NetNs {
        remove_stale();
        let name = format!(
            "mvh-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = NetNs { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// [`NetNs::new`] with IPv6 off: no ND/MLD chatter on the test links, so kernel counters
    /// and captures see only the test's frames.
    pub fn quiet(tag: &str) -> NetNs {
        let ns = NetNs::new(tag);
        ns.spawn(|| {
            // /proc/sys/net shows the namespace of the thread that opens it.
            for conf in ["all", "default"] {
                let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
            }
        })
        .join()
        .expect("netns setup thread");
        ns
    }

    /// A handle on an existing namespace that this handle does not own (not deleted on drop),
    /// e.g. the one a parent process made and runs us in.
    pub fn attach(name: &str) -> NetNs {
        NetNs {
            name: name.to_owned(),
            owned: false,
        }
    }

    /// The namespace's name (`ip netns exec NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`; panics with its stderr on failure. Returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        self.try_ip(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `ip -n NAME ARGS...`; its stdout or an error with its stderr.
    pub fn try_ip(&self, args: &[&str]) -> io::Result<String> {
        run_checked(ip_command().args(["-n", &self.name]).args(args))
    }

    /// `ip netns exec NAME program` (not yet spawned). Inside, `/sys` shows this namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = ip_command();
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

    /// Whether `iface` exists in the namespace.
    pub fn has_iface(&self, iface: &str) -> bool {
        self.try_ip(&["link", "show", "dev", iface]).is_ok()
    }

    /// The link-layer multicast addresses on `iface` (`ip maddr show dev IFACE`), as
    /// `01:00:5e:…` strings.
    pub fn maddrs(&self, iface: &str) -> Vec<String> {
        self.ip(&["maddr", "show", "dev", iface])
            .lines()
            .filter_map(|l| l.trim().strip_prefix("link "))
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
            .collect()
    }

    /// A file (sysfs included) as seen from inside the namespace, trimmed.
    pub fn read_file(&self, path: &str) -> String {
        let path = path.to_owned();
        self.run(move || fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
            .trim()
            .to_owned()
    }

    /// The MAC address of `iface`.
    pub fn mac(&self, iface: &str) -> MacAddr {
        MacAddr::parse(&self.read_file(&format!("/sys/class/net/{iface}/address")))
            .unwrap_or_else(|e| panic!("MAC of {iface}: {e}"))
    }

    /// The ifindex of `iface`.
    pub fn ifindex(&self, iface: &str) -> u32 {
        self.read_file(&format!("/sys/class/net/{iface}/ifindex"))
            .parse()
            .expect("ifindex")
    }

    /// Kernel counters of `iface` (`/sys/class/net/IFACE/statistics/*`).
    pub fn stats(&self, iface: &str) -> IfaceStats {
        let v: Vec<u64> = IfaceStats::FIELDS
            .iter()
            .map(|f| {
                self.read_file(&format!("/sys/class/net/{iface}/statistics/{f}"))
                    .parse()
                    .expect("counter")
            })
            .collect();
        IfaceStats {
            rx_packets: v[0],
            rx_bytes: v[1],
            rx_dropped: v[2],
            tx_packets: v[3],
            tx_bytes: v[4],
            tx_dropped: v[5],
        }
    }

    /// `(major, minor)` of a macvtap's character device. Open the device by these numbers
    /// (a private `mknod`), not as `/dev/tapIFINDEX`: another namespace's macvtap can own that.
    pub fn macvtap_devno(&self, iface: &str) -> (u32, u32) {
        let dir = format!("/sys/class/net/{iface}/macvtap");
        let dev = self.run(move || {
            let tap = fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{dir}: {e}"))
                .flatten()
                .next()
                .unwrap_or_else(|| panic!("{dir} is empty"));
            fs::read_to_string(tap.path().join("dev")).expect("macvtap dev")
        });
        let (maj, min) = dev.trim().split_once(':').expect("major:minor");
        (maj.parse().unwrap(), min.parse().unwrap())
    }

    /// Runs `f` on a helper thread inside the namespace, with its own /sys (module doc).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = self.open();
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
                unshare(CloneFlags::CLONE_NEWNS).expect("unshare mount ns");
                let no = None::<&str>;
                mount(no, "/", no, MsFlags::MS_REC | MsFlags::MS_SLAVE, no)
                    .expect("make mounts slave");
                umount2("/sys", MntFlags::MNT_DETACH).expect("umount /sys");
                mount(Some("sysfs"), "/sys", Some("sysfs"), MsFlags::empty(), no)
                    .expect("mount sysfs");
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Starts `f` on a thread inside the namespace (network only). Sockets made there stay in
    /// the namespace wherever they are used later.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let ns = self.open();
        std::thread::spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// A TCP listener bound inside the namespace.
    pub fn tcp_listener(&self, addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
        self.spawn(move || std::net::TcpListener::bind(addr))
            .join()
            .expect("netns thread")
    }

    /// A TCP connection made from inside the namespace.
    pub fn tcp_connect(
        &self,
        addr: std::net::SocketAddr,
        timeout: Duration,
    ) -> io::Result<std::net::TcpStream> {
        self.spawn(move || std::net::TcpStream::connect_timeout(&addr, timeout))
            .join()
            .expect("netns thread")
    }

    fn open(&self) -> fs::File {
        let path = format!("/run/netns/{}", self.name);
        fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"))
    }

    /// Pids of processes still running inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        ip_command()
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    // ---- topology pieces ----

    /// A veth pair `a` ═ `b`, both down.
    pub fn add_veth(&self, a: &str, b: &str) {
        self.ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
    }

    /// `veth0 ═ veth1` and macvtap `mvt0` (bridge mode, on `veth0`) with ifindex `index`, all
    /// down: the host unit tests' topology.
    pub fn add_veth_macvtap(&self, index: u32) {
        self.add_veth("veth0", "veth1");
        self.add_macvtap_at("veth0", "mvt0", "bridge", index);
    }

    /// A macvtap `name` in `mode` on `parent`, down, with an ifindex whose `/dev/tapN` does not
    /// exist yet; returns that ifindex.
    pub fn add_macvtap(&self, parent: &str, name: &str, mode: &str) -> u32 {
        let index = free_ifindex();
        self.add_macvtap_at(parent, name, mode, index);
        index
    }

    /// [`NetNs::add_macvtap`] with the ifindex chosen by the caller.
    pub fn add_macvtap_at(&self, parent: &str, name: &str, mode: &str, index: u32) {
        let index = index.to_string();
        self.ip(&[
            "link", "add", "link", parent, "name", name, "index", &index, "type", "macvtap",
            "mode", mode,
        ]);
    }

    /// A bridge `name`, down.
    pub fn add_bridge(&self, name: &str) {
        self.ip(&["link", "add", name, "type", "bridge"]);
    }

    /// A persistent tap `name` (multiqueue if asked), down.
    pub fn add_tap(&self, name: &str, multi_queue: bool) {
        let mut args = vec!["tuntap", "add", "dev", name, "mode", "tap"];
        if multi_queue {
            args.push("multi_queue");
        }
        self.ip(&args);
    }

    /// Sets each link up.
    pub fn set_up(&self, links: &[&str]) {
        for l in links {
            self.ip(&["link", "set", l, "up"]);
        }
    }

    /// Sets a link's MAC address.
    pub fn set_mac(&self, link: &str, mac: MacAddr) {
        self.ip(&["link", "set", link, "address", &mac.to_string()]);
    }

    /// Adds an address (`10.0.0.1/24`) to a link.
    pub fn add_addr(&self, link: &str, cidr: &str) {
        self.ip(&["addr", "add", cidr, "dev", link]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // Only processes the test started can be in its uniquely named namespace.
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = super::wait_until(Duration::from_secs(5), || self.pids().is_empty());
        // Deleting the namespace deletes its links (and devtmpfs drops their /dev/tapN).
        if let Err(e) = run_checked(ip_command().args(["netns", "del", &self.name])) {
            eprintln!("warning: could not delete netns {}: {e}", self.name);
        }
    }
}

/// Deletes namespaces named `mvh…-<pid>-<n>` whose creating process is gone.
fn remove_stale() {
    let Ok(list) = run_checked(ip_command().args(["netns", "list"])) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let mut parts = name.rsplit('-');
        let (Some(_n), Some(pid)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if name.starts_with("mvh") && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run_checked(ip_command().args(["netns", "del", name]));
        }
    }
}

/// An ifindex for a test macvtap whose `/dev/tapN` does not exist: per process and call,
/// far above the small indexes real hosts use, so parallel tests never share a `/dev/tapN`.
pub fn free_ifindex() -> u32 {
    let base = 100_000 + (std::process::id() % 10_000) * 100;
    loop {
        let n = base + SEQ.fetch_add(1, Ordering::Relaxed) % 100;
        if dev_node(&tap_node(n)).is_none() {
            return n;
        }
    }
}

/// `/dev/tap<ifindex>`.
pub fn tap_node(ifindex: u32) -> PathBuf {
    PathBuf::from(format!("/dev/tap{ifindex}"))
}

/// `(is_char_device, major, minor)` of a node, or `None` if nothing is at `path`.
pub fn dev_node(path: &Path) -> Option<(bool, u64, u64)> {
    let m = fs::symlink_metadata(path).ok()?;
    let rdev = m.rdev();
    Some((
        m.file_type().is_char_device(),
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev),
    ))
}

/// A `/dev` node a test made or caused, removed on drop: one the test made only if it is still
/// exactly that node (same type and numbers).
#[derive(Debug)]
pub struct DevNodeGuard {
    /// The node.
    pub path: PathBuf,
    made: Option<(u64, u64)>,
}

impl DevNodeGuard {
    /// `mknod PATH c MAJOR MINOR` (mode 0600); panics if PATH exists.
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
            path: path.to_owned(),
            made: Some((major, minor)),
        }
    }

    /// Removes whatever is at `path` on drop (a node the code under test creates).
    pub fn remove_on_drop(path: PathBuf) -> DevNodeGuard {
        DevNodeGuard { path, made: None }
    }

    /// Whether the node is still the one [`DevNodeGuard::create_char`] made.
    pub fn is_unchanged(&self) -> bool {
        self.made
            .is_some_and(|(ma, mi)| dev_node(&self.path) == Some((true, ma, mi)))
    }
}

impl Drop for DevNodeGuard {
    fn drop(&mut self) {
        if self.made.is_none() || self.is_unchanged() {
            let _ = fs::remove_file(&self.path);
        } else {
            eprintln!(
                "note: {:?} is no longer the node the test made ({:?}); left alone",
                self.path,
                dev_node(&self.path)
            );
        }
    }
}

/// Interface counters from sysfs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceStats {
    /// `statistics/rx_packets`: frames the interface received.
    pub rx_packets: u64,
    /// `statistics/rx_bytes`.
    pub rx_bytes: u64,
    /// `statistics/rx_dropped`.
    pub rx_dropped: u64,
    /// `statistics/tx_packets`: frames the interface sent.
    pub tx_packets: u64,
    /// `statistics/tx_bytes`.
    pub tx_bytes: u64,
    /// `statistics/tx_dropped`.
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

/// `peer ═veth═ lower`, and a macvtap on `lower`, all up: the topology of every test that puts
/// a guest on a macvtap and needs a peer outside it.
#[derive(Clone, Debug)]
pub struct MacvtapTopo {
    /// The veth end the test talks through, standing for the outside world.
    pub peer: &'static str,
    /// The veth end the macvtap sits on (its parent).
    pub lower: &'static str,
    /// The macvtap.
    pub macvtap: &'static str,
    /// `peer`'s MAC ([`PEER_MAC`]).
    pub peer_mac: MacAddr,
    /// The macvtap's MAC, the one the guest uses.
    pub macvtap_mac: MacAddr,
    /// The macvtap's ifindex; its character device is `/dev/tap<ifindex>` (fresh).
    pub ifindex: u32,
}

impl MacvtapTopo {
    /// `peer0 ═ lower0`, `mvt0` in `mode` on `lower0`, with [`PEER_MAC`], [`LOWER_MAC`] and
    /// [`GUEST_MAC`].
    pub fn create(ns: &NetNs, mode: &str) -> MacvtapTopo {
        Self::create_with_ifindex(ns, mode, free_ifindex())
    }

    /// [`MacvtapTopo::create`] with the macvtap's ifindex chosen by the caller.
    pub fn create_with_ifindex(ns: &NetNs, mode: &str, ifindex: u32) -> MacvtapTopo {
        Self::build(ns, ["peer0", "lower0", "mvt0"], mode, GUEST_MAC, ifindex)
    }

    /// The topology with these `[peer, lower, macvtap]` names, the macvtap's MAC `mac` and the
    /// given ifindex.
    pub fn build(
        ns: &NetNs,
        [peer, lower, macvtap]: [&'static str; 3],
        mode: &str,
        mac: MacAddr,
        ifindex: u32,
    ) -> MacvtapTopo {
        ns.add_veth(peer, lower);
        ns.set_mac(peer, PEER_MAC);
        ns.set_mac(lower, LOWER_MAC);
        ns.add_macvtap_at(lower, macvtap, mode, ifindex);
        ns.set_mac(macvtap, mac);
        ns.set_up(&[peer, lower, macvtap]);
        assert_eq!(ns.ifindex(macvtap), ifindex);
        MacvtapTopo {
            peer,
            lower,
            macvtap,
            peer_mac: PEER_MAC,
            macvtap_mac: mac,
            ifindex,
        }
    }

    /// `major:minor` of the macvtap's character device.
    pub fn chardev(&self, ns: &NetNs) -> (u64, u64) {
        let (maj, min) = ns.macvtap_devno(self.macvtap);
        (maj.into(), min.into())
    }
}

/// A tap that macvhost creates (`--tap NAME`), set up once it appears. Its own netdev is the
/// test's peer: frames sent on it with AF_PACKET reach the tap fd (macvhost RX), and frames
/// macvhost writes to the fd arrive on it.
#[derive(Clone, Debug)]
pub struct TapTopo {
    /// The tap's name.
    pub tap: String,
    /// Its MAC (the host side's, not the guest's).
    pub tap_mac: MacAddr,
}

impl TapTopo {
    /// Waits up to `timeout` for `tap` to appear in `ns`, then sets it up.
    pub fn attach(ns: &NetNs, tap: &str, timeout: Duration) -> TapTopo {
        assert!(
            super::wait_until(timeout, || ns.has_iface(tap)),
            "tap {tap} did not appear in netns {} within {timeout:?}",
            ns.name()
        );
        ns.set_up(&[tap]);
        TapTopo {
            tap: tap.to_owned(),
            tap_mac: ns.mac(tap),
        }
    }
}
