//! The macvtap's multicast filter: link-layer multicast addresses and allmulticast, set from
//! the guest's memberships (`datapath::mcast`).
//!
//! macvlan delivers a multicast frame to a macvtap only when the group's MAC is in that
//! macvtap's multicast list (a 256-bucket hash of it, so an unlisted group sharing a bucket
//! with a listed one also gets through), or when the macvtap is in allmulticast or
//! promiscuous mode. [`McFilter`] adds and removes entries of that list and turns
//! allmulticast on and off.
//!
//! # How: packet-socket memberships
//! One `AF_PACKET` socket of protocol 0 (it receives nothing) is opened at start-up, and every
//! change is a `PACKET_ADD_MEMBERSHIP` / `PACKET_DROP_MEMBERSHIP` on it (`PACKET_MR_MULTICAST`
//! with the MAC, `PACKET_MR_ALLMULTI`). The kernel implements these with the same
//! `dev_mc_add`/`dev_mc_del` as `SIOCADDMULTI`/`SIOCDELMULTI`, and there is no rtnetlink
//! message for a device's link-layer multicast list at all. Chosen over the ioctls because:
//! - **they belong to the socket**: when macvhost exits, crashes or is killed, the kernel drops
//!   every address and the allmulticast it added; `SIOCADDMULTI` entries and an
//!   `SIOCSIFFLAGS` `IFF_ALLMULTI` stay behind on the macvtap until someone removes them;
//! - **allmulticast is counted**: `PACKET_MR_ALLMULTI` adds one reference to the device's
//!   allmulti count, so turning ours off never turns off an allmulticast the operator set
//!   (`ip link set … allmulticast on`), and there is no read-modify-write of the flags racing
//!   with other flag changes (an `SIOCSIFFLAGS` after `SIOCGIFFLAGS` can undo an `ip link set
//!   down` made in between).
//!
//! What to look at: `ip maddr show dev X` (or `/proc/net/dev_mcast`) lists the addresses;
//! `/sys/class/net/X/flags` has `IFF_ALLMULTI` (0x200) while any holder has it on. `ip link
//! show` does **not** show an allmulticast (or promiscuous) mode set through a packet socket:
//! it reports only the flag the operator set, as for tcpdump's promiscuous mode.
//!
//! The kernel counts memberships per socket: adding a MAC twice needs two removals (a removal
//! of a MAC the socket does not hold succeeds and does nothing). The caller (the membership
//! table's diffs) adds each MAC once.
//!
//! # A kernel quirk: the last removed group stays in macvlan's filter
//! A macvlan's entries are synced to its lower device, which holds a reference on them, so a
//! removal first only drops our reference; macvlan then recomputes its hash filter *before*
//! the sync that finally takes the entry off the list, and the removed group's bucket stays set
//! until the next recompute. When the lower device is promiscuous or allmulticast (a veth, a
//! bridge port, a NIC without unicast filtering) nothing else stops those frames: the removed
//! group keeps reaching the guest (measured on 6.18, with `ip maddr del` as with packet
//! sockets). So after removals [`McFilter`] forces a recompute: it adds and drops a
//! membership for all-hosts (`01:00:5e:00:00:01`), which the macvtap's own IPv4 holds anyway,
//! so the list does not change and the filter is computed from the final list.
//!
//! # Privileges
//! Opening the socket needs `CAP_NET_RAW` in the macvtap's network namespace (not
//! `CAP_NET_ADMIN`, which the ioctls would need); memberships need nothing more. Without it,
//! [`McFilter::open`] fails with an operator error.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use super::{sys, MacAddr};

/// `01:00:5e:00:00:01`, the MAC of 224.0.0.1, held by every device with IPv4.
const ALL_HOSTS_MAC: [u8; 6] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];

/// Errors of the multicast filter; [`McFilterError::is_operator_error`] tells the operator's
/// from the host's.
#[derive(Debug, thiserror::Error)]
pub enum McFilterError {
    // --- Operator errors ---
    /// The process lacks `CAP_NET_RAW` in the interface's network namespace, so it cannot
    /// open the packet socket that holds the memberships.
    #[error(
        "the multicast filter needs CAP_NET_RAW in this network namespace (an AF_PACKET \
         socket holds the guest's groups): {0}"
    )]
    NotPermitted(io::Error),
    /// No interface has this index in the caller's network namespace.
    #[error("no network interface with index {0} in this network namespace")]
    NoSuchInterface(u32),

    // --- Caller (programming) errors ---
    /// A unicast MAC was passed to the multicast list ([`McFilter::add`]/[`McFilter::remove`]);
    /// group MACs derived from IP groups always have the group bit.
    #[error("{mac} is not a multicast MAC (group bit clear)")]
    NotMulticast {
        /// The MAC passed.
        mac: MacAddr,
    },

    // --- Host errors ---
    /// The packet socket could not be created, or the interface name not read, for another
    /// reason than a missing capability or interface.
    #[error("opening the multicast control socket: {0}")]
    Socket(io::Error),
    /// The interface was deleted while the filter held it (`ENODEV` on a membership change).
    #[error("interface {ifname:?} (#{ifindex}) is gone")]
    LinkGone {
        /// Its name at open time.
        ifname: String,
        /// Its index.
        ifindex: u32,
    },
    /// The kernel refused a membership change (`PACKET_ADD_MEMBERSHIP` or
    /// `PACKET_DROP_MEMBERSHIP`), e.g. out of memory.
    #[error("{op} {what} on {ifname:?}: {source}")]
    Membership {
        /// `adding` or `removing`.
        op: &'static str,
        /// The MAC, `allmulticast` or `promiscuity`.
        what: String,
        /// The interface's name at open time.
        ifname: String,
        /// The kernel's answer.
        source: io::Error,
    },
}

