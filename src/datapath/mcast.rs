//! Guest multicast membership following: IGMP/MLD report parsing, a bounded membership table,
//! and general-query frames toward the guest.
//!
//! macvlan (and so macvtap) delivers a multicast frame only when its group MAC is in the
//! macvtap's multicast list. The guest's groups never get there by themselves (under vhost-user
//! the frontend keeps the control virtqueue), so the guest misses IPv6 neighbour solicitations
//! for its non-EUI-64 addresses and every IPv4/IPv6 group it joins. The guest announces its
//! groups in IGMP/MLD reports it transmits; this module reads them on the TX path and keeps the
//! list the caller applies to the macvtap (`host::mcfilter`). The frames themselves go on to the
//! wire unchanged.
//!
//! # Parser contract ([`parse_report`])
//! - Input: the Ethernet frame as the guest sent it (after the vnet header), **copied** out of
//!   guest memory: the walk reads some fields twice (checksum, then records, then records
//!   again to emit), which is only sound on bytes the guest can no longer change. The caller
//!   may pass only a prefix (say [`COPY_LEN`] bytes) plus the frame's real length; every
//!   length field is bounded by both. When a report is longer than the prefix the
//!   verdict is [`Verdict::Incomplete`] with the length needed: the caller may copy that much
//!   (at most the frame) and call again, or count it and move on.
//! - Fast reject: the destination MAC is looked at first; only `01:00:5e:00-7f` (IPv4) and
//!   `33:33` (IPv6) go further ([`is_ip_multicast_mac`]). Unicast and broadcast frames cost two
//!   byte compares.
//! - Tags: one 802.1Q or 802.1ad tag is parsed through (a guest with VLAN sub-interfaces joins
//!   groups on each), and memberships carry the VLAN id (VID 0, a priority tag, counts as
//!   untagged). Two tags (QinQ) are not followed: [`Verdict::NotAReport`].
//! - IPv4: version 4, IHL ≥ 5 and within the frame, total length ≥ header and ≤ frame, header
//!   checksum, not a fragment, protocol 2. Options (Router Alert) are allowed. IGMP checksum over
//!   the whole IP payload. Types 0x12 (v1 report), 0x16 (v2 report), 0x17 (v2 leave), 0x22 (v3
//!   report); 0x11 is [`Verdict::Query`]; other IGMP types are not reports.
//! - IPv6: next header 58, or 0 (hop-by-hop, bounded by the payload) then 58; other extension
//!   headers are not followed ([`Verdict::NotAReport`]: no stack sends MLD behind them).
//!   ICMPv6 checksum with the pseudo-header. Types 131 (MLDv1 report), 132 (MLDv1 done),
//!   143 (MLDv2 report); 130 is [`Verdict::Query`]; other ICMPv6 (ND, RA...) is not a report.
//! - v3/MLDv2 records: every count (records, sources, aux words) is bounded by the message.
//!   Meaning for link-layer filtering (RFC 3376 §4.2.12 and §6.4, RFC 3810 §5.2.12): INCLUDE
//!   with no sources (`IS_IN({})`, `TO_IN({})`) is "not a member", EXCLUDE and INCLUDE with
//!   sources are "member"; `ALLOW(B)` with sources is "member"; `BLOCK(B)` says nothing we can
//!   use without tracking sources, so it is ignored (an SSM group left with `BLOCK` only, as Linux
//!   does for INCLUDE-mode groups, then ends by expiry). Unknown record types are ignored (RFC
//!   3376 §4.2.12: "silently ignored"); so are IPv6 groups of scope 0 or 1, which never leave
//!   the node.
//! - A report is checked whole before any membership is emitted: a malformed one emits none.
//!   [`Verdict::Malformed`] only for frames that claim to be IGMP (protocol 2) or may be MLD
//!   (next header 0 or 58); anything else broken is just not a report.
//! - No allocation: memberships go to a callback.
//!
//! # Groups the guest does not report
//! Hosts never report 224.0.0.1 (all-hosts) and ff02::1 (all-nodes), so they are never learned,
//! and need not be: the macvtap has both in its own list, because the kernel joins them on the
//! device itself when it creates its IPv4 and IPv6 state, even with `disable_ipv6=1`
//! (`host::mcfilter`'s tests check it). Only a host kernel booted with `ipv6.disable=1` lacks
//! all-nodes (router advertisements go there); the caller would have to add
//! `33:33:00:00:00:01` then. The macvtap's own solicited-node group is also the guest's EUI-64
//! one, since they share the MAC.
//!
//! # Membership table ([`MembershipTable`])
//! Pure logic with the time passed in, pre-allocated for its cap (default
//! [`DEFAULT_MAX_GROUPS`] groups), no allocation per update. Keyed by (VLAN, IP group); a MAC
//! is installed while at least one group maps to it (32 IPv4 groups share a MAC). Every call
//! appends to a caller-owned [`Diff`] (MACs to add, MACs to remove, allmulti on/off) that the
//! caller applies to the macvtap; after every diff is applied the macvtap's list equals
//! [`MembershipTable::macs`].
//!
//! - Leave: at once. The guest's kernel sends a leave only when its last socket leaves, and the
//!   guest is the only member behind its macvtap, so no group-specific query is needed.
//! - Expiry: a group not re-reported within `max_age` is removed by [`MembershipTable::expire`]
//!   (call it at [`MembershipTable::next_deadline`] or every second). The default
//!   [`DEFAULT_MEMBERSHIP_TIMEOUT`] is the Group Membership Interval of RFC 3376 §8.4 / RFC 3810
//!   §9.4: robustness 2 × query interval 125 s + query response interval 10 s = 260 s. A group
//!   stays at most `max_age` + the caller's expiry period after its last report.
//! - **Expiry needs queries.** A guest re-reports only when queried, and many links have no
//!   querier; in IGMPv2/MLDv1 mode a guest also suppresses its report when it hears another
//!   host's. So the caller must send its own general query toward the guest
//!   ([`igmpv3_general_query`], [`mldv2_general_query`], on virtio RX only, never on the wire)
//!   at connection start (with a 1 s max response: memberships come back in about a second,
//!   not minutes) and every [`QUERY_INTERVAL`] (10 s max response). Other hosts answer the
//!   link's querier, not ours, so the guest's answer to ours is not suppressed.
//! - Cap: a join past the cap is refused (counted) and the table goes to allmulticast, reported
//!   once in the diff. It leaves allmulticast when the group count is below the cap and no join
//!   was refused for `overflow_hold` (default: `max_age`): by then every group the guest still
//!   has was re-reported and stored, so turning allmulticast off loses none.
//! - [`MembershipTable::clear`] (frontend disconnect) empties the table and returns the diff
//!   that removes everything.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::time::Duration;

use serde::Serialize;

/// How many bytes of a candidate frame the caller should copy before calling [`parse_report`]:
/// every report of a guest with an MTU up to 2030 fits, VLAN tag included (stacks size reports
/// to the MTU; a jumbo-MTU guest with many groups can send longer ones, which come back as
/// [`Verdict::Incomplete`]).
pub const COPY_LEN: usize = 2048;

/// Groups per device by default (the `--max-groups`-style cap).
pub const DEFAULT_MAX_GROUPS: usize = 256;
/// The largest cap a table accepts (memory: about 100 bytes per group).
pub const MAX_GROUPS_LIMIT: usize = 65_536;

