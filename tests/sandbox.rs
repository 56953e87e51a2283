//! The sandbox (issue 11): what a sealed macvhost holds, sees and may do.
//!
//! Two halves:
//! - `macvhost sandbox-probe` (hidden) seals a small process exactly as the daemon seals itself
//!   and then makes the calls a test asks for on stdin: a call outside the allowlist must kill
//!   it with SIGSYS and a line naming the call (or, with `--seccomp log`, go through).
//! - The daemon itself, sealed by default, between a macvtap in a network namespace and
//!   DPDK testpmd: traffic passes while every thread reports no capability, no_new_privs and
//!   seccomp mode 2, and its root (`/proc/PID/root`) is empty.
//!
//! The probe tests that need no privilege run as any user; the rest need root (and testpmd)
//! and skip through the kit's `require` otherwise (a failure under `MACVHOST_E2E_REQUIRED=1`).

mod common;
mod support {
    #[path = "vu_driver.rs"]
    pub mod vu_driver;
}

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use macvhost::sandbox::helper::{self, Refusal, Reply, Request};
use support::vu_driver::{VuGuest, MEM_SIZE};

// ---------------------------------------------------------------------------------------------
// The probe
// ---------------------------------------------------------------------------------------------

struct Probe {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    pid: u32,
    /// The first line: `sealed pid N fs VIEW threads N bounding_kept B landlock_abi N took_us N`.
    sealed: String,
}

impl Probe {
    fn spawn(args: &[&str]) -> Probe {
        Self::spawn_with(Command::new(Daemon::binary()), args)
    }

    /// `cmd` is the program to run (the binary, or a wrapper like setpriv with it as argument).
    fn spawn_with(mut cmd: Command, args: &[&str]) -> Probe {
        let mut child = cmd
            .arg("sandbox-probe")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sandbox-probe");
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut sealed = String::new();
        out.read_line(&mut sealed).expect("read the seal line");
        let pid = child.id();
        let mut p = Probe {
            child,
            stdin,
            out,
            pid,
            sealed: sealed.trim().to_string(),
        };
        if !p.sealed.starts_with("sealed ") {
            let (status, err) = p.finish();
            panic!(
                "probe did not seal: {:?} ({status}); stderr: {err}",
                p.sealed
            );
        }
        p
    }

    /// Sends one command; returns its answer, or None when the probe died instead.
    fn ask(&mut self, cmd: &str) -> Option<String> {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{cmd}").ok()?;
        stdin.flush().ok()?;
        let mut line = String::new();
        match self.out.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim().to_string()),
        }
    }

    /// Closes stdin (the probe exits) and returns its status and stderr.
    fn finish(&mut self) -> (ExitStatus, String) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "probe did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status, err)
    }

    fn field(&self, key: &str) -> String {
        let words: Vec<&str> = self.sealed.split_whitespace().collect();
        let i = words.iter().position(|w| *w == key).expect(key);
        words[i + 1].to_string()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts the probe died of SIGSYS after naming `syscall` (and `thread`) on stderr.
fn assert_killed_naming(p: &mut Probe, syscall: &str, thread: &str) {
    let (status, err) = p.finish();
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "expected death by SIGSYS, got {status}; stderr: {err}"
    );
    let want = format!("({syscall}) not allowed in thread {thread} ");
    assert!(
        err.contains("macvhost: seccomp: syscall ") && err.contains(&want),
        "stderr does not name {syscall} in {thread}: {err}"
    );
}

/// `Name` and the fields of `/proc/PID/task/TID/status` for every thread of `pid`.
fn thread_status(pid: u32) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let dir = format!("/proc/{pid}/task");
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let path = e.expect("task entry").path().join("status");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // the thread just exited
        };
        let map = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        out.push(map);
    }
    out
}

const ZERO_CAPS: &str = "0000000000000000";

/// Every thread of `pid`: no capability in any set (bounding too, unless `bounding_kept`),
/// no_new_privs, seccomp filter mode. Returns the thread names.
fn assert_every_thread_sealed(pid: u32, bounding_kept: bool) -> Vec<String> {
    let threads = thread_status(pid);
    assert!(!threads.is_empty());
    let mut names = Vec::new();
    for t in &threads {
        let name = t.get("Name").cloned().unwrap_or_default();
        let mut sets = vec!["CapEff", "CapPrm", "CapInh", "CapAmb"];
        if !bounding_kept {
            sets.push("CapBnd");
        }
        for set in sets {
            assert_eq!(
                t.get(set).map(String::as_str),
                Some(ZERO_CAPS),
                "thread {name}: {set}"
            );
        }
        assert_eq!(
            t.get("NoNewPrivs").map(String::as_str),
            Some("1"),
            "thread {name}"
        );
        assert_eq!(
            t.get("Seccomp").map(String::as_str),
            Some("2"),
            "thread {name}"
        );
        names.push(name);
    }
    names.sort();
    names
}

