//! macvhost started the way systemd starts `macvhost@.service`, without systemd: a launcher
//! passes the listening socket as fd 3 (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`), listens on
//! `NOTIFY_SOCKET` like the service manager, and sets `WATCHDOG_USEC`. It checks `READY=1`, the
//! status lines, the watchdog pings, `STOPPING=1`, traffic through the passed socket, and that a
//! restart given the stored queue fds back (`FDSTORE=1`) reuses them: the tap keeps its ifindex
//! and its carrier. Root (a tap in a network namespace).

mod common;
mod support {
    #[path = "vu_driver.rs"]
    pub mod vu_driver;
}

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{require, wait_until, Daemon, NetNs, HOST};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use support::vu_driver::VuGuest;

const TAP: &str = "mvhsd0";
/// virtio-net features the driver asks for: VERSION_1 and MRG_RXBUF.
const FEATURES: u64 = (1 << 32) | (1 << 15);

/// The fake service manager: where `NOTIFY_SOCKET` points.
struct Manager {
    sock: UnixDatagram,
    path: std::path::PathBuf,
}

impl Manager {
    fn new(dir: &Path) -> Manager {
        let path = dir.join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        Manager { sock, path }
    }

    /// Next datagram within `timeout`: text and fds.
    fn recv(&self, timeout: Duration) -> Option<(String, Vec<OwnedFd>)> {
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; 16]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .ok()?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds in this process for us.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let n = msg.bytes;
        Some((String::from_utf8_lossy(&buf[..n]).into_owned(), fds))
    }

    /// Collects datagrams until `want` has been seen (or `timeout`); returns them all, with the
    /// fds stored by `FDSTORE=1` in arrival order.
    fn until(&self, want: &str, timeout: Duration) -> (Vec<String>, Vec<OwnedFd>) {
        let deadline = Instant::now() + timeout;
        let (mut texts, mut fds) = (Vec::new(), Vec::new());
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some((t, f)) = self.recv(left) else { break };
            let done = t.lines().any(|l| l == want);
            if t.contains("FDSTORE=1") {
                fds.extend(f);
            }
            texts.push(t);
            if done {
                return (texts, fds);
            }
        }
        panic!("no {want} within {timeout:?}; got {texts:?}");
    }
}

