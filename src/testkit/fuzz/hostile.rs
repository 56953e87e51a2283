//! A hostile vhost-user frontend, through the real socket path (the shim included), and the
//! health probe that follows every connection.
//!
//! Used by `tests/vu_hostile_frontend.rs` (issue 15's four sequences, one regression test
//! each), `tests/vu_hostile_fuzz.rs` (the randomized run, bounded in CI) and
//! `tests/host_hostile_binary.rs` (both against the binary, sealed). A [`Target`] is a
//! socket path and the process behind it: the in-process serve loop (`tests/support/rig.rs`)
//! or a `macvhost` child.
//!
//! # The fuzzer ([`fuzz`])
//!
//! Each connection plays one scenario drawn from a seeded generator: raw messages (any code,
//! flags, size, payload; headers split over several writes; up to 40 fds of every kind), a
//! structured handshake with a few steps made wrong (protocol features, early
//! SET_VRING_ENABLEs, memory tables with overlapping, zero-sized or out-of-file regions, rings
//! outside memory, kick/call/err fds that are saturated eventfds, full or closed pipes, regular
//! files or sockets, chains pointing anywhere, kicks, SET_LOG_BASE, a backend channel nobody
//! reads, link changes, replies left unread), or one of issue 15's sequences. Then it leaves,
//! and the probe checks:
//! - a new frontend gets GET_FEATURES answered within [`SERVE_BOUND`];
//! - the target's fd count is back to its baseline (within [`FD_SLACK`]);
//! - every [`IDLE_EVERY`] connections, the target burns no CPU while idle;
//! - at the end, RSS has not grown by more than [`RSS_SLACK_KIB`];
//! - the target process is still alive (a sealed `macvhost` child dies of SIGSYS if an error
//!   path makes a syscall its filters do not allow).
//!
//! A failed check panics with the seed and the connection number: rerun with that seed.
//! [`fuzz_from_env`] is how the tests run it: a fixed seed plus a random one (printed), or the
//! seed and duration given in `MACVHOST_HOSTILE_SEED` / `MACVHOST_HOSTILE_SECS`.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserLog, VhostUserMemory, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserSingleMemoryRegion, VhostUserVringAddr, VhostUserVringAddrFlags, VhostUserVringState,
};
use vm_memory::ByteValued;

use super::layout::{MEM_SIZE, RINGS, RING_STRIDE, VMM_BASE};

/// A new frontend must be answered this soon after the previous one left.
pub const SERVE_BOUND: Duration = Duration::from_secs(5);
/// fds the target may hold above its baseline once a connection is over (none are expected;
/// this absorbs a probe that is still being torn down).
pub const FD_SLACK: usize = 4;
/// RSS growth allowed over a whole run (allocator noise; issue 15 grew 125 MiB in one
/// connection).
pub const RSS_SLACK_KIB: u64 = 32 * 1024;
/// Idle CPU is checked every this many connections.
pub const IDLE_EVERY: u64 = 25;

const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// TX buffers live from here.
const BUFS: u64 = 0x8_0000;
const QSIZE: u16 = 256;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const PROTOCOL_FEATURES: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------------
// The process behind the socket
// ---------------------------------------------------------------------------------------------

/// A process to watch (`/proc/<pid>`).
#[derive(Debug, Clone, Copy)]
pub struct Proc(pub u32);

impl Proc {
    /// This process (the in-process serve loop).
    pub fn this() -> Proc {
        Proc(std::process::id())
    }

    /// Open fds (`usize::MAX` when they cannot be listed, e.g. a full fd table: never "few").
    pub fn fds(self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.0)).map_or(usize::MAX, |d| d.count())
    }

    /// Resident set size in KiB.
    pub fn rss_kib(self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0)).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// User + system CPU time in clock ticks.
    pub fn cpu_ticks(self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0)).unwrap_or_default();
        // Fields after the command name (which may contain spaces) start after the last ')'.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
        n(11) + n(12)
    }

    /// Waits up to `limit` for the fd count to drop to `at_most`; returns the last count.
    pub fn fds_settle(self, at_most: usize, limit: Duration) -> usize {
        let end = Instant::now() + limit;
        loop {
            let n = self.fds();
            if n <= at_most || Instant::now() >= end {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// CPU ticks burnt over `window` (the caller makes sure nothing should run).
    pub fn idle_ticks(self, window: Duration) -> u64 {
        let t0 = self.cpu_ticks();
        std::thread::sleep(window);
        self.cpu_ticks().saturating_sub(t0)
    }

    /// Whether the process has exited (a zombie, or gone): a child killed by SIGSYS is a
    /// zombie until its parent waits for it.
    pub fn exited(self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.0)) {
            Ok(s) => s
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X"),
            Err(_) => true,
        }
    }
}

/// Where the hostile frontend connects, and what it can do to the host side.
pub struct Target<'a> {
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The process serving it.
    pub proc_: Proc,
    /// Sets the host link's carrier (a link change makes a CONFIG_CHANGE_MSG due).
    pub set_link: Option<&'a (dyn Fn(bool) + Sync)>,
}

impl std::fmt::Debug for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("socket", &self.socket)
            .field("proc", &self.proc_)
            .finish_non_exhaustive()
    }
}

