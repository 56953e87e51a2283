//! Real guests on macvhost (issue 3): a Debian kernel's virtio-net driver under QEMU (TCG),
//! macvhost on a macvtap (bridge mode) over a veth pair in a namespace the test creates, the
//! traffic peer on the veth's other end. Needs root, `ip`, QEMU and the guest image; otherwise each
//! test skips through `require!` (and fails with `MACVHOST_E2E_REQUIRED=1`).

#[path = "support/guest.rs"]
mod guest;

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use guest::{one_at_a_time as one_guest_at_a_time, require, secs, Daemon, Need, NetNs};
use guest::{Qemu, QemuConfig, GUEST};

/// macvhost on macvtap `macvtap` with `queues` queue pairs and more arguments, its sockets and
/// log in `dir`.
fn start_macvhost(ns: &NetNs, dir: &Path, macvtap: &str, queues: u16, extra: &[&str]) -> Daemon {
    let queues = queues.to_string();
    let mut args = vec!["--macvtap", macvtap, "--queues", &queues];
    args.extend_from_slice(extra);
    Daemon::spawn(ns, dir, &args)
}

struct Setup {
    _lock: MutexGuard<'static, ()>,
    vm: Qemu,
    mvh: Daemon,
    ns: NetNs,
    _dir: tempfile::TempDir,
    boot: Duration,
}

fn setup(tag: &str, queues: u16, reboot_in_place: bool) -> Setup {
    setup_with(tag, queues, reboot_in_place, &[])
}

