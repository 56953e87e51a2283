//! `--take-over` at host level (issue 12, item 3), no QEMU: a macvhost serves the in-process
//! vhost-user frontend (the test driver) on a macvtap; a second macvhost with the same flags
//! and `--take-over CONTROL_SOCKET` takes its listener and queue fds. Proved: the old one exits
//! 0, the macvtap keeps its ifindex and never loses carrier (`carrier_changes` unchanged), the
//! socket file is the same inode, the control socket answers, and the frontend reconnecting
//! passes traffic both ways through the new one. A take-over that fails (the new process goes
//! away before its ack, names another device, another queue count, or talks to something that
//! is not macvhost, or the old one created its macvtap and deletes it on exit) exits 2 naming
//! `--take-over`, and the old process keeps serving.
//! Root (a macvtap in a network namespace), except the not-macvhost case.

mod common;
mod support {
    #[path = "vu_driver.rs"]
    pub mod vu_driver;
}

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{require, Daemon, MacvtapTopo, NetNs, Peer, HOST};
use macvhost::testkit::daemon::{spawn_logging_to, terminate};
use nix::sys::signal::Signal;
use support::vu_driver::VuGuest;

/// virtio-net features the driver asks for: VERSION_1 and MRG_RXBUF.
const FEATURES: u64 = (1 << 32) | (1 << 15);

/// One macvhost process in the namespace, logging to its own file.
struct Mvh {
    child: Option<Child>,
    log: PathBuf,
}

impl Mvh {
    fn spawn(ns: &NetNs, log: PathBuf, args: &[String]) -> Mvh {
        let child = spawn_logging_to(
            NetNs::attach(ns.name())
                .command(Daemon::binary())
                .args(args),
            fs::File::create(&log).unwrap(),
        );
        Mvh {
            child: Some(child),
            log,
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit on its own.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let c = self.child.as_mut().expect("running");
        let t = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(
                t.elapsed() < timeout,
                "still running after {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn assert_alive(&mut self) {
        let c = self.child.as_mut().expect("running");
        if let Some(s) = c.try_wait().unwrap() {
            self.child = None;
            panic!("exited ({s}); log:\n{}", self.log_text());
        }
    }

    fn sigterm(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        terminate(&mut c, Signal::SIGTERM, Duration::from_secs(10)).expect("stops on SIGTERM")
    }
}

impl Drop for Mvh {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = terminate(&mut c, Signal::SIGTERM, Duration::from_secs(5));
        }
        if std::thread::panicking() {
            eprintln!("---- {:?} ----\n{}", self.log, self.log_text());
        }
    }
}

/// What every take-over test between two macvhosts starts from: a namespace with a
/// bridge-mode macvtap, a directory for the processes' logs, and in it the sockets [`flags`]
/// names (`vu.sock`, `ctl.sock`).
fn rig(ns_name: &str) -> (NetNs, MacvtapTopo, tempfile::TempDir, PathBuf, PathBuf) {
    let ns = NetNs::quiet(ns_name);
    let topo = MacvtapTopo::create(&ns, "bridge");
    let dir = tempfile::tempdir().unwrap();
    let (sock, ctl) = (dir.path().join("vu.sock"), dir.path().join("ctl.sock"));
    (ns, topo, dir, sock, ctl)
}

/// The flags both processes run with.
fn flags(dir: &Path) -> Vec<String> {
    [
        "--socket-path",
        &dir.join("vu.sock").display().to_string(),
        "--control-socket",
        &dir.join("ctl.sock").display().to_string(),
        "--macvtap",
        "mvt0",
        "--log-level",
        "debug",
    ]
    .map(String::from)
    .to_vec()
}

fn with(mut args: Vec<String>, more: &[&str]) -> Vec<String> {
    args.extend(more.iter().map(|s| s.to_string()));
    args
}

