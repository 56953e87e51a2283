//! One vhost-user message on a unix socket: reading it (header, bounded payload, fds) and
//! writing it. The only code in macvhost that touches `SCM_RIGHTS`.
//!
//! Contract of [`read_message`]:
//! - Every fd the kernel installed for us is owned (`OwnedFd`) before anything can fail, so it
//!   is closed on every path: a rejected message, a truncated control buffer (`MSG_CTRUNC`: more
//!   than [`MAX_FDS`] fds, or our fd table full), an end of file in the middle of a message.
//! - fds may only come with the first bytes of a message (the header may arrive in several
//!   reads); fds arriving later are a frontend fault.
//! - A request is checked against the rules of its code ([`Rule`], taken from the `vhost`
//!   crate's message types and its handler's checks) before its payload is read: an unknown or
//!   unimplemented code, a version other than 1, reserved flag bits, a payload size or an fd
//!   count the request does not allow are frontend faults. At most [`MAX_PAYLOAD`] bytes are
//!   ever read for one message.
//!
//! The `vhost` crate's own header type (`VhostUserMsgHeader`) is private to that crate (0.18),
//! so [`Header`] is ours; the request codes ([`FrontendReq`]), flags ([`VhostUserHeaderFlag`])
//! and payload structs are the crate's.

use std::io::{self, IoSlice};
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserHeaderFlag, VhostUserLog, VhostUserMemory,
    VhostUserMemoryRegion, VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVringAddr,
    VhostUserVringState, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vm_memory::ByteValued;

/// Bytes of the header: request, flags, size (each a native-endian u32).
pub const HDR_LEN: usize = 12;
/// The largest payload any request may carry (the `vhost` crate's limit).
pub const MAX_PAYLOAD: usize = MAX_MSG_SIZE;
/// The most fds one message may carry (the `vhost` crate's limit; SET_MEM_TABLE's 32 regions).
pub const MAX_FDS: usize = MAX_ATTACHED_FD_ENTRIES;
/// The protocol version every message carries in its flags.
const VERSION: u32 = 0x1;

/// Control buffer for [`MAX_FDS`] fds: the kernel installs at most that many and sets
/// `MSG_CTRUNC` for the rest (which it closes itself).
// SAFETY: CMSG_SPACE is arithmetic on its argument; it reads no memory.
const CMSG_SPACE: usize = unsafe { libc::CMSG_SPACE(CMSG_FDS_LEN) } as usize;
/// The bytes of [`MAX_FDS`] fds (a few hundred at most: asserted below, so the cast keeps every
/// bit).
#[allow(clippy::cast_possible_truncation)]
const CMSG_FDS_LEN: u32 = (MAX_FDS * size_of::<RawFd>()) as u32;
const _: () = assert!(MAX_FDS * size_of::<RawFd>() <= 4096);

/// The header's `size` for a payload of `size` bytes. Payloads this process builds are at most
/// [`MAX_PAYLOAD`]; a longer one would saturate, which every receiver refuses as oversized,
/// rather than wrap to a size that frames the stream wrongly.
fn size_field(size: usize) -> u32 {
    u32::try_from(size).unwrap_or(u32::MAX)
}

/// A message header (see the module doc for why it is not the crate's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Version and flag bits ([`VhostUserHeaderFlag`]).
    pub flags: u32,
    /// Payload bytes that follow the header.
    pub size: u32,
}

impl Header {
    /// A request header with version 1 and `NEED_REPLY` when asked. `size` is the length of a
    /// payload this process built (at most [`MAX_PAYLOAD`]).
    pub fn request(code: FrontendReq, need_reply: bool, size: usize) -> Header {
        let reply = if need_reply {
            VhostUserHeaderFlag::NEED_REPLY.bits()
        } else {
            0
        };
        Header {
            request: code.into(),
            flags: VERSION | reply,
            size: size_field(size),
        }
    }

    /// A reply header for `code`, `size` as in [`Header::request`].
    pub fn reply(code: FrontendReq, size: usize) -> Header {
        Header {
            request: code.into(),
            flags: VERSION | VhostUserHeaderFlag::REPLY.bits(),
            size: size_field(size),
        }
    }

