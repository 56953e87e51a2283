//! What a guest loses while macvhost restarts (issue 12, the restart-gap test), with real QEMU
//! (TCG, `vectors=0`): the peer in the test's namespace pings the guest every 10 ms (iputils
//! `ping -i 0.01`) while a TCP stream runs into the guest, and macvhost is killed (SIGKILL) or
//! stopped (SIGTERM) and started again, or replaced by a new macvhost with `--take-over` (the
//! planned upgrade: the new one takes the listener and queue fds over the control socket, the
//! old one ends its frontend connection once the new one is ready). Measured: pings lost, the longest run of missing
//! sequence numbers (the gap), and whether the stream arrived intact (no reset, same sha256).
//!
//! Two ways to run macvhost:
//! - QEMU `reconnect=1`, macvhost listens: the gap is macvhost's start plus QEMU's reconnect
//!   timer (whole seconds);
//! - QEMU `server=on,wait=off`, `macvhost --client`: the new macvhost connects as it starts.
//!
//! The asserts are generous (the stream survives, the gap stays under a few seconds); the
//! figures are printed.
//!
//! Multicast relearning rides along (README "Multicast, IPv6 and MAC changes"): before the
//! restarts the guest joins [`GROUP`] and holds it; after each restart its MAC must be back on
//! the macvtap's multicast list within [`relearn_bound`]: the new macvhost queries the guest
//! [`FIRST_QUERY_AFTER`] after the frontend connects and the guest answers within that query's
//! [`STARTUP_QUERY_RESPONSE_INTERVAL`]. It must have left first, in all three ways (the old
//! process's memberships go with it; see [`relearn_case`]), so coming back is the new one's
//! relearning.
//! The list is read from the namespace's `/proc/net/dev_mcast`
//! (what `ip maddr` reads), never with a capture on the macvtap (promiscuous mode would hide a
//! filter bug). `MACVHOST_RESTART_DEBUG=1` runs macvhost with `--log-level debug`.
//! Needs root, `ip`, iputils `ping`, QEMU and the guest image.

#[path = "support/guest.rs"]
mod guest;

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest::{one_at_a_time, require, secs, Daemon, Need, NetNs, Qemu, QemuConfig, GUEST};
use macvhost::datapath::mcast::STARTUP_QUERY_RESPONSE_INTERVAL;
use macvhost::testkit::daemon::{spawn_logging_to, terminate};
use macvhost::worker::l2::FIRST_QUERY_AFTER;
use nix::sys::signal::Signal;

/// The stream into the guest across each restart.
const STREAM: usize = 96 << 20;
/// How long each ping run lasts (the restart happens [`LEAD`] into it): long enough to see a gap
/// up to [`MAX_GAP`] after the restart, no longer (six runs per CI pass).
const PING_FOR: Duration = Duration::from_secs(8);
const LEAD: Duration = Duration::from_secs(2);
/// Bound on the gap for the asserts (TCG on a loaded 2-core host; the figures are printed).
const MAX_GAP: Duration = Duration::from_secs(6);

/// The IPv4 group the guest holds through every restart, and its MAC as `ip maddr` prints it.
const GROUP: &str = "239.1.2.3";
const GROUP_MAC: &str = "01:00:5e:01:02:03";

/// How soon after a new macvhost starts the guest's group must be back on the macvtap: its
/// frontend connection (within [`MAX_GAP`], as the pings assert), the first query
/// [`FIRST_QUERY_AFTER`] later, and the guest's answer within the query's max response time,
/// plus 2 s for a TCG guest busy checksumming the stream (its timers run late).
fn relearn_bound() -> Duration {
    MAX_GAP + FIRST_QUERY_AFTER + STARTUP_QUERY_RESPONSE_INTERVAL + Duration::from_secs(2)
}

/// macvhost in the namespace at its default log level, listening or (`client`) connecting.
struct Mvh {
    ns: String,
    args: Vec<String>,
    log: PathBuf,
    control: PathBuf,
    child: Option<Child>,
    /// When the running macvhost was spawned.
    started: Instant,
}