/// Robustness variable (RFC 3376 §8.1, RFC 3810 §9.1); our queries carry it in their 3-bit QRV.
pub const ROBUSTNESS: u8 = 2;
/// Query interval (RFC 3376 §8.2, RFC 3810 §9.2).
pub const QUERY_INTERVAL: Duration = Duration::from_secs(125);
/// Query response interval: the max response time our periodic queries carry.
pub const QUERY_RESPONSE_INTERVAL: Duration = Duration::from_secs(10);
/// The max response time of the first query after a frontend connects: the guest's groups are
/// back on the macvtap about a second after a restart or a take-over, not up to 10 s (a querier
/// picks its max response time, RFC 3376 §8.3; the guest only spreads its reports less).
pub const STARTUP_QUERY_RESPONSE_INTERVAL: Duration = Duration::from_secs(1);
/// Group membership interval = robustness × query interval + query response interval (260 s).
pub const DEFAULT_MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(
    ROBUSTNESS as u64 * QUERY_INTERVAL.as_secs() + QUERY_RESPONSE_INTERVAL.as_secs(),
);

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_IGMP: u8 = 2;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMPV6: u8 = 58;

const IGMP_QUERY: u8 = 0x11;
const IGMPV1_REPORT: u8 = 0x12;
const IGMPV2_REPORT: u8 = 0x16;
const IGMPV2_LEAVE: u8 = 0x17;
const IGMPV3_REPORT: u8 = 0x22;

const MLD_QUERY: u8 = 130;
const MLDV1_REPORT: u8 = 131;
const MLDV1_DONE: u8 = 132;
const MLDV2_REPORT: u8 = 143;

// Group record types (RFC 3376 §4.2.12, RFC 3810 §5.2.12).
const MODE_IS_INCLUDE: u8 = 1;
const MODE_IS_EXCLUDE: u8 = 2;
const CHANGE_TO_INCLUDE: u8 = 3;
const CHANGE_TO_EXCLUDE: u8 = 4;
const ALLOW_NEW_SOURCES: u8 = 5;
const BLOCK_OLD_SOURCES: u8 = 6;

// -----------------------------------------------------------------------------------------------
// Types

/// An IP multicast group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupAddr {
    /// An IPv4 group (IGMP), network byte order.
    V4([u8; 4]),
    /// An IPv6 group (MLD), network byte order.
    V6([u8; 16]),
}

impl GroupAddr {
    /// The group's link-layer address: `01:00:5e` + low 23 bits (RFC 1112 §6.4), `33:33` + low
    /// 32 bits (RFC 2464 §7).
    pub fn mac(&self) -> [u8; 6] {
        match self {
            GroupAddr::V4(a) => [0x01, 0x00, 0x5e, a[1] & 0x7f, a[2], a[3]],
            GroupAddr::V6(a) => [0x33, 0x33, a[12], a[13], a[14], a[15]],
        }
    }

    /// 224.0.0.0/4 or ff00::/8.
    pub fn is_multicast(&self) -> bool {
        match self {
            GroupAddr::V4(a) => a[0] & 0xf0 == 0xe0,
            GroupAddr::V6(a) => a[0] == 0xff,
        }
    }
}

impl std::fmt::Display for GroupAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupAddr::V4(a) => std::net::Ipv4Addr::from(*a).fmt(f),
            GroupAddr::V6(a) => std::net::Ipv6Addr::from(*a).fmt(f),
        }
    }
}

/// One membership statement of a report: the guest is (`joined`) or is no longer a member of
/// `group` on `vlan` (`None`: untagged or priority-tagged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    /// The VID of the report's one tag (802.1Q or 802.1ad); `None` untagged or VID 0.
    pub vlan: Option<u16>,
    /// The group, checked to be multicast.
    pub group: GroupAddr,
    /// `group.mac()`.
    pub mac: [u8; 6],
    /// Join (a report, EXCLUDE, or INCLUDE/ALLOW with sources) or leave (a leave/done, or
    /// INCLUDE with no source).
    pub joined: bool,
}

/// The header a frame ended inside of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Layer {
    /// The 20-byte IPv4 header.
    Ipv4,
    /// The 40-byte IPv6 header.
    Ipv6,
    /// The IPv6 hop-by-hop options header (MLD carries the router alert in it).
    HopByHop,
    /// The IGMP message.
    Igmp,
    /// The MLD message (ICMPv6).
    Mld,
}

/// Why a report was dropped without learning anything. The guest is at fault in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MalformedReport {
    /// The frame ends inside a header that must be whole.
    #[error("guest report: frame ends inside the {0:?} header")]
    Truncated(Layer),
    /// The IPv4 header's version field is not 4.
    #[error("guest report: IPv4 version field is {0}")]
    Ipv4Version(u8),
    /// The IPv4 IHL (in bytes) is below the minimum or runs past the frame.
    #[error("guest report: IPv4 header length {0} bytes is below 20 or beyond the frame")]
    Ipv4HeaderLength(usize),
    /// The IPv4 total length is below the header length or past the frame.
    #[error("guest report: IPv4 total length {0} is below the header or beyond the frame")]
    Ipv4TotalLength(usize),
    /// The IPv4 header checksum does not verify.
    #[error("guest report: bad IPv4 header checksum")]
    Ipv4HeaderChecksum,
    /// A fragment (MF set or an offset): reports are never fragmented, and a fragment cannot
    /// be parsed alone.
    #[error("guest report: IPv4 fragment")]
    Ipv4Fragment,
    /// The IPv6 header's version field is not 6.
    #[error("guest report: IPv6 version field is {0}")]
    Ipv6Version(u8),
    /// The IPv6 payload length is 0 (a jumbogram, never a report) or past the frame.
    #[error("guest report: IPv6 payload length {0} is zero (jumbogram) or beyond the frame")]
    Ipv6PayloadLength(usize),
    /// The hop-by-hop header's length field runs past the IPv6 payload.
    #[error("guest report: hop-by-hop header runs past the IPv6 payload")]
    HopByHopBeyondPayload,
    /// The IGMP checksum does not verify.
    #[error("guest report: bad IGMP checksum")]
    IgmpChecksum,
    /// The ICMPv6 checksum (over the pseudo-header) does not verify.
    #[error("guest report: bad ICMPv6 checksum")]
    Icmpv6Checksum,
    /// The record count announces more records than the message holds.
    #[error("guest report: {0} group records announced, the message ends before them")]
    RecordCountBeyondMessage(u16),
    /// A record's source count runs past the message.
    #[error("guest report: a group record's source list runs past the message")]
    SourcesBeyondMessage,
    /// A record's auxiliary data length runs past the message.
    #[error("guest report: a group record's auxiliary data runs past the message")]
    AuxDataBeyondMessage,
    /// A report names a unicast (or unspecified) address as a group; nothing of the report is
    /// learned, even from its valid records.
    #[error("guest report: group {0} is not a multicast address")]
    GroupNotMulticast(GroupAddr),
}

/// What [`parse_report`] made of a frame (for the caller's counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Destination MAC is not an IP multicast MAC (the unicast hot path).
    NotMulticast,
    /// IP multicast, but not IGMP/MLD membership traffic (UDP streams, ND, QinQ...).
    NotAReport,
    /// An IGMP or MLD query (a guest acting as querier); nothing learned.
    Query,
    /// A valid report: `records` memberships went to the callback, `ignored` records carried
    /// nothing usable (BLOCK, empty ALLOW, unknown record type, node-local scope).
    Report {
        /// Memberships passed to the callback.
        records: u16,
        /// Records skipped.
        ignored: u16,
    },
    /// The report is longer than the prefix given: `needed` bytes of the frame are required.
    Incomplete {
        /// Frame bytes needed to parse it (at most the frame's length).
        needed: usize,
    },
    /// A report (or what can only be one) that is broken; nothing learned.
    Malformed(MalformedReport),
}

