//! A synchronous `NETLINK_ROUTE` request socket: send one request, collect its replies up to
//! the ACK (or `NLMSG_DONE` for a dump), and turn a NACK into the errno plus the kernel's
//! extended-ack message.

use std::io;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLMSG_ERROR, NLM_F_DUMP};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// `NLM_F_CAPPED` on an `NLMSG_ERROR`: the echoed request is only its header.
const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS` on an `NLMSG_ERROR`: extended-ack attributes follow the echoed request.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the kernel's human-readable reason.
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSG_HDRLEN: usize = 16;

/// Why a request failed.
#[derive(Debug)]
pub(super) enum KernelError {
    /// The kernel refused it.
    Errno { errno: i32, extack: Option<String> },
    /// The socket failed.
    Io {
        what: &'static str,
        source: io::Error,
    },
    /// A reply could not be parsed.
    Decode(String),
}

/// One request socket in the creating thread's network namespace.
#[derive(Debug)]
pub(crate) struct Rtnl {
    sock: Socket,
    seq: u32,
    port: u32,
}

impl Rtnl {
    pub(crate) fn new() -> Result<Rtnl, super::NetlinkError> {
        let err = |what| move |source| super::NetlinkError::Socket { what, source };
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(err("socket(NETLINK_ROUTE)"))?;
        let addr = sock.bind_auto().map_err(err("bind"))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(err("connect"))?;
        // Both are best effort: without them errors just carry no kernel message.
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        Ok(Rtnl {
            sock,
            seq: 0,
            port: addr.port_number(),
        })
    }

    /// Sends `msg` with `flags` and returns the messages of the reply. Requests without
    /// `NLM_F_DUMP` get `NLM_F_ACK` added, so every request ends with an ACK, a NACK or DONE.
    pub(super) fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, KernelError> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = if dump {
            flags
        } else {
            flags | netlink_packet_core::NLM_F_ACK
        };
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(|source| KernelError::Io {
            what: "send",
            source,
        })?;

        let mut out = Vec::new();
        loop {
            let (data, _) = self
                .sock
                .recv_from_full()
                .map_err(|source| KernelError::Io {
                    what: "recv",
                    source,
                })?;
            let mut off = 0;
            while off + NLMSG_HDRLEN <= data.len() {
                let chunk = &data[off..];
                let len = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
                if len < NLMSG_HDRLEN || len > chunk.len() {
                    return Err(KernelError::Decode(format!(
                        "netlink message length {len} with {} bytes left",
                        chunk.len()
                    )));
                }
                let raw = &chunk[..len];
                off += (len + 3) & !3;
                let msg_seq = u32::from_ne_bytes([raw[8], raw[9], raw[10], raw[11]]);
                let msg_port = u32::from_ne_bytes([raw[12], raw[13], raw[14], raw[15]]);
                if msg_seq != seq || (msg_port != 0 && msg_port != self.port) {
                    continue; // a late reply to an earlier request
                }
                let msg_type = u16::from_ne_bytes([raw[4], raw[5]]);
                let msg_flags = u16::from_ne_bytes([raw[6], raw[7]]);
                if msg_type == NLMSG_ERROR {
                    return match error_code(raw) {
                        0 => Ok(out),
                        code => Err(KernelError::Errno {
                            errno: -code,
                            extack: extack_msg(raw, msg_flags),
                        }),
                    };
                }
                let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(raw)
                    .map_err(|e| KernelError::Decode(e.to_string()))?;
                match parsed.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }
}

/// The (negative) errno of an `NLMSG_ERROR`, 0 for an ACK.
fn error_code(raw: &[u8]) -> i32 {
    raw.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(-libc::EPROTO)
}

/// `NLMSGERR_ATTR_MSG` from an `NLMSG_ERROR`'s extended-ack attributes.
fn extack_msg(raw: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    // error code, then the echoed request: its header only when capped, else all of it.
    let echoed = raw.get(NLMSG_HDRLEN + 4..)?;
    let echoed_len = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        u32::from_ne_bytes(echoed.get(..4)?.try_into().ok()?) as usize
    };
    let mut tlvs = echoed.get((echoed_len + 3) & !3..)?;
    while tlvs.len() >= 4 {
        let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
        let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]) & 0x3fff;
        if len < 4 || len > tlvs.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let s = &tlvs[4..len];
            let s = s.split(|&b| b == 0).next().unwrap_or(s);
            return Some(String::from_utf8_lossy(s).into_owned());
        }
        tlvs = tlvs.get((len + 3) & !3..).unwrap_or(&[]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extack_message_is_found_after_a_capped_request() {
        let mut raw = vec![0u8; NLMSG_HDRLEN];
        raw.extend_from_slice(&(-libc::EINVAL).to_ne_bytes());
        raw.extend_from_slice(&[0u8; NLMSG_HDRLEN]); // echoed header (capped)
        let text = b"Unknown device type\0";
        let len = 4 + text.len();
        raw.extend_from_slice(&(len as u16).to_ne_bytes());
        raw.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        raw.extend_from_slice(text);
        assert_eq!(error_code(&raw), -libc::EINVAL);
        assert_eq!(
            extack_msg(&raw, NLM_F_CAPPED | NLM_F_ACK_TLVS).as_deref(),
            Some("Unknown device type")
        );
        assert_eq!(extack_msg(&raw, NLM_F_CAPPED), None);
    }
}