/// What `/proc/PID/root` holds (needs ptrace access: root).
fn root_entries(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .expect("read /proc/PID/root")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// What an empty root may hold: `tmp` (where `$TMPDIR` and the socket directories sit in these
/// tests) and the empty path of the working directory (kept so relative paths still resolve).
fn assert_empty_root(pid: u32) {
    let mut want = vec!["tmp".to_string()];
    let cwd = std::env::current_dir().unwrap();
    if let Some(std::path::Component::Normal(first)) = cwd.components().nth(1) {
        want.push(first.to_string_lossy().into_owned());
    }
    want.sort();
    want.dedup();
    assert_eq!(root_entries(pid), want);
    for host in ["etc", "usr", "proc", "dev", "sys"] {
        assert!(
            !Path::new(&format!("/proc/{pid}/root/{host}")).exists(),
            "/{host} visible"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// What the filter denies (any user)
// ---------------------------------------------------------------------------------------------

#[test]
fn syscall_outside_the_allowlist_kills_with_sigsys_naming_it() {
    let mut p = Probe::spawn(&[]);
    assert_eq!(
        p.ask("syscall getpid").map(|a| a.starts_with("rc ")),
        Some(true)
    );
    assert_eq!(p.ask("syscall getppid"), None, "getppid must not return");
    assert_killed_naming(&mut p, "getppid", "macvhost");
}

#[test]
fn log_mode_lets_a_forbidden_syscall_through() {
    let mut p = Probe::spawn(&["--seccomp", "log"]);
    let ppid = std::process::id();
    assert_eq!(p.ask("syscall getppid"), Some(format!("rc {ppid}")));
    assert_eq!(
        p.ask("syscall socket 2 1 0").map(|a| a.starts_with("rc ")),
        Some(true)
    );
    let (status, err) = p.finish();
    assert!(status.success(), "{status}: {err}");
    assert!(!err.contains("seccomp"), "{err}");
}

#[test]
fn inet_socket_is_refused_where_a_unix_socket_is_allowed() {
    let mut p = Probe::spawn(&[]);
    let unix = p.ask(&format!("syscall socket {} 1 0", libc::AF_UNIX));
    assert!(unix.is_some_and(|a| a.starts_with("rc ")));
    assert_eq!(
        p.ask(&format!("syscall socket {} 1 0", libc::AF_INET)),
        None
    );
    assert_killed_naming(&mut p, "socket", "macvhost");
}

#[test]
fn process_clone_is_refused_thread_clone_is_not() {
    let mut p = Probe::spawn(&[]);
    // Threads still start (clone3 answers ENOSYS, glibc falls back to clone with CLONE_THREAD).
    assert!(p
        .ask("thread process syscall getpid")
        .is_some_and(|a| a.starts_with("rc ")));
    // A fork-style clone (SIGCHLD, no CLONE_THREAD).
    assert_eq!(
        p.ask(&format!("syscall clone {} 0 0 0 0", libc::SIGCHLD)),
        None
    );
    assert_killed_naming(&mut p, "clone", "macvhost");
}

#[test]
fn opening_any_file_kills_the_sealed_process() {
    // Everything is opened at start-up: the main thread's filter has no open at all, even for
    // a path that would not exist in its empty root.
    let mut p = Probe::spawn(&[]);
    assert_eq!(p.ask("open /etc/hostname"), None);
    assert_killed_naming(&mut p, "openat", "macvhost");
}

#[test]
fn execve_is_refused() {
    let mut p = Probe::spawn(&[]);
    assert_eq!(p.ask("syscall execve 0 0 0"), None);
    assert_killed_naming(&mut p, "execve", "macvhost");
}

#[test]
fn executable_memory_is_refused() {
    let mut p = Probe::spawn(&[]);
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    assert!(p
        .ask(&format!("syscall mmap 0 4096 {rw} {anon} -1 0"))
        .is_some_and(|a| a.starts_with("rc ")));
    let rx = libc::PROT_READ | libc::PROT_EXEC;
    assert_eq!(
        p.ask(&format!("syscall mmap 0 4096 {rx} {anon} -1 0")),
        None
    );
    assert_killed_naming(&mut p, "mmap", "macvhost");
}

#[test]
fn signalling_another_process_is_refused() {
    let mut p = Probe::spawn(&[]);
    // Signal 0 to our parent: only a permission check, but kill(2) is not on any list.
    assert_eq!(
        p.ask(&format!("syscall kill {} 0", std::process::id())),
        None
    );
    assert_killed_naming(&mut p, "kill", "macvhost");
}

#[test]
fn worker_thread_filter_refuses_what_the_main_thread_may_do() {
    let mut p = Probe::spawn(&[]);
    assert!(p
        .ask("thread worker syscall getpid")
        .is_some_and(|a| a.starts_with("rc ")));
    // The main thread may open a unix socket (--client, the rendezvous); a worker may not.
    assert!(p
        .ask(&format!("syscall socket {} 1 0", libc::AF_UNIX))
        .is_some_and(|a| a.starts_with("rc ")));
    assert_eq!(
        p.ask(&format!(
            "thread worker syscall socket {} 1 0",
            libc::AF_UNIX
        )),
        None
    );
    assert_killed_naming(&mut p, "socket", "probe-worker");
}

#[test]
fn threads_running_before_the_seal_seal_themselves() {
    let mut p = Probe::spawn(&["--threads", "3"]);
    assert_eq!(p.field("threads"), "3");
    let kept = p.field("bounding_kept") == "true";
    let names = assert_every_thread_sealed(p.pid, kept);
    assert_eq!(names.len(), 4, "{names:?}");
    let (status, err) = p.finish();
    assert!(status.success(), "{status}: {err}");
}

#[test]
fn thread_running_before_the_seal_cannot_open_a_socket_the_main_thread_can() {
    // Such threads (signals, link-watch, control, metrics) stay in the host's mount namespace;
    // their service filter has no socket, connect or open.
    let mut p = Probe::spawn(&["--threads", "1"]);
    assert!(p
        .ask("pre syscall getpid")
        .is_some_and(|a| a.starts_with("rc ")));
    assert!(p
        .ask(&format!("syscall socket {} 1 0", libc::AF_UNIX))
        .is_some_and(|a| a.starts_with("rc ")));
    assert_eq!(
        p.ask(&format!("pre syscall socket {} 1 0", libc::AF_UNIX)),
        None
    );
    assert_killed_naming(&mut p, "socket", "probe-idle-0");
}

#[test]
fn thread_running_before_the_seal_cannot_open_a_host_file() {
    let mut p = Probe::spawn(&["--threads", "1"]);
    assert_eq!(p.ask("pre open /etc/hostname"), None);
    assert_killed_naming(&mut p, "openat", "probe-idle-0");
}

// ---------------------------------------------------------------------------------------------
// Capabilities, ids and the filesystem view (root)
// ---------------------------------------------------------------------------------------------

#[test]
fn sealed_process_holds_no_capability_in_any_thread_and_sees_an_empty_root() {
    require!(E2E);
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("{}:listen", dir.path().display());
    // --seccomp log: the filter would refuse open outright; here the filesystem view answers.
    let mut p = Probe::spawn(&["--threads", "2", "--dir", &spec, "--seccomp", "log"]);
    assert_eq!(p.field("fs"), "MountNamespace");
    let names = assert_every_thread_sealed(p.pid, false);
    assert_eq!(names.len(), 3, "{names:?}");
    assert_empty_root(p.pid);
    let enoent = format!("err {}", libc::ENOENT);
    assert_eq!(p.ask("open /etc/hostname"), Some(enoent.clone()));
    assert_eq!(p.ask("open /proc/self/status"), Some(enoent));
    // The one directory it still uses is there, writable for its socket.
    let sock = dir.path().join("s.sock");
    assert_eq!(
        p.ask(&format!("bind {}", sock.display())),
        Some("ok".into())
    );
    let (status, err) = p.finish();
    assert!(status.success(), "{status}: {err}");
}

#[test]
fn user_and_group_apply_to_every_thread() {
    require!(E2E);
    let mut p = Probe::spawn(&["--threads", "2", "--uid", "65534", "--gid", "65534"]);
    for t in thread_status(p.pid) {
        let name = &t["Name"];
        for key in ["Uid", "Gid"] {
            let ids: Vec<&str> = t[key].split_whitespace().collect();
            assert_eq!(ids, vec!["65534"; 4], "{name}: {key}");
        }
        assert_eq!(t["Groups"], "65534", "{name}");
    }
    assert_every_thread_sealed(p.pid, false);
    let (status, err) = p.finish();
    assert!(status.success(), "{status}: {err}");
}

fn setpriv_net_admin_only() -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=+net_admin",
        "--ambient-caps=+net_admin",
    ])
    .arg(Daemon::binary());
    c
}

/// macvhost run as a plain user with only CAP_NET_ADMIN (systemd `AmbientCapabilities=`): a
/// single-threaded process enters a user namespace for its empty root and can then empty its
/// bounding set too; a multithreaded one falls back to Landlock and keeps the bounding set
/// (reported), which no_new_privs and the filter make moot.
#[test]
fn process_with_only_net_admin_seals_too() {
    require!(E2E);
    require!(&[Need::Tool("setpriv")]);
    let mut p = Probe::spawn_with(setpriv_net_admin_only(), &["--seccomp", "log"]);
    assert!(
        p.sealed.contains("fs MountNamespace { user_ns: true }"),
        "{}",
        p.sealed
    );
    assert_every_thread_sealed(p.pid, false);
    assert_eq!(
        p.ask("open /etc/hostname"),
        Some(format!("err {}", libc::ENOENT))
    );
    p.finish();

    let mut p = Probe::spawn_with(
        setpriv_net_admin_only(),
        &["--threads", "1", "--seccomp", "log"],
    );
    assert!(p.sealed.contains("fs Landlock"), "{}", p.sealed);
    assert_eq!(p.field("bounding_kept"), "true");
    assert_every_thread_sealed(p.pid, true);
    assert_eq!(
        p.ask("open /etc/hostname"),
        Some(format!("err {}", libc::EACCES))
    );
    let (status, err) = p.finish();
    assert!(status.success(), "{status}: {err}");
}

/// The comparison that chose the mount namespace: Landlock (ABI <= 7) denies opening files
/// but not connecting to a unix socket by path, so a sealed process running as root could
/// still reach any root-owned socket on the host (container runtimes, systemd). In the empty
/// mount namespace that path does not exist. Also prints what each costs to set up.
#[test]
fn mount_namespace_hides_unix_sockets_that_landlock_leaves_reachable() {
    require!(E2E);
    let outside = tempfile::tempdir().unwrap();
    let sock = outside.path().join("host-service.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let connect = format!("connect {}", sock.display());
    let mut took = BTreeMap::new();
    for (fs, want_connect, want_open) in [
        ("mount-ns", format!("err {}", libc::ENOENT), libc::ENOENT),
        ("landlock", "ok".to_string(), libc::EACCES),
    ] {
        let mut runs = Vec::new();
        for _ in 0..5 {
            // --seccomp log: the filter would refuse open outright; compare the views alone.
            let mut p = Probe::spawn(&["--fs", fs, "--seccomp", "log"]);
            runs.push(p.field("took_us").parse::<u64>().unwrap());
            assert_eq!(p.ask(&connect), Some(want_connect.clone()), "{fs}");
            assert_eq!(
                p.ask("open /etc/hostname"),
                Some(format!("err {want_open}")),
                "{fs}"
            );
            p.finish();
        }
        runs.sort_unstable();
        took.insert(fs, runs[runs.len() / 2]);
    }
    println!("{}: median seal time (us): {took:?}", test_name());
}

// ---------------------------------------------------------------------------------------------
// The daemon, sealed, with a real frontend (root + testpmd)
// ---------------------------------------------------------------------------------------------

fn metrics_addr_from_log(m: &Daemon) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = m.log_text();
        if let Some(i) = log.find("Prometheus metrics on http://") {
            let rest = &log[i + "Prometheus metrics on http://".len()..];
            return rest.split('/').next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no metrics address in log");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What most sealed-daemon tests start from: a scratch directory, the test's namespace and a
/// bridge-mode macvtap on a veth in it (dropped in reverse: topology, namespace, directory).
fn bridge_macvtap() -> (tempfile::TempDir, NetNs, MacvtapTopo) {
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("sbx");
    let topo = MacvtapTopo::create(&ns, "bridge");
    (dir, ns, topo)
}

/// Checks the sealed daemon's threads and root while `pmd` forwards; returns thread names.
fn check_sealed_daemon(mvh: &Daemon) -> Vec<String> {
    // The socket is bound early in start-up; sealing comes at its end.
    let sealed = wait_until(Duration::from_secs(10), || {
        mvh.log_text().contains("sandbox sealed")
    });
    assert!(sealed, "no seal in the log:\n{}", mvh.log_text());
    let names = assert_every_thread_sealed(mvh.pid(), false);
    assert_empty_root(mvh.pid());
    names
}

/// The sealed daemon started with `args` on `topo`, testpmd forwarding (macswap, `pairs`
/// queue pairs) and the peer, once a probe frame has come back through all three.
fn sealed_forwarding(
    dir: &Path,
    ns: &NetNs,
    topo: &MacvtapTopo,
    pairs: u16,
    args: &[&str],
) -> (Daemon, Testpmd, Peer) {
    let mut mvh = Daemon::spawn(ns, dir, args);
    let mut pmd = Testpmd::spawn(
        mvh.socket(),
        dir,
        &TestpmdConfig::macswap(pairs, topo.macvtap_mac),
    );
    let peer = Peer::on_macvtap(ns, topo);
    peer.wait_for_echo(FrameKind::Udp, READY_TIMEOUT, || {
        mvh.check_alive();
        pmd.check_alive();
    });
    (mvh, pmd, peer)
}

/// The end of a forwarding test: threads and root checked, testpmd stopped, a clean exit.
fn end_sealed(mut mvh: Daemon, pmd: Testpmd) {
    check_sealed_daemon(&mvh);
    mvh.check_alive();
    pmd.stop();
    mvh.shutdown_clean();
}

#[test]
fn sealed_daemon_passes_traffic_and_no_thread_holds_privilege() {
    require!(E2E);
    let (dir, ns, topo) = bridge_macvtap();
    let (mut mvh, pmd, peer) = sealed_forwarding(
        dir.path(),
        &ns,
        &topo,
        2,
        &[
            "--macvtap",
            topo.macvtap,
            "--queues",
            "2",
            "--metrics-addr",
            "127.0.0.1:0",
            // High enough never to hold a frame back, low enough to run the limiter.
            "--tx-rate",
            "average=1000000000",
            "--rx-rate",
            "average=1000000000",
        ],
    );
    let metrics = metrics_addr_from_log(&mvh);
    // Sample the threads while frames flow.
    let (report, names) = std::thread::scope(|s| {
        let traffic = s.spawn(|| peer.roundtrip(&Traffic::udp(4000, 8)));
        let names = check_sealed_daemon(&mvh);
        (traffic.join().unwrap(), names)
    });
    report.assert_lossless_byte_exact();
    for want in [
        "vring_worker",
        "vu-shim",
        "signals",
        "link-watch",
        "control",
        "metrics",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "no {want} thread in {names:?}"
        );
    }
    // Both stats endpoints answer from the sealed process (the kit gives every daemon a
    // control socket).
    let ctl = mvh.control().to_path_buf();
    let ctl_s = ctl.display().to_string();
    let stats = Command::new(Daemon::binary())
        .args(["stats", &ctl_s, "--json"])
        .output()
        .unwrap();
    assert!(stats.status.success(), "{stats:?}");
    let body = ns.run(|| {
        let mut c = std::net::TcpStream::connect(&metrics).expect("connect metrics");
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut b = String::new();
        c.read_to_string(&mut b).unwrap();
        b
    });
    assert!(body.contains("macvhost_"), "{body}");
    let st = pmd.stop();
    // Exit and teardown run sealed too: a forgotten syscall there would be SIGSYS, not 0.
    mvh.shutdown_clean();
    assert!(!ctl.exists(), "control socket left behind");
    println!(
        "{}: [{report}], testpmd rx {}, threads {names:?}",
        test_name(),
        st.rx_packets
    );
}

#[test]
fn sealed_daemon_in_client_mode_reconnects_to_a_restarted_frontend() {
    require!(E2E);
    let (dir, ns, topo) = bridge_macvtap();
    let sock = dir.path().join("macvhost.sock");
    let mut cfg = TestpmdConfig::macswap(1, topo.macvtap_mac);
    cfg.vdev_extra = "server=1".into();
    let mut frontend = Some(Testpmd::spawn(&sock, dir.path(), &cfg));
    assert!(wait_until(Duration::from_secs(15), || sock.exists()));
    let mut mvh = Daemon::spawn(&ns, dir.path(), &["--client", "--macvtap", topo.macvtap]);
    let peer = Peer::open(&ns, topo.peer, topo.peer_mac, topo.macvtap_mac);
    let mut rounds = Vec::new();
    for round in 1..=2 {
        // Round 2: a new frontend listens on the same path; the sealed macvhost reconnects
        // through the read-only bind of the socket's directory.
        let mut pmd = frontend
            .take()
            .unwrap_or_else(|| Testpmd::spawn(&sock, dir.path(), &cfg));
        peer.wait_for_echo(FrameKind::Raw, READY_TIMEOUT, || {
            mvh.check_alive();
            pmd.check_alive();
        });
        check_sealed_daemon(&mvh);
        rounds.push(peer.lossless_round(round, 1000, pmd));
        mvh.check_alive();
    }
    mvh.shutdown_clean();
    println!("{}: {}", test_name(), rounds.join("; "));
}

#[test]
fn killed_daemon_still_has_its_macvtap_deleted() {
    require!(E2E);
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("sbx");
    ns.ip(&[
        "link", "add", "peer0", "type", "veth", "peer", "name", "lower0",
    ]);
    ns.ip(&["link", "set", "lower0", "up"]);
    let mut mvh = Daemon::spawn(
        &ns,
        dir.path(),
        &["--macvtap-parent", "lower0", "--macvtap-name", "mvk0"],
    );
    check_sealed_daemon(&mvh);
    assert!(ns.has_iface("mvk0"));
    mvh.check_alive();
    // SIGKILL: no destructor runs; the link helper sees its socket close.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(mvh.pid()).expect("Linux pids fit pid_t")),
        nix::sys::signal::Signal::SIGKILL,
    );
    let gone = wait_until(Duration::from_secs(5), || !ns.has_iface("mvk0"));
    drop(mvh);
    assert!(gone, "mvk0 outlived the killed macvhost");
}

/// A binding `--tx-rate`/`--rx-rate` in the sealed daemon (the limiter's timers and waits run
/// under the worker filter): traffic passes, every frame back, both limiters hold frames
/// (their throttle counters move) and the achieved rate stays at the limit.
#[test]
fn sealed_daemon_with_a_binding_rate_limit_holds_traffic_to_it() {
    require!(E2E);
    const RATE: u64 = 2_000_000; // bytes/s, each way
    let (dir, ns, topo) = bridge_macvtap();
    let limit = format!("average={RATE}");
    let (mvh, pmd, peer) = sealed_forwarding(
        dir.path(),
        &ns,
        &topo,
        1,
        &[
            "--macvtap",
            topo.macvtap,
            "--tx-rate",
            &limit,
            "--rx-rate",
            &limit,
        ],
    );
    let throttled = |mvh: &Daemon| {
        let q = &mvh.stats()[0];
        (q["tx_throttled"], q["rx_throttled"])
    };
    let (tx0, rx0) = throttled(&mvh);
    // About 2.4 MB each way: 1.2 s at the limit.
    let report = peer.roundtrip(&Traffic::raw(3000));
    let (tx1, rx1) = throttled(&mvh);
    let rate = report.sent_bytes as f64 / report.elapsed.as_secs_f64();
    println!(
        "{}: [{report}] {rate:.0} B/s for a limit of {RATE} B/s; throttled rounds tx {tx0} → \
         {tx1}, rx {rx0} → {rx1}",
        test_name()
    );
    report.assert_lossless_byte_exact();
    assert!(tx1 > tx0 && rx1 > rx0, "a limiter never held a frame back");
    // The default burst (10 ms of the average) lets a little through ahead of the rate.
    assert!(
        rate <= RATE as f64 * 1.05,
        "{rate:.0} B/s through a {RATE} B/s limit"
    );
    end_sealed(mvh, pmd);
}

/// `--tap-fd`: queue fds of a macvtap opened by the test (as libvirt would) and inherited by
/// the sealed daemon, which opens nothing of the host side itself: traffic on both pairs.
#[test]
fn sealed_daemon_on_macvtap_queue_fds_it_was_given_passes_traffic() {
    require!(E2E);
    let (dir, ns, topo) = bridge_macvtap();
    let node = macvtap_node(&ns, &topo, dir.path());
    // Opened blocking and without O_CLOEXEC, as `3<>/dev/tapN` in a manager's shell: the
    // daemon's process inherits them.
    let fds: Vec<std::fs::File> = (0..2)
        .map(|_| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&node)
                .unwrap_or_else(|e| panic!("open {node:?}: {e}"));
            nix::fcntl::fcntl(
                &f,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .expect("clear FD_CLOEXEC");
            f
        })
        .collect();
    let list = macvhost::testkit::fd_list(&fds);
    let (mvh, pmd, peer) = sealed_forwarding(
        dir.path(),
        &ns,
        &topo,
        2,
        &["--tap-fd", &list, "--queues", "2"],
    );
    // Ours go; the daemon holds its own copies.
    drop(fds);
    let report = peer.roundtrip(&Traffic::udp(2000, 8));
    println!(
        "{}: [{report}] over inherited --tap-fd {list}; RX frames per queue {:?}",
        test_name(),
        mvh.stats()
            .iter()
            .map(|q| q["rx_frames"])
            .collect::<Vec<_>>()
    );
    report.assert_lossless_byte_exact();
    // The macvtap spreads the 8 flows over both queues it was given.
    let per_queue: Vec<u64> = mvh.stats().iter().map(|q| q["rx_frames"]).collect();
    assert!(per_queue.iter().all(|&n| n > 0), "{per_queue:?}");
    end_sealed(mvh, pmd);
}

