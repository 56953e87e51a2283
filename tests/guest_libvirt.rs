//! libvirt for real (issue 12): Debian 12's libvirt (libvirtd 9.0, QEMU 7.2, TCG) boots the test
//! guest from the domain XML in `contrib/libvirt/`, with an `<interface type='vhostuser'>`
//! served by macvhost on a bridge-mode macvtap, and the guest proves a ping each way and an
//! intact 4 MiB transfer each way, in both socket directions:
//!
//! * `libvirt_client_mode_guest_reaches_the_macvtap_through_a_listening_macvhost`: libvirt
//!   `mode='client'` (`domain-client.xml`), `macvhost --socket-path`;
//! * `libvirt_server_mode_guest_reaches_the_macvtap_through_macvhost_client`: libvirt
//!   `mode='server'` (`domain-server.xml`), `macvhost --client`.
//!
//! ```text
//!  root netns                                 netns mvh-PID-N (made by the test)
//!  libvirtd ─ QEMU (user libvirt-qemu) ──unix── macvhost ── mvt0 (macvtap, bridge)
//!              │ serial: unix socket            socket                │
//!              └──────── test (console)                 lower0 ═veth═ peer0 10.199.0.1
//! ```
//!
//! QEMU runs where libvirtd puts it (the root namespace) and needs only the vhost-user socket,
//! which lives in the file system; macvhost runs in the test's namespace next to its macvtap.
//! QEMU runs as `libvirt-qemu`, so the test does what an operator must do today: `chown` the
//! socket macvhost created (client mode), or give QEMU a directory it may create its socket in
//! (server mode).
//!
//! Nothing starts libvirt without systemd as PID 1: the test starts `virtlogd -d` and
//! `libvirtd -d` when their sockets do not answer, and stops what it started. Domains are
//! transient (`virsh create`), named `mvh-lv-PID-N`, destroyed on the way out (ones left by a dead
//! test process are destroyed by the next run). Needs root, libvirt, QEMU and the guest image;
//! otherwise it skips through `require!`, or fails when `MACVHOST_E2E_REQUIRED=1`.

mod common;
#[path = "support/guest.rs"]
mod guest;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{require, run_ok, wait_until, Daemon, Need, NetNs};
use guest::{one_at_a_time, secs};

const URI: &str = "qemu:///system";
/// The user (and group) libvirt runs QEMU as on Debian (`user`/`group` in qemu.conf).
const QEMU_USER: &str = "libvirt-qemu";
const QUEUES: &str = "2";
const BLOB: usize = 4 << 20;

/// Root, the libvirt and QEMU programs, the `libvirt-qemu` user, and the guest image.
const LIBVIRT: &[Need] = &[
    Need::Root,
    Need::Tool("ip"),
    Need::Tool("virsh"),
    Need::Tool("libvirtd"),
    Need::Tool("virtlogd"),
    guest::QEMU,
    guest::IMAGE,
    Need::Check(
        "the libvirt-qemu user (apt-get install libvirt-daemon-system)",
        qemu_user,
    ),
];

fn qemu_user() -> bool {
    nix::unistd::User::from_name(QEMU_USER)
        .ok()
        .flatten()
        .is_some()
}

// ------------------------------------------------------------------------------- daemons ---

