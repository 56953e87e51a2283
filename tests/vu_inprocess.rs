//! The whole backend over a real vhost-user socket, with fake host queues (datagram
//! socketpairs) instead of taps: runs without root. The frontend is `support::vu_driver`.

mod support {
    #[path = "rig.rs"]
    pub mod rig;
    #[path = "vu_driver.rs"]
    pub mod vu_driver;
}

use std::time::Duration;

use macvhost::server::SocketMode;
use support::rig::*;
use support::vu_driver::{VuGuest, HDR_LEN};

#[test]
fn tx_frames_reach_the_host_queue_byte_exact() {
    let rig = Rig::start(1);
    let mut g = rig.guest(1, ALL);
    for seq in 0..100u32 {
        let f = frame(seq, 60 + (seq as usize * 13) % 1400);
        assert!(g.send(0, &f));
        g.kick(g.tx(0));
        let mut buf = vec![0u8; 70_000];
        let n = rig.peers[0]
            .recv(&mut buf)
            .expect("frame on the host queue");
        assert_eq!(n, HDR_LEN + f.len());
        assert_eq!(&buf[HDR_LEN..n], &f[..], "frame {seq} altered");
        assert!(
            g.wait_until(Duration::from_secs(2), |g| !g.take_used(g.tx(0)).is_empty()) || seq > 0
        );
    }
    assert!(rig.queues[0].is_attached(), "active pair is attached");
    assert!(eventually(|| rig.stats[0].snapshot().tx_frames == 100));
}

#[test]
fn rx_frames_reach_the_guest_with_and_without_mrg_rxbuf() {
    for features in [ALL, ALL & !MRG_RXBUF] {
        let rig = Rig::start(1);
        let mut g = rig.guest(1, features);
        let mrg = g.acked_features & MRG_RXBUF != 0;
        assert_eq!(mrg, features & MRG_RXBUF != 0);
        g.post_rx(0, 128, if mrg { 2048 } else { 65_562 });
        g.kick(g.rx(0));
        let mut got = Vec::new();
        for seq in 0..50u32 {
            let f = frame(seq, 60 + (seq as usize * 29) % 1450);
            let mut pkt = vec![0u8; HDR_LEN];
            pkt.extend_from_slice(&f);
            rig.peers[0].send(&pkt).unwrap();
            assert!(
                g.wait_until(Duration::from_secs(2), |g| {
                    got.extend(g.recv_frames(0));
                    got.len() > seq as usize
                }),
                "frame {seq} not delivered (mrg={mrg})"
            );
            assert_eq!(got[seq as usize], f, "frame {seq} altered (mrg={mrg})");
            g.post_rx(0, 1, if mrg { 2048 } else { 65_562 });
            g.kick(g.rx(0));
        }
        assert!(eventually(|| rig.stats[0].snapshot().rx_frames == 50));
    }
}

#[test]
fn a_second_frontend_is_served_after_the_first_disconnects() {
    let rig = Rig::start(1);
    for round in 0..3u32 {
        let mut g = rig.guest(1, ALL);
        let f = frame(round, 200);
        g.send(0, &f);
        g.kick(g.tx(0));
        let mut buf = vec![0u8; 2048];
        let n = rig.peers[0].recv(&mut buf).expect("frame after reconnect");
        assert_eq!(&buf[HDR_LEN..n], &f[..]);
        drop(g);
    }
    // The worker bumps the counter just after the write the peer already saw.
    assert!(eventually(|| rig.stats[0].snapshot().tx_frames == 3));
}

#[test]
fn client_mode_connects_once_the_frontend_listens_and_again_after_it_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("frontend.sock");
    // The backend starts first and retries with backoff until the frontend appears.
    let rig = Rig::start_with(1, dir, SocketMode::Connect(sock.clone()), sock.clone());
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..2 {
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let (stream, _) = listener.accept().unwrap();
        let frontend = vhost::vhost_user::Frontend::from_stream(stream, 2);
        let mut g = VuGuest::over(frontend, 1, 256, ALL);
        tx_one_and_check(&rig, &mut g, round);
        drop(g);
        drop(listener);
        std::fs::remove_file(&sock).unwrap();
    }
    assert!(eventually(|| rig.stats[0].snapshot().tx_frames == 2));
}

#[test]
fn inherited_listening_fd_is_served() {
    use std::os::fd::IntoRawFd;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("inherited.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.into_raw_fd();
    let rig = Rig::start_with(1, dir, SocketMode::ListenFd(fd), sock);
    let mut g = rig.guest(1, ALL);
    tx_one_and_check(&rig, &mut g, 7);
}

#[test]
fn stale_socket_left_by_a_dead_process_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vu.sock");
    // A listener that went away without removing its file: nobody answers on it.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_err());
    let rig = Rig::start_with(1, dir, SocketMode::Listen(sock.clone()), sock);
    let mut g = rig.guest(1, ALL);
    assert!(g.send(0, &frame(1, 100)));
    g.kick(g.tx(0));
    assert!(eventually(|| rig.stats[0].snapshot().tx_frames == 1));
}

