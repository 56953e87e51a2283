//! `--take-over`: a new macvhost takes the vhost-user listener and the host queue fds from a
//! running one over the old one's `--control-socket`, so that an upgrade costs the frontend one
//! reconnect: no new socket file, no new macvtap, no carrier flap, no new ifindex.
//!
//! # Protocol (one connection on the old process's control socket)
//!
//! 1. new → old: `take-over 1 pid=PID\n` ([`REQUEST`]).
//! 2. old → new: one line of JSON ([`Facts`]) carrying its fds as `SCM_RIGHTS`, named in
//!    `fds` in the order they are attached: `vhost-user` (when it listens), `control`,
//!    `metrics` (when served) and `queue-0`… (one per queue pair; the names of the systemd fd
//!    store, so both arrive as a [`ListenFds`]). Or `error REASON\n` when it will not hand over.
//! 3. The new process checks what it got (the listener is bound to its `--socket-path`, the
//!    queues belong to its `--macvtap`/`--tap`), starts up, seals, and says
//!    `ready control=0|1\n` (1: it serves the control socket it was given, so the old one must
//!    not remove that file).
//! 4. The old one then stops: it ends its frontend connection, accepts no other, and once its
//!    workers are joined answers `released\n` and exits 0. It removes neither the socket file
//!    nor (take-over is refused for `--macvtap-parent` without `--keep`) the macvtap.
//! 5. The new one serves: it accepts on the same listener (QEMU `reconnect=`), or connects to
//!    the frontend right after `released` (`--client`).
//!
//! While the old process waits for `ready` (at most 20 s) its control thread serves nobody else:
//! a stats request waits.
//!
//! If the new process goes away (or refuses what it got) before step 3, the old one never
//! stopped serving: it logs one line and goes on. The control socket is operator-trusted (its
//! directory's permissions guard it), but every answer is still checked: a peer that is not a
//! macvhost, a missing or foreign fd, another device, is one error naming `--take-over`.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::systemd::{ListenFds, NamedFd};