    /// The request code, if it is one the crate knows.
    pub fn code(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.request).ok()
    }

    /// Whether the sender asked for a reply (`NEED_REPLY`).
    pub fn need_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }

    /// Whether this is a reply (`REPLY`).
    pub fn is_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::REPLY.bits() != 0
    }

    fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..4].copy_from_slice(&self.request.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }

    fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }
}

/// One whole message with the fds that came with it (closed when it drops).
#[derive(Debug)]
pub struct Message {
    /// The header.
    pub hdr: Header,
    /// The payload (`hdr.size` bytes).
    pub payload: Vec<u8>,
    /// The fds that came with the first bytes.
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// A message with `body` as its payload and no fds.
    pub fn with_body<T: ByteValued>(hdr_for: impl FnOnce(usize) -> Header, body: &T) -> Message {
        let payload = body.as_slice().to_vec();
        Message {
            hdr: hdr_for(payload.len()),
            payload,
            fds: Vec::new(),
        }
    }

    /// The reply-ack a backend sends for `code`: a u64, 0 for success.
    pub fn ack(code: FrontendReq, value: u64) -> Message {
        Message::with_body(|n| Header::reply(code, n), &VhostUserU64::new(value))
    }

    /// The payload as `T`, when it is exactly `T`'s size.
    pub fn body<T: ByteValued + Default>(&self) -> Option<T> {
        let mut v = T::default();
        let dst = v.as_mut_slice();
        if dst.len() != self.payload.len() {
            return None;
        }
        dst.copy_from_slice(&self.payload);
        Some(v)
    }

    /// The code (a message that passed [`read_message`] always has one).
    pub fn code(&self) -> Option<FrontendReq> {
        self.hdr.code()
    }
}

/// Why a message was refused or could not be read. All but `Io` are the frontend's fault (or,
/// for replies, our own handler's, which never happens).
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The control buffer was truncated: more than [`MAX_FDS`] fds on one message (or our fd
    /// table is full). Every fd that was installed has been closed.
    #[error("frontend sent more than {MAX_FDS} file descriptors with one message (or macvhost's fd table is full); all were closed")]
    TooManyFds,
    /// fds arrived with a later part of a message.
    #[error("frontend sent file descriptors after the first bytes of a message")]
    LateFds,
    /// The peer closed the connection inside a message.
    #[error("frontend closed the connection in the middle of a message ({got} of {want} bytes)")]
    Truncated {
        /// Bytes read.
        got: usize,
        /// Bytes the header announced (or the header's own length).
        want: usize,
    },
    /// A code the crate does not know.
    #[error("frontend sent unknown request code {0}")]
    UnknownRequest(u32),
    /// A code macvhost does not implement.
    #[error("frontend sent {0:?}, which macvhost does not implement")]
    Unsupported(FrontendReq),
    /// Bad version or flag bits.
    #[error("frontend sent {request:?} with flags {flags:#x} (want version 1, no reserved bits, no REPLY)")]
    BadFlags {
        /// The request.
        request: FrontendReq,
        /// Its flags.
        flags: u32,
    },
    /// A payload size the request does not allow.
    #[error("frontend sent {request:?} with a {size}-byte payload (allowed: {allowed})")]
    BadSize {
        /// The request.
        request: FrontendReq,
        /// The size field.
        size: u32,
        /// What the request allows.
        allowed: SizeRule,
    },
    /// An fd count the request does not allow.
    #[error("frontend sent {request:?} with {got} file descriptors (allowed: {allowed})")]
    BadFdCount {
        /// The request.
        request: FrontendReq,
        /// fds received.
        got: usize,
        /// What the request allows.
        allowed: FdRule,
    },
    /// Our own handler sent something that is not a reply (never expected).
    #[error("the vhost-user handler sent a malformed reply ({0:?})")]
    BadReply(Header),
    /// The socket failed (the peer reset it, or the host).
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

/// Payload sizes a request allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeRule {
    /// Exactly this many bytes.
    Exact(usize),
    /// `base + k * step` bytes for `k` in `1..=max_k` (SET_MEM_TABLE's regions).
    Table {
        /// Bytes before the entries.
        base: usize,
        /// Bytes per entry.
        step: usize,
        /// Most entries.
        max_k: usize,
    },
    /// Anything from `min` to [`MAX_PAYLOAD`] bytes.
    AtLeast(usize),
}

