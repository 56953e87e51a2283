//! Compiling the allowlists of [`super::filters`] with seccompiler, installing them, and the
//! SIGSYS handler that names a violation before the process dies of it.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::filters::{self, Cond, Opts, ThreadKind};
use super::{SandboxConfig, SandboxError, SeccompMode};

const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
const SECCOMP_FILTER_FLAG_TSYNC: libc::c_ulong = 1;
const SECCOMP_FILTER_FLAG_LOG: libc::c_ulong = 2;

/// The kernel's `struct sock_fprog`.
#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const seccompiler::sock_filter,
}

/// A compiled filter in storage that lives as long as the process (plain pointer + length, so
/// a signal handler can install it).
#[derive(Debug, Clone, Copy)]
pub(super) struct FilterRef {
    ptr: *const seccompiler::sock_filter,
    len: u16,
}

// SAFETY: a FilterRef only ever points into a `State` stored in a process-wide OnceLock, never
// freed or mutated after it is published, so any thread may read it.
unsafe impl Send for FilterRef {}
// SAFETY: as above.
unsafe impl Sync for FilterRef {}

/// Every compiled filter, and the mode they were compiled for.
#[derive(Debug)]
pub(super) struct State {
    mode: SeccompMode,
    process: BpfProgram,
    clone3: BpfProgram,
    kinds: Vec<(ThreadKind, BpfProgram)>,
}

static STATE: OnceLock<State> = OnceLock::new();

impl State {
    fn fref(p: &BpfProgram) -> FilterRef {
        FilterRef {
            ptr: p.as_ptr(),
            // BPF programs are at most 4096 instructions (BPF_MAXINSNS); compile() checks.
            // Saturating keeps a longer one too long, which the kernel refuses (EINVAL).
            len: u16::try_from(p.len()).unwrap_or(u16::MAX),
        }
    }

    /// Flags for a thread's own filter: in enforce mode the kernel logs each trap too (without
    /// the flag it logs only kills, and a thread filter's trap would leave no kernel record).
    pub fn thread_flags(&self) -> libc::c_ulong {
        match self.mode {
            SeccompMode::Enforce => SECCOMP_FILTER_FLAG_LOG,
            SeccompMode::Log => 0,
        }
    }

    /// The filter of `kind` (the broad one for [`ThreadKind::Process`]).
    pub fn filter(&self, kind: ThreadKind) -> FilterRef {
        if kind == ThreadKind::Process {
            return Self::fref(&self.process);
        }
        let p = self
            .kinds
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, p)| p)
            .unwrap_or(&self.process);
        Self::fref(p)
    }
}

fn target_arch() -> Result<TargetArch, SandboxError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| SandboxError::Filter {
        kind: ThreadKind::Process,
        reason: e.to_string(),
    })
}

fn condition(c: &Cond) -> Result<SeccompCondition, seccompiler::BackendError> {
    // Every argument we compare is a C int or unsigned int (domain, cmd, prot, flags, pid):
    // compare the low 32 bits, as the kernel does when it truncates them.
    let (idx, op, value) = match *c {
        Cond::Eq(i, v) => (i, SeccompCmpOp::Eq, v),
        Cond::MaskClear(i, m) => (i, SeccompCmpOp::MaskedEq(m), 0),
        Cond::MaskSet(i, m) => (i, SeccompCmpOp::MaskedEq(m), m),
    };
    SeccompCondition::new(idx, SeccompCmpArgLen::Dword, op, value)
}

/// Compiles the allowlist of `kind` into BPF.
pub(super) fn compile_kind(
    kind: ThreadKind,
    opts: &Opts,
    mode: SeccompMode,
) -> Result<BpfProgram, SandboxError> {
    let err = |reason: String| SandboxError::Filter { kind, reason };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for e in filters::allowlist(kind, opts) {
        let mut chain = Vec::new();
        for any in &e.when {
            let conds = any
                .iter()
                .map(condition)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|x| err(format!("{}: {x}", e.name)))?;
            chain.push(SeccompRule::new(conds).map_err(|x| err(format!("{}: {x}", e.name)))?);
        }
        if rules.insert(e.nr, chain).is_some() {
            return Err(err(format!("{} listed twice", e.name)));
        }
    }
    let mismatch = match mode {
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, target_arch()?)
        .map_err(|x| err(x.to_string()))?;
    let prog: BpfProgram = filter.try_into().map_err(|x| err(format!("{x}")))?;
    if prog.len() > 4096 {
        return Err(err(format!("{} BPF instructions, over 4096", prog.len())));
    }
    Ok(prog)
}

