//! Test-only: a throwaway network namespace per test, entered from a helper thread.
//!
//! How the code under test sees the right namespace:
//! - the helper thread `setns(CLONE_NEWNET)`s into the test's namespace, so sockets and tun
//!   devices it creates, and interface ioctls, belong there, while the test process stays put;
//! - sysfs shows the namespace that *mounted* it, not the reader's, so the thread also
//!   `unshare(CLONE_NEWNS)`s (which gives it its own fs_struct and mount table), makes every mount
//!   a slave so nothing propagates back, and mounts a fresh sysfs on /sys: `ip netns exec` does
//!   the same. `/dev` stays shared, which is what the stale-`/dev/tapN` tests need.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

pub const IP: &str = "/usr/sbin/ip";

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `ip ARGS...`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new(IP).args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace named `mvh-host-<pid>-<n>`, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> NetNs {
        let name = format!(
            "mvh-host-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        NetNs { name }
    }

    /// `ip -n NS ARGS...`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs `f` on a thread inside the namespace, with /sys remounted for it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
                unshare(CloneFlags::CLONE_NEWNS).expect("unshare mount ns");
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_SLAVE,
                    None::<&str>,
                )
                .expect("make mounts slave");
                umount2("/sys", MntFlags::MNT_DETACH).expect("umount /sys");
                mount(
                    Some("sysfs"),
                    "/sys",
                    Some("sysfs"),
                    MsFlags::empty(),
                    None::<&str>,
                )
                .expect("mount sysfs");
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// veth0/veth1 plus macvtap `mvt0` (bridge mode, on veth0) with ifindex `index`, all down.
    pub fn with_macvtap(&self, index: u32) {
        self.ip(&[
            "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
        ]);
        let index = index.to_string();
        self.ip(&[
            "link", "add", "link", "veth0", "name", "mvt0", "index", &index, "type", "macvtap",
            "mode", "bridge",
        ]);
    }

    pub fn all_up(&self) {
        for dev in ["veth0", "veth1", "mvt0"] {
            self.ip(&["link", "set", dev, "up"]);
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its links (and devtmpfs drops their /dev/tapN).
        let _ = Command::new(IP).args(["netns", "del", &self.name]).status();
    }
}

/// An ifindex for a test macvtap whose `/dev/tapN` does not exist: unique per process and test,
/// far above the small indexes real hosts use, so parallel tests never share a `/dev/tapN`.
pub fn free_ifindex() -> u32 {
    let base = 100_000 + (std::process::id() % 10_000) * 100;
    loop {
        let n = base + SEQ.fetch_add(1, Ordering::Relaxed) % 100;
        if !tap_node(n).exists() {
            return n;
        }
    }
}

pub fn tap_node(ifindex: u32) -> PathBuf {
    PathBuf::from(format!("/dev/tap{ifindex}"))
}

/// Removes a `/dev` node a test created, on drop.
#[derive(Debug)]
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes a skip notice straight to stderr (libtest captures `eprintln!` of passing tests, and a
/// skip must be visible in a plain `cargo test`).
pub(crate) fn print_skip(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}
