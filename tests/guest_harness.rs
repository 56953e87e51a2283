//! Validates the real-guest test infrastructure (tests/guest/ and
//! tests/support/guest.rs) without macvhost: the NIC is backed by QEMU's own
//! userspace virtio-net (tap backend, vhost=off) on a tap in a network
//! namespace made for the test.
//!
//! Timings are printed (run with `--nocapture`) and written to
//! `target/guest/logs/timings-*.txt`.

#[path = "support/guest.rs"]
mod guest;

use guest::{require, run_ok, Need, NetNs, Qemu, QemuConfig, GUEST, IMAGE, QEMU};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest::{one_at_a_time as one_guest_at_a_time, secs};

/// A guest test's timings; holds the one-guest-at-a-time lock while it lives.
struct Timings {
    name: &'static str,
    rows: Vec<(String, Duration, String)>,
    _one: std::sync::MutexGuard<'static, ()>,
}

impl Timings {
    fn new(name: &'static str) -> Timings {
        Timings {
            name,
            rows: Vec::new(),
            _one: one_guest_at_a_time(),
        }
    }

    /// The last row, `what` up to now in `vm`'s life, and the file.
    fn finish(mut self, what: &str, vm: &Qemu) {
        self.add(what, vm.uptime(), "");
        self.write();
    }

    fn add(&mut self, what: &str, d: Duration, note: impl Into<String>) {
        let note = note.into();
        println!(
            "timing[{}]: {what}: {:.2} s {note}",
            self.name,
            d.as_secs_f64()
        );
        self.rows.push((what.to_string(), d, note));
    }

