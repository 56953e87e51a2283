//! Real-guest test harness.
//!
//! Boots the tiny busybox guest built by `tests/guest/build-guest.sh` under
//! QEMU (TCG by default) with a virtio-net-pci NIC, and talks to it over its
//! serial line. Include it from an integration test with
//!
//! ```ignore
//! #[path = "support/guest.rs"]
//! mod guest;
//! ```
//!
//! The namespace, topology and macvhost guard are the test kit's (`macvhost::testkit`); every
//! test starts with `require!(GUEST);` (or the needs it has).
//!
//! # Serial channel
//!
//! QEMU's first serial port is a chardev socket *client* that connects to a
//! unix socket the harness listens on, so no byte of output is lost and the
//! harness can also type into the guest. Everything the guest prints is
//! appended to `target/guest/logs/NAME.log`. The guest's `/init`
//! (`tests/guest/init.sh`) prints, at the start of a line:
//!
//! * `MVH-READY iface=eth0 mac=.. link=up uptime=S` once the NIC is
//!   configured and has carrier (waits up to 10 s for it),
//! * `MVH-RESULT name=value` from scripts (shell helper `result name value`),
//! * `MVH-DONE rc=N` after a batch script (then it powers off),
//! * `MVH-PROMPT` when the interactive loop waits for a command.
//!
//! Two modes:
//!
//! * **batch**: [`QemuConfig::script`] is passed with
//!   `-fw_cfg name=opt/macvhost/script,file=F`; the guest runs it and powers
//!   off. Use [`Qemu::wait_done`].
//! * **interactive** (no script): [`Qemu::exec`] sends
//!   `MVH-CMD id\n<script>\nMVH-EOF id\n`; the guest runs it with `sh`
//!   (stdin `/dev/null`, `lib.sh` helpers sourced) and answers with its
//!   output followed by `MVH-END id rc=N`. Any number of phases can be run,
//!   interleaved with host-side actions.
//!
//! Guest scripts see `$MVH_IFACE`, `$MVH_MAC`, `$MVH_IP`, `$MVH_PEER` and the
//! helpers `result`, `fail`, `now_ms`, `sha256` (see `tests/guest/lib.sh`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use macvhost::host::MacAddr;
#[allow(unused_imports)] // guest_libvirt takes it from common
pub use macvhost::require;
#[allow(unused_imports)] // used by guest_macvhost, not guest_harness
pub use macvhost::testkit::daemon::Daemon;
#[allow(unused_imports)] // used by guest_harness
pub use macvhost::testkit::netns::run_ok;
pub use macvhost::testkit::netns::NetNs;
use macvhost::testkit::netns::{free_ifindex, MacvtapTopo};
pub use macvhost::testkit::{which, Need};

/// Default guest MAC address used by the tests.
pub const GUEST_MAC: &str = "52:54:00:4d:56:48";
/// Host-side peer address inside the test network namespace.
pub const PEER_IP: &str = "10.199.0.1";
/// Guest address (with prefix) inside the test network namespace.
pub const GUEST_CIDR: &str = "10.199.0.2/24";
/// Guest address without prefix.
pub const GUEST_IP: &str = "10.199.0.2";

/// A bridge macvtap in `ns` with its peer at [`PEER_IP`]/24: where every guest test on a
/// macvtap starts.
pub fn macvtap_with_peer(ns: &NetNs) -> MacvtapTopo {
    let topo = MacvtapTopo::create(ns, "bridge");
    ns.ip(&["addr", "add", &format!("{PEER_IP}/24"), "dev", topo.peer]);
    topo
}

// ------------------------------------------------------------------ misc ---

/// The crate root (where `Cargo.toml` lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/` of this checkout (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                repo_root().join(d)
            }
        }
        None => repo_root().join("target"),
    }
}

/// The guest's NIC needs QEMU.
pub const QEMU: Need = Need::Tool("qemu-system-x86_64");

/// The guest image and its logs: `target/guest` writable, the image built already or
/// buildable by `tests/guest/build-guest.sh`.
pub const IMAGE: Need = Need::Check(
    "the guest image (a writable target/guest; tests/guest/build-guest.sh needs a readable \
     /boot/vmlinuz-*, busybox-static, iperf3, ethtool)",
    image_available,
);

/// What a guest on a NIC in a test namespace needs: root, `ip`, QEMU and the guest image.
pub const GUEST: &[Need] = &[Need::Root, Need::Tool("ip"), QEMU, IMAGE];

fn image_available() -> bool {
    let dir = target_dir().join("guest");
    let writable = |p: &Path| nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok();
    if !(writable(&dir) || !dir.exists() && writable(&target_dir())) {
        return false;
    }
    let built = GuestImage::in_dir(&dir);
    if built.kernel.exists() && built.initrd.exists() {
        return true;
    }
    let kernel_readable = fs::read_dir("/boot").is_ok_and(|d| {
        d.flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with("vmlinuz-") && File::open(e.path()).is_ok()
        })
    });
    kernel_readable
        && ["busybox", "iperf3", "ethtool"]
            .iter()
            .all(|t| which(t).is_some())
}