/// `--no-sandbox`: the explicit opt-out starts, says so in its log, and keeps what sealing
/// would take (capabilities, no seccomp, no no_new_privs, the host's filesystem), while
/// serving a frontend.
#[test]
fn no_sandbox_logs_its_warning_and_keeps_capabilities() {
    require!(E2E);
    let (dir, ns, topo) = bridge_macvtap();
    let mut mvh = Daemon::spawn(
        &ns,
        dir.path(),
        &["--macvtap", topo.macvtap, "--no-sandbox"],
    );
    let g = VuGuest::connect(mvh.socket(), 1, 256, u64::MAX, Duration::from_secs(10));
    let log = mvh.log_text();
    assert_eq!(
        log.matches("--no-sandbox: macvhost keeps its capabilities")
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains("sandbox sealed"), "{log}");
    for t in thread_status(mvh.pid()) {
        let name = &t["Name"];
        assert_ne!(t["CapEff"], ZERO_CAPS, "thread {name}");
        assert_eq!(t["NoNewPrivs"], "0", "thread {name}");
        assert_eq!(t["Seccomp"], "0", "thread {name}");
    }
    let root = root_entries(mvh.pid());
    assert!(root.iter().any(|e| e == "etc"), "{root:?}");
    drop(g);
    mvh.check_alive();
    mvh.shutdown_clean();
}