// -----------------------------------------------------------------------------------------------
// Parser

/// True for `01:00:5e` with the next bit clear (IPv4 multicast) and `33:33` (IPv6 multicast).
/// Needs the first four bytes of the frame; shorter input is not IPv4 multicast.
#[inline]
pub fn is_ip_multicast_mac(dst: &[u8]) -> bool {
    match dst {
        [0x33, 0x33, ..] => true,
        [0x01, 0x00, 0x5e, b3, ..] => b3 & 0x80 == 0,
        _ => false,
    }
}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Ones'-complement sum of `data` (16-bit big-endian words, odd byte padded) added to `acc`,
/// not folded.
fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // The loop leaves no bit above 15.
    #[allow(clippy::cast_possible_truncation)]
    let sum = acc as u16;
    sum
}

/// The Internet checksum of `data`, to store in a zeroed checksum field.
fn checksum(data: &[u8], init: u64) -> u16 {
    !fold(sum16(data, init))
}

/// The IPv6 pseudo-header sum for an upper-layer message of `len` bytes and next header `nh`.
fn pseudo_sum(src: &[u8], dst: &[u8], len: usize, nh: u8) -> u64 {
    let acc = sum16(dst, sum16(src, 0));
    acc + (len as u64 >> 16) + (len as u64 & 0xffff) + u64::from(nh)
}

/// Which family the record walk is for.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// Fixed part of a group record, address size (records and sources).
    fn record_sizes(self) -> (usize, usize) {
        match self {
            Family::V4 => (8, 4),
            Family::V6 => (20, 16),
        }
    }

    fn group(self, b: &[u8]) -> GroupAddr {
        match self {
            Family::V4 => GroupAddr::V4([b[0], b[1], b[2], b[3]]),
            Family::V6 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(&b[..16]);
                GroupAddr::V6(a)
            }
        }
    }
}

/// What one record means for link-layer filtering: `Some(joined)` or `None` (no information).
fn record_meaning(rtype: u8, nsrc: usize) -> Option<bool> {
    match rtype {
        MODE_IS_INCLUDE | CHANGE_TO_INCLUDE => Some(nsrc > 0),
        MODE_IS_EXCLUDE | CHANGE_TO_EXCLUDE => Some(true),
        ALLOW_NEW_SOURCES if nsrc > 0 => Some(true),
        // Without the source lists we cannot tell whether BLOCK empties an INCLUDE set.
        BLOCK_OLD_SOURCES => None,
        // Empty ALLOW, unknown types.
        _ => None,
    }
}

/// Groups that never leave the node (IPv6 scope 0 reserved, 1 interface-local).
fn node_local(g: &GroupAddr) -> bool {
    matches!(g, GroupAddr::V6(a) if a[1] & 0x0f <= 1)
}

/// Walks `nrec` v3/MLDv2 group records in `body`: `f(rtype, nsrc, group)` for each, after the
/// bounds of that record were checked. Every step consumes at least one record header, so the
/// walk ends within `body.len() / header` steps whatever `nrec` says.
fn walk_records(
    body: &[u8],
    nrec: u16,
    fam: Family,
    mut f: impl FnMut(u8, usize, GroupAddr) -> Result<(), MalformedReport>,
) -> Result<(), MalformedReport> {
    let (hdr, addr) = fam.record_sizes();
    let mut pos = 0usize;
    for _ in 0..nrec {
        if body.len() - pos < hdr {
            return Err(MalformedReport::RecordCountBeyondMessage(nrec));
        }
        let rtype = body[pos];
        let aux = usize::from(body[pos + 1]) * 4;
        let nsrc = usize::from(be16(body, pos + 2));
        let group = fam.group(&body[pos + 4..pos + 4 + addr]);
        let sources = nsrc * addr;
        let rest = body.len() - pos - hdr;
        if sources > rest {
            return Err(MalformedReport::SourcesBeyondMessage);
        }
        if aux > rest - sources {
            return Err(MalformedReport::AuxDataBeyondMessage);
        }
        f(rtype, nsrc, group)?;
        pos += hdr + sources + aux;
    }
    Ok(())
}

/// Checks then emits the records of a v3/MLDv2 report.
fn records(
    body: &[u8],
    nrec: u16,
    fam: Family,
    vlan: Option<u16>,
    visit: &mut impl FnMut(Membership),
) -> Result<Verdict, MalformedReport> {
    // Pass 1: bounds and groups, so that a bad record anywhere emits nothing.
    walk_records(body, nrec, fam, |_, _, g| {
        if g.is_multicast() {
            Ok(())
        } else {
            Err(MalformedReport::GroupNotMulticast(g))
        }
    })?;
    let (mut records, mut ignored) = (0u16, 0u16);
    walk_records(body, nrec, fam, |rtype, nsrc, group| {
        match record_meaning(rtype, nsrc) {
            Some(joined) if !node_local(&group) => {
                records += 1;
                visit(Membership {
                    vlan,
                    group,
                    mac: group.mac(),
                    joined,
                });
            }
            _ => ignored += 1,
        }
        Ok(())
    })?;
    Ok(Verdict::Report { records, ignored })
}

/// One group of a v1/v2 message.
fn single(
    group: GroupAddr,
    joined: bool,
    vlan: Option<u16>,
    visit: &mut impl FnMut(Membership),
) -> Result<Verdict, MalformedReport> {
    if !group.is_multicast() {
        return Err(MalformedReport::GroupNotMulticast(group));
    }
    if node_local(&group) {
        return Ok(Verdict::Report {
            records: 0,
            ignored: 1,
        });
    }
    visit(Membership {
        vlan,
        group,
        mac: group.mac(),
        joined,
    });
    Ok(Verdict::Report {
        records: 1,
        ignored: 0,
    })
}

/// Bounds of the input: `b` is the prefix the caller copied (cut at `wire`), `wire` the frame's
/// real length.
struct Input<'a> {
    b: &'a [u8],
    wire: usize,
}

impl Input<'_> {
    /// Bytes up to `end` are readable. Past the frame: `past`; past the prefix only: Incomplete.
    fn need(&self, end: usize, past: Verdict) -> Result<(), Verdict> {
        if end > self.wire {
            Err(past)
        } else if end > self.b.len() {
            Err(Verdict::Incomplete { needed: end })
        } else {
            Ok(())
        }
    }
}

/// A parse step: `Ok` is the verdict of a frame read to its end, `Err` one that ends the parse
/// early (not a report, malformed, incomplete); either is the frame's verdict.
type Step = Result<Verdict, Verdict>;

/// The fixed part of an IP header, as far as telling a report goes.
struct IpFixed {
    /// Offset of the byte that names the protocol (IPv4 protocol, IPv6 next header).
    proto_at: usize,
    /// Length of the fixed header.
    len: usize,
    version: u8,
    layer: Layer,
    bad_version: fn(u8) -> MalformedReport,
}

const IPV4: IpFixed = IpFixed {
    proto_at: 9,
    len: 20,
    version: 4,
    layer: Layer::Ipv4,
    bad_version: MalformedReport::Ipv4Version,
};

const IPV6: IpFixed = IpFixed {
    proto_at: 6,
    len: 40,
    version: 6,
    layer: Layer::Ipv6,
    bad_version: MalformedReport::Ipv6Version,
};