/// virtlogd and libvirtd, started here when their sockets do not answer (no systemd as PID 1),
/// stopped on drop if started here. libvirtd refuses to start QEMU without virtlogd:
/// `Failed to connect socket to '/run/libvirt/virtlogd-sock': No such file or directory`.
struct Daemons {
    started: Vec<(&'static str, i32)>,
}

impl Daemons {
    const ALL: [(&'static str, &'static str, &'static str); 2] = [
        (
            "virtlogd",
            "/run/libvirt/virtlogd-sock",
            "/run/virtlogd.pid",
        ),
        ("libvirtd", "/run/libvirt/libvirt-sock", "/run/libvirtd.pid"),
    ];

    fn ensure() -> Daemons {
        let mut d = Daemons {
            started: Vec::new(),
        };
        for (name, sock, pidfile) in Self::ALL {
            if UnixStream::connect(sock).is_ok() {
                continue;
            }
            let bin = guest::which(name).expect("checked by require!(LIBVIRT)");
            run_ok(Command::new(bin).arg("-d"));
            let up = wait_until(secs(15), || UnixStream::connect(sock).is_ok());
            let pid = fs::read_to_string(pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                d.started.push((name, pid));
            }
            assert!(up, "`{name} -d` did not answer on {sock} within 15 s");
        }
        d
    }
}

/// Whether `pid` is a live (not zombie) process named `name`.
fn alive(pid: i32, name: &str) -> bool {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    comm.trim() == name && !zombie
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for &(name, pid) in self.started.iter().rev() {
            if !alive(pid, name) {
                continue;
            }
            let pid_t = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid_t, nix::sys::signal::Signal::SIGTERM);
            if !wait_until(Duration::from_secs(10), || !alive(pid, name)) {
                let _ = nix::sys::signal::kill(pid_t, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn virsh")
}

// ------------------------------------------------------------------------------- domains ---

/// A transient domain being created or running; destroyed on drop.
struct Domain {
    name: String,
    create: Option<Child>,
}

impl Domain {
    fn unique_name() -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        format!(
            "mvh-lv-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Destroys `mvh-lv-PID-N` domains whose test process is gone.
    fn destroy_stale() {
        let out = virsh(&["list", "--name"]);
        for name in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(rest) = name.trim().strip_prefix("mvh-lv-") else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or("");
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = virsh(&["destroy", name.trim()]);
            }
        }
    }

    /// `virsh create XML` in the background: in server mode it returns only once a backend
    /// has connected to QEMU's socket.
    fn start(name: &str, xml: &Path) -> Domain {
        let child = Command::new("virsh")
            .args(["-q", "-c", URI, "create"])
            .arg(xml)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn virsh create");
        Domain {
            name: name.to_string(),
            create: Some(child),
        }
    }

    fn log_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/log/libvirt/qemu/{}.log", self.name))
    }

    /// The last lines of QEMU's log (libvirt writes the command line and QEMU's stderr there).
    fn log_tail(&self) -> String {
        common::tail(&self.log_path(), 15)
    }

    /// Waits for `virsh create` to succeed (returns at once if it already did).
    fn wait_created(&mut self, timeout: Duration) {
        let Some(mut child) = self.create.take() else {
            return;
        };
        let ok = wait_until(timeout, || !matches!(child.try_wait(), Ok(None)));
        if !ok {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "virsh create {} did not return within {timeout:?}; QEMU log:\n{}",
                self.name,
                self.log_tail()
            );
        }
        let status = child.wait().expect("wait virsh");
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        assert!(
            status.success(),
            "virsh create {} failed ({status}): {}\nQEMU log:\n{}",
            self.name,
            err.trim(),
            self.log_tail()
        );
    }