/// Starts macvhost in `ns` as systemd would: `passed` at fds 3.. named by `names`, our
/// notify socket, a 400 ms watchdog.
fn start(ns: &NetNs, dir: &Path, mgr: &Manager, passed: &[&OwnedFd], names: &str) -> Child {
    let high: Vec<RawFd> = passed
        .iter()
        .map(|fd| nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100)).unwrap())
        .collect();
    let control = dir.join("control.sock");
    let mut cmd = ns.command("sh");
    cmd.arg("-c")
        .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
        .arg(Daemon::binary())
        .args(["--tap", TAP, "--log-level", "debug", "--control-socket"])
        .arg(&control)
        .env("LISTEN_FDS", passed.len().to_string())
        .env("LISTEN_FDNAMES", names)
        .env("NOTIFY_SOCKET", &mgr.path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("macvhost.log")).unwrap());
    let fds = high.clone();
    // SAFETY: only dup2 (async-signal-safe) on fds open in the forked child.
    unsafe {
        cmd.pre_exec(move || {
            for (target, &fd) in (3..).zip(fds.iter()) {
                if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn macvhost");
    for fd in high {
        // SAFETY: our own duplicates from above, closed once.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    child
}

fn stop(mut child: Child, mgr: &Manager) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("Linux pids fit pid_t")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    mgr.until("STOPPING=1", Duration::from_secs(5));
    let status = child.wait().unwrap();
    assert!(status.success(), "macvhost exited with {status}");
}

/// A frontend passes one frame through macvhost onto the tap (counted by the tap's rx counter).
fn frame_reaches_the_tap(ns: &NetNs, sock: &Path) {
    let before = ns.stats(TAP);
    let mut g = VuGuest::connect(sock, 1, 256, FEATURES, Duration::from_secs(5));
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&[0x02, 0x6d, 0x76, 0x68, 0, 9, 0x88, 0xb5]);
    f.resize(60, 0xab);
    assert!(g.send(0, &f));
    g.kick(g.tx(0));
    assert!(
        wait_until(Duration::from_secs(5), || ns
            .stats(TAP)
            .since(&before)
            .rx_packets
            >= 1),
        "the frame did not reach the tap"
    );
}

/// What a socket-activating launcher holds before it starts macvhost: a namespace, a dir, the
/// fake service manager and the bound vhost-user socket (with its path).
fn launcher() -> (NetNs, tempfile::TempDir, Manager, PathBuf, OwnedFd) {
    let ns = NetNs::quiet("host");
    let dir = tempfile::tempdir().unwrap();
    let mgr = Manager::new(dir.path());
    let sock = dir.path().join("vu.sock");
    let listener = OwnedFd::from(UnixListener::bind(&sock).unwrap());
    (ns, dir, mgr, sock, listener)
}

#[test]
fn socket_activated_macvhost_is_ready_pings_and_gets_its_stored_queues_back() {
    require!(HOST);
    let (ns, dir, mgr, sock, listener) = launcher();

    // First start: the socket comes from the launcher, the tap is created.
    let child = start(&ns, dir.path(), &mgr, &[&listener], "vhost-user");
    let (texts, stored) = mgr.until("READY=1", Duration::from_secs(20));
    assert!(
        texts.iter().any(|t| t.contains("FDNAME=queue-0")),
        "the queue fd went to the fd store before READY=1: {texts:?}"
    );
    assert_eq!(stored.len(), 1, "one stored fd per queue pair");
    assert!(texts
        .iter()
        .any(|t| t.contains("STATUS=waiting for a frontend")));
    let (pings, _) = mgr.until("WATCHDOG=1", Duration::from_secs(2));
    assert!(!pings.is_empty());
    let ifindex = ns.ifindex(TAP);
    frame_reaches_the_tap(&ns, &sock);
    mgr.until("STATUS=serving a frontend", Duration::from_secs(5));
    stop(child, &mgr);
    // The test holds the stored queue (as systemd does across a restart): the tap survives.
    assert!(
        ns.has_iface(TAP),
        "the tap vanished although its queue is stored"
    );
    assert_eq!(
        ns.read_file(&format!("/sys/class/net/{TAP}/carrier"))
            .trim(),
        "1"
    );

    // Restart with the stored queue handed back.
    let child = start(
        &ns,
        dir.path(),
        &mgr,
        &[&listener, &stored[0]],
        "vhost-user:queue-0",
    );
    mgr.until("READY=1", Duration::from_secs(20));
    let log = std::fs::read_to_string(dir.path().join("macvhost.log")).unwrap();
    assert!(log.contains("reusing the host queues"), "{log}");
    assert_eq!(ns.ifindex(TAP), ifindex, "the same tap, not a new one");
    frame_reaches_the_tap(&ns, &sock);
    stop(child, &mgr);
    drop(stored);
    // Without its stored queue the (non-persistent) tap goes away with the last fd.
    assert!(wait_until(Duration::from_secs(5), || !ns.has_iface(TAP)));
}

#[test]
fn stored_queues_of_another_device_are_dropped_and_the_device_opened_afresh() {
    require!(HOST);
    let (ns, dir, mgr, sock, listener) = launcher();
    // A queue of another tap stands in for a stale store entry.
    ns.ip(&[
        "tuntap",
        "add",
        "dev",
        "other0",
        "mode",
        "tap",
        "vnet_hdr",
        "multi_queue",
    ]);
    let other = ns.run(|| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut req = [0u8; 40];
        req[..6].copy_from_slice(b"other0");
        let flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE) as i16;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a 40-byte struct ifreq we own.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) };
        assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        OwnedFd::from(f)
    });
    let child = start(
        &ns,
        dir.path(),
        &mgr,
        &[&listener, &other],
        "vhost-user:queue-0",
    );
    let (texts, _) = mgr.until("READY=1", Duration::from_secs(20));
    assert!(
        texts
            .iter()
            .any(|t| t.contains("FDSTOREREMOVE=1") && t.contains("FDNAME=queue-0")),
        "the stale queue was dropped from the store: {texts:?}"
    );
    assert!(ns.has_iface(TAP), "the configured tap was opened afresh");
    frame_reaches_the_tap(&ns, &sock);
    stop(child, &mgr);
}
