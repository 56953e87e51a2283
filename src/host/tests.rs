//! Host-module tests. Privileged ones build a fresh network namespace each (the test kit's
//! `netns`) and skip through `require` when not root.

use std::fs::{self, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::{mknod, Mode, SFlag};

use super::*;
use crate::require;
use crate::testkit::netns::{self, free_ifindex, tap_node, DevNodeGuard, NetNs};
use crate::testkit::Need;

/// An ethertype from the IEEE "local experimental" range, so kernel chatter (IPv6 ND, MLD)
/// on the same links is never mistaken for a test frame.
const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// What the privileged tests here need.
const ROOT: &[Need] = &[Need::Root, Need::Tool("ip")];

/// The links `NetNs::add_veth_macvtap` makes.
const LINKS: [&str; 3] = ["veth0", "veth1", "mvt0"];

fn eth_frame(dst: [u8; 6], src: [u8; 6], marker: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&TEST_ETHERTYPE);
    f.extend_from_slice(marker);
    f.resize(60, 0);
    f
}

fn is_test_frame(frame: &[u8], marker: &[u8]) -> bool {
    frame.len() >= 14 + marker.len()
        && frame[12..14] == TEST_ETHERTYPE
        && &frame[14..14 + marker.len()] == marker
}

/// Writes `vnet hdr (zeros) + frame` with one `writev` of two segments, as the datapath does
/// for a guest chain that splits header and frame.
fn send_via_queue(q: &TapQueue, frame: &[u8]) -> usize {
    try_send(q, frame).unwrap()
}

/// Like `send_via_queue`, but returns the kernel's answer instead of unwrapping it.
fn try_send(q: &TapQueue, frame: &[u8]) -> std::io::Result<usize> {
    let hdr = [0u8; VNET_HDR_LEN_V1];
    let iov = [std::io::IoSlice::new(&hdr), std::io::IoSlice::new(frame)];
    Ok(nix::sys::uio::writev(q.as_fd(), &iov)?)
}