/// [`setup`] with more macvhost arguments.
fn setup_with(tag: &str, queues: u16, reboot_in_place: bool, extra_args: &[&str]) -> Setup {
    let lock = one_guest_at_a_time();
    let ns = NetNs::new(tag);
    guest::add_veth_macvtap(&ns);
    let dir = tempfile::tempdir().unwrap();
    let mvh = start_macvhost(&ns, dir.path(), "mvt0", queues, extra_args);
    let mut cfg = QemuConfig::vhost_user(tag, mvh.socket(), queues);
    cfg.no_reboot = !reboot_in_place;
    let vm = Qemu::spawn(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let ready = vm
        .wait_ready(secs(300))
        .unwrap_or_else(|e| panic!("{e}\n--- macvhost ---\n{}", mvh.log_text()));
    assert_eq!(ready.iface, "eth0");
    assert_eq!(ready.mac, guest::GUEST_MAC);
    assert_eq!(ready.link, "up");
    println!(
        "{tag}: guest ready in {:.2} s wall ({:.2} s guest uptime)",
        ready.wall.as_secs_f64(),
        ready.guest_uptime
    );
    Setup {
        _lock: lock,
        vm,
        mvh,
        ns,
        _dir: dir,
        boot: ready.wall,
    }
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    println!("timing: {what}: {:.2} s", t.elapsed().as_secs_f64());
    r
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
}

#[test]
fn guest_comes_up_with_the_macvtap_mac_and_pings_the_peer() {
    require!(GUEST);
    let s = setup("ping", 2, false);
    let macvtap_mac =
        s.ns.command("cat")
            .arg("/sys/class/net/mvt0/address")
            .output()
            .unwrap();
    let macvtap_mac = String::from_utf8_lossy(&macvtap_mac.stdout)
        .trim()
        .to_string();
    let o = s.vm.exec_ok(
        "cat /sys/class/net/$MVH_IFACE/address /sys/class/net/$MVH_IFACE/operstate \
         /sys/class/net/$MVH_IFACE/carrier /sys/class/net/$MVH_IFACE/mtu",
        secs(120),
    );
    let lines: Vec<&str> = o.output.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        [macvtap_mac.as_str(), "up", "1", "1500"],
        "{}",
        o.output
    );
    let o = timed("ping guest->peer", || {
        s.vm.exec_ok("ping -c 3 -W 5 $MVH_PEER", secs(180))
    });
    assert!(o.output.contains("3 packets received"), "{}", o.output);
    let out = timed("ping peer->guest", || {
        s.ns.command("busybox")
            .args(["ping", "-c", "3", "-W", "5", guest::GUEST_IP])
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let total: u64 = s.mvh.stats().iter().map(|q| q["rx_frames"]).sum();
    assert!(total >= 6, "macvhost delivered {total} frames to the guest");
    println!("boot {:.2} s", s.boot.as_secs_f64());
}

/// Migrates the guest behind `src` at full speed to the destination listening on unix socket
/// `to`; returns QEMU's final `query-migrate` (total time, downtime, RAM figures).
fn migrate_and_wait(src: &mut guest::Qmp, to: &Path) -> serde_json::Value {
    src.execute(
        "migrate-set-parameters",
        serde_json::json!({ "max-bandwidth": 4u64 << 30 }),
    )
    .unwrap();
    let started = Instant::now();
    src.execute(
        "migrate",
        serde_json::json!({ "uri": format!("unix:{}", to.display()) }),
    )
    .unwrap();
    loop {
        let st = src.execute("query-migrate", serde_json::json!({})).unwrap();
        match st["status"].as_str() {
            Some("completed") => return st,
            Some("failed") | Some("cancelled") => panic!("migration failed: {st}"),
            _ => {}
        }
        assert!(
            started.elapsed() < secs(600),
            "migration never completed: {st}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// After a completed migration to a destination held paused (`-S`): saves both guests' RAM
/// (QMP `pmemsave`, the test guest's 512 MiB) and returns the 4 KiB pages that differ above
/// 1 MiB (below it sit VGA memory and ROMs). Nothing runs on either side meanwhile, so every
/// page listed is a write the migration did not carry over.
fn pages_left_behind(src: &mut guest::Qmp, dst: &mut guest::Qmp, dir: &Path) -> Vec<usize> {
    const PAGE: usize = 4096;
    let size = 512usize << 20;
    let (fa, fb) = (dir.join("src.mem"), dir.join("dst.mem"));
    for (q, f) in [(src, &fa), (dst, &fb)] {
        q.execute(
            "pmemsave",
            serde_json::json!({"val": 0, "size": size, "filename": f.display().to_string()}),
        )
        .expect("pmemsave");
    }
    let (a, b) = (std::fs::read(&fa).unwrap(), std::fs::read(&fb).unwrap());
    let _ = (std::fs::remove_file(&fa), std::fs::remove_file(&fb));
    ((1 << 20) / PAGE..size / PAGE)
        .filter(|&p| a[p * PAGE..(p + 1) * PAGE] != b[p * PAGE..(p + 1) * PAGE])
        .collect()
}

/// Polls the guest's carrier for `iface` until it reads `want`; returns how long that took.
fn wait_guest_carrier(s: &Setup, want: &str, limit: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < limit {
        let o = s.vm.exec_ok(
            "result carrier $(cat /sys/class/net/$MVH_IFACE/carrier)",
            secs(60),
        );
        last = o.expect_result("carrier").to_string();
        if last == want {
            return Ok(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("guest carrier still {last} after {limit:?}"))
}

#[test]
fn guest_carrier_follows_the_macvtap_parent_with_disconnect_on_link_down() {
    require!(GUEST);
    let s = setup_with("carrier", 1, false, &["--disconnect-on-link-down"]);
    wait_guest_carrier(&s, "1", secs(30)).unwrap();
    let o = s.vm.exec_ok("ping -c 2 -W 5 $MVH_PEER", secs(120));
    assert!(o.output.contains("2 packets received"), "{}", o.output);

    // The peer end of the veth goes down: the parent, and so the macvtap, lose carrier.
    s.ns.ip(&["link", "set", "mvh-peer", "down"]);
    let down = wait_guest_carrier(&s, "0", secs(30))
        .unwrap_or_else(|e| panic!("{e}\n--- macvhost ---\n{}", s.mvh.log_text()));
    // Carrier returns: macvhost serves again, QEMU reconnects (reconnect=1) and raises the link.
    s.ns.ip(&["link", "set", "mvh-peer", "up"]);
    let up = wait_guest_carrier(&s, "1", secs(60))
        .unwrap_or_else(|e| panic!("{e}\n--- macvhost ---\n{}", s.mvh.log_text()));
    let o = s.vm.exec_ok("ping -c 3 -W 5 $MVH_PEER", secs(120));
    assert!(
        o.output.contains("3 packets received"),
        "no traffic after the link came back:\n{}",
        o.output
    );
    let log = s.mvh.log_text();
    assert_eq!(
        log.matches("host link lost carrier: ending the frontend connection")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("host link has carrier again"), "{log}");
    let console = s.vm.log_text();
    assert!(
        !console.contains("BUG:") && !console.contains("Oops"),
        "the guest kernel crashed:\n{console}"
    );
    println!(
        "guest carrier: 0 seen {:.2} s after the parent went down, 1 seen {:.2} s after it \
         came back; ping after: 3/3",
        down.as_secs_f64(),
        up.as_secs_f64()
    );
}

#[test]
fn tcp_64mib_each_way_arrives_intact_with_checksum_and_tso_offloads() {
    require!(GUEST);
    const BLOB: usize = 64 << 20;
    let s = setup("tcp", 2, false);
    let o = s.vm.exec_ok("ethtool -k $MVH_IFACE", secs(120));
    for k in [
        "rx-checksumming:",
        "tx-checksumming:",
        "tcp-segmentation-offload:",
    ] {
        let v = field(&o.output, k).unwrap_or_else(|| panic!("no {k} in:\n{}", o.output));
        assert!(v.starts_with("on"), "{k} {v}");
    }

    // Host -> guest.
    let blob = Arc::new(guest::random_blob(BLOB).unwrap());
    let listener =
        s.ns.tcp_listener(format!("{}:5001", guest::PEER_IP).parse().unwrap())
            .unwrap();
    let sender = guest::serve_blob(listener, blob, secs(300));
    let o = timed("64 MiB host->guest", || {
        s.vm.exec_ok(
            "nc $MVH_PEER 5001 > /tmp/rx && result rx_bytes $(wc -c < /tmp/rx) && \
             result rx_sha $(sha256 /tmp/rx); rm -f /tmp/rx",
            secs(300),
        )
    });
    let sent = sender.join().unwrap().unwrap();
    assert_eq!(o.expect_result("rx_bytes"), BLOB.to_string());
    assert_eq!(
        o.expect_result("rx_sha"),
        sent.sha256,
        "host->guest corrupted"
    );
    println!("host->guest {:.0} Mbit/s", sent.mbit_per_s());

    // Guest -> host.
    let o = s.vm.exec_ok(
        &format!(
            "dd if=/dev/urandom of=/tmp/tx bs=1M count={} 2>/dev/null && result tx_sha $(sha256 /tmp/tx)",
            BLOB >> 20
        ),
        secs(300),
    );
    let tx_sha = o.expect_result("tx_sha").to_string();
    let before = s.mvh.stats();
    let listener =
        s.ns.tcp_listener(format!("{}:5002", guest::PEER_IP).parse().unwrap())
            .unwrap();
    let receiver = guest::receive_sha256(listener, secs(300));
    let o = timed("64 MiB guest->host", || {
        s.vm.exec_ok(
            "nc $MVH_PEER 5002 < /tmp/tx; rm -f /tmp/tx; \
             result retrans $(awk '/^Tcp:/ {n++} n == 2 {print $13; exit}' /proc/net/snmp)",
            secs(300),
        )
    });
    let got = receiver.join().unwrap().unwrap();
    assert_eq!(got.bytes, BLOB as u64);
    assert_eq!(got.sha256, tx_sha, "guest->host corrupted");
    println!("guest->host {:.0} Mbit/s", got.mbit_per_s());

    // TSO really crossed macvhost: the guest handed over frames asking the host to segment them.
    // How many depends on the guest: under TCG, 6% to 48% of the frames over 6 runs (a run
    // where the guest falls into one interrupt per ACK sends mostly MSS-sized frames, which
    // failed the old "average above one MTU" check in CI), so only their presence is asserted.
    let st = s.mvh.stats();
    let delta = |k: &str| -> u64 { st.iter().zip(&before).map(|(a, b)| a[k] - b[k]).sum() };
    let (frames, bytes, gso) = (
        delta("tx_frames"),
        delta("tx_bytes"),
        delta("tx_gso_frames"),
    );
    println!(
        "guest TX through macvhost: {frames} frames ({gso} GSO), {bytes} B, {} B/frame",
        bytes / frames.max(1)
    );
    println!(
        "guest TCP retransmitted segments so far: {}; counters moved: {:?}",
        o.expect_result("retrans"),
        st[0]
            .keys()
            .map(|k| (k.as_str(), delta(k)))
            .filter(|&(_, v)| v > 0)
            .collect::<Vec<_>>()
    );
    assert!(gso > 0, "no TSO frame crossed macvhost ({frames} frames)");
    let (rframes, rbytes): (u64, u64) = st
        .iter()
        .fold((0, 0), |(f, b), q| (f + q["rx_frames"], b + q["rx_bytes"]));
    println!("guest RX through macvhost: {rframes} frames, {rbytes} B");
    assert!(rbytes >= BLOB as u64);
}

/// Runs `flows` parallel TCP transfers (1 MiB each) from the peer to the guest, each on its own
/// port, so macvtap's flow hash spreads them over the queue pairs; checks every byte count.
fn parallel_flows(s: &Setup, flows: u16) {
    const SIZE: usize = 1 << 20;
    let blob = Arc::new(guest::random_blob(SIZE).unwrap());
    let senders: Vec<_> = (0..flows)
        .map(|i| {
            let l =
                s.ns.tcp_listener(format!("{}:{}", guest::PEER_IP, 5101 + i).parse().unwrap())
                    .unwrap();
            guest::serve_blob(l, blob.clone(), secs(300))
        })
        .collect();
    let o = s.vm.exec_ok(
        &format!(
            "for i in $(seq 0 {}); do (nc $MVH_PEER $((5101 + i)) | wc -c > /tmp/f$i) & done; wait; \
             result sizes $(cat /tmp/f* | sort -u | tr '\\n' ' '); rm -f /tmp/f*",
            flows - 1
        ),
        secs(300),
    );
    for t in senders {
        t.join().unwrap().expect("host sender");
    }
    assert_eq!(
        o.expect_result("sizes").trim(),
        SIZE.to_string(),
        "{}",
        o.output
    );
}

#[test]
fn two_queue_pairs_carry_flows_and_going_back_to_one_keeps_traffic_flowing() {
    require!(GUEST);
    let s = setup("mq", 2, false);
    let o = s.vm.exec_ok("ping -c 2 -W 5 $MVH_PEER", secs(120));
    assert!(o.output.contains("2 packets received"), "{}", o.output);
    let o = s.vm.exec_ok(
        "ethtool -L $MVH_IFACE combined 2 && \
         result combined $(ethtool -l $MVH_IFACE | awk '/Current/ {c=1} c && /Combined/ {print $2}')",
        secs(120),
    );
    assert_eq!(o.expect_result("combined"), "2");
    let before = s.mvh.stats();
    timed("8 parallel TCP flows on 2 pairs", || parallel_flows(&s, 8));
    let after = s.mvh.stats();
    let delta = |q: usize, k: &str| after[q][k] - before[q][k];
    println!(
        "per queue pair: qp0 rx {} tx {}, qp1 rx {} tx {}",
        delta(0, "rx_frames"),
        delta(0, "tx_frames"),
        delta(1, "rx_frames"),
        delta(1, "tx_frames")
    );
    // macvtap steers by flow hash: with 8 flows both queue fds get frames.
    assert!(
        delta(0, "rx_frames") > 0 && delta(1, "rx_frames") > 0,
        "RX not spread"
    );
    assert!(delta(0, "tx_frames") + delta(1, "tx_frames") > 0);

    // Back to one pair: QEMU disables pair 1; macvhost detaches its queue, so the kernel stops
    // steering frames there and everything arrives on pair 0.
    s.vm.exec_ok("ethtool -L $MVH_IFACE combined 1", secs(120));
    std::thread::sleep(Duration::from_millis(500));
    let before = s.mvh.stats();
    timed("8 parallel TCP flows on 1 pair", || parallel_flows(&s, 8));
    let o = s.vm.exec_ok("ping -c 3 -W 5 $MVH_PEER", secs(120));
    assert!(o.output.contains("3 packets received"), "{}", o.output);
    let after = s.mvh.stats();
    let d0 = after[0]["rx_frames"] - before[0]["rx_frames"];
    let d1 = after[1]["rx_frames"] - before[1]["rx_frames"];
    println!("after combined 1: qp0 rx {d0}, qp1 rx {d1}");
    assert!(d0 > 100, "pair 0 carried too little: {d0}");
    assert_eq!(d1, 0, "the disabled pair still received frames");
}

#[test]
fn macvhost_killed_and_restarted_under_ping_the_guest_recovers() {
    require!(GUEST);
    let mut s = setup("restart", 2, false);
    s.vm.exec_ok("ping -i 0.2 $MVH_PEER > /tmp/ping.log 2>&1 &", secs(60));
    std::thread::sleep(Duration::from_secs(2));
    s.mvh.kill9();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    s.mvh.restart();
    // QEMU (reconnect=1) redoes the handshake; pings must come back without a guest reboot.
    let mut resumed = None;
    while killed.elapsed() < secs(60) {
        let o =
            s.vm.exec("ping -c 1 -W 1 $MVH_PEER >/dev/null && echo back", secs(30))
                .unwrap();
        if o.output.contains("back") {
            resumed = Some(killed.elapsed());
            break;
        }
    }
    let resumed = resumed.unwrap_or_else(|| panic!("no ping after restart:\n{}", s.mvh.log_text()));
    println!("pings resumed {:.2} s after SIGKILL", resumed.as_secs_f64());
    let o = s.vm.exec_ok("cat /proc/uptime", secs(30));
    println!("guest uptime {} (no reboot)", o.output.trim());
    s.mvh.shutdown_clean();
}

#[test]
fn a_rebooted_guest_is_served_again() {
    require!(GUEST);
    let s = setup("reboot", 2, true);
    s.vm.exec_ok("ping -c 2 -W 5 $MVH_PEER", secs(120));
    let mark = s.vm.mark();
    // The guest resets its virtio device; QEMU stops and restarts the rings on macvhost.
    let _ = s.vm.exec("reboot -f", secs(5));
    let t = Instant::now();
    s.vm.wait_for_line_from(mark, "MVH-READY", secs(300))
        .unwrap_or_else(|e| panic!("{e}\n{}", s.mvh.log_text()));
    println!("reboot to ready {:.2} s", t.elapsed().as_secs_f64());
    let o = s.vm.exec_ok("ping -c 3 -W 5 $MVH_PEER", secs(180));
    assert!(o.output.contains("3 packets received"), "{}", o.output);
}

/// `N packets transmitted, M packets received` from busybox ping's summary.
fn ping_summary(text: &str) -> Option<(u32, u32)> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty());
    Some((nums.next()?.parse().ok()?, nums.next()?.parse().ok()?))
}

/// The `seq=N` numbers of ping replies in `text`.
fn ping_seqs(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.split("seq=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Live migration (issue 6): two QEMU processes, each with its own macvhost on its own macvtap
/// over the same parent. The guest pings the peer throughout; it is migrated from the first QEMU
/// to the second. Before that, a migration to a sink is started
/// and cancelled, which must turn macvhost's dirty logging on and off again.
///
/// A macvtap only receives frames for its own MAC, and one parent refuses a second macvlan with
/// a MAC already in use by an up sibling (EADDRINUSE, even while the second is down). So the
/// destination's macvtap waits down with another MAC, and when the migration completes the test
/// takes the source's macvtap down and gives the guest's MAC to the destination's — the step a
/// management layer takes at switchover.
#[test]
fn guest_migrates_between_two_macvhosts_while_pinging_the_peer() {
    let tcpdump = Need::Tool("tcpdump");
    require!(&[
        Need::Root,
        Need::Tool("ip"),
        guest::QEMU,
        guest::IMAGE,
        tcpdump
    ]);
    const STREAM: usize = 96 << 20;
    let _lock = one_guest_at_a_time();
    let ns = NetNs::new("mig");
    guest::add_veth_macvtap(&ns);
    ns.add_macvtap("mvh-lower", "mvt1", "bridge");
    let dir = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let mvh_a = start_macvhost(&ns, &dir_a, "mvt0", 1, &[]);
    // mvt1 cannot take the guest's MAC while mvt0 is up with it: B is told the guest's MAC.
    let mvh_b = start_macvhost(&ns, &dir_b, "mvt1", 1, &["--mac", guest::GUEST_MAC]);

    let qmp_a = dir.path().join("qmp-a.sock");
    let qmp_b = dir.path().join("qmp-b.sock");
    let mig = dir.path().join("migrate.sock");
    let mut cfg_a = QemuConfig::vhost_user("mig-src", mvh_a.socket(), 1);
    cfg_a.extra_args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_a.display()),
    ]);
    let mut cfg_b = QemuConfig::vhost_user("mig-dst", mvh_b.socket(), 1);
    cfg_b.extra_args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_b.display()),
        "-incoming".into(),
        format!("unix:{}", mig.display()),
    ]);
    let compare = std::env::var_os("MACVHOST_MIGRATION_COMPARE").is_some_and(|v| v != "0");
    if compare {
        cfg_b.extra_args.push("-S".into());
    }

    let src = Qemu::spawn(&cfg_a).unwrap_or_else(|e| panic!("{e}"));
    src.wait_ready(secs(300))
        .unwrap_or_else(|e| panic!("{e}\n--- macvhost A ---\n{}", mvh_a.log_text()));
    let dst = Qemu::spawn(&cfg_b).unwrap_or_else(|e| panic!("{e}"));
    let mut qa = guest::Qmp::connect(&qmp_a, secs(30)).expect("QMP of the source");
    let mut qb = guest::Qmp::connect(&qmp_b, secs(30)).expect("QMP of the destination");

    // Gratuitous ARPs from the guest (GUEST_ANNOUNCE), as the peer sees them.
    let cap_path = dir.path().join("arp.txt");
    let mut capture = ns
        .command("tcpdump")
        .args(["-i", "mvh-peer", "-n", "-l", "-e"])
        .args(["arp and ether src", guest::GUEST_MAC])
        .stdout(std::fs::File::create(&cap_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump");

    // Pings every 200 ms and a TCP stream into the guest, both running through the migration.
    src.exec_ok("ping -i 0.2 $MVH_PEER > /tmp/ping.txt 2>&1 &", secs(60));
    std::thread::sleep(secs(2));

    // A migration that is cancelled: QEMU turns logging on (SET_LOG_BASE, LOG_ALL) and off.
    qa.execute(
        "migrate-set-parameters",
        serde_json::json!({ "max-bandwidth": 1 << 20 }),
    )
    .unwrap();
    qa.execute(
        "migrate",
        serde_json::json!({ "uri": "exec:cat > /dev/null" }),
    )
    .unwrap();
    std::thread::sleep(secs(2));
    qa.execute("migrate_cancel", serde_json::json!({})).unwrap();
    let t = Instant::now();
    loop {
        let st = qa.execute("query-migrate", serde_json::json!({})).unwrap();
        if st["status"] == "cancelled" {
            break;
        }
        assert!(t.elapsed() < secs(60), "migration not cancelled: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log_a = mvh_a.log_text();
    assert!(
        log_a.contains("frontend set the dirty-page log")
            && log_a.contains("dirty-page logging started")
            && log_a.contains("dirty-page logging stopped"),
        "the cancelled migration did not start and stop logging:\n{log_a}"
    );

    // The real one, while the peer streams into the guest (RX buffers written throughout).
    // With MACVHOST_MIGRATION_STREAM=1 the peer also streams 96 MiB into the guest through the
    // migration (RX buffers written all along): see docs/testing.md for what that shows.
    let stream = std::env::var_os("MACVHOST_MIGRATION_STREAM").is_some_and(|v| v != "0");
    let sender = stream.then(|| guest::stream_into_guest(&ns, &src, STREAM));
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let info = migrate_and_wait(&mut qa, &mig);
    if compare {
        let differ = pages_left_behind(&mut qa, &mut qb, dir.path());
        println!(
            "RAM compare: {} pages differ between source and destination: {:x?}",
            differ.len(),
            &differ[..differ.len().min(64)]
        );
        qb.execute("cont", serde_json::json!({})).unwrap();
    }
    // Switchover: the destination's macvtap takes over the guest's MAC.
    ns.ip(&["link", "set", "mvt0", "down"]);
    ns.ip(&["link", "set", "mvt1", "address", guest::GUEST_MAC]);
    ns.ip(&["link", "set", "mvt1", "up"]);
    let switched = started.elapsed();
    let status = qb.execute("query-status", serde_json::json!({})).unwrap();
    assert_eq!(
        status["status"], "running",
        "destination not running: {status}"
    );
    println!(
        "migration: {:.2} s total, QEMU downtime {} ms, macvtap swapped {:.2} s after start; {}",
        info["total-time"].as_u64().unwrap_or(0) as f64 / 1000.0,
        info["downtime"],
        switched.as_secs_f64(),
        info["ram"]
    );
    src.kill();

    dst.adopt_migrated_prompt();
    let oops = |q: &Qemu| {
        let t = q.log_text();
        assert!(
            !t.contains("BUG:") && !t.contains("Oops"),
            "the guest kernel crashed:\n{t}"
        );
    };
    // Let pings run a while on the destination, then stop them and read the summary.
    std::thread::sleep(secs(6));
    let o = dst.exec_ok(
        "kill -INT $(pidof ping); sleep 1; cat /tmp/ping.txt",
        secs(120),
    );
    oops(&dst);
    let (sent, received) =
        ping_summary(&o.output).unwrap_or_else(|| panic!("no ping summary:\n{}", o.output));
    let seqs = ping_seqs(&o.output);
    let lost: Vec<u32> = (0..sent).filter(|s| !seqs.contains(s)).collect();
    println!("pings: {sent} sent, {received} answered, lost seq {lost:?}");
    assert!(sent >= 30, "too few pings ran: {sent}");
    assert!(
        seqs.iter().any(|&s| s + 10 >= sent),
        "pings did not resume after migration:\n{}",
        o.output
    );
    assert!(
        sent - received <= 10,
        "lost {} of {sent} pings across the migration",
        sent - received
    );

    // The TCP stream written into RX buffers during migration arrived intact. (Its result
    // line lands on whichever QEMU ran the guest when it finished.)
    if let Some(sender) = sender {
        let mut results = src.results();
        if !results.contains_key("stream_sha") {
            dst.wait_for_line("MVH-RESULT stream_sha", secs(180))
                .unwrap_or_else(|e| panic!("{e}\n--- destination guest ---\n{}", dst.log_text()));
            results = dst.results();
        }
        let sent_stream = sender.join().unwrap().unwrap();
        println!(
            "stream: {} B in {:.1} s, finished {} the switchover",
            sent_stream.bytes,
            sent_stream.elapsed.as_secs_f64(),
            if src.results().contains_key("stream_sha") {
                "before"
            } else {
                "after"
            }
        );
        assert_eq!(results["stream_bytes"], STREAM.to_string());
        assert_eq!(
            results["stream_sha"], sent_stream.sha256,
            "stream corrupted across migration"
        );
    }

    // Traffic after the switchover went through macvhost B.
    let b: u64 = mvh_b
        .stats()
        .iter()
        .map(|q| q["rx_frames"] + q["tx_frames"])
        .sum();
    assert!(b > 10, "macvhost B carried {b} frames");

    // GUEST_ANNOUNCE: the guest announced itself after the migration.
    std::thread::sleep(Duration::from_millis(500));
    let _ = capture.kill();
    let _ = capture.wait();
    let arp = std::fs::read_to_string(&cap_path).unwrap_or_default();
    let announce = format!("who-has {} tell {}", guest::GUEST_IP, guest::GUEST_IP);
    let garps = arp.lines().filter(|l| l.contains(&announce)).count();
    println!("gratuitous ARPs from the guest: {garps}\n{arp}");
    assert!(garps >= 1, "no gratuitous ARP after migration:\n{arp}");
    let _ = qb;
}

/// A control experiment on QEMU itself, not on macvhost: the stream migration of
/// `guest_migrates_between_two_macvhosts_while_pinging_the_peer` (MACVHOST_MIGRATION_STREAM=1)
/// on QEMU's own tap backend, with the destination held paused (`-S`) so that both RAMs can be
/// saved and compared page by page after completion. With TCG, QEMU 7.2 leaves pages behind
/// here too (see docs/testing.md): the heavy-RX migration failures are not macvhost's.
/// Only with MACVHOST_MIGRATION_STREAM=1; asserts that the migration completes and prints how
/// many pages differ.
#[test]
fn qemu_tap_backend_stream_migration_control_compares_ram() {
    let experiment = Need::OptIn("MACVHOST_MIGRATION_STREAM");
    require!(&[
        experiment,
        Need::Root,
        Need::Tool("ip"),
        guest::QEMU,
        guest::IMAGE
    ]);
    let _lock = one_guest_at_a_time();
    let ns = NetNs::new("tapc");
    guest::add_veth_peer(&ns);
    ns.add_bridge("br0");
    for t in ["mtap0", "mtap1"] {
        ns.add_tap(t, false);
        ns.ip(&["link", "set", t, "master", "br0"]);
    }
    ns.ip(&["link", "set", "mvh-lower", "master", "br0"]);
    ns.set_up(&["mvh-peer", "mvh-lower", "br0", "mtap0", "mtap1"]);
    let dir = tempfile::tempdir().unwrap();
    let qmp_a = dir.path().join("qmp-a.sock");
    let qmp_b = dir.path().join("qmp-b.sock");
    let mig = dir.path().join("migrate.sock");
    let mut cfg_a = QemuConfig::tap("tapc-src", ns.name(), "mtap0", 1);
    cfg_a.extra_args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_a.display()),
    ]);
    let mut cfg_b = QemuConfig::tap("tapc-dst", ns.name(), "mtap1", 1);
    cfg_b.extra_args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_b.display()),
        "-incoming".into(),
        format!("unix:{}", mig.display()),
        "-S".into(),
    ]);
    let src = Qemu::spawn(&cfg_a).unwrap_or_else(|e| panic!("{e}"));
    src.wait_ready(secs(300)).unwrap();
    let dst = Qemu::spawn(&cfg_b).unwrap_or_else(|e| panic!("{e}"));
    let mut qa = guest::Qmp::connect(&qmp_a, secs(30)).expect("QMP a");
    let mut qb = guest::Qmp::connect(&qmp_b, secs(30)).expect("QMP b");
    let _sender = guest::stream_into_guest(&ns, &src, 96 << 20);
    std::thread::sleep(Duration::from_millis(500));
    let info = migrate_and_wait(&mut qa, &mig);
    let differ = pages_left_behind(&mut qa, &mut qb, dir.path());
    println!(
        "QEMU tap backend, stream migration: downtime {} ms; {} pages differ between source \
         and destination: {:x?}",
        info["downtime"],
        differ.len(),
        &differ[..differ.len().min(64)]
    );
    src.kill();
    drop(dst);
}

