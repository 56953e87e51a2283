//! A frontend that wants another device than macvhost serves (issue 12 item 4), with real QEMU
//! (`reconnect=1`, TCG): more queue pairs than `--queues`, larger rings than `--queue-size`.
//! QEMU reconnects at once after each failed connection, forever; macvhost must write one error
//! naming the flag and the value, pause between attempts, and summarise the repeats, instead
//! of a line per attempt (before: ~90,000 lines a minute). macvhost runs at its default log
//! level, as an operator runs it. Needs root, `ip`, QEMU and the guest image (`require!`).

#[path = "support/guest.rs"]
mod guest;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use guest::{one_at_a_time, require, secs, Daemon, NetNs, Qemu, QemuConfig, GUEST};
use macvhost::testkit::daemon::spawn_logging_to;

/// The window the log is counted over, and the bound.
const WINDOW: Duration = Duration::from_secs(10);
const MAX_LINES: usize = 100;

/// macvhost at the default log level, logging to `dir/macvhost.log`.
struct Operator {
    child: Child,
    log: PathBuf,
    socket: PathBuf,
}

impl Operator {
    fn start(ns: &NetNs, dir: &Path, args: &[&str]) -> Operator {
        let socket = dir.join("macvhost.sock");
        let log = dir.join("macvhost.log");
        let child = spawn_logging_to(
            ns.command(Daemon::binary())
                .arg("--socket-path")
                .arg(&socket)
                .args(args),
            File::create(&log).unwrap(),
        );
        let t = Instant::now();
        while !socket.exists() {
            assert!(t.elapsed() < secs(20), "no socket; log:\n{}", read(&log));
            std::thread::sleep(Duration::from_millis(20));
        }
        Operator { child, log, socket }
    }

    fn lines(&self) -> Vec<String> {
        read(&self.log).lines().map(str::to_owned).collect()
    }