impl Input<'_> {
    /// Reads the IP header at `l3` as far as telling a report: its protocol byte (not a report
    /// when the frame ends before it or `ours` rejects it), then the fixed header (malformed when
    /// the frame ends inside it or the version is wrong). Returns the protocol byte.
    fn ip_header(&self, l3: usize, ip: &IpFixed, ours: impl Fn(u8) -> bool) -> Result<u8, Verdict> {
        self.need(l3 + ip.proto_at + 1, Verdict::NotAReport)?;
        let proto = self.b[l3 + ip.proto_at];
        if !ours(proto) {
            return Err(Verdict::NotAReport);
        }
        self.need(l3 + ip.len, malformed(MalformedReport::Truncated(ip.layer)))?;
        let version = self.b[l3] >> 4;
        if version != ip.version {
            return Err(malformed((ip.bad_version)(version)));
        }
        Ok(proto)
    }
}

fn malformed(m: MalformedReport) -> Verdict {
    Verdict::Malformed(m)
}

/// Parses one guest frame (see the module doc). `frame` is the frame or a prefix of it,
/// `wire_len` its real length; memberships of a valid report go to `visit`.
#[inline]
pub fn parse_report(frame: &[u8], wire_len: usize, mut visit: impl FnMut(Membership)) -> Verdict {
    let b = &frame[..frame.len().min(wire_len)];
    if !is_ip_multicast_mac(b) {
        // A prefix too short to show the MAC, of a longer frame, is the caller's mistake.
        return if b.len() < 4 && wire_len > b.len() {
            Verdict::Incomplete {
                needed: wire_len.min(ETH_HLEN),
            }
        } else {
            Verdict::NotMulticast
        };
    }
    let input = Input { b, wire: wire_len };
    match parse_multicast(&input, &mut visit) {
        Ok(v) | Err(v) => v,
    }
}

fn parse_multicast(inp: &Input<'_>, visit: &mut impl FnMut(Membership)) -> Step {
    let v6_mac = inp.b[0] == 0x33;
    inp.need(ETH_HLEN, Verdict::NotAReport)?;
    let mut l3 = ETH_HLEN;
    let mut ethertype = be16(inp.b, 12);
    let mut vlan = None;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        inp.need(ETH_HLEN + 4, Verdict::NotAReport)?;
        let vid = be16(inp.b, 14) & 0x0fff;
        vlan = (vid != 0).then_some(vid);
        ethertype = be16(inp.b, 16);
        l3 += 4;
    }
    match (ethertype, v6_mac) {
        (ETH_P_IPV4, false) => ipv4(inp, l3, vlan, visit),
        (ETH_P_IPV6, true) => ipv6(inp, l3, vlan, visit),
        // A second tag, another protocol, or an IP version that does not match the MAC.
        _ => Err(Verdict::NotAReport),
    }
}

fn ipv4(inp: &Input<'_>, l3: usize, vlan: Option<u16>, visit: &mut impl FnMut(Membership)) -> Step {
    // Not IGMP (multicast UDP streams, mostly): out before any checksum. From there on the
    // frame claims to be IGMP.
    inp.ip_header(l3, &IPV4, |proto| proto == IPPROTO_IGMP)?;
    let b = inp.b;
    let ihl = usize::from(b[l3] & 0x0f) * 4;
    if ihl < 20 {
        return Err(malformed(MalformedReport::Ipv4HeaderLength(ihl)));
    }
    inp.need(l3 + ihl, malformed(MalformedReport::Ipv4HeaderLength(ihl)))?;
    let total = usize::from(be16(b, l3 + 2));
    if total < ihl || l3 + total > inp.wire {
        return Err(malformed(MalformedReport::Ipv4TotalLength(total)));
    }
    if be16(b, l3 + 6) & 0x3fff != 0 {
        return Err(malformed(MalformedReport::Ipv4Fragment));
    }
    inp.need(l3 + total, Verdict::NotAReport)?; // only Incomplete can come out
    if fold(sum16(&b[l3..l3 + ihl], 0)) != 0xffff {
        return Err(malformed(MalformedReport::Ipv4HeaderChecksum));
    }
    igmp(&b[l3 + ihl..l3 + total], vlan, visit).map_err(malformed)
}

fn igmp(
    m: &[u8],
    vlan: Option<u16>,
    visit: &mut impl FnMut(Membership),
) -> Result<Verdict, MalformedReport> {
    if m.len() < 8 {
        return Err(MalformedReport::Truncated(Layer::Igmp));
    }
    let t = m[0];
    if !matches!(
        t,
        IGMP_QUERY | IGMPV1_REPORT | IGMPV2_REPORT | IGMPV2_LEAVE | IGMPV3_REPORT
    ) {
        // DVMRP, PIMv1, mtrace...: not membership traffic.
        return Ok(Verdict::NotAReport);
    }
    if fold(sum16(m, 0)) != 0xffff {
        return Err(MalformedReport::IgmpChecksum);
    }
    let group = GroupAddr::V4([m[4], m[5], m[6], m[7]]);
    match t {
        IGMP_QUERY => Ok(Verdict::Query),
        IGMPV1_REPORT | IGMPV2_REPORT => single(group, true, vlan, visit),
        IGMPV2_LEAVE => single(group, false, vlan, visit),
        _ => records(&m[8..], be16(m, 6), Family::V4, vlan, visit),
    }
}

fn ipv6(inp: &Input<'_>, l3: usize, vlan: Option<u16>, visit: &mut impl FnMut(Membership)) -> Step {
    // ICMPv6 or hop-by-hop (in multicast, the Router Alert of MLD): may be MLD.
    let mut nh = inp.ip_header(l3, &IPV6, |nh| {
        nh == IPPROTO_ICMPV6 || nh == IPPROTO_HOPOPTS
    })?;
    let b = inp.b;
    let plen = usize::from(be16(b, l3 + 4));
    let end = l3 + 40 + plen;
    if plen == 0 || end > inp.wire {
        return Err(malformed(MalformedReport::Ipv6PayloadLength(plen)));
    }
    inp.need(end, Verdict::NotAReport)?; // only Incomplete can come out
    let mut off = l3 + 40;
    if nh == IPPROTO_HOPOPTS {
        if end - off < 2 {
            return Err(malformed(MalformedReport::Truncated(Layer::HopByHop)));
        }
        let len = (usize::from(b[off + 1]) + 1) * 8;
        if len > end - off {
            return Err(malformed(MalformedReport::HopByHopBeyondPayload));
        }
        nh = b[off];
        off += len;
    }
    if nh != IPPROTO_ICMPV6 {
        // Routing, fragment, destination options...: MLD is never sent behind them.
        return Err(Verdict::NotAReport);
    }
    let m = &b[off..end];
    let Some(&t) = m.first() else {
        return Err(malformed(MalformedReport::Truncated(Layer::Mld)));
    };
    if !matches!(t, MLD_QUERY | MLDV1_REPORT | MLDV1_DONE | MLDV2_REPORT) {
        // Neighbour discovery, echo...
        return Err(Verdict::NotAReport);
    }
    let min_len = if t == MLDV2_REPORT { 8 } else { 24 };
    if m.len() < min_len {
        return Err(malformed(MalformedReport::Truncated(Layer::Mld)));
    }
    let pseudo = pseudo_sum(
        &b[l3 + 8..l3 + 24],
        &b[l3 + 24..l3 + 40],
        m.len(),
        IPPROTO_ICMPV6,
    );
    if fold(sum16(m, pseudo)) != 0xffff {
        return Err(malformed(MalformedReport::Icmpv6Checksum));
    }
    let r = match t {
        MLD_QUERY => Ok(Verdict::Query),
        MLDV1_REPORT | MLDV1_DONE => {
            single(Family::V6.group(&m[8..24]), t == MLDV1_REPORT, vlan, visit)
        }
        _ => records(&m[8..], be16(m, 6), Family::V6, vlan, visit),
    };
    r.map_err(malformed)
}

