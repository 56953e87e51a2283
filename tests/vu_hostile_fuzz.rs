//! The hostile-frontend fuzzer (`macvhost::testkit::fuzz::hostile::fuzz`) against the real serve loop
//! and socket (shim included) over fake host queues: randomized and structured-but-wrong
//! connections, each followed by a health probe (next frontend served within 5 s, fd count back
//! to its baseline, no CPU while idle, RSS flat over the run).
//!
//! CI runs it bounded: a fixed seed, then a random one (printed), `MACVHOST_HOSTILE_SECS`
//! seconds each (default 30). By hand, longer: `MACVHOST_HOSTILE_SECS=1200`, and
//! `MACVHOST_HOSTILE_SEED=0x...` to replay one seed only, `MACVHOST_HOSTILE_LOG=warn` to see
//! what macvhost logs about each connection:
//!
//! ```sh
//! MACVHOST_HOSTILE_SECS=1200 cargo test --release --features test-utils --test vu_hostile_fuzz -- --nocapture
//! ```

#[cfg(feature = "test-utils")]
mod support {
    #[path = "rig.rs"]
    pub mod rig;
    #[path = "vu_driver.rs"]
    pub mod vu_driver;
}

#[cfg(feature = "test-utils")]
mod fuzz {
    use std::time::Duration;

    use macvhost::testkit::fuzz::hostile::{fuzz, FuzzConfig};

    use super::support::rig::Rig;

    /// The seed CI always runs.
    const FIXED_SEED: u64 = 0x15_15_15;

    fn env_u64(name: &str) -> Option<u64> {
        let v = std::env::var(name).ok()?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }

    fn random_seed() -> u64 {
        let mut b = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
            .expect("read /dev/urandom");
        u64::from_ne_bytes(b)
    }

    #[test]
    fn hostile_frontends_leave_fds_rss_and_idle_cpu_flat_and_the_next_one_served() {
        let secs = env_u64("MACVHOST_HOSTILE_SECS").unwrap_or(30);
        let seeds = match env_u64("MACVHOST_HOSTILE_SEED") {
            Some(s) => vec![s],
            None => vec![FIXED_SEED, random_seed()],
        };
        if let Ok(filter) = std::env::var("MACVHOST_HOSTILE_LOG") {
            // What macvhost logs about each hostile connection (e.g. `warn`).
            let _ = macvhost::init_logging(&filter);
        }
        let rig = Rig::start(2);
        let target = rig.target();
        for seed in seeds {
            // Printed first, so that a failing run can be replayed.
            println!("hostile fuzz: seed {seed:#x}, {secs} s (MACVHOST_HOSTILE_SEED={seed:#x})");
            let r = fuzz(
                &target,
                FuzzConfig {
                    seed,
                    duration: Duration::from_secs(secs),
                },
            );
            println!(
                "hostile fuzz: seed {seed:#x}: {} connections ({} ended by macvhost), {} messages; \
                 fds {} at the start, {} at most after a connection; RSS {} → {} KiB (max {}); \
                 slowest next-frontend probe {:?}; most idle CPU {} ticks / 200 ms; RSS trend \
                 {:?} KiB",
                r.connections,
                r.closed_by_target,
                r.messages,
                r.fds_baseline,
                r.fds_max,
                r.rss_start_kib,
                r.rss_end_kib,
                r.rss_max_kib,
                r.slowest_probe,
                r.idle_ticks_max,
                r.rss_trend_kib
            );
            assert!(r.connections > 0);
        }
    }
}