    /// Waits for a line containing `pat`; returns its index.
    fn wait_for(&self, pat: &str, timeout: Duration) -> usize {
        let t = Instant::now();
        loop {
            if let Some(i) = self.lines().iter().position(|l| l.contains(pat)) {
                return i;
            }
            assert!(
                t.elapsed() < timeout,
                "no line with {pat:?} within {timeout:?}; log:\n{}",
                read(&self.log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait; the log afterwards.
    fn stop(mut self) -> Vec<String> {
        let status = macvhost::testkit::daemon::terminate(
            &mut self.child,
            nix::sys::signal::Signal::SIGTERM,
            Duration::from_secs(10),
        )
        .expect("macvhost stops on SIGTERM");
        assert!(status.success(), "{status}; log:\n{}", read(&self.log));
        self.lines()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

/// Runs QEMU (`cfg`) against macvhost (`args`) until the misfit line naming `flag` appears,
/// counts the log lines over [`WINDOW`], then stops macvhost and checks the summary.
fn misfit_is_one_line(tag: &str, args: &[&str], cfg: impl Fn(&Path) -> QemuConfig, flag: &str) {
    let _lock = one_at_a_time();
    let ns = NetNs::new(tag);
    guest::add_veth_macvtap(&ns);
    let dir = tempfile::tempdir().unwrap();
    let mvh = Operator::start(&ns, dir.path(), args);
    let vm = Qemu::spawn(&cfg(&mvh.socket)).unwrap_or_else(|e| panic!("{e}"));
    // The queue-pair misfit comes while QEMU starts; the ring one once the guest's driver does.
    let first = mvh.wait_for(flag, secs(300));
    let t0 = Instant::now();
    std::thread::sleep(WINDOW);
    let during = mvh.lines().len() - first;
    let qemu_alive = vm.wait_exit(Duration::ZERO).is_none();
    let lines = mvh.stop();
    let window = &lines[first..first + during];
    println!(
        "{tag}: {during} macvhost lines in {:.1} s after the first misfit:\n{}",
        t0.elapsed().as_secs_f64(),
        window.join("\n")
    );
    println!("{tag}: at exit:\n{}", lines[first + during..].join("\n"));
    assert!(qemu_alive, "QEMU kept reconnecting");
    assert!(
        during < MAX_LINES,
        "{during} lines in {WINDOW:?}:\n{}",
        window.join("\n")
    );
    let named: Vec<_> = lines.iter().filter(|l| l.contains(flag)).collect();
    assert!(
        lines[first].contains("ERROR"),
        "the misfit is an error: {}",
        lines[first]
    );
    // One error line, and one summary of the repeats (written when macvhost stops).
    let summary: Vec<_> = named
        .iter()
        .filter(|l| l.contains("more identical failures"))
        .collect();
    assert_eq!(named.len(), 2, "{named:#?}");
    assert_eq!(summary.len(), 1, "{named:#?}");
    let repeats: u64 = summary[0]
        .split("more identical failures")
        .next()
        .and_then(|s| s.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {}", summary[0]));
    // Pauses of 0.25, 0.5, 1, 2, 4 s: QEMU got 4 or 5 more connections in 10 s, not 7,500.
    println!("{tag}: {repeats} repeats summarised");
    assert!((2..=8).contains(&repeats), "{repeats} repeats");
}

#[test]
fn qemu_with_four_queue_pairs_against_queues_2_is_one_error_naming_queues_4() {
    require!(GUEST);
    misfit_is_one_line(
        "misfit-queues",
        &["--macvtap", "mvt0", "--queues", "2"],
        |sock| QemuConfig::vhost_user("misfit-queues", sock, 4),
        "start macvhost with --queues 4",
    );
}

#[test]
fn qemu_with_1024_entry_rings_against_queue_size_256_is_one_error_naming_queue_size_1024() {
    require!(GUEST);
    misfit_is_one_line(
        "misfit-ring",
        &["--macvtap", "mvt0", "--queue-size", "256"],
        |sock| {
            let mut c = QemuConfig::vhost_user("misfit-ring", sock, 1);
            c.nic_opts = ",rx_queue_size=1024,tx_queue_size=1024".into();
            c
        },
        "start macvhost with --queue-size 1024",
    );
}

/// `RssAnon` and `VmRSS` of `pid`, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in /proc/{pid}/status"))
    };
    (field("RssAnon:"), field("VmRSS:"))
}

/// Boots a guest whose NIC has `ring`-entry rings on macvhost with its default `--queue-size`,
/// streams 32 MiB into it (sha checked) and returns macvhost's (RssAnon, VmRSS) after.
fn served_rss(tag: &str, ring: u16) -> (u64, u64) {
    let _lock = one_at_a_time();
    let ns = NetNs::new(tag);
    guest::add_veth_macvtap(&ns);
    let dir = tempfile::tempdir().unwrap();
    let mvh = Operator::start(&ns, dir.path(), &["--macvtap", "mvt0", "--queues", "1"]);
    let mut cfg = QemuConfig::vhost_user(tag, &mvh.socket, 1);
    cfg.nic_opts = format!(",rx_queue_size={ring},tx_queue_size={ring}");
    let vm = Qemu::spawn(&cfg).unwrap_or_else(|e| panic!("{e}"));
    vm.wait_ready(secs(300))
        .unwrap_or_else(|e| panic!("{e}\n--- macvhost ---\n{}", read(&mvh.log)));
    let o = vm.exec_ok("cat /sys/class/net/$MVH_IFACE/carrier", secs(60));
    assert_eq!(o.output.trim(), "1");
    const STREAM: usize = 32 << 20;
    let sender = guest::stream_into_guest(&ns, &vm, STREAM);
    vm.wait_for_line("MVH-RESULT stream_sha", secs(300))
        .unwrap_or_else(|e| panic!("{e}\n--- macvhost ---\n{}", read(&mvh.log)));
    let sent = sender.join().unwrap().unwrap();
    let results = vm.results();
    assert_eq!(results["stream_bytes"], STREAM.to_string());
    assert_eq!(results["stream_sha"], sent.sha256, "stream corrupted");
    let rss = rss_kib(mvh.child.id());
    println!(
        "{tag}: {ring}-entry rings: 32 MiB in {:.1} s ({:.0} Mbit/s); macvhost RssAnon {} KiB, \
         VmRSS {} KiB",
        sent.elapsed.as_secs_f64(),
        sent.mbit_per_s(),
        rss.0,
        rss.1
    );
    assert!(
        !read(&mvh.log).contains("ERROR"),
        "errors:\n{}",
        read(&mvh.log)
    );
    rss
}

#[test]
fn default_queue_size_serves_qemus_largest_ring_at_the_memory_of_a_256_ring() {
    require!(GUEST);
    let big = served_rss("ring-1024", 1024);
    let small = served_rss("ring-256", 256);
    println!(
        "RssAnon 1024 vs 256: {} vs {} KiB; VmRSS {} vs {} KiB",
        big.0, small.0, big.1, small.1
    );
    // macvhost allocates nothing per ring entry (the ring is guest memory): a 4x ring may not
    // cost a MiB of its own.
    assert!(
        big.0 < small.0 + 1024,
        "1024-entry rings cost {} KiB more anonymous memory",
        big.0.saturating_sub(small.0)
    );
}
