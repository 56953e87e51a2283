//! systemd's service protocols, implemented directly (no libsystemd): socket activation, the
//! `sd_notify` datagram (readiness, status, watchdog, stopping) and the file-descriptor store.
//!
//! # Contract
//!
//! - [`listen_fds`] takes the fds systemd passed (`LISTEN_PID`, `LISTEN_FDS`,
//!   `LISTEN_FDNAMES`, fds from 3 on) exactly once per process. It owns them, sets
//!   close-on-exec, and unsets the three variables, so children inherit neither the fds nor
//!   the claim. Call it early in `main`, before other threads exist: it changes the process
//!   environment. Variables meant for another process (`LISTEN_PID` is not ours) yield no fds.
//!   An fd that is not open, or a name count that does not match, is the service manager's
//!   fault and is reported as such.
//! - [`Notifier`] sends `NOTIFY_SOCKET` datagrams (a path, or `@name` for an abstract socket),
//!   with fds as `SCM_RIGHTS` for the fd store. Sends never block (`MSG_DONTWAIT`): a hung
//!   manager must not stall the serve loop. The caller logs a failed send and goes on.
//! - [`Watchdog`] turns `WATCHDOG_USEC` (and `WATCHDOG_PID`) into the interval at which the
//!   serve loop sends `WATCHDOG=1`: half the timeout, as sd_watchdog_enabled(3) advises.
//!
//! `RELOADING=1` is not offered: macvhost has nothing to reload (a new configuration means a
//! restart), and systemd 253's `Type=notify-reload` would also need `MONOTONIC_USEC=`.
//!
//! # How `systemctl restart` gets the host queue fds back (design)
//!
//! The goal is that a restart does not re-create the macvtap, flap its carrier or change its
//! ifindex. The host side of a macvtap or tap is its open queue fds.
//!
//! 1. When the host queues are open, macvhost stores each one with `FDSTORE=1` and
//!    `FDNAME=queue-N` ([`Notifier::store_queue`], [`queue_fd_name`]). The unit needs
//!    `FileDescriptorStoreMax=` of at least `--queues`. systemd's polling stays on (no
//!    `FDPOLL=0`): it drops a stored fd that polls `POLLERR`/`POLLHUP`, which a tap's queue fd
//!    does once the tap is deleted (and never merely because the queue is detached with
//!    `TUNSETQUEUE`, checked on Linux 6.18). A deleted macvtap's fd polls no error; step 4
//!    catches it.
//! 2. The listening socket comes from `macvhost@.socket` (`FileDescriptorName=vhost-user`,
//!    [`VHOST_USER_FD_NAME`]) and does not need storing. systemd keeps it open across the
//!    restart, so a frontend that reconnects (QEMU `reconnect=1`) gets through at once.
//! 3. On the next start (`systemctl restart`, or `Restart=on-failure` after a crash: the store
//!    is kept while the unit restarts and dropped only when it stops), systemd passes the
//!    socket unit's fds first, then the stored ones: `LISTEN_FDS=1+N`,
//!    `LISTEN_FDNAMES=vhost-user:queue-0:…:queue-N-1` (the stored fds are not promised in any
//!    order, hence one name per queue). [`ListenFds::take_unix_listener`] and
//!    [`ListenFds::take_queues`] sort them out.
//! 4. Before reuse, check that each stored queue is still the device macvhost was told to
//!    serve. `TUNGETIFF` on the fd fails once its device was deleted (`ENOLINK` for a macvtap,
//!    `EBADFD` for a tap) and otherwise names the live device; that name must resolve, in
//!    macvhost's namespace, to the ifindex of `--macvtap` or `--tap`. A stale or foreign fd is
//!    closed and `FDSTOREREMOVE=1` + `FDNAME=queue-N` drops it from the store; the queue is
//!    then opened afresh, as on a first start.
//! 5. A stop (not a restart) discards the store: the queues close, as they do today. (systemd
//!    254's `FileDescriptorStorePreserve=` would keep them; Debian 12 has 252.)

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// The most fds accepted from `LISTEN_FDS`; more is a broken manager, not a configuration.
pub const MAX_LISTEN_FDS: usize = 4096;
/// Name of the vhost-user listening socket (`FileDescriptorName=` in `macvhost@.socket`).
pub const VHOST_USER_FD_NAME: &str = "vhost-user";
/// The longest fd name systemd accepts (`FDNAME_MAX`).
pub const FDNAME_MAX: usize = 255;
/// The most fds one `SCM_RIGHTS` message carries (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;
/// Name systemd gives fds when `LISTEN_FDNAMES` is absent.
const UNNAMED: &str = "unknown";
const QUEUE_PREFIX: &str = "queue-";

