//! `mcast_report`: the IGMP/MLD report parser and the membership table (`datapath::mcast`),
//! with a tiny cap and a clock taken from the input.
//!
//! # Input
//! Header: `cap` (u8, taken modulo 9), `max_age` (u8 seconds, at least 1), `overflow_hold` (u8
//! seconds). Then up to [`MAX_OPS`] ops, each a leading byte (modulo 4) and a time step `dt`
//! (u16, milliseconds × 10):
//! - 0 raw frame: `len` (u16 mod 2048), `prefix` (u16), `flags` (u8: bit 0 recompute the
//!   checksums where the parser reads them, bit 1 claim a wire length 64 bytes past the data),
//!   then `len` bytes;
//! - 1 built report: `kind` (u8 mod 7: IGMPv2 report, IGMPv2 leave, IGMPv3, MLDv1 report,
//!   MLDv1 done, MLDv2 with and without hop-by-hop), `vlan` (u8, 0 = untagged), `records` (u8
//!   mod 8) × (`type` u8 mod 8, `group` u8, `sources` u8 mod 3), then one byte patch (`at` u16,
//!   `value` u8; `at` ≥ 0x8000 means none) and `flags` as for op 0;
//! - 2 expire;
//! - 3 clear (a frontend disconnect).
//!
//! Groups come from a space of 16 per family where pairs share a MAC (224.0.0.x and
//! 239.128.0.x), so refcounts, the cap and expiry all get exercised.
//!
//! # Oracles
//! - Parser: a `Report` verdict emits exactly `records` memberships, anything else none; every
//!   membership's MAC is its group's, its group is multicast and not node-local; `NotMulticast`
//!   exactly when the destination MAC is not an IP multicast MAC; `Incomplete` only when the
//!   prefix is shorter than the frame, with `needed` past the prefix and within the frame;
//!   parsing a prefix gives the full frame's verdict and memberships, or `Incomplete`.
//! - `MembershipTable::learn` agrees with `parse_report`.
//! - Table against a model (a map of (VLAN, group) → last report with the same cap and expiry
//!   rules): same memberships after every op; applying every diff to a set of installed MACs
//!   never adds an installed MAC or removes an absent one, and gives the table's MACs, which
//!   are exactly the model's groups' MACs; allmulticast changes only flip it, it is on after an
//!   op that had a join refused (with a hold above zero) and off when no join was refused since
//!   the last clear, and the diff's vectors never grow past the capacity they were built with
//!   (no allocation).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::cursor::Cursor;
use crate::datapath::mcast::frames::{self, Record};
use crate::datapath::mcast::{
    is_ip_multicast_mac, parse_report, Diff, GroupAddr, Membership, MembershipTable, TableConfig,
    Verdict,
};

/// Most ops one input runs.
pub const MAX_OPS: usize = 64;
/// Largest raw frame.
const MAX_FRAME: usize = 2048;

/// Runs one `mcast_report` input (see the module doc).
pub fn mcast_report(data: &[u8]) {
    let mut c = Cursor::new(data);
    let cap = usize::from(c.u8() % 9);
    let max_age = Duration::from_secs(u64::from(c.u8().max(1)));
    let hold = Duration::from_secs(u64::from(c.u8()));
    let mut h = Harness::new(cap, max_age, hold);
    for _ in 0..MAX_OPS {
        if c.is_empty() {
            break;
        }
        let op = c.u8() % 4;
        h.now += Duration::from_millis(u64::from(c.u16()) * 10);
        match op {
            0 => {
                let len = usize::from(c.u16()) % MAX_FRAME;
                let prefix = usize::from(c.u16());
                let flags = c.u8();
                let mut f = c.bytes(len).to_vec();
                h.frame(&mut f, prefix, flags);
            }
            1 => {
                let mut f = built_report(&mut c);
                let at = c.u16();
                let value = c.u8();
                let flags = c.u8();
                if at < 0x8000 && !f.is_empty() {
                    let i = usize::from(at) % f.len();
                    f[i] = value;
                }
                h.frame(&mut f, usize::MAX, flags);
            }
            2 => h.expire(),
            _ => h.clear(),
        }
    }
}

