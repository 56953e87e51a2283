//! Least privilege: once start-up is done, the process that maps guest memory gives up what
//! it no longer needs, so that a memory-safety bug reachable from a guest or frontend does not
//! hand over the host.
//!
//! # Contract
//!
//! [`seal`] runs once, on the main thread, after every privileged start-up step (host queues
//! open, macvtap created, sockets bound, netlink sockets open, sysfs read) and before the first
//! frontend is served. When it returns `Ok`, every thread of the process — those already running
//! and every thread started later — has:
//!
//! - `no_new_privs` set and the process is not dumpable (no core file with guest memory in it,
//!   no same-uid ptrace or `/proc/PID/mem`);
//! - no capability in any set: effective, permitted, inheritable, ambient and the bounding set
//!   (the bounding set only when the process had `CAP_SETPCAP`, see below);
//! - optionally the `--user`/`--group` ids (no supplementary groups);
//! - an empty filesystem view (see "Filesystem" below);
//! - a seccomp-BPF allowlist: one filter for the whole process, plus a narrower one stacked on
//!   threads that need less ([`enter_thread`] for threads started after sealing; a fixed
//!   "service" filter for the threads that were already running).
//!
//! A syscall outside the allowlist kills the process with `SIGSYS` after writing
//! `macvhost: seccomp: syscall N (name) not allowed in thread T` to stderr
//! ([`SeccompMode::Enforce`]); with [`SeccompMode::Log`] the kernel logs it (audit type 1326)
//! and the call proceeds. The kernel log also records each enforced violation.
//!
//! `seal` either applies all of this or returns an error; there is no partial success that
//! looks like success. With `--no-sandbox` ([`SandboxConfig::disabled`]) it logs a warning and
//! changes nothing.
//!
//! # Threads that already run
//!
//! Credentials, Landlock domains and per-thread seccomp filters belong to a thread, not to the
//! process. The broad seccomp filter reaches every thread through `SECCOMP_FILTER_FLAG_TSYNC`
//! (which also sets `no_new_privs` on each). For the rest, `seal` asks every other thread to
//! drop its own credentials with a real-time signal whose handler only makes raw syscalls
//! (what glibc does for `setuid` across threads), and waits for each to confirm. A thread
//! that blocks that signal, or does not answer within a second, makes `seal` fail. Once the
//! server opens everything first and starts its threads after sealing, this step has nothing
//! to do.
//!
//! # Filesystem
//!
//! Two mechanisms exist; `docs/security.md` compares them. macvhost uses a **mount namespace
//! whose root is an empty tmpfs** (passt's approach) for the main thread and every thread it
//! starts later: `unshare(CLONE_NEWNS)` (plus `CLONE_NEWUSER` when the process lacks
//! `CAP_SYS_ADMIN` and is still single-threaded), everything made private, a tmpfs, and
//! `pivot_root` into it. Nothing of the host is visible except what the sealed process still
//! uses, bind-mounted at its own path ([`SandboxConfig::dirs`]):
//!
//! - the directory of `--socket-path`: read-write when listening (the socket is moved aside
//!   and back across link loss with `--disconnect-on-link-down`, and removed on exit),
//!   read-only with `--client` (connecting to a socket needs no write access to the mount);
//! - the directory of `--control-socket` (removed on exit).
//!
//! The shim's rendezvous with vhost-user-backend is an abstract socket made by the main thread
//! after sealing: it needs no path, and Landlock's abstract-socket scope lets the process reach
//! its own.
//!
//! Threads that were running before `seal` (`signals`, `watchdog`, `link-watch`, `control`,
//! `metrics`, `qmp`) stay in the host mount namespace (a thread sharing
//! its filesystem context cannot change mount namespace), so they get **Landlock** with every
//! filesystem right denied instead, plus a seccomp filter without `connect`, `socket`, `bind`
//! or `open`. When no mount namespace can be made (no `CAP_SYS_ADMIN` and a multithreaded
//! process, or user namespaces disabled), the main thread falls back to Landlock too, with
//! rights only beneath the directories above. Landlock also scopes abstract unix sockets and
//! signals to the process (ABI 6) and denies TCP bind/connect (ABI 4) wherever it is applied.
//!
//! # What still needs privilege
//!
//! Deleting the macvtap macvhost created and, with `--trust-guest-rx-filters`, giving it the
//! guest's MAC are done by [`helper::LinkHelper`], a process the server starts before sealing
//! that keeps only `CAP_NET_ADMIN`, never maps guest memory and answers a fixed list of
//! requests on a socketpair (the privileged-helper split in `docs/security.md`). `seal` only
//! needs its pid ([`SandboxConfig::helper_pid`]): the sealed process may reap it.
//!
//! # Where threads stack their filter
//!
//! [`enter_thread`] must be called by each thread kind started after sealing: the worker at
//! its first event (`vhost_user::backend`'s `handle_event`), the relay threads at their top
//! (`vhost_user::shim::relay`), the request thread at its first callback (`features`). Until
//! those hooks are in, such threads run under the process filter only. `docs/security.md`
//! has the exact lines.
//!
//! # Capabilities without root
//!
//! Dropping the bounding set needs `CAP_SETPCAP`. A process that runs as a non-root user with
//! only `CAP_NET_ADMIN` (systemd `AmbientCapabilities=`) keeps its bounding set unless it
//! could enter a user namespace; that is harmless here because `no_new_privs` and the
//! allowlist (no `execve`) mean nothing can ever be gained from it. `seal` reports it.