/// What the new process sends first (followed by ` pid=PID\n`).
pub const REQUEST: &str = "take-over 1";
/// `Facts::macvhost` of a take-over offer.
const MAGIC: &str = "take-over";
const VERSION: u32 = 1;
/// Name of the control listener among the handed-over fds.
pub const CONTROL_FD_NAME: &str = "control";
/// Name of the Prometheus listener among the handed-over fds.
pub const METRICS_FD_NAME: &str = "metrics";
/// The longest offer line read (JSON of a few names per queue pair).
const MAX_OFFER: usize = 64 << 10;
/// The most fds one offer carries: 3 listeners and 256 queues (more than `SCM_MAX_FD`, 253, is
/// refused by the kernel anyway).
const MAX_FDS: usize = 3 + crate::host::MAX_QUEUE_PAIRS as usize;
/// How long the old process waits for the new one to be ready (its whole start-up).
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the new process waits for the offer.
const OFFER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the new process waits for the old one to let go of its frontend.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a take-over failed, from the new process's side. Every one is the operator's to fix (a
/// wrong `--take-over` path, flags that do not match the running macvhost): exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    /// Nobody answers on the path (operator: wrong path, or macvhost runs without
    /// `--control-socket`).
    #[error("--take-over {path}: cannot reach a running macvhost: {source}")]
    Unreachable {
        /// The control socket.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The peer's answer is not a take-over offer (operator: not macvhost, or a macvhost too
    /// old to hand over).
    #[error("--take-over {path}: {reason}")]
    NotMacvhost {
        /// The control socket.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The running macvhost said no (operator: see its reason).
    #[error("--take-over {path}: the running macvhost refused: {reason}")]
    Refused {
        /// The control socket.
        path: PathBuf,
        /// Its reason.
        reason: String,
    },
    /// What was handed over does not fit this process's flags (operator: start it with the
    /// running one's flags).
    #[error("--take-over {path}: {reason}")]
    Mismatch {
        /// The control socket.
        path: PathBuf,
        /// What does not fit.
        reason: String,
    },
    /// The exchange broke off (the old process died, or host trouble).
    #[error("--take-over {path}: {what}: {source}")]
    Io {
        /// The control socket.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

/// The facts of an offer: who hands over what.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Facts {
    /// Always `take-over`: tells a macvhost offer from anything else.
    pub macvhost: String,
    /// Protocol version (1).
    pub version: u32,
    /// The old process.
    pub pid: u32,
    /// The host interface it serves.
    pub iface: String,
    /// Its ifindex.
    pub ifindex: u32,
    /// Queue pairs it serves.
    pub queue_pairs: u16,
    /// `listen` or `connect`, and the path (a listener's bound path, or `--client`'s target;
    /// empty for an inherited listener, whose name the fd itself tells).
    pub socket: (String, PathBuf),
    /// The names of the attached fds, in order.
    pub fds: Vec<String>,
}

// ------------------------------------------------------------------------ old process ---

/// What the old process hands over, set up before it seals (the control thread serves it).
#[derive(Debug)]
pub struct Offer {
    facts: Facts,
    fds: Vec<OwnedFd>,
    /// Why it will not hand over (then it answers `error`).
    refusal: Option<String>,
    handover: Handover,
}

/// The old process's side of a take-over in progress: the new process's connection once it is
/// ready, and what the serve loop and the exit path need to know.
pub struct Handover {
    conn: Mutex<Option<UnixStream>>,
    handed: AtomicBool,
    keep_control: AtomicBool,
    /// Stops the serve loop for a hand-over (the server's stop handle).
    stop: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("handed", &self.handed.load(Ordering::SeqCst))
            .finish()
    }
}

impl Offer {
    /// An offer of `fds` (named in `facts.fds`, same order); `stop` ends the serve loop once the
    /// new process is ready. With a `refusal`, requests are answered with it instead.
    pub fn new(
        mut facts: Facts,
        fds: Vec<NamedFd>,
        refusal: Option<String>,
        stop: Box<dyn Fn() + Send + Sync>,
    ) -> Offer {
        facts.macvhost = MAGIC.into();
        facts.version = VERSION;
        facts.fds = fds.iter().map(|f| f.name.clone()).collect();
        Offer {
            facts,
            fds: fds.into_iter().map(|f| f.fd).collect(),
            refusal,
            handover: Handover {
                conn: Mutex::new(None),
                handed: AtomicBool::new(false),
                keep_control: AtomicBool::new(false),
                stop,
            },
        }
    }

    /// Whether a new process said it is ready and the serve loop was told to stop.
    pub fn handed_over(&self) -> bool {
        self.handover.handed.load(Ordering::SeqCst)
    }

    /// Whether the new process serves the control socket file now (so it is not removed).
    pub fn control_taken(&self) -> bool {
        self.handed_over() && self.handover.keep_control.load(Ordering::SeqCst)
    }

    /// Tells the new process that the frontend connection is over and the workers are joined
    /// (`released`); it may serve now. No-op without a hand-over.
    pub fn release(&self) {
        let conn = self
            .handover
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut c) = conn {
            // If the new process is gone, there is nobody to tell.
            let _ = c.write_all(b"released\n");
        }
    }

    /// Serves one take-over request on `conn` (the control thread, sealed: sendmsg, read and
    /// write on an accepted socket). Returns once the new process is ready (the serve loop was
    /// told to stop) or the take-over was abandoned (nothing changed).
    pub fn serve(&self, mut conn: UnixStream, request: &str) {
        let peer = request
            .strip_prefix(REQUEST)
            .and_then(|r| r.trim().strip_prefix("pid="))
            .and_then(|p| p.parse::<u32>().ok());
        let who = peer.map_or_else(|| "a new macvhost".to_string(), |p| format!("pid {p}"));
        let refusal = match (&self.refusal, self.handed_over()) {
            (Some(r), _) => Some(r.clone()),
            (None, true) => Some("it is already handing over to another process".into()),
            (None, false) => None,
        };
        if let Some(r) = refusal {
            tracing::warn!("take-over by {who} refused: {r}");
            let _ = writeln!(conn, "error {r}");
            return;
        }
        if let Err(e) = self.send_offer(&conn) {
            tracing::warn!("take-over by {who}: cannot send the fds: {e}; still serving");
            return;
        }
        tracing::info!(
            fds = ?self.facts.fds,
            "take-over by {who}: fds sent, waiting for it to be ready"
        );
        let _ = conn.set_read_timeout(Some(READY_TIMEOUT));
        let line = read_line(&mut conn, 256);
        match line.as_deref().map(str::trim_end) {
            Ok(l) if l.starts_with("ready") => {
                let control = l.split_whitespace().any(|w| w == "control=1");
                self.handover.keep_control.store(control, Ordering::SeqCst);
                *self.handover.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
                self.handover.handed.store(true, Ordering::SeqCst);
                tracing::info!(
                    "{who} is ready: handing over (ending the frontend connection, not \
                     removing the socket{})",
                    if control {
                        " or the control socket"
                    } else {
                        ""
                    }
                );
                (self.handover.stop)();
            }
            Ok("") => tracing::warn!(
                "take-over by {who} abandoned before it was ready (it closed the connection); \
                 still serving"
            ),
            Ok(l) => tracing::warn!(
                "take-over by {who} abandoned: it said {:?} instead of ready; still serving",
                l.chars().take(80).collect::<String>()
            ),
            Err(e) => tracing::warn!(
                "take-over by {who} abandoned before it was ready ({e}); still serving"
            ),
        }
    }

    fn send_offer(&self, conn: &UnixStream) -> std::io::Result<()> {
        let mut line = serde_json::to_string(&self.facts).map_err(std::io::Error::other)?;
        line.push('\n');
        let raw: Vec<RawFd> = self.fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let bytes = line.as_bytes();
        // The fds ride on the first byte; the rest of a long line follows as plain data.
        let sent = socket::sendmsg::<()>(
            conn.as_raw_fd(),
            &[IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(std::io::Error::from)?;
        let mut w = conn;
        w.write_all(&bytes[sent..])
    }
}

/// Reads up to `max` bytes until a newline; "" at EOF before any byte.
pub(crate) fn read_line(conn: &mut UnixStream, max: usize) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while buf.len() < max {
        match conn.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => buf.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

// ------------------------------------------------------------------------ new process ---

/// What the new process got: the old one's facts and fds, and the connection to answer on.
#[derive(Debug)]
pub struct Taken {
    path: PathBuf,
    conn: UnixStream,
    /// The old process's facts.
    pub facts: Facts,
    /// The fds, by name (`vhost-user`, `control`, `metrics`, `queue-N`).
    pub fds: ListenFds,
}

/// Asks the macvhost serving the control socket at `path` to hand over (protocol steps 1–2).
pub fn request(path: &Path) -> Result<Taken, TakeOverError> {
    let io = |what, source| TakeOverError::Io {
        path: path.to_path_buf(),
        what,
        source,
    };
    let mut conn = UnixStream::connect(path).map_err(|source| TakeOverError::Unreachable {
        path: path.to_path_buf(),
        source,
    })?;
    conn.set_read_timeout(Some(OFFER_TIMEOUT))
        .map_err(|e| io("setting a timeout", e))?;
    writeln!(conn, "{REQUEST} pid={}", std::process::id())
        .map_err(|e| io("sending the request", e))?;
    let (line, fds) = recv_offer(&conn).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            TakeOverError::NotMacvhost {
                path: path.to_path_buf(),
                reason: format!(
                    "no answer within {OFFER_TIMEOUT:?}: not a macvhost control socket?"
                ),
            }
        }
        _ => io("receiving the offer", e),
    })?;
    let (facts, fds) = parse_offer(&line, fds).map_err(|reason| match reason {
        Parsed::Refused(reason) => TakeOverError::Refused {
            path: path.to_path_buf(),
            reason,
        },
        Parsed::Bad(reason) => TakeOverError::NotMacvhost {
            path: path.to_path_buf(),
            reason,
        },
    })?;
    tracing::info!(
        pid = facts.pid,
        iface = %facts.iface,
        queue_pairs = facts.queue_pairs,
        fds = ?facts.fds,
        "taking over from the running macvhost"
    );
    Ok(Taken {
        path: path.to_path_buf(),
        conn,
        facts,
        fds: ListenFds::from_named(fds),
    })
}

/// Why an answer is not an offer.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// `error REASON`.
    Refused(String),
    /// Anything else that is not an offer.
    Bad(String),
}

