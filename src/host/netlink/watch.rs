//! Link state watcher: a thread on an `RTMGRP_LINK` netlink socket that reports when watched
//! links gain or lose carrier, or disappear.
//!
//! "Up" is `IFF_UP && IFF_RUNNING` from the `ifinfomsg` of each `RTM_NEWLINK`: administratively
//! up and operationally up. `IFF_RUNNING` is the kernel's `netif_oper_up` (operstate UP or
//! UNKNOWN), which for a macvtap also follows its parent: when the parent loses carrier or goes
//! down, the macvtap stays `IFF_UP` but drops `IFF_RUNNING`/`IFF_LOWER_UP` (operstate
//! LOWERLAYERDOWN) and gets its own `RTM_NEWLINK`.
//!
//! Each watched link first gets one event with its state at subscription time (the socket
//! subscribes before the state is read, so no change in between is lost), then one event per
//! change of that boolean; the many other `RTM_NEWLINK`s (MTU, stats, promiscuity...) are
//! filtered out. A receive-queue overrun (`ENOBUFS`) re-reads every watched link and reports
//! what changed.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::rtnl::{KernelError, Rtnl};
use super::{flags_up, NetlinkError};

/// `RTMGRP_LINK`: the legacy multicast group bit for link notifications.
const RTMGRP_LINK: u32 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const NLMSG_HDRLEN: usize = 16;
/// `struct ifinfomsg`: family, pad, type, index, flags, change.
const IFINFOMSG_LEN: usize = 16;

/// A change of a watched link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    /// The link is (`up: true`) or is not administratively and operationally up.
    Carrier {
        /// The link.
        ifindex: u32,
        /// `IFF_UP && IFF_RUNNING` (for a macvtap, its parent's carrier shows through).
        up: bool,
    },
    /// The link was deleted (or moved to another network namespace); it is no longer watched.
    /// Deleting a link that was up reports `Carrier { up: false }` first (it is closed before
    /// it is unregistered).
    Deleted {
        /// The link's index before it went.
        ifindex: u32,
    },
}

/// The watcher thread. Dropping it stops the thread (an eventfd wakes its `poll`) and joins it.
#[derive(Debug)]
pub struct LinkWatcher {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    ifindexes: Vec<u32>,
}

impl LinkWatcher {
    /// The ifindexes this watcher was asked to watch.
    pub fn ifindexes(&self) -> &[u32] {
        &self.ifindexes
    }
}

impl Drop for LinkWatcher {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            tracing::warn!("cannot wake the link watcher: {e}");
            return; // joining could hang forever
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("link watcher thread panicked");
            }
        }
    }
}

/// Watches `ifindexes` (typically a macvtap and its parent) in the calling thread's network
/// namespace and calls `on_change` on the watcher thread: first once per link with its current
/// state, then on every change (see the module doc).
pub fn watch_links(
    ifindexes: Vec<u32>,
    on_change: impl Fn(LinkEvent) + Send + 'static,
) -> Result<LinkWatcher, NetlinkError> {
    let err = |what| move |source| NetlinkError::Socket { what, source };
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(err("socket(NETLINK_ROUTE)"))?;
    sock.bind(&SocketAddr::new(0, RTMGRP_LINK))
        .map_err(err("bind RTMGRP_LINK"))?;
    sock.set_non_blocking(true).map_err(err("O_NONBLOCK"))?;
    // Best effort: a bigger queue makes overruns (and the resync they cost) rarer.
    let _ = sock.set_rx_buf_sz(1 << 20);
    let rtnl = Rtnl::new()?;
    let stop = Arc::new(
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| err("eventfd")(e.into()))?,
    );
    let mut watch = Watch {
        sock,
        rtnl,
        links: ifindexes.iter().map(|&i| (i, None)).collect(),
        on_change,
    };
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("link-watch".into())
        .spawn(move || watch.run(&thread_stop))
        .map_err(NetlinkError::Thread)?;
    Ok(LinkWatcher {
        stop,
        thread: Some(thread),
        ifindexes,
    })
}

