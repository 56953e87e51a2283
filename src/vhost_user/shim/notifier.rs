//! CONFIG_CHANGE_MSG on the backend request channel: how a connection's frontend learns that
//! the config space changed (the link status). The `vhost` crate's `Backend` has no way to send
//! that message, so the shim keeps its own copy of the channel (SET_BACKEND_REQ_FD) and the
//! negotiated protocol features.
//!
//! The channel is the frontend's socket and nothing makes it read it: every send is
//! non-blocking (`MSG_DONTWAIT`). A full channel drops the message (counted, logged once per
//! connection); a broken one is let go. No thread ever waits on the frontend here.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::socket::{
    getsockopt, send, sockopt, AddressFamily, MsgFlags, SockType, SockaddrLike, SockaddrStorage,
};
use vhost::vhost_user::message::{
    BackendReq, FrontendReq, VhostUserProtocolFeatures, VhostUserU64,
};

use super::wire::Message;

/// `VHOST_USER_PROTOCOL_F_CONFIG` and `VHOST_USER_PROTOCOL_F_BACKEND_REQ`: both are needed.
const NEEDED: u64 =
    VhostUserProtocolFeatures::CONFIG.bits() | VhostUserProtocolFeatures::BACKEND_REQ.bits();

/// Tells a connection's frontend that the config space changed, over the backend request
/// channel, when the frontend negotiated both the channel and `VHOST_USER_PROTOCOL_F_CONFIG`
/// (the spec allows the message only then).
///
/// QEMU drops `F_CONFIG` for vhost-user net and DPDK 22.11 has no backend channel, so neither
/// gets this message; a frontend that negotiates both (crosvm, a custom VMM) does.
#[derive(Debug, Default)]
pub struct ConfigNotifier {
    channel: Mutex<Option<UnixStream>>,
    protocol_features: AtomicU64,
    /// Messages dropped because the channel was full.
    dropped: AtomicU64,
    /// Whether a full channel was already logged on this connection.
    full_logged: AtomicBool,
}

impl ConfigNotifier {
    /// Notes what a frontend message sets up (protocol features, the backend channel).
    pub(super) fn observe(&self, m: &Message) {
        match m.code() {
            Some(FrontendReq::SET_PROTOCOL_FEATURES) => {
                if let Some(f) = m.body::<VhostUserU64>() {
                    self.protocol_features.store(f.value, Ordering::SeqCst);
                }
            }
            Some(FrontendReq::SET_BACKEND_REQ_FD) => {
                // Anything but a unix stream socket is refused by the handler (and the
                // connection ends); keep nothing then.
                let copy = m
                    .fds
                    .first()
                    .filter(|fd| is_unix_stream(fd))
                    .and_then(|fd| fd.try_clone().ok())
                    .map(UnixStream::from);
                *self.lock() = copy;
            }
            _ => {}
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
        self.channel.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a config-change message may be sent on this connection.
    pub fn available(&self) -> bool {
        self.protocol_features.load(Ordering::SeqCst) & NEEDED == NEEDED && self.lock().is_some()
    }

    /// Messages dropped on this connection because the frontend left its channel full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sends CONFIG_CHANGE_MSG (without NEED_REPLY: nothing comes back to read) without ever
    /// blocking. Returns whether it was sent: a full channel drops it (counted), a failing one
    /// is let go and not tried again.
    pub fn config_changed(&self) -> bool {
        if !self.available() {
            return false;
        }
        let mut channel = self.lock();
        let Some(sock) = channel.as_ref() else {
            return false;
        };
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&u32::from(BackendReq::CONFIG_CHANGE_MSG).to_ne_bytes());
        // Version 1, no flags.
        msg[4..8].copy_from_slice(&1u32.to_ne_bytes());
        match send(
            sock.as_raw_fd(),
            &msg,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(n) if n == msg.len() => true,
            Err(Errno::EAGAIN) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                if !self.full_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "frontend does not read its backend request channel (full): \
                         config changes are dropped for this connection"
                    );
                }
                false
            }
            other => {
                let why = match other {
                    Ok(n) => format!("only {n} of 12 bytes sent"),
                    Err(e) => e.to_string(),
                };
                tracing::warn!("backend request channel: {why}; config changes go unannounced");
                *channel = None;
                false
            }
        }
    }
}