/// The macvtap's `IFF_PROMISC` and `IFF_ALLMULTI` bits (from `/sys/class/net/mvt0/flags`).
fn macvtap_promisc_allmulti(s: &Setup) -> (bool, bool) {
    let out =
        s.ns.command("cat")
            .arg("/sys/class/net/mvt0/flags")
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let flags = u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap();
    (flags & 0x100 != 0, flags & 0x200 != 0)
}

/// Gives the guest a static `fd00::2/64` and an address with a random interface id (neither
/// derived from its MAC), then the peer — which the guest has not talked to — pings each.
/// Returns the replies per address (of 3).
fn peer_pings_non_eui64_guest_addresses(s: &Setup) -> Vec<u32> {
    let addrs = ["fd00::2", "fd00::9e3a:51c7:b2d4:6f18"];
    s.ns.ip(&[
        "-6",
        "addr",
        "add",
        "fd00::1/64",
        "dev",
        "mvh-peer",
        "nodad",
    ]);
    let mut script = String::new();
    for a in addrs {
        script.push_str(&format!("ip -6 addr add {a}/64 dev $MVH_IFACE; "));
    }
    // The kernel sends its MLD reports for the new solicited-node groups at once; duplicate
    // address detection then takes a second (busybox's ip has no `nodad`).
    script.push_str("sleep 3; ip -6 addr show dev $MVH_IFACE");
    let o = s.vm.exec_ok(&script, secs(60));
    for a in addrs {
        assert!(o.output.contains(a), "{a} not configured: {}", o.output);
    }
    addrs
        .iter()
        .map(|a| {
            let out =
                s.ns.command("ping")
                    .args(["-6", "-c", "3", "-W", "2", "-i", "0.5", a])
                    .output()
                    .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let rx = ping_summary(&text).map_or(0, |(_, rx)| rx);
            println!("peer -> {a}: {rx}/3 replies");
            rx
        })
        .collect()
}

