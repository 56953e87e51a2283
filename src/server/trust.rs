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
use crate::host::mcfilter::{McFilter, McFilterError};
use crate::host::MacAddr;
use crate::worker::l2::L2Stats;

/// Changes the macvtap's MAC (rtnetlink; a privileged helper once sealed).
pub type SetMac = Box<dyn FnMut(MacAddr) -> Result<(), String> + Send>;

/// The macvtap's receive filter as [`Trust`] changes it: [`McFilter`]'s packet-socket
/// memberships, or a recorder in tests.
pub(super) trait RxFilterSink: Send {
    /// Adds multicast `mac` to the list.
    fn add(&mut self, mac: [u8; 6]) -> Result<(), McFilterError>;
    /// Removes multicast `mac` that [`add`](Self::add) put there.
    fn remove(&mut self, mac: [u8; 6]) -> Result<(), McFilterError>;
    /// Adds (or removes) unicast `mac` to the secondary unicast list.
    fn set_unicast(&mut self, mac: [u8; 6], on: bool) -> Result<(), McFilterError>;
    /// Holds (or releases) allmulticast.
    fn set_allmulti(&mut self, on: bool) -> Result<(), McFilterError>;
    /// Holds (or releases) promiscuity.
    fn set_promisc(&mut self, on: bool) -> Result<(), McFilterError>;
}

impl RxFilterSink for McFilter {
    fn add(&mut self, mac: [u8; 6]) -> Result<(), McFilterError> {
        McFilter::add(self, mac)
    }
    fn remove(&mut self, mac: [u8; 6]) -> Result<(), McFilterError> {
        McFilter::remove(self, mac)
    }
    fn set_unicast(&mut self, mac: [u8; 6], on: bool) -> Result<(), McFilterError> {
        McFilter::set_unicast(self, mac, on)
    }
    fn set_allmulti(&mut self, on: bool) -> Result<(), McFilterError> {
        McFilter::set_allmulti(self, on)
    }
    fn set_promisc(&mut self, on: bool) -> Result<(), McFilterError> {
        McFilter::set_promisc(self, on)
    }
}

/// One filter QEMU reported for our NIC: applied with `trust` (`--trust-guest-rx-filters`);
/// without, a guest MAC other than `device_mac` is only counted and said once (in `l2`, shared
/// with the TX path's own detection).
pub(super) fn on_filter(
    trust: Option<&mut Trust>,
    f: &RxFilter,
    device_mac: MacAddr,
    l2: &L2Stats,
) {
    match trust {
        Some(t) => t.apply(f),
        None if f.mac != device_mac => l2.guest_left_its_mac(f.mac.0, device_mac.0),
        None => {}
    }
}

