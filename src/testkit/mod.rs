//! The test kit (unit tests, and feature `test-utils` for the integration tests, benches and
//! fuzz targets): everything the suites share, defined once. It sits above every other module
//! and nothing but test code imports it.
//!
//! - [`require`]: the one skip switch. Every test that needs something the machine may lack
//!   (root, a tool, a kernel facility) asks here first; with `MACVHOST_E2E_REQUIRED=1` a missing
//!   need fails the test instead of skipping it.
//! - [`ring`]: the guest's side of a split virtqueue (descriptor table, avail and used rings,
//!   indirect tables, chains, event idx, the "every head returned exactly once" ledger), over
//!   [`memory`]'s test guest memory.
//! - [`host_queue`]: [`FakeHostQueue`], a host queue over a datagram socketpair with fault
//!   injection and a record of the control calls.
//! - [`netns`]: a network namespace per test and the topologies built in it (veth, macvtap on a
//!   fresh `/dev/tapN`, bridge, tap).
//! - [`daemon`]: a `macvhost` process in a namespace, stopped with SIGTERM on drop, its log
//!   printed when the test fails.
//! - [`fuzz`]: the fuzz target bodies, shared by `fuzz/` and `tests/fuzz_corpus.rs`.

pub mod daemon;
pub mod fuzz;
pub mod host_queue;
pub mod memory;
pub mod netns;
pub mod ring;

pub use host_queue::FakeHostQueue;
pub use memory::*;
pub use ring::{GuestQueue, Layout, SplitRing, INDIRECT, NEXT, WRITE};

use std::path::{Path, PathBuf};

/// Env var: when `1`, a test whose needs are not met fails instead of printing `skipped:`.
/// `.ci/run` sets it, so CI cannot pass by skipping.
pub const REQUIRED_ENV: &str = "MACVHOST_E2E_REQUIRED";

