//! A vhost-user message shim between the frontend and vhost-user-backend's request handler.
//!
//! Why: QEMU treats VHOST_USER_F_PROTOCOL_FEATURES as negotiated as soon as the backend offers
//! it, and with `queues>1` it sends SET_VRING_ENABLE for the extra pairs while realizing the
//! device — before any SET_FEATURES. The `vhost` crate (0.18) and vhost-user-backend (0.24)
//! check the *acked* features and drop the connection, which leaves QEMU unable to use
//! multiqueue (and crashes QEMU 7.2 on its reconnect path). The shim answers such an early
//! SET_VRING_ENABLE itself: rings start disabled when protocol features are in use, so an early
//! "disable" is exactly a no-op, and an early "enable" is replayed right after SET_FEATURES.
//!
//! Likewise QEMU 7.2 sends the same ADD_MEM_REG (and REM_MEM_REG) once per queue pair's vhost
//! device on the one connection; vhost-user-backend rejects the repeat as an overlapping region
//! and drops the connection. The shim keeps the connection's region table and answers an exact
//! repeat (an add of a region already present, a removal of one already gone) itself.
//!
//! SET_LOG_BASE (live migration) is taken here and given to the connection's
//! [`DirtyLogState`]: vhost-user-backend's own handling needs bitmap-typed guest memory and
//! cannot see our iovec writes (see `crate::datapath::dirty`). The reply echoes the request's payload,
//! as the `vhost` crate's backend does; QEMU only checks the request code.
//! The shim also keeps a copy of the backend request channel (SET_BACKEND_REQ_FD) and the
//! negotiated protocol features, so that [`ConfigNotifier`] can send CONFIG_CHANGE_MSG when the
//! host link changes: the `vhost` crate's `Backend` has no way to send that message.
//! Everything else, fds included, is forwarded unchanged, message by message.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::datapath::DirtyLogState;

const HDR_LEN: usize = 12;
/// Bigger than any request the handler accepts (its limit is 4 KiB); a frontend sending more is
/// broken and gets disconnected.
const MAX_PAYLOAD: usize = 64 * 1024;
/// vhost-user's limit on fds attached to one message.
const MAX_FDS: usize = 32;

const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const SET_BACKEND_REQ_FD: u32 = 21;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// One whole vhost-user message with the fds that came with it.
#[derive(Debug)]
struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes(self.bytes[0..4].try_into().unwrap_or_default())
    }
    fn flags(&self) -> u32 {
        u32::from_le_bytes(self.bytes[4..8].try_into().unwrap_or_default())
    }
}

/// Reads one message. `Ok(None)` on a clean EOF between messages.
fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; HDR_LEN];
    let mut fds = Vec::new();
    let mut got = 0;
    // The fds travel with the first bytes of a message; keep any that arrive with the header.
    while got < HDR_LEN {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [io::IoSliceMut::new(&mut hdr[got..])];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let n = msg.bytes;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds in our table for us alone.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += n;
    }
    let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap_or_default()) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message payload of {size} bytes"),
        ));
    }
    let mut bytes = Vec::with_capacity(HDR_LEN + size);
    bytes.extend_from_slice(&hdr);
    bytes.resize(HDR_LEN + size, 0);
    (&*sock).read_exact(&mut bytes[HDR_LEN..])?;
    Ok(Some(Message { bytes, fds }))
}

fn write_message(sock: &UnixStream, m: &Message) -> io::Result<()> {
    if m.fds.is_empty() {
        return (&*sock).write_all(&m.bytes);
    }
    let raw: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [io::IoSlice::new(&m.bytes)];
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(io::Error::from)?;
    (&*sock).write_all(&m.bytes[n..])
}

/// What the frontend→backend direction does with one message.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Forward,
    /// SET_LOG_BASE: map the log here and reply.
    SetLogBase,
    /// Answer it here (an ack if it asked for one); replay it later when `replay`.
    Hold {
        replay: bool,
    },
}