fn sysfs_counter(iface: &str, name: &str) -> u64 {
    fs::read_to_string(format!("/sys/class/net/{iface}/statistics/{name}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Reads one frame from `q` with one `readv`, waiting up to `timeout`. Returns the frame
/// without its vnet header.
fn recv_via_queue(q: &TapQueue, timeout: Duration) -> Option<Vec<u8>> {
    if !wait_readable(q.as_fd(), timeout) {
        return None;
    }
    let mut hdr = [0u8; VNET_HDR_LEN_V1];
    let mut out = vec![0u8; 0x10000];
    let n = {
        let mut iov = [
            std::io::IoSliceMut::new(&mut hdr),
            std::io::IoSliceMut::new(&mut out),
        ];
        nix::sys::uio::readv(q.as_fd(), &mut iov).unwrap()
    };
    out.truncate(n.saturating_sub(VNET_HDR_LEN_V1));
    Some(out)
}

fn wait_readable(fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(timeout.as_millis() as i32).unwrap();
    poll(&mut fds, ms).unwrap() > 0
}

/// Waits for a frame carrying `marker` on an AF_PACKET socket.
fn capture(sock: &OwnedFd, marker: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if !wait_readable(sock.as_fd(), deadline - Instant::now()) {
            break;
        }
        if let Ok(n) = nix::unistd::read(sock, &mut buf) {
            if is_test_frame(&buf[..n], marker) {
                return Some(buf[..n].to_vec());
            }
        }
    }
    None
}

/// Drains `q`, returning how many test frames with `marker` it held.
fn count_on_queue(q: &TapQueue, marker: &[u8]) -> usize {
    let mut n = 0;
    while let Some(f) = recv_via_queue(q, Duration::from_millis(300)) {
        n += usize::from(is_test_frame(&f, marker));
    }
    n
}

fn queue_flags(q: &TapQueue) -> (String, i32) {
    let req = sys::tun_get_iff(q.as_fd()).unwrap();
    (req.name(), i32::from(req.flags()))
}

fn ifindex_in_ns(name: &str) -> u32 {
    link::Link::new().unwrap().require_index(name).unwrap()
}

fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

fn macvtap(iface: &str) -> HostSpec {
    HostSpec::Macvtap {
        iface: iface.into(),
    }
}

fn tap(iface: &str) -> HostSpec {
    HostSpec::Tap {
        iface: iface.into(),
    }
}

const TAP_FLAGS: i32 = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Opens a raw `/dev/net/tun` queue on `name` with `flags`, as a manager would.
fn raw_tun(name: &str, flags: i32) -> OwnedFd {
    let fd: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap()
        .into();
    let mut req = sys::IfReq::new(name);
    req.set_flags(u16::try_from(flags).expect("ifr_flags are 16 bits"));
    sys::tun_set_iff(fd.as_fd(), &mut req).unwrap();
    fd
}

// ---------------------------------------------------------------------------------------------
// Unprivileged

#[test]
fn queue_pair_count_is_bounded() {
    let err = HostDevice::open(&tap("tap0"), 0).unwrap_err();
    assert!(matches!(err, HostError::NoQueues));
    assert!(err.is_operator_error());
    let err = HostDevice::open(&tap("tap0"), 257).unwrap_err();
    assert!(matches!(err, HostError::TooManyQueues(257)), "{err}");
    assert!(err.is_operator_error());
}

#[test]
fn bad_names_are_operator_errors() {
    for spec in [macvtap("a/b"), tap(""), tap("waytoolonginterface")] {
        let err = HostDevice::open(&spec, 1).unwrap_err();
        assert!(matches!(err, HostError::InvalidIfName { .. }), "{err}");
        assert!(err.is_operator_error());
    }
}

#[test]
fn tap_fd_count_must_match_queue_pairs() {
    let err = HostDevice::open(&HostSpec::TapFds { fds: vec![0] }, 2).unwrap_err();
    assert!(
        matches!(
            err,
            HostError::FdCount {
                expected: 2,
                got: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn tap_fd_rejects_a_pipe_and_a_closed_fd() {
    let (r, _w) = nix::unistd::pipe().unwrap();
    let spec = HostSpec::TapFds {
        fds: vec![r.as_raw_fd()],
    };
    let err = HostDevice::open(&spec, 1).unwrap_err();
    assert!(
        matches!(&err, HostError::BadTapFd { reason, .. } if reason.contains("not a tap")),
        "{err}"
    );
    assert!(err.is_operator_error());
    // The pipe is still ours and open: the fd was duplicated, not adopted.
    fcntl(r.as_fd(), FcntlArg::F_GETFD).unwrap();

    // Not a just-closed fd: tests run in parallel threads and its number could be reused.
    // One beyond any RLIMIT_NOFILE is never open.
    let never_open = i32::MAX - 1;
    let err = HostDevice::open(
        &HostSpec::TapFds {
            fds: vec![never_open],
        },
        1,
    )
    .unwrap_err();
    assert!(
        matches!(&err, HostError::BadTapFd { reason, .. } if reason.contains("not an open fd")),
        "{err}"
    );
}

#[test]
fn tap_fd_given_twice_is_refused() {
    let (r, _w) = nix::unistd::pipe().unwrap();
    let fd = r.as_raw_fd();
    let err = HostDevice::open(&HostSpec::TapFds { fds: vec![fd, fd] }, 2).unwrap_err();
    assert!(
        matches!(&err, HostError::BadTapFd { reason, .. } if reason.contains("twice")),
        "{err}"
    );
}

/// Offload rules of `drivers/net/tun.c` `set_offload` (Linux 6.x).
fn tun_rules(bits: u32) -> std::io::Result<()> {
    use libc::*;
    let mut arg = bits;
    if arg & TUN_F_CSUM != 0 {
        arg &= !TUN_F_CSUM;
        if arg & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
            arg &= !(TUN_F_TSO_ECN | TUN_F_TSO4 | TUN_F_TSO6);
        }
        arg &= !TUN_F_UFO;
        if arg & TUN_F_USO4 != 0 && arg & TUN_F_USO6 != 0 {
            arg &= !(TUN_F_USO4 | TUN_F_USO6);
        }
    }
    if arg != 0 {
        return Err(std::io::Error::from_raw_os_error(EINVAL));
    }
    Ok(())
}

#[test]
fn offload_probe_follows_tun_rules() {
    let mut last = None;
    let got = probe_offloads(|b| {
        last = Some(b);
        tun_rules(b)
    })
    .unwrap();
    assert_eq!(got, TUN_F_ALL);
    assert_eq!(last, Some(0), "offloads must be reset after probing");
}

#[test]
fn offload_probe_on_a_kernel_without_uso() {
    let got = probe_offloads(|b| {
        if b & (libc::TUN_F_USO4 | libc::TUN_F_USO6) != 0 {
            Err(std::io::Error::from_raw_os_error(libc::EINVAL))
        } else {
            tun_rules(b)
        }
    })
    .unwrap();
    assert_eq!(got, TUN_F_ALL & !(libc::TUN_F_USO4 | libc::TUN_F_USO6));
}

#[test]
fn offload_probe_without_csum_credits_nothing_and_passes_real_errors() {
    let got = probe_offloads(|b| {
        if b == 0 {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(libc::EINVAL))
        }
    })
    .unwrap();
    assert_eq!(got, 0);
    let err = probe_offloads(|_| Err(std::io::Error::from_raw_os_error(libc::EBADFD)));
    assert_eq!(err.unwrap_err().raw_os_error(), Some(libc::EBADFD));
}

// ---------------------------------------------------------------------------------------------
// macvtap (privileged)

#[test]
fn macvtap_opens_one_and_four_queues_with_the_right_flags() {
    require!(ROOT);
    let ns = NetNs::new("host");
    let index = free_ifindex();
    ns.add_veth_macvtap(index);
    ns.run(|| {
        for queues in [1u16, 4] {
            let dev = HostDevice::open(&macvtap("mvt0"), queues).unwrap();
            assert_eq!(dev.kind(), HostKind::Macvtap);
            assert_eq!(dev.ifname(), "mvt0");
            assert_eq!(dev.ifindex(), index);
            assert_eq!(dev.queues().len(), usize::from(queues));
            for (i, q) in dev.queues().iter().enumerate() {
                assert_eq!(q.index(), i);
                let (name, flags) = queue_flags(q);
                assert_eq!(name, "mvt0");
                assert_eq!(flags & TAP_FLAGS, TAP_FLAGS, "flags {flags:#x}");
                assert_eq!(q.vnet_hdr_len().unwrap(), 12);
                let fl = fcntl(q.as_fd(), FcntlArg::F_GETFL).unwrap();
                assert!(OFlag::from_bits_retain(fl).contains(OFlag::O_NONBLOCK));
                let fdfl = fcntl(q.as_fd(), FcntlArg::F_GETFD).unwrap();
                assert_ne!(fdfl & libc::FD_CLOEXEC, 0);
            }
            let off = dev.supported_offloads();
            let want = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
            assert_eq!(off & want, want, "offloads {off:#x}");
            // Legacy and modern header sizes; nothing else.
            let q = &dev.queues()[0];
            q.set_vnet_hdr_len(10).unwrap();
            assert_eq!(q.vnet_hdr_len().unwrap(), 10);
            q.set_vnet_hdr_len(12).unwrap();
            assert!(matches!(
                q.set_vnet_hdr_len(8),
                Err(HostError::BadVnetHdrLen(8))
            ));
            q.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4).unwrap();
            q.set_offload(0).unwrap();
        }
    });
}

#[test]
fn macvtap_frames_flow_both_ways() {
    require!(ROOT);
    let ns = NetNs::new("host");
    ns.add_veth_macvtap(free_ifindex());
    ns.set_up(&LINKS);
    ns.run(|| {
        let dev = HostDevice::open(&macvtap("mvt0"), 1).unwrap();
        let q = &dev.queues()[0];
        let mac = dev.mac().unwrap();
        let peer = sys::packet_socket(ifindex_in_ns("veth1")).unwrap();
        let peer_mac = link::Link::new().unwrap().mac("veth1").unwrap();

        // Guest → host: out of the macvtap, through its lower veth0, into veth1.
        let out = eth_frame(peer_mac, mac, b"tx-frame");
        assert_eq!(send_via_queue(q, &out), 12 + out.len());
        let got = capture(&peer, b"tx-frame", Duration::from_secs(2)).expect("frame left");
        assert_eq!(got, out);

        // Host → guest: a frame sent to the macvtap's MAC arrives with a 12-byte header.
        let inbound = eth_frame(mac, peer_mac, b"rx-frame");
        nix::unistd::write(&peer, &inbound).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let f = recv_via_queue(q, Duration::from_millis(500)).expect("frame arrived");
            if is_test_frame(&f, b"rx-frame") {
                assert_eq!(f, inbound);
                break;
            }
            assert!(Instant::now() < deadline, "rx frame never arrived");
        }
    });
}

#[test]
fn stale_dev_node_is_left_alone_and_not_used() {
    require!(ROOT);
    let index = free_ifindex();
    // /dev is shared by all namespaces: a node named like our macvtap but for 1:3 (/dev/null).
    // If the backend opened it, writes would "succeed" into /dev/null and never reach veth1.
    let node = tap_node(index);
    let stale = libc::makedev(1, 3);
    mknod(&node, SFlag::S_IFCHR, Mode::S_IRUSR | Mode::S_IWUSR, stale).unwrap();
    let _cleanup = DevNodeGuard::remove_on_drop(node.clone());
    let ns = NetNs::new("host");
    ns.add_veth_macvtap(index);
    ns.set_up(&LINKS);
    ns.run(|| {
        let dev = HostDevice::open(&macvtap("mvt0"), 2).unwrap();
        let q = &dev.queues()[0];
        let (name, _) = queue_flags(q);
        assert_eq!(
            name, "mvt0",
            "the queue fd must be the macvtap, not /dev/null"
        );
        let peer = sys::packet_socket(ifindex_in_ns("veth1")).unwrap();
        let out = eth_frame([0xff; 6], dev.mac().unwrap(), b"stale-test");
        send_via_queue(q, &out);
        assert!(capture(&peer, b"stale-test", Duration::from_secs(2)).is_some());
    });
    let meta = fs::symlink_metadata(&node).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), stale, "stale node was clobbered");
    let leftovers: Vec<_> = fs::read_dir("/dev")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!(".macvhost-tap{index}-{}-", std::process::id()))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "private node left behind: {leftovers:?}"
    );
}

