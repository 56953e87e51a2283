//! Host link state as the frontend sees it, over the real serve loop and a real vhost-user
//! socket (fake host queues; no root needed). The carrier flag is the one the rtnetlink
//! watcher keeps (tested against real macvtaps in `src/netlink/tests.rs`).
//!
//! - Always: the config space's STATUS field follows carrier (GET_CONFIG).
//! - With `--disconnect-on-link-down`: losing carrier ends the connection and nobody is served
//!   until it returns, in each socket mode. That is what makes QEMU and DPDK show their guest
//!   the link going down and up (`tests/guest_macvhost.rs` shows it in a real guest).

mod support {
    #[path = "rig.rs"]
    pub mod rig;
    #[path = "vu_driver.rs"]
    pub mod vu_driver;
}

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use macvhost::server::SocketMode;
use support::rig::*;
use support::vu_driver::VuGuest;
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

/// True once a request on `g`'s connection fails (the backend closed it), within `limit`.
fn closed_within(g: &mut VuGuest, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if g.frontend.get_features().is_err() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn link_loss_without_the_flag_keeps_the_connection_and_clears_link_status() {
    let rig = Rig::start(1);
    let mut g = rig.guest(1, ALL);
    assert_eq!(g.link_status(), 1);
    rig.link_up.store(false, Ordering::SeqCst);
    assert_eq!(g.link_status(), 0, "STATUS still says link up");
    // Well past the carrier poll: the connection is kept and still carries frames.
    std::thread::sleep(Duration::from_millis(300));
    tx_one_and_check(&rig, &mut g, 1);
    rig.link_up.store(true, Ordering::SeqCst);
    assert_eq!(g.link_status(), 1);
    tx_one_and_check(&rig, &mut g, 2);
}

#[test]
fn link_loss_ends_the_connection_and_hides_the_socket_path_until_carrier_returns() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vu.sock");
    let rig = Rig::start_disconnecting_on_link_down(
        1,
        dir,
        SocketMode::Listen(sock.clone()),
        sock.clone(),
    );
    let mut g = rig.guest(1, ALL);
    tx_one_and_check(&rig, &mut g, 1);

    rig.link_up.store(false, Ordering::SeqCst);
    let took = closed_within(&mut g, Duration::from_secs(2))
        .expect("the connection outlived the carrier by 2 s");
    println!("connection ended {took:.0?} after carrier loss");
    // While down, connecting fails at once (the socket is moved aside, so nothing is at the
    // path): a frontend with reconnect keeps retrying instead of hanging in a handshake.
    assert!(eventually(|| UnixStream::connect(&sock).is_err()));
    for _ in 0..10 {
        assert!(
            UnixStream::connect(&sock).is_err(),
            "a connection was taken while the link is down"
        );
        std::thread::sleep(Duration::from_millis(30));
    }

    rig.link_up.store(true, Ordering::SeqCst);
    let mut g2 = VuGuest::connect(&sock, 1, 256, ALL, Duration::from_secs(5));
    assert_eq!(g2.link_status(), 1);
    tx_one_and_check(&rig, &mut g2, 2);
    // Counted by the worker just after the write the peer already read.
    assert!(eventually(|| rig.stats[0].snapshot().tx_frames == 2));
}

#[test]
fn link_loss_with_an_inherited_fd_closes_each_connection_until_carrier_returns() {
    use std::os::fd::IntoRawFd;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("inherited.sock");
    let fd = UnixListener::bind(&sock).unwrap().into_raw_fd();
    let rig = Rig::start_disconnecting_on_link_down(1, dir, SocketMode::ListenFd(fd), sock.clone());
    let mut g = rig.guest(1, ALL);
    tx_one_and_check(&rig, &mut g, 1);

    rig.link_up.store(false, Ordering::SeqCst);
    closed_within(&mut g, Duration::from_secs(2)).expect("connection kept after carrier loss");
    // The fd cannot be unbound: each connection is accepted and closed at once (EOF), so a
    // frontend never waits on a handshake nobody answers.
    for _ in 0..3 {
        let mut s = UnixStream::connect(&sock).expect("the inherited socket still listens");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).expect("EOF, not a timeout"), 0);
    }

    rig.link_up.store(true, Ordering::SeqCst);
    // Give the loop a carrier poll to notice, then a normal frontend is served again.
    std::thread::sleep(Duration::from_millis(200));
    let mut g2 = VuGuest::connect(&sock, 1, 256, ALL, Duration::from_secs(5));
    tx_one_and_check(&rig, &mut g2, 2);
}

#[test]
fn link_loss_in_client_mode_ends_the_connection_and_reconnects_when_carrier_returns() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("frontend.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let rig =
        Rig::start_disconnecting_on_link_down(1, dir, SocketMode::Connect(sock.clone()), sock);
    let (stream, _) = listener.accept().unwrap();
    let mut g = VuGuest::over(Frontend::from_stream(stream, 2), 1, 256, ALL);
    tx_one_and_check(&rig, &mut g, 1);

    rig.link_up.store(false, Ordering::SeqCst);
    closed_within(&mut g, Duration::from_secs(2)).expect("connection kept after carrier loss");
    listener.set_nonblocking(true).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        listener.accept().is_err(),
        "the backend connected again while the link is down"
    );

    rig.link_up.store(true, Ordering::SeqCst);
    listener.set_nonblocking(false).unwrap();
    let (stream, _) = listener.accept().unwrap();
    let mut g2 = VuGuest::over(Frontend::from_stream(stream, 2), 1, 256, ALL);
    tx_one_and_check(&rig, &mut g2, 2);
}

#[test]
fn carrier_changes_are_announced_with_config_change_msg_on_the_backend_channel() {
    let rig = Rig::start(1);
    let mut g = rig.guest(1, ALL);
    let chan = g.open_backend_channel();
    chan.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let next_message = |chan: &UnixStream| -> [u8; 12] {
        let mut hdr = [0u8; 12];
        (&*chan)
            .read_exact(&mut hdr)
            .expect("a message on the backend channel");
        hdr
    };
    // VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (2), version 1, no payload, no reply asked for.
    let config_change = [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    for (up, status) in [(false, 0), (true, 1), (false, 0), (true, 1)] {
        rig.link_up.store(up, Ordering::SeqCst);
        assert_eq!(next_message(&chan), config_change, "link_up {up}");
        // The frontend reads the config space on the message: it already says the new state.
        assert_eq!(g.link_status(), status);
    }
    // No change, no message; the connection still carries frames.
    chan.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!((&chan).read(&mut b).is_err(), "a message without a change");
    tx_one_and_check(&rig, &mut g, 1);
}