fn wait_socket(p: &Path, m: &mut Mvh) {
    let t = Instant::now();
    while !p.exists() {
        m.assert_alive();
        assert!(t.elapsed() < Duration::from_secs(20), "no {p:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = vec![tag; 60];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

/// One frame guest → peer and one peer → guest through macvhost and the macvtap.
fn traffic_passes(g: &mut VuGuest, peer: &Peer, topo: &MacvtapTopo, tag: u8) {
    let (gm, pm) = (topo.macvtap_mac.0, topo.peer_mac.0);
    let out = frame(pm, gm, tag);
    assert!(g.send(0, &out));
    g.kick(g.tx(0));
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got_out = false;
    while !got_out && Instant::now() < deadline {
        if let Ok(Some(n)) = peer.recv(&mut buf, Duration::from_millis(100)) {
            got_out = buf[..n] == out[..];
        }
    }
    assert!(got_out, "guest → peer frame {tag} did not arrive");

    g.post_rx(0, 16, 4096);
    g.kick(g.rx(0));
    let back = frame(gm, pm, tag.wrapping_add(1));
    let mut got = Vec::new();
    let arrived = g.wait_until(Duration::from_secs(5), |g| {
        // Resent while waiting: the first may race the queue's attach.
        let _ = peer.send(&back);
        got.extend(g.recv_frames(0));
        got.iter().any(|f| f.as_slice() == back.as_slice())
    });
    assert!(arrived, "peer → guest frame {tag} did not arrive");
}

fn carrier_changes(ns: &NetNs) -> u64 {
    ns.read_file("/sys/class/net/mvt0/carrier_changes")
        .trim()
        .parse()
        .unwrap()
}

fn ino(p: &Path) -> (u64, u64) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.dev(), m.ino())
}

#[test]
fn take_over_keeps_the_macvtap_its_carrier_and_socket_and_the_old_process_exits_0() {
    require!(HOST);
    let (ns, topo, dir, sock, ctl) = rig("takeover");
    let peer = Peer::on_macvtap(&ns, &topo);
    // The Prometheus listener is handed over too (binding it again would fail: in use).
    let metrics: std::net::SocketAddr = "127.0.0.1:19464".parse().unwrap();
    let flags = with(flags(dir.path()), &["--metrics-addr", &metrics.to_string()]);
    let mut old = Mvh::spawn(&ns, dir.path().join("old.log"), &flags);
    wait_socket(&ctl, &mut old);
    let mut g = VuGuest::connect(&sock, 1, 256, FEATURES, Duration::from_secs(10));
    traffic_passes(&mut g, &peer, &topo, 1);

    let ifindex = ns.ifindex("mvt0");
    let flaps = carrier_changes(&ns);
    let (sock_id, ctl_id) = (ino(&sock), ino(&ctl));
    let t = Instant::now();
    let mut new = Mvh::spawn(
        &ns,
        dir.path().join("new.log"),
        &with(flags.clone(), &["--take-over", &ctl.display().to_string()]),
    );
    let status = old.wait_exit(Duration::from_secs(20));
    let handed = t.elapsed();
    assert!(status.success(), "old exited {status}:\n{}", old.log_text());
    // The old frontend connection was ended by the old process; the frontend reconnects.
    drop(g);
    let mut g = VuGuest::connect(&sock, 1, 256, FEATURES, Duration::from_secs(10));
    let reconnected = t.elapsed();
    traffic_passes(&mut g, &peer, &topo, 3);
    println!(
        "take-over: old process exited {} ms after the new one started, frontend served again \
         at {} ms",
        handed.as_millis(),
        reconnected.as_millis()
    );

    assert_eq!(ns.ifindex("mvt0"), ifindex, "the same macvtap");
    assert_eq!(
        carrier_changes(&ns),
        flaps,
        "the macvtap's carrier changed during the take-over"
    );
    assert_eq!(
        ino(&sock),
        sock_id,
        "the vhost-user socket file was replaced"
    );
    assert_eq!(ino(&ctl), ctl_id, "the control socket file was replaced");
    let report = macvhost::control::fetch_stats(&ctl).expect("the new process serves stats");
    assert_eq!(report.iface, "mvt0");
    let mut http = ns
        .tcp_connect(metrics, Duration::from_secs(5))
        .expect("the new process serves metrics on the address taken over");
    http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut http, &mut body).unwrap();
    assert!(body.contains("macvhost_tx_frames{iface=\"mvt0\""), "{body}");
    let new_log = new.log_text();
    assert!(
        new_log.contains("reusing the host queues handed over"),
        "{new_log}"
    );
    assert!(new_log.contains("took over"), "{new_log}");
    assert!(old.log_text().contains("is ready: handing over"));

    drop(g);
    let status = new.sigterm();
    assert!(status.success(), "new exited {status}");
    assert!(
        !sock.exists() && !ctl.exists(),
        "the new process removes its sockets"
    );
}