impl SizeRule {
    fn allows(self, size: usize) -> bool {
        match self {
            SizeRule::Exact(n) => size == n,
            SizeRule::Table { base, step, max_k } => {
                size > base && (size - base) % step == 0 && (size - base) / step <= max_k
            }
            SizeRule::AtLeast(min) => (min..=MAX_PAYLOAD).contains(&size),
        }
    }
}

impl std::fmt::Display for SizeRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SizeRule::Exact(n) => write!(f, "exactly {n} bytes"),
            SizeRule::Table { base, step, max_k } => {
                write!(f, "{base} + {step} × 1..={max_k} bytes")
            }
            SizeRule::AtLeast(min) => write!(f, "{min}..={MAX_PAYLOAD} bytes"),
        }
    }
}

/// fd counts a request allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdRule {
    /// None.
    None,
    /// Exactly one.
    One,
    /// None or one.
    AtMostOne,
    /// One per SET_MEM_TABLE region (checked against the size).
    PerRegion,
}

impl std::fmt::Display for FdRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FdRule::None => "none",
            FdRule::One => "exactly one",
            FdRule::AtMostOne => "at most one",
            FdRule::PerRegion => "one per memory region",
        })
    }
}

/// What a request may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Payload sizes.
    pub size: SizeRule,
    /// fd counts.
    pub fds: FdRule,
}

/// The rule for `code`, or `None` for requests macvhost does not implement (the device uses
/// none of them; refusing them keeps the rest of the crate's handler out of a hostile
/// frontend's reach).
pub fn rule(code: FrontendReq) -> Option<Rule> {
    use FrontendReq as R;
    let exact = |n: usize, fds: FdRule| {
        Some(Rule {
            size: SizeRule::Exact(n),
            fds,
        })
    };
    let u64_ = size_of::<VhostUserU64>();
    let state = size_of::<VhostUserVringState>();
    match code {
        R::GET_FEATURES
        | R::SET_OWNER
        | R::RESET_OWNER
        | R::GET_PROTOCOL_FEATURES
        | R::GET_QUEUE_NUM
        | R::RESET_DEVICE
        | R::GET_MAX_MEM_SLOTS => exact(0, FdRule::None),
        R::SET_FEATURES | R::SET_PROTOCOL_FEATURES => exact(u64_, FdRule::None),
        R::SET_VRING_NUM | R::SET_VRING_BASE | R::GET_VRING_BASE | R::SET_VRING_ENABLE => {
            exact(state, FdRule::None)
        }
        R::SET_VRING_ADDR => exact(size_of::<VhostUserVringAddr>(), FdRule::None),
        // Bit 8 of the payload says "no fd" (the crate checks that it agrees with the fds).
        R::SET_VRING_KICK | R::SET_VRING_CALL | R::SET_VRING_ERR => exact(u64_, FdRule::AtMostOne),
        R::SET_LOG_BASE => exact(size_of::<VhostUserLog>(), FdRule::One),
        R::ADD_MEM_REG => exact(size_of::<VhostUserSingleMemoryRegion>(), FdRule::One),
        // The spec lets a frontend attach an fd here, which the backend must close unused.
        R::REM_MEM_REG => exact(size_of::<VhostUserSingleMemoryRegion>(), FdRule::AtMostOne),
        R::SET_MEM_TABLE => Some(Rule {
            size: SizeRule::Table {
                base: size_of::<VhostUserMemory>(),
                step: size_of::<VhostUserMemoryRegion>(),
                max_k: MAX_FDS,
            },
            fds: FdRule::PerRegion,
        }),
        // The crate takes any size here; QEMU sends none.
        R::SET_BACKEND_REQ_FD => Some(Rule {
            size: SizeRule::AtLeast(0),
            fds: FdRule::One,
        }),
        R::GET_CONFIG | R::SET_CONFIG => Some(Rule {
            size: SizeRule::AtLeast(size_of::<VhostUserConfig>()),
            fds: FdRule::None,
        }),
        _ => None,
    }
}

/// Which side a message is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The frontend (hostile): requests, checked against [`rule`].
    Frontend,
    /// Our own vhost-user handler: replies (bounded, no fds).
    Handler,
}