/// How macvhost is replaced under traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    Kill9,
    Sigterm,
    /// `--take-over` by a new process with the same flags.
    TakeOver,
}

impl Mvh {
    fn new(ns: &NetNs, dir: &Path, socket: &Path, client: bool) -> Mvh {
        let control = dir.join("control.sock");
        let mut args = vec![
            "--socket-path".to_string(),
            socket.display().to_string(),
            "--macvtap".into(),
            "mvt0".into(),
            "--control-socket".into(),
            control.display().to_string(),
        ];
        if client {
            args.push("--client".into());
        }
        if std::env::var_os("MACVHOST_RESTART_DEBUG").is_some() {
            args.extend(["--log-level".into(), "debug".into()]);
        }
        let mut m = Mvh {
            ns: ns.name().to_string(),
            args,
            log: dir.join("macvhost.log"),
            control,
            child: None,
            started: Instant::now(),
        };
        m.start();
        m
    }

    fn start(&mut self) {
        self.spawn(&[]);
    }

    fn spawn(&mut self, extra: &[String]) {
        let started = Instant::now();
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = spawn_logging_to(
            NetNs::attach(&self.ns)
                .command(Daemon::binary())
                .args(&self.args)
                .args(extra),
            out,
        );
        self.child = Some(child);
        self.started = started;
    }