/// A memory region as the frontend describes it: guest address, size, frontend address, offset.
type Region = [u64; 4];

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// The region of an ADD/REM_MEM_REG (payload: u64 padding, then gpa, size, uaddr, offset).
fn single_region(m: &Message) -> Option<Region> {
    let p = HDR_LEN + 8;
    Some([
        u64_at(&m.bytes, p)?,
        u64_at(&m.bytes, p + 8)?,
        u64_at(&m.bytes, p + 16)?,
        u64_at(&m.bytes, p + 24)?,
    ])
}

/// The regions of a SET_MEM_TABLE (payload: u32 count, u32 padding, then 32-byte regions).
fn table_regions(m: &Message) -> Vec<Region> {
    let count = m.bytes.get(HDR_LEN..HDR_LEN + 4).map_or(0, |b| {
        u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize
    });
    (0..count.min(MAX_FDS))
        .filter_map(|i| {
            let p = HDR_LEN + 8 + i * 32;
            Some([
                u64_at(&m.bytes, p)?,
                u64_at(&m.bytes, p + 8)?,
                u64_at(&m.bytes, p + 16)?,
                u64_at(&m.bytes, p + 24)?,
            ])
        })
        .collect()
}

/// The shim's view of the negotiation (see the module doc).
#[derive(Debug, Default)]
struct State {
    features_set: bool,
    deferred: Vec<Message>,
    regions: Vec<Region>,
}

impl State {
    fn judge(&mut self, m: &Message) -> Verdict {
        match m.request() {
            SET_FEATURES => {
                self.features_set = true;
                Verdict::Forward
            }
            SET_MEM_TABLE => {
                self.regions = table_regions(m);
                Verdict::Forward
            }
            SET_LOG_BASE => Verdict::SetLogBase,
            ADD_MEM_REG => match single_region(m) {
                Some(r) if self.regions.contains(&r) => Verdict::Hold { replay: false },
                Some(r) => {
                    self.regions.push(r);
                    Verdict::Forward
                }
                None => Verdict::Forward,
            },
            REM_MEM_REG => match single_region(m) {
                // Removal matches on guest address and size, as the backend does.
                Some(r) => {
                    let before = self.regions.len();
                    self.regions.retain(|x| x[..2] != r[..2]);
                    if self.regions.len() == before {
                        Verdict::Hold { replay: false }
                    } else {
                        Verdict::Forward
                    }
                }
                None => Verdict::Forward,
            },
            SET_VRING_ENABLE if !self.features_set => {
                // Payload: struct vhost_vring_state { u32 index; u32 num; } — num 1 = enable.
                let enable = m.bytes.get(16..20).map(|b| b != [0, 0, 0, 0]) == Some(true);
                Verdict::Hold { replay: enable }
            }
            _ => Verdict::Forward,
        }
    }
}