/// Connects to `sock` and times GET_FEATURES: how long a new frontend waits to be served.
pub fn probe(sock: &Path, limit: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    let s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if t.elapsed() >= limit => return Err(format!("connect: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let left = limit
        .saturating_sub(t.elapsed())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(left)).map_err(|e| e.to_string())?;
    (&s).write_all(&frame(FrontendReq::GET_FEATURES.into(), VERSION, &[]))
        .map_err(|e| format!("send GET_FEATURES: {e}"))?;
    let mut reply = [0u8; 20];
    (&s).read_exact(&mut reply)
        .map_err(|e| format!("no GET_FEATURES reply within {limit:?}: {e}"))?;
    if reply[0..4] != u32::from(FrontendReq::GET_FEATURES).to_ne_bytes() {
        return Err(format!("unexpected reply {reply:?}"));
    }
    Ok(t.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Messages and fds
// ---------------------------------------------------------------------------------------------

/// Header + payload, the size field set to the payload's length.
pub fn frame(code: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    frame_sized(code, flags, payload.len() as u32, payload)
}

/// Header + payload with any size field.
pub fn frame_sized(code: u32, flags: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + payload.len());
    v.extend_from_slice(&code.to_ne_bytes());
    v.extend_from_slice(&flags.to_ne_bytes());
    v.extend_from_slice(&size.to_ne_bytes());
    v.extend_from_slice(payload);
    v
}

/// Kinds of fd a hostile frontend attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A non-blocking eventfd (what QEMU sends).
    EventFd,
    /// A blocking eventfd at 0xffff_ffff_ffff_fffe: a write of 1 would block.
    SaturatedEventFd,
    /// The write end of a blocking pipe whose buffer is full.
    FullPipe,
    /// The read end of a pipe with data in it (always readable).
    PipeWithData,
    /// The read end of a pipe whose writer is gone (readable, end of file).
    ClosedPipe,
    /// A regular file.
    RegularFile,
    /// One end of a stream socketpair.
    Socket,
    /// A memfd of `MEM_SIZE` bytes.
    Memfd,
    /// A memfd of one page (too small for most regions).
    SmallMemfd,
    /// `/dev/null`.
    DevNull,
}

impl FdKind {
    const ALL: [FdKind; 10] = [
        FdKind::EventFd,
        FdKind::SaturatedEventFd,
        FdKind::FullPipe,
        FdKind::PipeWithData,
        FdKind::ClosedPipe,
        FdKind::RegularFile,
        FdKind::Socket,
        FdKind::Memfd,
        FdKind::SmallMemfd,
        FdKind::DevNull,
    ];
}

/// Makes an fd of `kind`; partner fds that must stay open go to `keep`.
pub fn make_fd(kind: FdKind, keep: &mut Vec<OwnedFd>) -> io::Result<OwnedFd> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let memfd = |size: u64| -> io::Result<OwnedFd> {
        let fd = nix::sys::memfd::memfd_create(c"hostile", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
        File::from(fd.try_clone()?).set_len(size)?;
        Ok(fd)
    };
    Ok(match kind {
        FdKind::EventFd => {
            EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?.into()
        }
        FdKind::SaturatedEventFd => {
            let e = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?;
            e.write(0xffff_ffff_ffff_fffe)?;
            e.into()
        }
        FdKind::FullPipe => {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            set_nonblocking(&w, true);
            while nix::unistd::write(&w, &[0u8; 4096]).is_ok() {}
            set_nonblocking(&w, false);
            keep.push(r);
            w
        }
        FdKind::PipeWithData => {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            nix::unistd::write(&w, &[1u8; 100])?;
            keep.push(w);
            r
        }
        FdKind::ClosedPipe => nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?.0,
        FdKind::RegularFile => {
            use nix::fcntl::OFlag;
            use nix::sys::stat::Mode;
            // An unnamed file in the temp directory: nothing to clean up.
            nix::fcntl::open(
                &std::env::temp_dir(),
                OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
                Mode::S_IRUSR | Mode::S_IWUSR,
            )?
        }
        FdKind::Socket => {
            let (a, b) = UnixStream::pair()?;
            keep.push(OwnedFd::from(b));
            OwnedFd::from(a)
        }
        FdKind::Memfd => memfd(MEM_SIZE)?,
        FdKind::SmallMemfd => memfd(4096)?,
        FdKind::DevNull => OwnedFd::from(File::open("/dev/null")?),
    })
}

fn set_nonblocking(fd: &OwnedFd, on: bool) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fl = if on {
        OFlag::O_NONBLOCK
    } else {
        OFlag::empty()
    };
    let _ = fcntl(fd, FcntlArg::F_SETFL(fl));
}

// ---------------------------------------------------------------------------------------------
// A frontend session
// ---------------------------------------------------------------------------------------------

/// Why a session stopped early.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// The target closed the connection (it refused something: expected for hostile input).
    Closed,
    /// A send did not complete within the write timeout: the target stopped reading us.
    Stalled,
}

/// One hostile frontend connection.
#[derive(Debug)]
pub struct Session {
    sock: UnixStream,
    /// Guest memory as this frontend shares it.
    pub memfd: File,
    /// fds that must outlive the messages that carried them (pipe partners, kick fds...).
    pub keep: Vec<OwnedFd>,
    /// Our side of each vring's kick fd (written to kick).
    kicks: Vec<Option<OwnedFd>>,
    /// Next free descriptor and avail index per vring.
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
    /// Messages sent.
    pub messages: u64,
    /// Set once the target closed or stalled the connection.
    pub stopped: Option<Stop>,
}