mod caps;
mod filters;
mod fs;
pub mod helper;
pub mod probe;
mod seccomp;
mod syscall_names;
mod threads;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use filters::{allowlist_table, ThreadKind};
pub use seccomp::syscall_name;

/// What happens when a thread makes a syscall its filter does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Kill the process with SIGSYS, after naming the syscall and thread on stderr.
    #[default]
    Enforce,
    /// Let the syscall proceed; the kernel logs it (`SECCOMP_RET_LOG`, audit type 1326).
    Log,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "enforce" | "kill" => Ok(SeccompMode::Enforce),
            "log" => Ok(SeccompMode::Log),
            _ => Err(format!("'{s}' is not a seccomp mode: enforce or log")),
        }
    }
}

/// Which mechanism hides the host filesystem from the main thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsIsolation {
    /// A mount namespace when one can be made, else Landlock.
    #[default]
    Auto,
    /// A mount namespace with an empty root, or fail.
    MountNamespace,
    /// Landlock denying everything outside [`SandboxConfig::dirs`], or fail.
    Landlock,
}

/// What the sealed process still does in a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DirUse {
    /// Connects to a socket in it (`--client`).
    Connect,
    /// Removes a socket it created there, on exit (`--control-socket`).
    Remove,
    /// Binds (again) and removes a socket there (`--socket-path`).
    Listen,
}

/// The ids to switch to (`--user`/`--group`), resolved from names before sealing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// Real, effective and saved uid.
    pub uid: u32,
    /// Real, effective and saved gid; also the only group.
    pub gid: u32,
}

/// What [`seal`] does.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    /// `--no-sandbox`: change nothing (logged).
    pub disabled: bool,
    /// `--seccomp`.
    pub seccomp: SeccompMode,
    /// `--user`/`--group`.
    pub run_as: Option<RunAs>,
    /// How the filesystem is hidden.
    pub fs: FsIsolation,
    /// Directories the sealed process still uses, and for what.
    pub dirs: Vec<(PathBuf, DirUse)>,
    /// The pid of the [`helper::LinkHelper`] started before sealing: the sealed process may
    /// reap it (`wait4` on that pid only).
    pub helper_pid: Option<u32>,
}

/// The sandbox options on the command line, validated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxOptions {
    /// `--no-sandbox`.
    pub disabled: bool,
    /// `--seccomp`.
    pub seccomp: SeccompMode,
    /// `--user`/`--group`.
    pub run_as: Option<RunAs>,
}

/// How the filesystem ended up hidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsView {
    /// Main thread in a mount namespace with an empty root (`user_ns`: inside a new user
    /// namespace).
    MountNamespace {
        /// A user namespace was made for it.
        user_ns: bool,
    },
    /// Main thread restricted by Landlock (ABI version).
    Landlock {
        /// The kernel's Landlock ABI.
        abi: u32,
    },
    /// Nothing (`--no-sandbox`).
    Host,
}

/// What [`seal`] did.
#[derive(Debug)]
pub struct Sealed {
    /// The filesystem view of the main thread (and every later thread).
    pub fs: FsView,
    /// Threads that were already running and sealed themselves on request.
    pub other_threads: usize,
    /// The bounding set could not be emptied (no `CAP_SETPCAP`).
    pub bounding_set_kept: bool,
    /// Landlock ABI of the kernel (0: none).
    pub landlock_abi: u32,
    /// Seccomp mode in force (`None`: `--no-sandbox`).
    pub seccomp: Option<SeccompMode>,
}

