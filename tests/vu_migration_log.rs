//! Dirty-page logging for live migration, over a real vhost-user socket with fake host queues
//! (no root). The frontend does what QEMU does when a migration starts and ends:
//! SET_LOG_BASE with a memfd bitmap, SET_FEATURES with and then without VHOST_F_LOG_ALL.
//! The oracle is the bitmap itself: every page macvhost wrote must be marked, and nothing else.

mod support {
    #[path = "rig.rs"]
    pub mod rig;
    #[path = "vu_driver.rs"]
    pub mod vu_driver;
}

use std::collections::BTreeSet;
use std::time::Duration;

use support::rig::*;
use support::vu_driver::{VuGuest, HDR_LEN, MEM_SIZE, VHOST_F_LOG_ALL};

/// One bit per 4 KiB page of the test guest's memory.
const LOG_BYTES: usize = MEM_SIZE / 4096 / 8;

/// Sends `n` frames from the host side and waits until the guest has them; returns the used
/// entries they took.
fn deliver_rx(rig: &Rig, g: &mut VuGuest, n: u32, seq0: u32) -> Vec<(u16, u32)> {
    // With MRG_RXBUF and GSO a 64 KiB frame must fit in what is posted: keep 64 buffers out.
    g.post_rx(0, 64, 2048);
    g.kick(g.rx(0));
    for seq in seq0..seq0 + n {
        let mut pkt = vec![0u8; HDR_LEN];
        pkt.extend_from_slice(&frame(seq, 60 + (seq as usize * 37) % 1400));
        rig.peers[0].send(&pkt).unwrap();
    }
    let mut used = Vec::new();
    let rxq = g.rx(0);
    assert!(
        g.wait_until(Duration::from_secs(3), |g| {
            used.extend(g.take_used(rxq));
            used.len() >= n as usize
        }),
        "only {} of {n} frames reached the guest; counters {:?}",
        used.len(),
        rig.stats[0].snapshot()
    );
    used
}

#[test]
fn backend_offers_log_all_and_log_shmfd() {
    let rig = Rig::start(1);
    let g = rig.guest(1, ALL & !VHOST_F_LOG_ALL);
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostBackend;
    let f = g.frontend.get_features().unwrap();
    assert!(
        f & VHOST_F_LOG_ALL != 0,
        "features {f:#x} lack VHOST_F_LOG_ALL"
    );
    let mut fe = g.frontend;
    let pf = fe.get_protocol_features().unwrap();
    assert!(
        pf.contains(vhost::vhost_user::message::VhostUserProtocolFeatures::LOG_SHMFD),
        "protocol features {pf:?} lack LOG_SHMFD"
    );
}

