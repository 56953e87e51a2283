//! 10,000 frontend connect/disconnect cycles leave the backend's fd count and RSS flat
//! (fault class F2/L2). Its own test binary, so no other test's fds or memory interfere.

mod support {
    #[path = "rig.rs"]
    pub mod rig;
    #[path = "vu_driver.rs"]
    pub mod vu_driver;
}

use std::time::Instant;

use support::rig::*;
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn ten_thousand_connect_disconnect_cycles_leave_fds_and_rss_flat() {
    let rig = Rig::start(2);
    // Warm up allocator arenas, thread stacks and lazy statics.
    for i in 0..200 {
        let mut g = rig.guest(2, ALL);
        tx_one_and_check(&rig, &mut g, i);
    }
    assert!(eventually(|| open_fds() == open_fds()));
    let (fds0, rss0) = (open_fds(), rss_kib());
    let t = Instant::now();
    for i in 0..10_000u32 {
        let fe = Frontend::connect(&rig.sock, 4).expect("connect");
        fe.set_owner().expect("SET_OWNER");
        fe.get_features().expect("GET_FEATURES");
        drop(fe);
        // Every 100th cycle is a full guest with traffic.
        if i % 100 == 0 {
            let mut g = rig.guest(2, ALL);
            tx_one_and_check(&rig, &mut g, i);
        }
    }
    let elapsed = t.elapsed();
    // Connections end asynchronously (worker threads exit after the disconnect).
    let settled = eventually(|| open_fds() <= fds0);
    let (fds1, rss1) = (open_fds(), rss_kib());
    println!("10000 cycles in {elapsed:.1?}: fds {fds0} -> {fds1}, RSS {rss0} KiB -> {rss1} KiB");
    assert!(settled, "fd count grew from {fds0} to {fds1}");
    // Flat: allow allocator noise, not per-connection growth (10,000 connections × even
    // 1 KiB each would be ~10 MiB).
    assert!(
        rss1 < rss0 + 4096,
        "RSS grew from {rss0} KiB to {rss1} KiB over 10,000 connections"
    );
}