#[test]
fn socket_owner_and_mode_are_applied_before_serving() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vu.sock");
    let endpoint = macvhost::server::Endpoint {
        mode: SocketMode::Listen(sock.clone()),
        perms: macvhost::server::SocketPerms {
            owner: Some((
                nix::unistd::getuid().as_raw(),
                Some(nix::unistd::getgid().as_raw()),
            )),
            mode: Some(0o660),
        },
    };
    let rig = Rig::start_endpoint(1, dir, endpoint, sock.clone());
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.uid(), nix::unistd::getuid().as_raw());
    let mut g = rig.guest(1, ALL);
    assert!(g.send(0, &frame(2, 100)));
}

/// A multicast filter that records what macvhost put in it.
#[derive(Debug, Default)]
struct Filter {
    macs: Vec<[u8; 6]>,
}

impl macvhost::worker::l2::FilterSink for Filter {
    fn apply(
        &mut self,
        diff: &macvhost::datapath::mcast::Diff,
    ) -> Result<(), macvhost::host::mcfilter::McFilterError> {
        self.macs.retain(|m| !diff.remove.contains(m));
        self.macs.extend(
            diff.add
                .iter()
                .filter(|m| !self.macs.contains(m))
                .collect::<Vec<_>>(),
        );
        Ok(())
    }
}

#[test]
fn guest_igmp_join_reaches_the_filter_queries_reach_the_guest_and_disconnect_clears() {
    use macvhost::datapath::mcast::frames as tf;
    use std::sync::{Arc, Mutex};
    let filter = Arc::new(Mutex::new(Filter::default()));
    let stats = Arc::new(macvhost::worker::l2::L2Stats::default());
    let rig = Rig::start_l2(
        1,
        macvhost::worker::l2::L2Host {
            filter: Some(filter.clone()),
            table: Default::default(),
            stats: stats.clone(),
            guest_mac: None,
        },
    );
    let mut g = rig.guest(1, ALL);
    g.post_rx(0, 64, 2048);
    g.kick(g.rx(0));
    let group = tf::v4(239, 1, 2, 3);
    let join = tf::igmp_v2(0x16, group, None);
    assert!(g.send(0, &join));
    g.kick(g.tx(0));
    assert!(
        eventually(|| filter.lock().unwrap().macs == vec![group.mac()]),
        "the group's MAC reached the filter"
    );
    // The join itself went on to the host queue unchanged.
    let mut buf = vec![0u8; 2048];
    let n = rig.peers[0].recv(&mut buf).unwrap();
    assert_eq!(&buf[HDR_LEN..n], &join[..]);
    // About a second after connecting, macvhost asks the guest to report its groups.
    let mut got = Vec::new();
    assert!(g.wait_until(Duration::from_secs(5), |g| {
        got.extend(g.recv_frames(0));
        got.len() >= 2
    }));
    let igmp = got
        .iter()
        .find(|f| f[12..14] == [0x08, 0x00])
        .expect("an IGMP query");
    let mld = got
        .iter()
        .find(|f| f[12..14] == [0x86, 0xdd])
        .expect("an MLD query");
    assert_eq!(&igmp[..6], &[0x01, 0x00, 0x5e, 0, 0, 1], "to all-hosts");
    assert_eq!(&mld[..6], &[0x33, 0x33, 0, 0, 0, 1], "to all-nodes");
    assert_eq!(stats.snapshot().queries_sent, 2);
    assert_eq!(stats.snapshot().table.joins, 1);
    drop(g);
    assert!(
        eventually(|| filter.lock().unwrap().macs.is_empty()),
        "the frontend left: its groups left the filter"
    );
}

/// A frontend that sets up vrings 2 and 3 (a second queue pair) against a one-pair device and
/// starts it, then waits for macvhost to close the connection. Returns when it is closed.
fn misfit_frontend_once(sock: &std::path::Path) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bytes = Vec::new();
    let mut put = |code: u32, payload: u64| {
        bytes.extend_from_slice(&code.to_ne_bytes());
        bytes.extend_from_slice(&1u32.to_ne_bytes());
        bytes.extend_from_slice(&8u32.to_ne_bytes());
        bytes.extend_from_slice(&payload.to_ne_bytes());
    };
    // SET_VRING_CALL (13) without an fd (bit 8) for vrings 2 and 3, then SET_FEATURES (2).
    put(13, 2 | 0x100);
    put(13, 3 | 0x100);
    put(2, 1 << 32);
    s.write_all(&bytes).expect("send");
    let mut sink = [0u8; 256];
    while s
        .read(&mut sink)
        .map(|n| n > 0)
        .expect("macvhost closes, not a timeout")
    {}
}

#[test]
fn frontend_that_keeps_reconnecting_with_more_pairs_is_paused_and_a_good_one_resets_the_pause() {
    let rig = Rig::start(1);
    // Without a pause this frontend gets hundreds of connections a second.
    let t0 = std::time::Instant::now();
    let mut served = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        misfit_frontend_once(&rig.sock);
        served += 1;
    }
    // Pauses of 0.25, 0.5, 1 and 2 s: five connections end within 3 s at most.
    assert!(
        (3..=5).contains(&served),
        "{served} misfit connections served in 3 s"
    );
    // A frontend that fits is served (after the current pause) and works.
    let mut g = rig.guest(1, ALL);
    tx_one_and_check(&rig, &mut g, 1);
    drop(g);
    // It reset the pause: the next misfit is answered within the first pause.
    std::thread::sleep(Duration::from_millis(200));
    let t = std::time::Instant::now();
    misfit_frontend_once(&rig.sock);
    misfit_frontend_once(&rig.sock);
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "two misfits after a good connection took {:?}",
        t.elapsed()
    );
}