#[test]
fn missing_dev_node_is_created() {
    require!(ROOT);
    let index = free_ifindex();
    let ns = NetNs::new("host");
    ns.add_veth_macvtap(index);
    let node = tap_node(index);
    // devtmpfs made the node; take it away, as on a host without devtmpfs/udev.
    let want = fs::metadata(&node).unwrap().rdev();
    fs::remove_file(&node).unwrap();
    let _cleanup = DevNodeGuard::remove_on_drop(node.clone());
    ns.run(|| {
        let dev = HostDevice::open(&macvtap("mvt0"), 1).unwrap();
        assert_eq!(queue_flags(&dev.queues()[0]).0, "mvt0");
    });
    let meta = fs::symlink_metadata(&node).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), want);
    assert_eq!(meta.mode() & 0o077, 0, "node must be 0600");
}

#[test]
fn macvtap_queue_detach_and_attach_steer_frames() {
    require!(ROOT);
    let ns = NetNs::new("host");
    ns.add_veth_macvtap(free_ifindex());
    ns.set_up(&LINKS);
    ns.run(|| {
        let dev = HostDevice::open(&macvtap("mvt0"), 2).unwrap();
        let (q0, q1) = (&dev.queues()[0], &dev.queues()[1]);
        let mac = dev.mac().unwrap();
        let peer = sys::packet_socket(ifindex_in_ns("veth1")).unwrap();
        let burst = |marker: &[u8]| {
            // Varying source MACs spread flows over queues when several are enabled.
            for i in 0..16u8 {
                let f = eth_frame(mac, [0x02, 0, 0, 0, 1, i], marker);
                nix::unistd::write(&peer, &f).unwrap();
            }
        };
        assert_eq!(
            q1.is_attached().unwrap(),
            None,
            "macvtap does not report it"
        );

        // Only q0 enabled: every frame lands on q0. Detaching twice is not an error.
        q1.detach().unwrap();
        q1.detach().unwrap();
        burst(b"only-q0");
        assert_eq!(count_on_queue(q0, b"only-q0"), 16);
        assert_eq!(count_on_queue(q1, b"only-q0"), 0);

        // Swap: q1 back (twice: the second is a no-op), q0 out. Everything lands on q1.
        q1.attach().unwrap();
        q1.attach().unwrap();
        q0.detach().unwrap();
        burst(b"only-q1");
        assert_eq!(count_on_queue(q1, b"only-q1"), 16);
        assert_eq!(count_on_queue(q0, b"only-q1"), 0);

        // Both enabled: all frames arrive, on one queue or the other.
        q0.attach().unwrap();
        burst(b"both");
        assert_eq!(
            count_on_queue(q0, b"both") + count_on_queue(q1, b"both"),
            16
        );
    });
}

