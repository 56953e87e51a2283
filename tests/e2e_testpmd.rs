//! End-to-end tests: macvhost between a host macvtap/tap (inside a private network namespace)
//! and DPDK testpmd's `net_virtio_user` as the vhost-user frontend, forwarding in `macswap` mode.
//! Frames are generated and checked byte for byte by an AF_PACKET peer (see tests/common).
//!
//! Needs root, `ip` and `dpdk-testpmd`; otherwise every test skips through `require!` (and fails
//! with `MACVHOST_E2E_REQUIRED=1`).
//! Run them one at a time: `cargo test --release --all-targets -- --test-threads=1`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// What one macvtap run measured.
struct Outcome {
    report: Report,
    ready: Duration,
    peer: IfaceStats,
    macvtap: IfaceStats,
    pmd: TestpmdStats,
}

/// netns + veth + macvtap (from `make_topo`) → macvhost `--macvtap mvt0 --queues N` → testpmd
/// macswap; waits for the first echo, runs `traffic`, stops testpmd, and shuts macvhost down
/// (asserting exit code 0). Asserts the run was lossless and byte-exact.
fn macvtap_run(
    queues: u16,
    traffic: &Traffic,
    make_topo: impl FnOnce(&NetNs) -> MacvtapTopo,
) -> Outcome {
    let (t0, dir, ns) = start("e2e");
    let topo = make_topo(&ns);
    let q = queues.to_string();
    let mut mvh = Daemon::spawn(
        &ns,
        dir.path(),
        &["--macvtap", topo.macvtap, "--queues", &q],
    );
    let mut pmd = Testpmd::spawn(
        mvh.socket(),
        dir.path(),
        &TestpmdConfig::macswap(queues, topo.macvtap_mac),
    );
    let peer = Peer::on_macvtap(&ns, &topo);
    let ready = peer.wait_for_echo(traffic.kind, READY_TIMEOUT, || {
        mvh.check_alive();
        pmd.check_alive();
    });
    let (p0, m0) = (ns.stats(topo.peer), ns.stats(topo.macvtap));
    let report = peer.roundtrip(traffic);
    let (p1, m1) = (ns.stats(topo.peer), ns.stats(topo.macvtap));
    report.assert_lossless_byte_exact();
    let pmd_stats = pmd.stop();
    mvh.shutdown_clean();
    let out = Outcome {
        report,
        ready,
        peer: p1.since(&p0),
        macvtap: m1.since(&m0),
        pmd: pmd_stats,
    };
    let sent = u64::from(out.report.sent);
    assert!(
        out.peer.tx_packets >= sent,
        "peer0 sent too little: {}",
        out.peer
    );
    assert!(
        out.peer.rx_packets >= sent,
        "peer0 got too little: {}",
        out.peer
    );
    assert!(out.macvtap.rx_packets >= sent, "mvt0 rx: {}", out.macvtap);
    assert!(out.macvtap.tx_packets >= sent, "mvt0 tx: {}", out.macvtap);
    assert!(
        out.pmd.rx_packets >= sent && out.pmd.tx_packets >= sent,
        "{:?}",
        out.pmd
    );
    println!(
        "{}: queues {queues}, first echo after {:.2?}; [{}]; peer0 [{}]; mvt0 [{}]; \
         testpmd rx {} tx {} per-queue {:?}; total {:.2?}",
        test_name(),
        out.ready,
        out.report,
        out.peer,
        out.macvtap,
        out.pmd.rx_packets,
        out.pmd.tx_packets,
        out.pmd.per_queue,
        t0.elapsed()
    );
    out
}

#[test]
fn macvtap_macswap_roundtrip_is_byte_exact() {
    require!(E2E);
    macvtap_run(1, &Traffic::raw(2000), |ns| {
        MacvtapTopo::create(ns, "bridge")
    });
}

/// macvhost creates `tap0` inside the namespace (`--tap tap0`). The tap's own netdev is the
/// peer: a frame sent with AF_PACKET on `tap0` is transmitted by the netdev, i.e. queued to the
/// tap fd that macvhost reads (guest RX); a frame macvhost writes to the fd (guest TX) is
/// received by the netdev, where the same AF_PACKET socket sees it. No bridge needed.
#[test]
fn tap_macswap_roundtrip_is_byte_exact() {
    require!(E2E);
    let (t0, dir, ns) = start("e2e");
    let mut mvh = Daemon::spawn(&ns, dir.path(), &["--tap", "tap0", "--queues", "1"]);
    let mut pmd = Testpmd::spawn(
        mvh.socket(),
        dir.path(),
        &TestpmdConfig::macswap(1, GUEST_MAC),
    );
    let tap = TapTopo::attach(&ns, "tap0", Duration::from_secs(15));
    let peer = Peer::on_tap(&ns, &tap);
    let ready = peer.wait_for_echo(FrameKind::Raw, READY_TIMEOUT, || {
        mvh.check_alive();
        pmd.check_alive();
    });
    let before = ns.stats(&tap.tap);
    let report = peer.roundtrip(&Traffic::raw(2000));
    let d = ns.stats(&tap.tap).since(&before);
    report.assert_lossless_byte_exact();
    let st = pmd.stop();
    mvh.shutdown_clean();
    let sent = u64::from(report.sent);
    // The tap netdev transmits what we send (to macvhost) and receives what macvhost writes.
    assert!(d.tx_packets >= sent && d.rx_packets >= sent, "tap0 {d}");
    assert!(st.rx_packets >= sent && st.tx_packets >= sent, "{st:?}");
    println!(
        "{}: first echo after {ready:.2?}; [{report}]; tap0 [{d}]; testpmd rx {} tx {}; \
         total {:.2?}",
        test_name(),
        st.rx_packets,
        st.tx_packets,
        t0.elapsed()
    );
}