#[test]
fn guest_ipv6_addresses_not_from_its_mac_answer_a_peer_that_pings_first() {
    require!(GUEST);
    let s = setup("l2v6", 1, false);
    let replies = peer_pings_non_eui64_guest_addresses(&s);
    assert_eq!(replies, vec![3, 3], "replies per address");
    assert_eq!(
        macvtap_promisc_allmulti(&s),
        (false, false),
        "the groups were added one by one, not by opening the macvtap up"
    );
    let dev = s.mvh.device_stats();
    assert!(dev["mcast_joins"] >= 2, "{dev:?}");
    assert!(dev["mcast_groups"] >= 2, "{dev:?}");
}

#[test]
fn with_rx_filter_strict_the_same_ipv6_pings_go_unanswered() {
    require!(GUEST);
    // The control for the test above: the only difference is the filter mode.
    let s = setup_with("l2v6s", 1, false, &["--rx-filter", "strict"]);
    let replies = peer_pings_non_eui64_guest_addresses(&s);
    assert_eq!(replies, vec![0, 0], "replies per address");
    assert_eq!(s.mvh.device_stats()["mcast_joins"], 0);
}

#[test]
fn the_host_reaches_its_guest_through_a_macvlan_sibling_not_through_the_parent() {
    require!(GUEST);
    let s = setup("l2host", 1, false);
    let ping_from = |src: &str| {
        let out =
            s.ns.command("ping")
                .args([
                    "-c",
                    "3",
                    "-W",
                    "2",
                    "-i",
                    "0.5",
                    "-I",
                    src,
                    guest::GUEST_IP,
                ])
                .output()
                .unwrap();
        ping_summary(&String::from_utf8_lossy(&out.stdout)).map_or(0, |(_, rx)| rx)
    };
    // The host's own address on the macvtap's parent: macvlan never delivers between the
    // parent and its macvlans, so this is what does not work.
    s.ns.ip(&["addr", "add", "10.199.0.3/24", "dev", "mvh-lower"]);
    s.ns.ip(&["link", "set", "mvh-lower", "up"]);
    let via_parent = ping_from("mvh-lower");
    s.ns.ip(&["addr", "del", "10.199.0.3/24", "dev", "mvh-lower"]);
    // The documented way: a macvlan sibling in bridge mode carries the host's address.
    s.ns.ip(&[
        "link",
        "add",
        "link",
        "mvh-lower",
        "name",
        "mvh-host",
        "type",
        "macvlan",
        "mode",
        "bridge",
    ]);
    s.ns.ip(&["addr", "add", "10.199.0.4/24", "dev", "mvh-host"]);
    s.ns.ip(&["link", "set", "mvh-host", "up"]);
    let via_sibling = ping_from("mvh-host");
    println!("host -> guest: via the parent {via_parent}/3, via a macvlan sibling {via_sibling}/3");
    assert_eq!(via_parent, 0);
    assert_eq!(via_sibling, 3);
}