#[test]
fn macvtap_link_facts() {
    require!(ROOT);
    let ns = NetNs::new("host");
    ns.add_veth_macvtap(free_ifindex());
    ns.ip(&[
        "link",
        "set",
        "mvt0",
        "address",
        "02:11:22:33:44:55",
        "mtu",
        "1400",
    ]);
    ns.run(|| {
        let dev = HostDevice::open(&macvtap("mvt0"), 1).unwrap();
        assert_eq!(dev.mac().unwrap(), [0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert_eq!(dev.mtu().unwrap(), 1400);
        assert!(!dev.carrier(), "down link has no carrier");

        for l in ["veth0", "veth1", "mvt0"] {
            netns::ip(&["link", "set", l, "up"]);
        }
        assert!(wait_for(|| dev.carrier()), "all up: carrier");
        netns::ip(&["link", "set", "veth1", "down"]);
        assert!(wait_for(|| !dev.carrier()), "lower link lost carrier");
        netns::ip(&["link", "set", "veth1", "up"]);
        assert!(wait_for(|| dev.carrier()));

        // Facts follow the link by ifindex, across changes and a rename.
        netns::ip(&["link", "set", "mvt0", "down"]);
        netns::ip(&["link", "set", "mvt0", "name", "mvt-renamed"]);
        netns::ip(&["link", "set", "mvt-renamed", "address", "02:aa:bb:cc:dd:ee"]);
        netns::ip(&["link", "set", "mvt-renamed", "mtu", "1280"]);
        assert_eq!(dev.mac().unwrap(), [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
        assert_eq!(dev.mtu().unwrap(), 1280);

        netns::ip(&["link", "del", "mvt-renamed"]);
        assert!(matches!(dev.mac(), Err(HostError::LinkGone { .. })));
        assert!(!dev.carrier());
    });
}

#[test]
fn macvtap_spec_errors_name_the_operator() {
    require!(ROOT);
    let ns = NetNs::new("host");
    ns.add_veth_macvtap(free_ifindex());
    ns.run(|| {
        let err = HostDevice::open(&macvtap("nosuch0"), 1).unwrap_err();
        assert!(matches!(err, HostError::NoSuchInterface { .. }), "{err}");
        let err = HostDevice::open(&macvtap("veth0"), 1).unwrap_err();
        assert!(matches!(err, HostError::NotMacvtap { .. }), "{err}");
        assert!(err.is_operator_error());
    });
}

#[test]
fn sysfs_of_another_namespace_is_detected() {
    require!(ROOT);
    let ns = NetNs::new("host");
    ns.add_veth_macvtap(free_ifindex());
    let ns_file = fs::File::open(format!("/run/netns/{}", ns.name())).unwrap();
    // Enter the netns but keep the root namespace's /sys, as `nsenter --net` would.
    let err = std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            HostDevice::open(&macvtap("mvt0"), 1).unwrap_err()
        })
        .join()
        .unwrap()
    });
    assert!(matches!(err, HostError::SysfsOtherNetns { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// tap (privileged)

#[test]
fn tap_is_created_up_and_removed_on_drop() {
    require!(ROOT);
    let ns = NetNs::new("host");
    ns.run(|| {
        let dev = HostDevice::open(&tap("mvhtap0"), 1).unwrap();
        assert_eq!(dev.kind(), HostKind::Tap);
        assert_eq!(dev.ifindex(), ifindex_in_ns("mvhtap0"));
        let flags =
            link::parse_tun_flags(&fs::read_to_string("/sys/class/net/mvhtap0/tun_flags").unwrap())
                .unwrap();
        assert_eq!(flags, TAP_FLAGS, "single queue: no IFF_MULTI_QUEUE");
        let up = link::Link::new().unwrap().flags("mvhtap0").unwrap();
        assert_ne!(up & libc::IFF_UP, 0, "new tap is brought up");
        assert!(wait_for(|| dev.carrier()));
        let q = &dev.queues()[0];
        assert_eq!(q.vnet_hdr_len().unwrap(), 12);
        let off = dev.supported_offloads();
        let want = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
        assert_eq!(off & want, want, "offloads {off:#x}");
        // Single-queue tun cannot detach; attach is a no-op.
        assert!(matches!(
            q.detach(),
            Err(HostError::DetachUnsupported { .. })
        ));
        q.attach().unwrap();
        assert_eq!(q.is_attached().unwrap(), Some(true));

        // A frame written to the queue is received by the tap interface.
        let sniff = sys::packet_socket(dev.ifindex()).unwrap();
        let out = eth_frame([0xff; 6], [0x02, 0, 0, 0, 0, 1], b"tap-tx");
        send_via_queue(q, &out);
        assert!(capture(&sniff, b"tap-tx", Duration::from_secs(2)).is_some());

        drop(dev);
        assert_eq!(link::Link::new().unwrap().index("mvhtap0").unwrap(), None);
    });
}

#[test]
fn multiqueue_tap_detach_and_attach() {
    require!(ROOT);
    let ns = NetNs::new("host");
    ns.run(|| {
        let dev = HostDevice::open(&tap("mvhtap1"), 4).unwrap();
        let flags =
            link::parse_tun_flags(&fs::read_to_string("/sys/class/net/mvhtap1/tun_flags").unwrap())
                .unwrap();
        assert_eq!(flags, TAP_FLAGS | libc::IFF_MULTI_QUEUE);
        let qs = dev.queues();
        for q in &qs[1..] {
            q.detach().unwrap();
            assert_eq!(q.is_attached().unwrap(), Some(false));
            q.detach().unwrap();
        }
        // With queues 1..3 detached, everything sent to the tap reaches queue 0.
        let inject = sys::packet_socket(dev.ifindex()).unwrap();
        for i in 0..8u8 {
            let f = eth_frame([0x02, 0, 0, 0, 0, 9], [0x02, 0, 0, 0, 2, i], b"mq-rx");
            nix::unistd::write(&inject, &f).unwrap();
        }
        assert_eq!(count_on_queue(&qs[0], b"mq-rx"), 8);
        for q in &qs[1..] {
            q.attach().unwrap();
            assert_eq!(q.is_attached().unwrap(), Some(true));
            q.attach().unwrap();
        }
        // Detaching only stops RX steering: a detached tun queue still transmits.
        qs[3].detach().unwrap();
        let sniff = sys::packet_socket(dev.ifindex()).unwrap();
        let out = eth_frame([0xff; 6], [0x02, 0, 0, 0, 0, 1], b"detached-tx");
        assert_eq!(send_via_queue(&qs[3], &out), 12 + out.len());
        assert!(capture(&sniff, b"detached-tx", Duration::from_secs(2)).is_some());
        qs[3].attach().unwrap();
    });
}

#[test]
fn existing_taps_are_reused_or_refused_clearly() {
    require!(ROOT);
    let ns = NetNs::new("host");
    ns.ip(&["tuntap", "add", "dev", "mq0", "mode", "tap", "multi_queue"]);
    ns.ip(&["tuntap", "add", "dev", "sq0", "mode", "tap"]);
    ns.ip(&["tuntap", "add", "dev", "tun0", "mode", "tun"]);
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ]);
    ns.run(|| {
        // A persistent multi-queue tap: reused, left down (the operator's choice), kept on drop.
        let dev = HostDevice::open(&tap("mq0"), 2).unwrap();
        assert_eq!(dev.queues().len(), 2);
        let l = link::Link::new().unwrap();
        assert_eq!(l.flags("mq0").unwrap() & libc::IFF_UP, 0);
        assert!(!dev.carrier());
        // A multi-queue tap also serves one queue pair (TUNSETIFF must repeat MULTI_QUEUE).
        let second = HostDevice::open(&tap("mq0"), 1);
        drop(dev);
        second.unwrap();
        assert!(l.index("mq0").unwrap().is_some());

        let err = HostDevice::open(&tap("sq0"), 2).unwrap_err();
        assert!(matches!(err, HostError::TapNotMultiQueue { .. }), "{err}");
        assert!(err.is_operator_error());
        let sq = HostDevice::open(&tap("sq0"), 1).unwrap();
        // A single-queue tap with a reader is busy for everyone else.
        let err = HostDevice::open(&tap("sq0"), 1).unwrap_err();
        assert!(matches!(err, HostError::TapBusy { .. }), "{err}");
        drop(sq);

        let err = HostDevice::open(&tap("tun0"), 1).unwrap_err();
        assert!(matches!(err, HostError::TunNotTap { .. }), "{err}");
        let err = HostDevice::open(&tap("veth0"), 1).unwrap_err();
        assert!(matches!(err, HostError::NotTap { .. }), "{err}");
    });
}

// ---------------------------------------------------------------------------------------------
// --tap-fd (privileged)

#[test]
fn tap_fds_from_a_manager_are_validated() {
    require!(ROOT);
    let ns = NetNs::new("host");
    ns.run(|| {
        let mq = TAP_FLAGS | libc::IFF_MULTI_QUEUE;
        let a = raw_tun("fdtap0", mq);
        let b = raw_tun("fdtap0", mq);
        let fds = vec![a.as_raw_fd(), b.as_raw_fd()];
        let dev = HostDevice::open(&HostSpec::TapFds { fds: fds.clone() }, 2).unwrap();
        assert_eq!(dev.kind(), HostKind::Tap);
        assert_eq!(dev.ifname(), "fdtap0");
        assert_eq!(dev.ifindex(), ifindex_in_ns("fdtap0"));
        for q in dev.queues() {
            assert_eq!(q.vnet_hdr_len().unwrap(), 12);
            let fl = fcntl(q.as_fd(), FcntlArg::F_GETFL).unwrap();
            assert!(OFlag::from_bits_retain(fl).contains(OFlag::O_NONBLOCK));
        }
        assert_ne!(dev.supported_offloads(), 0);
        dev.queues()[1].detach().unwrap();
        dev.queues()[1].attach().unwrap();
        drop(dev);
        // The manager's fds stay open.
        fcntl(a.as_fd(), FcntlArg::F_GETFD).unwrap();

        let err = |fds: Vec<i32>| HostDevice::open(&HostSpec::TapFds { fds }, 1).unwrap_err();
        let reason = |e: HostError| match e {
            HostError::BadTapFd { reason, .. } => reason,
            other => panic!("expected BadTapFd, got {other}"),
        };

        let no_vnet = raw_tun("fdtap1", libc::IFF_TAP | libc::IFF_NO_PI);
        assert!(reason(err(vec![no_vnet.as_raw_fd()])).contains("IFF_VNET_HDR"));

        let no_pi = raw_tun("fdtap2", libc::IFF_TAP | libc::IFF_VNET_HDR);
        assert!(reason(err(vec![no_pi.as_raw_fd()])).contains("IFF_NO_PI"));

        let tun = raw_tun(
            "fdtun0",
            libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        );
        assert!(reason(err(vec![tun.as_raw_fd()])).contains("tun"));

        let unbound: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap()
            .into();
        assert!(reason(err(vec![unbound.as_raw_fd()])).contains("not attached"));

        let other = raw_tun("fdtap3", mq);
        let mixed = HostDevice::open(
            &HostSpec::TapFds {
                fds: vec![a.as_raw_fd(), other.as_raw_fd()],
            },
            2,
        )
        .unwrap_err();
        assert!(reason(mixed).contains("names interface"));
    });
}

#[test]
fn macvtap_fds_from_a_manager_are_accepted() {
    require!(ROOT);
    let index = free_ifindex();
    let ns = NetNs::new("host");
    ns.add_veth_macvtap(index);
    ns.run(|| {
        // Opened blocking, as `3<>/dev/tapN` in a shell would.
        let open = || -> OwnedFd {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(tap_node(index))
                .unwrap()
                .into()
        };
        let (a, b) = (open(), open());
        let spec = HostSpec::TapFds {
            fds: vec![a.as_raw_fd(), b.as_raw_fd()],
        };
        let dev = HostDevice::open(&spec, 2).unwrap();
        assert_eq!(dev.kind(), HostKind::Macvtap);
        assert_eq!(dev.ifname(), "mvt0");
        assert_eq!(dev.ifindex(), index);
        let fl = fcntl(a.as_fd(), FcntlArg::F_GETFL).unwrap();
        assert!(OFlag::from_bits_retain(fl).contains(OFlag::O_NONBLOCK));
        dev.queues()[1].detach().unwrap();
        dev.queues()[1].attach().unwrap();
    });
}

// ---------------------------------------------------------------------------------------------
// Kernel behaviour the worker has to live with (privileged)

#[test]
fn writes_on_down_and_deleted_links() {
    require!(ROOT);
    let ns = NetNs::new("host");
    ns.add_veth_macvtap(free_ifindex());
    ns.run(|| {
        let frame = eth_frame([0xff; 6], [0x02, 0, 0, 0, 0, 1], b"down");

        // macvtap down: the write "succeeds" and the macvtap counts the frame as tx_dropped.
        let mv = HostDevice::open(&macvtap("mvt0"), 1).unwrap();
        let q = &mv.queues()[0];
        let dropped = sysfs_counter("mvt0", "tx_dropped");
        assert_eq!(try_send(q, &frame).unwrap(), 12 + frame.len());
        assert_eq!(sysfs_counter("mvt0", "tx_dropped"), dropped + 1);

        // macvtap deleted: writes still "succeed", reads say EAGAIN, poll never reports an error;
        // only TUNGETIFF (ENOLINK) and the link facts tell.
        netns::ip(&["link", "del", "mvt0"]);
        assert_eq!(try_send(q, &frame).unwrap(), 12 + frame.len());
        let mut fds = [PollFd::new(q.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap();
        let revents = fds[0].revents().unwrap();
        assert!(!revents.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLIN));
        let err = sys::tun_get_iff(q.as_fd()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOLINK));
        assert!(!mv.carrier());

        // tap down: the write fails with EIO.
        let tp = HostDevice::open(&tap("mvhtap9"), 1).unwrap();
        let q = &tp.queues()[0];
        netns::ip(&["link", "set", "mvhtap9", "down"]);
        let err = try_send(q, &frame).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));

        // tap deleted: EBADFD, and poll reports POLLERR.
        netns::ip(&["link", "del", "mvhtap9"]);
        let err = try_send(q, &frame).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADFD));
        let mut fds = [PollFd::new(q.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap();
        assert!(fds[0].revents().unwrap().contains(PollFlags::POLLERR));
    });
}