// -----------------------------------------------------------------------------------------------
// General queries toward the guest

/// Length of [`igmpv3_general_query`]'s frame.
pub const IGMPV3_QUERY_FRAME_LEN: usize = ETH_HLEN + 24 + 12;
/// Length of [`mldv2_general_query`]'s frame.
pub const MLDV2_QUERY_FRAME_LEN: usize = ETH_HLEN + 40 + 8 + 28;

/// Which general query: the first after a frontend connects ([`QueryRound::Startup`], max
/// response [`STARTUP_QUERY_RESPONSE_INTERVAL`]) or a periodic one ([`QueryRound::Periodic`],
/// [`QUERY_RESPONSE_INTERVAL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryRound {
    /// Right after a frontend connected: memberships back fast.
    Startup,
    /// Every [`QUERY_INTERVAL`]: reports spread over the response interval.
    Periodic,
}

impl QueryRound {
    /// IGMPv3 Max Resp Code (RFC 3376 §4.1.1): deciseconds, exact below 128.
    fn igmp_code(self) -> u8 {
        match self {
            QueryRound::Startup => STARTUP_MAX_RESP_DECISECONDS,
            QueryRound::Periodic => QUERY_MAX_RESP_DECISECONDS,
        }
    }

    /// MLDv2 Maximum Response Code (RFC 3810 §5.1.3): milliseconds, exact below 32768.
    fn mld_code(self) -> u16 {
        match self {
            QueryRound::Startup => STARTUP_MAX_RESP_MS,
            QueryRound::Periodic => QUERY_MAX_RESP_MS,
        }
    }
}

/// Max Resp Code / QQIC encoding (RFC 3376 §4.1.1): values below 128 are exact. The casts keep
/// every bit: the assertion below holds the values under 128.
#[allow(clippy::cast_possible_truncation)]
const QUERY_MAX_RESP_DECISECONDS: u8 = (QUERY_RESPONSE_INTERVAL.as_millis() / 100) as u8;
#[allow(clippy::cast_possible_truncation)]
const STARTUP_MAX_RESP_DECISECONDS: u8 = (STARTUP_QUERY_RESPONSE_INTERVAL.as_millis() / 100) as u8;
#[allow(clippy::cast_possible_truncation)]
const QQIC_SECONDS: u8 = QUERY_INTERVAL.as_secs() as u8;
/// MLDv2 Maximum Response Code (RFC 3810 §5.1.3): milliseconds, exact below 32768 (asserted
/// below, so the cast keeps every bit).
#[allow(clippy::cast_possible_truncation)]
const QUERY_MAX_RESP_MS: u16 = QUERY_RESPONSE_INTERVAL.as_millis() as u16;
#[allow(clippy::cast_possible_truncation)]
const STARTUP_MAX_RESP_MS: u16 = STARTUP_QUERY_RESPONSE_INTERVAL.as_millis() as u16;
const _: () = assert!(
    QUERY_MAX_RESP_DECISECONDS < 128
        && STARTUP_QUERY_RESPONSE_INTERVAL.as_millis() < QUERY_RESPONSE_INTERVAL.as_millis()
        && QQIC_SECONDS < 128
        && QUERY_RESPONSE_INTERVAL.as_millis() < 32768
        && ROBUSTNESS < 8
);

/// An IGMPv3 general query (to 224.0.0.1, TTL 1, Router Alert, max response as `round` says,
/// QRV 2, QQIC 125 s) from `src_mac` / `src_ip` (0.0.0.0 is fine: RFC 4541 §2.1.1 queriers use
/// it and Linux accepts it for IGMP), for the guest's RX queue. Guests in IGMPv2 mode answer it
/// too.
pub fn igmpv3_general_query(
    src_mac: [u8; 6],
    src_ip: [u8; 4],
    round: QueryRound,
) -> [u8; IGMPV3_QUERY_FRAME_LEN] {
    let mut f = [0u8; IGMPV3_QUERY_FRAME_LEN];
    let group = GroupAddr::V4([224, 0, 0, 1]);
    f[..6].copy_from_slice(&group.mac());
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
    let ip = &mut f[ETH_HLEN..ETH_HLEN + 24];
    ip[0] = 0x46; // version 4, IHL 6 (Router Alert)
    ip[1] = 0xc0; // DSCP CS6, as Linux sends IGMP
    ip[2..4].copy_from_slice(&36u16.to_be_bytes());
    ip[8] = 1; // TTL
    ip[9] = IPPROTO_IGMP;
    ip[12..16].copy_from_slice(&src_ip);
    ip[16..20].copy_from_slice(&[224, 0, 0, 1]);
    ip[20..24].copy_from_slice(&[0x94, 0x04, 0x00, 0x00]); // Router Alert (RFC 2113)
    let c = checksum(ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let q = &mut f[ETH_HLEN + 24..];
    q[0] = IGMP_QUERY;
    q[1] = round.igmp_code();
    // Group 0.0.0.0 (general), S = 0, QRV, QQIC, no sources.
    q[8] = ROBUSTNESS;
    q[9] = QQIC_SECONDS;
    let c = checksum(q, 0);
    q[2..4].copy_from_slice(&c.to_be_bytes());
    f
}

/// The modified EUI-64 link-local address of `mac` (RFC 4291 appendix A).
pub fn link_local_of(mac: [u8; 6]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfe;
    a[1] = 0x80;
    a[8] = mac[0] ^ 0x02;
    a[9] = mac[1];
    a[10] = mac[2];
    a[11] = 0xff;
    a[12] = 0xfe;
    a[13] = mac[3];
    a[14] = mac[4];
    a[15] = mac[5];
    a
}

/// An MLDv2 general query (to ff02::1, hop limit 1, hop-by-hop Router Alert 0, max response as
/// `round` says, QRV 2, QQIC 125 s) from `src_mac` and its link-local address: RFC 3810 §6.2 makes
/// hosts drop queries without a link-local source, hop limit 1 and the Router Alert, and Linux
/// does. `src_mac` must not be the guest's own MAC.
pub fn mldv2_general_query(src_mac: [u8; 6], round: QueryRound) -> [u8; MLDV2_QUERY_FRAME_LEN] {
    let mut f = [0u8; MLDV2_QUERY_FRAME_LEN];
    let all_nodes = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    f[..6].copy_from_slice(&GroupAddr::V6(all_nodes).mac());
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    let src = link_local_of(src_mac);
    {
        let ip = &mut f[ETH_HLEN..ETH_HLEN + 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(8u16 + 28).to_be_bytes());
        ip[6] = IPPROTO_HOPOPTS;
        ip[7] = 1; // hop limit
        ip[8..24].copy_from_slice(&src);
        ip[24..40].copy_from_slice(&all_nodes);
    }
    // Hop-by-hop: next header ICMPv6, length 0 (8 bytes), Router Alert MLD (RFC 2711), PadN.
    f[ETH_HLEN + 40..ETH_HLEN + 48].copy_from_slice(&[IPPROTO_ICMPV6, 0, 5, 2, 0, 0, 1, 0]);
    let q = &mut f[ETH_HLEN + 48..];
    q[0] = MLD_QUERY;
    q[4..6].copy_from_slice(&round.mld_code().to_be_bytes());
    // Multicast address :: (general), S = 0, QRV, QQIC, no sources.
    q[24] = ROBUSTNESS;
    q[25] = QQIC_SECONDS;
    let c = checksum(q, pseudo_sum(&src, &all_nodes, 28, IPPROTO_ICMPV6));
    q[2..4].copy_from_slice(&c.to_be_bytes());
    f
}

// -----------------------------------------------------------------------------------------------
// Membership table

/// An open-addressing hash map with a fixed number of slots (linear probing, backward-shift
/// deletion, so no tombstones): never allocates after construction. Keys are hashed with a
/// per-map random SipHash key, so a guest cannot pick groups that collide.
#[derive(Debug)]
struct FixedMap<K, V> {
    slots: Vec<Option<(u64, K, V)>>,
    mask: usize,
    len: usize,
    hasher: RandomState,
}

impl<K: Hash + Eq + Copy, V> FixedMap<K, V> {
    /// Room for `cap` entries at a load factor of at most one half.
    fn with_capacity(cap: usize) -> Self {
        let n = (cap.max(4) * 2).next_power_of_two();
        let mut slots = Vec::with_capacity(n);
        slots.resize_with(n, || None);
        FixedMap {
            slots,
            mask: n - 1,
            len: 0,
            hasher: RandomState::new(),
        }
    }

    /// The slot a key of hash `h` probes first: the hash's low bits.
    fn home(&self, h: u64) -> usize {
        // The mask keeps fewer bits than a usize has, so dropping the hash's high half on a
        // 32-bit target changes nothing.
        #[allow(clippy::cast_possible_truncation)]
        let low = h as usize;
        low & self.mask
    }

    fn find(&self, k: &K) -> Result<usize, (usize, u64)> {
        let h = self.hasher.hash_one(k);
        let mut i = self.home(h);
        // Ends: at least half the slots are empty.
        loop {
            match &self.slots[i] {
                None => return Err((i, h)),
                Some((_, kk, _)) if kk == k => return Ok(i),
                Some(_) => i = (i + 1) & self.mask,
            }
        }
    }

    fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        let i = self.find(k).ok()?;
        self.slots[i].as_mut().map(|(_, _, v)| v)
    }

    /// Inserts a new key (the caller checked it is absent and that `len` is below the cap it
    /// built the map for). Returns false, doing nothing, if the map is half full.
    fn insert(&mut self, k: K, v: V) -> bool {
        if self.len * 2 >= self.slots.len() {
            return false;
        }
        match self.find(&k) {
            Ok(i) => {
                self.slots[i] = Some((self.hasher.hash_one(k), k, v));
                true
            }
            Err((i, h)) => {
                self.slots[i] = Some((h, k, v));
                self.len += 1;
                true
            }
        }
    }

    fn remove(&mut self, k: &K) -> Option<V> {
        let mut hole = self.find(k).ok()?;
        let (_, _, v) = self.slots[hole].take()?;
        self.len -= 1;
        // Backward shift: pull later entries of the probe run into the hole when their home
        // slot is not cyclically after it.
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let Some((h, _, _)) = &self.slots[j] else {
                break;
            };
            let home = self.home(*h);
            if (j.wrapping_sub(home) & self.mask) >= (j.wrapping_sub(hole) & self.mask) {
                self.slots[hole] = self.slots[j].take();
                hole = j;
            }
        }
        Some(v)
    }

    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.slots
            .iter()
            .filter_map(|s| s.as_ref().map(|(_, k, v)| (k, v)))
    }

    fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| *s = None);
        self.len = 0;
    }
}