/// Live-migration logging in the sealed daemon, running as an unprivileged user: the relay
/// maps QEMU's log (SET_LOG_BASE, a memfd), the request thread re-reads ring addresses,
/// workers mark the pages they write, and the backend request channel opens — all under their
/// filters.
#[test]
fn sealed_daemon_as_nobody_logs_dirty_pages_for_migration() {
    require!(E2E);
    let dir = tempfile::tempdir().unwrap();
    // Sealed as uid/gid 65534: its socket is bound after sealing, so the directory must be
    // writable for that user.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let ns = NetNs::new("sbx");
    let topo = MacvtapTopo::create(&ns, "bridge");
    let mut mvh = Daemon::spawn(
        &ns,
        dir.path(),
        &[
            "--macvtap",
            topo.macvtap,
            "--user",
            "65534",
            "--group",
            "65534",
        ],
    );
    check_sealed_daemon(&mvh);
    for t in thread_status(mvh.pid()) {
        assert!(t["Uid"].split_whitespace().all(|id| id == "65534"), "{t:?}");
    }
    let mut g = VuGuest::connect(mvh.socket(), 1, 256, u64::MAX, Duration::from_secs(10));
    let _backend_channel = g.open_backend_channel();
    let log = g.start_dirty_log(MEM_SIZE / 4096 / 8);
    g.resend_vring_addr(g.rx(0), true);
    g.post_rx(0, 64, 2048);
    g.kick(g.rx(0));
    let peer = Peer::open(&ns, topo.peer, topo.peer_mac, topo.macvtap_mac);
    let mut frame = vec![0u8; 200];
    frame[..6].copy_from_slice(&topo.macvtap_mac.0);
    frame[6..12].copy_from_slice(&topo.peer_mac.0);
    frame[12..14].copy_from_slice(&[0x88, 0xb5]);
    let mut used = Vec::new();
    let rxq = g.rx(0);
    let got = g.wait_until(Duration::from_secs(5), |g| {
        let _ = peer.send(&frame);
        used.extend(g.take_used(rxq));
        used.len() >= 4
    });
    assert!(got, "no frame reached the guest");
    let pages = VuGuest::harvest_log(&log);
    for (head, len) in &used {
        for page in g.rx_buffer_pages(0, *head, *len) {
            assert!(pages.contains(&page), "RX page {page} not logged");
        }
    }
    g.stop_dirty_log();
    check_sealed_daemon(&mvh);
    drop(g);
    mvh.shutdown_clean();
    println!(
        "{}: {} frames, {} pages logged",
        test_name(),
        used.len(),
        pages.len()
    );
}