#[test]
fn sndbuf_is_per_device_on_tap_and_settable_on_macvtap() {
    require!(ROOT);
    let ns = NetNs::new("host");
    ns.add_veth_macvtap(free_ifindex());
    ns.run(|| {
        // Both drivers start at INT_MAX: no EAGAIN on TX unless someone sets a finite value.
        let tp = HostDevice::open(&tap("mvhtap7"), 2).unwrap();
        let (q0, q1) = (&tp.queues()[0], &tp.queues()[1]);
        assert_eq!(q0.sndbuf().unwrap(), i32::MAX);
        q0.set_sndbuf(16 * 1024).unwrap();
        assert_eq!(q0.sndbuf().unwrap(), 16 * 1024);
        assert_eq!(q1.sndbuf().unwrap(), 16 * 1024, "tun: one value per device");
        let err = q0.set_sndbuf(0).unwrap_err();
        assert!(
            matches!(&err, HostError::Ioctl { op: "TUNSETSNDBUF", source, .. }
                if source.raw_os_error() == Some(libc::EINVAL)),
            "{err}"
        );

        // macvtap takes TUNSETSNDBUF (per queue: `q->sk.sk_sndbuf` in tap.c) but has no
        // TUNGETSNDBUF.
        let mv = HostDevice::open(&macvtap("mvt0"), 1).unwrap();
        let m0 = &mv.queues()[0];
        m0.set_sndbuf(32 * 1024).unwrap();
        assert!(m0.set_sndbuf(-1).is_err());
        let err = m0.sndbuf().unwrap_err();
        assert!(
            matches!(&err, HostError::Ioctl { op: "TUNGETSNDBUF", source, .. }
                if source.raw_os_error() == Some(libc::EINVAL)),
            "{err}"
        );
    });
}