/// Why sealing failed. Each is the host's doing (kernel features, limits) unless it names the
/// operator.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `--user`/`--group` cannot be applied (operator).
    #[error("--user/--group: {0}")]
    RunAs(String),
    /// A step of dropping privileges failed (host).
    #[error("cannot seal ({step}): {source}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// Neither a mount namespace nor Landlock could hide the filesystem (host).
    #[error(
        "cannot hide the filesystem: mount namespace: {mount_ns}; Landlock: {landlock} \
         (run with --no-sandbox to go without)"
    )]
    NoFsIsolation {
        /// Why the mount namespace failed.
        mount_ns: String,
        /// Why Landlock failed.
        landlock: String,
    },
    /// Compiling a seccomp filter failed (a bug in the allowlist).
    #[error("seccomp filter for {kind:?}: {reason}")]
    Filter {
        /// The thread kind.
        kind: ThreadKind,
        /// seccompiler's error.
        reason: String,
    },
    /// Another thread did not seal itself (host).
    #[error("thread {tid} did not seal itself: {reason}")]
    Thread {
        /// Its kernel thread id.
        tid: i32,
        /// What it reported, or that it did not answer.
        reason: String,
    },
    /// `seal` was called twice.
    #[error("already sealed")]
    AlreadySealed,
}

impl SandboxError {
    /// True when the command line asked for something that cannot be done (`--user`).
    pub fn is_operator_error(&self) -> bool {
        matches!(self, SandboxError::RunAs(_))
    }

    pub(crate) fn step(step: &'static str) -> impl FnOnce(std::io::Error) -> SandboxError {
        move |source| SandboxError::Step { step, source }
    }
}

/// Seals the process (see the module doc). Call once, on the main thread, after start-up.
pub fn seal(config: &SandboxConfig) -> Result<Sealed, SandboxError> {
    if config.disabled {
        tracing::warn!(
            "--no-sandbox: macvhost keeps its capabilities, sees the whole filesystem and runs \
             without a seccomp filter"
        );
        return Ok(Sealed {
            fs: FsView::Host,
            other_threads: 0,
            bounding_set_kept: true,
            landlock_abi: fs::landlock_abi(),
            seccomp: None,
        });
    }
    let started = std::time::Instant::now();
    let sealed = seal_inner(config)?;
    tracing::info!(
        fs = ?sealed.fs,
        other_threads = sealed.other_threads,
        seccomp = ?config.seccomp,
        landlock_abi = sealed.landlock_abi,
        bounding_set_kept = sealed.bounding_set_kept,
        took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "sandbox sealed: no capabilities, no_new_privs, empty filesystem view, seccomp allowlist"
    );
    if sealed.bounding_set_kept {
        tracing::warn!(
            "capability bounding set kept (no CAP_SETPCAP): harmless under no_new_privs with \
             execve forbidden"
        );
    }
    Ok(sealed)
}