fn group(fam_v6: bool, i: u8) -> GroupAddr {
    let i = i % 16;
    if fam_v6 {
        frames::v6(&format!("ff0e::{:x}", i))
    } else if i < 8 {
        frames::v4(224, 0, 0, 100 + i)
    } else {
        // Same MACs as 224.0.0.100..107.
        frames::v4(239, 128, 0, 100 + i - 8)
    }
}

fn built_report(c: &mut Cursor<'_>) -> Vec<u8> {
    let kind = c.u8() % 7;
    let vid = c.u8();
    let vlan = (vid != 0).then_some(u16::from(vid));
    let n = c.u8() % 8;
    let v6 = kind >= 3;
    let recs: Vec<Record> = (0..n)
        .map(|_| {
            let rtype = c.u8() % 8;
            let g = c.u8();
            let nsrc = u16::from(c.u8() % 3);
            Record::new(rtype, group(v6, g), nsrc)
        })
        .collect();
    let first = recs.first().map_or(group(v6, 0), |r| r.group);
    match kind {
        0 => frames::igmp_v2(0x16, first, vlan),
        1 => frames::igmp_v2(0x17, first, vlan),
        2 => frames::igmpv3_report(&recs, vlan),
        3 => frames::mld_v1(131, first, vlan),
        4 => frames::mld_v1(132, first, vlan),
        5 => frames::mldv2_report(&recs, true, vlan),
        _ => frames::mldv2_report(&recs, false, vlan),
    }
}

struct Harness {
    table: MembershipTable,
    diff: Diff,
    diff_caps: (usize, usize),
    cap: usize,
    max_age: Duration,
    now: Duration,
    /// The model: (VLAN, group) → last report.
    model: BTreeMap<(Option<u16>, GroupAddr), Duration>,
    /// MACs on the "macvtap": every diff applied.
    installed: BTreeSet<[u8; 6]>,
    allmulti: bool,
    /// A join was refused since the last clear.
    refused: bool,
    /// A join was refused in the current op.
    refused_now: bool,
    hold: Duration,
}

impl Harness {
    fn new(cap: usize, max_age: Duration, hold: Duration) -> Harness {
        let table = MembershipTable::new(TableConfig {
            max_groups: cap,
            max_age,
            overflow_hold: hold,
        });
        let diff = Diff::with_capacity(cap);
        let diff_caps = (diff.add.capacity(), diff.remove.capacity());
        Harness {
            table,
            diff,
            diff_caps,
            cap,
            max_age,
            now: Duration::ZERO,
            model: BTreeMap::new(),
            installed: BTreeSet::new(),
            allmulti: false,
            refused: false,
            refused_now: false,
            hold,
        }
    }

    fn frame(&mut self, f: &mut [u8], prefix: usize, flags: u8) {
        if flags & 1 != 0 {
            frames::fix_checksums(f);
        }
        let wire = f.len() + if flags & 2 != 0 { 64 } else { 0 };
        let copy = &f[..prefix.min(f.len())];

        let mut full_ms = Vec::new();
        let full = parse_report(f, wire, |m| full_ms.push(m));
        check_verdict(f, wire, &full, &full_ms);
        let mut ms = Vec::new();
        let v = parse_report(copy, wire, |m| ms.push(m));
        check_verdict(copy, wire, &v, &ms);
        if v != full {
            match v {
                Verdict::Incomplete { needed } => {
                    assert!(needed > copy.len(), "Incomplete within the prefix: {v:?}");
                }
                _ => panic!(
                    "prefix {} of {wire}: {v:?}, full frame: {full:?}",
                    copy.len()
                ),
            }
        } else {
            assert_eq!(ms, full_ms, "prefix and full frame emit the same");
        }

        if super::tracing() {
            eprintln!(
                "t={:?} frame {} B (prefix {}, wire {wire}): {v:?} {ms:?}",
                self.now,
                f.len(),
                copy.len()
            );
        }
        let learned = self.table.learn(copy, wire, self.now, &mut self.diff);
        assert_eq!(learned, v, "learn agrees with parse_report");
        for m in &ms {
            self.model_apply(m);
        }
        self.settle();
    }

