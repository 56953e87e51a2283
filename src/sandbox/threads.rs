//! Sealing threads that were already running: each is asked, with a real-time signal, to run
//! [`seal_current_thread`] on itself, since credentials, Landlock domains and non-TSYNC seccomp
//! filters apply to the calling thread only.
//!
//! The signal handler makes raw syscalls only and reads a [`Plan`] published before the
//! signals are sent; the caller waits until every thread has answered.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::caps;
use super::seccomp::FilterRef;
use super::{RunAs, SandboxError};

/// What a thread does to itself. All fields are plain values: the plan is read from a signal
/// handler.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    /// Drop the bounding set (up to `last_cap`), the ambient and other sets, switch ids, set
    /// `no_new_privs` (the first round); the second round only adds Landlock and a filter.
    pub credentials: bool,
    /// Highest capability number.
    pub last_cap: u32,
    /// Switch ids first.
    pub run_as: Option<RunAs>,
    /// A Landlock ruleset fd to restrict the thread with (-1: none).
    pub landlock_fd: RawFd,
    /// A seccomp filter to stack on the thread, and the `seccomp()` flags to install it with.
    pub filter: Option<(FilterRef, libc::c_ulong)>,
    /// The filter instead of `filter` for a thread named `qmp` (its kind, see
    /// [`super::ThreadKind::of_running_thread`]).
    pub qmp_filter: Option<FilterRef>,
}

/// What a thread reported.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Outcome {
    /// The bounding set could not be dropped (no `CAP_SETPCAP`).
    pub bounding_set_kept: bool,
}

/// A failed step on some thread.
#[derive(Debug, Clone, Copy)]
pub(super) struct Failure {
    step: Step,
    errno: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Step {
    Bounding = 1,
    Ambient,
    Ids,
    Capset,
    NoNewPrivs,
    Landlock,
    Seccomp,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Bounding => "PR_CAPBSET_DROP",
            Step::Ambient => "PR_CAP_AMBIENT_CLEAR_ALL",
            Step::Ids => "setgroups/setresgid/setresuid",
            Step::Capset => "capset",
            Step::NoNewPrivs => "PR_SET_NO_NEW_PRIVS",
            Step::Landlock => "landlock_restrict_self",
            Step::Seccomp => "seccomp(SECCOMP_SET_MODE_FILTER)",
        }
    }

    fn from_u8(v: u8) -> Step {
        match v {
            1 => Step::Bounding,
            2 => Step::Ambient,
            3 => Step::Ids,
            4 => Step::Capset,
            5 => Step::NoNewPrivs,
            6 => Step::Landlock,
            _ => Step::Seccomp,
        }
    }
}

impl Failure {
    /// `self` and the thread id in one word (never 0: `step` is at least 1), for an atomic a
    /// signal handler can set: the tid's 4 bytes, a zero byte, the step, then the errno's low
    /// 16 bits (errnos are below 4096).
    fn pack(&self, tid: i32) -> u64 {
        let [t0, t1, t2, t3] = tid.to_be_bytes();
        let [.., e0, e1] = self.errno.to_be_bytes();
        u64::from_be_bytes([t0, t1, t2, t3, 0, self.step as u8, e0, e1])
    }

    /// The inverse of [`Failure::pack`]: the failure and the thread id.
    fn unpack(word: u64) -> (Failure, i32) {
        let [t0, t1, t2, t3, _, step, e0, e1] = word.to_be_bytes();
        let f = Failure {
            step: Step::from_u8(step),
            errno: i32::from(u16::from_be_bytes([e0, e1])),
        };
        (f, i32::from_be_bytes([t0, t1, t2, t3]))
    }

    pub fn into_error(self, tid: i32) -> SandboxError {
        let source = std::io::Error::from_raw_os_error(self.errno);
        if tid == 0 {
            SandboxError::Step {
                step: self.step.name(),
                source,
            }
        } else {
            SandboxError::Thread {
                tid,
                reason: format!("{}: {source}", self.step.name()),
            }
        }
    }
}

