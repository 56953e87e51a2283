//! macvtap modes through macvhost (issue 6): two macvhost processes each create their own
//! macvtap on one veth parent (`--macvtap-parent lower0 --mode M`), each served by a
//! vhost-user frontend (the test driver); a frame from guest A to guest B's MAC shows the
//! mode's semantics, and the veth peer shows what leaves the host. Root only.

mod common;
mod support {
    #[path = "vu_driver.rs"]
    pub mod vu_driver;
}

use std::time::Duration;

use common::{require, wait_until, Daemon, MacAddr, MacvtapTopo, NetNs, Peer, HOST};

use support::vu_driver::VuGuest;

const MAC_A: [u8; 6] = [0x02, 0x6d, 0x76, 0x68, 0x0a, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0x6d, 0x76, 0x68, 0x0b, 0x0b];
const PEER: [u8; 6] = [0x02, 0x6d, 0x76, 0x68, 0x0c, 0x0c];

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn topo() -> NetNs {
    let ns = NetNs::quiet("host");
    ns.ip(&[
        "link", "add", "peer0", "type", "veth", "peer", "name", "lower0",
    ]);
    ns.ip(&["link", "set", "peer0", "address", &mac_str(PEER)]);
    ns.ip(&["link", "set", "peer0", "up"]);
    ns.ip(&["link", "set", "lower0", "up"]);
    ns
}

fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = vec![tag; 60];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

fn guest_receives(g: &mut VuGuest, want: &[u8]) -> bool {
    let mut got = Vec::new();
    g.wait_until(Duration::from_millis(800), |g| {
        got.extend(g.recv_frames(0));
        got.iter().any(|f| f.as_slice() == want)
    })
}

fn peer_receives(p: &Peer, want: &[u8]) -> bool {
    let mut buf = [0u8; 2048];
    let deadline = std::time::Instant::now() + Duration::from_millis(800);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(n)) = p.recv(&mut buf, Duration::from_millis(100)) {
            if &buf[..n] == want {
                return true;
            }
        }
    }
    false
}