/// A table entry's key: the same group on two VLANs is two memberships (a guest's VLAN
/// sub-interfaces share its MAC, so their solicited-node groups are often equal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GroupKey {
    vlan: Option<u16>,
    group: GroupAddr,
}

/// The changes the caller applies to the macvtap after a table call. Each MAC is in at most
/// one of the lists; a MAC added and removed within the same diff cancels out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// MACs to add to the macvtap's multicast list.
    pub add: Vec<[u8; 6]>,
    /// MACs to remove from it (no group maps to them any more).
    pub remove: Vec<[u8; 6]>,
    /// `Some(on)` when allmulticast changed.
    pub allmulti: Option<bool>,
}

impl Diff {
    /// A diff that never reallocates when used with a table of cap `max_groups` and cleared
    /// after each apply (each list holds at most one entry per installed MAC).
    pub fn with_capacity(max_groups: usize) -> Diff {
        Diff {
            add: Vec::with_capacity(max_groups),
            remove: Vec::with_capacity(max_groups),
            allmulti: None,
        }
    }

    /// Empties the diff after it was applied, keeping the lists' capacity.
    pub fn clear(&mut self) {
        self.add.clear();
        self.remove.clear();
        self.allmulti = None;
    }

    /// Nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty() && self.allmulti.is_none()
    }

    fn add_mac(&mut self, mac: [u8; 6]) {
        if let Some(i) = self.remove.iter().position(|m| *m == mac) {
            self.remove.swap_remove(i);
        } else {
            self.add.push(mac);
        }
    }

    fn remove_mac(&mut self, mac: [u8; 6]) {
        if let Some(i) = self.add.iter().position(|m| *m == mac) {
            self.add.swap_remove(i);
        } else {
            self.remove.push(mac);
        }
    }

    fn set_allmulti(&mut self, on: bool) {
        self.allmulti = match self.allmulti {
            Some(prev) if prev != on => None,
            _ => Some(on),
        };
    }
}

/// Table counters (for the stats socket and Prometheus).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct McastCounters {
    /// Groups in the table now.
    pub groups: u64,
    /// Groups learned (a report for a group not in the table).
    pub joins: u64,
    /// Reports for a group already in the table.
    pub refreshes: u64,
    /// Groups removed by a leave / done / INCLUDE-no-sources record.
    pub leaves: u64,
    /// Groups removed because they were not re-reported within the timeout.
    pub expiries: u64,
    /// Joins refused at the cap.
    pub refused_joins: u64,
    /// Times the table went to allmulticast because of the cap.
    pub overflows: u64,
    /// Valid reports seen.
    pub reports: u64,
    /// Malformed reports dropped.
    pub malformed: u64,
    /// Reports longer than the copied prefix (see [`Verdict::Incomplete`]).
    pub incomplete: u64,
}

/// Table parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableConfig {
    /// Most groups (VLAN, IP group) kept; past it, allmulticast. At most [`MAX_GROUPS_LIMIT`].
    pub max_groups: usize,
    /// A group not re-reported within this is removed (default 260 s, the GMI).
    pub max_age: Duration,
    /// Allmulticast stays on until no join was refused for this long (default `max_age`).
    pub overflow_hold: Duration,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            max_groups: DEFAULT_MAX_GROUPS,
            max_age: DEFAULT_MEMBERSHIP_TIMEOUT,
            overflow_hold: DEFAULT_MEMBERSHIP_TIMEOUT,
        }
    }
}

/// The guest's multicast memberships on one device (see the module doc).
#[derive(Debug)]
pub struct MembershipTable {
    cfg: TableConfig,
    /// (VLAN, group) → time of the last report.
    groups: FixedMap<GroupKey, Duration>,
    /// MAC → number of groups mapping to it (≥ 1).
    macs: FixedMap<[u8; 6], u32>,
    /// Keys to expire, collected before removing (pre-allocated to the cap).
    scratch: Vec<GroupKey>,
    allmulti: bool,
    last_refused: Duration,
    counters: McastCounters,
}