/// Errors of the systemd protocols; each names who is at fault.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// A variable the manager set does not parse.
    #[error("service manager: {var}={value:?} is not a valid {what}")]
    BadVariable {
        /// Variable name.
        var: &'static str,
        /// Its value.
        value: String,
        /// What it should have been.
        what: &'static str,
    },
    /// `LISTEN_FDS` claims an absurd number of fds.
    #[error("service manager: LISTEN_FDS={0} is more than the {MAX_LISTEN_FDS} macvhost accepts")]
    TooManyFds(usize),
    /// `LISTEN_FDNAMES` and `LISTEN_FDS` disagree.
    #[error("service manager: LISTEN_FDNAMES has {names} names for LISTEN_FDS={fds}")]
    NameCount {
        /// Names given.
        names: usize,
        /// Fds announced.
        fds: usize,
    },
    /// An announced fd is not open in this process.
    #[error("service manager: fd {fd} ({name:?}) was announced in LISTEN_FDS but is not open")]
    FdNotOpen {
        /// The fd number.
        fd: RawFd,
        /// Its name from `LISTEN_FDNAMES`.
        name: String,
    },
    /// Setting close-on-exec failed (host).
    #[error("host: cannot set close-on-exec on passed fd {fd}: {source}")]
    Cloexec {
        /// The fd number.
        fd: RawFd,
        /// Cause.
        source: nix::Error,
    },
    /// [`listen_fds`] was called twice (a macvhost bug: the fds have one owner).
    #[error("macvhost bug: the socket-activation fds were already taken")]
    AlreadyTaken,
    /// The fd named like the vhost-user socket is something else (operator: the .socket unit).
    #[error(
        "operator: passed fd {fd} ({name:?}) is not a listening unix stream socket: {reason} \
         (check ListenStream= in the .socket unit)"
    )]
    NotUnixListener {
        /// The fd number.
        fd: RawFd,
        /// Its name.
        name: String,
        /// What it is instead.
        reason: &'static str,
    },
    /// `NOTIFY_SOCKET` is neither a path nor an abstract name.
    #[error(
        "service manager: NOTIFY_SOCKET={0:?} is not an absolute unix socket path or \
         @abstract name"
    )]
    BadNotifySocket(String),
    /// An fd name macvhost would send is invalid (a macvhost bug).
    #[error(
        "macvhost bug: fd name {0:?} is invalid (at most 255 printable ASCII characters, no ':')"
    )]
    BadFdName(String),
    /// A notification that cannot be sent as asked (a macvhost bug).
    #[error("macvhost bug: {0}")]
    BadMessage(&'static str),
    /// The notification socket could not be created (host).
    #[error("host: cannot create the notification socket: {0}")]
    Socket(nix::Error),
    /// The manager did not take the datagram.
    #[error("cannot notify the service manager at {addr}: {source}")]
    Send {
        /// `NOTIFY_SOCKET`.
        addr: String,
        /// Cause (`EAGAIN`: its queue is full; `ECONNREFUSED`/`ENOENT`: it is gone).
        source: nix::Error,
    },
}

// ----------------------------------------------------------------- socket activation ---

/// The socket-activation variables as found in the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenVars {
    /// `LISTEN_PID`.
    pub pid: Option<String>,
    /// `LISTEN_FDS`.
    pub fds: Option<String>,
    /// `LISTEN_FDNAMES`.
    pub names: Option<String>,
}

impl ListenVars {
    const VARS: [&'static str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

    /// Reads the three variables and removes them from the environment.
    fn take_from_env() -> ListenVars {
        let get = |k: &str| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned());
        let vars = ListenVars {
            pid: get(Self::VARS[0]),
            fds: get(Self::VARS[1]),
            names: get(Self::VARS[2]),
        };
        for k in Self::VARS {
            // Children must not take fds they do not have (the contract: called before other
            // threads exist, so nothing reads the environment concurrently).
            std::env::remove_var(k);
        }
        vars
    }