impl Session {
    /// Connects (retrying for [`SERVE_BOUND`]); sends block for at most `write_timeout`.
    pub fn connect(sock: &Path, write_timeout: Duration) -> io::Result<Session> {
        let t = Instant::now();
        let sock = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) if t.elapsed() >= SERVE_BOUND => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        sock.set_write_timeout(Some(write_timeout))?;
        sock.set_read_timeout(Some(SERVE_BOUND))?;
        let memfd = File::from(make_fd(FdKind::Memfd, &mut Vec::new())?);
        Ok(Session {
            sock,
            memfd,
            keep: Vec::new(),
            kicks: Vec::new(),
            next_desc: Vec::new(),
            avail_idx: Vec::new(),
            messages: 0,
            stopped: None,
        })
    }

    /// Our socket (to read replies on another thread, or to shut down).
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Sends `bytes` with `fds` on the first byte, in `pieces` writes. Records a stop.
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[RawFd], pieces: usize) {
        if self.stopped.is_some() {
            return;
        }
        self.messages += 1;
        let pieces = pieces.clamp(1, bytes.len().max(1));
        let step = bytes.len().div_ceil(pieces).max(1);
        let mut off = 0;
        while off < bytes.len() || (off == 0 && bytes.is_empty()) {
            let end = (off + step).min(bytes.len());
            let rights = [ControlMessage::ScmRights(fds)];
            let cmsgs: &[ControlMessage<'_>] = if off == 0 && !fds.is_empty() {
                &rights
            } else {
                &[]
            };
            let r = sendmsg::<()>(
                self.sock.as_raw_fd(),
                &[IoSlice::new(&bytes[off..end])],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            );
            match r {
                Ok(n) => off += n.max(1),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => {
                    self.stopped = Some(Stop::Stalled);
                    return;
                }
                Err(_) => {
                    self.stopped = Some(Stop::Closed);
                    return;
                }
            }
            if bytes.is_empty() {
                break;
            }
        }
    }

    /// Sends one message (no reply expected).
    pub fn send(&mut self, code: FrontendReq, payload: &[u8], fds: &[RawFd]) {
        self.send_raw(&frame(code.into(), VERSION, payload), fds, 1);
    }

    /// Sends a request and reads its u64 reply.
    pub fn get_u64(&mut self, code: FrontendReq) -> Option<u64> {
        self.send(code, &[], &[]);
        let mut r = [0u8; 20];
        match (&self.sock).read_exact(&mut r) {
            Ok(()) => Some(u64::from_ne_bytes(r[12..20].try_into().ok()?)),
            Err(_) => {
                self.stopped.get_or_insert(Stop::Closed);
                None
            }
        }
    }

    /// Whether the target closes the connection within `limit` (replies are read and dropped).
    pub fn closed_within(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        let _ = self.sock.set_read_timeout(Some(Duration::from_millis(50)));
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            match (&self.sock).read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                Err(_) => return true,
            }
        }
        false
    }

    /// Negotiates features (what the target offers, masked) and protocol features `pf`.
    pub fn negotiate(&mut self, features_mask: u64, pf: u64) -> Option<u64> {
        let offered = self.get_u64(FrontendReq::GET_FEATURES)?;
        self.send(FrontendReq::SET_PROTOCOL_FEATURES, &pf.to_ne_bytes(), &[]);
        let acked = offered & (features_mask | PROTOCOL_FEATURES);
        self.send(FrontendReq::SET_FEATURES, &acked.to_ne_bytes(), &[]);
        Some(acked)
    }

    /// SET_MEM_TABLE: `regions` as (guest address, size, mmap offset), each over its fd.
    pub fn mem_table(&mut self, regions: &[(u64, u64, u64)], fds: &[RawFd]) {
        let mut p = VhostUserMemory::new(regions.len() as u32)
            .as_slice()
            .to_vec();
        for &(gpa, size, off) in regions {
            p.extend_from_slice(
                VhostUserMemoryRegion::new(gpa, size, VMM_BASE.wrapping_add(gpa), off).as_slice(),
            );
        }
        self.send(FrontendReq::SET_MEM_TABLE, &p, fds);
    }

    /// The whole guest memory (the memfd) as one region.
    pub fn good_mem_table(&mut self) {
        let fd = self.memfd.as_raw_fd();
        self.mem_table(&[(0, MEM_SIZE, 0)], &[fd]);
    }

    fn ring_addrs(q: u32) -> (u64, u64, u64) {
        let desc = RINGS + u64::from(q) * RING_STRIDE;
        let avail = desc + 16 * u64::from(QSIZE);
        let used = (avail + 6 + 2 * u64::from(QSIZE) + 3) & !3;
        (desc, avail, used)
    }

    /// SET_VRING_NUM/ADDR/BASE for vring `q` at its place in guest memory (or `addrs`).
    pub fn vring(&mut self, q: u32, num: u32, addrs: Option<(u64, u64, u64)>) {
        let (d, a, u) = Self::ring_addrs(q);
        let (d, a, u) = addrs.unwrap_or((VMM_BASE + d, VMM_BASE + a, VMM_BASE + u));
        self.send(
            FrontendReq::SET_VRING_NUM,
            VhostUserVringState::new(q, num).as_slice(),
            &[],
        );
        let addr = VhostUserVringAddr::new(q, VhostUserVringAddrFlags::empty(), d, u, a, 0);
        self.send(FrontendReq::SET_VRING_ADDR, addr.as_slice(), &[]);
        self.send(
            FrontendReq::SET_VRING_BASE,
            VhostUserVringState::new(q, 0).as_slice(),
            &[],
        );
        let q = q as usize;
        if self.next_desc.len() <= q {
            self.next_desc.resize(q + 1, 0);
            self.avail_idx.resize(q + 1, 0);
            self.kicks.resize_with(q + 1, || None);
        }
    }

    /// SET_VRING_KICK/CALL/ERR for `q` with `fd` (or the "no fd" bit).
    pub fn vring_fd(&mut self, code: FrontendReq, q: u32, fd: Option<OwnedFd>) {
        let payload = (u64::from(q) | if fd.is_none() { 0x100 } else { 0 }).to_ne_bytes();
        let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        self.send(code, &payload, &raw);
        if let Some(fd) = fd {
            if code == FrontendReq::SET_VRING_KICK {
                if let Some(slot) = self.kicks.get_mut(q as usize) {
                    *slot = Some(fd);
                    return;
                }
            }
            self.keep.push(fd);
        }
    }

    /// SET_VRING_ENABLE.
    pub fn enable(&mut self, q: u32, on: u32) {
        self.send(
            FrontendReq::SET_VRING_ENABLE,
            VhostUserVringState::new(q, on).as_slice(),
            &[],
        );
    }

    /// A working queue pair set-up for vrings `0..vrings`: rings in memory, non-blocking
    /// eventfds, enabled.
    pub fn start_rings(&mut self, vrings: u32) {
        for q in 0..vrings {
            self.vring(q, u32::from(QSIZE), None);
            let call = make_fd(FdKind::EventFd, &mut self.keep).ok();
            self.vring_fd(FrontendReq::SET_VRING_CALL, q, call);
            let kick = make_fd(FdKind::EventFd, &mut self.keep).ok();
            self.vring_fd(FrontendReq::SET_VRING_KICK, q, kick);
            self.enable(q, 1);
        }
    }

    /// Publishes a one-descriptor chain of `len` bytes at guest address `addr` on vring `q`
    /// (a TX frame when the bytes are a vnet header and a frame).
    pub fn post(&mut self, q: usize, addr: u64, len: u32, flags: u16) {
        let (desc, avail, _) = Self::ring_addrs(q as u32);
        let Some(head) = self.next_desc.get(q).copied() else {
            return;
        };
        let head = head % QSIZE;
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes());
        let _ = self.memfd.write_at(&d, desc + 16 * u64::from(head));
        let idx = self.avail_idx[q];
        let _ = self
            .memfd
            .write_at(&head.to_le_bytes(), avail + 4 + 2 * u64::from(idx % QSIZE));
        self.avail_idx[q] = idx.wrapping_add(1);
        let _ = self
            .memfd
            .write_at(&self.avail_idx[q].to_le_bytes(), avail + 2);
        self.next_desc[q] = head.wrapping_add(1);
    }

    /// Writes `frame` (after a zero 12-byte vnet header) and posts it on TX vring `q`.
    pub fn post_tx(&mut self, q: usize, frame: &[u8]) {
        let slot = self.next_desc.get(q).copied().unwrap_or(0) % QSIZE;
        let addr = BUFS + u64::from(slot) * 2048;
        let mut bytes = vec![0u8; 12];
        bytes.extend_from_slice(frame);
        let _ = self.memfd.write_at(&bytes, addr);
        self.post(q, addr, bytes.len() as u32, 0);
    }

    /// Kicks vring `q` through its kick fd (if it is ours to write).
    pub fn kick(&mut self, q: usize) {
        if let Some(Some(k)) = self.kicks.get(q) {
            // The fd may be of any kind (a full pipe...): the frontend never waits on it.
            set_nonblocking(k, true);
            let _ = nix::unistd::write(k, &1u64.to_ne_bytes());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Issue 15's sequences
// ---------------------------------------------------------------------------------------------

/// Issue 15 #1: GET_FEATURES with 33 fds, then close.
pub fn seq_33_fds(sock: &Path) -> io::Result<()> {
    let mut s = Session::connect(sock, SERVE_BOUND)?;
    let raw = vec![s.memfd.as_raw_fd(); 33];
    s.send_raw(
        &frame(FrontendReq::GET_FEATURES.into(), VERSION, &[]),
        &raw,
        1,
    );
    let _ = s.closed_within(Duration::from_millis(200));
    Ok(())
}

/// Issue 15 #2: up to `n` SET_VRING_ENABLE(enable=1) before SET_FEATURES, each with a 64 KiB
/// payload and 32 fds. Returns the session (still open, so the target would still hold
/// whatever it kept) and how many were sent before the target stopped taking them.
pub fn seq_early_enable_flood(sock: &Path, n: usize) -> io::Result<(Session, usize)> {
    let mut s = Session::connect(sock, Duration::from_secs(2))?;
    let raw = vec![s.memfd.as_raw_fd(); 32];
    let mut payload = vec![0u8; 64 * 1024];
    payload[4..8].copy_from_slice(&1u32.to_ne_bytes());
    let msg = frame(FrontendReq::SET_VRING_ENABLE.into(), VERSION, &payload);
    let mut sent = 0;
    while sent < n && s.stopped.is_none() {
        s.send_raw(&msg, &raw, 1);
        if s.stopped.is_none() {
            sent += 1;
        }
    }
    Ok((s, sent))
}

/// Asserts that `p` holds at most 64 more fds and 16 MiB more RSS than `fds0`/`rss0` after
/// [`seq_early_enable_flood`] sent `sent` messages, measured while that frontend is still
/// connected (before issue 15, 400 of them held 12,800 fds and 25 MiB).
pub fn assert_flat_after_early_enables(p: Proc, fds0: usize, rss0: u64, sent: usize) {
    let (fds, rss) = (p.fds(), p.rss_kib());
    assert!(
        fds <= fds0 + 64,
        "{sent} early enables: {fds0} → {fds} fds while the frontend is connected"
    );
    assert!(
        rss <= rss0 + 16 * 1024,
        "{sent} early enables: RSS {rss0} → {rss} KiB while the frontend is connected"
    );
}

/// The protocol features a full-featured frontend acks.
pub const PF_ALL: u64 = VhostUserProtocolFeatures::MQ.bits()
    | VhostUserProtocolFeatures::REPLY_ACK.bits()
    | VhostUserProtocolFeatures::CONFIG.bits()
    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS.bits()
    | VhostUserProtocolFeatures::BACKEND_REQ.bits()
    | VhostUserProtocolFeatures::LOG_SHMFD.bits();

/// Issue 15 #3: CONFIG and BACKEND_REQ negotiated, a backend channel whose buffer is already
/// full (blocking), SET_FEATURES, then the host link goes down and up, then the vhost-user
/// socket closes. Returns the frontend's end of the channel: hold it (never read) to keep the
/// channel full.
pub fn seq_backend_channel_full(target: &Target<'_>) -> io::Result<UnixStream> {
    let mut s = Session::connect(&target.socket, SERVE_BOUND)?;
    let offered = s
        .get_u64(FrontendReq::GET_FEATURES)
        .ok_or_else(|| io::Error::other("no GET_FEATURES reply"))?;
    // Without REPLY_ACK: nothing to read back.
    let pf = PF_ALL & !VhostUserProtocolFeatures::REPLY_ACK.bits();
    s.send(FrontendReq::SET_PROTOCOL_FEATURES, &pf.to_ne_bytes(), &[]);
    let (ours, theirs) = UnixStream::pair()?;
    theirs.set_nonblocking(true)?;
    while (&theirs).write(&[0u8; 4096]).is_ok() {}
    theirs.set_nonblocking(false)?;
    s.send(FrontendReq::SET_BACKEND_REQ_FD, &[], &[theirs.as_raw_fd()]);
    drop(theirs);
    s.send(FrontendReq::SET_FEATURES, &offered.to_ne_bytes(), &[]);
    // Make sure the backend got that far.
    s.get_u64(FrontendReq::GET_FEATURES)
        .ok_or_else(|| io::Error::other("connection closed during set-up"))?;
    if let Some(set_link) = target.set_link {
        set_link(false);
        std::thread::sleep(Duration::from_millis(300));
        set_link(true);
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(s);
    Ok(ours)
}

/// Issue 15 #4: one queue pair set up, the TX vring's call fd replaced by `call` (a full
/// blocking pipe or a saturated blocking eventfd), then `frames` TX frames, each kicked.
/// Returns the session (connected).
pub fn seq_call_fd_never_drains(sock: &Path, call: FdKind, frames: usize) -> io::Result<Session> {
    let mut s = Session::connect(sock, SERVE_BOUND)?;
    // No EVENT_IDX: every used buffer notifies.
    let mask = !(1u64 << 29);
    s.negotiate(mask, PF_ALL & !VhostUserProtocolFeatures::REPLY_ACK.bits())
        .ok_or_else(|| io::Error::other("no GET_FEATURES reply"))?;
    s.good_mem_table();
    s.start_rings(2);
    let bad = make_fd(call, &mut s.keep)?;
    s.vring_fd(FrontendReq::SET_VRING_CALL, 1, Some(bad));
    // A round trip: the handler has taken the new call fd before the first frame.
    s.get_u64(FrontendReq::GET_FEATURES)
        .ok_or_else(|| io::Error::other("connection closed during set-up"))?;
    for i in 0..frames {
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        f[14..18].copy_from_slice(&(i as u32).to_be_bytes());
        s.post_tx(1, &f);
        s.kick(1);
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// The fuzzer
// ---------------------------------------------------------------------------------------------

/// A small deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// 64 random bits.
    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.u64() % n.max(1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

/// How long and from where a run goes.
#[derive(Debug, Clone, Copy)]
pub struct FuzzConfig {
    /// The generator's seed.
    pub seed: u64,
    /// Wall time of the run.
    pub duration: Duration,
}

/// What a run did and saw.
#[derive(Debug, Clone, Default)]
pub struct FuzzReport {
    /// Connections played.
    pub connections: u64,
    /// Messages sent (split sends count once).
    pub messages: u64,
    /// Connections the target ended (it refused something).
    pub closed_by_target: u64,
    /// Target fds at the start (after a warm-up connection) and the most seen after a
    /// connection.
    pub fds_baseline: usize,
    /// Most fds seen after a connection.
    pub fds_max: usize,
    /// RSS at the start and the end, and the most seen (KiB).
    pub rss_start_kib: u64,
    /// RSS at the end.
    pub rss_end_kib: u64,
    /// Most RSS seen.
    pub rss_max_kib: u64,
    /// Slowest probe (a new frontend served).
    pub slowest_probe: Duration,
    /// Most CPU ticks burnt in a 200 ms idle window.
    pub idle_ticks_max: u64,
    /// RSS every [`IDLE_EVERY`] connections (the trend).
    pub rss_trend_kib: Vec<u64>,
}

/// Runs hostile connections against `target` for `cfg.duration` (see the module doc). Panics
/// when a check fails.
pub fn fuzz(target: &Target<'_>, cfg: FuzzConfig) -> FuzzReport {
    let mut rng = Rng::new(cfg.seed);
    let p = target.proc_;
    let fail = |conn: u64, what: String| -> ! {
        panic!(
            "hostile fuzz (seed {:#x}), connection {conn}: {what}",
            cfg.seed
        )
    };
    // Warm up (first-connection allocations, the watchdog thread), then take the baseline.
    if let Err(e) = probe(&target.socket, SERVE_BOUND) {
        fail(0, format!("the target does not serve at all: {e}"));
    }
    let mut r = FuzzReport {
        fds_baseline: p.fds_settle(0, Duration::from_millis(200)),
        rss_start_kib: p.rss_kib(),
        ..FuzzReport::default()
    };
    r.fds_max = r.fds_baseline;
    r.rss_max_kib = r.rss_start_kib;
    let start = Instant::now();
    while start.elapsed() < cfg.duration {
        let n = r.connections + 1;
        let (messages, closed, held) = connection(target, &mut rng);
        r.connections = n;
        r.messages += messages;
        r.closed_by_target += u64::from(closed);
        // A sealed target that made a syscall outside its allowlist is dead (SIGSYS), and
        // every frontend with it: say so rather than "not served".
        if p.exited() {
            fail(n, format!("the target process {} died", p.0));
        }
        match probe(&target.socket, SERVE_BOUND) {
            Ok(t) => r.slowest_probe = r.slowest_probe.max(t),
            Err(e) => fail(n, format!("the next frontend was not served: {e}")),
        }
        // What the frontend held across the probe (a full backend channel) goes now.
        drop(held);
        let fds = p.fds_settle(r.fds_baseline + FD_SLACK, Duration::from_secs(2));
        r.fds_max = r.fds_max.max(fds);
        if fds > r.fds_baseline + FD_SLACK {
            fail(
                n,
                format!(
                    "the target holds {fds} fds, {} at the start",
                    r.fds_baseline
                ),
            );
        }
        let rss = p.rss_kib();
        r.rss_max_kib = r.rss_max_kib.max(rss);
        if n % IDLE_EVERY == 0 {
            r.rss_trend_kib.push(rss);
            let ticks = p.idle_ticks(Duration::from_millis(200));
            r.idle_ticks_max = r.idle_ticks_max.max(ticks);
            // 200 ms is 20 ticks at 100 Hz: a spinning thread would burn them all.
            if ticks > 4 {
                fail(
                    n,
                    format!("the target burnt {ticks} ticks in 200 ms while idle"),
                );
            }
        }
    }
    r.rss_end_kib = p.rss_kib();
    if r.rss_end_kib > r.rss_start_kib + RSS_SLACK_KIB {
        fail(
            r.connections,
            format!(
                "RSS grew from {} KiB to {} KiB",
                r.rss_start_kib, r.rss_end_kib
            ),
        );
    }
    r
}

impl std::fmt::Display for FuzzReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} connections ({} ended by macvhost), {} messages; fds {} at the start, {} at most \
             after a connection; RSS {} → {} KiB (max {}); slowest next-frontend probe {:?}; \
             most idle CPU {} ticks / 200 ms; RSS trend {:?} KiB",
            self.connections,
            self.closed_by_target,
            self.messages,
            self.fds_baseline,
            self.fds_max,
            self.rss_start_kib,
            self.rss_end_kib,
            self.rss_max_kib,
            self.slowest_probe,
            self.idle_ticks_max,
            self.rss_trend_kib
        )
    }
}

/// The seed every bounded run plays first.
pub const FIXED_SEED: u64 = 0x15_15_15;

/// `name` from the environment, decimal or `0x` hex.
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    u64::from_ne_bytes(b)
}

/// [`fuzz`] as the tests run it: [`FIXED_SEED`] then a random seed, or only
/// `MACVHOST_HOSTILE_SEED` when set; each for `MACVHOST_HOSTILE_SECS` seconds, `default_secs`
/// when unset. Each seed is printed before its run (a failure can be replayed) and the report
/// after it; `what` names the target in those lines. Panics as [`fuzz`] does, and when a run
/// played no connection.
pub fn fuzz_from_env(target: &Target<'_>, what: &str, default_secs: u64) -> Vec<FuzzReport> {
    let secs = env_u64("MACVHOST_HOSTILE_SECS").unwrap_or(default_secs);
    let seeds = match env_u64("MACVHOST_HOSTILE_SEED") {
        Some(s) => vec![s],
        None => vec![FIXED_SEED, random_seed()],
    };
    let mut reports = Vec::new();
    for seed in seeds {
        println!(
            "hostile fuzz, {what}: seed {seed:#x}, {secs} s (MACVHOST_HOSTILE_SEED={seed:#x})"
        );
        let r = fuzz(
            target,
            FuzzConfig {
                seed,
                duration: Duration::from_secs(secs),
            },
        );
        println!("hostile fuzz, {what}: seed {seed:#x}: {r}");
        assert!(r.connections > 0, "seed {seed:#x}: no connection played");
        reports.push(r);
    }
    reports
}

/// Plays one connection; returns (messages sent, whether the target ended it, what the
/// frontend keeps open across the next probe).
fn connection(target: &Target<'_>, rng: &mut Rng) -> (u64, bool, Option<UnixStream>) {
    match rng.below(10) {
        0..=3 => {
            let (m, c) = raw_connection(&target.socket, rng);
            (m, c, None)
        }
        4..=8 => {
            let (m, c) = structured_connection(target, rng);
            (m, c, None)
        }
        _ => issue_15_connection(target, rng),
    }
}

/// Reads and drops replies until the socket closes; returns whether the target closed it.
fn drain(sock: UnixStream) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let _ = sock.set_read_timeout(None);
        let mut buf = [0u8; 4096];
        loop {
            match (&sock).read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    })
}