/// Checks an answer and names its fds.
fn parse_offer(line: &str, fds: Vec<OwnedFd>) -> Result<(Facts, Vec<NamedFd>), Parsed> {
    if let Some(reason) = line.strip_prefix("error ") {
        return Err(Parsed::Refused(reason.trim().to_string()));
    }
    let facts: Facts = serde_json::from_str(line).map_err(|_| {
        Parsed::Bad(
            "the answer is not a take-over offer: not a macvhost control socket, or a macvhost \
             too old to hand over (stop it and start the new one instead)"
                .into(),
        )
    })?;
    if facts.macvhost != MAGIC || facts.version != VERSION {
        return Err(Parsed::Bad(format!(
            "the peer offers {:?} version {}, not take-over version {VERSION}",
            facts.macvhost, facts.version
        )));
    }
    if facts.fds.len() != fds.len() {
        return Err(Parsed::Bad(format!(
            "the offer names {} fds but {} arrived",
            facts.fds.len(),
            fds.len()
        )));
    }
    let known = |n: &str| {
        [
            crate::systemd::VHOST_USER_FD_NAME,
            CONTROL_FD_NAME,
            METRICS_FD_NAME,
        ]
        .contains(&n)
            || crate::systemd::parse_queue_fd_name(n).is_some()
    };
    if let Some(n) = facts.fds.iter().find(|n| !known(n)) {
        return Err(Parsed::Bad(format!("the offer names an unknown fd {n:?}")));
    }
    let named = facts
        .fds
        .iter()
        .cloned()
        .zip(fds)
        .map(|(name, fd)| NamedFd { name, fd })
        .collect();
    Ok((facts, named))
}