#[test]
fn a_failed_take_over_leaves_the_old_process_serving() {
    require!(HOST);
    let (ns, topo, dir, sock, ctl) = rig("takeover-fail");
    ns.add_macvtap(topo.lower, "mvt1", "bridge");
    ns.set_up(&["mvt1"]);
    let peer = Peer::on_macvtap(&ns, &topo);
    let mut old = Mvh::spawn(&ns, dir.path().join("old.log"), &flags(dir.path()));
    wait_socket(&ctl, &mut old);
    let mut g = VuGuest::connect(&sock, 1, 256, FEATURES, Duration::from_secs(10));
    traffic_passes(&mut g, &peer, &topo, 1);
    let ctl_arg = ctl.display().to_string();

    // A new process that gets the fds and goes away before its ack (killed, crashed).
    {
        let mut c = UnixStream::connect(&ctl).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        writeln!(c, "take-over 1 pid=1").unwrap();
        let mut offer = String::new();
        BufReader::new(&c).read_line(&mut offer).unwrap();
        assert!(offer.contains("\"macvhost\":\"take-over\""), "{offer}");
        assert!(
            offer.contains("queue-0") && offer.contains("vhost-user"),
            "{offer}"
        );
    }
    let t = Instant::now();
    while !old.log_text().contains("abandoned before it was ready") {
        assert!(t.elapsed() < Duration::from_secs(5), "{}", old.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    old.assert_alive();
    traffic_passes(&mut g, &peer, &topo, 3);

    // Real new processes whose flags do not fit: exit 2, one line naming --take-over.
    for (name, more, says) in [
        ("other-device", vec!["--macvtap", "mvt1"], "mvt0"),
        ("more-queues", vec!["--queues", "2"], "--queues 1"),
    ] {
        let mut args: Vec<String> = flags(dir.path())
            .into_iter()
            .filter(|a| a != "mvt0" && a != "--macvtap")
            .collect();
        if name == "more-queues" {
            args.extend(["--macvtap".into(), "mvt0".into()]);
        }
        args = with(args, &more);
        args = with(args, &["--take-over", &ctl_arg]);
        let mut new = Mvh::spawn(&ns, dir.path().join(format!("{name}.log")), &args);
        let status = new.wait_exit(Duration::from_secs(20));
        let log = new.log_text();
        assert_eq!(status.code(), Some(2), "{name}: {status}\n{log}");
        assert!(
            log.contains("macvhost: --take-over") && log.contains(says),
            "{name}: {log}"
        );
        old.assert_alive();
        traffic_passes(&mut g, &peer, &topo, 5);
    }
    assert_eq!(
        macvhost::control::fetch_stats(&ctl).unwrap().iface,
        "mvt0",
        "the old process still answers on its control socket"
    );
    assert!(sock.exists());
    drop(g);
    assert!(old.sigterm().success());
}

#[test]
fn take_over_from_a_socket_that_is_not_macvhost_exits_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("not-macvhost.sock");
    let listener = UnixListener::bind(&ctl).unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        // Reads what it is sent, and answers in its own protocol.
        let mut line = String::new();
        let _ = BufReader::new(&c).read_line(&mut line);
        let _ = c.write_all(b"500 unknown command\n");
    });
    let out = std::process::Command::new(Daemon::binary())
        .args(["--socket-path"])
        .arg(dir.path().join("vu.sock"))
        .args(["--tap", "mvhnotmvh0", "--take-over"])
        .arg(&ctl)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    server.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("macvhost: --take-over") && err.contains("not a take-over offer"),
        "{err}"
    );
    assert!(
        !dir.path().join("vu.sock").exists(),
        "nothing was created before the take-over failed"
    );

    // Nobody there at all.
    let out = std::process::Command::new(Daemon::binary())
        .args(["--socket-path"])
        .arg(dir.path().join("vu.sock"))
        .args(["--tap", "mvhnotmvh0", "--take-over"])
        .arg(dir.path().join("missing.sock"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--take-over") && err.contains("cannot reach"),
        "{err}"
    );
}

#[test]
fn take_over_of_a_macvtap_the_old_process_created_and_deletes_is_refused() {
    require!(HOST);
    let (ns, topo, dir, sock, ctl) = rig("takeover-created");
    let old_flags: Vec<String> = flags(dir.path())
        .into_iter()
        .filter(|a| a != "mvt0" && a != "--macvtap")
        .collect();
    let mut old = Mvh::spawn(
        &ns,
        dir.path().join("old.log"),
        &with(
            old_flags.clone(),
            &[
                "--macvtap-parent",
                topo.lower,
                "--macvtap-name",
                "mvhcreated0",
            ],
        ),
    );
    wait_socket(&ctl, &mut old);
    let mut new = Mvh::spawn(
        &ns,
        dir.path().join("new.log"),
        &with(
            old_flags,
            &[
                "--macvtap",
                "mvhcreated0",
                "--take-over",
                &ctl.display().to_string(),
            ],
        ),
    );
    let status = new.wait_exit(Duration::from_secs(20));
    let log = new.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("--take-over") && log.contains("refused") && log.contains("--keep"),
        "{log}"
    );
    old.assert_alive();
    assert!(sock.exists() && ns.has_iface("mvhcreated0"));
    drop(VuGuest::connect(
        &sock,
        1,
        256,
        FEATURES,
        Duration::from_secs(10),
    ));
    assert!(old.sigterm().success());
    // The old process still deletes what it created.
    assert!(common::wait_until(Duration::from_secs(5), || !ns.has_iface("mvhcreated0")));
}