impl McFilterError {
    /// True when the operator's set-up is at fault (missing capability, wrong interface).
    pub fn is_operator_error(&self) -> bool {
        matches!(
            self,
            McFilterError::NotPermitted(_) | McFilterError::NoSuchInterface(_)
        )
    }
}

/// The multicast filter of one interface, over a socket opened once. Dropping it removes every
/// address it added and its allmulticast (the kernel does, when the socket closes).
#[derive(Debug)]
pub struct McFilter {
    sock: OwnedFd,
    ifindex: u32,
    /// The name at open time, for messages.
    ifname: String,
    allmulti: bool,
}

impl McFilter {
    /// Opens the filter of interface `ifindex` in the caller's network namespace.
    pub fn open(ifindex: u32) -> Result<McFilter, McFilterError> {
        let sock = sys::packet_membership_socket().map_err(|e| {
            if e.raw_os_error() == Some(libc::EPERM) || e.raw_os_error() == Some(libc::EACCES) {
                McFilterError::NotPermitted(e)
            } else {
                McFilterError::Socket(e)
            }
        })?;
        let ifname = sys::if_name(sock.as_fd(), ifindex).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENODEV) {
                McFilterError::NoSuchInterface(ifindex)
            } else {
                McFilterError::Socket(e)
            }
        })?;
        Ok(McFilter {
            sock,
            ifindex,
            ifname,
            allmulti: false,
        })
    }

    /// The interface this filter changes (fixed at open).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Whether this filter holds allmulticast on (others may hold it too).
    pub fn allmulti(&self) -> bool {
        self.allmulti
    }

    fn change(&self, add: bool, mac: Option<[u8; 6]>) -> Result<(), McFilterError> {
        let what = match mac {
            Some(m) if m[0] & 1 == 0 => {
                return Err(McFilterError::NotMulticast { mac: MacAddr(m) })
            }
            Some(m) => sys::Membership::Multicast(m),
            None => sys::Membership::AllMulti,
        };
        self.membership(add, what)
    }

    fn membership(&self, add: bool, what: sys::Membership) -> Result<(), McFilterError> {
        // `ifindex` fitted an i32 at open.
        sys::packet_membership(self.sock.as_fd(), add, self.ifindex, what).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENODEV) {
                McFilterError::LinkGone {
                    ifname: self.ifname.clone(),
                    ifindex: self.ifindex,
                }
            } else {
                McFilterError::Membership {
                    op: if add { "adding" } else { "removing" },
                    what: match what {
                        sys::Membership::Multicast(m) | sys::Membership::Unicast(m) => {
                            MacAddr(m).to_string()
                        }
                        sys::Membership::AllMulti => "allmulticast".into(),
                        sys::Membership::Promisc => "promiscuity".into(),
                    },
                    ifname: self.ifname.clone(),
                    source: e,
                }
            }
        })
    }

    /// Adds (or removes) unicast `mac` to the interface's secondary unicast list (a trusted
    /// guest's extra addresses; a macvtap delivers them only in passthru mode).
    pub fn set_unicast(&self, mac: [u8; 6], on: bool) -> Result<(), McFilterError> {
        self.membership(on, sys::Membership::Unicast(mac))
    }

    /// Holds (or releases) one reference on the interface's promiscuity.
    pub fn set_promisc(&self, on: bool) -> Result<(), McFilterError> {
        self.membership(on, sys::Membership::Promisc)
    }

    /// Adds multicast `mac` to the interface's list.
    pub fn add(&self, mac: [u8; 6]) -> Result<(), McFilterError> {
        self.change(true, Some(mac))
    }

    /// Removes multicast `mac` that [`add`](Self::add) put there (nothing happens for a MAC it
    /// did not add), then refreshes macvlan's filter (see the module doc).
    pub fn remove(&self, mac: [u8; 6]) -> Result<(), McFilterError> {
        self.change(false, Some(mac))?;
        self.refresh()
    }

    /// Makes macvlan recompute its filter from the current list: add and drop a membership of
    /// a group the device holds anyway (all-hosts).
    fn refresh(&self) -> Result<(), McFilterError> {
        self.change(true, Some(ALL_HOSTS_MAC))?;
        self.change(false, Some(ALL_HOSTS_MAC))
    }

    /// Holds (or releases) allmulticast on the interface; does nothing when already so.
    pub fn set_allmulti(&mut self, on: bool) -> Result<(), McFilterError> {
        if on != self.allmulti {
            self.change(on, None)?;
            self.allmulti = on;
        }
        Ok(())
    }

    /// Applies a membership-table diff (`datapath::mcast::Diff`'s `remove`, `add`, `allmulti`):
    /// removals, additions, then allmulticast. Every change is tried; the first error is
    /// returned (the caller may resync from the table's MACs).
    pub fn apply(
        &mut self,
        remove: &[[u8; 6]],
        add: &[[u8; 6]],
        allmulti: Option<bool>,
    ) -> Result<(), McFilterError> {
        let mut first = Ok(());
        let mut keep = |r: Result<(), McFilterError>| {
            if first.is_ok() {
                first = r;
            }
        };
        for mac in remove {
            keep(self.change(false, Some(*mac)));
        }
        if !remove.is_empty() {
            keep(self.refresh());
        }
        for mac in add {
            keep(self.add(*mac));
        }
        if let Some(on) = allmulti {
            keep(self.set_allmulti(on));
        }
        first
    }
}

#[cfg(test)]
pub(crate) mod tests;