    /// The names of the fds meant for process `our_pid`, one per fd from
    /// [`LISTEN_FDS_START`]; empty when there are none or they are another process's.
    pub fn names_for(&self, our_pid: u32) -> Result<Vec<String>, SystemdError> {
        let Some(pid) = &self.pid else {
            return Ok(Vec::new());
        };
        let pid: u32 = parse_var("LISTEN_PID", pid, "process id")?;
        if pid != our_pid {
            // Inherited from a parent that was activated itself: not ours.
            return Ok(Vec::new());
        }
        let Some(fds) = &self.fds else {
            return Ok(Vec::new());
        };
        let n: usize = parse_var("LISTEN_FDS", fds, "fd count")?;
        if n > MAX_LISTEN_FDS {
            return Err(SystemdError::TooManyFds(n));
        }
        match &self.names {
            None => Ok(vec![UNNAMED.to_string(); n]),
            // "" is one empty name, and also what systemd sends for LISTEN_FDS=0.
            Some(s) if n == 0 && s.is_empty() => Ok(Vec::new()),
            Some(s) => {
                let names: Vec<String> = s.split(':').map(str::to_string).collect();
                if names.len() != n {
                    return Err(SystemdError::NameCount {
                        names: names.len(),
                        fds: n,
                    });
                }
                Ok(names)
            }
        }
    }
}

/// One passed fd and its name.
#[derive(Debug)]
pub struct NamedFd {
    /// From `LISTEN_FDNAMES` (`FileDescriptorName=` or `FDNAME=`).
    pub name: String,
    /// The fd, owned, close-on-exec.
    pub fd: OwnedFd,
}

/// The fds systemd passed, in order; take what you use, the rest close on drop.
#[derive(Debug, Default)]
pub struct ListenFds {
    fds: Vec<NamedFd>,
}

/// Takes the socket-activation fds of this process (see the module contract). Once per process;
/// a second call is [`SystemdError::AlreadyTaken`].
pub fn listen_fds() -> Result<ListenFds, SystemdError> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(SystemdError::AlreadyTaken);
    }
    let vars = ListenVars::take_from_env();
    let names = vars.names_for(std::process::id())?;
    // SAFETY: the variables were addressed to this process (LISTEN_PID) and are now unset, and
    // TAKEN makes this the only call: fds 3.. were handed to this process to own, and no other
    // code in it claims them.
    unsafe { ListenFds::adopt(names, LISTEN_FDS_START) }
}

/// Takes ownership of `fd`, a file descriptor this process inherited at exec from the program
/// that started it (`--fd N`, `--tap-fd`), and sets close-on-exec. `None` when it is not open.
///
/// Only for fds that are ours by that contract: the number is named once, by whoever started us,
/// and nothing else in this process claims it. Call it once per number.
pub fn adopt_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: by this function's contract `fd` was handed to this process at exec to own and
    // is claimed only here; `adopt` checks that it is open.
    let mut set = unsafe { ListenFds::adopt(vec![String::from("inherited")], fd) }.ok()?;
    set.take("inherited")
}

impl ListenFds {
    /// Owns fds `start..start + names.len()`: checks each is open and sets close-on-exec.
    ///
    /// # Safety
    ///
    /// Those fds must belong to the caller to give away: nothing else in the process may own
    /// or close them afterwards.
    pub unsafe fn adopt(names: Vec<String>, start: RawFd) -> Result<ListenFds, SystemdError> {
        let count = names.len();
        let mut fds = Vec::with_capacity(count);
        for (i, name) in names.into_iter().enumerate() {
            // Fd numbers past `RawFd::MAX` do not exist: that many fds is too many.
            let fd = RawFd::try_from(i)
                .ok()
                .and_then(|i| start.checked_add(i))
                .ok_or(SystemdError::TooManyFds(count))?;
            // SAFETY: F_GETFD only probes the number; a closed fd fails with EBADF.
            let probe = unsafe { BorrowedFd::borrow_raw(fd) };
            let Ok(flags) = fcntl(probe, FcntlArg::F_GETFD) else {
                return Err(SystemdError::FdNotOpen { fd, name });
            };
            // SAFETY: open (checked above), and the caller guarantees it is ours to own.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let flags = FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC;
            fcntl(&owned, FcntlArg::F_SETFD(flags))
                .map_err(|source| SystemdError::Cloexec { fd, source })?;
            fds.push(NamedFd { name, fd: owned });
        }
        Ok(ListenFds { fds })
    }

    /// A set of fds already owned and named (the fds a `--take-over` received), so that they
    /// are sorted out like the service manager's.
    pub fn from_named(fds: Vec<NamedFd>) -> ListenFds {
        ListenFds { fds }
    }

