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
    /// The vhost-user relay threads (`vu-shim`, `vu-shim-replies`).
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

macro_rules! sys {
    ($n:ident) => {
        (libc::$n, &stringify!($n)[4..])
    };
}

struct List(Vec<Entry>);

impl List {
    fn allow(&mut self, (nr, name): (libc::c_long, &'static str), why: &'static str) {
        self.when((nr, name), vec![], why);
    }

    fn when(
        &mut self,
        (nr, name): (libc::c_long, &'static str),
        when: Vec<Vec<Cond>>,
        why: &'static str,
    ) {
        self.0.push(Entry {
            nr,
            name,
            when,
            why,
        });
    }
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

/// `ioctl` with one of `reqs` as its request. Request numbers are 32 bits (`_IOC`), the width
/// of every compare here (`SeccompCmpArgLen::Dword`).
fn ioctls(reqs: &[libc::c_ulong]) -> Vec<Vec<Cond>> {
    reqs.iter().map(|&r| vec![Cond::Eq(1, r)]).collect()
}

/// What every thread needs to live, log, allocate, sleep and die (also of SIGSYS, naming it).
fn common(l: &mut List, o: &Opts) {
    l.allow(sys!(SYS_futex), "locks, condition variables, thread join");
    l.allow(
        sys!(SYS_write),
        "log lines to stderr; eventfd and socket writes",
    );
    l.allow(
        sys!(SYS_close),
        "dropping fds (connections, eventfds, dup'ed queue fds)",
    );
    l.when(
        sys!(SYS_mmap),
        vec![vec![Cond::MaskClear(2, PROT_EXEC)]],
        "allocator and thread stacks; guest memory and the dirty log (never executable)",
    );
    l.when(
        sys!(SYS_mprotect),
        vec![vec![Cond::MaskClear(2, PROT_EXEC)]],
        "allocator arenas grow, stack guard pages (never executable)",
    );
    l.allow(
        sys!(SYS_munmap),
        "allocator, guest memory unmapped on reconnect",
    );
    l.allow(sys!(SYS_madvise), "allocator returns memory");
    l.allow(sys!(SYS_mremap), "allocator grows large blocks");
    l.allow(sys!(SYS_brk), "allocator (main arena)");
    l.allow(sys!(SYS_sched_yield), "spin-then-park locks");
    l.allow(sys!(SYS_getrandom), "hash map keys (std), once per thread");
    l.allow(sys!(SYS_clock_gettime), "time when the vDSO is not used");
    l.allow(
        sys!(SYS_clock_nanosleep),
        "sleeps (backoff, carrier polling)",
    );
    l.allow(sys!(SYS_nanosleep), "sleeps");
    l.allow(sys!(SYS_rt_sigreturn), "return from a signal handler");
    l.allow(
        sys!(SYS_rt_sigprocmask),
        "signal masks at thread start and exit",
    );
    l.allow(
        sys!(SYS_rt_sigaction),
        "SIGSYS handler restores the default to die of it",
    );
    l.allow(
        sys!(SYS_sigaltstack),
        "Rust's stack-overflow handler at thread start and exit",
    );
    l.when(
        sys!(SYS_tgkill),
        vec![vec![Cond::Eq(0, u64::from(o.pid))]],
        "a thread signals itself (SIGSYS re-raise, abort); only our own pid",
    );
    l.allow(sys!(SYS_getpid), "SIGSYS handler");
    l.allow(sys!(SYS_gettid), "SIGSYS handler");
    l.when(
        sys!(SYS_prctl),
        vec![vec![Cond::Eq(0, libc::PR_GET_NAME as u64)]],
        "SIGSYS handler names the thread",
    );
    l.allow(sys!(SYS_exit), "thread exit");
    l.allow(sys!(SYS_exit_group), "process exit");
    l.allow(sys!(SYS_restart_syscall), "a sleep resumed after a signal");
}

/// The `fcntl` commands anyone makes: fd flags and close-on-exec duplicates. Not F_SETOWN,
/// F_SETSIG or O_ASYNC, which would let a thread aim SIGIO at another process.
fn fcntl_cmds() -> Vec<Vec<Cond>> {
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

/// `socket()` families: unix only (rtnetlink requests go through the link helper).
fn unix_sockets() -> Vec<Vec<Cond>> {
    vec![vec![Cond::Eq(0, libc::AF_UNIX as u64)]]
}

/// `setsockopt` calls of the macvtap's multicast filter (`host::mcfilter`): packet-socket
/// memberships on the socket opened at start-up, which need no capability.
fn packet_memberships() -> Vec<Vec<Cond>> {
    [
        libc::PACKET_ADD_MEMBERSHIP as u64,
        libc::PACKET_DROP_MEMBERSHIP as u64,
    ]
    .iter()
    .map(|&opt| vec![Cond::Eq(1, libc::SOL_PACKET as u64), Cond::Eq(2, opt)])
    .collect()
}

/// The queue ioctls a connection makes: attach/detach (and, when the kernel answers EINVAL,
/// the queue's state), offloads and vnet header length.
fn tun_ioctls_runtime() -> Vec<libc::c_ulong> {
    vec![
        libc::TUNSETQUEUE,
        libc::TUNGETIFF,
        libc::TUNSETOFFLOAD,
        libc::TUNSETVNETHDRSZ,
    ]
}

fn process(l: &mut List, o: &Opts) {
    common(l, o);
    l.allow(
        sys!(SYS_fstatfs),
        "the shim: the kind of an fd the frontend passed (memfd, hugetlbfs, a socket...)",
    );
    // Threads.
    l.when(
        sys!(SYS_clone),
        vec![vec![Cond::MaskSet(0, libc::CLONE_THREAD as u64)]],
        "new threads (workers, request thread, relay) — threads only, never a process",
    );
    l.allow(
        sys!(SYS_clone3),
        "glibc tries it first; a second filter answers ENOSYS so glibc uses clone",
    );
    l.allow(sys!(SYS_set_robust_list), "glibc at thread start");
    l.allow(sys!(SYS_rseq), "glibc at thread start");
    l.when(
        sys!(SYS_prctl),
        vec![
            vec![Cond::Eq(0, libc::PR_GET_NAME as u64)],
            vec![Cond::Eq(0, libc::PR_SET_NAME as u64)],
        ],
        "thread names at spawn; SIGSYS handler",
    );
    l.allow(
        sys!(SYS_sched_getaffinity),
        "glibc sizes thread stacks / CPU count",
    );
    // Sockets: vhost-user (accept, --client connect), the shim's rendezvous.
    l.when(
        sys!(SYS_socket),
        unix_sockets(),
        "unix sockets only: --client connect, the shim's rendezvous connect",
    );
    l.allow(
        sys!(SYS_connect),
        "--client (re)connects; the shim's rendezvous",
    );
    l.allow(sys!(SYS_bind), "the shim's rendezvous listener (abstract)");
    l.allow(sys!(SYS_listen), "as bind");
    l.allow(
        sys!(SYS_accept4),
        "frontends, control socket and metrics clients",
    );
    l.allow(
        sys!(SYS_shutdown),
        "ending a connection; waking a blocked accept on stop",
    );
    l.allow(
        sys!(SYS_getsockopt),
        "--fd checks (SO_ACCEPTCONN); SET_BACKEND_REQ_FD checks (SO_DOMAIN, SO_TYPE)",
    );
    l.allow(
        sys!(SYS_setsockopt),
        "metrics read timeout; the guest's multicast groups as packet-socket memberships",
    );
    l.allow(sys!(SYS_getsockname), "socket addresses (vhost Listener)");
    l.allow(sys!(SYS_getpeername), "socket addresses");
    l.allow(
        sys!(SYS_sendmsg),
        "vhost-user replies with fds; netlink dump requests; --take-over offers (SCM_RIGHTS)",
    );
    l.allow(
        sys!(SYS_recvmsg),
        "vhost-user messages with fds; netlink replies; a --take-over's fds (before sealing)",
    );
    l.allow(
        sys!(SYS_sendto),
        "control/metrics replies; netlink requests",
    );
    l.allow(sys!(SYS_recvfrom), "metrics request; netlink events");
    // Event loops.
    l.allow(
        sys!(SYS_epoll_create1),
        "one epoll per worker thread, per connection",
    );
    l.allow(
        sys!(SYS_epoll_ctl),
        "watching kick, call, queue and timer fds",
    );
    l.allow(sys!(SYS_epoll_pwait), "worker event loops");
    l.allow(sys!(SYS_eventfd2), "exit and state events per connection");
    l.allow(
        sys!(SYS_timerfd_create),
        "each worker's rate-limit / RX recheck timer",
    );
    l.allow(sys!(SYS_timerfd_settime), "arming that timer");
    l.allow(sys!(SYS_timerfd_gettime), "reading what is left of it");
    l.allow(sys!(SYS_ppoll), "link watcher's wait");
    l.allow(
        sys!(SYS_rt_sigtimedwait),
        "the signals thread waits for SIGTERM/SIGINT",
    );
    // I/O on fds opened before sealing.
    l.allow(sys!(SYS_read), "tap frames, eventfds, timerfds, sockets");
    l.allow(sys!(SYS_readv), "tap frames into guest buffers (RX)");
    l.allow(sys!(SYS_writev), "guest frames to the tap (TX)");
    l.when(
        sys!(SYS_ioctl),
        {
            let mut v = tun_ioctls_runtime();
            v.push(libc::FIONBIO);
            ioctls(&v)
        },
        "queue attach/detach (TUNGETIFF when that answers EINVAL), offloads and vnet header \
         per connection; nonblocking sockets (FIONBIO)",
    );
    l.when(
        sys!(SYS_fcntl),
        fcntl_cmds(),
        "fd flags and close-on-exec duplicates (no F_SETOWN/F_SETSIG/O_ASYNC: no SIGIO)",
    );
    l.allow(sys!(SYS_fstat), "size of a memory region's or the log's fd");
    l.allow(
        sys!(SYS_dup),
        "a second fd for a host queue's EPOLLOUT wait (epoll holds one per fd)",
    );
    l.allow(sys!(SYS_newfstatat), "as fstat (glibc's fstat), file types");
    l.allow(sys!(SYS_statx), "as fstat (std)");
    // The main thread opens no file once sealed: the shim's rendezvous is an abstract socket.
    l.allow(
        sys!(SYS_getdents64),
        "listing our threads while sealing (/proc/self/task, opened before)",
    );
    l.allow(sys!(SYS_lseek), "rewinding that listing");
    l.allow(
        sys!(SYS_unlinkat),
        "removing the sockets macvhost created on exit (and a stale one in the way of a move)",
    );
    l.allow(
        sys!(SYS_renameat2),
        "--disconnect-on-link-down: the socket moved aside while the link is down, and back",
    );
    #[cfg(target_arch = "x86_64")]
    {
        l.allow(sys!(SYS_unlink), "as unlinkat (glibc on x86_64)");
        l.allow(sys!(SYS_poll), "as ppoll (glibc on x86_64)");
        l.allow(sys!(SYS_epoll_wait), "as epoll_pwait (x86_64)");
    }
    // Narrowing only.
    l.when(
        sys!(SYS_seccomp),
        vec![
            vec![Cond::Eq(0, 1), Cond::Eq(1, 0)],
            vec![Cond::Eq(0, 1), Cond::Eq(1, 2)],
        ],
        "a thread stacks its narrower filter (no TSYNC, no listener flags)",
    );
    l.allow(
        sys!(SYS_landlock_restrict_self),
        "threads already running restrict themselves while sealing (only ever narrows)",
    );
    if let Some(pid) = o.helper_pid {
        l.when(
            sys!(SYS_wait4),
            vec![vec![Cond::Eq(0, u64::from(pid))]],
            "reaping the link helper on exit (its pid only)",
        );
    }
}

fn service(l: &mut List, o: &Opts) {
    common(l, o);
    l.allow(
        sys!(SYS_rt_sigtimedwait),
        "signals: waiting for SIGTERM/SIGINT",
    );
    l.allow(
        sys!(SYS_shutdown),
        "signals: waking the accept and ending the connection",
    );
    l.allow(sys!(SYS_accept4), "control/metrics: clients");
    l.when(
        sys!(SYS_fcntl),
        vec![vec![Cond::Eq(1, libc::F_GETFD as u64)]],
        "control/metrics: F_GETFD only (debug builds of std check that an fd they close is open)",
    );
    l.allow(
        sys!(SYS_setsockopt),
        "metrics: read timeout; control: the request's read timeout",
    );
    l.allow(
        sys!(SYS_read),
        "link-watch: eventfd; metrics: request; control: the request line, a --take-over's ready",
    );
    l.allow(
        sys!(SYS_recvfrom),
        "link-watch: netlink events; metrics: request",
    );
    l.allow(sys!(SYS_recvmsg), "link-watch: netlink");
    l.allow(
        sys!(SYS_sendto),
        "link-watch: netlink dump request; control/metrics replies",
    );
    l.allow(
        sys!(SYS_sendmsg),
        "link-watch: netlink; control: a --take-over's offer with the listener and queue fds \
         (SCM_RIGHTS)",
    );
    l.allow(sys!(SYS_ppoll), "link-watch: waits for events");
    #[cfg(target_arch = "x86_64")]
    l.allow(sys!(SYS_poll), "link-watch: waits for events (x86_64)");
}

fn qmp(l: &mut List, o: &Opts) {
    common(l, o);
    l.when(
        sys!(SYS_socket),
        unix_sockets(),
        "reconnecting to QEMU's QMP socket",
    );
    l.allow(
        sys!(SYS_connect),
        "reconnecting to QEMU's QMP socket after it restarts",
    );
    l.allow(
        sys!(SYS_read),
        "the monitor's replies and events; the stop eventfd",
    );
    l.allow(
        sys!(SYS_recvfrom),
        "the monitor's replies; the link helper's answers (a trusted guest's MAC)",
    );
    l.allow(sys!(SYS_sendto), "commands to the monitor");
    l.allow(sys!(SYS_shutdown), "ending a monitor connection");
    l.allow(
        sys!(SYS_ppoll),
        "waiting for the monitor or the stop eventfd",
    );
    #[cfg(target_arch = "x86_64")]
    l.allow(sys!(SYS_poll), "as ppoll (x86_64)");
    l.when(
        sys!(SYS_ioctl),
        ioctls(&[libc::FIONBIO]),
        "nonblocking connect",
    );
    l.when(sys!(SYS_fcntl), fcntl_cmds(), "socket flags");
    l.allow(sys!(SYS_getsockopt), "socket errors");
    l.allow(
        sys!(SYS_setsockopt),
        "read/write timeouts; the trusted guest's lists as packet-socket memberships",
    );
}

fn worker(l: &mut List, o: &Opts) {
    common(l, o);
    l.allow(sys!(SYS_epoll_pwait), "the event loop");
    #[cfg(target_arch = "x86_64")]
    l.allow(sys!(SYS_epoll_wait), "the event loop (x86_64)");
    l.allow(sys!(SYS_epoll_ctl), "watching the queue fd and timer");
    l.allow(sys!(SYS_read), "kick eventfds, timerfd, tap frames");
    l.allow(sys!(SYS_readv), "tap frames into guest buffers (RX)");
    l.allow(sys!(SYS_writev), "guest frames to the tap (TX)");
    l.allow(sys!(SYS_timerfd_settime), "rate-limit / RX recheck timer");
    l.allow(sys!(SYS_timerfd_gettime), "what is left of that timer");
    l.when(
        sys!(SYS_setsockopt),
        packet_memberships(),
        "multicast groups the guest joins or leaves (packet-socket memberships)",
    );
    l.when(
        sys!(SYS_ioctl),
        ioctls(&tun_ioctls_runtime()),
        "attach/detach the queue when a vring is enabled or disabled (TUNGETIFF when that \
         answers EINVAL)",
    );
}

fn relay(l: &mut List, o: &Opts) {
    common(l, o);
    l.allow(
        sys!(SYS_ppoll),
        "one thread relays both directions: waits on both sockets",
    );
    #[cfg(target_arch = "x86_64")]
    l.allow(sys!(SYS_poll), "as ppoll (glibc on x86_64)");
    l.allow(sys!(SYS_recvmsg), "vhost-user messages with fds");
    l.allow(sys!(SYS_recvfrom), "vhost-user message bodies");
    l.allow(sys!(SYS_sendmsg), "forwarding them");
    l.allow(sys!(SYS_sendto), "forwarding bodies");
    l.allow(sys!(SYS_read), "socket reads");
    l.allow(sys!(SYS_shutdown), "ending the relay");
    l.allow(sys!(SYS_fstat), "SET_LOG_BASE: the log fd's size");
    l.when(
        sys!(SYS_fcntl),
        fcntl_cmds(),
        "SET_LOG_BASE: a close-on-exec duplicate of the log fd",
    );
    l.allow(sys!(SYS_newfstatat), "as fstat");
    l.allow(sys!(SYS_statx), "as fstat");
    l.allow(
        sys!(SYS_fstatfs),
        "the kind of an fd the frontend passed (memfd, hugetlbfs, a socket...)",
    );
    l.when(
        sys!(SYS_getsockopt),
        vec![vec![
            Cond::Eq(1, libc::SOL_SOCKET as u64),
            Cond::Eq(2, libc::SO_TYPE as u64),
        ]],
        "SET_BACKEND_REQ_FD: checking the fd is a stream socket",
    );
    l.allow(
        sys!(SYS_getsockname),
        "SET_BACKEND_REQ_FD: checking the fd is a unix socket",
    );
}

fn request(l: &mut List, o: &Opts) {
    common(l, o);
    l.allow(sys!(SYS_recvmsg), "vhost-user messages with fds");
    l.allow(sys!(SYS_sendmsg), "replies");
    l.allow(sys!(SYS_read), "socket reads");
    l.allow(sys!(SYS_shutdown), "end of connection");
    l.allow(sys!(SYS_fstat), "memory regions: the fd's size");
    l.allow(sys!(SYS_newfstatat), "as fstat");
    l.allow(sys!(SYS_statx), "as fstat");
    l.allow(sys!(SYS_epoll_ctl), "registering kick fds with the workers");
    l.when(
        sys!(SYS_getsockopt),
        vec![
            vec![
                Cond::Eq(1, libc::SOL_SOCKET as u64),
                Cond::Eq(2, libc::SO_DOMAIN as u64),
            ],
            vec![
                Cond::Eq(1, libc::SOL_SOCKET as u64),
                Cond::Eq(2, libc::SO_TYPE as u64),
            ],
        ],
        "SET_BACKEND_REQ_FD: checking the fd is a unix stream socket",
    );
    l.when(
        sys!(SYS_ioctl),
        ioctls(&tun_ioctls_runtime()),
        "offloads and vnet header on SET_FEATURES; queue attach on enable",
    );
    l.when(
        sys!(SYS_fcntl),
        fcntl_cmds(),
        "duplicates and flags of received fds",
    );
}

/// The allowlist of `kind`.
pub(super) fn allowlist(kind: ThreadKind, o: &Opts) -> Vec<Entry> {
    let mut l = List(Vec::new());
    match kind {
        ThreadKind::Process => process(&mut l, o),
        ThreadKind::Service => service(&mut l, o),
        ThreadKind::Worker => worker(&mut l, o),
        ThreadKind::Relay => relay(&mut l, o),
        ThreadKind::Request => request(&mut l, o),
        ThreadKind::Qmp => qmp(&mut l, o),
    }
    // `prctl` is listed by `common` and again (wider) by `process`: keep the last.
    let mut out: Vec<Entry> = Vec::new();
    for e in l.0 {
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
