//! The hostile-frontend fuzzer (`macvhost::testkit::fuzz::hostile::fuzz`) against the real serve loop
//! and socket (shim included) over fake host queues: randomized and structured-but-wrong
//! connections, each followed by a health probe (next frontend served within 5 s, fd count back
//! to its baseline, no CPU while idle, RSS flat over the run).
//!
//! CI runs it bounded: a fixed seed, then a random one (printed), `MACVHOST_HOSTILE_SECS`
//! seconds each (default 18; `tests/host_hostile_binary.rs` runs the same fuzzer against the
//! sealed binary). By hand, longer: `MACVHOST_HOSTILE_SECS=1200`, and
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
    use macvhost::testkit::fuzz::hostile::fuzz_from_env;

    use super::support::rig::Rig;

    /// Seconds per seed in CI. 18 (was 30): `tests/host_hostile_binary.rs` runs the same
    /// fuzzer against the sealed binary for 2 × 12 s, so the hostile fuzzing in CI stays at a
    /// minute in all.
    const CI_SECS: u64 = 18;

    #[test]
    fn hostile_frontends_leave_fds_rss_and_idle_cpu_flat_and_the_next_one_served() {
        if let Ok(filter) = std::env::var("MACVHOST_HOSTILE_LOG") {
            // What macvhost logs about each hostile connection (e.g. `warn`).
            let _ = macvhost::init_logging(&filter);
        }
        let rig = Rig::start(2);
        fuzz_from_env(&rig.target(), "in-process", CI_SECS);
    }
}