    /// Number of fds not yet taken.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether all fds were taken (or none passed).
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Names of the fds not yet taken, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fds.iter().map(|f| f.name.as_str())
    }

    /// Takes the first fd named `name`.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let i = self.fds.iter().position(|f| f.name == name)?;
        Some(self.fds.remove(i).fd)
    }

    /// Takes the fd named `name` as a listening unix stream socket (the vhost-user socket is
    /// [`VHOST_USER_FD_NAME`]). `Ok(None)`: no fd of that name.
    pub fn take_unix_listener(&mut self, name: &str) -> Result<Option<UnixListener>, SystemdError> {
        let Some(fd) = self.take(name) else {
            return Ok(None);
        };
        let bad = |reason| SystemdError::NotUnixListener {
            fd: fd.as_raw_fd(),
            name: name.to_string(),
            reason,
        };
        match socket::getsockopt(&fd, sockopt::SockType) {
            Ok(SockType::Stream) => {}
            Ok(_) => return Err(bad("not a stream socket (ListenDatagram= or similar)")),
            Err(_) => return Err(bad("not a socket")),
        }
        if !socket::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false) {
            return Err(bad("a socket, but not listening (Accept=yes?)"));
        }
        if socket::getsockname::<UnixAddr>(fd.as_raw_fd()).is_err() {
            return Err(bad("not a unix socket (ListenStream= names a port?)"));
        }
        Ok(Some(UnixListener::from(fd)))
    }

    /// Takes every fd named `queue-N` ([`queue_fd_name`]), by queue pair index. A second fd
    /// with the same name stays in the set (see [`ListenFds::into_remaining`]).
    pub fn take_queues(&mut self) -> BTreeMap<usize, OwnedFd> {
        let mut queues = BTreeMap::new();
        let mut rest = Vec::with_capacity(self.fds.len());
        for f in self.fds.drain(..) {
            match parse_queue_fd_name(&f.name) {
                Some(i) if !queues.contains_key(&i) => {
                    queues.insert(i, f.fd);
                }
                _ => rest.push(f),
            }
        }
        self.fds = rest;
        queues
    }

    /// The fds nobody took (to log and close, or to remove from the store).
    pub fn into_remaining(self) -> Vec<NamedFd> {
        self.fds
    }
}

/// The fd-store name of queue pair `pair`'s host queue fd.
pub fn queue_fd_name(pair: usize) -> String {
    format!("{QUEUE_PREFIX}{pair}")
}

