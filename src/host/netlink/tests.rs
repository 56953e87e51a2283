//! Privileged netlink tests: each builds its own network namespace (the test kit's `netns`) with
//! a veth pair, creates macvtaps there over rtnetlink, and skips through `require` when not root.
//!
//! The mode tests show what each macvtap mode means at the link level, by writing frames into
//! one macvtap's char device and looking where they arrive: at the other macvtap's char device,
//! and/or on the veth peer (captured with an `AF_PACKET` socket).

use std::os::fd::{AsFd, AsRawFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    recvfrom, socket, AddressFamily, LinkAddr, SockFlag, SockProtocol, SockType,
};

use super::rtnl::{KernelError, Rtnl};
use super::*;
use crate::host::{HostDevice, HostSpec, TapQueue, VNET_HDR_LEN_V1};
use crate::require;
use crate::testkit::netns::NetNs;
use crate::testkit::Need;

/// IEEE "local experimental" ethertype: kernel chatter (ND, MLD) is never mistaken for ours.
const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// What the tests here need.
const ROOT: &[Need] = &[Need::Root, Need::Tool("ip")];

fn spec(parent: &str, name: Option<&str>, mode: MacvtapMode) -> MacvtapSpec {
    MacvtapSpec {
        parent: parent.to_owned(),
        name: name.map(str::to_owned),
        mode,
        mac: None,
    }
}

/// A namespace with veth0 (the macvtaps' parent) and veth1 (its peer), both up.
fn veth_ns() -> NetNs {
    let ns = NetNs::new("nl");
    ns.add_veth("veth0", "veth1");
    ns.set_up(&["veth0", "veth1"]);
    ns
}

fn link_exists(ifindex: u32) -> bool {
    let mut rtnl = Rtnl::new().unwrap();
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    match rtnl.request(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST) {
        Ok(_) => true,
        Err(KernelError::Errno { errno, .. }) if errno == libc::ENODEV => false,
        Err(e) => panic!("RTM_GETLINK #{ifindex}: {e:?}"),
    }
}

#[test]
fn mode_names_parse_and_print() {
    for m in [
        MacvtapMode::Private,
        MacvtapMode::Vepa,
        MacvtapMode::Bridge,
        MacvtapMode::Passthru,
    ] {
        assert_eq!(m.as_str().parse::<MacvtapMode>().unwrap(), m);
        assert_eq!(m.to_string(), m.as_str());
    }
    let e = "passthrough".parse::<MacvtapMode>().unwrap_err();
    assert!(e.is_operator_error());
    assert_eq!(
        e.to_string(),
        "unknown macvtap mode \"passthrough\"; expected one of private, vepa, bridge, passthru"
    );
}

#[test]
fn generated_names_fit_ifnamsiz() {
    assert_eq!(generated_names(2)[0], "mvh2-0");
    assert_eq!(generated_names(2).len(), 100);
    for idx in [1, 99_999, 1_000_000, u32::MAX] {
        let names = generated_names(idx);
        assert!(!names.is_empty());
        for n in &names {
            assert!(n.len() <= MAX_IFNAME, "{n}");
            validate_ifname(n).unwrap();
        }
    }
    // A 10-digit parent ifindex leaves one digit for n.
    assert_eq!(generated_names(u32::MAX).len(), 10);
    assert_eq!(generated_names(u32::MAX)[9], "mvh4294967295-9");
}

#[test]
fn bad_requests_are_refused_before_the_kernel() {
    let e = create_macvtap(&spec("no/slash", None, MacvtapMode::Bridge)).unwrap_err();
    assert!(matches!(e, NetlinkError::InvalidIfName { .. }), "{e}");
    let mut s = spec("eth0", None, MacvtapMode::Bridge);
    s.mac = Some([0x01, 0, 0, 0, 0, 1]);
    let e = create_macvtap(&s).unwrap_err();
    assert!(matches!(e, NetlinkError::InvalidMac { .. }), "{e}");
    assert!(e.is_operator_error());
}