/// `--disconnect-on-link-down` in the sealed daemon, with `--socket-owner` and `--socket-mode`:
/// losing carrier moves the socket aside (connects to its path fail at once), carrier back
/// moves it back with the owner and mode it was given at start-up (a sealed process could not
/// chown a socket bound again), and a frontend connects; link loss and return arrive over the
/// netlink socket opened before sealing.
#[test]
fn sealed_daemon_moves_its_socket_aside_across_link_loss_keeping_owner_and_mode() {
    require!(E2E);
    use std::os::unix::fs::MetadataExt;
    let (dir, ns, topo) = bridge_macvtap();
    let mut mvh = Daemon::spawn(
        &ns,
        dir.path(),
        &[
            "--macvtap",
            topo.macvtap,
            "--disconnect-on-link-down",
            "--socket-owner",
            "65534:65534",
            "--socket-mode",
            "0660",
        ],
    );
    let sock = mvh.socket().to_path_buf();
    let aside = dir.path().join(".macvhost.sock.link-down");
    let owner_mode = |p: &Path| {
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777, m.ino())
    };
    assert!(wait_until(Duration::from_secs(10), || mvh
        .log_text()
        .contains("sandbox sealed")));
    let at_start = owner_mode(&sock);
    assert_eq!(
        (at_start.0, at_start.1, at_start.2),
        (65534, 65534, 0o660),
        "{at_start:?}"
    );
    let mut refused_in = Vec::new();
    for round in 1..=2 {
        let g = VuGuest::connect(&sock, 1, 256, u64::MAX, Duration::from_secs(10));
        ns.ip(&["link", "set", topo.lower, "down"]);
        let t0 = Instant::now();
        assert!(
            wait_until(Duration::from_secs(5), || !sock.exists()),
            "round {round}: socket still there while the link is down"
        );
        refused_in.push(t0.elapsed());
        assert!(aside.exists(), "round {round}: not moved aside");
        let e = std::os::unix::net::UnixStream::connect(&sock).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "round {round}");
        drop(g);
        ns.ip(&["link", "set", topo.lower, "up"]);
        assert!(
            wait_until(Duration::from_secs(5), || sock.exists()),
            "round {round}: socket not back after carrier returned:\n{}",
            mvh.log_text()
        );
        assert!(!aside.exists(), "round {round}");
        // The same socket: owner, mode and inode as at start.
        assert_eq!(owner_mode(&sock), at_start, "round {round}");
        mvh.check_alive();
    }
    let g = VuGuest::connect(&sock, 1, 256, u64::MAX, Duration::from_secs(10));
    check_sealed_daemon(&mvh);
    // Down once more (the loss ends this connection) and stop while the socket is aside:
    // exit removes it there.
    ns.ip(&["link", "set", topo.lower, "down"]);
    assert!(
        wait_until(Duration::from_secs(5), || aside.exists()),
        "{}",
        mvh.log_text()
    );
    drop(g);
    mvh.shutdown_clean();
    assert!(
        !sock.exists() && !aside.exists(),
        "socket left behind on exit"
    );
    println!(
        "{}: connects refused {refused_in:.0?} after carrier loss; owner, mode and inode kept",
        test_name()
    );
}