    fn write(&self) {
        let mut s = String::new();
        for (w, d, n) in &self.rows {
            s.push_str(&format!("{w:<40} {:>8.2} s  {n}\n", d.as_secs_f64()));
        }
        let p = guest::target_dir().join(format!("guest/logs/timings-{}.txt", self.name));
        let _ = std::fs::write(p, s);
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn batch_script_over_fw_cfg() {
    require!(&[QEMU, IMAGE]);
    let mut t = Timings::new("batch");
    let script = r#"
result answer 42
result kernel "$(uname -r)"
result words "two words"
echo "plain output is fine"
exit 3
"#;
    let cfg = QemuConfig::no_net("batch").with_script(script);
    let vm = Qemu::spawn(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let ready = vm.wait_ready(secs(300)).unwrap_or_else(|e| panic!("{e}"));
    t.add(
        "spawn to MVH-READY",
        ready.wall,
        format!("(guest uptime {:.2} s)", ready.guest_uptime),
    );
    let rc = vm.wait_done(secs(120)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rc, 3, "script exit status");
    let res = vm.results();
    assert_eq!(res.get("answer").map(String::as_str), Some("42"));
    assert_eq!(res.get("words").map(String::as_str), Some("two words"));
    assert!(res.get("kernel").is_some_and(|k| !k.is_empty()));
    let st = vm
        .wait_exit(secs(120))
        .expect("guest did not power off after MVH-DONE");
    assert!(st.success(), "qemu exit status {st}");
    t.finish("spawn to QEMU exit", &vm);
}

/// The macvtap topology helper (used by the macvhost end-to-end tests).
#[test]
fn netns_macvtap_topology() {
    require!(&[Need::Root, Need::Tool("ip")]);
    let ns = NetNs::new("mvt");
    guest::add_veth_macvtap(&ns);
    let link = ns.ip(&["-o", "link", "show", "mvt0"]);
    assert!(link.contains(guest::GUEST_MAC), "{link}");
    assert!(link.contains("mvt0@mvh-lower"), "{link}");
    let (maj, min) = ns.macvtap_devno("mvt0");
    assert!(maj > 0, "{maj}:{min}");
    // A socket bound in the namespace sees the peer address.
    let l = ns
        .tcp_listener(format!("{}:0", guest::PEER_IP).parse().unwrap())
        .expect("bind inside the namespace");
    assert_eq!(l.local_addr().unwrap().ip().to_string(), guest::PEER_IP);
}

/// A guest without a NIC, booted to its prompt (panics with the reason if it does not boot).
fn booted_without_net(name: &str) -> Qemu {
    let vm = Qemu::spawn(&QemuConfig::no_net(name)).unwrap_or_else(|e| panic!("{e}"));
    vm.wait_ready(secs(300)).unwrap_or_else(|e| panic!("{e}"));
    vm
}

#[test]
fn interactive_commands_over_serial() {
    require!(&[QEMU, IMAGE]);
    let _one = one_guest_at_a_time();
    let vm = booted_without_net("interactive");

    let o = vm.exec_ok("echo hello; result a 1", secs(120));
    assert_eq!(o.output.trim(), "hello\nMVH-RESULT a=1");
    assert_eq!(o.result("a"), Some("1"));

    // Multi-line scripts, quoting, stderr, no trailing newline, exit codes.
    let o = vm
        .exec(
            "x='it'\"'\"'s'\nfor i in 1 2 3; do\n  printf '%s ' \"$x-$i\"\ndone\necho oops >&2\nprintf 'no-newline'\nfalse",
            secs(120),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.rc, 1);
    assert!(o.output.contains("it's-1 it's-2 it's-3"), "{}", o.output);
    assert!(o.output.contains("oops"), "{}", o.output);
    assert!(o.output.ends_with("no-newline"), "{:?}", o.output);

    let o = vm
        .exec("exit 7", secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.rc, 7);

    // State persists across commands through the filesystem.
    vm.exec_ok("echo persisted > /tmp/state", secs(120));
    let o = vm.exec_ok("cat /tmp/state", secs(120));
    assert_eq!(o.output.trim(), "persisted");

    // A long script (> 4 KiB, beyond the tty's canonical line limit).
    let long = format!("v={}\necho ${{#v}}", "y".repeat(6000));
    let o = vm.exec_ok(&long, secs(180));
    assert_eq!(o.output.trim(), "6000");

    assert!(vm.results().contains_key("a"));
    let st = vm.shutdown(secs(120)).expect("guest did not power off");
    assert!(st.success(), "qemu exit status {st}");
}

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(|v| v.trim())
}

#[test]
fn tap_backend_end_to_end() {
    require!(GUEST);
    require!(&[Need::Tool("iperf3")]);
    let mut t = Timings::new("tap");
    const BLOB: usize = 64 << 20;

    let ns = NetNs::new("tap");
    ns.add_tap("tap0", true);
    ns.add_addr("tap0", guest::PEER_CIDR);
    ns.set_up(&["tap0"]);
    let cfg = QemuConfig::tap("tap-e2e", ns.name(), "tap0", 2);
    let vm = Qemu::spawn(&cfg).unwrap_or_else(|e| panic!("{e}"));
    println!("qemu: {}", vm.command_string());

    // Boot; NIC up with the requested MAC.
    let ready = vm.wait_ready(secs(300)).unwrap_or_else(|e| panic!("{e}"));
    t.add(
        "boot: spawn to MVH-READY",
        ready.wall,
        format!("(guest uptime {:.2} s)", ready.guest_uptime),
    );
    assert_eq!(ready.iface, "eth0");
    assert_eq!(ready.mac, guest::GUEST_MAC);
    assert_eq!(ready.link, "up");
    let o = vm.exec_ok(
        "cat /sys/class/net/$MVH_IFACE/address; cat /sys/class/net/$MVH_IFACE/operstate",
        secs(120),
    );
    assert_eq!(o.output.trim(), format!("{}\nup", guest::GUEST_MAC));
    t.add("first command round trip", o.elapsed, "");

    // Offloads negotiated and on.
    let o = vm.exec_ok("ethtool -k $MVH_IFACE", secs(120));
    for k in [
        "rx-checksumming:",
        "tx-checksumming:",
        "tcp-segmentation-offload:",
    ] {
        let v = field(&o.output, k).unwrap_or_else(|| panic!("no {k} in:\n{}", o.output));
        assert!(v.starts_with("on"), "{k} {v}\n{}", o.output);
    }

    // Ping both ways.
    let o = vm.exec_ok("ping -c 3 -W 5 $MVH_PEER", secs(180));
    t.add("ping guest->peer (3 packets)", o.elapsed, "");
    let t0 = Instant::now();
    run_ok(
        ns.command("busybox")
            .args(["ping", "-c", "3", "-W", "5", guest::GUEST_IP]),
    );
    t.add("ping peer->guest (3 packets)", t0.elapsed(), "");

    // 64 MiB host -> guest, sha256 compared.
    let blob = Arc::new(guest::random_blob(BLOB).expect("random data"));
    let listener = ns
        .tcp_listener(format!("{}:5001", guest::PEER_IP).parse().unwrap())
        .expect("listen");
    let sender = guest::serve_blob(listener, blob.clone(), secs(300));
    let o = vm.exec_ok(
        "nc $MVH_PEER 5001 > /tmp/rx && result rx_bytes $(wc -c < /tmp/rx)",
        secs(300),
    );
    let sent = sender.join().unwrap().expect("host sender");
    t.add(
        "64 MiB host->guest (nc, into tmpfs)",
        o.elapsed,
        format!("{:.0} Mbit/s host-side", sent.mbit_per_s()),
    );
    assert_eq!(o.expect_result("rx_bytes"), BLOB.to_string());
    let o = vm.exec_ok("result rx_sha $(sha256 /tmp/rx); rm -f /tmp/rx", secs(300));
    t.add("  guest sha256sum of 64 MiB", o.elapsed, "");
    assert_eq!(
        o.expect_result("rx_sha"),
        sent.sha256,
        "host->guest corrupted"
    );

    // 64 MiB guest -> host, sha256 compared.
    let o = vm.exec_ok(
        &format!(
            "dd if=/dev/urandom of=/tmp/tx bs=1M count={} 2>/dev/null && result tx_sha $(sha256 /tmp/tx)",
            BLOB >> 20
        ),
        secs(300),
    );
    t.add("  guest makes + hashes 64 MiB", o.elapsed, "");
    let tx_sha = o.expect_result("tx_sha").to_string();
    let listener = ns
        .tcp_listener(format!("{}:5002", guest::PEER_IP).parse().unwrap())
        .expect("listen");
    let receiver = guest::receive_sha256(listener, secs(300));
    let o = vm.exec_ok("nc $MVH_PEER 5002 < /tmp/tx; rm -f /tmp/tx", secs(300));
    let got = receiver.join().unwrap().expect("host receiver");
    t.add(
        "64 MiB guest->host (nc, from tmpfs)",
        o.elapsed,
        format!("{:.0} Mbit/s host-side", got.mbit_per_s()),
    );
    assert_eq!(got.bytes, BLOB as u64);
    assert_eq!(got.sha256, tx_sha, "guest->host corrupted");

    // iperf3 both ways (3 s each) against a server in the netns.
    let mut srv = ns.command("iperf3");
    srv.args(["-s", "-B", guest::PEER_IP, "-p", "5201", "--forceflush"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut srv = KillOnDrop(srv.spawn().expect("spawn iperf3 -s"));
    let mut lines = BufReader::new(srv.0.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("Server listening"))),
        "iperf3 server did not start"
    );
    let o = vm.exec_ok(
        "iperf3 -c $MVH_PEER -p 5201 -t 3 -f m | tee /tmp/ip.txt; result tx_mbps $(awk '/receiver/ {print $7}' /tmp/ip.txt)\n\
         iperf3 -c $MVH_PEER -p 5201 -t 3 -f m -R | tee /tmp/ip.txt; result rx_mbps $(awk '/receiver/ {print $7}' /tmp/ip.txt)",
        secs(120),
    );
    t.add(
        "iperf3 3 s each way",
        o.elapsed,
        format!(
            "guest->host {} Mbit/s, host->guest {} Mbit/s",
            o.expect_result("tx_mbps"),
            o.expect_result("rx_mbps")
        ),
    );
    drop(srv);

    // Channels: ethtool -L works, per-queue stats readable.
    let o = vm.exec_ok(
        "ethtool -L $MVH_IFACE combined 1\n\
         result combined_after_1 $(ethtool -l $MVH_IFACE | awk '/Current/ {c=1} c && /Combined/ {print $2}')\n\
         ethtool -L $MVH_IFACE combined 2\n\
         result combined_after_2 $(ethtool -l $MVH_IFACE | awk '/Current/ {c=1} c && /Combined/ {print $2}')\n\
         result combined_max $(ethtool -l $MVH_IFACE | awk '/maximums/ {c=1} /Current/ {c=0} c && /Combined/ {print $2}')",
        secs(180),
    );
    t.add("ethtool -L 1 then 2", o.elapsed, "");
    assert_eq!(o.expect_result("combined_max"), "2");
    assert_eq!(o.expect_result("combined_after_1"), "1");
    assert_eq!(o.expect_result("combined_after_2"), "2");
    // Some traffic on the re-enabled queues, then read the per-queue counters.
    vm.exec_ok("ping -c 2 -W 5 $MVH_PEER", secs(180));
    let o = vm.exec_ok("ethtool -S $MVH_IFACE", secs(120));
    let stats: BTreeMap<&str, u64> = o
        .output
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter_map(|(k, v)| Some((k.trim(), v.trim().parse().ok()?)))
        .collect();
    for q in 0..2 {
        for k in [
            format!("rx_queue_{q}_packets"),
            format!("tx_queue_{q}_packets"),
        ] {
            assert!(stats.contains_key(k.as_str()), "no {k} in:\n{}", o.output);
        }
    }
    let per_queue: Vec<String> = (0..2)
        .map(|q| {
            format!(
                "q{q}: rx {} tx {}",
                stats[format!("rx_queue_{q}_packets").as_str()],
                stats[format!("tx_queue_{q}_packets").as_str()]
            )
        })
        .collect();
    let rx_total: u64 = (0..2)
        .map(|q| stats[format!("rx_queue_{q}_packets").as_str()])
        .sum();
    assert!(rx_total > 0, "no rx packets counted:\n{}", o.output);
    t.add("ethtool -S", o.elapsed, per_queue.join(", "));

    let st = vm.shutdown(secs(120)).expect("guest did not power off");
    assert!(st.success(), "qemu exit status {st}");
    t.finish("total", &vm);
}

/// The vhost-user command line is accepted by QEMU and QEMU opens the
/// vhost-user conversation on the socket (first request GET_FEATURES). No
/// backend is needed for that; the guest never gets to boot.
#[test]
fn vhost_user_command_line_reaches_backend_socket() {
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    require!(&[QEMU, IMAGE]);
    let _one = one_guest_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vhost.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let vm = Qemu::spawn(&QemuConfig::vhost_user("vhost-user-cmdline", &sock, 2))
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + secs(120);
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    vm.wait_exit(Duration::from_millis(20)).is_none(),
                    "QEMU exited: {}",
                    vm.log_text()
                );
                assert!(Instant::now() < deadline, "QEMU never connected");
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(secs(120))).unwrap();
    let mut hdr = [0u8; 12];
    conn.read_exact(&mut hdr).expect("vhost-user header");
    let request = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
    assert_eq!(
        request, 1,
        "first request should be VHOST_USER_GET_FEATURES"
    );
    assert_eq!(flags & 0x3, 1, "vhost-user protocol version 1");
    println!("qemu: {}", vm.command_string());
}