#[test]
fn each_mode_is_created_up_and_reported() {
    require!(ROOT);
    let ns = veth_ns();
    ns.run(|| {
        let parent = macvtap_info("veth0").unwrap_err();
        assert!(
            matches!(parent, NetlinkError::NotMacvtap { .. }),
            "{parent}"
        );
        for mode in [
            MacvtapMode::Private,
            MacvtapMode::Vepa,
            MacvtapMode::Bridge,
            MacvtapMode::Passthru,
        ] {
            let link = create_macvtap(&spec("veth0", None, mode)).unwrap();
            let info = macvtap_info(link.name()).unwrap();
            assert_eq!(info.mode, mode);
            assert_eq!(info.ifindex, link.ifindex());
            assert_eq!(info.mac, link.mac());
            assert_eq!(info.parent_ifindex, link.parent_ifindex());
            assert_eq!(info.parent_netnsid, None);
            assert_eq!(info.mtu, 1500);
            assert!(info.up, "{mode}: created link is not up");
            assert!(link.name().starts_with("mvh"), "{}", link.name());
            // Dropped here: the next mode (passthru especially) needs the parent to itself.
        }
    });
}

#[test]
fn names_macs_and_missing_parents() {
    require!(ROOT);
    let ns = veth_ns();
    ns.run(|| {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let mut s = spec("veth0", Some("mvtA"), MacvtapMode::Bridge);
        s.mac = Some(mac);
        let a = create_macvtap(&s).unwrap();
        assert_eq!(a.name(), "mvtA");
        assert_eq!(a.mac(), mac);
        // Same name again.
        let e = create_macvtap(&spec("veth0", Some("mvtA"), MacvtapMode::Bridge)).unwrap_err();
        assert!(matches!(e, NetlinkError::NameTaken { .. }), "{e}");
        // Same MAC on the same parent.
        let mut s2 = spec("veth0", Some("mvtB"), MacvtapMode::Bridge);
        s2.mac = Some(mac);
        let e = create_macvtap(&s2).unwrap_err();
        eprintln!("same MAC twice: {e}");
        assert!(e.is_operator_error(), "{e}");
        // Generated names skip taken ones.
        let g0 = create_macvtap(&spec("veth0", None, MacvtapMode::Bridge)).unwrap();
        let g1 = create_macvtap(&spec("veth0", None, MacvtapMode::Bridge)).unwrap();
        assert_ne!(g0.name(), g1.name());
        // Missing and unsuitable parents are the operator's fault and named.
        let e = create_macvtap(&spec("nosuch0", None, MacvtapMode::Bridge)).unwrap_err();
        assert!(matches!(e, NetlinkError::NoSuchParent { .. }), "{e}");
        assert!(e.is_operator_error());
        assert!(e.to_string().contains("\"nosuch0\""), "{e}");
        let e = create_macvtap(&spec("lo", None, MacvtapMode::Bridge)).unwrap_err();
        assert!(matches!(e, NetlinkError::BadParent { .. }), "{e}");
        let e = macvtap_info("nosuch0").unwrap_err();
        assert!(matches!(e, NetlinkError::NoSuchLink { .. }), "{e}");
        let e = delete_link(999_999).unwrap_err();
        assert!(matches!(e, NetlinkError::NoSuchIfindex { .. }), "{e}");
    });
}