/// What has been applied to the macvtap so far.
pub(super) struct Trust {
    filter: Box<dyn RxFilterSink>,
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
        filter: impl RxFilterSink + 'static,
        set_mac: SetMac,
        guest_mac: Arc<SharedMac>,
        stats: Arc<L2Stats>,
    ) -> Trust {
        Trust {
            mac: MacAddr(guest_mac.get()),
            filter: Box::new(filter),
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;

    use super::*;

    /// The macvtap as a recording sink leaves it, and every call made.
    #[derive(Debug, Default)]
    struct State {
        calls: Vec<String>,
        multicast: Vec<[u8; 6]>,
        unicast: Vec<[u8; 6]>,
        allmulti: bool,
        promisc: bool,
        fail: bool,
    }

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<State>>);

    impl Recorder {
        fn state(&self) -> std::sync::MutexGuard<'_, State> {
            self.0.lock().unwrap()
        }

        fn call(&self, what: String) -> Result<(), McFilterError> {
            let mut s = self.state();
            s.calls.push(what);
            if s.fail {
                return Err(McFilterError::NoSuchInterface(7));
            }
            Ok(())
        }
    }

    impl RxFilterSink for Recorder {
        fn add(&mut self, mac: [u8; 6]) -> Result<(), McFilterError> {
            self.call(format!("add {}", MacAddr(mac)))?;
            self.state().multicast.push(mac);
            Ok(())
        }
        fn remove(&mut self, mac: [u8; 6]) -> Result<(), McFilterError> {
            self.call(format!("remove {}", MacAddr(mac)))?;
            self.state().multicast.retain(|m| *m != mac);
            Ok(())
        }
        fn set_unicast(&mut self, mac: [u8; 6], on: bool) -> Result<(), McFilterError> {
            self.call(format!("unicast {} {on}", MacAddr(mac)))?;
            let mut s = self.state();
            s.unicast.retain(|m| *m != mac);
            if on {
                s.unicast.push(mac);
            }
            Ok(())
        }
        fn set_allmulti(&mut self, on: bool) -> Result<(), McFilterError> {
            self.call(format!("allmulti {on}"))?;
            self.state().allmulti = on;
            Ok(())
        }
        fn set_promisc(&mut self, on: bool) -> Result<(), McFilterError> {
            self.call(format!("promisc {on}"))?;
            self.state().promisc = on;
            Ok(())
        }
    }

    const OWN: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const GROUP_A: [u8; 6] = [0x01, 0, 0x5e, 1, 2, 3];
    const GROUP_B: [u8; 6] = [0x33, 0x33, 0xff, 0, 0, 2];
    const GROUP_C: [u8; 6] = [0x01, 0, 0x5e, 1, 2, 4];

    struct Setup {
        trust: Trust,
        sink: Recorder,
        set_macs: Arc<Mutex<Vec<MacAddr>>>,
        guest_mac: Arc<SharedMac>,
        stats: Arc<L2Stats>,
    }

    fn setup() -> Setup {
        let sink = Recorder::default();
        let set_macs = Arc::new(Mutex::new(Vec::new()));
        let seen = set_macs.clone();
        let guest_mac = Arc::new(SharedMac::new(OWN));
        let stats = Arc::new(L2Stats::default());
        let trust = Trust::new(
            sink.clone(),
            Box::new(move |m| {
                seen.lock().unwrap().push(m);
                Ok(())
            }),
            guest_mac.clone(),
            stats.clone(),
        );
        Setup {
            trust,
            sink,
            set_macs,
            guest_mac,
            stats,
        }
    }

    /// The filter of a guest with its own MAC, normal modes and `multicast` listed.
    fn filter(multicast: &[[u8; 6]]) -> RxFilter {
        RxFilter {
            nic: "net0".into(),
            mac: MacAddr(OWN),
            promisc: false,
            unicast_mode: RxMode::Normal,
            unicast: Vec::new(),
            unicast_overflow: false,
            multicast_mode: RxMode::Normal,
            multicast: multicast.iter().map(|m| MacAddr(*m)).collect(),
            multicast_overflow: false,
        }
    }

    fn sorted(mut v: Vec<[u8; 6]>) -> Vec<[u8; 6]> {
        v.sort();
        v
    }

    #[test]
    fn trusted_multicast_list_replaces_the_previous_one() {
        let mut s = setup();
        s.trust.apply(&filter(&[GROUP_A, GROUP_B]));
        assert_eq!(
            sorted(s.sink.state().multicast.clone()),
            sorted(vec![GROUP_A, GROUP_B])
        );
        s.sink.state().calls.clear();
        s.trust.apply(&filter(&[GROUP_B, GROUP_C]));
        let st = s.sink.state();
        assert_eq!(sorted(st.multicast.clone()), sorted(vec![GROUP_B, GROUP_C]));
        // Only the difference: B stays held, never dropped and added again.
        assert_eq!(
            st.calls,
            vec!["remove 01:00:5e:01:02:03", "add 01:00:5e:01:02:04"]
        );
        assert!(!st.allmulti && !st.promisc);
    }

    #[test]
    fn the_same_filter_twice_changes_nothing_the_second_time() {
        let mut s = setup();
        let f = filter(&[GROUP_A]);
        s.trust.apply(&f);
        s.sink.state().calls.clear();
        s.trust.apply(&f);
        assert!(s.sink.state().calls.is_empty());
        assert!(s.set_macs.lock().unwrap().is_empty());
    }

    #[test]
    fn trusted_allmulticast_mode_turns_allmulti_on_and_off_and_holds_no_list_meanwhile() {
        let mut s = setup();
        s.trust.apply(&filter(&[GROUP_A]));
        let mut all = filter(&[GROUP_A]);
        all.multicast_mode = RxMode::All;
        s.trust.apply(&all);
        {
            let st = s.sink.state();
            assert!(st.allmulti);
            assert!(st.multicast.is_empty(), "{:?}", st.multicast);
        }
        s.trust.apply(&filter(&[GROUP_A]));
        {
            let st = s.sink.state();
            assert!(!st.allmulti);
            assert_eq!(st.multicast, vec![GROUP_A]);
        }
        // A list that overflowed QEMU's table means every group, too.
        let mut overflow = filter(&[]);
        overflow.multicast_overflow = true;
        s.trust.apply(&overflow);
        assert!(s.sink.state().allmulti);
        // `nomulti`: no group and no allmulticast.
        let mut none = filter(&[GROUP_A]);
        none.multicast_mode = RxMode::None;
        s.trust.apply(&none);
        let st = s.sink.state();
        assert!(!st.allmulti && st.multicast.is_empty());
    }

    #[test]
    fn trusted_promiscuous_mode_turns_promisc_on_and_off() {
        let mut s = setup();
        let mut promisc = filter(&[]);
        promisc.promisc = true;
        s.trust.apply(&promisc);
        assert!(s.sink.state().promisc);
        s.trust.apply(&filter(&[]));
        assert!(!s.sink.state().promisc);
        // All unicast (mode `all`, or an overflowing list) is promiscuity on a macvtap too.
        let mut alluni = filter(&[]);
        alluni.unicast_mode = RxMode::All;
        s.trust.apply(&alluni);
        assert!(s.sink.state().promisc);
        let mut overflow = filter(&[]);
        overflow.unicast_overflow = true;
        s.trust.apply(&overflow);
        assert!(s.sink.state().promisc);
        s.trust.apply(&filter(&[]));
        let st = s.sink.state();
        assert!(!st.promisc);
        let promisc_calls: Vec<&str> = st
            .calls
            .iter()
            .map(String::as_str)
            .filter(|c| c.starts_with("promisc"))
            .collect();
        assert_eq!(
            promisc_calls,
            [
                "promisc true",
                "promisc false",
                "promisc true",
                "promisc false"
            ],
            "one reference per change, never one per filter (five filters)"
        );
    }

    #[test]
    fn trusted_unicast_list_follows_the_guests() {
        let mut s = setup();
        let extra = [0x02, 0, 0, 0, 0, 0x10];
        let other = [0x02, 0, 0, 0, 0, 0x11];
        let mut f = filter(&[]);
        f.unicast = vec![MacAddr(extra)];
        s.trust.apply(&f);
        assert_eq!(s.sink.state().unicast, vec![extra]);
        f.unicast = vec![MacAddr(other)];
        s.trust.apply(&f);
        assert_eq!(s.sink.state().unicast, vec![other]);
        f.unicast_mode = RxMode::None;
        s.trust.apply(&f);
        assert!(s.sink.state().unicast.is_empty());
    }

    #[test]
    fn trusted_mac_change_moves_the_macvtap_and_the_tx_watchs_mac() {
        let mut s = setup();
        let new = MacAddr([0x02, 0x6d, 0x76, 0x68, 0, 0x98]);
        let mut f = filter(&[]);
        f.mac = new;
        s.trust.apply(&f);
        s.trust.apply(&f);
        assert_eq!(*s.set_macs.lock().unwrap(), vec![new], "set once");
        assert_eq!(s.guest_mac.get(), new.0);
        assert_eq!(s.stats.guest_mac_changes_applied.load(Ordering::Relaxed), 1);
        assert_eq!(s.stats.guest_mac_changes_seen.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_filter_the_macvtap_refused_is_retried_by_the_next_one() {
        let mut s = setup();
        s.sink.state().fail = true;
        let mut f = filter(&[GROUP_A]);
        f.promisc = true;
        s.trust.apply(&f);
        assert!(s.sink.state().multicast.is_empty());
        s.sink.state().fail = false;
        s.trust.apply(&f);
        let st = s.sink.state();
        assert_eq!(st.multicast, vec![GROUP_A]);
        assert!(st.promisc);
    }

    #[test]
    fn untrusted_filter_applies_nothing_and_only_counts_the_guests_mac_change() {
        let stats = L2Stats::default();
        let mut f = filter(&[GROUP_A]);
        f.promisc = true;
        f.multicast_mode = RxMode::All;
        on_filter(None, &f, MacAddr(OWN), &stats);
        assert_eq!(stats.snapshot().guest_mac_changes_seen, 0, "its own MAC");
        let new = MacAddr([0x02, 0x6d, 0x76, 0x68, 0, 0x98]);
        f.mac = new;
        for _ in 0..3 {
            on_filter(None, &f, MacAddr(OWN), &stats);
        }
        let snap = stats.snapshot();
        assert_eq!(snap.guest_mac_changes_seen, 1, "once per new MAC");
        assert_eq!(snap.guest_mac_changes_applied, 0);
    }

    #[test]
    fn trusted_filter_goes_to_the_trust_and_counts_no_foreign_mac() {
        let mut s = setup();
        let mut f = filter(&[GROUP_A]);
        f.mac = MacAddr([0x02, 0x6d, 0x76, 0x68, 0, 0x98]);
        on_filter(Some(&mut s.trust), &f, MacAddr(OWN), &s.stats);
        assert_eq!(s.sink.state().multicast, vec![GROUP_A]);
        let snap = s.stats.snapshot();
        assert_eq!(
            (snap.guest_mac_changes_seen, snap.guest_mac_changes_applied),
            (0, 1)
        );
    }
}