/// Guests run one at a time: there are only 2 cores and TCG is slow.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `s` seconds, [`scaled`].
pub fn secs(s: u64) -> Duration {
    scaled(Duration::from_secs(s))
}

/// Multiplies test timeouts by `MACVHOST_TIMEOUT_SCALE` (default 1; useful
/// on very slow CI machines).
pub fn scaled(d: Duration) -> Duration {
    let f: f64 = std::env::var("MACVHOST_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|f: &f64| *f > 0.0)
        .unwrap_or(1.0);
    d.mul_f64(f)
}

// ----------------------------------------------------------- guest image ---

/// Paths of the built guest.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestImage {
    /// The image in `dir` (as produced by `build-guest.sh dir`).
    pub fn in_dir(dir: &Path) -> GuestImage {
        GuestImage {
            dir: dir.to_path_buf(),
            // The PVH ELF image when the kernel has one (build-guest.sh): no self-decompression
            // under TCG.
            kernel: dir.join("kernel"),
            initrd: dir.join("initrd.img"),
        }
    }
}

/// Builds (or reuses) the guest image in `target/guest/` and returns that
/// directory. Panics with the build script's output when it fails.
pub fn ensure_guest_image() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = target_dir().join("guest");
            let script = repo_root().join("tests/guest/build-guest.sh");
            let res = Command::new("bash")
                .arg(&script)
                .arg(&out)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            if !res.status.success() {
                panic!(
                    "{} failed ({}):\n{}{}",
                    script.display(),
                    res.status,
                    String::from_utf8_lossy(&res.stdout),
                    String::from_utf8_lossy(&res.stderr)
                );
            }
            out
        })
        .clone()
}

/// [`ensure_guest_image`] as a [`GuestImage`].
pub fn guest_image() -> GuestImage {
    GuestImage::in_dir(&ensure_guest_image())
}

// ---------------------------------------------------------- acceleration ---

/// QEMU accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// `-accel kvm -cpu host`
    Kvm,
    /// `-accel tcg -cpu max`
    Tcg,
}