/// Something a test needs from the machine it runs on.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    /// Effective root: network namespaces, `mknod`, taps and macvtaps.
    Root,
    /// A program on `PATH` (or in `/usr/sbin`, `/sbin`), e.g. `dpdk-testpmd`.
    Tool(&'static str),
    /// A file or device node, e.g. `/dev/net/tun`.
    File(&'static str),
    /// Anything else: `holds` checks it, `what` names it in the skip line (e.g. the QEMU
    /// guest image or what builds it).
    Check(&'static str, fn() -> bool),
    /// An opt-in test (an experiment, a tool) that runs only when this env var is set (and not
    /// `0`). Without it the test is not selected: it skips, names only this, and
    /// `MACVHOST_E2E_REQUIRED` does not turn that into a failure (nothing is missing; the run
    /// chose not to spend the time).
    OptIn(&'static str),
}

impl Need {
    /// Why this need is not met here, or `None` when it is.
    fn missing(self) -> Option<String> {
        match self {
            Need::Root => (!is_root()).then(|| "root".to_owned()),
            Need::Tool(t) => which(t).is_none().then(|| format!("`{t}` on PATH")),
            Need::File(f) => (!Path::new(f).exists()).then(|| f.to_owned()),
            Need::Check(what, holds) => (!holds()).then(|| what.to_owned()),
            Need::OptIn(var) => (!opted_in(var)).then(|| format!("{var} set (opt-in)")),
        }
    }
}

/// `require!(needs)`: [`require`], and return from the calling test when it says no. The usual
/// first line of a test that needs something: `require!(&[Need::Root, Need::Tool("ip")]);`.
#[macro_export]
macro_rules! require {
    ($needs:expr) => {
        if !$crate::testkit::require($needs) {
            return;
        }
    };
}

/// True when every need holds. Otherwise prints `skipped: <test>: needs <what>` straight to
/// stderr and returns false (the test then returns early) — or, when `MACVHOST_E2E_REQUIRED=1`,
/// panics with that line, so a run that requires everything cannot pass by skipping. The test
/// is named after the calling thread, which libtest names after the test.
pub fn require(needs: &[Need]) -> bool {
    let Some((msg, fatal)) = unmet(needs) else {
        return true;
    };
    if fatal && opted_in(REQUIRED_ENV) {
        panic!("{msg} [{REQUIRED_ENV}=1: a test that cannot run fails]");
    }
    // libtest captures `eprintln!` of passing tests; a skip must show in a plain `cargo test`.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
    false
}

/// The skip line for the needs not met and whether it may fail the test; `None` when all hold.
/// An experiment not opted into is not selected: only that is named, and it never fails.
fn unmet(needs: &[Need]) -> Option<(String, bool)> {
    let missing: Vec<(Need, String)> = needs
        .iter()
        .filter_map(|&n| n.missing().map(|why| (n, why)))
        .collect();
    let opt_ins: Vec<&str> = missing
        .iter()
        .filter(|(n, _)| matches!(n, Need::OptIn(_)))
        .map(|(_, w)| w.as_str())
        .collect();
    let (why, fatal) = if !opt_ins.is_empty() {
        (opt_ins, false)
    } else if !missing.is_empty() {
        (missing.iter().map(|(_, w)| w.as_str()).collect(), true)
    } else {
        return None;
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed thread>")
        .to_owned();
    Some((format!("skipped: {test}: needs {}", why.join(", ")), fatal))
}

fn opted_in(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Effective root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The fds as a `--tap-fd` / `--fd` list: `3,4,5`.
pub fn fd_list<F: std::os::fd::AsRawFd>(fds: &[F]) -> String {
    let nums: Vec<String> = fds.iter().map(|f| f.as_raw_fd().to_string()).collect();
    nums.join(",")
}

/// Finds an executable on `PATH`, then in the sbin directories (`ip` lives in `/usr/sbin`,
/// which a non-root `PATH` may lack).
pub fn which(prog: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Polls `cond` every 5 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Drops `v` (a watcher, a worker: something whose drop stops a thread) and asserts that the
/// drop took less than `limit`, i.e. that stopping did not wait out a timeout or a backoff.
pub fn assert_drops_within<T>(v: T, limit: std::time::Duration) {
    let t = std::time::Instant::now();
    drop(v);
    let took = t.elapsed();
    assert!(took < limit, "stopping took {took:?} (limit {limit:?})");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_passes_when_every_need_holds() {
        assert!(require(&[Need::File("/"), Need::Tool("sh")]));
        assert!(require(&[]));
    }

    #[test]
    fn missing_needs_are_named() {
        assert_eq!(
            Need::File("/no/such/file").missing().as_deref(),
            Some("/no/such/file")
        );
        assert!(Need::Tool("no-such-tool-mvh")
            .missing()
            .unwrap()
            .contains("no-such-tool-mvh"));
        assert!(Need::OptIn("MACVHOST_NO_SUCH_OPT_IN").missing().is_some());
        assert_eq!(Need::Root.missing().is_none(), is_root());
    }

    #[test]
    fn the_skip_line_names_the_test_and_every_unmet_need() {
        let (msg, fatal) = unmet(&[
            Need::File("/"),
            Need::File("/no/such/file"),
            Need::Tool("no-such-tool-mvh"),
        ])
        .unwrap();
        assert_eq!(
            msg,
            "skipped: testkit::tests::the_skip_line_names_the_test_and_every_unmet_need: \
             needs /no/such/file, `no-such-tool-mvh` on PATH"
        );
        assert!(
            fatal,
            "a missing file fails the test when everything is required"
        );
        assert!(unmet(&[Need::File("/")]).is_none());
    }

    #[test]
    fn an_experiment_not_opted_into_is_skipped_whatever_else_is_missing() {
        let (msg, fatal) = unmet(&[
            Need::OptIn("MACVHOST_NO_SUCH_OPT_IN"),
            Need::File("/no/such/file"),
        ])
        .unwrap();
        assert!(!fatal, "never a failure");
        assert!(
            msg.ends_with("needs MACVHOST_NO_SUCH_OPT_IN set (opt-in)"),
            "{msg}"
        );
    }
}
