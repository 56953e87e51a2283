//! Multicast filter tests: each builds a network namespace with veth0/veth1 and macvtap `mvt0`
//! (bridge mode on veth0), needs root and `ip`, and skips through `require!` otherwise.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::*;
use crate::host::{HostDevice, HostSpec, TapQueue};
use crate::require;
use crate::testkit::netns::{free_ifindex, ip_command, NetNs};
use crate::testkit::Need;

/// What these tests (and `datapath::mcast::host_tests`) need.
pub(crate) const ROOT: &[Need] = &[Need::Root, Need::Tool("ip")];

pub(crate) const IFF_PROMISC: u32 = 0x100;
pub(crate) const IFF_ALLMULTI: u32 = 0x200;

/// `/sys/class/net/IF/flags`: the device's real flags (`ip link` hides allmulti/promisc set by
/// packet sockets). Only inside `NetNs::run`, where /sys is this namespace's.
pub(crate) fn sys_flags(iface: &str) -> u32 {
    let s = fs::read_to_string(format!("/sys/class/net/{iface}/flags")).unwrap();
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap()
}

pub(crate) fn ifindex(iface: &str) -> u32 {
    fs::read_to_string(format!("/sys/class/net/{iface}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The link-layer entries of `ip maddr show dev IF`, as `aa:bb:…` strings (run inside
/// `NetNs::run`: the child inherits the thread's namespace).
pub(crate) fn maddrs(iface: &str) -> Vec<String> {
    let out = ip_command()
        .args(["maddr", "show", "dev", iface])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("link  "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

pub(crate) fn fmt(mac: [u8; 6]) -> String {
    MacAddr(mac).to_string()
}

pub(crate) fn setup() -> NetNs {
    let ns = NetNs::new("mcast");
    ns.add_veth_macvtap(free_ifindex());
    ns.set_up(&["veth0", "veth1", "mvt0"]);
    ns
}

/// Local experimental ethertype: kernel chatter on the links is never taken for a test frame.
const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn test_frame(dst: [u8; 6], marker: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f.extend_from_slice(&TEST_ETHERTYPE);
    f.extend_from_slice(marker);
    f.resize(60, 0);
    f
}

/// Whether a frame carrying `marker` comes out of the macvtap queue within `wait` (other
/// frames are read and dropped).
fn arrives(q: &TapQueue, marker: &[u8], wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 65536];
    let hdr = crate::host::VNET_HDR_LEN_V1;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(q.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(left.as_millis() as i32).unwrap();
        if poll(&mut fds, ms).unwrap() == 0 {
            return false;
        }
        let Ok(n) = nix::unistd::read(q.as_fd(), &mut buf) else {
            continue;
        };
        let f = &buf[hdr.min(n)..n];
        if f.len() >= 14 + marker.len()
            && f[12..14] == TEST_ETHERTYPE
            && &f[14..14 + marker.len()] == marker
        {
            return true;
        }
    }
}

/// Sends a frame to `dst` from veth1 (the "outside") and says whether the macvtap queue got it.
fn delivered(peer: &OwnedFd, q: &TapQueue, dst: [u8; 6], tag: &str) -> bool {
    let marker = format!("mc-{tag}");
    nix::unistd::write(peer, &test_frame(dst, marker.as_bytes())).unwrap();
    arrives(q, marker.as_bytes(), Duration::from_millis(700))
}

/// A solicited-node style group MAC (33:33:ff:…) that the macvtap does *not* deliver yet: macvlan
/// filters through a 256-bucket hash with a per-boot key, so a group may share a bucket with the
/// macvtap's own groups (all-hosts, all-nodes, its solicited-node group); such a group is skipped.
fn undelivered_group(peer: &OwnedFd, q: &TapQueue) -> [u8; 6] {
    for i in 0..8u8 {
        let mac = [0x33, 0x33, 0xff, 0x5a, 0x17, i];
        if !delivered(peer, q, mac, &format!("probe-{i}")) {
            return mac;
        }
    }
    panic!("8 groups in a row delivered before any add: the macvtap is not filtering");
}

fn open_queue() -> (HostDevice, OwnedFd) {
    let dev = HostDevice::open(
        &HostSpec::Macvtap {
            iface: "mvt0".into(),
        },
        1,
    )
    .unwrap();
    let peer = sys::packet_socket(ifindex("veth1")).unwrap();
    (dev, peer)
}

/// Runs `body` in a fresh [`setup`] namespace with a filter on mvt0.
fn with_filter(body: impl FnOnce(&mut McFilter) + Send) {
    setup().run(|| body(&mut McFilter::open(ifindex("mvt0")).unwrap()));
}

/// Runs `body` in a fresh [`setup`] namespace with mvt0's queue, the wire end (veth1's packet
/// socket), a filter on mvt0 and a group whose frames do not reach the queue yet.
fn with_undelivered_group(body: impl FnOnce(&mut McFilter, &OwnedFd, &TapQueue, [u8; 6]) + Send) {
    setup().run(|| {
        let (dev, peer) = open_queue();
        let q = &dev.queues()[0];
        let mut filter = McFilter::open(ifindex("mvt0")).unwrap();
        let group = undelivered_group(&peer, q);
        body(&mut filter, &peer, q, group);
    });
}

fn assert_not_promisc_nor_allmulti(iface: &str) {
    let flags = sys_flags(iface);
    assert_eq!(
        flags & (IFF_PROMISC | IFF_ALLMULTI),
        0,
        "{iface} flags {flags:#x}: the filter test would prove nothing"
    );
}

// ---------------------------------------------------------------------------------------------

/// The point of the module: a group frame from the wire reaches the macvtap's queue reader
/// after the add and not before, with the macvtap neither promiscuous nor allmulticast. The
/// "not after the remove" half fails without `McFilter::refresh` (the kernel quirk in the
/// module doc: veth0, the lower device here, is promiscuous).
#[test]
fn group_frame_reaches_the_macvtap_only_after_add_and_not_after_remove() {
    require!(ROOT);
    with_undelivered_group(|filter, peer, q, group| {
        assert!(
            !delivered(peer, q, group, "before"),
            "delivered before the add"
        );

        filter.add(group).unwrap();
        assert_not_promisc_nor_allmulti("mvt0");
        assert!(
            delivered(peer, q, group, "after-add"),
            "not delivered after the add"
        );

        filter.remove(group).unwrap();
        assert!(
            !delivered(peer, q, group, "after-remove"),
            "delivered after the remove"
        );
        assert_not_promisc_nor_allmulti("mvt0");
    });
}

#[test]
fn allmulti_delivers_every_group_until_turned_off() {
    require!(ROOT);
    with_undelivered_group(|filter, peer, q, group| {
        filter.set_allmulti(true).unwrap();
        assert!(filter.allmulti());
        assert_ne!(sys_flags("mvt0") & IFF_ALLMULTI, 0);
        assert!(delivered(peer, q, group, "allmulti"));
        let ipv4_group = [0x01, 0, 0x5e, 0x42, 0x17, 0x01];
        assert!(delivered(peer, q, ipv4_group, "allmulti-v4"));

        filter.set_allmulti(false).unwrap();
        assert_eq!(sys_flags("mvt0") & IFF_ALLMULTI, 0);
        assert!(!delivered(peer, q, group, "allmulti-off"));
    });
}

#[test]
fn added_address_is_listed_and_removed_address_is_gone() {
    require!(ROOT);
    with_filter(|filter| {
        let (a, b) = (
            [0x33, 0x33, 0xff, 0x12, 0x34, 0x56],
            [0x01, 0, 0x5e, 0x01, 2, 3],
        );
        filter.add(a).unwrap();
        filter.add(b).unwrap();
        let list = maddrs("mvt0");
        assert!(list.contains(&fmt(a)) && list.contains(&fmt(b)), "{list:?}");
        filter.remove(a).unwrap();
        let list = maddrs("mvt0");
        assert!(
            !list.contains(&fmt(a)) && list.contains(&fmt(b)),
            "{list:?}"
        );
        // Removing what is not there does nothing.
        filter.remove(a).unwrap();
        assert_eq!(maddrs("mvt0"), list);
    });
}

#[test]
fn unicast_mac_is_refused() {
    require!(ROOT);
    with_filter(|filter| {
        let err = filter.add([0x02, 0, 0, 0, 0, 1]).unwrap_err();
        assert!(matches!(err, McFilterError::NotMulticast { .. }), "{err}");
        assert!(maddrs("mvt0").iter().all(|m| m != "02:00:00:00:00:01"));
    });
}

#[test]
fn allmulti_off_leaves_the_operators_allmulticast_on() {
    require!(ROOT);
    let ns = setup();
    ns.ip(&["link", "set", "mvt0", "allmulticast", "on"]);
    ns.run(|| {
        let mut filter = McFilter::open(ifindex("mvt0")).unwrap();
        filter.set_allmulti(true).unwrap();
        filter.set_allmulti(true).unwrap(); // idempotent: one reference only
        filter.set_allmulti(false).unwrap();
        assert_ne!(
            sys_flags("mvt0") & IFF_ALLMULTI,
            0,
            "the operator's allmulticast was lost"
        );
    });
    ns.ip(&["link", "set", "mvt0", "allmulticast", "off"]);
    ns.run(|| assert_eq!(sys_flags("mvt0") & IFF_ALLMULTI, 0));
}

#[test]
fn dropping_the_filter_removes_its_addresses_and_allmulti() {
    require!(ROOT);
    let ns = setup();
    ns.run(|| {
        let before = maddrs("mvt0");
        let mut filter = McFilter::open(ifindex("mvt0")).unwrap();
        let mac = [0x33, 0x33, 0xff, 0xab, 0xcd, 0xef];
        filter.add(mac).unwrap();
        filter.set_allmulti(true).unwrap();
        assert!(maddrs("mvt0").contains(&fmt(mac)));
        assert_ne!(sys_flags("mvt0") & IFF_ALLMULTI, 0);
        // What a crash or kill does too: the socket closes.
        drop(filter);
        assert_eq!(maddrs("mvt0"), before);
        assert_eq!(sys_flags("mvt0") & IFF_ALLMULTI, 0);
    });
}

/// The groups a guest never reports (all-hosts, all-nodes) are on the macvtap itself, even with
/// `disable_ipv6=1` (the kernel joins ff02::1 when it creates the device's IPv6 state, whatever
/// the setting): nothing needs adding them (see `datapath::mcast`).
#[test]
fn macvtap_has_all_hosts_and_all_nodes_even_with_ipv6_disabled() {
    require!(ROOT);
    let ns = setup();
    ns.ip(&[
        "link", "add", "link", "veth0", "name", "mvt1", "type", "macvtap", "mode", "bridge",
    ]);
    ns.run(|| {
        fs::write("/proc/sys/net/ipv6/conf/mvt1/disable_ipv6", "1").unwrap();
        let all_hosts = "01:00:5e:00:00:01".to_string();
        let all_nodes = "33:33:00:00:00:01".to_string();
        let list = maddrs("mvt0");
        assert!(
            list.contains(&all_hosts) && list.contains(&all_nodes),
            "{list:?}"
        );
        let out = ip_command()
            .args(["link", "set", "mvt1", "up"])
            .status()
            .unwrap();
        assert!(out.success());
        let list = maddrs("mvt1");
        assert!(
            list.contains(&all_hosts) && list.contains(&all_nodes),
            "{list:?}"
        );
    });
}

#[test]
fn missing_interface_is_an_operator_error() {
    require!(ROOT);
    let ns = NetNs::new("mcast");
    ns.run(|| {
        let err = McFilter::open(987_654).unwrap_err();
        assert!(
            matches!(err, McFilterError::NoSuchInterface(987_654)),
            "{err}"
        );
        assert!(err.is_operator_error());
        let err = McFilter::open(u32::MAX).unwrap_err();
        assert!(err.is_operator_error(), "{err}");
    });
}

#[test]
fn deleted_interface_is_a_host_error() {
    require!(ROOT);
    let ns = setup();
    let filter = ns.run(|| McFilter::open(ifindex("mvt0")).unwrap());
    ns.ip(&["link", "del", "mvt0"]);
    let err = filter.add([0x33, 0x33, 0, 0, 0, 0x42]).unwrap_err();
    assert!(matches!(err, McFilterError::LinkGone { .. }), "{err}");
    assert!(!err.is_operator_error());
}

/// Drops `CAP_NET_RAW` from the calling thread's effective set (capabilities are per thread).
#[allow(unsafe_code)] // capget/capset: no wrapper in the crates we have
fn drop_cap_net_raw_in_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_RAW: u32 = 13;
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget reads `hdr` and writes two `Data` structs (version 3), both valid and
    // writable for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            std::ptr::addr_of_mut!(hdr),
            data.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "capget: {}", io::Error::last_os_error());
    data[0].effective &= !(1 << CAP_NET_RAW);
    // SAFETY: capset reads `hdr` and two `Data` structs, valid for the call; pid 0 is this
    // thread only.
    let rc = unsafe { libc::syscall(libc::SYS_capset, std::ptr::addr_of_mut!(hdr), data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
}

#[test]
fn missing_cap_net_raw_is_an_operator_error() {
    require!(ROOT);
    let err = std::thread::spawn(|| {
        drop_cap_net_raw_in_this_thread();
        McFilter::open(1).unwrap_err()
    })
    .join()
    .unwrap();
    assert!(matches!(err, McFilterError::NotPermitted(_)), "{err}");
    assert!(err.is_operator_error());
    assert!(err.to_string().contains("CAP_NET_RAW"), "{err}");
}

/// An `AF_PACKET` socket bound to `ifindex`, for tests of the layers above.
pub(crate) fn packet_socket(ifindex: u32) -> OwnedFd {
    sys::packet_socket(ifindex).unwrap()
}