/// Applies `plan` to the calling thread. Async-signal-safe.
pub(super) fn seal_current_thread(plan: &Plan) -> Result<Outcome, Failure> {
    let fail = |step| move |errno| Failure { step, errno };
    let mut out = Outcome::default();
    if plan.credentials {
        // The bounding set first: dropping it needs CAP_SETPCAP, which the id switch clears.
        out.bounding_set_kept =
            caps::raw_drop_bounding(plan.last_cap).map_err(fail(Step::Bounding))?;
        caps::raw_clear_ambient().map_err(fail(Step::Ambient))?;
        if let Some(r) = plan.run_as {
            caps::raw_set_ids(r.uid, r.gid).map_err(fail(Step::Ids))?;
        }
        caps::raw_capset_zero().map_err(fail(Step::Capset))?;
        caps::raw_no_new_privs().map_err(fail(Step::NoNewPrivs))?;
    }
    if plan.landlock_fd >= 0 {
        super::fs::raw_restrict_self(plan.landlock_fd).map_err(fail(Step::Landlock))?;
    }
    if let Some((f, flags)) = plan.filter {
        let f = match plan.qmp_filter {
            Some(q) if is_qmp_thread() => q,
            _ => f,
        };
        super::seccomp::raw_install(f, flags).map_err(fail(Step::Seccomp))?;
    }
    Ok(out)
}

/// Whether the calling thread is the `--qmp` watcher. Async-signal-safe.
fn is_qmp_thread() -> bool {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    super::ThreadKind::of_running_thread(&name[..len]) == super::ThreadKind::Qmp
}

static PLAN: AtomicPtr<Plan> = AtomicPtr::new(std::ptr::null_mut());
static ANSWERS: AtomicUsize = AtomicUsize::new(0);
/// First failure, packed by [`Failure::pack`]; 0 for none.
static FAILURE: AtomicU64 = AtomicU64::new(0);
static BOUNDING_KEPT: AtomicBool = AtomicBool::new(false);

fn seal_signal() -> libc::c_int {
    // glibc keeps the first real-time signals for itself; SIGRTMIN() is the first free one.
    libc::SIGRTMIN() + 4
}