    /// Starts a new macvhost with `--take-over` and waits for the old one to hand over and
    /// exit 0.
    fn take_over(&mut self) {
        let mut old = self.child.take().expect("running");
        self.spawn(&["--take-over".into(), self.control.display().to_string()]);
        let t = Instant::now();
        let status = loop {
            if let Some(s) = old.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < secs(20),
                "the old macvhost did not hand over; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(status.success(), "{status}; log:\n{}", self.log_text());
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    fn sigterm(&mut self) {
        let mut c = self.child.take().expect("running");
        let status = terminate(&mut c, Signal::SIGTERM, secs(10)).expect("stops on SIGTERM");
        assert!(status.success(), "{status}; log:\n{}", self.log_text());
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has `n` lines with "frontend connected".
    fn wait_connected(&self, n: usize, timeout: Duration) {
        let t = Instant::now();
        while self.log_text().matches("frontend connected").count() < n {
            assert!(
                t.elapsed() < timeout,
                "no frontend connection #{n} within {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Mvh {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = terminate(&mut c, Signal::SIGTERM, secs(5));
        }
        if std::thread::panicking() {
            eprintln!("---- macvhost log ----\n{}", self.log_text());
        }
    }
}

/// Whether [`GROUP_MAC`] is on mvt0's multicast list, read on a thread inside the namespace
/// (`/proc/thread-self/net` is that thread's network namespace's; `ip maddr` reads the same
/// `dev_mcast`). Cheap enough to poll every 20 ms beside a TCG guest, unlike spawning `ip`.
fn group_on_macvtap_here() -> bool {
    let hex = GROUP_MAC.replace(':', "");
    fs::read_to_string("/proc/thread-self/net/dev_mcast")
        .expect("/proc/thread-self/net/dev_mcast")
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 5 && f[1] == "mvt0" && f[4] == hex
        })
}

/// The same question through `ip maddr show dev mvt0`, as an operator asks it.
fn group_in_ip_maddr(ns: &NetNs) -> bool {
    ns.ip(&["maddr", "show", "dev", "mvt0"]).lines().any(|l| {
        l.trim()
            .strip_prefix("link ")
            .is_some_and(|m| m.split_whitespace().next() == Some(GROUP_MAC))
    })
}

/// What a [`GroupWatch`] saw: each change of "the group is on the macvtap" with the time of
/// the sample that saw it, and the latest sample.
#[derive(Debug, Default, Clone)]
struct Timeline {
    changes: Vec<(Instant, bool)>,
    last: Option<(Instant, bool)>,
}

/// Samples [`group_on_macvtap_here`] every 20 ms on a thread in the namespace until dropped.
struct GroupWatch {
    seen: Arc<Mutex<Timeline>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What became of the group across one restart.
#[derive(Debug)]
struct Relearn {
    /// It left the macvtap this long after the old macvhost was told to stop.
    left: Option<Duration>,
    /// It was back on the macvtap this long after the new macvhost was spawned: the first
    /// sample that saw it after its last absence (`None`: it never left, or is not back).
    back: Option<Duration>,
    /// A sample taken after the old macvhost was gone saw it on the macvtap.
    on: bool,
}

impl GroupWatch {
    fn start(ns: &NetNs) -> GroupWatch {
        let seen = Arc::new(Mutex::new(Timeline::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let thread = ns.spawn(move || {
            while !st.load(Ordering::Relaxed) {
                // The sample's time is taken before the read: it shows the list at or after it.
                let t = Instant::now();
                let on = group_on_macvtap_here();
                let mut s = s.lock().unwrap();
                if s.last.map(|l| l.1) != Some(on) {
                    s.changes.push((t, on));
                }
                s.last = Some((t, on));
                drop(s);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        GroupWatch {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn timeline(&self) -> Timeline {
        self.seen.lock().unwrap().clone()
    }

    /// Waits (at most until `started` + [`relearn_bound`]) for a sample taken after the old
    /// macvhost was gone (`old_gone`: its packet socket closed, its memberships dropped) that
    /// shows the group on the macvtap, then says when it left and came back. `stopped`: when
    /// the old one was told to stop (or, for a take-over, the new one spawned).
    fn relearned(&self, stopped: Instant, old_gone: Instant, started: Instant) -> Relearn {
        let deadline = started + relearn_bound();
        let tl = loop {
            let tl = self.timeline();
            let done = tl.last.is_some_and(|(t, on)| t >= old_gone && on);
            if done || Instant::now() >= deadline {
                break tl;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            tl.changes.first().is_some_and(|c| c.1)
                && tl.changes.iter().all(|&(t, on)| on || t >= stopped),
            "the group left the macvtap before the restart: {tl:?}"
        );
        let left = tl
            .changes
            .iter()
            .find(|c| !c.1)
            .map(|c| c.0.saturating_duration_since(stopped));
        let on = tl.last.is_some_and(|(t, on)| t >= old_gone && on);
        let back = match tl.changes.last() {
            Some(&(t, true)) if left.is_some() => Some(t.saturating_duration_since(started)),
            _ => None,
        };
        Relearn { left, back, on }
    }
}

impl Drop for GroupWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One ping run: what was sent, answered, and the longest run of unanswered sequence numbers.
#[derive(Debug)]
struct Pings {
    sent: u64,
    received: u64,
    /// The longest run of missing sequence numbers × the interval.
    gap: Duration,
}

fn parse_pings(out: &str) -> Pings {
    let mut seqs: Vec<u64> = out
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    let sent = out
        .lines()
        .find_map(|l| {
            l.split(" packets transmitted")
                .next()
                .filter(|_| l.contains("packets transmitted"))
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no summary in ping's output:\n{out}"));
    let longest = seqs
        .windows(2)
        .map(|w| w[1] - w[0] - 1)
        .chain(seqs.last().map(|l| sent - l))
        .max()
        .unwrap_or(sent);
    Pings {
        sent,
        received: seqs.len() as u64,
        gap: Duration::from_millis(longest * 10),
    }
}

/// Pings the guest every 10 ms for [`PING_FOR`], running `restart` [`LEAD`] into it.
fn ping_across(ns: &NetNs, restart: impl FnOnce()) -> Pings {
    let mut ping = ns
        .command("ping")
        .args(["-n", "-i", "0.01", "-W", "1", "-w"])
        .arg(PING_FOR.as_secs().to_string())
        .arg(guest::GUEST_IP)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("iputils ping");
    let mut stdout = ping.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    std::thread::sleep(LEAD);
    restart();
    let _ = ping.wait();
    parse_pings(&reader.join().unwrap())
}

/// One restart with the stream running: figures printed, stream checked, gap bounded.
fn restart_case(label: &str, ns: &NetNs, vm: &Qemu, mvh: &mut Mvh, how: Restart) -> Pings {
    let mark = vm.mark();
    assert!(
        group_in_ip_maddr(ns),
        "{label}: the guest's group is not on the macvtap before the restart"
    );
    let groups = GroupWatch::start(ns);
    let sender = guest::stream_into_guest(ns, vm, STREAM);
    let (mut stopped, mut old_gone) = (Instant::now(), Instant::now());
    let pings = ping_across(ns, || {
        stopped = Instant::now();
        match how {
            Restart::Kill9 => {
                mvh.kill9();
                old_gone = Instant::now();
                mvh.start();
            }
            Restart::Sigterm => {
                mvh.sigterm();
                old_gone = Instant::now();
                mvh.start();
            }
            Restart::TakeOver => {
                mvh.take_over();
                old_gone = Instant::now();
            }
        }
    });
    vm.wait_for_line_from(mark, "MVH-RESULT stream_sha", secs(120))
        .unwrap_or_else(|e| {
            panic!(
                "{label}: the stream did not finish: {e}\n{}",
                mvh.log_text()
            )
        });
    let sent = sender.join().unwrap().expect("the stream's sender");
    let results = vm.results();
    println!(
        "restart gap, {label}: {} of {} pings lost, longest gap {} ms; {} MiB stream in {:.1} s, \
         sha {}",
        pings.sent - pings.received,
        pings.sent,
        pings.gap.as_millis(),
        STREAM >> 20,
        sent.elapsed.as_secs_f64(),
        if results["stream_sha"] == sent.sha256 {
            "intact"
        } else {
            "DIFFERS"
        }
    );
    assert_eq!(
        results["stream_bytes"],
        STREAM.to_string(),
        "{label}: stream cut"
    );
    assert_eq!(
        results["stream_sha"], sent.sha256,
        "{label}: stream corrupted"
    );
    assert!(pings.received > 0, "{label}: no ping answered: {pings:?}");
    assert!(
        pings.gap < MAX_GAP,
        "{label}: {pings:?}; log:\n{}",
        mvh.log_text()
    );
    relearn_case(label, ns, &groups, (stopped, old_gone, mvh.started));
    pings
}

/// The guest's group across one restart (`times`: the old macvhost told to stop, gone, the
/// new one spawned): printed, and bounded by [`relearn_bound`].
fn relearn_case(label: &str, ns: &NetNs, groups: &GroupWatch, times: (Instant, Instant, Instant)) {
    let (stopped, old_gone, started) = times;
    let waited = Instant::now();
    let r = groups.relearned(stopped, old_gone, started);
    let waited = waited.elapsed();
    let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64()));
    println!(
        "relearn, {label}: group left the macvtap {} after the restart began; group back on the \
         macvtap {} after the new macvhost started (bound {:.0} s: {:?} to connect + first \
         query after {:?} + guest's max response time {:?} + 2 s slack); the test waited \
         {:.2} s for it after the stream",
        ms(r.left),
        ms(r.back),
        relearn_bound().as_secs_f64(),
        MAX_GAP,
        FIRST_QUERY_AFTER,
        STARTUP_QUERY_RESPONSE_INTERVAL,
        waited.as_secs_f64(),
    );
    assert!(
        r.on,
        "{label}: the group is not back on the macvtap within {:?} of the new macvhost: {r:?} \
         {:?}",
        relearn_bound(),
        groups.timeline()
    );
    assert!(group_in_ip_maddr(ns), "{label}: ip maddr disagrees: {r:?}");
    // The group leaves in all three: after kill -9 the kernel drops the dead process's
    // packet-socket memberships; a stopping macvhost removes the guest's groups when its
    // frontend connection ends, and so does the old one in a take-over (it ends its connection
    // once the new one is ready, and the new one connects only after that, so it cannot have
    // learned the group yet: take-over hands over fds, not the membership table). Coming back
    // is therefore the new macvhost's own relearning. Should take-over ever hand the table
    // over, the group would stay and this assert must change with it.
    assert!(r.left.is_some(), "{label}: the group never left: {r:?}");
    assert!(
        r.back.is_some_and(|b| b <= relearn_bound()),
        "{label}: {r:?}"
    );
}

/// Boots a guest on macvhost (`server`: QEMU listens and macvhost connects) and replaces
/// macvhost three times under traffic: SIGKILL, SIGTERM, then `--take-over` (one VM boot for
/// all three).
fn restarts(tag: &str, server: bool) {
    let _lock = one_at_a_time();
    let ns = NetNs::new(tag);
    guest::add_veth_macvtap(&ns);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let mut cfg = QemuConfig::vhost_user(tag, &socket, 1);
    cfg.vhost_user_server = server;
    let (vm, mut mvh) = if server {
        let vm = Qemu::spawn(&cfg).unwrap_or_else(|e| panic!("{e}"));
        (vm, Mvh::new(&ns, dir.path(), &socket, true))
    } else {
        let mvh = Mvh::new(&ns, dir.path(), &socket, false);
        let t = Instant::now();
        while !socket.exists() {
            assert!(t.elapsed() < secs(20), "no socket:\n{}", mvh.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        (Qemu::spawn(&cfg).unwrap_or_else(|e| panic!("{e}")), mvh)
    };
    vm.wait_ready(secs(300))
        .unwrap_or_else(|e| panic!("{e}\n--- macvhost ---\n{}", mvh.log_text()));
    mvh.wait_connected(1, secs(60));
    join_group(&ns, &vm);
    let mode = if server {
        "server=on + --client"
    } else {
        "reconnect=1"
    };
    restart_case(
        &format!("{mode}, kill -9"),
        &ns,
        &vm,
        &mut mvh,
        Restart::Kill9,
    );
    restart_case(
        &format!("{mode}, SIGTERM"),
        &ns,
        &vm,
        &mut mvh,
        Restart::Sigterm,
    );
    let ifindex = ns.ifindex("mvt0");
    let flaps = carrier_changes(&ns);
    restart_case(
        &format!("{mode}, --take-over"),
        &ns,
        &vm,
        &mut mvh,
        Restart::TakeOver,
    );
    assert_eq!(ns.ifindex("mvt0"), ifindex, "take-over: the same macvtap");
    assert_eq!(
        carrier_changes(&ns),
        flaps,
        "take-over: the macvtap's carrier changed"
    );
}

/// The guest joins [`GROUP`] and holds it in the background through every restart (the VM
/// dies with the test); its MAC reaches the macvtap.
fn join_group(ns: &NetNs, vm: &Qemu) {
    let o = vm.exec_ok(
        &format!(
            "mvh-mcast join-many $MVH_IFACE {GROUP} 1 3600 > /tmp/group.out 2>&1 &\n\
             i=0; until grep -q '^joined=' /tmp/group.out || [ $i -ge 200 ]; do sleep 0.05; \
             i=$((i+1)); done\n\
             cat /tmp/group.out"
        ),
        secs(60),
    );
    assert!(o.output.contains("joined=1 "), "{}", o.output);
    let t = Instant::now();
    while !group_in_ip_maddr(ns) {
        assert!(
            t.elapsed() < secs(10),
            "the guest's group never reached the macvtap"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "the guest joined {GROUP}: on the macvtap {:.2} s after the join was printed",
        t.elapsed().as_secs_f64()
    );
}

fn carrier_changes(ns: &NetNs) -> u64 {
    ns.read_file("/sys/class/net/mvt0/carrier_changes")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn guest_keeps_its_tcp_stream_across_macvhost_restarts_with_qemu_reconnecting() {
    require!(GUEST);
    require!(&[Need::Tool("ping")]);
    restarts("restart-reconnect", false);
}

#[test]
fn guest_keeps_its_tcp_stream_across_macvhost_client_restarts_with_qemu_listening() {
    require!(GUEST);
    require!(&[Need::Tool("ping")]);
    restarts("restart-client", true);
}