/// `clone3` answers ENOSYS, so glibc falls back to `clone`, whose flags a filter can see (the
/// broad filter allows `clone` only for threads).
fn compile_clone3() -> Result<BpfProgram, SandboxError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, vec![])].into();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        target_arch()?,
    )
    .map_err(|x| SandboxError::Filter {
        kind: ThreadKind::Process,
        reason: format!("clone3: {x}"),
    })?;
    filter.try_into().map_err(|x| SandboxError::Filter {
        kind: ThreadKind::Process,
        reason: format!("clone3: {x}"),
    })
}

/// Compiles every filter for `config` (before anything is dropped: this allocates).
pub(super) fn compile(config: &SandboxConfig) -> Result<State, SandboxError> {
    let opts = Opts::for_config(config);
    let mut kinds = Vec::new();
    for kind in ThreadKind::NARROW {
        kinds.push((kind, compile_kind(kind, &opts, config.seccomp)?));
    }
    Ok(State {
        mode: config.seccomp,
        process: compile_kind(ThreadKind::Process, &opts, config.seccomp)?,
        clone3: compile_clone3()?,
        kinds,
    })
}

/// Stores the compiled filters for the life of the process.
pub(super) fn publish(state: State) -> Result<&'static State, SandboxError> {
    STATE.set(state).map_err(|_| SandboxError::AlreadySealed)?;
    STATE.get().ok_or(SandboxError::AlreadySealed)
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, flags, f)`. Async-signal-safe. With TSYNC, a positive
/// return (the id of a thread that could not be synchronised) is reported as EBUSY.
pub(super) fn raw_install(f: FilterRef, flags: libc::c_ulong) -> Result<(), i32> {
    let prog = SockFprog {
        len: f.len,
        filter: f.ptr,
    };
    // SAFETY: `prog` points at `len` instructions in 'static storage; the kernel copies them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const SockFprog,
        )
    };
    match rc {
        0 => Ok(()),
        r if r > 0 => Err(libc::EBUSY),
        _ => Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL)),
    }
}

/// The broad filter and the clone3 filter on every thread (TSYNC, which also sets
/// `no_new_privs` on each).
pub(super) fn install_process_filters(state: &'static State) -> Result<(), SandboxError> {
    let log = match state.mode {
        // The kernel log records each violation too (audit type 1326).
        SeccompMode::Enforce => SECCOMP_FILTER_FLAG_LOG,
        SeccompMode::Log => 0,
    };
    let to_err =
        |step| move |e: i32| SandboxError::step(step)(std::io::Error::from_raw_os_error(e));
    // clone3 first: once the process filter is in, TSYNC is no longer allowed.
    raw_install(State::fref(&state.clone3), SECCOMP_FILTER_FLAG_TSYNC)
        .map_err(to_err("seccomp TSYNC (clone3 filter)"))?;
    raw_install(
        state.filter(ThreadKind::Process),
        SECCOMP_FILTER_FLAG_TSYNC | log,
    )
    .map_err(to_err("seccomp TSYNC (process filter)"))?;
    Ok(())
}

thread_local! {
    static ENTERED: Cell<bool> = const { Cell::new(false) };
}

/// See [`super::enter_thread`].
pub(super) fn enter_thread(kind: ThreadKind) -> Result<(), SandboxError> {
    let Some(state) = STATE.get() else {
        return Ok(());
    };
    // Once per thread: a worker calls this on every event, so the repeat costs one
    // thread-local read and no syscall.
    if ENTERED.with(Cell::get) {
        return Ok(());
    }
    ENTERED.with(|e| e.set(true));
    // SAFETY: getpid takes no arguments.
    if current_tid() == unsafe { libc::getpid() } {
        // The main thread keeps the process filter: it does everything the others do not.
        return Ok(());
    }
    raw_install(state.filter(kind), state.thread_flags()).map_err(|e| SandboxError::Thread {
        tid: current_tid(),
        reason: format!("{kind:?} filter: {}", std::io::Error::from_raw_os_error(e)),
    })
}

fn current_tid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// The name of syscall `nr` on this architecture, if known.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    let nr = u32::try_from(nr).ok()?;
    SYSCALL_TABLES.iter().find_map(|table| {
        table
            .binary_search_by_key(&nr, |&(n, _)| n)
            .ok()
            .map(|i| table[i].1)
    })
}

/// The number of syscall `name` on this architecture, if known.
pub(super) fn syscall_number(name: &str) -> Option<i64> {
    SYSCALL_TABLES
        .iter()
        .flat_map(|table| table.iter())
        .find(|(_, n)| *n == name)
        .map(|&(nr, _)| i64::from(nr))
}

/// This architecture's own numbers, then the ones every architecture shares; each sorted.
const SYSCALL_TABLES: [&[(u32, &str)]; 2] =
    [super::syscall_names::ARCH, super::syscall_names::UNIFIED];

/// The SIGSYS part of `siginfo_t` (x86_64 and aarch64 layout: the union starts at byte 16).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A fixed buffer formatted without allocating (signal handler).
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn put(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn num(&mut self, v: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let neg = v < 0;
        let mut u = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (u % 10) as u8;
            u /= 10;
            if u == 0 {
                break;
            }
        }
        if neg {
            self.put(b"-");
        }
        self.put(&digits[i..]);
    }
}

/// Builds the violation line: `macvhost: seccomp: syscall N (name) not allowed in thread T (tid)`.
fn violation_line(nr: i64, thread: &[u8], tid: i64) -> Line {
    let mut l = Line {
        buf: [0; 192],
        len: 0,
    };
    l.put(b"macvhost: seccomp: syscall ");
    l.num(nr);
    l.put(b" (");
    l.put(syscall_name(nr).unwrap_or("unknown").as_bytes());
    l.put(b") not allowed in thread ");
    l.put(thread);
    l.put(b" (tid ");
    l.num(tid);
    l.put(b"); see docs/security.md\n");
    l
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS (SA_SIGINFO); for a seccomp trap its
    // union holds the sigsys fields at the layout of `SigsysInfo`.
    let nr = unsafe { (*(info as *const SigsysInfo)).syscall };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let tid = i64::from(current_tid());
    let line = violation_line(i64::from(nr), &name[..name_len], tid);
    // SAFETY: writes `len` initialised bytes of `line` to stderr; async-signal-safe.
    unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
    // Die of SIGSYS: default action, unblocked, sent to this thread.
    // SAFETY: integer arguments; resetting a disposition and signalling ourselves.
    unsafe {
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGSYS);
    }
    // Not reached; if it were, a second violation now finds SIGSYS at its default and kills.
    // SAFETY: a raw syscall with the number that trapped; its arguments are never looked at.
    unsafe { libc::syscall(libc::c_long::from(nr)) };
}

/// Installs the SIGSYS handler for [`SeccompMode::Enforce`] (nothing for `Log`).
pub(super) fn install_sigsys_handler(mode: SeccompMode) -> Result<(), SandboxError> {
    if mode != SeccompMode::Enforce {
        return Ok(());
    }
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value to fill in.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: the handler is async-signal-safe (raw syscalls and a stack buffer).
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(SandboxError::step("sigaction(SIGSYS)")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violation_line_names_the_syscall_and_thread() {
        let l = violation_line(i64::from(libc::SYS_ptrace as i32), b"vring_worker", 4242);
        let s = std::str::from_utf8(&l.buf[..l.len]).unwrap();
        assert!(
            s.starts_with(&format!(
                "macvhost: seccomp: syscall {} (ptrace) not allowed in thread vring_worker (tid 4242)",
                libc::SYS_ptrace
            )),
            "{s}"
        );
        assert!(s.ends_with('\n'));
    }

    #[test]
    fn syscall_names_cover_the_common_calls() {
        for (nr, name) in [
            (libc::SYS_read, "read"),
            (libc::SYS_writev, "writev"),
            (libc::SYS_clone3, "clone3"),
            (libc::SYS_io_uring_enter, "io_uring_enter"),
            (libc::SYS_landlock_restrict_self, "landlock_restrict_self"),
        ] {
            assert_eq!(syscall_name(nr), Some(name));
        }
        assert_eq!(syscall_name(-1), None);
        assert_eq!(syscall_name(100_000), None);
    }

    #[test]
    fn every_allowlist_compiles_in_both_modes() {
        let opts = Opts {
            pid: 1234,
            helper_pid: Some(4321),
        };
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                let p = compile_kind(kind, &opts, mode).unwrap();
                assert!(!p.is_empty() && p.len() <= 4096, "{kind:?}: {}", p.len());
            }
        }
        compile_clone3().unwrap();
    }
}
