//! Self-tests of the end-to-end harness (tests/common), independent of the macvhost binary:
//! namespace/topology setup and teardown, the AF_PACKET generator/checker over a bare veth pair
//! (including that it notices loss and corruption), and the virtio-user testpmd frontend against
//! DPDK's own vhost-user backend (net_vhost + net_tap) standing in for `macvhost --tap`.
//!
//! When these pass and tests/e2e_testpmd.rs fails, the fault is in macvhost, not the harness.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn harness_netns_veth_macvtap_setup_and_teardown() {
    require!(E2E);
    let t0 = Instant::now();
    let ns = NetNs::quiet("e2e");
    let name = ns.name().to_string();
    let topo = MacvtapTopo::create(&ns, "bridge");
    for iface in [topo.peer, topo.lower, topo.macvtap] {
        let flags = ns.read_file(&format!("/sys/class/net/{iface}/flags"));
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap();
        assert_eq!(flags & 1, 1, "{iface} not up (flags {flags:#x})");
    }
    assert_eq!(ns.mac(topo.peer), PEER_MAC);
    assert_eq!(ns.mac(topo.macvtap), GUEST_MAC);
    let mut ifaces: Vec<String> = ns
        .exec(&["ls", "/sys/class/net"])
        .split_whitespace()
        .map(String::from)
        .collect();
    ifaces.sort();
    assert_eq!(ifaces, ["lo", "lower0", "mvt0", "peer0"]);
    let (maj, min) = topo.chardev(&ns);
    let node = format!("/dev/tap{}", topo.ifindex);
    assert_eq!(
        dev_node(Path::new(&node)),
        Some((true, maj, min)),
        "devtmpfs node {node} for our macvtap"
    );
    let stats = ns.stats(topo.peer);
    drop(ns);
    let list = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        !list.split_whitespace().any(|w| w == name),
        "{name} still listed"
    );
    assert!(
        wait_until(Duration::from_secs(5), || dev_node(Path::new(&node))
            .is_none()),
        "{node} not removed with the macvtap"
    );
    println!(
        "{}: netns {name}, mvt0 ifindex {} dev {maj}:{min}, peer0 [{stats}], torn down, {:.2?}",
        test_name(),
        topo.ifindex,
        t0.elapsed()
    );
}

#[test]
fn harness_generator_checker_over_veth_reflector() {
    require!(E2E);
    let t0 = Instant::now();
    let ns = NetNs::quiet("e2e");
    let topo = MacvtapTopo::create(&ns, "bridge");
    // Clean reflector on the other veth end: everything must come back byte-exact.
    let refl = Reflector::start(&ns, topo.lower);
    let peer = Peer::on_macvtap(&ns, &topo);
    peer.wait_for_echo(FrameKind::Raw, Duration::from_secs(5), || {});
    let before = ns.stats(topo.peer);
    let raw = peer.roundtrip(&Traffic::raw(2000));
    raw.assert_lossless_byte_exact();
    let udp = peer.roundtrip(&Traffic::udp(2000, 64));
    udp.assert_lossless_byte_exact();
    assert_eq!(udp.per_flow.len(), 64);
    let d = ns.stats(topo.peer).since(&before);
    assert!(d.tx_packets >= 4000 && d.rx_packets >= 4000, "peer0 {d}");
    let reflected = refl.stop();

    // Lossy, corrupting reflector: the checker must see it.
    let bad = Reflector::start_with(&ns, topo.lower, |n, f| match n % 100 {
        10 => None, // drop
        20 => {
            let mut v = f.to_vec();
            let last = v.len() - 1;
            v[last] ^= 0x01; // flip one bit in the last byte
            Some(v)
        }
        30 => Some(f[..f.len() - 1].to_vec()), // truncate
        40 => {
            let mut v = f.to_vec();
            v.copy_within(6..12, 0); // no MAC swap: dst = src
            Some(v)
        }
        _ => Some(f.to_vec()),
    });
    let mut t = Traffic::raw(1000);
    t.drain_timeout = Duration::from_millis(500);
    let lossy = peer.roundtrip(&t);
    drop(bad);
    assert_eq!(lossy.sent, 1000);
    assert_eq!(lossy.lost(), 40, "{lossy}");
    // 10 bit flips + 10 truncations + 10 frames without the MAC swap.
    assert_eq!(lossy.mismatched, 30, "{lossy}");
    assert!(lossy.first_mismatch.is_some());
    assert!(!lossy.is_lossless_byte_exact());
    println!(
        "{}: raw [{raw}]; udp [{udp}]; reflected {reflected}; lossy [{lossy}]; peer0 [{d}]; \
         {:.2?}",
        test_name(),
        t0.elapsed()
    );
}