#[test]
fn tap_name_template_is_resolved() {
    require!(ROOT);
    let ns = NetNs::new("host");
    ns.run(|| {
        // The kernel expands `%d` on creation; every queue must join that one tap.
        let dev = HostDevice::open(&tap("mvh%d"), 2).unwrap();
        assert_eq!(dev.ifname(), "mvh0");
        assert_eq!(dev.ifindex(), ifindex_in_ns("mvh0"));
        for q in dev.queues() {
            assert_eq!(queue_flags(q).0, "mvh0");
        }
    });
}

#[test]
fn fds_of_a_same_named_link_in_another_namespace_are_refused() {
    require!(ROOT);
    // Namespace A holds the devices behind the fds; B has links with the same names (and, for
    // the macvtap, the same ifindex) and is where the backend runs.
    let (a, b) = (NetNs::new("host"), NetNs::new("host"));
    let index = free_ifindex();
    a.add_veth_macvtap(index);
    b.add_veth_macvtap(index);
    b.ip(&[
        "tuntap",
        "add",
        "dev",
        "twin0",
        "mode",
        "tap",
        "multi_queue",
    ]);
    let (tun_fd, mvt_fd) = a.run(|| {
        let tun = raw_tun("twin0", TAP_FLAGS | libc::IFF_MULTI_QUEUE);
        // /dev/tapN is A's or B's node, whichever devtmpfs made first: open A's by its number.
        let dev = macvtap::char_dev(&link::Link::new().unwrap(), "mvt0", index).unwrap();
        let node = macvtap::DevNode::resolve(std::path::Path::new("/dev"), index, dev).unwrap();
        let mvt: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open(node.path())
            .unwrap()
            .into();
        (tun, mvt)
    });
    b.run(|| {
        let open = |fd: &OwnedFd| {
            HostDevice::open(
                &HostSpec::TapFds {
                    fds: vec![fd.as_raw_fd()],
                },
                1,
            )
        };
        let err = open(&tun_fd).unwrap_err();
        assert!(
            matches!(&err, HostError::BadTapFd { reason, .. } if reason.contains("another network namespace")),
            "{err}"
        );
        let err = open(&mvt_fd).unwrap_err();
        assert!(
            matches!(&err, HostError::BadTapFd { reason, .. } if reason.contains("not a queue of macvtap")),
            "{err}"
        );
    });
}