impl Accel {
    fn args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

/// The accelerator to use: `MACVHOST_ACCEL=kvm|tcg` forces one; otherwise
/// (`auto`, the default) KVM is used only when a probe boot with KVM
/// completes (cached per host boot in `target/guest/kvm-probe`). Nested KVM
/// that hangs or aborts falls back to TCG.
pub fn accel() -> Accel {
    static ACCEL: OnceLock<Accel> = OnceLock::new();
    *ACCEL.get_or_init(|| {
        match std::env::var("MACVHOST_ACCEL").as_deref() {
            Ok("kvm") => return Accel::Kvm,
            Ok("tcg") => return Accel::Tcg,
            Ok("auto") | Ok("") | Err(_) => {}
            Ok(other) => panic!("MACVHOST_ACCEL={other}: expected kvm, tcg or auto"),
        }
        if probe_kvm(&guest_image()) {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    })
}

/// Boots the guest once with KVM (no NIC) and reports whether it finished a
/// trivial batch script within 20 s.
pub fn probe_kvm(image: &GuestImage) -> bool {
    let kvm_usable = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm_usable {
        return false;
    }
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = image.dir.join("kvm-probe");
    if let Ok(c) = fs::read_to_string(&cache) {
        if let Some((id, verdict)) = c.trim().rsplit_once(' ') {
            if id == boot_id.trim() {
                return verdict == "yes";
            }
        }
    }
    let ok = (|| -> io::Result<bool> {
        let dir = tempfile::tempdir()?;
        let script = dir.path().join("probe.sh");
        fs::write(&script, "result probe ok\n")?;
        let log = dir.path().join("serial.log");
        let mut child = Command::new("qemu-system-x86_64")
            .args(Accel::Kvm.args())
            .args(["-machine", "q35", "-m", "256", "-smp", "1", "-nodefaults"])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", "console=ttyS0 quiet loglevel=3"])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .arg("-fw_cfg")
            .arg(format!(
                "name=opt/macvhost/script,file={}",
                script.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait()? {
                let text = fs::read_to_string(&log).unwrap_or_default();
                return Ok(st.success() && text.contains("MVH-RESULT probe=ok"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(false);
            }
            thread::sleep(Duration::from_millis(50));
        }
    })()
    .unwrap_or(false);
    let _ = fs::write(
        &cache,
        format!("{} {}\n", boot_id.trim(), if ok { "yes" } else { "no" }),
    );
    ok
}

// --------------------------------------------------------------- config ---

/// How the guest's virtio-net-pci NIC is backed.
#[derive(Clone, Debug)]
pub enum NetBackend {
    /// `-netdev vhost-user` on the unix socket `socket` (macvhost listens).
    VhostUser { socket: PathBuf, queues: u16 },
    /// QEMU's own userspace virtio-net backend on a tap device (`vhost=off`).
    /// The tap must exist (multi_queue when `queues > 1`) in the namespace
    /// QEMU runs in ([`QemuConfig::netns`]).
    Tap { ifname: String, queues: u16 },
    /// No NIC at all.
    None,
}

/// Everything needed to boot one guest.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// Used for the log file name `target/guest/logs/NAME.log`.
    pub name: String,
    pub net: NetBackend,
    pub mac: String,
    /// `mvh.ip=`: address with prefix for the guest NIC.
    pub guest_cidr: Option<String>,
    /// `mvh.peer=`: exported to guest scripts as `$MVH_PEER`.
    pub peer_ip: Option<String>,
    /// Batch script (passed with `-fw_cfg`); `None` = interactive mode.
    pub script: Option<String>,
    /// Run QEMU inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    pub mem_mib: u32,
    pub smp: u32,
    /// `None` = [`accel()`].
    pub accel: Option<Accel>,
    /// Appended to the kernel command line.
    pub extra_append: Vec<String>,
    /// Appended to the QEMU command line.
    pub extra_args: Vec<String>,
    /// Copy guest output to stderr as it arrives (also `MACVHOST_GUEST_ECHO=1`).
    pub echo: bool,
    /// Exit QEMU when the guest reboots (`-no-reboot`); false lets a guest reboot in place.
    pub no_reboot: bool,
    /// vhost-user: QEMU listens on the socket (`server=on,wait=off`, for `macvhost --client`)
    /// instead of connecting to it (`reconnect=1`, the default).
    pub vhost_user_server: bool,
    /// Appended to the `virtio-net-pci` device's options (e.g. `,rx_queue_size=1024`).
    pub nic_opts: String,
}

impl QemuConfig {
    fn base(name: &str, net: NetBackend) -> QemuConfig {
        QemuConfig {
            name: name.to_string(),
            net,
            mac: GUEST_MAC.to_string(),
            guest_cidr: Some(GUEST_CIDR.to_string()),
            peer_ip: Some(PEER_IP.to_string()),
            script: None,
            netns: None,
            mem_mib: 512,
            smp: 2,
            accel: None,
            extra_append: Vec::new(),
            extra_args: Vec::new(),
            echo: std::env::var_os("MACVHOST_GUEST_ECHO").is_some_and(|v| v != "0"),
            no_reboot: true,
            vhost_user_server: false,
            nic_opts: String::new(),
        }
    }

    /// A guest on a vhost-user socket (the macvhost case).
    pub fn vhost_user(name: &str, socket: &Path, queues: u16) -> QemuConfig {
        Self::base(
            name,
            NetBackend::VhostUser {
                socket: socket.to_path_buf(),
                queues,
            },
        )
    }

    /// A guest on QEMU's own tap backend, with QEMU started in `netns`.
    pub fn tap(name: &str, netns: &str, ifname: &str, queues: u16) -> QemuConfig {
        let mut c = Self::base(
            name,
            NetBackend::Tap {
                ifname: ifname.to_string(),
                queues,
            },
        );
        c.netns = Some(netns.to_string());
        c
    }

    /// A guest without a NIC.
    pub fn no_net(name: &str) -> QemuConfig {
        let mut c = Self::base(name, NetBackend::None);
        c.guest_cidr = None;
        c.peer_ip = None;
        c
    }

    /// Sets a batch script (builder style).
    pub fn with_script(mut self, script: &str) -> QemuConfig {
        self.script = Some(script.to_string());
        self
    }

    /// The kernel command line.
    pub fn append(&self) -> String {
        let mut a = vec![
            "console=ttyS0".to_string(),
            "quiet".to_string(),
            "loglevel=3".to_string(),
            "mitigations=off".to_string(),
            "panic=-1".to_string(),
            format!("mvh.mac={}", self.mac),
        ];
        if let Some(ip) = &self.guest_cidr {
            a.push(format!("mvh.ip={ip}"));
        }
        if let Some(p) = &self.peer_ip {
            a.push(format!("mvh.peer={p}"));
        }
        a.extend(self.extra_append.iter().cloned());
        a.join(" ")
    }

    /// The full argv (program first) for the given image, serial socket and
    /// batch script file.
    pub fn command_line(
        &self,
        image: &GuestImage,
        serial: &Path,
        script_file: Option<&Path>,
    ) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        if let Some(ns) = &self.netns {
            v.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        v.push("qemu-system-x86_64".into());
        v.extend(self.accel.unwrap_or_else(accel).args().map(String::from));
        let mem = self.mem_mib;
        v.extend([
            "-machine".into(),
            "q35".into(),
            "-smp".into(),
            self.smp.to_string(),
            "-m".into(),
            mem.to_string(),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-kernel".into(),
            image.kernel.display().to_string(),
            "-initrd".into(),
            image.initrd.display().to_string(),
            "-append".into(),
            self.append(),
            "-chardev".into(),
            format!("socket,id=ser0,path={}", serial.display()),
            "-serial".into(),
            "chardev:ser0".into(),
        ]);
        let queues = match &self.net {
            NetBackend::VhostUser { socket, queues } => {
                v.push("-chardev".into());
                let mode = if self.vhost_user_server {
                    "server=on,wait=off"
                } else {
                    "reconnect=1"
                };
                v.push(format!("socket,id=c0,path={},{mode}", socket.display()));
                v.push("-netdev".into());
                v.push(format!("vhost-user,id=n0,chardev=c0,queues={queues}"));
                Some(*queues)
            }
            NetBackend::Tap { ifname, queues } => {
                v.push("-netdev".into());
                v.push(format!(
                    "tap,id=n0,ifname={ifname},script=no,downscript=no,vhost=off,queues={queues}"
                ));
                Some(*queues)
            }
            NetBackend::None => None,
        };
        if let Some(q) = queues {
            // QEMU 7.2 segfaults in vhost_net_start -> msix_set_vector_notifiers when a
            // vhost(-user) device uses MSI-X without KVM's irqchip (TCG); INTx works. With KVM
            // (a user's host) MSI-X vectors are used as usual.
            let vhost_under_tcg = matches!(self.net, NetBackend::VhostUser { .. })
                && self.accel.unwrap_or_else(accel) == Accel::Tcg;
            let mq = if q > 1 && !vhost_under_tcg {
                format!(",mq=on,vectors={}", 2 * u32::from(q) + 2)
            } else if q > 1 {
                ",mq=on,vectors=0".to_string()
            } else if vhost_under_tcg {
                ",vectors=0".to_string()
            } else {
                String::new()
            };
            v.push("-device".into());
            v.push(format!(
                "virtio-net-pci,netdev=n0,mac={}{mq},romfile={}",
                self.mac, self.nic_opts
            ));
        }
        if let Some(f) = script_file {
            v.push("-fw_cfg".into());
            v.push(format!("name=opt/macvhost/script,file={}", f.display()));
        }
        if self.no_reboot {
            v.push("-no-reboot".into());
        }
        v.extend(self.extra_args.iter().cloned());
        v
    }
}

// ----------------------------------------------------------------- errors ---

/// A failed wait or command, with the tail of the serial log for context.
#[derive(Debug)]
pub struct GuestError {
    pub msg: String,
    pub log_tail: String,
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n--- last guest serial lines ---\n{}",
            self.msg, self.log_tail
        )
    }
}

impl std::error::Error for GuestError {}

// ----------------------------------------------------------------- serial ---

#[derive(Default)]
struct SerialState {
    lines: Vec<String>,
    partial: Vec<u8>,
    prompts: usize,
    eof: bool,
}

struct Shared {
    state: Mutex<SerialState>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SerialState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The text from the first `MVH-` on (strips escape sequences and other
/// junk that firmware or the kernel left on the same line).
fn marker(line: &str) -> Option<&str> {
    line.find("MVH-").map(|i| &line[i..])
}

fn push_line(st: &mut SerialState, raw: &[u8], echo: bool) {
    let text = String::from_utf8_lossy(raw);
    let text = text.trim_end_matches('\r').to_string();
    if echo {
        eprintln!("guest| {text}");
    }
    if marker(&text) == Some("MVH-PROMPT") {
        st.prompts += 1;
    }
    st.lines.push(text);
}

fn serial_reader(mut stream: UnixStream, mut log: File, shared: Arc<Shared>, echo: bool) {
    let mut buf = vec![0u8; 16384];
    loop {
        let n = stream.read(&mut buf).unwrap_or(0);
        let mut st = shared.lock();
        if n == 0 {
            if !st.partial.is_empty() {
                let p = std::mem::take(&mut st.partial);
                push_line(&mut st, &p, echo);
            }
            st.eof = true;
            shared.cond.notify_all();
            return;
        }
        let _ = log.write_all(&buf[..n]);
        for &b in &buf[..n] {
            if b == b'\n' {
                let p = std::mem::take(&mut st.partial);
                push_line(&mut st, &p, echo);
            } else {
                st.partial.push(b);
            }
        }
        shared.cond.notify_all();
    }
}

// ------------------------------------------------------------------- qemu ---

/// What `MVH-READY` said.
#[derive(Clone, Debug)]
pub struct Ready {
    pub iface: String,
    pub mac: String,
    /// `operstate` of the NIC (`up`, `down`, `none` without a NIC).
    pub link: String,
    /// Guest uptime (seconds) when the NIC was up.
    pub guest_uptime: f64,
    /// Wall-clock time from spawning QEMU to `MVH-READY`.
    pub wall: Duration,
}

/// The result of one interactive command.
#[derive(Clone, Debug)]
pub struct CmdOutput {
    pub rc: i32,
    /// Everything the command printed (stdout + stderr), `\n`-separated.
    pub output: String,
    /// Its `MVH-RESULT name=value` lines.
    pub results: BTreeMap<String, String>,
    /// Wall-clock time from sending the command to `MVH-END`.
    pub elapsed: Duration,
}

impl CmdOutput {
    /// A result by name.
    pub fn result(&self, name: &str) -> Option<&str> {
        self.results.get(name).map(String::as_str)
    }

    /// A result by name, panicking with the output when it is missing.
    pub fn expect_result(&self, name: &str) -> &str {
        self.result(name).unwrap_or_else(|| {
            panic!(
                "guest printed no MVH-RESULT {name}=..; output:\n{}",
                self.output
            )
        })
    }
}

fn parse_results<'a>(lines: impl Iterator<Item = &'a String>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for l in lines {
        if let Some(rest) = marker(l).and_then(|s| s.strip_prefix("MVH-RESULT ")) {
            if let Some((k, v)) = rest.split_once('=') {
                m.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    m
}

struct Writer {
    stream: UnixStream,
    sent: usize,
}

/// A running guest. QEMU is killed when this is dropped.
pub struct Qemu {
    child: Mutex<Child>,
    shared: Arc<Shared>,
    writer: Mutex<Writer>,
    reader: Option<JoinHandle<()>>,
    started: Instant,
    log_path: PathBuf,
    stderr_path: PathBuf,
    argv: Vec<String>,
    _dir: tempfile::TempDir,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

impl Qemu {
    /// Builds the image if needed and boots a guest. Returns once QEMU has
    /// connected its serial line (the guest is still booting: use
    /// [`Qemu::wait_ready`]).
    pub fn spawn(cfg: &QemuConfig) -> Result<Qemu, GuestError> {
        Self::spawn_with_image(cfg, &guest_image())
    }

    /// Like [`Qemu::spawn`] with an explicit image.
    pub fn spawn_with_image(cfg: &QemuConfig, image: &GuestImage) -> Result<Qemu, GuestError> {
        let err = |msg: String| GuestError {
            msg,
            log_tail: String::new(),
        };
        let dir = tempfile::Builder::new()
            .prefix("mvh-guest-")
            .tempdir()
            .map_err(|e| err(format!("tempdir: {e}")))?;
        let logs = target_dir().join("guest/logs");
        fs::create_dir_all(&logs).map_err(|e| err(format!("mkdir {}: {e}", logs.display())))?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let stem = if seq == 0 {
            cfg.name.clone()
        } else {
            format!("{}-{seq}", cfg.name)
        };
        let log_path = logs.join(format!("{stem}.log"));
        let stderr_path = logs.join(format!("{stem}.qemu-stderr"));

        let serial_path = dir.path().join("serial.sock");
        let listener = UnixListener::bind(&serial_path)
            .map_err(|e| err(format!("bind {}: {e}", serial_path.display())))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err(format!("nonblocking: {e}")))?;

        let script_file = match &cfg.script {
            Some(s) => {
                let f = dir.path().join("script.sh");
                fs::write(&f, s).map_err(|e| err(format!("write script: {e}")))?;
                Some(f)
            }
            None => None,
        };
        let argv = cfg.command_line(image, &serial_path, script_file.as_deref());
        let stderr =
            File::create(&stderr_path).map_err(|e| err(format!("create stderr log: {e}")))?;
        let log = File::create(&log_path).map_err(|e| err(format!("create serial log: {e}")))?;

        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
        // memory of the parent; it makes QEMU die with the test thread that
        // spawned it, so an aborted test leaves no guest behind.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| err(format!("spawn {}: {e}", argv[0])))?;

        // Wait for QEMU to connect its serial chardev.
        let deadline = started + scaled(Duration::from_secs(30));
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(err(format!("accept serial: {e}"))),
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(err(format!(
                    "QEMU exited ({st}) before connecting its serial line: {}\ncommand: {}",
                    fs::read_to_string(&stderr_path).unwrap_or_default().trim(),
                    shell_words(&argv)
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!(
                    "QEMU did not connect its serial line within 30 s; command: {}",
                    shell_words(&argv)
                )));
            }
            thread::sleep(Duration::from_millis(10));
        };
        stream
            .set_nonblocking(false)
            .map_err(|e| err(format!("blocking: {e}")))?;
        let writer = stream
            .try_clone()
            .map_err(|e| err(format!("clone serial stream: {e}")))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(SerialState::default()),
            cond: Condvar::new(),
        });
        let sh = shared.clone();
        let echo = cfg.echo;
        let reader = thread::Builder::new()
            .name(format!("serial-{stem}"))
            .spawn(move || serial_reader(stream, log, sh, echo))
            .map_err(|e| err(format!("spawn reader: {e}")))?;
        Ok(Qemu {
            child: Mutex::new(child),
            shared,
            writer: Mutex::new(Writer {
                stream: writer,
                sent: 0,
            }),
            reader: Some(reader),
            started,
            log_path,
            stderr_path,
            argv,
            _dir: dir,
        })
    }

    /// The QEMU argv, for messages.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// The QEMU command line as one shell-quoted string.
    pub fn command_string(&self) -> String {
        shell_words(&self.argv)
    }

    /// Where the serial output is logged.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the guest printed so far.
    pub fn log_text(&self) -> String {
        self.shared.lock().lines.join("\n")
    }

    /// Number of serial lines so far (a mark for [`Qemu::wait_for_line_from`]).
    pub fn mark(&self) -> usize {
        self.shared.lock().lines.len()
    }

    /// Time since QEMU was spawned.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn tail(&self, n: usize) -> String {
        let mut s = {
            let st = self.shared.lock();
            let from = st.lines.len().saturating_sub(n);
            let mut s = st.lines[from..].join("\n");
            if !st.partial.is_empty() {
                s.push('\n');
                s.push_str(&String::from_utf8_lossy(&st.partial));
            }
            s
        };
        let stderr = fs::read_to_string(&self.stderr_path).unwrap_or_default();
        if !stderr.trim().is_empty() {
            s.push_str("\n--- qemu stderr ---\n");
            s.push_str(stderr.trim());
        }
        s
    }

    fn error(&self, msg: String) -> GuestError {
        GuestError {
            msg: format!("{msg} (serial log: {})", self.log_path.display()),
            log_tail: self.tail(40),
        }
    }

    fn wait_until<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&SerialState) -> Option<T>,
    ) -> Result<T, GuestError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(v) = f(&st) {
                return Ok(v);
            }
            if st.eof {
                drop(st);
                let status = self.wait_exit(Duration::from_secs(5));
                return Err(self.error(format!(
                    "guest stopped ({}) while waiting for {what}",
                    status.map_or("still running".into(), |s| s.to_string())
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                return Err(self.error(format!("timed out after {timeout:?} waiting for {what}")));
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the first line (since boot) containing `pattern`.
    pub fn wait_for_line(&self, pattern: &str, timeout: Duration) -> Result<String, GuestError> {
        self.wait_for_line_from(0, pattern, timeout)
    }

    /// Waits for the first line at or after `mark` containing `pattern`.
    pub fn wait_for_line_from(
        &self,
        mark: usize,
        pattern: &str,
        timeout: Duration,
    ) -> Result<String, GuestError> {
        self.wait_until(timeout, &format!("a line containing {pattern:?}"), |st| {
            st.lines
                .iter()
                .skip(mark)
                .find(|l| l.contains(pattern))
                .cloned()
        })
    }

    /// Waits for `MVH-READY` (the NIC is configured).
    pub fn wait_ready(&self, timeout: Duration) -> Result<Ready, GuestError> {
        let line = self.wait_for_line("MVH-READY ", timeout)?;
        let wall = self.started.elapsed();
        let line = marker(&line).unwrap_or(&line);
        let mut r = Ready {
            iface: String::new(),
            mac: String::new(),
            link: String::new(),
            guest_uptime: 0.0,
            wall,
        };
        for kv in line.split_whitespace().skip(1) {
            match kv.split_once('=') {
                Some(("iface", v)) => r.iface = v.to_string(),
                Some(("mac", v)) => r.mac = v.to_string(),
                Some(("link", v)) => r.link = v.to_string(),
                Some(("uptime", v)) => r.guest_uptime = v.parse().unwrap_or(0.0),
                _ => {}
            }
        }
        Ok(r)
    }

    /// Batch mode: waits for `MVH-DONE rc=N` and returns N.
    pub fn wait_done(&self, timeout: Duration) -> Result<i32, GuestError> {
        let line = self.wait_for_line("MVH-DONE rc=", timeout)?;
        let rc = marker(&line)
            .and_then(|s| s.strip_prefix("MVH-DONE rc="))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(-1);
        Ok(rc)
    }

    /// All `MVH-RESULT` lines so far (later ones win).
    pub fn results(&self) -> BTreeMap<String, String> {
        parse_results(self.shared.lock().lines.iter())
    }

    /// Interactive mode: runs `script` (any number of lines) in the guest and
    /// waits up to `timeout` for it to finish. Commands are serialised.
    pub fn exec(&self, script: &str, timeout: Duration) -> Result<CmdOutput, GuestError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let want_prompts = w.sent + 1;
        self.wait_until(timeout, "the guest's command prompt", |st| {
            (st.prompts >= want_prompts).then_some(())
        })?;
        w.sent += 1;
        let id = w.sent;
        let eof = format!("MVH-EOF {id}");
        if script.lines().any(|l| l == eof) {
            return Err(self.error(format!("script contains the terminator line {eof:?}")));
        }
        let start_line = self.mark();
        let msg = format!(
            "MVH-CMD {id}\n{}{}{eof}\n",
            script,
            if script.ends_with('\n') { "" } else { "\n" }
        );
        let sent_at = Instant::now();
        w.stream
            .write_all(msg.as_bytes())
            .map_err(|e| self.error(format!("writing to the serial line: {e}")))?;
        let end = format!("MVH-END {id} rc=");
        let (idx, rc, prefix) =
            self.wait_until(timeout, &format!("command {id} to finish"), |st| {
                st.lines
                    .iter()
                    .enumerate()
                    .skip(start_line)
                    .find_map(|(i, l)| {
                        l.find(&end).map(|p| {
                            let rc = l[p + end.len()..].trim().parse().unwrap_or(-1);
                            (i, rc, l[..p].to_string())
                        })
                    })
            })?;
        let elapsed = sent_at.elapsed();
        let st = self.shared.lock();
        let mut lines: Vec<String> = st.lines[start_line..idx].to_vec();
        drop(st);
        if !prefix.is_empty() {
            lines.push(prefix);
        }
        let results = parse_results(lines.iter());
        Ok(CmdOutput {
            rc,
            output: lines.join("\n"),
            results,
            elapsed,
        })
    }

    /// [`Qemu::exec`], panicking (with the output) unless it succeeds.
    pub fn exec_ok(&self, script: &str, timeout: Duration) -> CmdOutput {
        match self.exec(script, timeout) {
            Ok(o) if o.rc == 0 => o,
            Ok(o) => panic!(
                "guest command failed (rc={}):\n{script}\n--- output ---\n{}",
                o.rc, o.output
            ),
            Err(e) => panic!("guest command failed:\n{script}\n{e}"),
        }
    }

    /// Asks the guest to power off (interactive mode) and waits for QEMU.
    pub fn shutdown(&self, timeout: Duration) -> Option<ExitStatus> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.sent += 1;
        let id = w.sent;
        let _ = w
            .stream
            .write_all(format!("MVH-CMD {id}\nsync; poweroff -f\nMVH-EOF {id}\n").as_bytes());
        drop(w);
        self.wait_exit(timeout)
    }

    /// Waits for QEMU to exit by itself.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self
                .child
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_wait()
            {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// For a guest that arrived by live migration: it is waiting at the prompt it printed on
    /// the source, which this serial line never saw. Counts that prompt so [`Qemu::exec`] works.
    pub fn adopt_migrated_prompt(&self) {
        let sent = self.writer.lock().unwrap_or_else(|e| e.into_inner()).sent;
        let mut st = self.shared.lock();
        st.prompts = st.prompts.max(sent + 1);
        self.shared.cond.notify_all();
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    /// Kills QEMU now.
    pub fn kill(&self) {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:@+%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

// -------------------------------------------------------------------- QMP ---

/// A QMP connection (`-qmp unix:PATH,server=on,wait=off`), capabilities negotiated.
pub struct Qmp {
    reader: io::BufReader<UnixStream>,
    writer: UnixStream,
    /// Asynchronous events seen while waiting for replies (`{"event": ...}` objects).
    pub events: Vec<serde_json::Value>,
}

impl Qmp {
    /// Connects (retrying until `timeout`: QEMU creates the socket as it starts).
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(scaled(Duration::from_secs(60))))?;
        let mut q = Qmp {
            reader: io::BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = q.read_value()?;
        if greeting.get("QMP").is_none() {
            return Err(io::Error::other(format!("not a QMP greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn read_value(&mut self) -> io::Result<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&line).map_err(|e| io::Error::other(format!("QMP {line:?}: {e}")))
    }

    /// Runs one command; returns its `return` value, or its `error` as an `Err`.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> io::Result<serde_json::Value> {
        let msg = serde_json::json!({ "execute": command, "arguments": arguments });
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        loop {
            let v = self.read_value()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(io::Error::other(format!("QMP {command}: {v}")));
        }
    }
}

// ------------------------------------------------------ network namespace ---

/// The peer's address with its prefix.
pub const PEER_CIDR: &str = "10.199.0.1/24";

/// `mvh-peer` (with [`PEER_CIDR`], up) ═veth═ `mvh-lower` (down): the peer side of every guest
/// test's topology.
pub fn add_veth_peer(ns: &NetNs) {
    ns.add_veth("mvh-peer", "mvh-lower");
    ns.add_addr("mvh-peer", PEER_CIDR);
    ns.set_up(&["mvh-peer"]);
}

/// The macvtap topology of the guest tests and `scripts/quickstart.sh`: `mvh-peer` (with
/// [`PEER_CIDR`]) ═veth═ `mvh-lower`, and macvtap `mvt0` (bridge mode, a fresh `/dev/tapN`,
/// MAC [`GUEST_MAC`]: macvtap only delivers frames for its own address) on `mvh-lower`; all up.
pub fn add_veth_macvtap(ns: &NetNs) -> MacvtapTopo {
    let mac = MacAddr::parse(GUEST_MAC).expect("guest MAC");
    let topo = MacvtapTopo::build(
        ns,
        ["mvh-peer", "mvh-lower", "mvt0"],
        "bridge",
        mac,
        free_ifindex(),
    );
    ns.add_addr("mvh-peer", PEER_CIDR);
    topo
}

// ------------------------------------------------------------- traffic ---

/// SHA-256 (hex) of `data`, computed by `sha256sum`.
pub fn sha256_hex(data: &[u8]) -> io::Result<String> {
    let mut h = Sha256Sum::new()?;
    h.update(data)?;
    h.finish()
}

/// A streaming `sha256sum` child process.
pub struct Sha256Sum {
    child: Child,
}

impl Sha256Sum {
    pub fn new() -> io::Result<Sha256Sum> {
        let child = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Sha256Sum { child })
    }

    pub fn update(&mut self, data: &[u8]) -> io::Result<()> {
        self.child
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("sha256sum stdin closed"))?
            .write_all(data)
    }

    pub fn finish(mut self) -> io::Result<String> {
        drop(self.child.stdin.take());
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("sha256sum stdout"))?
            .read_to_string(&mut out)?;
        self.child.wait()?;
        out.split_whitespace()
            .next()
            .map(str::to_string)
            .ok_or_else(|| io::Error::other("sha256sum printed nothing"))
    }
}

/// `len` random bytes (from `/dev/urandom`).
pub fn random_blob(len: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    File::open("/dev/urandom")?.read_exact(&mut v)?;
    Ok(v)
}

fn accept_timeout(listener: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no connection from the guest",
                    ));
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// What one side of a transfer saw.
#[derive(Clone, Debug)]
pub struct Transfer {
    pub bytes: u64,
    pub sha256: String,
    /// From accepting the connection to the end of the data.
    pub elapsed: Duration,
}

impl Transfer {
    /// Throughput in Mbit/s.
    pub fn mbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }
}

/// Accepts one connection on `listener` (within `timeout`), sends `data`,
/// closes. Returns what was sent (its sha256 is computed beforehand).
/// Streams `bytes` random bytes from the peer (`PEER_IP:5001` in `ns`) into `vm`, which keeps
/// them in `/tmp/rx` and reports the results `stream_bytes` and `stream_sha` when done (in the
/// background: `vm` stays usable). Returns the sender; its [`Transfer`] has the sha256.
pub fn stream_into_guest(ns: &NetNs, vm: &Qemu, bytes: usize) -> JoinHandle<io::Result<Transfer>> {
    let blob = Arc::new(random_blob(bytes).expect("random data"));
    let listener = ns
        .tcp_listener(format!("{PEER_IP}:5001").parse().unwrap())
        .expect("listen in the namespace");
    let sender = serve_blob(listener, blob, secs(600));
    vm.exec_ok(
        "(nc $MVH_PEER 5001 > /tmp/rx; result stream_bytes $(wc -c < /tmp/rx); \
         result stream_sha $(sha256 /tmp/rx)) &",
        secs(60),
    );
    sender
}

pub fn serve_blob(
    listener: TcpListener,
    data: Arc<Vec<u8>>,
    timeout: Duration,
) -> JoinHandle<io::Result<Transfer>> {
    thread::spawn(move || {
        let sha256 = sha256_hex(&data)?;
        let mut s = accept_timeout(&listener, timeout)?;
        let t0 = Instant::now();
        s.write_all(&data)?;
        s.shutdown(Shutdown::Write)?;
        // Wait for the peer to close so that "elapsed" covers delivery.
        let mut sink = [0u8; 64];
        while s.read(&mut sink).map(|n| n > 0).unwrap_or(false) {}
        Ok(Transfer {
            bytes: data.len() as u64,
            sha256,
            elapsed: t0.elapsed(),
        })
    })
}

/// Accepts one connection on `listener` (within `timeout`) and hashes
/// everything received until the peer closes.
pub fn receive_sha256(
    listener: TcpListener,
    timeout: Duration,
) -> JoinHandle<io::Result<Transfer>> {
    thread::spawn(move || {
        let mut s = accept_timeout(&listener, timeout)?;
        let t0 = Instant::now();
        let mut h = Sha256Sum::new()?;
        let mut buf = vec![0u8; 1 << 16];
        let mut bytes = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            h.update(&buf[..n])?;
        }
        let elapsed = t0.elapsed();
        Ok(Transfer {
            bytes,
            sha256: h.finish()?,
            elapsed,
        })
    })
}