extern "C" fn on_seal_signal(_sig: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's life.
    let errno_slot = unsafe { libc::__errno_location() };
    // SAFETY: see above; reading and restoring errno keeps the interrupted code's view intact.
    let saved = unsafe { *errno_slot };
    let plan = PLAN.load(Ordering::Acquire);
    if !plan.is_null() {
        // SAFETY: `broadcast` publishes a pointer to a Plan that outlives the wait for every
        // answer, and clears it before returning; a late signal finds null.
        let plan = unsafe { &*plan };
        match seal_current_thread(plan) {
            Ok(o) => {
                if o.bounding_set_kept {
                    BOUNDING_KEPT.store(true, Ordering::Relaxed);
                }
            }
            Err(f) => {
                let packed = f.pack(nix::unistd::gettid().as_raw());
                let _ = FAILURE.compare_exchange(0, packed, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
        ANSWERS.fetch_add(1, Ordering::AcqRel);
    }
    // SAFETY: as above.
    unsafe { *errno_slot = saved };
}

/// The ids of every thread of this process except the caller, listed through
/// `/proc/self/task` (opened now, so it can be listed again after the filesystem is gone).
pub(super) struct Tasks {
    dir: std::fs::File,
}

impl Tasks {
    pub fn open() -> Result<Tasks, SandboxError> {
        let dir = std::fs::File::open("/proc/self/task")
            .map_err(SandboxError::step("open /proc/self/task"))?;
        Ok(Tasks { dir })
    }

    /// Thread ids other than the caller's.
    pub fn others(&self) -> Result<Vec<i32>, SandboxError> {
        use std::os::fd::AsRawFd;
        let me = nix::unistd::gettid().as_raw();
        // fdopendir takes ownership of its fd: give it a duplicate.
        // SAFETY: F_DUPFD_CLOEXEC on an fd we own; integers only.
        let fd = unsafe { libc::fcntl(self.dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(SandboxError::step("list threads")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` is a fresh directory fd that the returned DIR now owns.
        let d = unsafe { libc::fdopendir(fd) };
        if d.is_null() {
            let e = std::io::Error::last_os_error();
            // SAFETY: fdopendir failed, so `fd` is still ours to close.
            unsafe { libc::close(fd) };
            return Err(SandboxError::step("list threads")(e));
        }
        // Start from the first entry even though the directory was listed before.
        // SAFETY: `d` is a valid DIR.
        unsafe { libc::rewinddir(d) };
        let mut tids = Vec::new();
        loop {
            // SAFETY: `d` is a valid DIR; the entry stays valid until the next readdir.
            let ent = unsafe { libc::readdir(d) };
            if ent.is_null() {
                break;
            }
            // SAFETY: d_name is a NUL-terminated string inside the entry.
            let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
            if let Some(tid) = name.to_str().ok().and_then(|s| s.parse::<i32>().ok()) {
                if tid != me {
                    tids.push(tid);
                }
            }
        }
        // SAFETY: `d` is valid and closed exactly once.
        unsafe { libc::closedir(d) };
        tids.sort_unstable();
        Ok(tids)
    }
}

/// Runs `plan` on every other thread and waits for each to answer. Returns whether some
/// thread had to keep its bounding set.
pub(super) fn broadcast(tasks: &Tasks, plan: &Plan) -> Result<bool, SandboxError> {
    let sig = seal_signal();
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value to fill in.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_seal_signal as *const () as usize;
    // SA_RESTART: a thread blocked in accept/read/poll carries on after answering.
    sa.sa_flags = libc::SA_RESTART;
    // SAFETY: installs a handler that only makes raw syscalls and touches atomics.
    if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
        return Err(SandboxError::step("sigaction")(
            std::io::Error::last_os_error(),
        ));
    }
    ANSWERS.store(0, Ordering::Release);
    FAILURE.store(0, Ordering::Release);
    BOUNDING_KEPT.store(false, Ordering::Release);
    PLAN.store(plan as *const Plan as *mut Plan, Ordering::Release);
    let result = signal_all(tasks, sig);
    PLAN.store(std::ptr::null_mut(), Ordering::Release);
    result?;
    let failure = FAILURE.load(Ordering::Acquire);
    if failure != 0 {
        let (f, tid) = Failure::unpack(failure);
        return Err(f.into_error(tid));
    }
    Ok(BOUNDING_KEPT.load(Ordering::Acquire))
}

fn signal_all(tasks: &Tasks, sig: libc::c_int) -> Result<(), SandboxError> {
    // SAFETY: getpid takes no arguments.
    let pid = unsafe { libc::getpid() };
    let mut signalled: Vec<i32> = Vec::new();
    // A thread could start while we signal (none should): list again until nothing is new.
    loop {
        let fresh: Vec<i32> = tasks
            .others()?
            .into_iter()
            .filter(|t| !signalled.contains(t))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for tid in fresh {
            // SAFETY: tgkill with integer arguments; ESRCH means the thread already exited.
            let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
            if rc == 0 {
                signalled.push(tid);
            } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH) {
                return Err(SandboxError::step("tgkill")(std::io::Error::last_os_error()));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while ANSWERS.load(Ordering::Acquire) < signalled.len() {
        if Instant::now() >= deadline {
            // Name one thread that did not answer (it may block the signal).
            let alive = tasks.others()?;
            let tid = signalled
                .iter()
                .copied()
                .find(|t| alive.contains(t))
                .unwrap_or(0);
            return Err(SandboxError::Thread {
                tid,
                reason: format!(
                    "no answer within 1 s to signal {sig} ({} of {} answered)",
                    ANSWERS.load(Ordering::Acquire),
                    signalled.len()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// After the last broadcast: a stray seal signal is ignored rather than killing the process.
pub(super) fn finish_broadcasts() -> Result<(), SandboxError> {
    // SAFETY: SIG_IGN for our real-time signal; no memory is shared.
    if unsafe { libc::signal(seal_signal(), libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(SandboxError::step("sigaction")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