/// macvtap picks the queue for a received frame from the skb flow hash (`skb_get_hash` →
/// `taps[hash % numvtaps]`), which covers the IPv4 addresses and UDP ports, so 64 UDP source
/// ports spread over all 4 queues (a single raw ethertype would land on one queue). testpmd
/// macswaps each frame back on the queue it arrived on, so every TX queue carries traffic too.
/// Per-queue numbers come from testpmd's per-stream forward statistics (stream = RX queue q →
/// TX queue q), printed when testpmd stops.
#[test]
fn macvtap_four_queues_all_carry_traffic() {
    require!(E2E);
    let out = macvtap_run(4, &Traffic::udp(8000, 64), |ns| {
        MacvtapTopo::create(ns, "bridge")
    });
    assert_eq!(out.report.per_flow.len(), 64, "flows that came back");
    for q in 0..4u16 {
        let (rx, tx, _) = out.pmd.per_queue.get(&q).copied().unwrap_or_default();
        assert!(
            rx > 0 && tx > 0,
            "queue pair {q} carried no traffic: per-queue {:?}",
            out.pmd.per_queue
        );
    }
}

#[test]
fn second_frontend_reconnects_after_first_exits() {
    require!(E2E);
    let (t0, dir, ns) = start("e2e");
    let topo = MacvtapTopo::create(&ns, "bridge");
    let mut mvh = Daemon::spawn(
        &ns,
        dir.path(),
        &["--macvtap", topo.macvtap, "--queues", "1"],
    );
    let pid = mvh.pid();
    let peer = Peer::on_macvtap(&ns, &topo);
    let mut rounds = Vec::new();
    for round in 1..=2 {
        let mut pmd = Testpmd::spawn(
            mvh.socket(),
            dir.path(),
            &TestpmdConfig::macswap(1, topo.macvtap_mac),
        );
        let ready = peer.wait_for_echo(FrameKind::Raw, READY_TIMEOUT, || {
            mvh.check_alive();
            pmd.check_alive();
        });
        let report = peer.roundtrip(&Traffic::raw(1000));
        report.assert_lossless_byte_exact();
        let st = pmd.stop();
        // The frontend is gone; macvhost must still be serving the same socket.
        thread_sleep_ms(200);
        mvh.check_alive();
        assert_eq!(mvh.pid(), pid, "macvhost was restarted");
        assert!(
            mvh.socket().exists(),
            "socket gone after frontend {round} left"
        );
        rounds.push(format!(
            "frontend {round}: echo after {ready:.2?}, [{report}], testpmd rx {}",
            st.rx_packets
        ));
    }
    mvh.shutdown_clean();
    println!(
        "{}: {}; total {:.2?}",
        test_name(),
        rounds.join("; "),
        t0.elapsed()
    );
}

/// `/dev` is shared by all network namespaces but ifindexes are not, so `/dev/tap<ifindex>`
/// can be a leftover, or another namespace's macvtap. Here it is `c 1 3` (/dev/null), made
/// before the macvtap exists (so devtmpfs does not replace it). macvhost must still reach the
/// right macvtap (e.g. via the major:minor in sysfs) and frames must round-trip.
#[test]
fn stale_dev_tap_node_is_not_used() {
    require!(E2E);
    let ifindex = free_ifindex();
    let node_path = format!("/dev/tap{ifindex}");
    let node = DevNodeGuard::create_char(Path::new(&node_path), 1, 3);
    let mut chardev = (0, 0);
    macvtap_run(1, &Traffic::raw(1000), |ns| {
        let topo = MacvtapTopo::create_with_ifindex(ns, "bridge", ifindex);
        chardev = topo.chardev(ns);
        assert_ne!(chardev, (1, 3));
        assert!(
            node.is_unchanged(),
            "devtmpfs replaced the stale node before the test started"
        );
        topo
    });
    let now = dev_node(Path::new(&node_path));
    let unchanged = node.is_unchanged();
    let replaced = now == Some((true, chardev.0, chardev.1));
    println!(
        "{}: {node_path} was c 1:3, macvtap was {}:{}, now {now:?} ({})",
        test_name(),
        chardev.0,
        chardev.1,
        if unchanged {
            "left unchanged"
        } else if replaced {
            "replaced by the right numbers"
        } else {
            "CHANGED to something else"
        }
    );
    assert!(
        unchanged || replaced || now.is_none(),
        "{node_path} is now {now:?}"
    );
    if replaced {
        // macvhost rewrote the node for our (now deleted) macvtap: stale garbage of this test.
        let _ = std::fs::remove_file(&node_path);
    }
    // `node` (still c 1:3 if unchanged) is removed when it drops.
}

fn thread_sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}
