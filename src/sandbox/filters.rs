//! The seccomp allowlists, one per thread kind, each entry with the reason it is there.
//!
//! Found by running the daemon under `strace -f` through the privileged suites (testpmd
//! traffic, reconnects, `--client`, rate limits, stats and Prometheus, migration
//! logging, link down/up); `docs/security.md` lists them with the same reasons.
//!
//! The [`ThreadKind::Process`] filter is on every thread. The narrower ones are stacked on top
//! for the threads that need less: a syscall must pass both.

/// Which filter a thread runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The broad filter, on every thread: all the main (serve) thread needs, and the union of
    /// what every other thread needs.
    Process,
    /// Threads already running when the process is sealed: `signals`, `watchdog`,
    /// `link-watch`, `control`, `metrics`.
    Service,
    /// A queue pair's worker (`vring_worker`, vhost-user-backend's epoll thread).
    Worker,
    /// The vhost-user relay thread (`vu-shim`).
    Relay,
    /// vhost-user-backend's request thread (named `macvhost`).
    Request,
    /// The `--qmp` watcher (`qmp`, running before the seal): reconnects to QEMU's monitor and,
    /// with `--trust-guest-rx-filters`, applies the guest's filter to the macvtap.
    Qmp,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Process,
        ThreadKind::Service,
        ThreadKind::Worker,
        ThreadKind::Relay,
        ThreadKind::Request,
        ThreadKind::Qmp,
    ];
    /// The kinds stacked on top of the process filter.
    pub const NARROW: [ThreadKind; 5] = [
        ThreadKind::Service,
        ThreadKind::Worker,
        ThreadKind::Relay,
        ThreadKind::Request,
        ThreadKind::Qmp,
    ];

    /// The kind of a thread that was running before the seal, by its name.
    pub fn of_running_thread(name: &[u8]) -> ThreadKind {
        match name {
            b"qmp" => ThreadKind::Qmp,
            _ => ThreadKind::Service,
        }
    }
}

/// A condition on one syscall argument (low 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cond {
    /// `arg == value`.
    Eq(u8, u64),
    /// `arg & mask == 0`.
    MaskClear(u8, u64),
    /// `arg & mask == mask`.
    MaskSet(u8, u64),
}

/// One allowed syscall: allowed outright when `when` is empty, else when any of its
/// condition lists holds entirely.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub nr: i64,
    pub name: &'static str,
    pub when: Vec<Vec<Cond>>,
    pub why: &'static str,
}

/// What the lists depend on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Opts {
    /// Our pid: `tgkill` only to our own threads.
    pub pid: u32,
    /// The link helper's pid: `wait4` only for it.
    pub helper_pid: Option<u32>,
}

impl Opts {
    pub fn for_config(config: &super::SandboxConfig) -> Opts {
        Opts {
            pid: std::process::id(),
            helper_pid: config.helper_pid,
        }
    }
}

/// The conditions of a row, from the options: one of the lists must hold entirely.
type Conds = fn(&Opts) -> Vec<Vec<Cond>>;

/// One row of an allowlist table.
struct Row {
    nr: libc::c_long,
    /// The libc constant's name, `SYS_` and the syscall's name.
    sys: &'static str,
    /// `None`: allowed outright; else the condition lists, one of which must hold entirely.
    when: Option<Conds>,
    why: &'static str,
}