/// Receives the offer line and the fds that come with it.
fn recv_offer(conn: &UnixStream) -> std::io::Result<(String, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = loop {
            match socket::recvmsg::<()>(
                conn.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r.map_err(std::io::Error::from)?,
            }
        };
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in this process for this message
                    // (SCM_RIGHTS); nothing else knows the number, so owning it here is sound.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let n = msg.bytes;
        if truncated {
            return Err(std::io::Error::other("more fds than a take-over carries"));
        }
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
        if line.contains(&b'\n') || line.len() > MAX_OFFER {
            break;
        }
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    line.truncate(end);
    Ok((String::from_utf8_lossy(&line).into_owned(), fds))
}

impl Taken {
    /// The control socket the offer came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An error about what was handed over not fitting this process's flags.
    pub fn mismatch(&self, reason: impl Into<String>) -> TakeOverError {
        TakeOverError::Mismatch {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Protocol steps 3–4: says the new process is ready (`control`: it serves the control
    /// socket it was given) and waits until the old one has let go of its frontend. A closed
    /// connection means the old process is gone, which releases everything too; a timeout is
    /// logged and the new process goes on (its frontend cannot reach it before the old one
    /// lets go anyway).
    pub fn ready(mut self, control: bool) -> Result<(), TakeOverError> {
        let path = self.path.clone();
        writeln!(
            self.conn,
            "ready pid={} control={}",
            std::process::id(),
            u8::from(control)
        )
        .map_err(|source| TakeOverError::Io {
            path: path.clone(),
            what: "saying ready",
            source,
        })?;
        let _ = self.conn.set_read_timeout(Some(RELEASE_TIMEOUT));
        match read_line(&mut self.conn, 64) {
            Ok(l) if l.trim_end() == "released" => {
                tracing::info!(pid = self.facts.pid, "took over: the old macvhost let go");
            }
            Ok(l) if l.is_empty() => {
                tracing::info!(pid = self.facts.pid, "took over: the old macvhost is gone");
            }
            Ok(l) => tracing::warn!(
                "took over, but the old macvhost said {:?} instead of released",
                l.chars().take(80).collect::<String>()
            ),
            Err(e) => tracing::warn!(
                "took over, but the old macvhost did not let go within {RELEASE_TIMEOUT:?} \
                 ({e}); serving anyway"
            ),
        }
        Ok(())
    }
}

/// Whether `fd` is a listening TCP socket, and its address.
pub fn tcp_listener_addr(fd: BorrowedFd<'_>) -> Option<std::net::SocketAddr> {
    if !socket::getsockopt(&fd, socket::sockopt::AcceptConn).unwrap_or(false) {
        return None;
    }
    let addr = socket::getsockname::<socket::SockaddrStorage>(fd.as_raw_fd()).ok()?;
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(std::net::SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| std::net::SocketAddr::V6((*v6).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            macvhost: MAGIC.into(),
            version: VERSION,
            pid: 7,
            iface: "mvt0".into(),
            ifindex: 9,
            queue_pairs: 1,
            socket: ("listen".into(), "/run/vm0.sock".into()),
            fds: vec!["vhost-user".into(), "queue-0".into()],
        }
    }

    fn two_fds() -> Vec<OwnedFd> {
        let (a, b) = UnixStream::pair().unwrap();
        vec![a.into(), b.into()]
    }

    #[test]
    fn an_offer_names_its_fds_in_order() {
        let line = serde_json::to_string(&facts()).unwrap();
        let (f, named) = parse_offer(&line, two_fds()).unwrap();
        assert_eq!(f.iface, "mvt0");
        let names: Vec<_> = named.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["vhost-user", "queue-0"]);
    }

    /// Asserts `parse_offer(line, fds)` fails as not macvhost's, with a reason containing `says`.
    fn assert_bad(line: &str, fds: Vec<OwnedFd>, says: &str) {
        let e = parse_offer(line, fds).unwrap_err();
        assert!(
            matches!(e, Parsed::Bad(ref r) if r.contains(says)),
            "{line}: {e:?}"
        );
    }

    #[test]
    fn an_answer_that_is_not_an_offer_is_not_macvhost() {
        // What a macvhost without take-over answers: its stats.
        let stats = r#"{"iface":"mvt0","queues":[],"device":{}}"#;
        assert_bad(stats, vec![], "not a take-over offer");
        assert_bad("HTTP/1.0 200 OK", vec![], "");
        let mut f = facts();
        f.version = 2;
        assert_bad(&serde_json::to_string(&f).unwrap(), two_fds(), "version 2");
    }

    #[test]
    fn an_offer_with_missing_or_unknown_fds_is_refused() {
        let line = serde_json::to_string(&facts()).unwrap();
        let one_fd = two_fds().into_iter().take(1).collect();
        assert_bad(&line, one_fd, "2 fds but 1");
        let mut f = facts();
        f.fds[1] = "../etc".into();
        assert_bad(&serde_json::to_string(&f).unwrap(), two_fds(), "unknown fd");
    }

    #[test]
    fn a_refusal_carries_the_old_process_reason() {
        let e = parse_offer("error it created its macvtap", vec![]).unwrap_err();
        assert_eq!(e, Parsed::Refused("it created its macvtap".into()));
    }

    /// The whole exchange over a socket pair: fds arrive, ready is answered by released, and
    /// the old side's stop hook runs exactly once.
    #[test]
    fn offer_ready_release_round_trip_over_a_socket_pair() {
        let stopped = std::sync::Arc::new(AtomicBool::new(false));
        let s = stopped.clone();
        let (a, _keep) = UnixStream::pair().unwrap();
        let offer = Offer::new(
            facts(),
            vec![
                NamedFd {
                    name: "vhost-user".into(),
                    fd: a.into(),
                },
                NamedFd {
                    name: "queue-0".into(),
                    fd: OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
                },
            ],
            None,
            Box::new(move || s.store(true, Ordering::SeqCst)),
        );
        let (old, new) = UnixStream::pair().unwrap();
        std::thread::scope(|sc| {
            sc.spawn(|| offer.serve(old, "take-over 1 pid=42"));
            // (The request line was read by the control thread: `serve` gets it as text.)
            let mut new = new;
            let (line, fds) = recv_offer(&new).unwrap();
            assert_eq!(fds.len(), 2);
            let (f, _) = parse_offer(&line, fds).unwrap();
            assert_eq!(f.queue_pairs, 1);
            writeln!(new, "ready pid=42 control=1").unwrap();
            // The old side stops once ready is read; release answers.
            let t = std::time::Instant::now();
            while !stopped.load(Ordering::SeqCst) {
                assert!(t.elapsed() < Duration::from_secs(5), "never stopped");
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(offer.handed_over() && offer.control_taken());
            offer.release();
            assert_eq!(read_line(&mut new, 64).unwrap(), "released");
        });
    }

    #[test]
    fn a_new_process_gone_before_ready_changes_nothing() {
        let offer = Offer::new(facts(), vec![], None, Box::new(|| panic!("must not stop")));
        let (old, new) = UnixStream::pair().unwrap();
        drop(new);
        offer.serve(old, REQUEST);
        assert!(!offer.handed_over());
        offer.release();
    }
}