#[test]
fn passthru_must_be_alone() {
    require!(ROOT);
    let ns = veth_ns();
    ns.run(|| {
        let p = create_macvtap(&spec("veth0", Some("mvtP"), MacvtapMode::Passthru)).unwrap();
        let parent_mac = mac_of(&get_link_by_name(&mut Rtnl::new().unwrap(), "veth0").unwrap());
        assert_eq!(Some(p.mac()), parent_mac, "passthru takes the parent's MAC");

        let e = create_macvtap(&spec("veth0", Some("mvtQ"), MacvtapMode::Passthru)).unwrap_err();
        eprintln!("second passthru: {e}");
        assert!(
            matches!(&e, NetlinkError::ParentInPassthru { parent, holder }
                if parent == "veth0" && holder == "mvtP"),
            "{e:?}"
        );
        assert!(e.is_operator_error());
        let e = create_macvtap(&spec("veth0", Some("mvtQ"), MacvtapMode::Bridge)).unwrap_err();
        assert!(matches!(e, NetlinkError::ParentInPassthru { .. }), "{e:?}");
        drop(p);

        let b = create_macvtap(&spec("veth0", Some("mvtB"), MacvtapMode::Bridge)).unwrap();
        let e = create_macvtap(&spec("veth0", Some("mvtQ"), MacvtapMode::Passthru)).unwrap_err();
        eprintln!("passthru after bridge: {e}");
        assert!(
            matches!(&e, NetlinkError::PassthruTaken { parent, holders }
                if parent == "veth0" && holders == "mvtB"),
            "{e:?}"
        );
        drop(b);
        create_macvtap(&spec("veth0", Some("mvtQ"), MacvtapMode::Passthru)).unwrap();
    });
}

#[test]
fn drop_deletes_and_keep_keeps() {
    require!(ROOT);
    let ns = veth_ns();
    ns.run(|| {
        let a = create_macvtap(&spec("veth0", None, MacvtapMode::Bridge)).unwrap();
        let a_index = a.ifindex();
        assert!(link_exists(a_index));
        drop(a);
        assert!(!link_exists(a_index), "Drop left the macvtap behind");

        let mut k = create_macvtap(&spec("veth0", None, MacvtapMode::Bridge)).unwrap();
        let (k_index, k_name) = (k.ifindex(), k.name().to_owned());
        k.keep();
        assert!(k.is_kept());
        drop(k);
        assert!(link_exists(k_index), "keep() did not keep it");
        assert_eq!(macvtap_info(&k_name).unwrap().ifindex, k_index);
        delete_link(k_index).unwrap();
        assert!(!link_exists(k_index));

        let d = create_macvtap(&spec("veth0", None, MacvtapMode::Bridge)).unwrap();
        let d_index = d.ifindex();
        d.delete().unwrap();
        assert!(!link_exists(d_index));
    });
}

// --- Mode semantics at the link level ---

/// Where a frame written into macvtap A, addressed to macvtap B's MAC, ends up.
#[derive(Debug, PartialEq, Eq)]
struct Delivery {
    /// Read from B's char device.
    at_b: bool,
    /// Received on veth1, the parent's peer (the "outside switch").
    at_peer: bool,
}

fn eth_frame(dst: [u8; 6], src: [u8; 6], marker: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(VNET_HDR_LEN_V1 + 60);
    f.resize(VNET_HDR_LEN_V1, 0); // vnet header: no offloads
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&TEST_ETHERTYPE);
    f.extend_from_slice(marker);
    f.resize(VNET_HDR_LEN_V1 + 60, 0);
    f
}

fn is_test_frame(frame: &[u8], marker: &[u8]) -> bool {
    frame.len() >= 14 + marker.len()
        && frame[12..14] == TEST_ETHERTYPE
        && &frame[14..14 + marker.len()] == marker
}

/// Watches B's queue and an `ETH_P_ALL` packet socket (frames on `peer_ifindex` only) for
/// `window`, or until both saw the marked frame.
fn observe(
    b: &TapQueue,
    pkt: &impl AsFd,
    peer_ifindex: u32,
    marker: &[u8],
    window: Duration,
) -> Delivery {
    let mut seen = Delivery {
        at_b: false,
        at_peer: false,
    };
    let deadline = Instant::now() + window;
    let mut buf = vec![0u8; 65536];
    while !(seen.at_b && seen.at_peer) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut fds = [
            PollFd::new(b.as_fd(), PollFlags::POLLIN),
            PollFd::new(pkt.as_fd(), PollFlags::POLLIN),
        ];
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        poll(&mut fds, PollTimeout::from(ms)).unwrap();
        while let Ok(n) = nix::unistd::read(b.as_fd(), &mut buf) {
            let hdr = VNET_HDR_LEN_V1;
            if n > hdr && is_test_frame(&buf[hdr..n], marker) {
                seen.at_b = true;
            }
        }
        while let Ok((n, Some(from))) = recvfrom::<LinkAddr>(pkt.as_fd().as_raw_fd(), &mut buf) {
            if from.ifindex() == peer_ifindex as usize && is_test_frame(&buf[..n], marker) {
                seen.at_peer = true;
            }
        }
    }
    seen
}

