//! The vhost-user shim: the first code to read a frontend's bytes. It sits between the frontend
//! and vhost-user-backend's request handler (a private socket, see `connection`), reads each
//! message once, checks it, and forwards it, answers it itself, or ends the connection.
//!
//! # Contract
//!
//! - Bounded: one message in memory at a time (at most [`wire::MAX_PAYLOAD`] bytes and
//!   [`wire::MAX_FDS`] fds), plus the QEMU workarounds' state (one bit per vring, one entry per
//!   memory slot). Every fd that arrives is closed unless the handler takes it.
//! - Only requests the device implements reach the handler, each with the payload size and
//!   fd count its request allows ([`wire::rule`]); vring fds must be eventfds, pipes or sockets
//!   and memory fds must not live on a filesystem the frontend could serve (FUSE, network).
//!   Anything else is the frontend's fault: the connection ends with one log line.
//! - One thread, `vu-shim`: it waits on both sockets and never on anything else. Closing
//!   either socket (the frontend leaving, the connection's teardown shutting them down) ends it.
//! - Replies reach the frontend in request order: before the shim answers a request itself it
//!   sends the handler a GET_PROTOCOL_FEATURES barrier (which changes no state) and forwards
//!   every reply up to the barrier's.
//!
//! # Jobs
//!
//! - [`wire`]: reading and writing one message; the only `SCM_RIGHTS` code.
//! - [`fit`]: a frontend that wants more queue pairs than `--queues` or larger rings than
//!   `--queue-size` ends with an error naming the flag and the value to use.
//! - [`quirks`]: QEMU's early SET_VRING_ENABLE and repeated ADD/REM_MEM_REG.
//! - [`log_base`]: SET_LOG_BASE into the connection's dirty log.
//! - [`notifier`]: CONFIG_CHANGE_MSG on the backend request channel ([`ConfigNotifier`]).
//!
//! The shim's view of the negotiation follows the requests: vhost 0.18's handler ends the
//! connection on any request its backend refuses, so a request the shim forwarded is either
//! applied or the connection is ending.

pub mod fit;
pub mod log_base;
pub mod notifier;
pub mod quirks;
pub mod wire;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::SFlag;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserMemory, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVirtioFeatures, VhostUserVringState,
};
use vm_memory::ByteValued;

use crate::datapath::DirtyLogState;
use fit::{Fit, FitError, Verdict};
pub use notifier::ConfigNotifier;
use quirks::{EarlyEnables, Region, RegionVerdict, Regions};
use wire::{read_message, write_message, Header, Message, Side, WireError};

/// Memory slots vhost-user-backend 0.24 reports in GET_MAX_MEM_SLOTS (its `MAX_MEM_SLOTS`).
pub const MEM_SLOTS: usize = 509;