fn seal_inner(config: &SandboxConfig) -> Result<Sealed, SandboxError> {
    static ONCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if ONCE.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err(SandboxError::AlreadySealed);
    }
    let caps_now = caps::current()?;
    if let Some(r) = config.run_as {
        if !caps_now.has(caps::CAP_SETUID) || !caps_now.has(caps::CAP_SETGID) {
            return Err(SandboxError::RunAs(format!(
                "switching to uid {} gid {} needs root (CAP_SETUID and CAP_SETGID)",
                r.uid, r.gid
            )));
        }
    }
    // Everything that allocates, reads /proc or compiles happens before the first drop.
    prime_libc();
    let compiled = seccomp::compile(config)?;
    let last_cap = caps::last_cap()?;
    let abi = fs::landlock_abi();
    let tasks = threads::Tasks::open()?;
    let others_before = tasks.others()?;
    let fs_view = fs::isolate_main(config, others_before.is_empty(), abi)?;
    let main_ruleset = match fs_view {
        FsView::Landlock { .. } => Some(fs::landlock_ruleset(abi, &config.dirs)?),
        _ => fs::landlock_scopes_ruleset(abi)?,
    };
    let others_ruleset = if others_before.is_empty() || abi == 0 {
        None
    } else {
        Some(fs::landlock_ruleset(abi, &[])?)
    };
    if !others_before.is_empty() && others_ruleset.is_none() {
        tracing::warn!(
            "Landlock unavailable: threads started before sealing keep the host filesystem \
             view (they still lose every capability and run under the service filter)"
        );
    }
    let state = seccomp::publish(compiled)?;
    seccomp::install_sigsys_handler(config.seccomp)?;

    // 1. Credentials, on every thread (while each may still change its ids).
    let creds = threads::Plan {
        credentials: true,
        last_cap,
        run_as: config.run_as,
        landlock_fd: -1,
        filter: None,
        qmp_filter: None,
    };
    let bounding_kept_others = threads::broadcast(&tasks, &creds)?;
    let bounding_kept_main = threads::seal_current_thread(&creds)
        .map_err(|e| e.into_error(0))?
        .bounding_set_kept;
    caps::set_not_dumpable()?;
    caps::verify_current_thread(!bounding_kept_main)?;
    // 2. The broad filter on every thread at once (TSYNC also sets no_new_privs on each).
    seccomp::install_process_filters(state)?;
    // 3. Landlock and the service filter on the threads that were already running.
    let rest = threads::Plan {
        credentials: false,
        last_cap,
        run_as: None,
        landlock_fd: others_ruleset.as_ref().map_or(-1, fs::raw_fd),
        filter: Some((state.filter(ThreadKind::Service), state.thread_flags())),
        qmp_filter: Some(state.filter(ThreadKind::Qmp)),
    };
    threads::broadcast(&tasks, &rest)?;
    threads::finish_broadcasts()?;
    // 4. Landlock on this thread, inherited by every thread it starts.
    if let Some(rs) = &main_ruleset {
        fs::restrict_self(rs)?;
    }
    Ok(Sealed {
        fs: fs_view,
        other_threads: others_before.len(),
        bounding_set_kept: bounding_kept_main || bounding_kept_others,
        landlock_abi: abi,
        seccomp: Some(config.seccomp),
    })
}

/// Settles what the C library would otherwise look up lazily from files that are gone once
/// sealed, where the look-up (an `openat`) would kill the process under the filters:
/// - glibc's malloc counts CPUs (opening `/sys/devices/system/cpu/online`, then `/proc/stat`)
///   the first time a thread needs a new arena, which could be a worker under its narrow
///   filter: fixing the arena limit now (to glibc's own default, 8 per CPU) means it never
///   looks.
/// - glibc reads `/proc/sys/vm/overcommit_memory` the first time a thread arena's heap shrinks
///   (`check_may_shrink_heap`), and caches the answer for the process. A worker freeing its
///   buffers at exit did that after sealing and died of SIGSYS (found by the hostile fuzzer
///   against the sealed binary, `tests/host_hostile_binary.rs`). A thread shrinks one heap
///   now: it takes 4 × 96 KiB from its arena (below glibc's smallest mmap threshold, 128 KiB)
///   and frees them with the trim threshold at 0, so the freed top is trimmed at once. The
///   threshold then goes back to glibc's initial 128 KiB (fixed from now on: setting it stops
///   glibc's dynamic adjustment).
fn prime_libc() {
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt with integer arguments; only changes an allocator limit.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
        // SAFETY: as above (the trim threshold).
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 0) };
        let shrink = std::thread::Builder::new()
            .name("prime-libc".into())
            .spawn(|| {
                let blocks: Vec<Vec<u8>> = (0..4)
                    .map(|_| std::hint::black_box(Vec::<u8>::with_capacity(96 << 10)))
                    .collect();
                // Freed last-allocated first: each merges into the arena's top, which is then
                // trimmed (and the file read).
                blocks.into_iter().rev().for_each(drop);
                // SAFETY: gettid takes no arguments.
                unsafe { libc::gettid() }
            });
        // Without the thread the look-up may come later; sealing goes on either way.
        if let Ok(Ok(tid)) = shrink.map(std::thread::JoinHandle::join) {
            // Joined is not yet gone from /proc/self/task, which sealing lists next (and
            // would signal): wait, briefly, until the kernel has reaped it.
            let task = format!("/proc/self/task/{tid}");
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
            while std::path::Path::new(&task).exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        // SAFETY: as above.
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10) };
    }
}

/// Stacks the narrower filter of `kind` on the calling thread (once per thread; later calls
/// do nothing). Does nothing when the process is not sealed. Call it as early as possible in
/// a thread started after [`seal`]: the worker threads at their first event (see
/// `docs/security.md` for where each kind hooks in).
pub fn enter_thread(kind: ThreadKind) -> Result<(), SandboxError> {
    seccomp::enter_thread(kind)
}