fn ifindex_of(name: &str) -> u32 {
    get_link_by_name(&mut Rtnl::new().unwrap(), name)
        .unwrap()
        .header
        .index
}

/// In a fresh namespace: macvtaps A and B in `mode` on veth0 (peer veth1, optionally enslaved to
/// a bridge with hairpin on, i.e. a reflective-relay switch); A sends one frame to B's MAC and
/// one broadcast. Returns where each arrived.
fn deliveries(mode: MacvtapMode, hairpin_peer: bool) -> (Delivery, Delivery) {
    let ns = veth_ns();
    if hairpin_peer {
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "veth1", "master", "br0"]);
        ns.ip(&[
            "link",
            "set",
            "dev",
            "veth1",
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ]);
        ns.ip(&["link", "set", "br0", "up"]);
    }
    ns.run(|| {
        let a = create_macvtap(&spec("veth0", Some("mvtA"), mode)).unwrap();
        let b = create_macvtap(&spec("veth0", Some("mvtB"), mode)).unwrap();
        let qa = HostDevice::open(
            &HostSpec::Macvtap {
                iface: "mvtA".into(),
            },
            1,
        )
        .unwrap();
        let qb = HostDevice::open(
            &HostSpec::Macvtap {
                iface: "mvtB".into(),
            },
            1,
        )
        .unwrap();
        let pkt = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )
        .unwrap();
        let peer = ifindex_of("veth1");
        let window = Duration::from_millis(400);

        let unicast = eth_frame(b.mac(), a.mac(), b"unicast-to-B");
        let n = nix::unistd::write(qa.queues()[0].as_fd(), &unicast).unwrap();
        assert_eq!(n, unicast.len());
        let uni = observe(&qb.queues()[0], &pkt, peer, b"unicast-to-B", window);

        let bcast = eth_frame([0xff; 6], a.mac(), b"broadcast");
        nix::unistd::write(qa.queues()[0].as_fd(), &bcast).unwrap();
        let bc = observe(&qb.queues()[0], &pkt, peer, b"broadcast", window);
        (uni, bc)
    })
}

const fn d(at_b: bool, at_peer: bool) -> Delivery {
    Delivery { at_b, at_peer }
}

#[test]
fn mode_bridge_switches_between_macvtaps_inside_the_kernel() {
    require!(ROOT);
    let (uni, bc) = deliveries(MacvtapMode::Bridge, false);
    // Unicast to a sibling never leaves the host; broadcast goes to siblings and out.
    assert_eq!(uni, d(true, false), "unicast");
    assert_eq!(bc, d(true, true), "broadcast");
}

#[test]
fn mode_private_isolates_macvtaps() {
    require!(ROOT);
    let (uni, bc) = deliveries(MacvtapMode::Private, false);
    assert_eq!(uni, d(false, true), "unicast");
    assert_eq!(bc, d(false, true), "broadcast");
}

#[test]
fn mode_vepa_sends_everything_out() {
    require!(ROOT);
    // A plain veth peer does not hairpin: nothing comes back to B.
    let (uni, bc) = deliveries(MacvtapMode::Vepa, false);
    assert_eq!(uni, d(false, true), "unicast");
    assert_eq!(bc, d(false, true), "broadcast");
}