#[test]
fn every_page_written_is_logged_while_log_all_is_on_and_none_after_it_is_off() {
    let rig = Rig::start(1);
    let mut g = rig.guest(1, ALL & !VHOST_F_LOG_ALL);
    assert_eq!(g.acked_features & VHOST_F_LOG_ALL, 0);

    // Before logging starts nothing is marked (there is no log yet), and frames flow.
    deliver_rx(&rig, &mut g, 8, 0);

    let log = g.start_dirty_log(LOG_BYTES);
    let used = deliver_rx(&rig, &mut g, 40, 100);
    // TX too: its used ring is written.
    for seq in 0..10 {
        tx_one_and_check(&rig, &mut g, 1000 + seq);
    }
    let txq = g.tx(0);
    assert!(g.wait_until(Duration::from_secs(2), |g| {
        g.take_used(txq);
        g.rings[txq].free.len() == usize::from(g.rings[txq].layout.size)
    }));

    let got = VuGuest::harvest_log(&log);
    let mut want: BTreeSet<u64> = BTreeSet::new();
    for &(head, len) in &used {
        want.extend(g.rx_buffer_pages(0, head, len));
    }
    want.extend(g.used_ring_pages(g.rx(0)));
    want.extend(g.used_ring_pages(txq));
    let missing: Vec<_> = want.difference(&got).collect();
    let extra: Vec<_> = got.difference(&want).collect();
    println!(
        "logging on: {} frames in, 10 out; {} pages marked, {} expected",
        used.len(),
        got.len(),
        want.len()
    );
    assert!(
        missing.is_empty(),
        "pages written but not logged: {missing:?}; got {got:?} rx used {:?} tx used {:?}",
        g.used_ring_pages(g.rx(0)),
        g.used_ring_pages(txq)
    );
    assert!(extra.is_empty(), "pages logged but not written: {extra:?}");

    // Migration over (or cancelled): logging stops although the log is still mapped.
    g.stop_dirty_log();
    let used = deliver_rx(&rig, &mut g, 40, 200);
    for seq in 0..10 {
        tx_one_and_check(&rig, &mut g, 2000 + seq);
    }
    let after = VuGuest::harvest_log(&log);
    println!(
        "logging off: {} frames in, 10 out; {} pages marked",
        used.len(),
        after.len()
    );
    assert!(
        after.is_empty(),
        "logged after LOG_ALL was cleared: {after:?}"
    );

    // And it starts again on the next migration, in a new log.
    let log2 = g.start_dirty_log(LOG_BYTES);
    let used = deliver_rx(&rig, &mut g, 5, 300);
    let again = VuGuest::harvest_log(&log2);
    for &(head, len) in &used {
        for p in g.rx_buffer_pages(0, head, len) {
            assert!(again.contains(&p), "second migration: page {p} not logged");
        }
    }
    assert!(
        VuGuest::harvest_log(&log).is_empty(),
        "the old log is left alone"
    );
}

/// QEMU re-sends SET_VRING_ADDR to running rings to toggle `VHOST_VRING_F_LOG`; vhost-user-backend
/// then re-reads `used.idx` from guest memory. That must never rewind the worker's `next_used`:
/// every frame must come back once, in order, with `used.idx` only moving forward.
#[test]
fn set_vring_addr_on_running_rings_under_traffic_loses_no_used_entry() {
    const FRAMES: u32 = 60_000;
    let rig = Rig::start(1);
    let mut g = rig.guest(1, ALL & !MRG_RXBUF & !VHOST_F_LOG_ALL);
    let rxq = g.rx(0);
    g.post_rx(0, 256, 2048);
    g.kick(rxq);
    let peer = rig.peers[0].try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for seq in 0..FRAMES {
            let mut pkt = vec![0u8; HDR_LEN];
            pkt.extend_from_slice(&frame(seq, 60 + (seq as usize * 7) % 200));
            // The fake host queue is a datagram socket: wait while it is full.
            while peer.send(&pkt).is_err() {
                std::thread::yield_now();
            }
        }
    });
    let mut got = 0u32;
    let mut resent = 0u32;
    let mut last_used_idx = 0u16;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got < FRAMES && std::time::Instant::now() < deadline {
        g.resend_vring_addr(rxq, resent % 2 == 0);
        resent += 1;
        let idx = g.rings[rxq].used_idx();
        assert!(
            idx.wrapping_sub(last_used_idx) < 0x8000,
            "used.idx went backwards: {last_used_idx} -> {idx}"
        );
        last_used_idx = idx;
        for f in g.recv_frames(0) {
            let seq = u32::from_be_bytes(f[14..18].try_into().unwrap());
            assert_eq!(seq, got, "frame {got} lost, repeated or reordered");
            assert_eq!(
                f,
                frame(seq, 60 + (seq as usize * 7) % 200),
                "frame {seq} altered"
            );
            got += 1;
        }
        g.post_rx(0, 256, 2048);
        g.kick(rxq);
    }
    sender.join().unwrap();
    println!("{got} frames received in order while SET_VRING_ADDR was re-sent {resent} times");
    assert_eq!(got, FRAMES, "counters {:?}", rig.stats[0].snapshot());
}