/// Ends a session: shuts our socket down (the drain thread sees it), joins the drain.
fn finish(s: Session, drainer: Option<std::thread::JoinHandle<bool>>) -> (u64, bool) {
    let stopped = s.stopped.is_some();
    // Did the target end the connection (refusing something) before we leave?
    let closed = match drainer {
        Some(d) => {
            let t = Instant::now();
            while !d.is_finished() && t.elapsed() < Duration::from_millis(20) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let ended = d.is_finished();
            let _ = s.sock.shutdown(std::net::Shutdown::Both);
            (d.join().unwrap_or(false) && ended) || stopped
        }
        None => stopped || s.closed_within(Duration::from_millis(20)),
    };
    (s.messages, closed)
}

fn random_fds(rng: &mut Rng, keep: &mut Vec<OwnedFd>, owned: &mut Vec<OwnedFd>) -> Vec<RawFd> {
    let n = match rng.below(10) {
        0..=4 => 0,
        5..=7 => 1,
        8 => 2 + rng.below(3) as usize,
        _ => 31 + rng.below(10) as usize,
    };
    let mut raw = Vec::with_capacity(n);
    for _ in 0..n {
        // Many fds: send the same one again and again (the receiver gets distinct fds).
        if raw.len() >= 3 {
            let again = raw[raw.len() - 1];
            raw.push(again);
            continue;
        }
        if let Ok(fd) = make_fd(rng.pick(&FdKind::ALL), keep) {
            raw.push(fd.as_raw_fd());
            owned.push(fd);
        }
    }
    raw
}