#[test]
fn mode_vepa_reaches_siblings_through_a_hairpin_switch() {
    require!(ROOT);
    // veth1 in a bridge with hairpin on = an 802.1Qbg reflective-relay switch.
    let (uni, bc) = deliveries(MacvtapMode::Vepa, true);
    assert_eq!(uni, d(true, true), "unicast");
    assert_eq!(bc, d(true, true), "broadcast");
}

#[test]
fn mode_private_behind_a_hairpin_switch_only_stops_broadcast() {
    require!(ROOT);
    // The kernel's private mode drops reflected multicast/broadcast whose source is a sibling
    // (macvlan_handle_frame), but a reflected *unicast* frame is delivered by destination MAC
    // like any other: isolation against a hairpinning switch holds for broadcast only.
    let (uni, bc) = deliveries(MacvtapMode::Private, true);
    assert_eq!(uni, d(true, true), "unicast");
    assert_eq!(bc, d(false, true), "broadcast");
}

#[test]
fn mode_bridge_behind_a_hairpin_switch_is_unchanged() {
    require!(ROOT);
    let (uni, bc) = deliveries(MacvtapMode::Bridge, true);
    assert_eq!(uni, d(true, false), "unicast");
    assert_eq!(bc, d(true, true), "broadcast");
}

// --- Link watcher ---

/// Waits up to `within` until every event of `want` arrived (in any order), returning how long
/// that took. With `strict`, any other event fails the test; without, it is skipped.
fn expect_events(
    rx: &mpsc::Receiver<LinkEvent>,
    want: &[LinkEvent],
    within: Duration,
    strict: bool,
) -> Duration {
    let start = Instant::now();
    let mut missing = want.to_vec();
    let mut seen = Vec::new();
    while !missing.is_empty() {
        let left = within.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(e) => {
                assert!(
                    !strict || missing.contains(&e),
                    "unexpected {e:?} while waiting for {missing:?}"
                );
                missing.retain(|w| *w != e);
                seen.push(e);
            }
            Err(_) => panic!("no {missing:?} within {within:?}; saw {seen:?}"),
        }
    }
    start.elapsed()
}

/// No event at all for `quiet`.
fn expect_quiet(rx: &mpsc::Receiver<LinkEvent>, quiet: Duration) {
    if let Ok(e) = rx.recv_timeout(quiet) {
        panic!("unexpected {e:?}");
    }
}

#[test]
fn watcher_reports_carrier_of_macvtap_and_parent_and_deletion() {
    require!(ROOT);
    let ns = veth_ns();
    ns.run(|| {
        let mut link = create_macvtap(&spec("veth0", Some("mvtW"), MacvtapMode::Bridge)).unwrap();
        link.keep(); // the test deletes it with `ip`
        let (m, p) = (link.ifindex(), link.parent_ifindex());
        let (tx, rx) = mpsc::channel();
        let watcher = watch_links(vec![m, p], move |e| {
            let _ = tx.send(e);
        })
        .unwrap();
        assert_eq!(watcher.ifindexes(), [m, p]);
        let second = Duration::from_secs(1);
        let up = |ifindex| LinkEvent::Carrier { ifindex, up: true };
        let down = |ifindex| LinkEvent::Carrier { ifindex, up: false };

        // The first report is each link's current state (operstate may still be settling, in
        // which case "down" comes first and "up" follows).
        expect_events(&rx, &[up(p), up(m)], second, false);
        expect_quiet(&rx, Duration::from_millis(200));

        // Each step: run `ip -n NS ...` (another process) and wait for the events, timing both.
        let step = |args: &[&str], want: &[LinkEvent]| {
            let t = Instant::now();
            ns.ip(args);
            expect_events(&rx, want, second, true);
            t.elapsed()
        };
        let took = [
            // Parent administratively down: the macvtap stays IFF_UP but loses IFF_RUNNING
            // (operstate LOWERLAYERDOWN) and gets its own notification.
            step(&["link", "set", "veth0", "down"], &[down(p), down(m)]),
            step(&["link", "set", "veth0", "up"], &[up(p), up(m)]),
            // The parent's peer down: the parent loses carrier, and so does the macvtap.
            step(&["link", "set", "veth1", "down"], &[down(p), down(m)]),
            step(&["link", "set", "veth1", "up"], &[up(p), up(m)]),
            // The macvtap alone: the parent is not reported.
            step(&["link", "set", "mvtW", "down"], &[down(m)]),
            step(&["link", "set", "mvtW", "up"], &[up(m)]),
            {
                expect_quiet(&rx, Duration::from_millis(200));
                // Deleting an up link closes it first: down, then gone.
                step(
                    &["link", "del", "mvtW"],
                    &[down(m), LinkEvent::Deleted { ifindex: m }],
                )
            },
        ];
        eprintln!("watcher: ip command + events took {took:?}");
        assert!(took.iter().all(|t| *t < second), "{took:?}");

        crate::testkit::assert_drops_within(watcher, Duration::from_millis(200));
    });
}

