//! [`Daemon`]: the one guard around a `macvhost` process that a privileged test runs inside its
//! network namespace (the host, end-to-end and guest suites, and the end-to-end bench's
//! counters).
//!
//! It serves `DIR/NAME.sock` with a control socket `DIR/NAME.ctl` and `--log-level debug`,
//! logging to `DIR/NAME.log`; [`Daemon::spawn`] returns once the socket exists. On drop:
//! SIGTERM, a wait, SIGKILL after 5 s; when the test is failing, the log's tail is printed.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::netns::{run_ok, NetNs};

/// How long a starting macvhost may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `macvhost` inside a namespace (module doc).
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    netns: String,
    args: Vec<String>,
    socket: PathBuf,
    control: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// The binary under test: `$MACVHOST_BIN` if set, else the `macvhost` cargo built beside
    /// this test executable (`target/<profile>/deps/<test>` → `target/<profile>/macvhost`).
    pub fn binary() -> PathBuf {
        if let Some(bin) = std::env::var_os("MACVHOST_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("current exe");
        let dir = exe.parent().and_then(Path::parent).expect("target dir");
        let bin = dir.join("macvhost");
        assert!(
            bin.exists(),
            "{bin:?} not built: run through `cargo test`, or set MACVHOST_BIN"
        );
        bin
    }

    /// `macvhost --socket-path DIR/macvhost.sock ARGS...` inside `ns`.
    pub fn spawn(ns: &NetNs, dir: &Path, args: &[&str]) -> Daemon {
        Self::spawn_named(ns, dir, "macvhost", args)
    }

    /// macvhost on `macvtap` applying the guest's filters and MAC, which it learns from QEMU's
    /// monitor at `qmp` (`--qmp PATH --trust-guest-rx-filters`).
    pub fn spawn_trusting_qmp(ns: &NetNs, dir: &Path, macvtap: &str, qmp: &Path) -> Daemon {
        let qmp = qmp.to_str().expect("UTF-8 QMP socket path");
        let args = [
            "--macvtap",
            macvtap,
            "--qmp",
            qmp,
            "--trust-guest-rx-filters",
        ];
        Daemon::spawn(ns, dir, &args)
    }

    /// As [`Daemon::spawn`]; `name` tells the files of several instances in one dir apart.
    pub fn spawn_named(ns: &NetNs, dir: &Path, name: &str, args: &[&str]) -> Daemon {
        let mut d = Daemon {
            child: None,
            netns: ns.name().to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            socket: dir.join(format!("{name}.sock")),
            control: dir.join(format!("{name}.ctl")),
            log: dir.join(format!("{name}.log")),
        };
        d.restart();
        d
    }

    /// Starts macvhost again with the same arguments (after [`Daemon::kill9`]), appending to
    /// the same log, and waits for its socket (with `--client`, the frontend's).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "macvhost is still running");
        // With --client the socket is the frontend's (it listens there): not ours to remove.
        if !self.args.iter().any(|a| a == "--client") {
            let _ = fs::remove_file(&self.socket);
        }
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("create macvhost log");
        let child = spawn_logging_to(
            NetNs::attach(&self.netns)
                .command(Self::binary())
                .arg("--socket-path")
                .arg(&self.socket)
                .arg("--control-socket")
                .arg(&self.control)
                .args(&self.args)
                .args(["--log-level", "debug"])
                .env("RUST_BACKTRACE", "1"),
            out,
        );
        self.child = Some(child);
        let t = Instant::now();
        while !is_socket(&self.socket) {
            self.check_alive();
            assert!(
                t.elapsed() < START_TIMEOUT,
                "macvhost did not create {:?} within {START_TIMEOUT:?}; log:\n{}",
                self.socket,
                self.log_tail(200)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The `--control-socket`.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// The file macvhost's stderr goes to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far (empty when it cannot be read).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// macvhost's pid (`ip netns exec` execs it, so the child's pid is macvhost's).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Panics (with the log) if macvhost has exited.
    pub fn check_alive(&mut self) {
        let child = self.child.as_mut().expect("running");
        if let Some(status) = child.try_wait().expect("try_wait") {
            self.child = None;
            panic!(
                "macvhost exited unexpectedly ({status}); log {:?}:\n{}",
                self.log,
                self.log_tail(200)
            );
        }
    }

    /// `macvhost stats CONTROL --json` (the operator's view).
    pub fn report(&self) -> crate::control::StatsReport {
        let out = run_ok(
            Command::new(Self::binary())
                .args(["stats", "--json"])
                .arg(&self.control),
        );
        serde_json::from_str(&out).expect("stats JSON")
    }

    /// Per-queue-pair counters.
    pub fn stats(&self) -> Vec<BTreeMap<String, u64>> {
        self.report()
            .queues
            .into_iter()
            .map(|q| q.counters)
            .collect()
    }

    /// Device-wide counters (the guest's multicast groups and MAC).
    pub fn device_stats(&self) -> BTreeMap<String, u64> {
        self.report().device
    }

    /// SIGKILL (no cleanup: the crash case).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to 10 s. Returns the exit status (panics on timeout).
    pub fn shutdown(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        terminate(&mut child, Signal::SIGTERM, Duration::from_secs(10)).unwrap_or_else(|status| {
            panic!(
                "macvhost did not exit within 10 s of SIGTERM (killed: {status}); log:\n{}",
                self.log_tail(200)
            )
        })
    }

    /// [`Daemon::shutdown`] and assert exit status 0.
    pub fn shutdown_clean(&mut self) {
        let status = self.shutdown();
        assert!(
            status.success(),
            "macvhost exited with {status} after SIGTERM; log:\n{}",
            self.log_tail(200)
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = terminate(&mut child, Signal::SIGTERM, Duration::from_secs(5));
        }
        if std::thread::panicking() {
            eprintln!(
                "---- macvhost log (netns {}, {:?}) ----\n{}\n---- end macvhost log ----",
                self.netns,
                self.log,
                self.log_tail(300)
            );
        }
    }
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Spawns `cmd` (a macvhost command line; a suite that runs macvhost without [`Daemon`]'s
/// defaults builds its own) with no stdin, stdout and stderr both written to `log`.
pub fn spawn_logging_to(cmd: &mut Command, log: File) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log fd"))
        .stderr(log)
        .spawn()
        .expect("spawn macvhost")
}

/// Sends `sig`, then waits up to `timeout`; on timeout SIGKILLs and returns `Err(status)`.
pub fn terminate(
    child: &mut Child,
    sig: Signal,
    timeout: Duration,
) -> Result<ExitStatus, ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Ok(status);
    }
    let pid = i32::try_from(child.id()).expect("Linux pids fit pid_t");
    let _ = kill(Pid::from_raw(pid), sig);
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Err(child.wait().expect("wait"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