/// Any code, flags, size and payload, sometimes split, sometimes cut short.
fn raw_connection(sock: &Path, rng: &mut Rng) -> (u64, bool) {
    let Ok(mut s) = Session::connect(sock, SERVE_BOUND) else {
        return (0, false);
    };
    let drainer = s.sock.try_clone().ok().map(drain);
    let mut owned = Vec::new();
    let mut keep = Vec::new();
    for _ in 0..1 + rng.below(30) {
        let code = if rng.chance(9, 10) {
            rng.below(46) as u32
        } else {
            rng.u64() as u32
        };
        let any = rng.u64() as u32;
        let flags = rng.pick(&[VERSION, VERSION | NEED_REPLY, VERSION | REPLY, 0, 0x2, any]);
        let len = match rng.below(8) {
            0 => 0,
            1..=4 => rng.below(64) as usize,
            5 | 6 => rng.below(600) as usize,
            _ => 4096 + rng.below(8192) as usize,
        };
        let payload: Vec<u8> = (0..len).map(|_| rng.u64() as u8).collect();
        let size = if rng.chance(8, 10) {
            len as u32
        } else {
            rng.u64() as u32 >> rng.below(32)
        };
        let fds = random_fds(rng, &mut keep, &mut owned);
        let mut bytes = frame_sized(code, flags, size, &payload);
        if rng.chance(1, 20) {
            // Cut short: the connection ends inside the message.
            bytes.truncate(rng.below(bytes.len() as u64) as usize);
            s.send_raw(&bytes, &fds, 1);
            break;
        }
        let pieces = if rng.chance(1, 5) {
            2 + rng.below(4) as usize
        } else {
            1
        };
        s.send_raw(&bytes, &fds, pieces);
        owned.clear();
        if s.stopped.is_some() {
            break;
        }
    }
    finish(s, drainer)
}