/// A stale socket left at the hidden name (a macvhost killed while the link was down) is
/// removed when the socket moves aside; something else there (here a regular file) is left
/// alone, and the socket then stays at its path, each connection closed while the link is
/// down.
#[test]
fn link_loss_with_the_aside_name_taken_refuses_connections_in_place() {
    require!(E2E);
    let (dir, ns, topo) = bridge_macvtap();
    let aside = dir.path().join(".macvhost.sock.link-down");
    // A stale socket: bound, then its listener closed.
    drop(std::os::unix::net::UnixListener::bind(&aside).unwrap());
    let mut mvh = Daemon::spawn(
        &ns,
        dir.path(),
        &["--macvtap", topo.macvtap, "--disconnect-on-link-down"],
    );
    let sock = mvh.socket().to_path_buf();
    // The daemon acts on carrier loss when it ends a connection (or refuses one that arrives
    // meanwhile): a frontend is connected each time the link goes down.
    let g = VuGuest::connect(&sock, 1, 256, u64::MAX, Duration::from_secs(10));
    ns.ip(&["link", "set", topo.lower, "down"]);
    assert!(
        wait_until(Duration::from_secs(5), || !sock.exists()),
        "the stale socket kept ours from moving aside:\n{}",
        mvh.log_text()
    );
    drop(g);
    {
        use std::os::unix::fs::FileTypeExt;
        let m = std::fs::symlink_metadata(&aside).expect("not moved to the stale socket's name");
        assert!(m.file_type().is_socket());
    }
    ns.ip(&["link", "set", topo.lower, "up"]);
    assert!(wait_until(Duration::from_secs(5), || sock.exists()));
    let g = VuGuest::connect(&sock, 1, 256, u64::MAX, Duration::from_secs(10));
    // Now a regular file takes the hidden name.
    std::fs::write(&aside, b"not ours").unwrap();
    ns.ip(&["link", "set", topo.lower, "down"]);
    assert!(wait_until(Duration::from_secs(5), || mvh
        .log_text()
        .contains(
            "it stays, and each connection is closed as it comes"
        )));
    drop(g);
    assert!(sock.exists());
    assert_eq!(std::fs::read(&aside).unwrap(), b"not ours");
    // Connecting works at the socket level, but the connection is closed unserved.
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).unwrap_or(0), 0, "a connection was served");
    ns.ip(&["link", "set", topo.lower, "up"]);
    let g = VuGuest::connect(&sock, 1, 256, u64::MAX, Duration::from_secs(10));
    mvh.check_alive();
    drop(g);
    mvh.shutdown_clean();
    assert!(!sock.exists());
    assert_eq!(std::fs::read(&aside).unwrap(), b"not ours");
}

/// Many connections, one after another, against the sealed daemon: every per-connection path
/// (threads, epolls, eventfds, timers, the rendezvous, teardown) runs under the filters.
#[test]
fn sealed_daemon_serves_five_hundred_connections_in_a_row() {
    require!(E2E);
    let (dir, ns, topo) = bridge_macvtap();
    let mut mvh = Daemon::spawn(
        &ns,
        dir.path(),
        &["--macvtap", topo.macvtap, "--queues", "2"],
    );
    let t0 = Instant::now();
    for i in 0..500 {
        let g = VuGuest::connect(mvh.socket(), 2, 256, u64::MAX, Duration::from_secs(10));
        drop(g);
        if i % 100 == 0 {
            mvh.check_alive();
        }
    }
    mvh.check_alive();
    let _g = VuGuest::connect(mvh.socket(), 2, 256, u64::MAX, Duration::from_secs(10));
    check_sealed_daemon(&mvh);
    drop(_g);
    mvh.shutdown_clean();
    println!("{}: 500 connections in {:.2?}", test_name(), t0.elapsed());
}

/// The guest's multicast groups in the sealed daemon: its IGMP join (guest TX) becomes a
/// packet-socket membership on the macvtap (`setsockopt` on the worker, no capability), so a
/// group frame from the wire reaches the guest; when the frontend leaves, the membership goes
/// (the group's MAC leaves `ip maddr` within 2 s).
#[test]
fn sealed_daemon_follows_the_guests_multicast_groups() {
    require!(E2E);
    use macvhost::datapath::mcast::frames as tf;
    let (dir, ns, topo) = bridge_macvtap();
    let mut mvh = Daemon::spawn(&ns, dir.path(), &["--macvtap", topo.macvtap]);
    let mut g = VuGuest::connect(mvh.socket(), 1, 256, u64::MAX, Duration::from_secs(10));
    g.post_rx(0, 128, 2048);
    g.kick(g.rx(0));
    let peer = Peer::open(&ns, topo.peer, topo.peer_mac, topo.macvtap_mac);
    let group = tf::v4(239, 1, 2, 3);
    let mut frame = vec![0x5a; 100];
    frame[..6].copy_from_slice(&group.mac());
    frame[6..12].copy_from_slice(&topo.peer_mac.0);
    frame[12..14].copy_from_slice(&[0x88, 0xb5]);
    let delivered = |g: &mut VuGuest| {
        let _ = peer.send(&frame);
        let mut got = Vec::new();
        g.wait_until(Duration::from_millis(300), |g| {
            got.extend(g.recv_frames(0));
            got.iter().any(|f| f == &frame)
        })
    };
    assert!(
        !delivered(&mut g),
        "a group frame arrived before the guest joined"
    );
    let join = tf::igmp_v2(0x16, group, None);
    assert!(g.send(0, &join));
    g.kick(g.tx(0));
    let mut joined = false;
    for _ in 0..10 {
        if delivered(&mut g) {
            joined = true;
            break;
        }
    }
    assert!(
        joined,
        "the group frame never reached the guest after its join"
    );
    check_sealed_daemon(&mvh);
    let group_mac = MacAddr(group.mac()).to_string();
    let maddrs = ns.maddrs(topo.macvtap);
    assert!(maddrs.contains(&group_mac), "{group_mac} not in {maddrs:?}");
    drop(g);
    // The frontend left: the group leaves the macvtap's filter (from a sealed thread too).
    let t = Instant::now();
    let left = wait_until(Duration::from_secs(2), || {
        !ns.maddrs(topo.macvtap).contains(&group_mac)
    });
    assert!(
        left,
        "{group_mac} still on {} 2 s after the frontend left: {:?}",
        topo.macvtap,
        ns.maddrs(topo.macvtap)
    );
    mvh.check_alive();
    mvh.shutdown_clean();
    println!(
        "{}: joined 239.1.2.3 through the sealed daemon; its MAC left the macvtap {:?} after \
         the frontend",
        test_name(),
        t.elapsed()
    );
}

