//! `--trust-guest-rx-filters`: the guest's receive filter, as QEMU reports it over QMP
//! ([`super::qmp`]), applied to the macvtap — its MAC, its unicast and multicast lists, and
//! promiscuous and allmulticast modes — as libvirt does for `<interface type='direct'>`.
//!
//! The security implication is the operator's choice: a trusted guest can take any MAC (and so
//! receive every frame sent to that address on the parent's segment), and ask for every frame.
//! Without trust nothing here runs; the guest's MAC changes are only counted and said once.
//!
//! Memberships are held on this module's own packet socket, so they add to (and never disturb)
//! the groups `--rx-filter follow` learned: the kernel counts references per socket.

use std::sync::Arc;

use super::qmp::{RxFilter, RxMode};
use crate::datapath::tx::SharedMac;
use crate::host::mcfilter::McFilter;
use crate::host::MacAddr;
use crate::worker::l2::L2Stats;

/// Changes the macvtap's MAC (rtnetlink; a privileged helper once sealed).
pub type SetMac = Box<dyn FnMut(MacAddr) -> Result<(), String> + Send>;

/// What has been applied to the macvtap so far.
pub(super) struct Trust {
    filter: McFilter,
    set_mac: SetMac,
    guest_mac: Arc<SharedMac>,
    stats: Arc<L2Stats>,
    mac: MacAddr,
    multicast: Vec<[u8; 6]>,
    unicast: Vec<[u8; 6]>,
    allmulti: bool,
    promisc: bool,
    failing: bool,
}

impl Trust {
    /// Starts from the macvtap's state: MAC `mac`, nothing else held.
    pub(super) fn new(
        filter: McFilter,
        set_mac: SetMac,
        guest_mac: Arc<SharedMac>,
        stats: Arc<L2Stats>,
    ) -> Trust {
        Trust {
            mac: MacAddr(guest_mac.get()),
            filter,
            set_mac,
            guest_mac,
            stats,
            multicast: Vec::new(),
            unicast: Vec::new(),
            allmulti: false,
            promisc: false,
            failing: false,
        }
    }

    /// Applies the guest's filter `f`. A failure is logged once until an apply works again;
    /// the next filter retries.
    pub(super) fn apply(&mut self, f: &RxFilter) {
        let mut errors = Vec::new();
        if f.mac != self.mac {
            match (self.set_mac)(f.mac) {
                Ok(()) => {
                    tracing::info!(
                        "the macvtap follows the guest's MAC {} (--trust-guest-rx-filters)",
                        f.mac
                    );
                    self.mac = f.mac;
                    self.guest_mac.set(f.mac.0);
                    self.stats
                        .guest_mac_changes_applied
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => errors.push(format!("MAC {}: {e}", f.mac)),
            }
        }
        let want_mc: Vec<[u8; 6]> = match f.multicast_mode {
            RxMode::Normal => f.multicast.iter().map(|m| m.0).collect(),
            RxMode::None | RxMode::All => Vec::new(),
        };
        let want_uc: Vec<[u8; 6]> = match f.unicast_mode {
            RxMode::Normal => f.unicast.iter().map(|m| m.0).collect(),
            RxMode::None | RxMode::All => Vec::new(),
        };
        for m in self.multicast.clone() {
            if !want_mc.contains(&m) {
                match self.filter.remove(m) {
                    Ok(()) => self.multicast.retain(|x| *x != m),
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        for m in want_mc {
            if !self.multicast.contains(&m) {
                match self.filter.add(m) {
                    Ok(()) => self.multicast.push(m),
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        for m in self.unicast.clone() {
            if !want_uc.contains(&m) {
                match self.filter.set_unicast(m, false) {
                    Ok(()) => self.unicast.retain(|x| *x != m),
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        for m in want_uc {
            if !self.unicast.contains(&m) {
                match self.filter.set_unicast(m, true) {
                    Ok(()) => self.unicast.push(m),
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        let allmulti = f.allmulti();
        if allmulti != self.allmulti {
            match self.filter.set_allmulti(allmulti) {
                Ok(()) => self.allmulti = allmulti,
                Err(e) => errors.push(e.to_string()),
            }
        }
        let promisc = f.promisc || f.alluni();
        if promisc != self.promisc {
            match self.filter.set_promisc(promisc) {
                Ok(()) => self.promisc = promisc,
                Err(e) => errors.push(e.to_string()),
            }
        }
        match errors.first() {
            None if self.failing => {
                tracing::info!("the guest's receive filter applies again");
                self.failing = false;
            }
            None => {}
            Some(first) => {
                if !self.failing {
                    tracing::error!(
                        "cannot apply the guest's receive filter to the macvtap: {first} ({} \
                         errors)",
                        errors.len()
                    );
                }
                self.failing = true;
            }
        }
    }
}