/// The queue pair index of a [`queue_fd_name`], if it is one.
pub fn parse_queue_fd_name(name: &str) -> Option<usize> {
    let digits = name.strip_prefix(QUEUE_PREFIX)?;
    // Canonical only ("queue-01" is not queue 1): the name round-trips.
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether systemd accepts `name` in `FDNAME=` / `LISTEN_FDNAMES` (`fdname_is_valid`).
pub fn fd_name_is_valid(name: &str) -> bool {
    name.len() <= FDNAME_MAX
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

// ------------------------------------------------------------------------- sd_notify ---

/// One `KEY=VALUE` line of a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify<'a> {
    /// `READY=1`: start-up finished (`Type=notify`).
    Ready,
    /// `STOPPING=1`: shutting down.
    Stopping,
    /// `STATUS=…`: one line for `systemctl status` (newlines become spaces).
    Status(&'a str),
    /// `WATCHDOG=1`: still alive.
    Watchdog,
    /// `MAINPID=N`: the main process is N.
    MainPid(u32),
    /// `FDSTORE=1`: store the attached fds.
    FdStore,
    /// `FDSTOREREMOVE=1`: drop the stored fds named by [`Notify::FdName`].
    FdStoreRemove,
    /// `FDNAME=…`: name for [`Notify::FdStore`] / [`Notify::FdStoreRemove`].
    FdName(&'a str),
    /// `FDPOLL=0|1`: whether systemd drops stored fds on `POLLHUP`/`POLLERR`.
    FdPoll(bool),
}

/// The datagram for `msg`, one `KEY=VALUE` per line.
pub fn render(msg: &[Notify<'_>]) -> Result<String, SystemdError> {
    let mut s = String::new();
    let mut has_name = false;
    for m in msg {
        match *m {
            Notify::Ready => s.push_str("READY=1\n"),
            Notify::Stopping => s.push_str("STOPPING=1\n"),
            Notify::Status(text) => {
                s.push_str("STATUS=");
                // One line per key: a newline would start a bogus assignment.
                s.extend(text.chars().map(|c| if c.is_control() { ' ' } else { c }));
                s.push('\n');
            }
            Notify::Watchdog => s.push_str("WATCHDOG=1\n"),
            Notify::MainPid(pid) => {
                let _ = writeln!(s, "MAINPID={pid}");
            }
            Notify::FdStore => s.push_str("FDSTORE=1\n"),
            Notify::FdStoreRemove => s.push_str("FDSTOREREMOVE=1\n"),
            Notify::FdName(name) => {
                if !fd_name_is_valid(name) || name.is_empty() {
                    return Err(SystemdError::BadFdName(name.to_string()));
                }
                has_name = true;
                let _ = writeln!(s, "FDNAME={name}");
            }
            Notify::FdPoll(on) => {
                let _ = writeln!(s, "FDPOLL={}", u8::from(on));
            }
        }
    }
    if msg.contains(&Notify::FdStoreRemove) && !has_name {
        return Err(SystemdError::BadMessage("FDSTOREREMOVE=1 without FDNAME="));
    }
    if s.is_empty() {
        return Err(SystemdError::BadMessage("an empty notification"));
    }
    Ok(s)
}

/// A sender to the service manager's `NOTIFY_SOCKET`. The datagram socket is connected when
/// it is made, so that sends still reach the manager once the sandbox has hidden the socket's
/// path (and scoped abstract sockets to the process): a connected peer needs no lookup. If
/// nobody listens yet, each send names the address instead.
#[derive(Debug)]
pub struct Notifier {
    sock: OwnedFd,
    addr: UnixAddr,
    spec: String,
    connected: bool,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`; `Ok(None)` when it is unset or empty (not run by systemd).
    pub fn from_env() -> Result<Option<Notifier>, SystemdError> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(v) if !v.is_empty() => Notifier::new(&v.to_string_lossy()).map(Some),
            _ => Ok(None),
        }
    }

    /// For `spec`: an absolute path, or `@name` for an abstract socket.
    pub fn new(spec: &str) -> Result<Notifier, SystemdError> {
        let bad = || SystemdError::BadNotifySocket(spec.to_string());
        let addr = if let Some(name) = spec.strip_prefix('@') {
            UnixAddr::new_abstract(name.as_bytes()).map_err(|_| bad())?
        } else if spec.starts_with('/') {
            UnixAddr::new(spec).map_err(|_| bad())?
        } else {
            return Err(bad());
        };
        let sock = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(SystemdError::Socket)?;
        let connected = socket::connect(sock.as_raw_fd(), &addr).is_ok();
        Ok(Notifier {
            sock,
            addr,
            spec: spec.to_string(),
            connected,
        })
    }

    /// `NOTIFY_SOCKET` as given.
    pub fn address(&self) -> &str {
        &self.spec
    }

    /// Sends `msg` with `fds` attached (`SCM_RIGHTS`; at most [`MAX_FDS_PER_MESSAGE`]).
    pub fn send(&self, msg: &[Notify<'_>], fds: &[BorrowedFd<'_>]) -> Result<(), SystemdError> {
        let text = render(msg)?;
        if fds.len() > MAX_FDS_PER_MESSAGE {
            return Err(SystemdError::BadMessage(
                "more than 253 fds in one notification",
            ));
        }
        if msg.contains(&Notify::FdStore) && fds.is_empty() {
            return Err(SystemdError::BadMessage("FDSTORE=1 without fds"));
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [socket::ControlMessage::ScmRights(&raw)];
        let cmsgs: &[socket::ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(text.as_bytes())];
        socket::sendmsg(
            self.sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            (!self.connected).then_some(&self.addr),
        )
        .map_err(|source| SystemdError::Send {
            addr: self.spec.clone(),
            source,
        })?;
        Ok(())
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> Result<(), SystemdError> {
        self.send(&[Notify::Ready, Notify::Status(status)], &[])
    }

    /// `STATUS=…`.
    pub fn status(&self, status: &str) -> Result<(), SystemdError> {
        self.send(&[Notify::Status(status)], &[])
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) -> Result<(), SystemdError> {
        self.send(&[Notify::Watchdog], &[])
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) -> Result<(), SystemdError> {
        self.send(&[Notify::Stopping, Notify::Status(status)], &[])
    }

    /// `MAINPID=pid`.
    pub fn main_pid(&self, pid: u32) -> Result<(), SystemdError> {
        self.send(&[Notify::MainPid(pid)], &[])
    }

    /// `FDSTORE=1` + `FDNAME=name` (+ `FDPOLL=0` unless `poll`) with `fds`. Needs
    /// `FileDescriptorStoreMax=` in the unit; systemd ignores the message otherwise.
    pub fn store_fds(
        &self,
        name: &str,
        fds: &[BorrowedFd<'_>],
        poll: bool,
    ) -> Result<(), SystemdError> {
        let mut msg = vec![Notify::FdStore, Notify::FdName(name)];
        if !poll {
            msg.push(Notify::FdPoll(false));
        }
        self.send(&msg, fds)
    }

    /// [`Notifier::store_fds`] of one queue fd under [`queue_fd_name`], polled by systemd (so
    /// that it drops the fd of a deleted tap; see the module's design note).
    pub fn store_queue(&self, pair: usize, fd: impl AsFd) -> Result<(), SystemdError> {
        self.store_fds(&queue_fd_name(pair), &[fd.as_fd()], true)
    }

    /// `FDSTOREREMOVE=1` + `FDNAME=name`: systemd closes every stored fd of that name.
    pub fn remove_fds(&self, name: &str) -> Result<(), SystemdError> {
        self.send(&[Notify::FdStoreRemove, Notify::FdName(name)], &[])
    }
}

// -------------------------------------------------------------------------- watchdog ---

/// When the serve loop owes the manager a `WATCHDOG=1`.
#[derive(Debug, Clone)]
pub struct Watchdog {
    timeout: Duration,
    next: Instant,
}

/// The watchdog timeout from `WATCHDOG_USEC` / `WATCHDOG_PID`; `Ok(None)` when there is no
/// watchdog, or it watches another process.
pub fn watchdog_timeout(
    usec: Option<&str>,
    pid: Option<&str>,
    our_pid: u32,
) -> Result<Option<Duration>, SystemdError> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    if let Some(pid) = pid {
        let pid: u32 = parse_var("WATCHDOG_PID", pid, "process id")?;
        if pid != our_pid {
            return Ok(None);
        }
    }
    const USEC: &str = "timeout in microseconds (1 or more)";
    let us: u64 = parse_var("WATCHDOG_USEC", usec, USEC)?;
    // 0 and u64::MAX (infinity) are not timeouts (sd_watchdog_enabled refuses them too).
    if us == 0 || us == u64::MAX {
        return Err(bad_variable("WATCHDOG_USEC", usec, USEC));
    }
    Ok(Some(Duration::from_micros(us)))
}

/// The number in `value`, the manager's variable `var` (surrounding blanks allowed); else
/// the manager's fault, saying `what` it should have been.
fn parse_var<T: std::str::FromStr>(
    var: &'static str,
    value: &str,
    what: &'static str,
) -> Result<T, SystemdError> {
    value
        .trim()
        .parse()
        .map_err(|_| bad_variable(var, value, what))
}

fn bad_variable(var: &'static str, value: &str, what: &'static str) -> SystemdError {
    SystemdError::BadVariable {
        var,
        value: value.to_string(),
        what,
    }
}

impl Watchdog {
    /// From the environment; `Ok(None)` without a watchdog for this process.
    pub fn from_env() -> Result<Option<Watchdog>, SystemdError> {
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        Ok(
            watchdog_timeout(usec.as_deref(), pid.as_deref(), std::process::id())?
                .map(|t| Watchdog::new(t, Instant::now())),
        )
    }

    /// For a manager timeout of `timeout`; the first ping is due one interval after `now`.
    pub fn new(timeout: Duration, now: Instant) -> Watchdog {
        let mut w = Watchdog { timeout, next: now };
        w.next = now + w.interval();
        w
    }

    /// The manager's timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How often to ping: half the timeout, so one late wake-up does not kill the service.
    pub fn interval(&self) -> Duration {
        (self.timeout / 2).max(Duration::from_millis(1))
    }

    /// Time until the next ping is due (zero when overdue): a poll timeout for the serve loop.
    pub fn until_due(&self, now: Instant) -> Duration {
        self.next.saturating_duration_since(now)
    }

    /// Whether a ping is due at `now`; if so, the next one is scheduled an interval later.
    pub fn due(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.next = now + self.interval();
        true
    }
}

#[cfg(test)]
mod tests;
