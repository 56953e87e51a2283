//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/*`) through the very functions the
//! cargo-fuzz targets call (`macvhost::testkit::fuzz`), on stable Rust, with all their oracles.
//! Needs nothing: the test kit reaches every test through the crate's dev-dependency on itself.
//!
//! `MACVHOST_WRITE_SEEDS=1 cargo test --test fuzz_corpus` rewrites the generated seeds
//! (`seed-*` files) from `macvhost::testkit::fuzz::seeds`.

/// One test per fuzz target, replaying its committed corpus.
pub mod replay {
    use std::path::PathBuf;
    use std::sync::Mutex;

    use macvhost::testkit::fuzz as fuzzing;
    use macvhost::testkit::Need;

    /// The vhost-user target counts the process's open fds and panics: the tests of this file
    /// run one at a time (whatever `--test-threads`).
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// Most files and bytes a target's committed corpus may hold.
    const MAX_FILES: usize = 60;
    const MAX_BYTES: u64 = 512 * 1024;

    fn corpus_dir(target: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target)
    }

    fn files(target: &str) -> Vec<PathBuf> {
        let dir = corpus_dir(target);
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    }

    /// Serialises the tests of this file.
    pub fn lock() -> std::sync::MutexGuard<'static, ()> {
        ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn replay(target: &str) {
        let _g = lock();
        let files = files(target);
        assert!(!files.is_empty(), "corpus of {target} is empty");
        assert!(
            files.len() <= MAX_FILES,
            "corpus of {target} has {} files (keep it small: minimise with cargo fuzz cmin)",
            files.len()
        );
        let total: u64 = files
            .iter()
            .map(|p| p.metadata().expect("metadata").len())
            .sum();
        assert!(total <= MAX_BYTES, "corpus of {target} is {total} bytes");
        for p in &files {
            let data = std::fs::read(p).expect("read corpus file");
            let r = std::panic::catch_unwind(|| fuzzing::run(target, &data));
            if let Err(e) = r {
                eprintln!("{target}: {} failed", p.display());
                std::panic::resume_unwind(e);
            }
        }
        eprintln!("{target}: {} corpus inputs replayed", files.len());
    }

    #[test]
    fn tx_chain_corpus() {
        replay("tx_chain");
    }

    #[test]
    fn rx_fill_corpus() {
        replay("rx_fill");
    }

    #[test]
    fn vnet_hdr_corpus() {
        replay("vnet_hdr");
    }

    #[test]
    fn vhost_user_msgs_corpus() {
        replay("vhost_user_msgs");
    }

    #[test]
    fn mcast_report_corpus() {
        replay("mcast_report");
    }

    /// `MACVHOST_FUZZ_REPRO=<target>:<file>` replays one file (say a crash artifact), with
    /// `MACVHOST_FUZZ_TRACE=1` for a trace of each datapath call. An opt-in tool: skipped
    /// otherwise.
    #[test]
    fn repro_from_env() {
        macvhost::require!(&[Need::OptIn("MACVHOST_FUZZ_REPRO")]);
        let spec = std::env::var("MACVHOST_FUZZ_REPRO").expect("MACVHOST_FUZZ_REPRO");
        let (target, file) = spec
            .split_once(':')
            .expect("MACVHOST_FUZZ_REPRO=<target>:<file>");
        let _g = lock();
        let data = std::fs::read(file).expect("read the input");
        fuzzing::run(target, &data);
    }

    /// Every generated seed is committed (or, with `MACVHOST_WRITE_SEEDS=1`, gets written).
    #[test]
    fn generated_seeds_are_committed() {
        let _g = lock();
        let write = std::env::var_os("MACVHOST_WRITE_SEEDS").is_some_and(|v| v == "1");
        for (target, name, bytes) in fuzzing::seeds::all() {
            assert!(fuzzing::TARGETS.contains(&target));
            let path = corpus_dir(target).join(format!("seed-{name}"));
            if write {
                std::fs::create_dir_all(corpus_dir(target)).expect("corpus dir");
                std::fs::write(&path, &bytes).expect("write seed");
            } else {
                let have = std::fs::read(&path).unwrap_or_else(|e| {
                    panic!(
                        "{}: {e} (regenerate with MACVHOST_WRITE_SEEDS=1)",
                        path.display()
                    )
                });
                assert!(have == bytes, "{} is stale", path.display());
            }
        }
    }
}

/// Minimised findings, each also a file in its target's corpus.
mod regressions {
    use macvhost::testkit::fuzz as fuzzing;

    /// vhost-user-backend 0.24 leaked the exit-event consumer eventfd of every worker thread of
    /// every connection (a connection with no message at all is enough); `NetBackend` now closes
    /// them when it is dropped. The target's oracle counts `/proc/self/fd`.
    #[test]
    fn regression_exit_event_fd_leak() {
        let _g = super::replay::lock();
        let data = include_bytes!("../fuzz/corpus/vhost_user_msgs/regress-exit-event-fd-leak");
        for _ in 0..3 {
            fuzzing::vhost_user_msgs(data);
        }
    }
}

mod regressions_vnet {
    /// With a GSO offload acked and an MTU above 65532, `rx_max_frame_len` was header + 65550,
    /// too small for an MTU-sized frame with a VLAN tag (MRG_RXBUF windows were sized from it).
    #[test]
    fn regression_gso_mtu_65535_rx_max_frame_len() {
        let _g = super::replay::lock();
        let data = include_bytes!("../fuzz/corpus/vnet_hdr/regress-gso-mtu-65535");
        macvhost::testkit::fuzz::vnet_hdr(data);
    }
}

mod regressions_rx {
    /// MRG_RXBUF frame over 16 chains, used ring partly outside guest memory: `add_used` failed
    /// on the 9th chain, `process_rx` reported `broken` and rewound `next_avail` over all 16
    /// popped chains although 8 were already in the used ring (they would be popped and used
    /// a second time if the queue were resumed from `GET_VRING_BASE`). The oracle: no more used
    /// entries than consumed chains, each returned head consumed.
    #[test]
    fn regression_broken_used_ring_mid_frame_keeps_used_chains_consumed() {
        let _g = super::replay::lock();
        let data = include_bytes!(
            "../fuzz/corpus/rx_fill/regress-broken-used-ring-mid-frame-rewinds-used-chains"
        );
        macvhost::testkit::fuzz::rx_fill(data);
    }
}