fn is_unix_stream(fd: &OwnedFd) -> bool {
    let stream = getsockopt(fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
    let unix = nix::sys::socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .is_ok_and(|a| a.family() == Some(AddressFamily::Unix));
    stream && unix
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost_user::shim::wire::Header;
    use std::io::Read;
    use std::time::{Duration, Instant};
    use vm_memory::ByteValued;

    fn message(code: FrontendReq, payload: Vec<u8>, fds: Vec<OwnedFd>) -> Message {
        Message {
            hdr: Header::request(code, false, payload.len()),
            payload,
            fds,
        }
    }

    /// SET_PROTOCOL_FEATURES(`features`).
    fn protocol_features(features: u64) -> Message {
        let payload = VhostUserU64::new(features).as_slice().to_vec();
        message(FrontendReq::SET_PROTOCOL_FEATURES, payload, vec![])
    }

    /// SET_BACKEND_REQ_FD carrying `fd`.
    fn backend_req_fd(fd: OwnedFd) -> Message {
        message(FrontendReq::SET_BACKEND_REQ_FD, vec![], vec![fd])
    }

    /// A notifier that saw SET_PROTOCOL_FEATURES(`features`) and a SET_BACKEND_REQ_FD; returns
    /// it with the frontend's end of the channel.
    fn notifier_with(features: u64) -> (ConfigNotifier, UnixStream) {
        let n = ConfigNotifier::default();
        let (ours, theirs) = UnixStream::pair().unwrap();
        n.observe(&protocol_features(features));
        n.observe(&backend_req_fd(OwnedFd::from(theirs)));
        ours.set_nonblocking(true).unwrap();
        (n, ours)
    }

    const BOTH: u64 = NEEDED;

    #[test]
    fn config_change_is_sent_only_when_config_and_backend_req_are_negotiated() {
        let mut buf = [0u8; 64];
        for features in [
            VhostUserProtocolFeatures::BACKEND_REQ.bits(),
            VhostUserProtocolFeatures::CONFIG.bits(),
            0,
        ] {
            let (n, front) = notifier_with(features);
            assert!(
                !n.config_changed(),
                "sent with protocol features {features:#x}"
            );
            assert!((&front).read(&mut buf).is_err(), "bytes on the channel");
        }
        let (n, front) = notifier_with(BOTH | 1);
        assert!(n.config_changed());
        assert_eq!((&front).read(&mut buf).unwrap(), 12);
        assert_eq!(&buf[0..4], &2u32.to_ne_bytes());
        assert_eq!(&buf[4..12], &[1, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn config_change_without_a_backend_channel_or_after_it_broke_is_not_sent() {
        let n = ConfigNotifier::default();
        n.observe(&protocol_features(BOTH));
        assert!(!n.config_changed());
        let (n, front) = notifier_with(BOTH);
        drop(front);
        assert!(!n.config_changed(), "sent into a closed channel");
        assert!(!n.available(), "a broken channel is dropped");
    }

    #[test]
    fn backend_channel_nobody_reads_drops_config_changes_without_blocking() {
        let (n, front) = notifier_with(BOTH);
        // Fill the frontend's receive side until a send would block.
        let start = Instant::now();
        let mut sent = 0;
        while n.config_changed() {
            sent += 1;
            assert!(sent < 1_000_000, "the channel never filled");
        }
        for _ in 0..1000 {
            assert!(!n.config_changed());
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "sending took {:?}",
            start.elapsed()
        );
        assert_eq!(n.dropped(), 1001);
        assert!(n.available(), "a full channel is kept (it may drain)");
        drop(front);
    }

    #[test]
    fn backend_channel_that_is_not_a_unix_stream_socket_is_not_kept() {
        let n = ConfigNotifier::default();
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        n.observe(&protocol_features(BOTH));
        n.observe(&backend_req_fd(OwnedFd::from(a)));
        assert!(!n.available());
        let pipe = nix::unistd::pipe().unwrap();
        n.observe(&backend_req_fd(pipe.1));
        assert!(!n.available());
    }
}