    /// Whether `virsh create` is still running (it blocks in server mode).
    fn creating(&mut self) -> bool {
        self.create
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        if let Some(mut c) = self.create.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = virsh(&["destroy", &self.name]);
        if thread::panicking() {
            eprintln!(
                "---- {} ----\n{}\n---- end ----",
                self.log_path().display(),
                common::tail(&self.log_path(), 60)
            );
        } else {
            let _ = fs::remove_file(self.log_path());
        }
    }
}

/// `contrib/libvirt/FILE` with every `@KEY@` replaced; panics on an unknown placeholder.
fn render(file: &str, vars: &[(&str, String)]) -> String {
    let path = guest::repo_root().join("contrib/libvirt").join(file);
    let mut xml =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for (k, v) in vars {
        let key = format!("@{k}@");
        assert!(xml.contains(&key), "{file} has no {key}");
        xml = xml.replace(&key, v);
    }
    if let Some(i) = placeholder(&xml) {
        panic!("{file}: placeholder left at byte {i}: {}", &xml[i..]);
    }
    xml
}

/// Offset of the first `@UPPER_CASE@` in `s`.
fn placeholder(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    (0..b.len()).find(|&i| {
        b[i] == b'@'
            && b[i + 1..].iter().position(|&c| c == b'@').is_some_and(|n| {
                n > 0
                    && b[i + 1..i + 1 + n]
                        .iter()
                        .all(|&c| c.is_ascii_uppercase() || c == b'_')
            })
    })
}

// ------------------------------------------------------------------------------- console ---

#[derive(Default)]
struct Serial {
    lines: Vec<String>,
    partial: Vec<u8>,
    prompts: usize,
    eof: bool,
}

/// The guest's serial line (QEMU connects to a socket the test listens on) speaking the
/// command protocol of `tests/guest/init.sh`: `MVH-PROMPT`, `MVH-CMD id` … `MVH-EOF id`,
/// `MVH-END id rc=N`, `MVH-RESULT name=value`.
struct Console {
    shared: Arc<(Mutex<Serial>, Condvar)>,
    writer: UnixStream,
    sent: usize,
    reader: Option<JoinHandle<()>>,
}

impl Console {
    /// Accepts QEMU's connection within `timeout`.
    fn accept(listener: &UnixListener, timeout: Duration, domain: &Domain) -> Console {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept serial: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "QEMU did not connect its serial line within {timeout:?}; QEMU log:\n{}",
                domain.log_tail()
            );
            thread::sleep(Duration::from_millis(20));
        };
        stream.set_nonblocking(false).unwrap();
        let writer = stream.try_clone().unwrap();
        let shared = Arc::new((Mutex::new(Serial::default()), Condvar::new()));
        let sh = shared.clone();
        let echo = std::env::var_os("MACVHOST_GUEST_ECHO").is_some_and(|v| v != "0");
        let reader = thread::spawn(move || read_serial(stream, &sh, echo));
        Console {
            shared,
            writer,
            sent: 0,
            reader: Some(reader),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Serial> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tail(&self) -> String {
        let st = self.lock();
        let from = st.lines.len().saturating_sub(30);
        st.lines[from..].join("\n")
    }

    /// Waits until `f` returns a value; panics with the serial tail on timeout or EOF.
    fn wait<T>(&self, timeout: Duration, what: &str, mut f: impl FnMut(&Serial) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(v) = f(&st) {
                return v;
            }
            let now = Instant::now();
            if st.eof || now >= deadline {
                let why = if st.eof {
                    "serial line closed"
                } else {
                    "timed out"
                };
                drop(st);
                panic!("{why} waiting for {what}; guest serial:\n{}", self.tail());
            }
            st = self
                .shared
                .1
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn wait_line(&self, pattern: &str, timeout: Duration) -> String {
        self.wait(timeout, &format!("a line with {pattern:?}"), |st| {
            st.lines.iter().find(|l| l.contains(pattern)).cloned()
        })
    }

    /// Runs `script` in the guest; panics unless it exits 0. Returns its `MVH-RESULT`s.
    fn exec_ok(&mut self, script: &str, timeout: Duration) -> BTreeMap<String, String> {
        let want = self.sent + 1;
        self.wait(timeout, "the guest's prompt", |st| {
            (st.prompts >= want).then_some(())
        });
        self.sent += 1;
        let id = self.sent;
        let start = self.lock().lines.len();
        self.writer
            .write_all(format!("MVH-CMD {id}\n{script}\nMVH-EOF {id}\n").as_bytes())
            .expect("write to the serial line");
        let end = format!("MVH-END {id} rc=");
        let (idx, rc) = self.wait(timeout, &format!("command {id}"), |st| {
            st.lines.iter().enumerate().skip(start).find_map(|(i, l)| {
                l.find(&end)
                    .map(|p| (i, l[p + end.len()..].trim().parse::<i32>().unwrap_or(-1)))
            })
        });
        let lines = self.lock().lines[start..idx].to_vec();
        assert_eq!(
            rc,
            0,
            "guest command failed:\n{script}\n--- output ---\n{}",
            lines.join("\n")
        );
        lines
            .iter()
            .filter_map(|l| l.find("MVH-RESULT ").map(|p| &l[p + 11..]))
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }
}

fn read_serial(mut stream: UnixStream, shared: &(Mutex<Serial>, Condvar), echo: bool) {
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap_or(0);
        let mut st = shared.0.lock().unwrap_or_else(|e| e.into_inner());
        if n == 0 {
            st.eof = true;
            shared.1.notify_all();
            return;
        }
        for &b in &buf[..n] {
            if b != b'\n' {
                st.partial.push(b);
                continue;
            }
            let line = String::from_utf8_lossy(&st.partial)
                .trim_end_matches('\r')
                .to_string();
            st.partial.clear();
            if echo {
                eprintln!("guest| {line}");
            }
            if line.ends_with("MVH-PROMPT") {
                st.prompts += 1;
            }
            st.lines.push(line);
        }
        shared.1.notify_all();
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

// --------------------------------------------------------------------------------- tests ---

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// libvirt `mode='client'`: macvhost listens.
    Client,
    /// libvirt `mode='server'`: QEMU listens, `macvhost --client`.
    Server,
}

fn chown_to_qemu(path: &Path, mode: u32) {
    let user = nix::unistd::User::from_name(QEMU_USER)
        .unwrap()
        .expect("checked by require!(LIBVIRT)");
    let group = nix::unistd::Group::from_name(QEMU_USER)
        .unwrap()
        .map_or(user.gid, |g| g.gid);
    nix::unistd::chown(path, Some(user.uid), Some(group))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Per-queue-pair counters from `macvhost stats --json`, summed over the pairs.
fn macvhost_totals(mvh: &Daemon) -> BTreeMap<String, u64> {
    let mut sum = BTreeMap::new();
    for q in mvh.stats() {
        for (k, c) in q {
            *sum.entry(k).or_insert(0) += c;
        }
    }
    sum
}

fn boot_and_prove(test: &str, mode: Mode) {
    let _lock = one_at_a_time();
    let t0 = Instant::now();
    let _daemons = Daemons::ensure();
    Domain::destroy_stale();
    let image = guest::guest_image();

    let ns = NetNs::quiet("guest");
    let topo = guest::macvtap_with_peer(&ns);

    // QEMU (libvirt-qemu) must reach the kernel, initrd and sockets: a world-traversable dir.
    let dir = tempfile::Builder::new()
        .prefix("mvh-libvirt-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // Copies: libvirt chowns the kernel and initrd to libvirt-qemu while the domain runs.
    let kernel = dir.path().join("vmlinuz");
    let initrd = dir.path().join("initrd.img");
    fs::copy(&image.kernel, &kernel).unwrap();
    fs::copy(&image.initrd, &initrd).unwrap();
    let serial_path = dir.path().join("serial.sock");
    let serial = UnixListener::bind(&serial_path).unwrap();
    chown_to_qemu(&serial_path, 0o600);
    let mvh_args = ["--macvtap", topo.macvtap, "--queues", QUEUES];

    let name = Domain::unique_name();
    let xml_path = dir.path().join("domain.xml");
    let vars = |socket: &Path| {
        vec![
            ("DOMAIN", name.clone()),
            ("KERNEL", kernel.display().to_string()),
            ("INITRD", initrd.display().to_string()),
            ("MAC", topo.macvtap_mac.to_string()),
            ("GUEST_CIDR", guest::GUEST_CIDR.to_string()),
            ("PEER_IP", guest::PEER_IP.to_string()),
            ("VHOST_SOCKET", socket.display().to_string()),
            ("SERIAL_SOCKET", serial_path.display().to_string()),
        ]
    };
    let (mut mvh, domain) = match mode {
        Mode::Client => {
            // QEMU runs as libvirt-qemu and needs write permission on the socket.
            let owner = format!("{QEMU_USER}:{QEMU_USER}");
            let mut args = mvh_args.to_vec();
            args.extend(["--socket-owner", owner.as_str(), "--socket-mode", "0660"]);
            let mvh = Daemon::spawn_named(&ns, dir.path(), "vhost", &args);
            let meta = fs::metadata(mvh.socket()).unwrap();
            let qemu_uid = nix::unistd::User::from_name(QEMU_USER)
                .unwrap()
                .unwrap()
                .uid;
            assert_eq!(meta.uid(), qemu_uid.as_raw(), "--socket-owner applied");
            assert_eq!(
                meta.permissions().mode() & 0o777,
                0o660,
                "--socket-mode applied"
            );
            fs::write(&xml_path, render("domain-client.xml", &vars(mvh.socket()))).unwrap();
            let mut d = Domain::start(&name, &xml_path);
            d.wait_created(secs(60));
            (mvh, d)
        }
        Mode::Server => {
            // QEMU creates the socket: its directory must be writable by libvirt-qemu.
            let sockdir = dir.path().join("qemu");
            fs::create_dir(&sockdir).unwrap();
            chown_to_qemu(&sockdir, 0o755);
            fs::write(
                &xml_path,
                render("domain-server.xml", &vars(&sockdir.join("vhost.sock"))),
            )
            .unwrap();
            let socket = sockdir.join("vhost.sock");
            // QEMU (libvirt-qemu) creates the socket writable by its owner only, and macvhost
            // keeps no capability once sealed: it runs as libvirt-qemu too.
            let mut args = vec!["--client", "--user", QEMU_USER, "--group", QEMU_USER];
            args.extend(mvh_args);
            // The documented order: macvhost first (it retries until QEMU's socket appears),
            // then `virsh create`, which returns once macvhost has connected.
            // `Daemon::spawn_named` returns when the socket exists, so it runs aside.
            thread::scope(|s| {
                let log = sockdir.join("vhost.log");
                let mvh = s.spawn(|| Daemon::spawn_named(&ns, &sockdir, "vhost", &args));
                let retrying = wait_until(secs(15), || {
                    fs::read_to_string(&log).is_ok_and(|l| l.contains("waiting for a frontend"))
                });
                assert!(retrying, "macvhost --client never waited for the frontend");
                let t = Instant::now();
                let mut d = Domain::start(&name, &xml_path);
                let up = wait_until(secs(30), || socket.exists() || !d.creating());
                let appeared = t.elapsed();
                if !d.creating() || !up {
                    // Failed early (or hangs): report virsh's error, not macvhost's wait.
                    d.wait_created(Duration::ZERO);
                }
                let mvh = mvh.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
                d.wait_created(secs(60));
                // QEMU waits for the backend before it starts the guest; macvhost's connect
                // backoff (capped at 2 s) is part of this.
                println!(
                    "{test}: virsh create took {:.2} s with macvhost --client retrying; \
                     QEMU's socket appeared after {:.2} s",
                    t.elapsed().as_secs_f64(),
                    appeared.as_secs_f64()
                );
                (mvh, d)
            })
        }
    };
    let mut console = Console::accept(&serial, secs(60), &domain);
    let ready = console.wait_line("MVH-READY ", secs(300));
    let mac = topo.macvtap_mac.to_string();
    assert!(
        ready.contains("iface=eth0")
            && ready.contains(&format!("mac={mac}"))
            && ready.contains("link=up"),
        "{ready}"
    );
    println!(
        "{test}: guest ready {:.1} s after the test started",
        t0.elapsed().as_secs_f64()
    );

    // Ping both ways.
    console.exec_ok("ping -c 3 -W 5 $MVH_PEER", secs(60));
    let ping = ns.try_exec(&["ping", "-c", "3", "-W", "5", guest::GUEST_IP]);
    assert!(
        ping.status.success(),
        "peer -> guest ping failed: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // Host -> guest, 4 MiB.
    let before = macvhost_totals(&mvh);
    let blob = Arc::new(guest::random_blob(BLOB).unwrap());
    let addr = |port: u16| format!("{}:{port}", guest::PEER_IP);
    let l = ns.run(|| TcpListener::bind(addr(5001)).unwrap());
    let sender = guest::serve_blob(l, blob, secs(120));
    let r = console.exec_ok(
        "nc $MVH_PEER 5001 > /tmp/rx && result rx_bytes $(wc -c < /tmp/rx) && \
         result rx_sha $(sha256 /tmp/rx); rm -f /tmp/rx",
        secs(120),
    );
    let sent = sender.join().unwrap().unwrap();
    assert_eq!(r["rx_bytes"], BLOB.to_string());
    assert_eq!(r["rx_sha"], sent.sha256, "host -> guest data corrupted");

    // Guest -> host, 4 MiB.
    let r = console.exec_ok(
        &format!(
            "dd if=/dev/urandom of=/tmp/tx bs=1M count={} 2>/dev/null && \
             result tx_sha $(sha256 /tmp/tx)",
            BLOB >> 20
        ),
        secs(60),
    );
    let l = ns.run(|| TcpListener::bind(addr(5002)).unwrap());
    let receiver = guest::receive_sha256(l, secs(120));
    console.exec_ok("nc $MVH_PEER 5002 < /tmp/tx; rm -f /tmp/tx", secs(120));
    let got = receiver.join().unwrap().unwrap();
    assert_eq!(got.bytes, BLOB as u64);
    assert_eq!(got.sha256, r["tx_sha"], "guest -> host data corrupted");

    // The bytes crossed macvhost (the guest has no other NIC).
    let after = macvhost_totals(&mvh);
    let moved = |k: &str| after[k] - before.get(k).copied().unwrap_or(0);
    assert!(
        moved("rx_bytes") >= BLOB as u64 && moved("tx_bytes") >= BLOB as u64,
        "macvhost counters did not see both transfers: rx {} tx {}",
        moved("rx_bytes"),
        moved("tx_bytes")
    );
    println!(
        "{test}: host->guest {:.0} Mbit/s, guest->host {:.0} Mbit/s",
        sent.mbit_per_s(),
        got.mbit_per_s()
    );

    // libvirt has no interface statistics for vhostuser (no host-side device): read them from
    // macvhost (`macvhost stats`). If this starts to work, the docs must say so.
    let stat = virsh(&["domifstat", &name, "ua-net0"]);
    assert!(
        !stat.status.success(),
        "virsh domifstat now reports a vhostuser interface: {}",
        String::from_utf8_lossy(&stat.stdout)
    );

    let _ = virsh(&["destroy", &name]);
    drop(console);
    drop(domain);
    mvh.shutdown_clean();
    println!("{test}: passed in {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn libvirt_client_mode_guest_reaches_the_macvtap_through_a_listening_macvhost() {
    const NAME: &str = "libvirt_client_mode_guest_reaches_the_macvtap_through_a_listening_macvhost";
    require!(LIBVIRT);
    boot_and_prove(NAME, Mode::Client);
}

#[test]
fn libvirt_server_mode_guest_reaches_the_macvtap_through_macvhost_client() {
    const NAME: &str = "libvirt_server_mode_guest_reaches_the_macvtap_through_macvhost_client";
    require!(LIBVIRT);
    boot_and_prove(NAME, Mode::Server);
}

/// The docs show the domain XML the tests above boot, byte for byte (no root needed).
#[test]
fn libvirt_docs_show_the_exact_domain_xml_the_tests_boot() {
    let root = guest::repo_root();
    let doc = fs::read_to_string(root.join("docs/libvirt.md")).expect("docs/libvirt.md");
    for file in ["domain-client.xml", "domain-server.xml"] {
        let xml = fs::read_to_string(root.join("contrib/libvirt").join(file)).unwrap();
        assert!(
            doc.contains(&format!("```xml\n{xml}```")),
            "docs/libvirt.md does not show contrib/libvirt/{file} verbatim in an xml block"
        );
    }
}

/// A placeholder the test does not know about is caught before libvirt sees the XML.
#[test]
fn libvirt_template_placeholders_are_all_substituted() {
    assert_eq!(placeholder("a @KERNEL@ b"), Some(2));
    assert_eq!(placeholder("user@example.com @-delimited"), None);
    for file in ["domain-client.xml", "domain-server.xml"] {
        let x = render(
            file,
            &[
                ("DOMAIN", "d".into()),
                ("KERNEL", "/k".into()),
                ("INITRD", "/i".into()),
                ("MAC", "02:00:00:00:00:01".into()),
                ("GUEST_CIDR", "10.0.0.2/24".into()),
                ("PEER_IP", "10.0.0.1".into()),
                ("VHOST_SOCKET", "/s".into()),
                ("SERIAL_SOCKET", "/c".into()),
            ],
        );
        assert!(x.contains("<interface type='vhostuser'>"), "{file}");
    }
}