impl MembershipTable {
    /// A table with room for `cfg.max_groups` groups (capped at [`MAX_GROUPS_LIMIT`]); all the
    /// memory it will ever use is allocated here.
    pub fn new(mut cfg: TableConfig) -> MembershipTable {
        cfg.max_groups = cfg.max_groups.min(MAX_GROUPS_LIMIT);
        MembershipTable {
            groups: FixedMap::with_capacity(cfg.max_groups),
            macs: FixedMap::with_capacity(cfg.max_groups),
            scratch: Vec::with_capacity(cfg.max_groups),
            cfg,
            allmulti: false,
            last_refused: Duration::ZERO,
            counters: McastCounters::default(),
        }
    }

    /// The parameters the table was made with.
    pub fn config(&self) -> &TableConfig {
        &self.cfg
    }

    /// Parses `frame` ([`parse_report`]), applies its memberships at time `now`, counts the
    /// verdict, and appends the changes to `diff`.
    pub fn learn(
        &mut self,
        frame: &[u8],
        wire_len: usize,
        now: Duration,
        diff: &mut Diff,
    ) -> Verdict {
        let v = parse_report(frame, wire_len, |m| self.apply(&m, now, diff));
        self.count(&v);
        v
    }

    /// Counts a verdict the caller got from [`parse_report`] itself.
    pub fn count(&mut self, v: &Verdict) {
        match v {
            Verdict::Report { .. } => self.counters.reports += 1,
            Verdict::Malformed(_) => self.counters.malformed += 1,
            Verdict::Incomplete { .. } => self.counters.incomplete += 1,
            Verdict::NotMulticast | Verdict::NotAReport | Verdict::Query => {}
        }
    }

    /// Applies one membership at time `now`.
    pub fn apply(&mut self, m: &Membership, now: Duration, diff: &mut Diff) {
        let key = GroupKey {
            vlan: m.vlan,
            group: m.group,
        };
        // The MAC comes from the group, not from the caller's copy.
        let mac = m.group.mac();
        if m.joined {
            if let Some(seen) = self.groups.get_mut(&key) {
                *seen = now;
                self.counters.refreshes += 1;
                return;
            }
            if self.groups.len >= self.cfg.max_groups || !self.groups.insert(key, now) {
                self.counters.refused_joins += 1;
                self.last_refused = now;
                if !self.allmulti {
                    self.allmulti = true;
                    self.counters.overflows += 1;
                    diff.set_allmulti(true);
                }
                return;
            }
            self.counters.joins += 1;
            self.mac_ref(mac, diff);
        } else {
            if self.groups.remove(&key).is_none() {
                return;
            }
            self.counters.leaves += 1;
            self.mac_unref(mac, diff);
            self.maybe_leave_overflow(now, diff);
        }
        self.counters.groups = self.groups.len as u64;
    }

    fn mac_ref(&mut self, mac: [u8; 6], diff: &mut Diff) {
        if let Some(n) = self.macs.get_mut(&mac) {
            *n += 1;
        } else if self.macs.insert(mac, 1) {
            diff.add_mac(mac);
        }
    }

    fn mac_unref(&mut self, mac: [u8; 6], diff: &mut Diff) {
        let Some(n) = self.macs.get_mut(&mac) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.macs.remove(&mac);
            diff.remove_mac(mac);
        }
    }

    fn maybe_leave_overflow(&mut self, now: Duration, diff: &mut Diff) {
        if self.allmulti
            && self.groups.len < self.cfg.max_groups
            && now.saturating_sub(self.last_refused) >= self.cfg.overflow_hold
        {
            self.allmulti = false;
            diff.set_allmulti(false);
        }
    }

    /// Removes groups not reported within `max_age` of `now`, and leaves allmulticast when
    /// its hold is over.
    pub fn expire(&mut self, now: Duration, diff: &mut Diff) {
        let max_age = self.cfg.max_age;
        self.scratch.clear();
        let scratch = &mut self.scratch;
        scratch.extend(
            self.groups
                .iter()
                .filter(|(_, &seen)| now.saturating_sub(seen) >= max_age)
                .map(|(k, _)| *k),
        );
        for i in 0..self.scratch.len() {
            let key = self.scratch[i];
            if self.groups.remove(&key).is_some() {
                self.counters.expiries += 1;
                self.mac_unref(key.group.mac(), diff);
            }
        }
        self.counters.groups = self.groups.len as u64;
        self.maybe_leave_overflow(now, diff);
    }

    /// When [`expire`](Self::expire) next has something to do: the oldest group's timeout or
    /// the end of the allmulticast hold. `None` for an empty table without allmulticast.
    pub fn next_deadline(&self) -> Option<Duration> {
        let oldest = self.groups.iter().map(|(_, &seen)| seen).min();
        let groups = oldest.map(|t| t + self.cfg.max_age);
        let hold = self
            .allmulti
            .then(|| self.last_refused + self.cfg.overflow_hold);
        match (groups, hold) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Forgets everything (frontend disconnect): `diff` removes every MAC and allmulticast.
    pub fn clear(&mut self, diff: &mut Diff) {
        for (mac, _) in self.macs.iter() {
            diff.remove_mac(*mac);
        }
        self.macs.clear();
        self.groups.clear();
        if self.allmulti {
            self.allmulti = false;
            diff.set_allmulti(false);
        }
        self.counters.groups = 0;
    }

    /// Groups in the table.
    pub fn groups(&self) -> usize {
        self.groups.len
    }

    /// Whether the table asked for allmulticast.
    pub fn allmulti(&self) -> bool {
        self.allmulti
    }

    /// Every MAC that should be in the macvtap's list (for a resync after a failed apply).
    pub fn macs(&self) -> impl Iterator<Item = [u8; 6]> + '_ {
        self.macs.iter().map(|(m, _)| *m)
    }

    /// Every (VLAN, group) in the table.
    pub fn memberships(&self) -> impl Iterator<Item = (Option<u16>, GroupAddr)> + '_ {
        self.groups.iter().map(|(k, _)| (k.vlan, k.group))
    }

    /// The table's counters so far (groups is the current size).
    pub fn counters(&self) -> McastCounters {
        self.counters
    }
}

// -----------------------------------------------------------------------------------------------
// Report builders for tests, fuzz seeds and benches

/// Builders of well-formed reports (and the means to break them), with correct checksums.
#[cfg(any(test, feature = "test-utils"))]
pub mod frames {
    use super::*;

    /// A guest MAC for test frames.
    pub const GUEST_MAC: [u8; 6] = [0x02, 0x6d, 0x76, 0x68, 0x00, 0x02];

    /// One v3/MLDv2 group record.
    #[derive(Debug, Clone)]
    pub struct Record {
        /// Record type (1..=6 are RFC 3376's; others test the unknown-type path).
        pub rtype: u8,
        /// The group.
        pub group: GroupAddr,
        /// Number of made-up sources written after the group.
        pub sources: u16,
        /// Auxiliary data length in 32-bit words (filled with `0xaa`).
        pub aux_words: u8,
    }

    impl Record {
        /// A record without auxiliary data.
        pub fn new(rtype: u8, group: GroupAddr, sources: u16) -> Record {
            Record {
                rtype,
                group,
                sources,
                aux_words: 0,
            }
        }
    }

    /// IPv4 group `a.b.c.d`.
    pub fn v4(a: u8, b: u8, c: u8, d: u8) -> GroupAddr {
        GroupAddr::V4([a, b, c, d])
    }

    /// `ff0s::…:x` style IPv6 group from its 16 bytes.
    pub fn v6(s: &str) -> GroupAddr {
        GroupAddr::V6(s.parse::<std::net::Ipv6Addr>().expect("ipv6").octets())
    }