struct Watch<F> {
    sock: Socket,
    rtnl: Rtnl,
    /// Watched ifindexes and their last reported state (`None`: not reported yet). Deleted
    /// links are removed.
    links: Vec<(u32, Option<bool>)>,
    on_change: F,
}

impl<F: Fn(LinkEvent)> Watch<F> {
    fn run(&mut self, stop: &EventFd) {
        self.resync();
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            let mut fds = [
                PollFd::new(self.sock.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("link watcher: poll: {e}; stopping");
                    return;
                }
            }
            if fds[1].any().unwrap_or(false) {
                return;
            }
            if !self.drain(&mut buf) {
                return;
            }
        }
    }

    /// Reads every queued datagram. False when the socket failed for good.
    fn drain(&mut self, buf: &mut Vec<u8>) -> bool {
        loop {
            buf.clear();
            match self.sock.recv(buf, libc::MSG_DONTWAIT) {
                Ok(_) => self.handle_datagram(buf),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    tracing::debug!("link watcher: notifications overran; re-reading state");
                    self.resync();
                }
                Err(e) => {
                    tracing::error!("link watcher: recv: {e}; stopping");
                    return false;
                }
            }
        }
    }

    fn handle_datagram(&mut self, data: &[u8]) {
        let mut off = 0;
        while off + NLMSG_HDRLEN <= data.len() {
            let raw = &data[off..];
            let len = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
            if len < NLMSG_HDRLEN || len > raw.len() {
                return;
            }
            let msg_type = u16::from_ne_bytes([raw[4], raw[5]]);
            if let Some(ifi) = raw.get(NLMSG_HDRLEN..NLMSG_HDRLEN + IFINFOMSG_LEN) {
                let ifindex = u32::from_ne_bytes([ifi[4], ifi[5], ifi[6], ifi[7]]);
                let flags = u32::from_ne_bytes([ifi[8], ifi[9], ifi[10], ifi[11]]);
                match msg_type {
                    RTM_NEWLINK => self.observe(ifindex, Some(flags_up(flags))),
                    RTM_DELLINK => self.observe(ifindex, None),
                    _ => {}
                }
            }
            off += (len + 3) & !3;
        }
    }

    /// Records what was seen of `ifindex` (`None`: gone) and reports a change.
    fn observe(&mut self, ifindex: u32, up: Option<bool>) {
        let Some(pos) = self.links.iter().position(|&(i, _)| i == ifindex) else {
            return;
        };
        match up {
            None => {
                self.links.swap_remove(pos);
                (self.on_change)(LinkEvent::Deleted { ifindex });
            }
            Some(up) if self.links[pos].1 != Some(up) => {
                self.links[pos].1 = Some(up);
                (self.on_change)(LinkEvent::Carrier { ifindex, up });
            }
            Some(_) => {}
        }
    }

    /// Reads each watched link's state and reports what differs from the last report.
    fn resync(&mut self) {
        let indexes: Vec<u32> = self.links.iter().map(|&(i, _)| i).collect();
        for ifindex in indexes {
            match query(&mut self.rtnl, ifindex) {
                Ok(up) => self.observe(ifindex, up),
                Err(e) => tracing::warn!("link watcher: reading link #{ifindex}: {e:?}"),
            }
        }
    }
}

/// The state of `ifindex` now: `Some(up)`, or `None` when it does not exist.
fn query(rtnl: &mut Rtnl, ifindex: u32) -> Result<Option<bool>, KernelError> {
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    match rtnl.request(
        RouteNetlinkMessage::GetLink(msg),
        netlink_packet_core::NLM_F_REQUEST,
    ) {
        Ok(replies) => Ok(replies.into_iter().find_map(|r| match r {
            RouteNetlinkMessage::NewLink(m) if m.header.index == ifindex => {
                Some(flags_up(m.header.flags.bits()))
            }
            _ => None,
        })),
        Err(KernelError::Errno { errno, .. }) if errno == libc::ENODEV => Ok(None),
        Err(e) => Err(e),
    }
}