/// Reads one message from `sock`. `Ok(None)` on a clean end of file between messages.
pub fn read_message(sock: &UnixStream, from: Side) -> Result<Option<Message>, WireError> {
    let mut hdr = [0u8; HDR_LEN];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < HDR_LEN {
        let mut more = Vec::new();
        let (n, truncated) = recv_with_fds(sock.as_fd(), &mut hdr[got..], &mut more)?;
        if truncated {
            return Err(WireError::TooManyFds);
        }
        if !more.is_empty() && got > 0 {
            return Err(WireError::LateFds);
        }
        fds.extend(more);
        if n == 0 {
            return if got == 0 && fds.is_empty() {
                Ok(None)
            } else {
                Err(WireError::Truncated { got, want: HDR_LEN })
            };
        }
        got += n;
    }
    let hdr = Header::from_bytes(&hdr);
    check(&hdr, fds.len(), from)?;
    let size = hdr.size as usize;
    let mut payload = vec![0u8; size];
    let mut got = 0;
    while got < size {
        let mut more = Vec::new();
        let (n, truncated) = recv_with_fds(sock.as_fd(), &mut payload[got..], &mut more)?;
        if truncated || !more.is_empty() {
            return Err(WireError::LateFds);
        }
        if n == 0 {
            return Err(WireError::Truncated {
                got: HDR_LEN + got,
                want: HDR_LEN + size,
            });
        }
        got += n;
    }
    Ok(Some(Message { hdr, payload, fds }))
}

/// Checks a header (and the fd count that came with it) before its payload is read.
fn check(hdr: &Header, nfds: usize, from: Side) -> Result<(), WireError> {
    let Some(request) = hdr.code() else {
        return match from {
            Side::Frontend => Err(WireError::UnknownRequest(hdr.request)),
            Side::Handler => Err(WireError::BadReply(*hdr)),
        };
    };
    let reserved = VhostUserHeaderFlag::RESERVED_BITS.bits();
    if hdr.flags & VhostUserHeaderFlag::VERSION.bits() != VERSION || hdr.flags & reserved != 0 {
        return match from {
            Side::Frontend => Err(WireError::BadFlags {
                request,
                flags: hdr.flags,
            }),
            Side::Handler => Err(WireError::BadReply(*hdr)),
        };
    }
    if from == Side::Handler {
        return if hdr.is_reply() && hdr.size as usize <= MAX_PAYLOAD && nfds == 0 {
            Ok(())
        } else {
            Err(WireError::BadReply(*hdr))
        };
    }
    if hdr.is_reply() {
        return Err(WireError::BadFlags {
            request,
            flags: hdr.flags,
        });
    }
    let Some(rule) = rule(request) else {
        return Err(WireError::Unsupported(request));
    };
    let size = hdr.size as usize;
    if !rule.size.allows(size) {
        return Err(WireError::BadSize {
            request,
            size: hdr.size,
            allowed: rule.size,
        });
    }
    let fds_ok = match rule.fds {
        FdRule::None => nfds == 0,
        FdRule::One => nfds == 1,
        FdRule::AtMostOne => nfds <= 1,
        FdRule::PerRegion => match rule.size {
            SizeRule::Table { base, step, .. } => nfds == (size - base) / step,
            _ => false,
        },
    };
    if !fds_ok {
        return Err(WireError::BadFdCount {
            request,
            got: nfds,
            allowed: rule.fds,
        });
    }
    Ok(())
}

/// Writes `m` (header, payload, fds) to `sock`; the fds go with the first bytes.
pub fn write_message(sock: &UnixStream, m: &Message) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(HDR_LEN + m.payload.len());
    bytes.extend_from_slice(&m.hdr.to_bytes());
    bytes.extend_from_slice(&m.payload);
    let raw: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < bytes.len() {
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !raw.is_empty() {
            &rights
        } else {
            &[]
        };
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&bytes[sent..])],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// 8-byte aligned room for [`CMSG_SPACE`] bytes (`cmsghdr` wants `size_t` alignment).
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_SPACE]);

