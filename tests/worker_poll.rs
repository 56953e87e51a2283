//! `--poll-us` (adaptive busy polling, `worker::set_poll_us`) over the real serve loop and fake
//! host queues (no root): after a wake-up the worker keeps servicing its rings, so a frame the
//! guest posts without a kick inside the window still goes out; without polling it waits for
//! the kick; and once the window has passed with nothing to do, an idle pair is never woken.
//!
//! The setting is process-wide (set once at start-up by `server::run`), so this file holds one
//! test that sets it in turn.

mod support {
    #[path = "rig.rs"]
    pub mod rig;
    #[path = "vu_driver.rs"]
    pub mod vu_driver;
}

use std::thread;
use std::time::{Duration, Instant};

use support::rig::{frame, tx_one_and_check, Rig, ALL};
use support::vu_driver::HDR_LEN;

/// The next frame on the host side within `wait`, if any.
fn host_frame(rig: &Rig, wait: Duration) -> Option<Vec<u8>> {
    rig.peers[0].set_read_timeout(Some(wait)).unwrap();
    let mut buf = vec![0u8; 2048];
    let got = rig.peers[0]
        .recv(&mut buf)
        .ok()
        .map(|n| buf[HDR_LEN..n].to_vec());
    rig.peers[0]
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    got
}

#[test]
fn poll_us_sends_unkicked_frames_within_the_window_and_idle_pairs_are_never_woken() {
    macvhost::worker::set_poll_us(0);
    let rig = Rig::start(1);
    let mut g = rig.guest(1, ALL);
    let connected = Instant::now();
    // RX buffers posted: RX watches the host queue. A kick that lands before the ring is
    // enabled is lost, and the one-off "no buffers" recheck (RX_RECHECK_NS) finds them; wait
    // it out so no timer wakes the worker during the test.
    g.post_rx(0, 8, 2048);
    g.kick(g.rx(0));
    thread::sleep(
        Duration::from_nanos(macvhost::worker::state::RX_RECHECK_NS) + Duration::from_millis(100),
    );

    // Without polling, a frame posted without a kick waits for the kick. (Posted 50 ms after
    // the last round: a frame posted while a round still runs is picked up by the round's
    // recheck after re-enabling kicks, with or without polling.)
    tx_one_and_check(&rig, &mut g, 1);
    thread::sleep(Duration::from_millis(50));
    let f2 = frame(2, 300);
    assert!(g.send(0, &f2), "TX ring full");
    assert_eq!(host_frame(&rig, Duration::from_millis(300)), None);
    g.kick(g.tx(0));
    assert_eq!(host_frame(&rig, Duration::from_secs(2)), Some(f2));

    // With a 300 ms window, the kicked frame starts the window and the next one, not kicked,
    // is picked up by polling.
    macvhost::worker::set_poll_us(300_000);
    tx_one_and_check(&rig, &mut g, 3);
    thread::sleep(Duration::from_millis(50));
    let f4 = frame(4, 300);
    assert!(g.send(0, &f4), "TX ring full");
    assert_eq!(
        host_frame(&rig, Duration::from_millis(250)),
        Some(f4),
        "a frame posted inside the polling window must go out without a kick"
    );

    // The window ends 300 ms after the last frame; from then on an idle pair sleeps. (The
    // first IGMP/MLD query goes to the guest 1 s after connecting: measure after it.)
    thread::sleep(Duration::from_millis(500));
    let quiet_from =
        connected + macvhost::worker::l2::FIRST_QUERY_AFTER + Duration::from_millis(500);
    thread::sleep(quiet_from.saturating_duration_since(Instant::now()));
    let w0 = rig.stats[0].snapshot().wakeups;
    thread::sleep(Duration::from_secs(1));
    let idle = rig.stats[0].snapshot().wakeups - w0;
    assert_eq!(idle, 0, "{idle} wake-ups of an idle pair with --poll-us");
    // And a polling worker still answers kicks afterwards.
    tx_one_and_check(&rig, &mut g, 5);
    macvhost::worker::set_poll_us(0);
}