    fn ether(dst: [u8; 6], ethertype: u16, vlan: Option<u16>) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&GUEST_MAC);
        if let Some(vid) = vlan {
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// IPv4 + IGMP message `igmp` (checksum filled in) to `dst`, with Router Alert.
    pub fn ipv4_igmp(dst: [u8; 4], mut igmp: Vec<u8>, vlan: Option<u16>) -> Vec<u8> {
        let c = checksum(&igmp, 0);
        igmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = ether(GroupAddr::V4(dst).mac(), ETH_P_IPV4, vlan);
        let l3 = f.len();
        let total = (24 + igmp.len()) as u16;
        f.extend_from_slice(&[0x46, 0xc0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 1, IPPROTO_IGMP, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 2]);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&[0x94, 0x04, 0, 0]);
        let c = checksum(&f[l3..l3 + 24], 0);
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&igmp);
        f
    }

    /// IGMPv1/v2 message of `igmp_type` for `group` (sent to the group, or 224.0.0.2 for a
    /// leave).
    pub fn igmp_v2(igmp_type: u8, group: GroupAddr, vlan: Option<u16>) -> Vec<u8> {
        let GroupAddr::V4(g) = group else {
            panic!("IPv4 group needed")
        };
        let dst = if igmp_type == IGMPV2_LEAVE {
            [224, 0, 0, 2]
        } else {
            g
        };
        let mut m = vec![igmp_type, 0, 0, 0];
        m.extend_from_slice(&g);
        ipv4_igmp(dst, m, vlan)
    }

    fn record_bytes(records: &[Record], addr_len: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for r in records {
            b.push(r.rtype);
            b.push(r.aux_words);
            b.extend_from_slice(&r.sources.to_be_bytes());
            match r.group {
                GroupAddr::V4(a) => b.extend_from_slice(&a),
                GroupAddr::V6(a) => b.extend_from_slice(&a),
            }
            for s in 0..r.sources {
                let mut src = vec![0u8; addr_len];
                src[0] = 10;
                src[addr_len - 2..].copy_from_slice(&s.to_be_bytes());
                b.extend_from_slice(&src);
            }
            b.resize(b.len() + usize::from(r.aux_words) * 4, 0xaa);
        }
        b
    }

    /// IGMPv3 report to 224.0.0.22.
    pub fn igmpv3_report(records: &[Record], vlan: Option<u16>) -> Vec<u8> {
        let mut m = vec![IGMPV3_REPORT, 0, 0, 0, 0, 0];
        m.extend_from_slice(&(records.len() as u16).to_be_bytes());
        m.extend_from_slice(&record_bytes(records, 4));
        ipv4_igmp([224, 0, 0, 22], m, vlan)
    }

    /// IPv6 (+ hop-by-hop Router Alert when `hbh`) + ICMPv6 message `icmp` (checksum filled
    /// in) from fe80::…, to `dst`.
    pub fn ipv6_icmp(dst: GroupAddr, mut icmp: Vec<u8>, hbh: bool, vlan: Option<u16>) -> Vec<u8> {
        let GroupAddr::V6(d) = dst else {
            panic!("IPv6 destination needed")
        };
        let src = link_local_of(GUEST_MAC);
        let c = checksum(&icmp, pseudo_sum(&src, &d, icmp.len(), IPPROTO_ICMPV6));
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = ether(dst.mac(), ETH_P_IPV6, vlan);
        let plen = icmp.len() + if hbh { 8 } else { 0 };
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(plen as u16).to_be_bytes());
        f.push(if hbh { IPPROTO_HOPOPTS } else { IPPROTO_ICMPV6 });
        f.push(1);
        f.extend_from_slice(&src);
        f.extend_from_slice(&d);
        if hbh {
            f.extend_from_slice(&[IPPROTO_ICMPV6, 0, 5, 2, 0, 0, 1, 0]);
        }
        f.extend_from_slice(&icmp);
        f
    }

    /// MLDv1 report (to the group) or done (to ff02::2), with hop-by-hop Router Alert.
    pub fn mld_v1(mld_type: u8, group: GroupAddr, vlan: Option<u16>) -> Vec<u8> {
        let GroupAddr::V6(g) = group else {
            panic!("IPv6 group needed")
        };
        let dst = if mld_type == MLDV1_DONE {
            v6("ff02::2")
        } else {
            group
        };
        let mut m = vec![mld_type, 0, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&g);
        ipv6_icmp(dst, m, true, vlan)
    }

    /// MLDv2 report to ff02::16 (`hbh`: with the hop-by-hop Router Alert, as stacks send it).
    pub fn mldv2_report(records: &[Record], hbh: bool, vlan: Option<u16>) -> Vec<u8> {
        let mut m = vec![MLDV2_REPORT, 0, 0, 0, 0, 0];
        m.extend_from_slice(&(records.len() as u16).to_be_bytes());
        m.extend_from_slice(&record_bytes(records, 16));
        ipv6_icmp(v6("ff02::16"), m, hbh, vlan)
    }

    /// A unicast UDP frame of `len` bytes (the hot path).
    pub fn unicast_udp(len: usize) -> Vec<u8> {
        let mut f = ether([0x02, 0, 0, 0, 0, 9], ETH_P_IPV4, None);
        f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17]);
        f.resize(len.max(f.len()), 0x5a);
        f
    }

    /// Recomputes the IPv4 header, IGMP and ICMPv6 checksums where the parser would look for
    /// them, as far as the frame's own length fields allow (for the fuzzer, which cannot find
    /// checksums by itself). Leaves anything it cannot follow alone.
    pub fn fix_checksums(f: &mut [u8]) {
        let mut l3 = ETH_HLEN;
        if f.len() < l3 {
            return;
        }
        let mut et = be16(f, 12);
        if (et == ETH_P_8021Q || et == ETH_P_8021AD) && f.len() >= l3 + 4 {
            et = be16(f, 16);
            l3 += 4;
        }
        if et == ETH_P_IPV4 && f.len() >= l3 + 20 {
            let ihl = usize::from(f[l3] & 0x0f) * 4;
            let total = usize::from(be16(f, l3 + 2));
            if ihl < 20 || l3 + ihl > f.len() {
                return;
            }
            f[l3 + 10..l3 + 12].fill(0);
            let c = checksum(&f[l3..l3 + ihl], 0);
            f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
            let end = (l3 + total).min(f.len());
            if end >= l3 + ihl + 4 {
                let m = &mut f[l3 + ihl..end];
                m[2..4].fill(0);
                let c = checksum(m, 0);
                m[2..4].copy_from_slice(&c.to_be_bytes());
            }
        } else if et == ETH_P_IPV6 && f.len() >= l3 + 40 {
            let end = (l3 + 40 + usize::from(be16(f, l3 + 4))).min(f.len());
            let mut off = l3 + 40;
            if f[l3 + 6] == IPPROTO_HOPOPTS && end >= off + 2 {
                off += (usize::from(f[off + 1]) + 1) * 8;
            }
            if end >= off + 4 {
                let (hdr, m) = f.split_at_mut(off);
                let m = &mut m[..end - off];
                m[2..4].fill(0);
                let p = pseudo_sum(&hdr[l3 + 8..l3 + 24], &hdr[l3 + 24..l3 + 40], m.len(), 58);
                let c = checksum(m, p);
                m[2..4].copy_from_slice(&c.to_be_bytes());
            }
        }
    }
}

#[cfg(test)]
mod host_tests;
#[cfg(test)]
mod tests;