/// One `recvmsg`: fills `buf` as far as the stream allows, and pushes every fd that came with
/// those bytes to `fds`, owned before anything else can go wrong. Returns the byte count and
/// whether the control data was truncated (`MSG_CTRUNC`).
fn recv_with_fds(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<(usize, bool)> {
    let mut cmsg = CmsgBuf([0u8; CMSG_SPACE]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid "no name, no iovec, no control" value.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cmsg.0.as_mut_ptr().cast();
    mh.msg_controllen = CMSG_SPACE;
    let n = loop {
        // SAFETY: `mh` points at `iov` (over `buf`, writable for its length) and at `cmsg`
        // (writable for `msg_controllen` bytes); both outlive the call.
        let r = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        // Negative (-1) is the one failure, and errno names it.
        if let Ok(n) = usize::try_from(r) {
            break n;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: the kernel filled `cmsg` and set `msg_controllen` to what it wrote; the CMSG_*
    // macros stay inside that length (CMSG_NXTHDR returns null past it). Each SCM_RIGHTS
    // record holds `(cmsg_len - CMSG_LEN(0)) / sizeof(int)` fds that the kernel installed in
    // our table for us alone, so wrapping each in an `OwnedFd` (once) is sound.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            let hdr = std::ptr::read_unaligned(c);
            let data_len = (hdr.cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..data_len / size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    Ok((n, mh.msg_flags & libc::MSG_CTRUNC != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
    }

    fn bytes(code: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Header {
            request: code,
            flags,
            size: payload.len() as u32,
        }
        .to_bytes()
        .to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn send(sock: &UnixStream, data: &[u8], fds: &[RawFd]) {
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(data)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    #[test]
    fn message_with_33_fds_is_refused_and_every_fd_closed() {
        // In-process, other tests open fds concurrently: repeat and look at the minimum.
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let raw = vec![f.as_raw_fd(); MAX_FDS + 1];
        let before = open_fds();
        for _ in 0..20 {
            send(&a, &bytes(1, VERSION, &[]), &raw);
            let e = read_message(&b, Side::Frontend).unwrap_err();
            assert!(matches!(e, WireError::TooManyFds), "{e}");
        }
        // 20 × 32 leaked fds would show whatever else runs beside us.
        assert!(
            open_fds() < before + 32,
            "fds leaked: {before} → {}",
            open_fds()
        );
    }

    /// A connected pair, an fd to pass and the bytes of a `SET_VRING_CALL` that carries it.
    fn vring_call_to_send() -> (UnixStream, UnixStream, std::fs::File, Vec<u8>) {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let m = bytes(
            FrontendReq::SET_VRING_CALL.into(),
            VERSION,
            &0u64.to_ne_bytes(),
        );
        (a, b, f, m)
    }

    #[test]
    fn header_split_over_three_reads_is_one_message_with_its_fds() {
        let (a, b, f, m) = vring_call_to_send();
        send(&a, &m[..3], &[f.as_raw_fd()]);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            (&a).write_all(&m[3..9]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            (&a).write_all(&m[9..]).unwrap();
            a
        });
        let got = read_message(&b, Side::Frontend).unwrap().unwrap();
        assert_eq!(got.code(), Some(FrontendReq::SET_VRING_CALL));
        assert_eq!(got.fds.len(), 1);
        assert_eq!(got.payload, 0u64.to_ne_bytes());
        drop(writer.join().unwrap());
    }

    #[test]
    fn fds_after_the_first_bytes_of_a_message_are_refused() {
        let (a, b, f, m) = vring_call_to_send();
        (&a).write_all(&m[..4]).unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            send(&a, &m[4..], &[f.as_raw_fd()]);
            a
        });
        let e = read_message(&b, Side::Frontend).unwrap_err();
        assert!(matches!(e, WireError::LateFds), "{e}");
        drop(writer.join().unwrap());
    }

    #[test]
    fn end_of_file_mid_header_or_mid_payload_is_a_truncated_message() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&bytes(1, VERSION, &[])[..5]).unwrap();
        drop(a);
        let e = read_message(&b, Side::Frontend).unwrap_err();
        assert!(
            matches!(e, WireError::Truncated { got: 5, want: 12 }),
            "{e}"
        );

        let (a, b) = UnixStream::pair().unwrap();
        let m = bytes(FrontendReq::SET_FEATURES.into(), VERSION, &[0u8; 8]);
        (&a).write_all(&m[..15]).unwrap();
        drop(a);
        let e = read_message(&b, Side::Frontend).unwrap_err();
        assert!(
            matches!(e, WireError::Truncated { got: 15, want: 20 }),
            "{e}"
        );
    }

    #[test]
    fn clean_end_of_file_between_messages_is_none() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(read_message(&b, Side::Frontend).unwrap().is_none());
    }

    #[test]
    fn payload_sizes_and_fd_counts_follow_the_request() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let cases: Vec<(Vec<u8>, Vec<RawFd>, &str)> = vec![
            // An early SET_VRING_ENABLE with 64 KiB (issue 15): refused from its header.
            (
                Header {
                    request: FrontendReq::SET_VRING_ENABLE.into(),
                    flags: VERSION,
                    size: 65536,
                }
                .to_bytes()
                .to_vec(),
                vec![],
                "65536-byte payload",
            ),
            (
                bytes(FrontendReq::GET_FEATURES.into(), VERSION, &[0u8; 8]),
                vec![],
                "8-byte payload",
            ),
            (
                bytes(FrontendReq::GET_FEATURES.into(), VERSION, &[]),
                vec![f.as_raw_fd()],
                "1 file descriptors",
            ),
            (
                bytes(FrontendReq::SET_LOG_BASE.into(), VERSION, &[0u8; 16]),
                vec![],
                "0 file descriptors",
            ),
            (
                bytes(FrontendReq::SET_MEM_TABLE.into(), VERSION, &[0u8; 8 + 64]),
                vec![f.as_raw_fd()],
                "1 file descriptors",
            ),
            (bytes(99, VERSION, &[]), vec![], "unknown request code 99"),
            (
                bytes(FrontendReq::SET_INFLIGHT_FD.into(), VERSION, &[0u8; 24]),
                vec![],
                "does not implement",
            ),
            (
                bytes(FrontendReq::GET_FEATURES.into(), 0x2, &[]),
                vec![],
                "flags 0x2",
            ),
            (
                bytes(FrontendReq::GET_FEATURES.into(), VERSION | 0x100, &[]),
                vec![],
                "flags 0x101",
            ),
            (
                bytes(FrontendReq::GET_FEATURES.into(), VERSION | 0x4, &[]),
                vec![],
                "flags 0x5",
            ),
        ];
        for (m, fds, want) in cases {
            // A refused message leaves its payload unread: one connection per case.
            let (a, b) = UnixStream::pair().unwrap();
            send(&a, &m, &fds);
            let e = read_message(&b, Side::Frontend).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (want {want})");
        }
    }

    #[test]
    fn set_mem_table_with_one_fd_per_region_is_read_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let mut p = VhostUserMemory::new(2).as_slice().to_vec();
        p.extend_from_slice(VhostUserMemoryRegion::new(0, 4096, 0, 0).as_slice());
        p.extend_from_slice(VhostUserMemoryRegion::new(4096, 4096, 0, 0).as_slice());
        send(
            &a,
            &bytes(FrontendReq::SET_MEM_TABLE.into(), VERSION, &p),
            &[f.as_raw_fd(), f.as_raw_fd()],
        );
        let m = read_message(&b, Side::Frontend).unwrap().unwrap();
        assert_eq!(m.fds.len(), 2);
        assert_eq!(m.payload, p);
    }

    #[test]
    fn written_messages_read_back_with_their_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let m = Message {
            hdr: Header::request(FrontendReq::SET_VRING_KICK, true, 8),
            payload: 1u64.to_ne_bytes().to_vec(),
            fds: vec![OwnedFd::from(f)],
        };
        write_message(&a, &m).unwrap();
        let got = read_message(&b, Side::Frontend).unwrap().unwrap();
        assert_eq!(got.hdr, m.hdr);
        assert_eq!(got.payload, m.payload);
        assert_eq!(got.fds.len(), 1);
        assert_eq!(got.body::<VhostUserU64>().map(|v| v.value), Some(1));
    }

    #[test]
    fn replies_from_the_handler_must_be_replies_without_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        write_message(&a, &Message::ack(FrontendReq::SET_FEATURES, 0)).unwrap();
        let r = read_message(&b, Side::Handler).unwrap().unwrap();
        assert!(r.hdr.is_reply());
        (&a).write_all(&bytes(FrontendReq::GET_FEATURES.into(), VERSION, &[]))
            .unwrap();
        assert!(matches!(
            read_message(&b, Side::Handler),
            Err(WireError::BadReply(_))
        ));
    }
}