/// The image's IPv4 multicast tool (`mvh-mcast`, built by build-guest.sh) on the guest's
/// loopback: a join shows in `/proc/net/igmp`, a looped-back datagram to the group is counted
/// and one to another group is not, the leave removes the group; then 10,000 distinct groups
/// are joined and left (the L2 tests' cap test needs that many).
#[test]
fn multicast_tool_joins_counts_and_leaves_on_loopback() {
    require!(&[QEMU, IMAGE]);
    let mut t = Timings::new("mcast-tool");
    let vm = booted_without_net("mcast-tool");

    // 239.1.2.3 in /proc/net/igmp: the group's bytes as a little-endian hex word.
    let o = vm.exec_ok(
        "ip link set lo multicast on\n\
         mvh-mcast recv lo 239.1.2.3 5000 3 > /tmp/recv.out 2>&1 &\n\
         i=0; until grep -q joined /tmp/recv.out || [ $i -ge 100 ]; do sleep 0.05; i=$((i+1)); done\n\
         result joined_in_igmp $(grep -c 030201EF /proc/net/igmp)\n\
         mvh-mcast send lo 239.1.2.3 5000 1\n\
         mvh-mcast send lo 239.1.2.4 5000 1\n\
         wait\n\
         cat /tmp/recv.out\n\
         result count $(sed -n 's/^count=//p' /tmp/recv.out)\n\
         result left $(grep -c '^left 239.1.2.3' /tmp/recv.out)\n\
         result after_leave_in_igmp $(grep -c 030201EF /proc/net/igmp)",
        secs(120),
    );
    t.add("join, send 2, count, leave", o.elapsed, "");
    assert_eq!(o.expect_result("joined_in_igmp"), "1", "{}", o.output);
    assert_eq!(
        o.expect_result("count"),
        "1",
        "one datagram to the group, one to another group:\n{}",
        o.output
    );
    assert_eq!(o.expect_result("left"), "1", "{}", o.output);
    assert_eq!(o.expect_result("after_leave_in_igmp"), "0", "{}", o.output);

    // Bad usage is refused with status 2.
    let o = vm
        .exec("mvh-mcast recv lo 10.0.0.1 5000 1", secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.rc, 2, "{}", o.output);

    // 10,000 groups 239.2.0.0..239.2.39.15, held until SIGTERM, then left. Their
    // /proc/net/igmp words end in 02EF.
    let o = vm.exec_ok(
        "mvh-mcast join-many lo 239.2.0.0 10000 600 > /tmp/many.out 2>&1 &\n\
         echo $! > /tmp/many.pid\n\
         i=0; until grep -q joined= /tmp/many.out || [ $i -ge 6000 ]; do sleep 0.05; i=$((i+1)); done\n\
         cat /tmp/many.out\n\
         result joined $(sed -n 's/^joined=\\([0-9]*\\).*/\\1/p' /tmp/many.out)\n\
         result in_igmp $(grep -cE '^[[:space:]]+[0-9A-F]{4}02EF' /proc/net/igmp)\n\
         result limit $(cat /proc/sys/net/ipv4/igmp_max_memberships)",
        secs(600),
    );
    t.add("join 10,000 groups", o.elapsed, "");
    assert_eq!(o.expect_result("joined"), "10000", "{}", o.output);
    assert_eq!(o.expect_result("in_igmp"), "10000", "{}", o.output);
    assert!(o.expect_result("limit").parse::<u32>().unwrap() >= 10000);
    let o = vm.exec_ok(
        "kill -TERM $(cat /tmp/many.pid)\n\
         i=0; until grep -q left= /tmp/many.out || [ $i -ge 6000 ]; do sleep 0.05; i=$((i+1)); done\n\
         result left $(sed -n 's/^left=//p' /tmp/many.out)\n\
         result in_igmp $(grep -cE '^[[:space:]]+[0-9A-F]{4}02EF' /proc/net/igmp)",
        secs(600),
    );
    t.add("leave 10,000 groups", o.elapsed, "");
    assert_eq!(o.expect_result("left"), "10000", "{}", o.output);
    assert_eq!(o.expect_result("in_igmp"), "0", "{}", o.output);
    t.write();
}

/// The guest has IPv6 (built into the kernel) and busybox's `ping -6`: an address added with
/// `ip -6 addr add` answers a ping.
#[test]
fn guest_has_ipv6_and_ping6() {
    require!(&[QEMU, IMAGE]);
    let _one = one_guest_at_a_time();
    let vm = booted_without_net("ipv6");
    let o = vm.exec_ok(
        "ip -6 addr add fd00::5/128 dev lo\n\
         ip -6 addr show dev lo\n\
         ping -6 -c 2 -W 5 fd00::5 && result ping6 ok\n\
         ping6 -c 1 -W 5 ::1 && result ping6_applet ok",
        secs(120),
    );
    assert!(o.output.contains("fd00::5/128"), "{}", o.output);
    assert_eq!(o.expect_result("ping6"), "ok", "{}", o.output);
    assert_eq!(o.expect_result("ping6_applet"), "ok", "{}", o.output);
}