/// Why the relay ended other than by a clean close.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// A malformed or refused message (frontend).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A QEMU-workaround bound exceeded (frontend).
    #[error(transparent)]
    Quirk(#[from] quirks::QuirkError),
    /// An unusable SET_LOG_BASE (frontend).
    #[error(transparent)]
    LogBase(#[from] log_base::LogBaseError),
    /// SET_LOG_BASE without `VHOST_USER_PROTOCOL_F_LOG_SHMFD` (frontend).
    #[error("frontend sent SET_LOG_BASE without negotiating LOG_SHMFD")]
    LogShmfd,
    /// A vring fd of the wrong kind (frontend).
    #[error("frontend sent {request:?} with {kind} (want an eventfd, a pipe or a socket)")]
    VringFdKind {
        /// The request.
        request: FrontendReq,
        /// What the fd is.
        kind: &'static str,
    },
    /// A memory or log fd on a filesystem whose page faults the frontend could hold (frontend).
    #[error("frontend sent {request:?} with memory on a {fs} filesystem; macvhost maps only local memory")]
    RemoteMemory {
        /// The request.
        request: FrontendReq,
        /// The filesystem.
        fs: &'static str,
    },
    /// The frontend wants more queue pairs or larger rings than macvhost was started with
    /// (operator).
    #[error(transparent)]
    Fit(#[from] FitError),
    /// The frontend's socket failed (the frontend reset it).
    #[error("frontend socket: {0}")]
    Frontend(io::Error),
    /// The private socket to the handler failed or closed mid-exchange (host, or teardown).
    #[error("vhost-user handler socket: {0}")]
    Handler(io::Error),
}

impl ShimError {
    /// The misfit, when the frontend wants another device than the one configured: the
    /// operator's to fix (`--queues`, `--queue-size`), and the same on every reconnect.
    pub fn misfit(&self) -> Option<&FitError> {
        match self {
            ShimError::Fit(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the frontend is at fault (worth a warning; the rest is a disconnect).
    pub fn frontend_fault(&self) -> bool {
        !matches!(
            self,
            ShimError::Wire(WireError::Io(_) | WireError::BadReply(_))
                | ShimError::Frontend(_)
                | ShimError::Handler(_)
        )
    }
}

/// What the relay needs besides its two sockets.
#[derive(Debug, Clone)]
pub struct RelayContext {
    /// The connection's dirty-page log, for SET_LOG_BASE.
    pub dirty_log: Arc<DirtyLogState>,
    /// Learns the backend channel and protocol features.
    pub notifier: Arc<ConfigNotifier>,
    /// Vrings of the device (2 × queue pairs).
    pub vrings: usize,
    /// Largest ring size (`--queue-size`).
    pub queue_size: u16,
}

/// Relays between `frontend` and `handler` until either closes (see the module doc). Shuts
/// both sockets down before it returns.
pub fn relay(
    frontend: UnixStream,
    handler: UnixStream,
    ctx: RelayContext,
) -> Result<(), ShimError> {
    let mut r = Relay {
        frontend,
        handler,
        early: EarlyEnables::new(ctx.vrings),
        fit: Fit::new(ctx.vrings, ctx.queue_size),
        regions: Regions::new(MEM_SLOTS),
        ctx,
        features_set: false,
        features_seen: false,
        protocol: 0,
        outstanding_gpf: 0,
    };
    let result = r.run();
    let _ = r.frontend.shutdown(std::net::Shutdown::Both);
    let _ = r.handler.shutdown(std::net::Shutdown::Both);
    result
}

struct Relay {
    frontend: UnixStream,
    handler: UnixStream,
    ctx: RelayContext,
    early: EarlyEnables,
    fit: Fit,
    regions: Regions,
    /// SET_FEATURES went through (early SET_VRING_ENABLEs are over).
    features_set: bool,
    /// GET_FEATURES went through (half of the handler's reply-ack rule).
    features_seen: bool,
    /// The protocol features the frontend acked.
    protocol: u64,
    /// The frontend's GET_PROTOCOL_FEATURES not answered yet (the barrier's reply comes after
    /// them).
    outstanding_gpf: usize,
}

impl Relay {
    fn run(&mut self) -> Result<(), ShimError> {
        loop {
            let (front, handler) = self.wait()?;
            if handler {
                match read_message(&self.handler, Side::Handler).map_err(handler_err)? {
                    Some(reply) => self.forward_reply(reply)?,
                    None => return Ok(()),
                }
                // Replies first: look again before reading the next request.
                continue;
            }
            if front {
                match read_message(&self.frontend, Side::Frontend).map_err(frontend_err)? {
                    Some(m) => self.request(m)?,
                    None => return self.fit.at_close().map_or(Ok(()), |e| Err(e.into())),
                }
            }
        }
    }

    /// Waits until either socket is readable (or closed).
    fn wait(&self) -> Result<(bool, bool), ShimError> {
        loop {
            let mut fds = [
                PollFd::new(self.frontend.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.handler.as_fd(), PollFlags::POLLIN),
            ];
            // While draining, a quiet frontend has set up every pair it wants: QEMU reconnecting
            // to a running guest waits there for the guest's driver, which may be never.
            let timeout = if self.fit.draining() {
                PollTimeout::from(fit::DRAIN_QUIET_MS)
            } else {
                PollTimeout::NONE
            };
            match poll(&mut fds, timeout) {
                Ok(0) if self.fit.draining() => {
                    return Err(self.fit.at_close().map_or(
                        ShimError::Handler(io::ErrorKind::TimedOut.into()),
                        ShimError::Fit,
                    ))
                }
                Ok(_) => {
                    let ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
                    return Ok((ready(&fds[0]), ready(&fds[1])));
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(ShimError::Handler(e.into())),
            }
        }
    }

    fn to_frontend(&self, m: &Message) -> Result<(), ShimError> {
        write_message(&self.frontend, m).map_err(ShimError::Frontend)
    }

    fn to_handler(&self, m: &Message) -> Result<(), ShimError> {
        write_message(&self.handler, m).map_err(ShimError::Handler)
    }

    fn forward_reply(&mut self, reply: Message) -> Result<(), ShimError> {
        if reply.code() == Some(FrontendReq::GET_PROTOCOL_FEATURES) {
            self.outstanding_gpf = self.outstanding_gpf.saturating_sub(1);
        }
        self.to_frontend(&reply)
    }

    /// Forwards every reply the handler owes for earlier requests (see the module doc).
    fn barrier(&mut self) -> Result<(), ShimError> {
        let probe = Message {
            hdr: Header::request(FrontendReq::GET_PROTOCOL_FEATURES, false, 0),
            payload: Vec::new(),
            fds: Vec::new(),
        };
        self.to_handler(&probe)?;
        loop {
            let reply = read_message(&self.handler, Side::Handler)
                .map_err(handler_err)?
                .ok_or_else(|| {
                    ShimError::Handler(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed before answering the barrier",
                    ))
                })?;
            if reply.code() == Some(FrontendReq::GET_PROTOCOL_FEATURES) {
                if self.outstanding_gpf == 0 {
                    return Ok(());
                }
                self.outstanding_gpf -= 1;
            }
            self.to_frontend(&reply)?;
        }
    }

    /// Whether the handler acks requests that ask for it (its `reply_ack_enabled`).
    fn reply_ack(&self) -> bool {
        self.features_seen && self.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// Answers `m` here, after the replies owed for earlier requests.
    fn answer(&mut self, m: &Message) -> Result<(), ShimError> {
        self.barrier()?;
        if m.hdr.need_reply() && self.reply_ack() {
            if let Some(code) = m.code() {
                self.to_frontend(&Message::ack(code, 0))?;
            }
        }
        Ok(())
    }

    fn request(&mut self, m: Message) -> Result<(), ShimError> {
        // `read_message` only returns requests with a known, implemented code.
        let Some(code) = m.code() else {
            return Err(WireError::UnknownRequest(m.hdr.request).into());
        };
        tracing::trace!(
            ?code,
            flags = m.hdr.flags,
            size = m.hdr.size,
            fds = m.fds.len(),
            "frontend message"
        );
        check_fds(code, &m.fds)?;
        match self.fit.check(&m) {
            Verdict::Pass => {}
            // A vring beyond the device while the shim learns how many the frontend wants.
            Verdict::Drop => return Ok(()),
            Verdict::Misfit(e) => return Err(e.into()),
        }
        self.ctx.notifier.observe(&m);
        match code {
            FrontendReq::GET_FEATURES => {
                self.features_seen = true;
                self.to_handler(&m)
            }
            FrontendReq::GET_PROTOCOL_FEATURES => {
                self.outstanding_gpf += 1;
                self.to_handler(&m)
            }
            FrontendReq::SET_PROTOCOL_FEATURES => {
                self.protocol = m.body::<VhostUserU64>().map_or(0, |v| v.value);
                self.to_handler(&m)
            }
            FrontendReq::RESET_OWNER => {
                // The handler forgets the acked features: SET_VRING_ENABLE is early again.
                self.features_set = false;
                self.to_handler(&m)
            }
            FrontendReq::SET_FEATURES => {
                let acked = m.body::<VhostUserU64>().map_or(0, |v| v.value);
                self.to_handler(&m)?;
                self.features_set = true;
                let protocol = acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
                for index in self.early.take(protocol) {
                    // Without NEED_REPLY: the frontend already got its answer.
                    let replay = Message::with_body(
                        |n| Header::request(FrontendReq::SET_VRING_ENABLE, false, n),
                        &VhostUserVringState::new(index, 1),
                    );
                    self.to_handler(&replay)?;
                }
                Ok(())
            }
            FrontendReq::SET_VRING_ENABLE if !self.features_set => {
                let s: VhostUserVringState = m.body().unwrap_or_default();
                self.early.note(s.index, s.num)?;
                tracing::debug!(
                    index = { s.index },
                    num = { s.num },
                    "SET_VRING_ENABLE before SET_FEATURES held by the shim"
                );
                self.answer(&m)
            }
            FrontendReq::SET_MEM_TABLE => {
                self.regions.replace(table_regions(&m.payload));
                self.to_handler(&m)
            }
            FrontendReq::ADD_MEM_REG => {
                let r: VhostUserSingleMemoryRegion = m.body().unwrap_or_default();
                match self.regions.add(Region::from(&r))? {
                    RegionVerdict::Forward => self.to_handler(&m),
                    RegionVerdict::Repeat => self.answer(&m),
                }
            }
            FrontendReq::REM_MEM_REG => {
                let r: VhostUserSingleMemoryRegion = m.body().unwrap_or_default();
                match self.regions.remove(Region::from(&r)) {
                    RegionVerdict::Forward => self.to_handler(&m),
                    RegionVerdict::Repeat => self.answer(&m),
                }
            }
            FrontendReq::SET_LOG_BASE => {
                if self.protocol & VhostUserProtocolFeatures::LOG_SHMFD.bits() == 0 {
                    return Err(ShimError::LogShmfd);
                }
                self.barrier()?;
                let reply = log_base::set_log_base(&m, &self.ctx.dirty_log)?;
                self.to_frontend(&reply)
            }
            _ => self.to_handler(&m),
        }
    }
}

fn handler_err(e: WireError) -> ShimError {
    match e {
        WireError::Io(e) => ShimError::Handler(e),
        other => ShimError::Handler(io::Error::other(other.to_string())),
    }
}

fn frontend_err(e: WireError) -> ShimError {
    match e {
        WireError::Io(e) => ShimError::Frontend(e),
        other => ShimError::Wire(other),
    }
}

/// The regions of a SET_MEM_TABLE payload (its size was checked against its fds).
fn table_regions(payload: &[u8]) -> impl Iterator<Item = Region> + '_ {
    let head = std::mem::size_of::<VhostUserMemory>();
    let step = std::mem::size_of::<VhostUserMemoryRegion>();
    payload
        .get(head..)
        .unwrap_or_default()
        .chunks_exact(step)
        .map(|c| {
            let mut r = VhostUserMemoryRegion::default();
            r.as_mut_slice().copy_from_slice(c);
            Region::from(&r)
        })
}

/// What an fd is, for the checks below.
fn fd_kind(fd: &OwnedFd) -> &'static str {
    match nix::sys::stat::fstat(fd) {
        Ok(st) => match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFIFO => "a pipe",
            SFlag::S_IFSOCK => "a socket",
            SFlag::S_IFREG => "a regular file",
            SFlag::S_IFDIR => "a directory",
            SFlag::S_IFCHR => "a character device",
            SFlag::S_IFBLK => "a block device",
            SFlag::S_IFLNK => "a symbolic link",
            // eventfd, timerfd, signalfd...: kernel objects with no file type.
            _ => "an anonymous inode",
        },
        Err(_) => "an fd that cannot be inspected",
    }
}

/// Filesystems whose page faults wait on another process (which could be the frontend) and
/// cannot be interrupted: a worker touching such memory could hang for good.
fn remote_fs(fd: &OwnedFd) -> Option<&'static str> {
    // `f_type` is a C long; every magic fits in 32 bits.
    let f_type = nix::sys::statfs::fstatfs(fd).ok()?.filesystem_type().0;
    let magic = u64::try_from(f_type & 0xffff_ffff).ok()?;
    match magic {
        0x6573_5546 => Some("FUSE"),
        0x6969 => Some("NFS"),
        0x517b | 0xff53_4d42 | 0xfe53_4d42 => Some("SMB/CIFS"),
        0x0102_1997 => Some("9P"),
        0x00c3_6400 => Some("Ceph"),
        0x5346_414f | 0x6b41_4653 => Some("AFS"),
        _ => None,
    }
}

/// Checks the kind of the fds a request carries (sizes and counts were checked by `wire`).
fn check_fds(request: FrontendReq, fds: &[OwnedFd]) -> Result<(), ShimError> {
    match request {
        FrontendReq::SET_VRING_KICK | FrontendReq::SET_VRING_CALL | FrontendReq::SET_VRING_ERR => {
            for fd in fds {
                let kind = fd_kind(fd);
                // Reads and writes on these never wait on the disk or on a page fault, and a
                // blocked one can be interrupted (see `vring`).
                if !matches!(kind, "a pipe" | "a socket" | "an anonymous inode") {
                    return Err(ShimError::VringFdKind { request, kind });
                }
            }
        }
        FrontendReq::SET_MEM_TABLE | FrontendReq::ADD_MEM_REG | FrontendReq::SET_LOG_BASE => {
            if let Some(fs) = fds.iter().find_map(remote_fs) {
                return Err(ShimError::RemoteMemory { request, fs });
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests;