/// The link-layer multicast addresses in `ip maddr show dev mvt0`.
fn macvtap_maddrs(s: &Setup) -> Vec<String> {
    s.ns.maddrs("mvt0")
}

fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<(Duration, T)> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(v) = f() {
            return Some((t.elapsed(), v));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn guest_joins_an_ipv4_group_receives_it_and_the_group_leaves_the_macvtap_with_it() {
    require!(GUEST);
    let s = setup("l2mc", 1, false);
    let group_mac = "01:00:5e:01:02:03";
    assert!(!macvtap_maddrs(&s).contains(&group_mac.to_string()));
    let o = s.vm.exec_ok(
        "mvh-mcast recv $MVH_IFACE 239.1.2.3 5000 12 > /tmp/r.out 2>&1 &\n\
         i=0; until grep -q joined /tmp/r.out || [ $i -ge 200 ]; do sleep 0.05; i=$((i+1)); done\n\
         cat /tmp/r.out",
        secs(60),
    );
    assert!(o.output.contains("joined 239.1.2.3"), "{}", o.output);
    let (t_join, _) = wait_for(secs(10), || {
        macvtap_maddrs(&s)
            .contains(&group_mac.to_string())
            .then_some(())
    })
    .expect("the group's MAC never reached the macvtap");
    // The peer sends to the group (a route for it out of the peer's interface first).
    s.ns.ip(&["route", "add", "224.0.0.0/4", "dev", "mvh-peer"]);
    for _ in 0..10 {
        let st =
            s.ns.command("bash")
                .args(["-c", "echo x > /dev/udp/239.1.2.3/5000"])
                .status()
                .unwrap();
        assert!(st.success());
    }
    // The receiver counts until its time is up, then leaves.
    let o = s.vm.exec_ok(
        "i=0; until grep -q '^left' /tmp/r.out || [ $i -ge 400 ]; do sleep 0.05; i=$((i+1)); done\n\
         cat /tmp/r.out",
        secs(60),
    );
    let count: u32 = o
        .output
        .lines()
        .find_map(|l| l.strip_prefix("count="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count: {}", o.output));
    assert!(o.output.contains("left 239.1.2.3"), "{}", o.output);
    let (t_leave, _) = wait_for(secs(10), || {
        (!macvtap_maddrs(&s).contains(&group_mac.to_string())).then_some(())
    })
    .expect("the group's MAC stayed on the macvtap after the leave");
    println!(
        "join on the macvtap after {:.2} s; {count}/10 datagrams received; gone {:.2} s after \
         the leave was printed",
        t_join.as_secs_f64(),
        t_leave.as_secs_f64()
    );
    assert_eq!(count, 10);
    assert_eq!(macvtap_promisc_allmulti(&s), (false, false));
    let dev = s.mvh.device_stats();
    assert!(
        dev["mcast_joins"] >= 1 && dev["mcast_leaves"] >= 1,
        "{dev:?}"
    );
}

#[test]
fn ten_thousand_joins_fill_the_cap_turn_allmulticast_on_and_all_clear_at_disconnect() {
    require!(GUEST);
    let cap = 64;
    let mut s = setup_with("l2cap", 1, false, &["--max-groups", &cap.to_string()]);
    let base = macvtap_maddrs(&s);
    let o = s.vm.exec_ok(
        "mvh-mcast join-many $MVH_IFACE 239.20.0.1 10000 600 > /tmp/j.out 2>&1 &\n\
         echo $! > /tmp/j.pid\n\
         i=0; until grep -q '^joined=' /tmp/j.out || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done\n\
         cat /tmp/j.out",
        secs(180),
    );
    assert!(o.output.contains("joined=10000"), "{}", o.output);
    let (t, _) = wait_for(secs(60), || {
        (s.mvh.device_stats()["mcast_overflows"] >= 1 && macvtap_promisc_allmulti(&s).1)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no overflow: {:?}", s.mvh.device_stats()));
    let dev = s.mvh.device_stats();
    let added = macvtap_maddrs(&s).len() - base.len();
    println!(
        "10000 joins: allmulticast {:.2} s after the joins were printed; {added} group MACs \
         on the macvtap (cap {cap}); {dev:?}",
        t.as_secs_f64()
    );
    assert!(added <= cap, "{added} > {cap}");
    assert_eq!(dev["mcast_groups"], cap as u64);
    assert!(dev["mcast_refused_joins"] > 0);
    // Counted and said once, not once per refused join.
    let warned = format!("the guest joined more than --max-groups {cap} multicast groups");
    let log = s.mvh.log_text();
    assert_eq!(log.matches(&warned).count(), 1, "{log}");
    // Still serving: the guest answers the peer.
    let out =
        s.ns.command("ping")
            .args(["-c", "3", "-W", "2", "-i", "0.5", guest::GUEST_IP])
            .output()
            .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(" 3 received"));
    // The frontend goes away: everything macvhost added goes with it.
    s.vm.kill();
    let cleared = wait_for(secs(20), || {
        (macvtap_maddrs(&s) == base && !macvtap_promisc_allmulti(&s).1).then_some(())
    });
    assert!(
        cleared.is_some(),
        "left behind: {:?} allmulti {}",
        macvtap_maddrs(&s),
        macvtap_promisc_allmulti(&s).1
    );
    let log = s.mvh.log_text();
    assert_eq!(log.matches(&warned).count(), 1, "{log}");
    let ended = "the frontend disconnected: the macvtap leaves allmulticast";
    assert_eq!(log.matches(ended).count(), 1, "{log}");
    s.mvh.shutdown_clean();
}