/// A plausible frontend with a few steps made wrong.
fn structured_connection(target: &Target<'_>, rng: &mut Rng) -> (u64, bool) {
    let Ok(mut s) = Session::connect(&target.socket, SERVE_BOUND) else {
        return (0, false);
    };
    let bad = |rng: &mut Rng| rng.chance(1, 6);
    let nq = if bad(rng) { 2 + rng.below(6) as u32 } else { 4 };
    // Handshake (synchronous: replies read in line).
    let offered = s.get_u64(FrontendReq::GET_FEATURES).unwrap_or(0);
    let pf = if bad(rng) { rng.u64() } else { PF_ALL };
    s.send(FrontendReq::SET_PROTOCOL_FEATURES, &pf.to_ne_bytes(), &[]);
    // From here on replies are drained on another thread.
    let drainer = s.sock.try_clone().ok().map(drain);
    for _ in 0..rng.below(2 * u64::from(nq) + 2) {
        // QEMU's early SET_VRING_ENABLEs, sometimes out of range or not 0/1.
        let q = if rng.chance(1, 30) {
            rng.u64() as u32
        } else {
            rng.below(u64::from(nq)) as u32
        };
        let on = if rng.chance(1, 30) {
            rng.u64() as u32
        } else {
            rng.below(2) as u32
        };
        s.enable(q, on);
    }
    let features = if bad(rng) {
        rng.u64()
    } else {
        offered & !(1 << 29)
    };
    s.send(FrontendReq::SET_FEATURES, &features.to_ne_bytes(), &[]);
    let mut owned = Vec::new();
    let mut keep = Vec::new();
    // Memory.
    match rng.below(8) {
        0 => {
            // Overlapping, zero-sized or out-of-file regions.
            let fd = s.memfd.as_raw_fd();
            let regions = [
                (0, MEM_SIZE, 0),
                (MEM_SIZE / 2, MEM_SIZE, 0),
                (0, 0, 0),
                (0, MEM_SIZE * 4, 0),
                (0, MEM_SIZE, MEM_SIZE),
                (u64::MAX - 4096, 8192, 0),
            ];
            let n = 1 + rng.below(3) as usize;
            let picked: Vec<_> = (0..n).map(|_| rng.pick(&regions)).collect();
            let fds = vec![fd; if bad(rng) { n + 1 } else { n }];
            s.mem_table(&picked, &fds);
        }
        1 => {
            // Memory on an fd of the wrong kind.
            let kind = rng.pick(&[
                FdKind::FullPipe,
                FdKind::Socket,
                FdKind::RegularFile,
                FdKind::SmallMemfd,
                FdKind::DevNull,
            ]);
            if let Ok(fd) = make_fd(kind, &mut keep) {
                s.mem_table(&[(0, MEM_SIZE, 0)], &[fd.as_raw_fd()]);
                owned.push(fd);
            }
        }
        2 => {
            // Regions one by one, repeated, then many more than the backend has slots for.
            s.good_mem_table();
            let fd = s.memfd.as_raw_fd();
            for i in 0..rng.below(8) {
                let gpa = MEM_SIZE * (2 + i % 3);
                let r = VhostUserSingleMemoryRegion::new(gpa, 4096, VMM_BASE + gpa, 0);
                s.send(FrontendReq::ADD_MEM_REG, r.as_slice(), &[fd]);
                if rng.chance(1, 3) {
                    s.send(FrontendReq::REM_MEM_REG, r.as_slice(), &[]);
                }
            }
            if rng.chance(1, 4) {
                for i in 0..(512 + rng.below(64)) {
                    let gpa = MEM_SIZE * (8 + i);
                    let r = VhostUserSingleMemoryRegion::new(gpa, 4096, VMM_BASE + gpa, 0);
                    s.send(FrontendReq::ADD_MEM_REG, r.as_slice(), &[fd]);
                    if s.stopped.is_some() {
                        break;
                    }
                }
            }
        }
        _ => s.good_mem_table(),
    }
    // Rings, kick/call/err fds of any kind, enables.
    for q in 0..nq {
        let addrs = match rng.below(10) {
            0 => Some((rng.u64() & !0xf, rng.u64() & !1, rng.u64() & !3)),
            1 => Some((
                VMM_BASE + MEM_SIZE - 64,
                VMM_BASE + MEM_SIZE - 16,
                VMM_BASE + MEM_SIZE - 8,
            )),
            _ => None,
        };
        let num = if bad(rng) {
            rng.pick(&[0, 1, 3, 1024, 32768, u32::MAX])
        } else {
            u32::from(QSIZE)
        };
        s.vring(q, num, addrs);
        for code in [
            FrontendReq::SET_VRING_CALL,
            FrontendReq::SET_VRING_KICK,
            FrontendReq::SET_VRING_ERR,
        ] {
            if code == FrontendReq::SET_VRING_ERR && rng.chance(2, 3) {
                continue;
            }
            let kind = if bad(rng) {
                rng.pick(&FdKind::ALL)
            } else {
                FdKind::EventFd
            };
            let fd = if rng.chance(1, 20) {
                None
            } else {
                make_fd(kind, &mut keep).ok()
            };
            s.vring_fd(code, q, fd);
        }
        s.enable(q, if bad(rng) { rng.below(3) as u32 } else { 1 });
    }
    // Traffic: chains pointing anywhere, kicks.
    for _ in 0..rng.below(40) {
        let q = rng.below(u64::from(nq)) as usize;
        if q % 2 == 1 && !bad(rng) {
            s.post_tx(q, &[0xffu8; 60]);
        } else {
            let (near, any) = (rng.below(MEM_SIZE), rng.u64());
            let addr = rng.pick(&[BUFS, near, any, MEM_SIZE - 8]);
            let len = rng.pick(&[64, 1526, any as u32, 0]);
            s.post(q, addr, len, rng.below(8) as u16);
        }
        s.kick(q);
    }
    // Extras.
    if rng.chance(1, 4) {
        let kind = rng.pick(&[
            FdKind::Memfd,
            FdKind::SmallMemfd,
            FdKind::FullPipe,
            FdKind::Socket,
        ]);
        if let Ok(fd) = make_fd(kind, &mut keep) {
            let log = VhostUserLog::new(
                rng.pick(&[4096, MEM_SIZE / 4096 / 8, 0, u64::MAX]),
                rng.pick(&[0, 4096]),
            );
            s.send(FrontendReq::SET_LOG_BASE, log.as_slice(), &[fd.as_raw_fd()]);
            owned.push(fd);
            s.send(
                FrontendReq::SET_FEATURES,
                &(features | 1 << 26).to_ne_bytes(),
                &[],
            );
        }
    }
    if rng.chance(1, 4) {
        // A backend channel nobody reads, then link changes.
        if let Ok((ours, theirs)) = UnixStream::pair() {
            let _ = theirs.set_nonblocking(true);
            while (&theirs).write(&[0u8; 4096]).is_ok() {}
            let _ = theirs.set_nonblocking(false);
            s.send(FrontendReq::SET_BACKEND_REQ_FD, &[], &[theirs.as_raw_fd()]);
            keep.push(OwnedFd::from(ours));
            if let Some(set_link) = target.set_link {
                set_link(false);
                std::thread::sleep(Duration::from_millis(60));
                set_link(true);
                std::thread::sleep(Duration::from_millis(60));
            }
        }
    }
    if rng.chance(1, 4) {
        for _ in 0..rng.below(6) {
            let size = rng.below(40) as u32;
            let mut p = rng.below(300).to_ne_bytes()[..4].to_vec();
            p.extend_from_slice(&size.to_ne_bytes());
            p.extend_from_slice(&0u32.to_ne_bytes());
            p.resize(12 + size as usize, 0);
            let code = rng.pick(&[FrontendReq::GET_CONFIG, FrontendReq::SET_CONFIG]);
            s.send(code, &p, &[]);
        }
    }
    if rng.chance(1, 8) {
        // Pipeline requests and leave the replies unread (with no drain thread this time):
        // the target must not wait on us once we leave.
        let out = finish(s, drainer);
        let Ok(mut s) = Session::connect(&target.socket, Duration::from_millis(500)) else {
            return out;
        };
        for _ in 0..rng.below(3000) {
            s.send(FrontendReq::GET_FEATURES, &[], &[]);
            if s.stopped.is_some() {
                break;
            }
        }
        return (out.0 + s.messages, out.1);
    }
    if rng.chance(1, 10) {
        // Leave in the middle of a header.
        s.send_raw(
            &frame(FrontendReq::GET_FEATURES.into(), VERSION, &[])[..5],
            &[],
            1,
        );
    }
    let out = finish(s, drainer);
    drop((owned, keep));
    out
}

/// One of issue 15's sequences with random parameters.
fn issue_15_connection(target: &Target<'_>, rng: &mut Rng) -> (u64, bool, Option<UnixStream>) {
    match rng.below(4) {
        0 => (u64::from(seq_33_fds(&target.socket).is_ok()), true, None),
        1 => match seq_early_enable_flood(&target.socket, 1 + rng.below(50) as usize) {
            Ok((s, sent)) => {
                let closed = s.closed_within(Duration::from_millis(500));
                (sent as u64 + 1, closed, None)
            }
            Err(_) => (0, false, None),
        },
        2 => match seq_backend_channel_full(target) {
            // Half the time the channel stays full across the next probe.
            Ok(channel) => (5, false, rng.chance(1, 2).then_some(channel)),
            Err(_) => (0, false, None),
        },
        _ => {
            let kind = rng.pick(&[FdKind::FullPipe, FdKind::SaturatedEventFd]);
            match seq_call_fd_never_drains(&target.socket, kind, 1 + rng.below(5) as usize) {
                Ok(s) => {
                    let (m, c) = finish(s, None);
                    (m, c, None)
                }
                Err(_) => (0, false, None),
            }
        }
    }
}