fn ack(request: u32) -> Message {
    let mut bytes = Vec::with_capacity(HDR_LEN + 8);
    bytes.extend_from_slice(&request.to_le_bytes());
    bytes.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    bytes.extend_from_slice(&8u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    Message {
        bytes,
        fds: Vec::new(),
    }
}

/// Maps the log a SET_LOG_BASE names (payload: u64 mmap_size, u64 mmap_offset; one fd) and
/// builds the reply. An unusable log is the frontend's error and ends the connection.
fn set_log_base(m: &Message, log: &DirtyLogState) -> io::Result<Message> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    let (Some(size), Some(offset)) = (u64_at(&m.bytes, HDR_LEN), u64_at(&m.bytes, HDR_LEN + 8))
    else {
        return Err(bad(
            "frontend sent a SET_LOG_BASE without a log region".into()
        ));
    };
    let [fd] = &m.fds[..] else {
        return Err(bad(format!(
            "frontend sent a SET_LOG_BASE with {} fds (want 1)",
            m.fds.len()
        )));
    };
    let file = std::fs::File::from(fd.try_clone()?);
    log.set_base(&file, offset, size)
        .map_err(|e| bad(e.to_string()))?;
    let mut bytes = m.bytes[..HDR_LEN + 16].to_vec();
    bytes[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    Ok(Message {
        bytes,
        fds: Vec::new(),
    })
}

/// `VHOST_USER_PROTOCOL_F_CONFIG` and `VHOST_USER_PROTOCOL_F_BACKEND_REQ`.
const PROTOCOL_F_CONFIG: u64 = 1 << 9;
const PROTOCOL_F_BACKEND_REQ: u64 = 1 << 5;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;

/// Tells a connection's frontend that the config space changed (the link status), over the
/// backend request channel, when the frontend negotiated both the channel and
/// `VHOST_USER_PROTOCOL_F_CONFIG` (the spec allows the message only then).
///
/// QEMU drops `F_CONFIG` for vhost-user net and DPDK 22.11 has no backend channel, so neither
/// gets this message; a frontend that negotiates both (crosvm, a custom VMM) does.
#[derive(Debug, Default)]
pub struct ConfigNotifier {
    channel: Mutex<Option<UnixStream>>,
    protocol_features: std::sync::atomic::AtomicU64,
}

impl ConfigNotifier {
    /// Notes what a frontend message sets up (protocol features, the backend channel).
    fn observe(&self, m: &Message) {
        match m.request() {
            SET_PROTOCOL_FEATURES => {
                if let Some(f) = u64_at(&m.bytes, HDR_LEN) {
                    self.protocol_features
                        .store(f, std::sync::atomic::Ordering::SeqCst);
                }
            }
            SET_BACKEND_REQ_FD => {
                let copy = m
                    .fds
                    .first()
                    .and_then(|fd| fd.try_clone().ok())
                    .map(UnixStream::from);
                *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = copy;
            }
            _ => {}
        }
    }

    /// Whether a config-change message may be sent on this connection.
    pub fn available(&self) -> bool {
        let f = self
            .protocol_features
            .load(std::sync::atomic::Ordering::SeqCst);
        f & (PROTOCOL_F_CONFIG | PROTOCOL_F_BACKEND_REQ)
            == PROTOCOL_F_CONFIG | PROTOCOL_F_BACKEND_REQ
            && self
                .channel
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    /// Sends CONFIG_CHANGE_MSG (without NEED_REPLY: nothing comes back to read). Returns
    /// whether it was sent; a channel that fails is dropped and not tried again.
    pub fn config_changed(&self) -> bool {
        if !self.available() {
            return false;
        }
        let mut channel = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sock) = channel.as_ref() else {
            return false;
        };
        let mut hdr = [0u8; HDR_LEN];
        hdr[0..4].copy_from_slice(&BACKEND_CONFIG_CHANGE_MSG.to_le_bytes());
        hdr[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
        match (&*sock).write_all(&hdr) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("backend request channel: {e}; config changes go unannounced");
                *channel = None;
                false
            }
        }
    }
}