/// An allowlist as a table, one row per syscall, in the order `docs/security.md` lists them:
/// `SYS_x: "why";` allows `x` outright, `SYS_x if conds: "why";` when one of the condition
/// lists `conds(opts)` returns holds. A row may carry `#[cfg(...)]`.
macro_rules! rows {
    ($($(#[$attr:meta])* $sys:ident $(if $when:ident)?: $why:literal;)*) => {
        &[$($(#[$attr])* Row {
            nr: libc::$sys,
            sys: stringify!($sys),
            when: rows!(@when $($when)?),
            why: $why,
        }),*]
    };
    (@when) => { None };
    (@when $when:ident) => { Some($when) };
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

/// `ioctl` with one of `reqs` as its request. Request numbers are 32 bits (`_IOC`), the width
/// of every compare here (`SeccompCmpArgLen::Dword`).
fn ioctls(reqs: &[libc::c_ulong]) -> Vec<Vec<Cond>> {
    reqs.iter().map(|&r| vec![Cond::Eq(1, r)]).collect()
}

/// Memory mappings and protections that are never executable.
fn no_exec(_: &Opts) -> Vec<Vec<Cond>> {
    vec![vec![Cond::MaskClear(2, PROT_EXEC)]]
}

/// A signal to one of our own threads only.
fn own_pid(o: &Opts) -> Vec<Vec<Cond>> {
    vec![vec![Cond::Eq(0, u64::from(o.pid))]]
}

/// `prctl(PR_GET_NAME)` only.
fn get_name(_: &Opts) -> Vec<Vec<Cond>> {
    vec![vec![Cond::Eq(0, libc::PR_GET_NAME as u64)]]
}

/// `prctl(PR_GET_NAME)` or `prctl(PR_SET_NAME)`.
fn get_or_set_name(_: &Opts) -> Vec<Vec<Cond>> {
    vec![
        vec![Cond::Eq(0, libc::PR_GET_NAME as u64)],
        vec![Cond::Eq(0, libc::PR_SET_NAME as u64)],
    ]
}

/// `clone` of a thread, never of a process.
fn threads_only(_: &Opts) -> Vec<Vec<Cond>> {
    vec![vec![Cond::MaskSet(0, libc::CLONE_THREAD as u64)]]
}

/// `seccomp(SECCOMP_SET_MODE_FILTER)` with no flags or with `SECCOMP_FILTER_FLAG_LOG` only:
/// no TSYNC, no listener.
fn narrowing_only(_: &Opts) -> Vec<Vec<Cond>> {
    vec![
        vec![Cond::Eq(0, 1), Cond::Eq(1, 0)],
        vec![Cond::Eq(0, 1), Cond::Eq(1, 2)],
    ]
}

/// The `fcntl` commands anyone makes: fd flags and close-on-exec duplicates. Not F_SETOWN,
/// F_SETSIG or O_ASYNC, which would let a thread aim SIGIO at another process.
fn fcntl_cmds(_: &Opts) -> Vec<Vec<Cond>> {
    vec![
        vec![Cond::Eq(1, libc::F_GETFD as u64)],
        vec![Cond::Eq(1, libc::F_SETFD as u64)],
        vec![Cond::Eq(1, libc::F_GETFL as u64)],
        vec![
            Cond::Eq(1, libc::F_SETFL as u64),
            Cond::MaskClear(2, libc::O_ASYNC as u64),
        ],
        vec![Cond::Eq(1, libc::F_DUPFD_CLOEXEC as u64)],
    ]
}

/// `fcntl(F_GETFD)` only.
fn fcntl_getfd(_: &Opts) -> Vec<Vec<Cond>> {
    vec![vec![Cond::Eq(1, libc::F_GETFD as u64)]]
}

/// `socket()` families: unix only (rtnetlink requests go through the link helper).
fn unix_sockets(_: &Opts) -> Vec<Vec<Cond>> {
    vec![vec![Cond::Eq(0, libc::AF_UNIX as u64)]]
}

/// `setsockopt` calls of the macvtap's multicast filter (`host::mcfilter`): packet-socket
/// memberships on the socket opened at start-up, which need no capability.
fn packet_memberships(_: &Opts) -> Vec<Vec<Cond>> {
    [
        libc::PACKET_ADD_MEMBERSHIP as u64,
        libc::PACKET_DROP_MEMBERSHIP as u64,
    ]
    .iter()
    .map(|&opt| vec![Cond::Eq(1, libc::SOL_PACKET as u64), Cond::Eq(2, opt)])
    .collect()
}

/// `getsockopt(SOL_SOCKET, SO_TYPE)`.
fn so_type(_: &Opts) -> Vec<Vec<Cond>> {
    vec![vec![
        Cond::Eq(1, libc::SOL_SOCKET as u64),
        Cond::Eq(2, libc::SO_TYPE as u64),
    ]]
}

/// `getsockopt(SOL_SOCKET, SO_DOMAIN or SO_TYPE)`.
fn so_domain_or_type(o: &Opts) -> Vec<Vec<Cond>> {
    let mut v = vec![vec![
        Cond::Eq(1, libc::SOL_SOCKET as u64),
        Cond::Eq(2, libc::SO_DOMAIN as u64),
    ]];
    v.extend(so_type(o));
    v
}

/// The queue ioctls a connection makes: attach/detach (and, when the kernel answers EINVAL,
/// the queue's state), offloads and vnet header length.
const TUN_IOCTLS_RUNTIME: [libc::c_ulong; 4] = [
    libc::TUNSETQUEUE,
    libc::TUNGETIFF,
    libc::TUNSETOFFLOAD,
    libc::TUNSETVNETHDRSZ,
];

/// [`TUN_IOCTLS_RUNTIME`].
fn tun_runtime(_: &Opts) -> Vec<Vec<Cond>> {
    ioctls(&TUN_IOCTLS_RUNTIME)
}

/// [`TUN_IOCTLS_RUNTIME`] and `FIONBIO`.
fn tun_runtime_or_fionbio(o: &Opts) -> Vec<Vec<Cond>> {
    let mut v = tun_runtime(o);
    v.extend(fionbio(o));
    v
}

/// `ioctl(FIONBIO)` only.
fn fionbio(_: &Opts) -> Vec<Vec<Cond>> {
    ioctls(&[libc::FIONBIO])
}

/// What every thread needs to live, log, allocate, sleep and die (also of SIGSYS, naming it).
const COMMON: &[Row] = rows! {
    SYS_futex: "locks, condition variables, thread join";
    SYS_write: "log lines to stderr; eventfd and socket writes";
    SYS_close: "dropping fds (connections, eventfds, dup'ed queue fds)";
    SYS_mmap if no_exec:
        "allocator and thread stacks; guest memory and the dirty log (never executable)";
    SYS_mprotect if no_exec: "allocator arenas grow, stack guard pages (never executable)";
    SYS_munmap: "allocator, guest memory unmapped on reconnect";
    SYS_madvise: "allocator returns memory";
    SYS_mremap: "allocator grows large blocks";
    SYS_brk: "allocator (main arena)";
    SYS_sched_yield: "spin-then-park locks";
    SYS_getrandom: "hash map keys (std), once per thread";
    SYS_clock_gettime: "time when the vDSO is not used";
    SYS_clock_nanosleep: "sleeps (backoff, carrier polling)";
    SYS_nanosleep: "sleeps";
    SYS_rt_sigreturn: "return from a signal handler";
    SYS_rt_sigprocmask: "signal masks at thread start and exit";
    SYS_rt_sigaction: "SIGSYS handler restores the default to die of it";
    SYS_sigaltstack: "Rust's stack-overflow handler at thread start and exit";
    SYS_tgkill if own_pid: "a thread signals itself (SIGSYS re-raise, abort); only our own pid";
    SYS_getpid: "SIGSYS handler";
    SYS_gettid: "SIGSYS handler";
    SYS_prctl if get_name: "SIGSYS handler names the thread";
    SYS_exit: "thread exit";
    SYS_exit_group: "process exit";
    SYS_restart_syscall: "a sleep resumed after a signal";
};

/// The main thread and the union of the others. `wait4` for the link helper is added by
/// [`allowlist`] when there is one.
const PROCESS: &[Row] = rows! {
    SYS_fstatfs: "the shim: the kind of an fd the frontend passed (memfd, hugetlbfs, a socket...)";
    // Threads.
    SYS_clone if threads_only:
        "new threads (workers, request thread, relay) — threads only, never a process";
    SYS_clone3: "glibc tries it first; a second filter answers ENOSYS so glibc uses clone";
    SYS_set_robust_list: "glibc at thread start";
    SYS_rseq: "glibc at thread start";
    SYS_prctl if get_or_set_name: "thread names at spawn; SIGSYS handler";
    SYS_sched_getaffinity: "glibc sizes thread stacks / CPU count";
    // Sockets: vhost-user (accept, --client connect), the shim's rendezvous.
    SYS_socket if unix_sockets:
        "unix sockets only: --client connect, the shim's rendezvous connect";
    SYS_connect: "--client (re)connects; the shim's rendezvous";
    SYS_bind: "the shim's rendezvous listener (abstract)";
    SYS_listen: "as bind";
    SYS_accept4: "frontends, control socket and metrics clients";
    SYS_shutdown: "ending a connection; waking a blocked accept on stop";
    SYS_getsockopt:
        "--fd checks (SO_ACCEPTCONN); SET_BACKEND_REQ_FD checks (SO_DOMAIN, SO_TYPE)";
    SYS_setsockopt:
        "metrics read timeout; the guest's multicast groups as packet-socket memberships";
    SYS_getsockname: "socket addresses (vhost Listener)";
    SYS_getpeername: "socket addresses";
    SYS_sendmsg: "vhost-user replies with fds; netlink dump requests; --take-over offers (SCM_RIGHTS)";
    SYS_recvmsg: "vhost-user messages with fds; netlink replies; a --take-over's fds (before sealing)";
    SYS_sendto: "control/metrics replies; netlink requests";
    SYS_recvfrom: "metrics request; netlink events";
    // Event loops.
    SYS_epoll_create1: "one epoll per worker thread, per connection";
    SYS_epoll_ctl: "watching kick, call, queue and timer fds";
    SYS_epoll_pwait: "worker event loops";
    SYS_eventfd2: "exit and state events per connection";
    SYS_timerfd_create: "each worker's rate-limit / RX recheck timer";
    SYS_timerfd_settime: "arming that timer";
    SYS_timerfd_gettime: "reading what is left of it";
    SYS_ppoll: "link watcher's wait";
    SYS_rt_sigtimedwait: "the signals thread waits for SIGTERM/SIGINT";
    // I/O on fds opened before sealing.
    SYS_read: "tap frames, eventfds, timerfds, sockets";
    SYS_readv: "tap frames into guest buffers (RX)";
    SYS_writev: "guest frames to the tap (TX)";
    SYS_ioctl if tun_runtime_or_fionbio:
        "queue attach/detach (TUNGETIFF when that answers EINVAL), offloads and vnet header \
         per connection; nonblocking sockets (FIONBIO)";
    SYS_fcntl if fcntl_cmds:
        "fd flags and close-on-exec duplicates (no F_SETOWN/F_SETSIG/O_ASYNC: no SIGIO)";
    SYS_fstat: "size of a memory region's or the log's fd";
    SYS_dup: "a second fd for a host queue's EPOLLOUT wait (epoll holds one per fd)";
    SYS_newfstatat: "as fstat (glibc's fstat), file types";
    SYS_statx: "as fstat (std)";
    // The main thread opens no file once sealed: the shim's rendezvous is an abstract socket.
    SYS_getdents64: "listing our threads while sealing (/proc/self/task, opened before)";
    SYS_lseek: "rewinding that listing";
    SYS_unlinkat:
        "removing the sockets macvhost created on exit (and a stale one in the way of a move)";
    SYS_renameat2:
        "--disconnect-on-link-down: the socket moved aside while the link is down, and back";
    #[cfg(target_arch = "x86_64")]
    SYS_unlink: "as unlinkat (glibc on x86_64)";
    #[cfg(target_arch = "x86_64")]
    SYS_poll: "as ppoll (glibc on x86_64)";
    #[cfg(target_arch = "x86_64")]
    SYS_epoll_wait: "as epoll_pwait (x86_64)";
    // Narrowing only.
    SYS_seccomp if narrowing_only:
        "a thread stacks its narrower filter (no TSYNC, no listener flags)";
    SYS_landlock_restrict_self:
        "threads already running restrict themselves while sealing (only ever narrows)";
};

const SERVICE: &[Row] = rows! {
    SYS_rt_sigtimedwait: "signals: waiting for SIGTERM/SIGINT";
    SYS_shutdown: "signals: waking the accept and ending the connection";
    SYS_accept4: "control/metrics: clients";
    SYS_fcntl if fcntl_getfd:
        "control/metrics: F_GETFD only (debug builds of std check that an fd they close is open)";
    SYS_setsockopt: "metrics: read timeout; control: the request's read timeout";
    SYS_read: "link-watch: eventfd; metrics: request; control: the request line, a --take-over's ready";
    SYS_recvfrom: "link-watch: netlink events; metrics: request";
    SYS_recvmsg: "link-watch: netlink";
    SYS_sendto: "link-watch: netlink dump request; control/metrics replies";
    SYS_sendmsg:
        "link-watch: netlink; control: a --take-over's offer with the listener and queue fds (SCM_RIGHTS)";
    SYS_ppoll: "link-watch: waits for events";
    #[cfg(target_arch = "x86_64")]
    SYS_poll: "link-watch: waits for events (x86_64)";
};

const QMP: &[Row] = rows! {
    SYS_socket if unix_sockets: "reconnecting to QEMU's QMP socket";
    SYS_connect: "reconnecting to QEMU's QMP socket after it restarts";
    SYS_read: "the monitor's replies and events; the stop eventfd";
    SYS_recvfrom: "the monitor's replies; the link helper's answers (a trusted guest's MAC)";
    SYS_sendto: "commands to the monitor";
    SYS_shutdown: "ending a monitor connection";
    SYS_ppoll: "waiting for the monitor or the stop eventfd";
    #[cfg(target_arch = "x86_64")]
    SYS_poll: "as ppoll (x86_64)";
    SYS_ioctl if fionbio: "nonblocking connect";
    SYS_fcntl if fcntl_cmds: "socket flags";
    SYS_getsockopt: "socket errors";
    SYS_setsockopt:
        "read/write timeouts; the trusted guest's lists as packet-socket memberships";
};

const WORKER: &[Row] = rows! {
    SYS_epoll_pwait: "the event loop";
    #[cfg(target_arch = "x86_64")]
    SYS_epoll_wait: "the event loop (x86_64)";
    SYS_epoll_ctl: "watching the queue fd and timer";
    SYS_read: "kick eventfds, timerfd, tap frames";
    SYS_readv: "tap frames into guest buffers (RX)";
    SYS_writev: "guest frames to the tap (TX)";
    SYS_timerfd_settime: "rate-limit / RX recheck timer";
    SYS_timerfd_gettime: "what is left of that timer";
    SYS_setsockopt if packet_memberships:
        "multicast groups the guest joins or leaves (packet-socket memberships)";
    SYS_ioctl if tun_runtime:
        "attach/detach the queue when a vring is enabled or disabled (TUNGETIFF when that \
         answers EINVAL)";
};

const RELAY: &[Row] = rows! {
    SYS_ppoll: "one thread relays both directions: waits on both sockets";
    #[cfg(target_arch = "x86_64")]
    SYS_poll: "as ppoll (glibc on x86_64)";
    SYS_recvmsg: "vhost-user messages with fds";
    SYS_recvfrom: "vhost-user message bodies";
    SYS_sendmsg: "forwarding them";
    SYS_sendto: "forwarding bodies";
    SYS_read: "socket reads";
    SYS_shutdown: "ending the relay";
    SYS_fstat: "SET_LOG_BASE: the log fd's size";
    SYS_fcntl if fcntl_cmds: "SET_LOG_BASE: a close-on-exec duplicate of the log fd";
    SYS_newfstatat: "as fstat";
    SYS_statx: "as fstat";
    SYS_fstatfs: "the kind of an fd the frontend passed (memfd, hugetlbfs, a socket...)";
    SYS_getsockopt if so_type: "SET_BACKEND_REQ_FD: checking the fd is a stream socket";
    SYS_getsockname: "SET_BACKEND_REQ_FD: checking the fd is a unix socket";
};

const REQUEST: &[Row] = rows! {
    SYS_recvmsg: "vhost-user messages with fds";
    SYS_sendmsg: "replies";
    SYS_read: "socket reads";
    SYS_shutdown: "end of connection";
    SYS_fstat: "memory regions: the fd's size";
    SYS_newfstatat: "as fstat";
    SYS_statx: "as fstat";
    SYS_epoll_ctl: "registering kick fds with the workers";
    SYS_getsockopt if so_domain_or_type:
        "SET_BACKEND_REQ_FD: checking the fd is a unix stream socket";
    SYS_ioctl if tun_runtime: "offloads and vnet header on SET_FEATURES; queue attach on enable";
    SYS_fcntl if fcntl_cmds: "duplicates and flags of received fds";
};

/// The allowlist of `kind`.
pub(super) fn allowlist(kind: ThreadKind, o: &Opts) -> Vec<Entry> {
    let own = match kind {
        ThreadKind::Process => PROCESS,
        ThreadKind::Service => SERVICE,
        ThreadKind::Worker => WORKER,
        ThreadKind::Relay => RELAY,
        ThreadKind::Request => REQUEST,
        ThreadKind::Qmp => QMP,
    };
    let mut rows: Vec<Entry> = COMMON
        .iter()
        .chain(own)
        .map(|r| Entry {
            nr: r.nr,
            name: r.sys.strip_prefix("SYS_").unwrap_or(r.sys),
            when: r.when.map_or_else(Vec::new, |when| when(o)),
            why: r.why,
        })
        .collect();
    if let (ThreadKind::Process, Some(pid)) = (kind, o.helper_pid) {
        rows.push(Entry {
            nr: libc::SYS_wait4,
            name: "wait4",
            when: vec![vec![Cond::Eq(0, u64::from(pid))]],
            why: "reaping the link helper on exit (its pid only)",
        });
    }
    // `prctl` is listed by `COMMON` and again (wider) by `PROCESS`: keep the last.
    let mut out: Vec<Entry> = Vec::new();
    for e in rows {
        if let Some(prev) = out.iter_mut().find(|p| p.nr == e.nr) {
            *prev = e;
        } else {
            out.push(e);
        }
    }
    out
}

/// Every allowed syscall per kind, with its reason and a note of its argument conditions
/// (every option on), for documentation and audits.
pub fn allowlist_table() -> Vec<(ThreadKind, &'static str, &'static str, bool)> {
    let o = Opts {
        pid: std::process::id(),
        helper_pid: Some(1),
    };
    let mut out = Vec::new();
    for kind in ThreadKind::ALL {
        for e in allowlist(kind, &o) {
            out.push((kind, e.name, e.why, !e.when.is_empty()));
        }
    }
    out
}