    fn model_apply(&mut self, m: &Membership) {
        let key = (m.vlan, m.group);
        if m.joined {
            if self.model.contains_key(&key) || self.model.len() < self.cap {
                self.model.insert(key, self.now);
            } else {
                self.refused = true;
                self.refused_now = true;
            }
        } else {
            self.model.remove(&key);
        }
    }

    fn expire(&mut self) {
        self.table.expire(self.now, &mut self.diff);
        let (now, max_age) = (self.now, self.max_age);
        self.model
            .retain(|_, seen| now.saturating_sub(*seen) < max_age);
        self.settle();
    }

    fn clear(&mut self) {
        self.table.clear(&mut self.diff);
        self.model.clear();
        self.refused = false;
        self.settle();
        assert!(
            self.installed.is_empty() && !self.allmulti,
            "clear leaves nothing"
        );
    }

    /// Applies the diff to the model "macvtap" and checks the table against the model.
    fn settle(&mut self) {
        if super::tracing() {
            eprintln!("  diff {:02x?} → {:?}", self.diff, self.table.counters());
        }
        assert_eq!(
            (self.diff.add.capacity(), self.diff.remove.capacity()),
            self.diff_caps,
            "the diff reallocated"
        );
        for m in &self.diff.add {
            assert!(self.installed.insert(*m), "{m:02x?} added twice");
        }
        for m in &self.diff.remove {
            assert!(self.installed.remove(m), "{m:02x?} removed but absent");
        }
        if let Some(on) = self.diff.allmulti {
            assert_ne!(on, self.allmulti, "allmulti 'change' to the same state");
            self.allmulti = on;
        }
        self.diff.clear();
        assert_eq!(self.allmulti, self.table.allmulti());
        // Within one op the clock stands still, so a hold > 0 cannot be over.
        if self.refused_now && self.hold > Duration::ZERO {
            assert!(self.allmulti, "a join was refused and allmulti is off");
        }
        self.refused_now = false;
        if !self.refused {
            assert!(!self.allmulti, "allmulti without a refused join");
        }
        let have: BTreeSet<_> = self.table.memberships().collect();
        let want: BTreeSet<_> = self.model.keys().copied().collect();
        assert_eq!(have, want, "table vs model");
        let macs: BTreeSet<_> = self.table.macs().collect();
        let want_macs: BTreeSet<_> = self.model.keys().map(|(_, g)| g.mac()).collect();
        assert_eq!(macs, want_macs);
        assert_eq!(self.installed, macs, "applied diffs vs table");
        assert_eq!(self.table.counters().groups, self.model.len() as u64);
        assert!(self.table.groups() <= self.cap);
    }
}

fn check_verdict(f: &[u8], wire: usize, v: &Verdict, ms: &[Membership]) {
    let b = &f[..f.len().min(wire)];
    match v {
        Verdict::Report { records, .. } => assert_eq!(usize::from(*records), ms.len()),
        _ => assert!(ms.is_empty(), "{v:?} emitted {ms:?}"),
    }
    for m in ms {
        assert_eq!(m.mac, m.group.mac());
        assert!(m.group.is_multicast(), "{m:?}");
        if let GroupAddr::V6(a) = m.group {
            assert!(a[1] & 0x0f > 1, "node-local group emitted: {m:?}");
        }
    }
    let short_prefix = b.len() < 4 && wire > b.len();
    assert_eq!(
        matches!(v, Verdict::NotMulticast),
        !is_ip_multicast_mac(b) && !short_prefix,
        "{v:?} for dst {:02x?}",
        &b[..b.len().min(6)]
    );
    if let Verdict::Incomplete { needed } = v {
        assert!(b.len() < wire, "Incomplete with the whole frame");
        assert!(
            *needed > b.len() && *needed <= wire,
            "needed {needed}, have {}",
            b.len()
        );
    }
}