/// The virtio-user frontend + tap-as-peer flow of the real tests, with DPDK's vhost backend
/// standing in for macvhost.
fn standin_roundtrip(queues: u16) {
    let (t0, dir, ns) = start("e2e");
    let sock = dir.path().join("vhost.sock");
    let _standin = spawn_dpdk_vhost_standin(&ns, dir.path(), &sock, "tap0", queues);
    let t_standin = t0.elapsed();
    let mut pmd = Testpmd::spawn(
        &sock,
        dir.path(),
        &TestpmdConfig::macswap(queues, GUEST_MAC),
    );
    let tap = TapTopo::attach(&ns, "tap0", Duration::from_secs(10));
    let peer = Peer::on_tap(&ns, &tap);
    let ready = peer.wait_for_echo(FrameKind::Raw, READY_TIMEOUT, || pmd.check_alive());
    let before = ns.stats(&tap.tap);
    let traffic = if queues == 1 {
        Traffic::raw(2000)
    } else {
        Traffic::udp(4000, 64)
    };
    let rep = peer.roundtrip(&traffic);
    let d = ns.stats(&tap.tap).since(&before);
    rep.assert_lossless_byte_exact();
    let st = pmd.stop();
    assert!(st.rx_packets >= u64::from(rep.sent), "{st:?}");
    assert!(st.tx_packets >= u64::from(rep.sent), "{st:?}");
    if queues > 1 {
        for q in 0..queues {
            let (rx, tx, _) = st.per_queue.get(&q).copied().unwrap_or_default();
            assert!(rx > 0 && tx > 0, "queue {q} idle: {:?}", st.per_queue);
        }
    }
    println!(
        "{}: stand-in up {t_standin:.2?}, echo after {ready:.2?}; [{rep}]; tap0 [{d}]; \
         testpmd rx {} tx {} per-queue {:?}; {:.2?}",
        test_name(),
        st.rx_packets,
        st.tx_packets,
        st.per_queue,
        t0.elapsed()
    );
}

#[test]
fn harness_testpmd_virtio_user_over_dpdk_vhost_standin() {
    require!(E2E);
    standin_roundtrip(1);
}

#[test]
fn harness_testpmd_four_queues_over_dpdk_vhost_standin() {
    require!(E2E);
    standin_roundtrip(4);
}

#[test]
fn harness_testpmd_reconnect_over_dpdk_vhost_standin() {
    require!(E2E);
    let (t0, dir, ns) = start("e2e");
    let sock = dir.path().join("vhost.sock");
    let mut standin = spawn_dpdk_vhost_standin(&ns, dir.path(), &sock, "tap0", 1);
    let standin_pid = standin.pid();
    let mut reports = Vec::new();
    for round in 1..=2 {
        let mut pmd = Testpmd::spawn(&sock, dir.path(), &TestpmdConfig::macswap(1, GUEST_MAC));
        let tap = TapTopo::attach(&ns, "tap0", Duration::from_secs(10));
        let peer = Peer::on_tap(&ns, &tap);
        peer.wait_for_echo(FrameKind::Raw, READY_TIMEOUT, || {
            pmd.check_alive();
            standin.check_alive();
        });
        reports.push(peer.lossless_round(round, 500, pmd));
    }
    standin.check_alive();
    assert_eq!(standin.pid(), standin_pid);
    println!(
        "{}: {}; {:.2?}",
        test_name(),
        reports.join("; "),
        t0.elapsed()
    );
}

/// The macvtap half of the topology with the queue fds opened by the harness itself: frames for
/// the macvtap's MAC reach its queues, writes come back out through `lower0` to `peer0`, UDP
/// flows spread over all queues (flow hash), a single raw ethertype sticks to one queue.
#[test]
fn harness_macvtap_queues_reflect_and_spread_udp_flows() {
    require!(E2E);
    let (t0, dir, ns) = start("e2e");
    let topo = MacvtapTopo::create(&ns, "bridge");
    let peer = Peer::on_macvtap(&ns, &topo);

    let refl = MacvtapReflector::start(&ns, &topo, dir.path(), 4);
    peer.wait_for_echo(FrameKind::Raw, Duration::from_secs(5), || {});
    let m0 = ns.stats(topo.macvtap);
    let raw = peer.roundtrip(&Traffic::raw(2000));
    raw.assert_lossless_byte_exact();
    let raw_q = refl.stop();

    let refl = MacvtapReflector::start(&ns, &topo, dir.path(), 4);
    peer.wait_for_echo(FrameKind::Udp, Duration::from_secs(5), || {});
    let udp = peer.roundtrip(&Traffic::udp(4000, 64));
    udp.assert_lossless_byte_exact();
    let udp_q = refl.stop();
    let m = ns.stats(topo.macvtap).since(&m0);

    assert_eq!(
        raw_q.iter().filter(|&&n| n > 0).count(),
        1,
        "raw frames should all use one queue: {raw_q:?}"
    );
    assert!(
        udp_q.iter().all(|&n| n > 0),
        "UDP flows should reach every queue: {udp_q:?}"
    );
    assert!(m.rx_packets >= 6000 && m.tx_packets >= 6000, "mvt0 {m}");
    println!(
        "{}: raw [{raw}] per-queue {raw_q:?}; udp [{udp}] per-queue {udp_q:?}; mvt0 [{m}]; \
         {:.2?}",
        test_name(),
        t0.elapsed()
    );
}