/// A fake QEMU monitor: one connection's handshake and listing, answering
/// `query-rx-filter` with `mac` and `groups` for NIC `net0`.
struct FakeQmp {
    r: BufReader<std::os::unix::net::UnixStream>,
    w: std::os::unix::net::UnixStream,
}

impl FakeQmp {
    fn accept(l: &std::os::unix::net::UnixListener) -> FakeQmp {
        let (s, _) = l.accept().expect("the sealed macvhost connects to QMP");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        FakeQmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn send(&mut self, v: serde_json::Value) {
        self.w.write_all(v.to_string().as_bytes()).unwrap();
        self.w.write_all(b"\r\n").unwrap();
    }

    /// The next command: (execute, id).
    fn command(&mut self) -> (String, serde_json::Value) {
        let mut line = String::new();
        assert!(self.r.read_line(&mut line).unwrap() > 0, "QMP closed");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        (v["execute"].as_str().unwrap().to_string(), v["id"].clone())
    }

    fn filter(mac: &str, groups: &[&str]) -> serde_json::Value {
        serde_json::json!({"promiscuous": false, "name": "net0", "main-mac": mac,
            "unicast": "normal", "vlan": "none", "vlan-table": [], "unicast-table": [],
            "multicast": "normal", "multicast-overflow": false, "unicast-overflow": false,
            "multicast-table": groups, "broadcast-allowed": false})
    }

    /// Greeting, capabilities, and the first listing.
    fn handshake(&mut self, mac: &str, groups: &[&str]) {
        self.send(serde_json::json!({"QMP": {"version": {"qemu":
            {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": []}}));
        let (cmd, id) = self.command();
        assert_eq!(cmd, "qmp_capabilities");
        self.send(serde_json::json!({"return": {}, "id": id}));
        let (cmd, id) = self.command();
        assert_eq!(cmd, "query-rx-filter");
        self.send(serde_json::json!({"return": [Self::filter(mac, groups)], "id": id}));
    }
}

/// The pid in the daemon's "link helper started" line.
fn helper_pid_from_log(m: &Daemon) -> u32 {
    let mut pid = None;
    let found = wait_until(Duration::from_secs(10), || {
        let log = m.log_text();
        pid = log
            .lines()
            .find(|l| l.contains("link helper started"))
            .and_then(|l| l.split("pid=").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok());
        pid.is_some()
    });
    assert!(found, "no link helper in the log:\n{}", m.log_text());
    pid.unwrap()
}

/// The helper holds `CAP_NET_ADMIN` and nothing else, no_new_privs, and maps no guest memory
/// (no shared mapping of a memfd or hugetlbfs file: nothing but its own binary and libraries).
fn assert_helper_holds_only_net_admin(pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(field("CapEff:"), "0000000000001000", "{status}");
    assert_eq!(field("CapPrm:"), "0000000000001000", "{status}");
    assert_eq!(field("CapAmb:"), ZERO_CAPS, "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for l in maps.lines() {
        assert!(
            !l.contains("memfd:") && !l.contains("hugepages") && !l.contains("/dev/shm"),
            "the link helper maps {l}"
        );
    }
}

/// `--qmp` with `--trust-guest-rx-filters` in the sealed daemon: the `qmp` thread (started
/// before the seal, under its own filter) applies the guest's multicast list as packet-socket
/// memberships, has the guest's new MAC put on the macvtap by the link helper (the sealed
/// process holds no `CAP_NET_ADMIN`; the helper holds nothing else), and reconnects to a
/// restarted monitor.
#[test]
fn sealed_daemon_follows_qmp_and_a_guest_mac_change_through_the_link_helper() {
    require!(E2E);
    let dir = tempfile::tempdir().unwrap();
    let qmp_path = dir.path().join("qmp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&qmp_path).unwrap();
    let ns = NetNs::new("sbx");
    let topo = MacvtapTopo::create(&ns, "bridge");
    let mut mvh = Daemon::spawn_trusting_qmp(&ns, dir.path(), topo.macvtap, &qmp_path);
    let helper = helper_pid_from_log(&mvh);
    assert_helper_holds_only_net_admin(helper);
    let mac = topo.macvtap_mac.to_string();
    let mut q = FakeQmp::accept(&listener);
    q.handshake(&mac, &["01:00:5e:01:02:03"]);
    check_sealed_daemon(&mvh);
    // The guest takes another MAC: the sealed qmp thread asks the helper, which sets it.
    let new_mac = MacAddr::parse("02:6d:76:68:00:99").unwrap();
    let changed_at = Instant::now();
    q.send(
        serde_json::json!({"timestamp": {"seconds": 1, "microseconds": 2},
        "event": "NIC_RX_FILTER_CHANGED",
        "data": {"name": "net0", "path": "/machine/peripheral/net0/virtio-backend"}}),
    );
    let (cmd, id) = q.command();
    assert_eq!(cmd, "query-rx-filter");
    q.send(serde_json::json!({"return":
        [FakeQmp::filter(&new_mac.to_string(), &["01:00:5e:01:02:04"])], "id": id}));
    let followed = wait_until(Duration::from_secs(5), || ns.mac(topo.macvtap) == new_mac);
    let took = changed_at.elapsed();
    assert!(
        followed,
        "the macvtap kept {} after the guest took {new_mac}:\n{}",
        ns.mac(topo.macvtap),
        mvh.log_text()
    );
    mvh.check_alive();
    // The daemon logs after the helper's reply, which can come after `ip link` already shows
    // the new MAC: wait for the line rather than read the log once.
    assert!(
        wait_until(Duration::from_secs(5), || mvh
            .log_text()
            .contains("the macvtap follows the guest's MAC 02:6d:76:68:00:99")),
        "{}",
        mvh.log_text()
    );
    let log = mvh.log_text();
    assert!(
        !log.contains("cannot apply the guest's receive filter"),
        "{log}"
    );
    // And back (the helper paces changes, it does not drop them).
    q.send(
        serde_json::json!({"timestamp": {"seconds": 2, "microseconds": 2},
        "event": "NIC_RX_FILTER_CHANGED",
        "data": {"name": "net0", "path": "/machine/peripheral/net0/virtio-backend"}}),
    );
    let (cmd, id) = q.command();
    assert_eq!(cmd, "query-rx-filter");
    q.send(serde_json::json!({"return": [FakeQmp::filter(&mac, &[])], "id": id}));
    assert!(
        wait_until(Duration::from_secs(5), || ns.mac(topo.macvtap)
            == topo.macvtap_mac),
        "the macvtap did not take the guest's MAC back:\n{}",
        mvh.log_text()
    );
    check_sealed_daemon(&mvh);
    // QEMU restarts: the watcher connects again through the bound directory.
    drop(q);
    let mut q = FakeQmp::accept(&listener);
    q.handshake(&mac, &[]);
    std::thread::sleep(Duration::from_millis(200));
    mvh.check_alive();
    let names = assert_every_thread_sealed(mvh.pid(), false);
    assert!(names.iter().any(|n| n == "qmp"), "{names:?}");
    drop(q);
    mvh.shutdown_clean();
    // The daemon let the helper go: it exits (and a macvtap not created by macvhost stays).
    assert!(
        wait_until(Duration::from_secs(5), || !Path::new(&format!(
            "/proc/{helper}"
        ))
        .exists()),
        "the link helper outlived the daemon"
    );
    assert!(ns.has_iface(topo.macvtap));
    println!(
        "{}: the macvtap took the guest's MAC {:.0?} after the QMP event; two monitor \
         connections",
        test_name(),
        took
    );
}

/// A link helper started by hand, as a compromised sealed process would see it: it answers
/// only for its own link, only with a unicast MAC, only the operations it was started for, and
/// checks the link still is its macvtap before acting.
struct HelperUnderTest {
    child: Child,
    sock: std::os::unix::net::UnixStream,
}

impl HelperUnderTest {
    fn spawn(ns: &NetNs, ifindex: u32, name: &str, flags: &[&str]) -> HelperUnderTest {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let child = ns
            .command(Daemon::binary())
            .arg("link-helper")
            .arg(ifindex.to_string())
            .arg(name)
            .args(flags)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn link-helper");
        let mut ready = [0u8; 1];
        (&ours)
            .read_exact(&mut ready)
            .expect("the helper says it dropped privileges");
        assert_eq!(ready[0], helper::READY);
        assert_helper_holds_only_net_admin(child.id());
        HelperUnderTest { child, sock: ours }
    }

    fn raw(&mut self, rec: [u8; helper::RECORD]) -> helper::Reply {
        self.sock.write_all(&rec).unwrap();
        let mut answer = [0u8; helper::RECORD];
        self.sock.read_exact(&mut answer).expect("an answer");
        helper::decode_reply(&answer).expect("a valid answer")
    }

    fn ask(&mut self, req: helper::Request, ifindex: u32) -> helper::Reply {
        self.raw(helper::encode_request(req, ifindex))
    }

    /// Closes the socket; returns the exit status and stderr.
    fn finish(mut self) -> (ExitStatus, String) {
        drop(self.sock);
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status, err)
    }
}

#[test]
fn link_helper_refuses_multicast_zero_macs_and_any_other_ifindex() {
    require!(E2E);
    let ns = NetNs::new("sbx");
    let topo = MacvtapTopo::create(&ns, "bridge");
    let other_index = ns.add_macvtap(topo.lower, "mvo0", "bridge");
    let other_mac = ns.mac("mvo0");
    let mut h = HelperUnderTest::spawn(&ns, topo.ifindex, topo.macvtap, &["--set-mac"]);
    // The pid of `ip netns exec` is the helper's once it execs.
    let pid = h.child.id();
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.contains("link-helper"))
    }));
    let bad = [
        ([0x01, 0x00, 0x5e, 0x00, 0x00, 0x01], Refusal::BadMac),
        ([0x33, 0x33, 0x00, 0x00, 0x00, 0x01], Refusal::BadMac),
        ([0xff; 6], Refusal::BadMac),
        ([0x00; 6], Refusal::BadMac),
    ];
    for (mac, why) in bad {
        assert_eq!(
            h.ask(Request::SetMac(MacAddr(mac)), topo.ifindex),
            Reply::Refused(why),
            "{mac:02x?}"
        );
    }
    let good = MacAddr::parse("02:6d:76:68:00:42").unwrap();
    // Any other ifindex: the other macvtap on the same parent, the parent, loopback.
    for idx in [other_index, ns.ifindex(topo.lower), 1, 0, u32::MAX] {
        assert_eq!(
            h.ask(Request::SetMac(good), idx),
            Reply::Refused(Refusal::OtherIfindex),
            "ifindex {idx}"
        );
    }
    // Not started with --delete: no delete.
    assert_eq!(
        h.ask(Request::Delete, topo.ifindex),
        Reply::Refused(Refusal::NotEnabled)
    );
    // A record that does not parse is refused, and the helper keeps serving.
    let mut rec = helper::encode_request(Request::SetMac(good), topo.ifindex);
    rec[0] = b'X';
    assert_eq!(h.raw(rec), Reply::Refused(Refusal::UnknownOp));
    rec[0] = b'M';
    rec[2] = 7;
    assert_eq!(h.raw(rec), Reply::Refused(Refusal::Reserved));
    assert_eq!(ns.mac(topo.macvtap), topo.macvtap_mac);
    assert_eq!(ns.mac("mvo0"), other_mac);
    assert!(ns.has_iface("mvo0") && ns.has_iface(topo.macvtap));
    assert_helper_holds_only_net_admin(pid);
    // Its own link, a unicast MAC: done.
    assert_eq!(h.ask(Request::SetMac(good), topo.ifindex), Reply::Done);
    assert_eq!(ns.mac(topo.macvtap), good);
    let (status, err) = h.finish();
    assert!(status.success(), "{status}: {err}");
    // Each kind of refusal is said once.
    assert_eq!(err.matches("not a unicast MAC").count(), 1, "{err}");
    assert_eq!(err.matches("another ifindex").count(), 1, "{err}");
    // EOF without --delete leaves the link.
    assert!(ns.has_iface(topo.macvtap));

    // A helper whose ifindex no longer carries its name (renamed, or a name the sealed side
    // made up) acts on nothing, neither set-mac nor delete, not even at EOF.
    let mut h = HelperUnderTest::spawn(&ns, other_index, topo.macvtap, &["--set-mac", "--delete"]);
    assert_eq!(
        h.ask(Request::SetMac(good), other_index),
        Reply::Refused(Refusal::NotOurLink)
    );
    let (status, err) = h.finish();
    assert!(status.success(), "{status}: {err}");
    assert_eq!(ns.mac("mvo0"), other_mac);
    assert!(ns.has_iface("mvo0") && ns.has_iface(topo.macvtap));
    // The lower device is no macvtap: refused by kind.
    let lower_index = ns.ifindex(topo.lower);
    let mut h = HelperUnderTest::spawn(&ns, lower_index, topo.lower, &["--set-mac"]);
    assert_eq!(
        h.ask(Request::SetMac(good), lower_index),
        Reply::Refused(Refusal::NotOurLink)
    );
    drop(h.finish());
    println!(
        "{}: 4 bad MACs, 5 other ifindexes, a delete, 2 malformed records refused; \
         a renamed link and a non-macvtap left alone",
        test_name()
    );
}