/// Relays between `frontend` and `backend` until either side closes; returns when both
/// directions have stopped. Runs on two threads (the calling one and one it spawns).
/// `dirty_log` is the connection's log, for SET_LOG_BASE; `notifier` learns the backend channel.
pub fn relay(
    frontend: UnixStream,
    backend: UnixStream,
    dirty_log: Arc<DirtyLogState>,
    notifier: Arc<ConfigNotifier>,
) -> io::Result<()> {
    let front_out = Arc::new(Mutex::new(frontend.try_clone()?));
    let back_in = backend.try_clone()?;
    let front_for_replies = front_out.clone();
    let (f2, b2) = (frontend.try_clone()?, backend.try_clone()?);
    let replies = std::thread::Builder::new()
        .name("vu-shim-replies".into())
        .spawn(move || {
            // Backend → frontend: replies, forwarded verbatim.
            while let Ok(Some(m)) = read_message(&back_in) {
                let out = front_for_replies.lock().unwrap_or_else(|e| e.into_inner());
                if write_message(&out, &m).is_err() {
                    break;
                }
            }
            let _ = f2.shutdown(std::net::Shutdown::Both);
            let _ = b2.shutdown(std::net::Shutdown::Both);
        })?;

    let mut state = State::default();
    let result = (|| -> io::Result<()> {
        while let Some(m) = read_message(&frontend)? {
            tracing::trace!(
                req = m.request(),
                flags = m.flags(),
                len = m.bytes.len(),
                fds = m.fds.len(),
                "frontend message"
            );
            notifier.observe(&m);
            match state.judge(&m) {
                Verdict::SetLogBase => {
                    let reply = set_log_base(&m, &dirty_log).inspect_err(|e| {
                        tracing::error!("{e}; closing the connection");
                    })?;
                    let out = front_out.lock().unwrap_or_else(|e| e.into_inner());
                    write_message(&out, &reply)?;
                }
                Verdict::Forward => {
                    let replay = m.request() == SET_FEATURES;
                    write_message(&backend, &m)?;
                    if replay {
                        for d in state.deferred.drain(..) {
                            // Replayed without NEED_REPLY: the frontend already got its ack.
                            let mut d = d;
                            let flags = d.flags() & !FLAG_NEED_REPLY;
                            d.bytes[4..8].copy_from_slice(&flags.to_le_bytes());
                            write_message(&backend, &d)?;
                        }
                    }
                }
                Verdict::Hold { replay } => {
                    tracing::debug!(
                        replay,
                        "SET_VRING_ENABLE before SET_FEATURES held by the shim"
                    );
                    if m.flags() & FLAG_NEED_REPLY != 0 {
                        let out = front_out.lock().unwrap_or_else(|e| e.into_inner());
                        write_message(&out, &ack(m.request()))?;
                    }
                    if replay {
                        state.deferred.push(m);
                    }
                }
            }
        }
        Ok(())
    })();
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = backend.shutdown(std::net::Shutdown::Both);
    let _ = replies.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(req: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        [
            &req.to_le_bytes()[..],
            &flags.to_le_bytes(),
            &(payload.len() as u32).to_le_bytes(),
            payload,
        ]
        .concat()
    }

    fn enable(index: u32, on: u32, flags: u32) -> Vec<u8> {
        msg(
            SET_VRING_ENABLE,
            flags,
            &[index.to_le_bytes(), on.to_le_bytes()].concat(),
        )
    }

    type Rig = (
        UnixStream,
        UnixStream,
        std::thread::JoinHandle<io::Result<()>>,
    );

    /// frontend ⇄ shim ⇄ backend, with the test holding both outer ends.
    fn rig() -> Rig {
        rig_with_log(Arc::new(DirtyLogState::new()))
    }

    fn rig_with_log(log: Arc<DirtyLogState>) -> Rig {
        let (front_outer, front_inner) = UnixStream::pair().unwrap();
        let (back_inner, back_outer) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            relay(
                front_inner,
                back_inner,
                log,
                Arc::new(ConfigNotifier::default()),
            )
        });
        back_outer
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        front_outer
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        (front_outer, back_outer, t)
    }

    fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).unwrap();
        b
    }

    #[test]
    fn early_vring_disable_is_acked_by_the_shim_and_not_forwarded() {
        let (mut front, mut back, t) = rig();
        front
            .write_all(&enable(2, 0, FLAG_VERSION | FLAG_NEED_REPLY))
            .unwrap();
        let reply = read_n(&mut front, 20);
        assert_eq!(
            reply,
            msg(
                SET_VRING_ENABLE,
                FLAG_VERSION | FLAG_REPLY,
                &0u64.to_le_bytes()
            )
        );
        // The next message the backend sees is the one after it.
        front.write_all(&msg(1, FLAG_VERSION, &[])).unwrap();
        assert_eq!(read_n(&mut back, 12), msg(1, FLAG_VERSION, &[]));
        drop(front);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn early_vring_enable_is_replayed_after_set_features() {
        let (mut front, mut back, t) = rig();
        front.write_all(&enable(0, 1, FLAG_VERSION)).unwrap();
        let features = msg(SET_FEATURES, FLAG_VERSION, &(1u64 << 30).to_le_bytes());
        front.write_all(&features).unwrap();
        assert_eq!(read_n(&mut back, 20), features);
        assert_eq!(read_n(&mut back, 20), enable(0, 1, FLAG_VERSION));
        // After SET_FEATURES, SET_VRING_ENABLE passes straight through.
        front.write_all(&enable(1, 0, FLAG_VERSION)).unwrap();
        assert_eq!(read_n(&mut back, 20), enable(1, 0, FLAG_VERSION));
        drop(front);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn fds_and_replies_cross_unchanged() {
        let (front, mut back, t) = rig();
        let f = std::fs::File::open("/dev/null").unwrap();
        let raw = [f.as_raw_fd()];
        let m = msg(13, FLAG_VERSION, &0u64.to_le_bytes());
        let cmsg = [ControlMessage::ScmRights(&raw)];
        sendmsg::<()>(
            front.as_raw_fd(),
            &[io::IoSlice::new(&m)],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let got = read_message(&back).unwrap().unwrap();
        assert_eq!(got.bytes, m);
        assert_eq!(got.fds.len(), 1, "the fd crossed the shim");
        let reply = msg(1, FLAG_VERSION | FLAG_REPLY, &7u64.to_le_bytes());
        back.write_all(&reply).unwrap();
        let mut front = front;
        assert_eq!(read_n(&mut front, 20), reply);
        drop(front);
        t.join().unwrap().unwrap();
    }

    fn send_with_fd(front: &UnixStream, m: &[u8], fd: Option<RawFd>) {
        let raw: Vec<RawFd> = fd.into_iter().collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(
            front.as_raw_fd(),
            &[io::IoSlice::new(m)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    fn log_base_msg(size: u64, offset: u64) -> Vec<u8> {
        msg(
            SET_LOG_BASE,
            FLAG_VERSION,
            &[size.to_le_bytes(), offset.to_le_bytes()].concat(),
        )
    }

    #[test]
    fn set_log_base_is_mapped_and_answered_by_the_shim() {
        let log = Arc::new(DirtyLogState::new());
        let (mut front, mut back, t) = rig_with_log(log.clone());
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        let m = log_base_msg(4096, 0);
        send_with_fd(&front, &m, Some(file.as_raw_fd()));
        let mut want = m.clone();
        want[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
        assert_eq!(read_n(&mut front, m.len()), want);
        assert_eq!(log.bases_set(), 1);
        // Not forwarded: the backend's next message is the one sent after it.
        front.write_all(&msg(1, FLAG_VERSION, &[])).unwrap();
        assert_eq!(read_n(&mut back, 12), msg(1, FLAG_VERSION, &[]));
        log.set_log_all(true);
        assert!(log.logging());
        drop(front);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn set_log_base_without_an_fd_ends_the_connection() {
        let log = Arc::new(DirtyLogState::new());
        let (front, _back, t) = rig_with_log(log.clone());
        send_with_fd(&front, &log_base_msg(4096, 0), None);
        assert!(t.join().unwrap().is_err());
        assert_eq!(log.bases_set(), 0);
    }

    #[test]
    fn set_log_base_larger_than_its_fd_ends_the_connection() {
        let log = Arc::new(DirtyLogState::new());
        let (front, _back, t) = rig_with_log(log.clone());
        let file = tempfile::tempfile().unwrap();
        file.set_len(100).unwrap();
        send_with_fd(&front, &log_base_msg(4096, 0), Some(file.as_raw_fd()));
        let e = t.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("larger than its fd"), "{e}");
        assert_eq!(log.bases_set(), 0);
    }

    #[test]
    fn oversized_message_ends_the_relay() {
        let (mut front, _back, t) = rig();
        let mut m = msg(2, FLAG_VERSION, &[]);
        m[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
        front.write_all(&m).unwrap();
        assert!(t.join().unwrap().is_err());
    }

    fn region_msg(req: u32, gpa: u64, size: u64) -> Vec<u8> {
        let words = [0u64, gpa, size, 0x7f00_0000_0000, 0];
        let payload: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        msg(req, FLAG_VERSION | FLAG_NEED_REPLY, &payload)
    }

    #[test]
    fn repeated_add_mem_reg_is_acked_once_forwarded_once() {
        let (mut front, mut back, t) = rig();
        let add = region_msg(ADD_MEM_REG, 0, 0x2000_0000);
        front.write_all(&add).unwrap();
        assert_eq!(read_n(&mut back, add.len()), add, "first add forwarded");
        front.write_all(&add).unwrap();
        let reply = read_n(&mut front, 20);
        assert_eq!(
            reply,
            msg(ADD_MEM_REG, FLAG_VERSION | FLAG_REPLY, &0u64.to_le_bytes())
        );
        // Removal is forwarded once; the repeat is answered by the shim.
        let rem = region_msg(REM_MEM_REG, 0, 0x2000_0000);
        front.write_all(&rem).unwrap();
        assert_eq!(read_n(&mut back, rem.len()), rem, "first removal forwarded");
        front.write_all(&rem).unwrap();
        assert_eq!(
            read_n(&mut front, 20),
            msg(REM_MEM_REG, FLAG_VERSION | FLAG_REPLY, &0u64.to_le_bytes())
        );
        // A different region is forwarded.
        let other = region_msg(ADD_MEM_REG, 0x1_0000_0000, 0x1000);
        front.write_all(&other).unwrap();
        assert_eq!(read_n(&mut back, other.len()), other);
        drop(front);
        t.join().unwrap().unwrap();
    }

    fn message(bytes: Vec<u8>, fds: Vec<OwnedFd>) -> Message {
        Message { bytes, fds }
    }

    /// A notifier that saw SET_PROTOCOL_FEATURES(`features`) and a SET_BACKEND_REQ_FD; returns
    /// it with the frontend's end of the channel.
    fn notifier_with(features: u64) -> (ConfigNotifier, UnixStream) {
        let n = ConfigNotifier::default();
        let (ours, theirs) = UnixStream::pair().unwrap();
        n.observe(&message(
            msg(SET_PROTOCOL_FEATURES, FLAG_VERSION, &features.to_le_bytes()),
            vec![],
        ));
        n.observe(&message(
            msg(SET_BACKEND_REQ_FD, FLAG_VERSION, &[]),
            vec![OwnedFd::from(theirs)],
        ));
        ours.set_nonblocking(true).unwrap();
        (n, ours)
    }

    #[test]
    fn config_change_is_sent_only_when_config_and_backend_req_are_negotiated() {
        let mut buf = [0u8; 64];
        for features in [PROTOCOL_F_BACKEND_REQ, PROTOCOL_F_CONFIG, 0] {
            let (n, front) = notifier_with(features);
            assert!(
                !n.config_changed(),
                "sent with protocol features {features:#x}"
            );
            assert!((&front).read(&mut buf).is_err(), "bytes on the channel");
        }
        let (n, front) = notifier_with(PROTOCOL_F_BACKEND_REQ | PROTOCOL_F_CONFIG | 1);
        assert!(n.config_changed());
        assert_eq!((&front).read(&mut buf).unwrap(), HDR_LEN);
        assert_eq!(
            &buf[..HDR_LEN],
            &msg(BACKEND_CONFIG_CHANGE_MSG, FLAG_VERSION, &[])[..]
        );
    }

    #[test]
    fn config_change_without_a_backend_channel_or_after_it_broke_is_not_sent() {
        let n = ConfigNotifier::default();
        n.observe(&message(
            msg(
                SET_PROTOCOL_FEATURES,
                FLAG_VERSION,
                &(PROTOCOL_F_BACKEND_REQ | PROTOCOL_F_CONFIG).to_le_bytes(),
            ),
            vec![],
        ));
        assert!(!n.config_changed());
        let (n, front) = notifier_with(PROTOCOL_F_BACKEND_REQ | PROTOCOL_F_CONFIG);
        drop(front);
        assert!(!n.config_changed(), "sent into a closed channel");
        assert!(!n.available(), "a broken channel is dropped");
    }
}