#[test]
fn watcher_reports_missing_links_and_ignores_others() {
    require!(ROOT);
    let ns = veth_ns();
    ns.run(|| {
        let parent = ifindex_of("veth0");
        let (tx, rx) = mpsc::channel();
        let _w = watch_links(vec![parent, 999_999], move |e| {
            let _ = tx.send(e);
        })
        .unwrap();
        let second = Duration::from_secs(1);
        let initial = [
            LinkEvent::Carrier {
                ifindex: parent,
                up: true,
            },
            LinkEvent::Deleted { ifindex: 999_999 },
        ];
        expect_events(&rx, &initial, second, true);
        // Links nobody watches come and go silently.
        let other = create_macvtap(&spec("veth0", None, MacvtapMode::Bridge)).unwrap();
        ns.ip(&["link", "set", other.name(), "down"]);
        drop(other);
        expect_quiet(&rx, Duration::from_millis(300));
    });
}

/// From the outside (a macvtap on veth1, the parent's peer): is a frame to the macvtap's own
/// MAC, and one to a foreign unicast MAC, delivered to a `mode` macvtap on veth0?
fn from_outside(mode: MacvtapMode) -> (bool, bool) {
    let ns = veth_ns();
    ns.run(|| {
        let m = create_macvtap(&spec("veth0", Some("mvtM"), mode)).unwrap();
        let inj = create_macvtap(&spec("veth1", Some("inj"), MacvtapMode::Bridge)).unwrap();
        let qm = HostDevice::open(
            &HostSpec::Macvtap {
                iface: "mvtM".into(),
            },
            1,
        )
        .unwrap();
        let qi = HostDevice::open(
            &HostSpec::Macvtap {
                iface: "inj".into(),
            },
            1,
        )
        .unwrap();
        let pkt = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )
        .unwrap();
        let veth0 = ifindex_of("veth0");
        let window = Duration::from_millis(400);
        let mut arrived = [false; 2];
        for (i, (dst, marker)) in [
            (m.mac(), &b"to-own-mac"[..]),
            ([0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee], &b"to-foreign-mac"[..]),
        ]
        .into_iter()
        .enumerate()
        {
            nix::unistd::write(qi.queues()[0].as_fd(), &eth_frame(dst, inj.mac(), marker)).unwrap();
            let seen = observe(&qm.queues()[0], &pkt, veth0, marker, window);
            assert!(seen.at_peer, "{mode}: {marker:?} never reached veth0");
            arrived[i] = seen.at_b;
        }
        (arrived[0], arrived[1])
    })
}

#[test]
fn mode_passthru_receives_everything_the_parent_does() {
    require!(ROOT);
    // Passthru puts the parent in promiscuous mode and hands the macvtap every frame;
    // the other modes take only frames for their own MAC (or broadcast/multicast).
    assert_eq!(from_outside(MacvtapMode::Passthru), (true, true));
    assert_eq!(from_outside(MacvtapMode::Bridge), (true, false));
}
