//! SET_LOG_BASE (live migration): the shim maps the log into the connection's
//! [`DirtyLogState`] instead of forwarding it. vhost-user-backend's own handling needs
//! bitmap-typed guest memory and cannot see our iovec writes (see `crate::datapath::dirty`).

use vhost::vhost_user::message::{FrontendReq, VhostUserLog, VhostUserMsgValidator};

use super::wire::{Header, Message};
use crate::datapath::DirtyLogState;

/// Why a SET_LOG_BASE was refused (the frontend's fault).
#[derive(Debug, thiserror::Error)]
pub enum LogBaseError {
    /// The payload is not a valid `VhostUserLog` (zero size, offset + size overflowing).
    #[error("frontend sent a SET_LOG_BASE without a valid log region")]
    BadRegion,
    /// Not exactly one fd.
    #[error("frontend sent a SET_LOG_BASE with {0} file descriptors (want 1)")]
    Fds(usize),
    /// The fd cannot be mapped as a log of that size (too small, not mappable...).
    #[error("frontend's SET_LOG_BASE log cannot be used: {0}")]
    Map(String),
}

/// Maps the log `m` names and builds the reply (which echoes the request's payload, as the
/// `vhost` crate's handler does; QEMU only checks the request code).
pub fn set_log_base(m: &Message, log: &DirtyLogState) -> Result<Message, LogBaseError> {
    let region: VhostUserLog = m
        .body()
        .filter(VhostUserMsgValidator::is_valid)
        .ok_or(LogBaseError::BadRegion)?;
    let [fd] = &m.fds[..] else {
        return Err(LogBaseError::Fds(m.fds.len()));
    };
    let file = std::fs::File::from(
        fd.try_clone()
            .map_err(|e| LogBaseError::Map(e.to_string()))?,
    );
    log.set_base(&file, region.mmap_offset, region.mmap_size)
        .map_err(|e| LogBaseError::Map(e.to_string()))?;
    Ok(Message::with_body(
        |n| Header::reply(FrontendReq::SET_LOG_BASE, n),
        &region,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use vm_memory::ByteValued;

    fn request(size: u64, offset: u64, fds: Vec<OwnedFd>) -> Message {
        let body = VhostUserLog::new(size, offset);
        Message {
            hdr: Header::request(FrontendReq::SET_LOG_BASE, false, 16),
            payload: body.as_slice().to_vec(),
            fds,
        }
    }

    fn file(len: u64) -> OwnedFd {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        OwnedFd::from(f)
    }

    #[test]
    fn set_log_base_maps_the_log_and_echoes_the_region() {
        let log = DirtyLogState::new();
        let reply = set_log_base(&request(4096, 0, vec![file(4096)]), &log).unwrap();
        assert!(reply.hdr.is_reply());
        assert_eq!(reply.code(), Some(FrontendReq::SET_LOG_BASE));
        assert_eq!(reply.payload, VhostUserLog::new(4096, 0).as_slice());
        assert_eq!(log.bases_set(), 1);
        log.set_log_all(true);
        assert!(log.logging());
    }

    #[test]
    fn set_log_base_without_an_fd_or_with_a_zero_size_is_refused() {
        let log = DirtyLogState::new();
        assert!(matches!(
            set_log_base(&request(4096, 0, vec![]), &log),
            Err(LogBaseError::Fds(0))
        ));
        assert!(matches!(
            set_log_base(&request(0, 0, vec![file(4096)]), &log),
            Err(LogBaseError::BadRegion)
        ));
        assert!(matches!(
            set_log_base(&request(4096, u64::MAX, vec![file(4096)]), &log),
            Err(LogBaseError::BadRegion)
        ));
        assert_eq!(log.bases_set(), 0);
    }

    #[test]
    fn set_log_base_larger_than_its_fd_is_refused() {
        let log = DirtyLogState::new();
        let e = set_log_base(&request(4096, 0, vec![file(100)]), &log).unwrap_err();
        assert!(e.to_string().contains("larger than its fd"), "{e}");
        assert_eq!(log.bases_set(), 0);
    }
}