/// (A → B delivered to guest B, A → B seen on the veth peer, peer → A delivered to guest A)
fn run_mode(mode: &str) -> (bool, bool, bool) {
    let ns = topo();
    let dir = tempfile::tempdir().unwrap();
    let args = |name: &str, mac: [u8; 6]| {
        vec![
            "--macvtap-parent".to_string(),
            "lower0".into(),
            "--mode".into(),
            mode.into(),
            "--macvtap-name".into(),
            name.into(),
            "--mac".into(),
            mac_str(mac),
        ]
    };
    let a_args = args("mvA", MAC_A);
    let b_args = args("mvB", MAC_B);
    let mut a = Daemon::spawn_named(
        &ns,
        dir.path(),
        "a",
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut b = Daemon::spawn_named(
        &ns,
        dir.path(),
        "b",
        &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let all = u64::MAX;
    let mut ga = VuGuest::connect(a.socket(), 1, 256, all, Duration::from_secs(10));
    let mut gb = VuGuest::connect(b.socket(), 1, 256, all, Duration::from_secs(10));
    for g in [&mut ga, &mut gb] {
        g.post_rx(0, 64, 4096);
        g.kick(g.rx(0));
    }
    let peer = Peer::open(&ns, "peer0", MacAddr(PEER), MacAddr(MAC_A));
    std::thread::sleep(Duration::from_millis(200));

    let a_to_b = frame(MAC_B, MAC_A, 1);
    ga.send(0, &a_to_b);
    ga.kick(ga.tx(0));
    let b_got = guest_receives(&mut gb, &a_to_b);
    let peer_got = peer_receives(&peer, &a_to_b);

    let p_to_a = frame(MAC_A, PEER, 2);
    peer.send(&p_to_a).unwrap();
    let a_got = guest_receives(&mut ga, &p_to_a);

    drop((ga, gb));
    a.shutdown_clean();
    b.shutdown_clean();
    // The macvtaps macvhost created are gone with it.
    let links = ns.ip(&["-o", "link", "show"]);
    assert!(!links.contains("mvA") && !links.contains("mvB"), "{links}");
    println!("{mode}: A->B guest {b_got}, A->B on the wire {peer_got}, peer->A {a_got}");
    (b_got, peer_got, a_got)
}

#[test]
fn bridge_mode_guests_reach_each_other_inside_the_host() {
    require!(HOST);
    assert_eq!(run_mode("bridge"), (true, false, true));
}

#[test]
fn private_mode_guests_cannot_reach_each_other() {
    require!(HOST);
    // The frame leaves through the parent; the veth peer is not a hairpin switch.
    assert_eq!(run_mode("private"), (false, true, true));
}

#[test]
fn vepa_mode_without_a_hairpin_switch_sends_everything_out() {
    require!(HOST);
    assert_eq!(run_mode("vepa"), (false, true, true));
}

#[test]
fn passthru_takes_the_parent_and_a_second_macvtap_is_refused() {
    require!(HOST);
    let ns = topo();
    let dir = tempfile::tempdir().unwrap();
    let mut a = Daemon::spawn_named(
        &ns,
        dir.path(),
        "a",
        &[
            "--macvtap-parent",
            "lower0",
            "--mode",
            "passthru",
            "--macvtap-name",
            "mvA",
        ],
    );
    // A second macvhost asking for any macvtap on the same parent fails with a clear error.
    let out = ns.try_exec(&[
        Daemon::binary().to_str().unwrap(),
        "--socket-path",
        dir.path().join("b.sock").to_str().unwrap(),
        "--macvtap-parent",
        "lower0",
        "--mode",
        "passthru",
        "--macvtap-name",
        "mvB",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "second passthru: exit {:?}: {}",
        out.status.code(),
        stderr.trim()
    );
    assert!(!out.status.success());
    assert!(
        stderr.contains("--macvtap-parent") && stderr.contains("passthru"),
        "{stderr}"
    );
    // Passthru: the macvtap took the parent's MAC, and a frontend is served on it.
    let parent_mac = ns.exec(&["cat", "/sys/class/net/lower0/address"]);
    let mvt_mac = ns.exec(&["cat", "/sys/class/net/mvA/address"]);
    assert_eq!(parent_mac.trim(), mvt_mac.trim());
    let mut g = VuGuest::connect(a.socket(), 1, 256, u64::MAX, Duration::from_secs(10));
    assert!(g.send(0, &frame([0xff; 6], MAC_A, 4)));
    g.kick(g.tx(0));
    drop(g);
    a.shutdown_clean();
}

/// `IFF_ALLMULTI` in the interface's sysfs `flags`.
fn allmulti(ns: &NetNs, iface: &str) -> bool {
    let text = ns.read_file(&format!("/sys/class/net/{iface}/flags"));
    let flags = u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap();
    flags & 0x200 != 0
}

#[test]
fn rx_filter_allmulti_holds_allmulticast_while_running_and_follow_does_not() {
    require!(HOST);
    let ns = NetNs::quiet("allmulti");
    let topo = MacvtapTopo::create(&ns, "bridge");
    let dir = tempfile::tempdir().unwrap();
    assert!(!allmulti(&ns, topo.macvtap), "allmulticast before macvhost");

    let mut mvh = Daemon::spawn(
        &ns,
        dir.path(),
        &["--macvtap", topo.macvtap, "--rx-filter", "allmulti"],
    );
    let on = wait_until(Duration::from_secs(5), || allmulti(&ns, topo.macvtap));
    assert!(
        on,
        "no IFF_ALLMULTI with --rx-filter allmulti:\n{}",
        mvh.log_text()
    );
    // Held for the process's life, also with a frontend that comes and goes.
    let g = VuGuest::connect(mvh.socket(), 1, 256, u64::MAX, Duration::from_secs(10));
    drop(g);
    std::thread::sleep(Duration::from_millis(300));
    assert!(allmulti(&ns, topo.macvtap), "dropped with the frontend");
    let log = mvh.log_text();
    assert!(log.contains("(--rx-filter allmulti)"), "{log}");
    mvh.shutdown_clean();
    assert!(
        !allmulti(&ns, topo.macvtap),
        "allmulticast outlived macvhost's SIGTERM"
    );

    // The default (follow) asks for no allmulticast, with or without a frontend.
    let mut mvh = Daemon::spawn(&ns, dir.path(), &["--macvtap", topo.macvtap]);
    let g = VuGuest::connect(mvh.socket(), 1, 256, u64::MAX, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !allmulti(&ns, topo.macvtap),
        "IFF_ALLMULTI in follow mode:\n{}",
        mvh.log_text()
    );
    assert_eq!(mvh.device_stats()["mcast_overflows"], 0);
    drop(g);
    mvh.shutdown_clean();
    assert!(!allmulti(&ns, topo.macvtap));
}
