//! Parser tests (one per bad-input class, plus every report kind), query builders, table.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::frames::*;
use super::*;

fn parse(f: &[u8]) -> (Verdict, Vec<Membership>) {
    parse_len(f, f.len())
}

fn parse_len(f: &[u8], wire: usize) -> (Verdict, Vec<Membership>) {
    let mut out = Vec::new();
    let v = parse_report(f, wire, |m| out.push(m));
    (v, out)
}

fn joined(vlan: Option<u16>, group: GroupAddr) -> Membership {
    Membership {
        vlan,
        group,
        mac: group.mac(),
        joined: true,
    }
}

fn left(vlan: Option<u16>, group: GroupAddr) -> Membership {
    Membership {
        joined: false,
        ..joined(vlan, group)
    }
}

fn report(records: u16, ignored: u16) -> Verdict {
    Verdict::Report { records, ignored }
}

/// Asserts `f` is malformed with `why` and emits nothing.
fn assert_malformed(f: &[u8], why: MalformedReport) {
    let (v, out) = parse(f);
    assert_eq!(v, Verdict::Malformed(why));
    assert!(out.is_empty(), "a malformed report emitted {out:?}");
}

fn assert_not_a_report(f: &[u8]) {
    let (v, out) = parse(f);
    assert_eq!(v, Verdict::NotAReport);
    assert!(out.is_empty());
}

/// `f` cut at every length in `cuts` parses as `want` and emits nothing.
fn assert_cuts(f: &[u8], cuts: std::ops::Range<usize>, want: Verdict) {
    for n in cuts {
        let (v, out) = parse(&f[..n]);
        assert_eq!(v, want, "cut at {n}");
        assert!(out.is_empty(), "cut at {n}: emitted {out:?}");
    }
}

/// `f` (untagged) cut inside its IP header: not a report while the cut leaves out the byte that
/// names the protocol (it ends at `names_protocol`), truncated at `layer` from there until the
/// header's end (`header_end`).
fn assert_truncated_ip_header(f: &[u8], names_protocol: usize, header_end: usize, layer: Layer) {
    assert_cuts(f, L3..names_protocol, Verdict::NotAReport);
    let truncated = Verdict::Malformed(MalformedReport::Truncated(layer));
    assert_cuts(f, names_protocol..header_end, truncated);
}

/// Offset of the IP header in an untagged frame.
const L3: usize = 14;
/// IGMP offset in frames from `ipv4_igmp` (IHL 6).
const IGMP: usize = L3 + 24;
/// ICMPv6 offset in frames from `ipv6_icmp` with hop-by-hop.
const MLD: usize = L3 + 40 + 8;

fn g4() -> GroupAddr {
    v4(239, 1, 2, 3)
}

fn g6() -> GroupAddr {
    v6("ff02::1:ff12:3456")
}

/// Rewrites the IPv4 header checksum after a header field was changed on purpose.
fn fix_ipv4_header(f: &mut [u8], l3: usize) {
    let ihl = usize::from(f[l3] & 0x0f) * 4;
    f[l3 + 10..l3 + 12].fill(0);
    let c = checksum(&f[l3..l3 + ihl.min(f.len() - l3)], 0);
    f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

// -----------------------------------------------------------------------------------------------
// Every report kind

#[test]
fn igmpv1_report_joins_its_group() {
    let (v, out) = parse(&igmp_v2(IGMPV1_REPORT, g4(), None));
    assert_eq!(v, report(1, 0));
    assert_eq!(out, [joined(None, g4())]);
}

#[test]
fn igmpv2_and_mldv1_reports_join_and_leave_or_done_leaves() {
    let igmp = |t| igmp_v2(t, g4(), None);
    let mld = |t| mld_v1(t, g6(), None);
    for (case, frame, want) in [
        ("IGMPv2 report", igmp(IGMPV2_REPORT), joined(None, g4())),
        ("IGMPv2 leave", igmp(IGMPV2_LEAVE), left(None, g4())),
        ("MLDv1 report", mld(MLDV1_REPORT), joined(None, g6())),
        ("MLDv1 done", mld(MLDV1_DONE), left(None, g6())),
    ] {
        let (v, out) = parse(&frame);
        assert_eq!((v, out), (report(1, 0), vec![want]), "{case}");
    }
}

#[test]
fn igmpv3_records_mean_membership_per_rfc3376() {
    // (record type, sources) → membership
    let cases: [(u8, u16, Option<bool>); 12] = [
        (MODE_IS_INCLUDE, 0, Some(false)),
        (MODE_IS_INCLUDE, 2, Some(true)),
        (MODE_IS_EXCLUDE, 0, Some(true)),
        (MODE_IS_EXCLUDE, 1, Some(true)),
        (CHANGE_TO_INCLUDE, 0, Some(false)),
        (CHANGE_TO_INCLUDE, 3, Some(true)),
        (CHANGE_TO_EXCLUDE, 0, Some(true)),
        (CHANGE_TO_EXCLUDE, 1, Some(true)),
        (ALLOW_NEW_SOURCES, 1, Some(true)),
        (ALLOW_NEW_SOURCES, 0, None),
        (BLOCK_OLD_SOURCES, 1, None),
        (BLOCK_OLD_SOURCES, 0, None),
    ];
    for (rtype, nsrc, want) in cases {
        let f = igmpv3_report(&[Record::new(rtype, g4(), nsrc)], None);
        let (v, out) = parse(&f);
        match want {
            Some(j) => {
                assert_eq!(v, report(1, 0), "type {rtype} nsrc {nsrc}");
                assert_eq!(
                    out,
                    [Membership {
                        joined: j,
                        ..joined(None, g4())
                    }]
                );
            }
            None => {
                assert_eq!(v, report(0, 1), "type {rtype} nsrc {nsrc}");
                assert!(out.is_empty());
            }
        }
    }
}

#[test]
fn igmpv3_report_with_many_records_emits_each_in_order() {
    let recs: Vec<Record> = (0..40)
        .map(|i| Record::new(CHANGE_TO_EXCLUDE, v4(239, 0, 0, i), 0))
        .collect();
    let (v, out) = parse(&igmpv3_report(&recs, None));
    assert_eq!(v, report(40, 0));
    let groups: Vec<GroupAddr> = out.iter().map(|m| m.group).collect();
    let want: Vec<GroupAddr> = (0..40).map(|i| v4(239, 0, 0, i)).collect();
    assert_eq!(groups, want);
}

#[test]
fn mldv2_report_with_hop_by_hop_router_alert_joins() {
    let recs = [
        Record::new(CHANGE_TO_EXCLUDE, g6(), 0),
        Record::new(MODE_IS_INCLUDE, v6("ff05::1:3"), 1),
        Record::new(CHANGE_TO_INCLUDE, v6("ff0e::123"), 0),
    ];
    let (v, out) = parse(&mldv2_report(&recs, true, None));
    assert_eq!(v, report(3, 0));
    assert_eq!(
        out,
        [
            joined(None, g6()),
            joined(None, v6("ff05::1:3")),
            left(None, v6("ff0e::123"))
        ]
    );
}

#[test]
fn mldv2_report_without_hop_by_hop_joins() {
    let (v, out) = parse(&mldv2_report(
        &[Record::new(MODE_IS_EXCLUDE, g6(), 0)],
        false,
        None,
    ));
    assert_eq!((v, out), (report(1, 0), vec![joined(None, g6())]));
}

#[test]
fn group_macs_follow_rfc1112_and_rfc2464() {
    assert_eq!(v4(239, 129, 2, 3).mac(), [0x01, 0, 0x5e, 0x01, 2, 3]);
    // 32 IPv4 groups share a MAC: the high bit of the second octet is dropped.
    assert_eq!(v4(224, 1, 2, 3).mac(), v4(239, 129, 2, 3).mac());
    assert_eq!(g6().mac(), [0x33, 0x33, 0xff, 0x12, 0x34, 0x56]);
    let (_, out) = parse(&mld_v1(MLDV1_REPORT, v6("ff12::dead:beef"), None));
    assert_eq!(out[0].mac, [0x33, 0x33, 0xde, 0xad, 0xbe, 0xef]);
}

#[test]
fn report_padded_past_its_ip_length_parses() {
    // Ethernet padding after the IP packet is not part of the report.
    let mut f = igmp_v2(IGMPV2_REPORT, g4(), None);
    f.resize(f.len() + 20, 0xee);
    assert_eq!(parse(&f).0, report(1, 0));
    let mut f = mldv2_report(&[Record::new(MODE_IS_EXCLUDE, g6(), 0)], true, None);
    f.resize(f.len() + 7, 0xee);
    assert_eq!(parse(&f).0, report(1, 0));
}

#[test]
fn ipv4_header_without_options_parses() {
    // Strip the Router Alert: IHL 5.
    let f = igmp_v2(IGMPV2_REPORT, g4(), None);
    let mut g = f[..L3 + 20].to_vec();
    g.extend_from_slice(&f[IGMP..]);
    g[L3] = 0x45;
    g[L3 + 2..L3 + 4].copy_from_slice(&28u16.to_be_bytes());
    fix_ipv4_header(&mut g, L3);
    assert_eq!(parse(&g), (report(1, 0), vec![joined(None, g4())]));
}

// -----------------------------------------------------------------------------------------------
// Not reports

#[test]
fn unicast_and_broadcast_frames_are_not_multicast() {
    assert_eq!(parse(&unicast_udp(1514)).0, Verdict::NotMulticast);
    let mut f = igmp_v2(IGMPV2_REPORT, g4(), None);
    f[..6].fill(0xff);
    assert_eq!(parse(&f).0, Verdict::NotMulticast);
    // 01:00:5e:80:… is not in the IPv4 multicast MAC range.
    f[..6].copy_from_slice(&[0x01, 0, 0x5e, 0x80, 0, 1]);
    assert_eq!(parse(&f).0, Verdict::NotMulticast);
    // Other multicast MACs (STP, LLDP) too.
    f[..6].copy_from_slice(&[0x01, 0x80, 0xc2, 0, 0, 0]);
    assert_eq!(parse(&f).0, Verdict::NotMulticast);
    assert_eq!(parse(&[]).0, Verdict::NotMulticast);
    assert_eq!(parse(&[0x33]).0, Verdict::NotMulticast);
}

#[test]
fn multicast_mac_with_non_ip_ethertype_is_not_a_report() {
    let mut f = igmp_v2(IGMPV2_REPORT, g4(), None);
    f[12..14].copy_from_slice(&[0x08, 0x06]); // ARP
    assert_not_a_report(&f);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    assert_not_a_report(&f);
}

#[test]
fn ip_version_of_the_mac_and_ethertype_disagreeing_is_not_a_report() {
    let mut f = igmp_v2(IGMPV2_REPORT, g4(), None);
    f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    assert_not_a_report(&f);
    let mut f = mld_v1(MLDV1_REPORT, g6(), None);
    f[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
    assert_not_a_report(&f);
}

#[test]
fn multicast_udp_is_not_a_report() {
    let mut f = igmp_v2(IGMPV2_REPORT, g4(), None);
    f[L3 + 9] = 17;
    fix_ipv4_header(&mut f, L3);
    assert_not_a_report(&f);
}

#[test]
fn neighbour_solicitation_is_not_a_report() {
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0x56]);
    assert_not_a_report(&ipv6_icmp(g6(), ns, false, None));
}

#[test]
fn unknown_igmp_type_is_not_a_report() {
    for t in [0x13u8, 0x1e, 0x1f, 0x00, 0xff] {
        let f = igmp_v2(t, g4(), None);
        assert_not_a_report(&f);
    }
}

#[test]
fn igmp_and_mld_queries_are_queries() {
    let mut q = vec![IGMP_QUERY, 100, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        parse(&ipv4_igmp([224, 0, 0, 1], q.clone(), None)).0,
        Verdict::Query
    );
    q.extend_from_slice(&[2, 125, 0, 0]);
    assert_eq!(parse(&ipv4_igmp([224, 0, 0, 1], q, None)).0, Verdict::Query);
    let mut m = vec![MLD_QUERY, 0, 0, 0, 0x27, 0x10, 0, 0];
    m.extend_from_slice(&[0; 16]);
    assert_eq!(
        parse(&ipv6_icmp(v6("ff02::1"), m, true, None)).0,
        Verdict::Query
    );
}

// -----------------------------------------------------------------------------------------------
// VLAN tags

#[test]
fn vlan_tagged_report_is_parsed_through_one_tag() {
    let (v, out) = parse(&igmp_v2(IGMPV2_REPORT, g4(), Some(10)));
    assert_eq!((v, out), (report(1, 0), vec![joined(Some(10), g4())]));
    let recs = [Record::new(CHANGE_TO_EXCLUDE, g6(), 0)];
    let mut f = mldv2_report(&recs, true, Some(0x2005)); // PCP 1, VID 5
    assert_eq!(parse(&f).1, [joined(Some(5), g6())]);
    // 802.1ad (S-tag) the same.
    f[12..14].copy_from_slice(&ETH_P_8021AD.to_be_bytes());
    assert_eq!(parse(&f).1, [joined(Some(5), g6())]);
}

#[test]
fn priority_tagged_report_counts_as_untagged() {
    let (_, out) = parse(&igmp_v2(IGMPV2_REPORT, g4(), Some(0x6000)));
    assert_eq!(out, [joined(None, g4())]);
}

#[test]
fn double_tagged_frame_is_not_a_report() {
    let f = igmp_v2(IGMPV2_REPORT, g4(), Some(10));
    let mut qinq = f[..16].to_vec();
    qinq.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    qinq.extend_from_slice(&20u16.to_be_bytes());
    qinq.extend_from_slice(&f[16..]);
    qinq[12..14].copy_from_slice(&ETH_P_8021AD.to_be_bytes());
    assert_not_a_report(&qinq);
}

// -----------------------------------------------------------------------------------------------
// Truncation, at every layer

#[test]
fn truncated_ethernet_header_is_not_a_report() {
    let f = igmp_v2(IGMPV2_REPORT, g4(), None);
    assert_cuts(&f, 4..L3, Verdict::NotAReport);
}

#[test]
fn truncated_vlan_tag_is_not_a_report() {
    let f = igmp_v2(IGMPV2_REPORT, g4(), Some(7));
    assert_cuts(&f, L3..L3 + 4, Verdict::NotAReport);
}

#[test]
fn truncated_ipv4_header_is_malformed() {
    let f = igmp_v2(IGMPV2_REPORT, g4(), None);
    // Before the protocol byte nothing says IGMP.
    assert_truncated_ip_header(&f, L3 + 10, L3 + 20, Layer::Ipv4);
    // Inside the options: the IHL runs past the frame.
    assert_malformed(&f[..L3 + 22], MalformedReport::Ipv4HeaderLength(24));
}

#[test]
fn frame_cut_inside_the_igmp_message_is_malformed() {
    let f = igmp_v2(IGMPV2_REPORT, g4(), None);
    assert_cuts(
        &f,
        IGMP..f.len(),
        Verdict::Malformed(MalformedReport::Ipv4TotalLength(32)),
    );
}

#[test]
fn igmp_message_shorter_than_eight_bytes_is_malformed() {
    let mut f = igmp_v2(IGMPV2_REPORT, g4(), None);
    f.truncate(IGMP + 4);
    f[L3 + 2..L3 + 4].copy_from_slice(&28u16.to_be_bytes());
    fix_ipv4_header(&mut f, L3);
    assert_malformed(&f, MalformedReport::Truncated(Layer::Igmp));
}

#[test]
fn truncated_ipv6_header_is_malformed() {
    let f = mld_v1(MLDV1_REPORT, g6(), None);
    // Before the next-header byte nothing says ICMPv6 or hop-by-hop.
    assert_truncated_ip_header(&f, L3 + 7, L3 + 40, Layer::Ipv6);
}

#[test]
fn truncated_hop_by_hop_header_is_malformed() {
    let mut f = mld_v1(MLDV1_REPORT, g6(), None);
    // Payload of one byte: the hop-by-hop header cannot even say its length.
    f.truncate(L3 + 41);
    f[L3 + 4..L3 + 6].copy_from_slice(&1u16.to_be_bytes());
    assert_malformed(&f, MalformedReport::Truncated(Layer::HopByHop));
}

#[test]
fn truncated_mld_message_is_malformed() {
    for (f, min) in [
        (mld_v1(MLDV1_REPORT, g6(), None), 24),
        (mldv2_report(&[], true, None), 8),
    ] {
        for len in 0..min {
            let mut g = f[..MLD + len].to_vec();
            g[L3 + 4..L3 + 6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
            assert_malformed(&g, MalformedReport::Truncated(Layer::Mld));
        }
    }
}

#[test]
fn ipv6_payload_length_beyond_frame_is_malformed() {
    let f = mld_v1(MLDV1_REPORT, g6(), None);
    assert_cuts(
        &f,
        L3 + 40..f.len(),
        Verdict::Malformed(MalformedReport::Ipv6PayloadLength(32)),
    );
}

#[test]
fn ipv6_jumbo_payload_length_zero_is_malformed() {
    let mut f = mld_v1(MLDV1_REPORT, g6(), None);
    f[L3 + 4..L3 + 6].fill(0);
    assert_malformed(&f, MalformedReport::Ipv6PayloadLength(0));
}

/// Every report kind cut at every length: never a membership, never a panic, and only
/// "not a report" before the IP header says what it is.
#[test]
fn report_cut_at_any_byte_emits_nothing() {
    let recs = [
        Record::new(CHANGE_TO_EXCLUDE, g6(), 1),
        Record::new(MODE_IS_INCLUDE, v6("ff05::2"), 2),
    ];
    let frames = [
        igmp_v2(IGMPV1_REPORT, g4(), None),
        igmp_v2(IGMPV2_LEAVE, g4(), Some(3)),
        igmpv3_report(
            &[
                Record::new(2, g4(), 1),
                Record::new(4, v4(224, 0, 0, 251), 0),
            ],
            None,
        ),
        mld_v1(MLDV1_REPORT, g6(), None),
        mldv2_report(&recs, true, Some(9)),
        mldv2_report(&recs, false, None),
    ];
    for f in &frames {
        assert!(matches!(parse(f).0, Verdict::Report { .. }));
        for n in 0..f.len() {
            let (v, out) = parse(&f[..n]);
            assert!(out.is_empty(), "cut at {n}: {v:?} emitted {out:?}");
            assert!(
                matches!(
                    v,
                    Verdict::NotMulticast | Verdict::NotAReport | Verdict::Malformed(_)
                ),
                "cut at {n}: {v:?}"
            );
        }
    }
}

// -----------------------------------------------------------------------------------------------
// Prefix copies

#[test]
fn prefix_shorter_than_the_report_is_incomplete_then_parses_in_full() {
    let recs: Vec<Record> = (0..100)
        .map(|i| Record::new(MODE_IS_EXCLUDE, v6(&format!("ff05::{i:x}")), 0))
        .collect();
    let f = mldv2_report(&recs, true, None);
    assert!(f.len() > 2000);
    let (v, out) = parse_len(&f[..COPY_LEN], f.len());
    assert_eq!(v, Verdict::Incomplete { needed: f.len() });
    assert!(out.is_empty());
    assert_eq!(parse_len(&f, f.len()).0, report(100, 0));
    // A prefix that holds the whole report is enough (the rest is padding).
    let g = igmp_v2(IGMPV2_REPORT, g4(), None);
    let mut padded = g.clone();
    padded.resize(1500, 0);
    assert_eq!(parse_len(&g, 1500).0, report(1, 0));
    // A prefix that does not even show the MAC.
    assert_eq!(
        parse_len(&g[..2], 1500).0,
        Verdict::Incomplete { needed: 14 }
    );
}

#[test]
fn wire_length_shorter_than_the_copy_cuts_the_frame() {
    let f = igmp_v2(IGMPV2_REPORT, g4(), None);
    assert_eq!(
        parse_len(&f, f.len() - 1).0,
        Verdict::Malformed(MalformedReport::Ipv4TotalLength(32))
    );
    assert_eq!(parse_len(&f, 0).0, Verdict::NotMulticast);
}

// -----------------------------------------------------------------------------------------------
// Header fields

#[test]
fn ipv4_version_not_4_is_malformed() {
    let mut f = igmp_v2(IGMPV2_REPORT, g4(), None);
    f[L3] = 0x56;
    fix_ipv4_header(&mut f, L3);
    assert_malformed(&f, MalformedReport::Ipv4Version(5));
}

#[test]
fn ihl_below_5_is_malformed() {
    let mut f = igmp_v2(IGMPV2_REPORT, g4(), None);
    for ihl in 0..5u8 {
        f[L3] = 0x40 | ihl;
        assert_malformed(&f, MalformedReport::Ipv4HeaderLength(usize::from(ihl) * 4));
    }
}

#[test]
fn ihl_beyond_frame_is_malformed() {
    let mut f = igmp_v2(IGMPV2_REPORT, g4(), None);
    f[L3] = 0x4f; // 60 bytes of header in a 46-byte packet
    assert_malformed(&f, MalformedReport::Ipv4HeaderLength(60));
}

#[test]
fn ipv4_total_length_below_header_is_malformed() {
    let mut f = igmp_v2(IGMPV2_REPORT, g4(), None);
    f[L3 + 2..L3 + 4].copy_from_slice(&20u16.to_be_bytes());
    fix_ipv4_header(&mut f, L3);
    assert_malformed(&f, MalformedReport::Ipv4TotalLength(20));
}

#[test]
fn bad_ipv4_header_checksum_is_malformed() {
    let mut f = igmp_v2(IGMPV2_REPORT, g4(), None);
    f[L3 + 8] = 2; // TTL changed, checksum not
    assert_malformed(&f, MalformedReport::Ipv4HeaderChecksum);
}

#[test]
fn ipv4_fragment_is_malformed() {
    for frag in [0x2000u16, 0x0001, 0x3fff] {
        let mut f = igmp_v2(IGMPV2_REPORT, g4(), None);
        f[L3 + 6..L3 + 8].copy_from_slice(&frag.to_be_bytes());
        fix_ipv4_header(&mut f, L3);
        assert_malformed(&f, MalformedReport::Ipv4Fragment);
    }
}

#[test]
fn bad_igmp_checksum_is_malformed() {
    for mut f in [
        igmp_v2(IGMPV2_REPORT, g4(), None),
        igmp_v2(IGMPV2_LEAVE, g4(), None),
        igmpv3_report(&[Record::new(2, g4(), 0)], None),
    ] {
        f[IGMP + 7] ^= 1; // the group (or record count) changed, checksum not
        assert_malformed(&f, MalformedReport::IgmpChecksum);
    }
}

#[test]
fn bad_icmpv6_checksum_is_malformed() {
    let mut f = mld_v1(MLDV1_REPORT, g6(), None);
    f[MLD + 23] ^= 0x10;
    assert_malformed(&f, MalformedReport::Icmpv6Checksum);
    // The pseudo-header counts: a changed source address breaks it too.
    let mut f = mldv2_report(&[Record::new(2, g6(), 0)], true, None);
    f[L3 + 8 + 15] ^= 1;
    assert_malformed(&f, MalformedReport::Icmpv6Checksum);
}

#[test]
fn ipv6_version_not_6_is_malformed() {
    let mut f = mld_v1(MLDV1_REPORT, g6(), None);
    f[L3] = 0x40;
    assert_malformed(&f, MalformedReport::Ipv6Version(4));
}

// -----------------------------------------------------------------------------------------------
// IPv6 extension headers

#[test]
fn mld_behind_another_extension_header_is_not_a_report() {
    // Destination options (60) instead of hop-by-hop, directly and after hop-by-hop.
    let mut f = mld_v1(MLDV1_REPORT, g6(), None);
    f[L3 + 6] = 60;
    assert_not_a_report(&f);
    let mut f = mld_v1(MLDV1_REPORT, g6(), None);
    f[L3 + 40] = 60;
    assert_not_a_report(&f);
}

#[test]
fn hop_by_hop_beyond_payload_is_malformed() {
    let mut f = mld_v1(MLDV1_REPORT, g6(), None);
    f[L3 + 41] = 4; // 40 bytes of options in a 32-byte payload
    assert_malformed(&f, MalformedReport::HopByHopBeyondPayload);
}

#[test]
fn longer_hop_by_hop_header_is_skipped() {
    // 16 bytes of options: Router Alert, then PadN.
    let f = mld_v1(MLDV1_REPORT, g6(), None);
    let mut g = f[..L3 + 40].to_vec();
    g.extend_from_slice(&[IPPROTO_ICMPV6, 1, 5, 2, 0, 0, 1, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
    g.extend_from_slice(&f[MLD..]);
    g[L3 + 4..L3 + 6].copy_from_slice(&(16u16 + 24).to_be_bytes());
    assert_eq!(parse(&g), (report(1, 0), vec![joined(None, g6())]));
}

#[test]
fn hop_by_hop_followed_by_nothing_is_malformed() {
    let f = mld_v1(MLDV1_REPORT, g6(), None);
    let mut g = f[..MLD].to_vec();
    g[L3 + 4..L3 + 6].copy_from_slice(&8u16.to_be_bytes());
    assert_malformed(&g, MalformedReport::Truncated(Layer::Mld));
}

// -----------------------------------------------------------------------------------------------
// Records

/// Overwrites the record count of a v3/MLDv2 report at `msg` and fixes its checksum.
fn set_record_count(f: &mut [u8], msg: usize, n: u16) {
    f[msg + 6..msg + 8].copy_from_slice(&n.to_be_bytes());
    fix_checksums(f);
}

#[test]
fn record_count_beyond_frame_is_malformed() {
    let mut f = igmpv3_report(&[Record::new(2, g4(), 0)], None);
    set_record_count(&mut f, IGMP, 2);
    assert_malformed(&f, MalformedReport::RecordCountBeyondMessage(2));
    let mut f = mldv2_report(&[Record::new(2, g6(), 0)], true, None);
    set_record_count(&mut f, MLD, 65535);
    assert_malformed(&f, MalformedReport::RecordCountBeyondMessage(65535));
}

#[test]
fn source_count_beyond_frame_is_malformed() {
    let mut f = igmpv3_report(&[Record::new(1, g4(), 2)], None);
    f[IGMP + 8 + 2..IGMP + 8 + 4].copy_from_slice(&3u16.to_be_bytes());
    fix_checksums(&mut f);
    assert_malformed(&f, MalformedReport::SourcesBeyondMessage);
    let mut f = mldv2_report(&[Record::new(1, g6(), 1)], true, None);
    f[MLD + 8 + 2..MLD + 8 + 4].copy_from_slice(&0xffffu16.to_be_bytes());
    fix_checksums(&mut f);
    assert_malformed(&f, MalformedReport::SourcesBeyondMessage);
}

#[test]
fn aux_len_beyond_frame_is_malformed() {
    let mut r = Record::new(2, g4(), 1);
    r.aux_words = 1;
    let mut f = igmpv3_report(&[r.clone()], None);
    assert_eq!(
        parse(&f).0,
        report(1, 0),
        "aux data within the message is fine"
    );
    f[IGMP + 8 + 1] = 2;
    fix_checksums(&mut f);
    assert_malformed(&f, MalformedReport::AuxDataBeyondMessage);
    let mut f = mldv2_report(&[Record::new(2, g6(), 0)], false, None);
    f[L3 + 40 + 8 + 1] = 255;
    fix_checksums(&mut f);
    assert_malformed(&f, MalformedReport::AuxDataBeyondMessage);
}

#[test]
fn unknown_record_type_is_ignored_and_the_rest_applies() {
    let recs = [
        Record::new(0, v4(239, 0, 0, 1), 0),
        Record::new(CHANGE_TO_EXCLUDE, g4(), 0),
        Record::new(7, v4(239, 0, 0, 2), 1),
        Record::new(200, v4(239, 0, 0, 3), 0),
    ];
    let (v, out) = parse(&igmpv3_report(&recs, None));
    assert_eq!((v, out), (report(1, 3), vec![joined(None, g4())]));
}

#[test]
fn group_not_multicast_is_malformed() {
    assert_malformed(
        &igmp_v2(IGMPV2_REPORT, v4(10, 0, 0, 1), None),
        MalformedReport::GroupNotMulticast(v4(10, 0, 0, 1)),
    );
    assert_malformed(
        &mld_v1(MLDV1_REPORT, v6("fd00::1"), None),
        MalformedReport::GroupNotMulticast(v6("fd00::1")),
    );
}

#[test]
fn malformed_record_after_valid_ones_emits_nothing() {
    let recs = [
        Record::new(CHANGE_TO_EXCLUDE, g4(), 0),
        Record::new(CHANGE_TO_EXCLUDE, v4(239, 9, 9, 9), 0),
        Record::new(CHANGE_TO_EXCLUDE, v4(192, 168, 0, 1), 0),
    ];
    assert_malformed(
        &igmpv3_report(&recs, None),
        MalformedReport::GroupNotMulticast(v4(192, 168, 0, 1)),
    );
    let mut f = mldv2_report(
        &[Record::new(2, g6(), 0), Record::new(2, v6("ff05::1"), 0)],
        true,
        None,
    );
    set_record_count(&mut f, MLD, 3);
    assert_malformed(&f, MalformedReport::RecordCountBeyondMessage(3));
}

#[test]
fn node_local_ipv6_groups_are_ignored() {
    let (v, out) = parse(&mld_v1(MLDV1_REPORT, v6("ff01::1"), None));
    assert_eq!((v, out), (report(0, 1), vec![]));
    let recs = [
        Record::new(2, v6("ff00::5"), 0),
        Record::new(2, v6("ff11::5"), 0),
        Record::new(2, v6("ff02::5"), 0),
    ];
    let (v, out) = parse(&mldv2_report(&recs, true, None));
    assert_eq!((v, out), (report(1, 2), vec![joined(None, v6("ff02::5"))]));
}

// -----------------------------------------------------------------------------------------------
// General queries toward the guest

#[test]
fn igmpv3_general_query_is_a_valid_query() {
    let src = [0x02, 0, 0, 0, 0, 0x51];
    let f = igmpv3_general_query(src, [0, 0, 0, 0], QueryRound::Periodic);
    let startup = igmpv3_general_query(src, [0, 0, 0, 0], QueryRound::Startup);
    assert_eq!(startup[IGMP + 1], 10, "startup max response 1 s");
    assert_eq!(
        fold(sum16(&startup[IGMP..], 0)),
        0xffff,
        "startup IGMP checksum"
    );
    assert_eq!(parse(&f).0, Verdict::Query);
    assert_eq!(f[..6], [0x01, 0, 0x5e, 0, 0, 1]);
    assert_eq!(f[6..12], src);
    let ip = &f[L3..L3 + 24];
    assert_eq!(fold(sum16(ip, 0)), 0xffff, "IPv4 header checksum");
    assert_eq!((ip[0], ip[8], ip[9]), (0x46, 1, 2), "IHL 6, TTL 1, IGMP");
    assert_eq!(ip[20..24], [0x94, 4, 0, 0], "Router Alert");
    assert_eq!(ip[16..20], [224, 0, 0, 1]);
    let q = &f[IGMP..];
    assert_eq!(q.len(), 12, "IGMPv3 query length");
    assert_eq!(fold(sum16(q, 0)), 0xffff, "IGMP checksum");
    assert_eq!(q[0], 0x11);
    assert_eq!(q[1], 100, "max response 10 s");
    assert_eq!(q[4..8], [0; 4], "general query");
    assert_eq!((q[8] & 7, q[9]), (2, 125), "QRV, QQIC");
}

#[test]
fn mldv2_general_query_is_a_valid_query() {
    let src = [0x02, 0, 0, 0, 0, 0x51];
    let f = mldv2_general_query(src, QueryRound::Periodic);
    let startup = mldv2_general_query(src, QueryRound::Startup);
    assert_eq!(
        startup[MLD + 4..MLD + 6],
        1000u16.to_be_bytes(),
        "startup max response 1 s"
    );
    assert_eq!(parse(&startup).0, Verdict::Query, "startup query checksum");
    assert_eq!(parse(&f).0, Verdict::Query);
    assert_eq!(f[..6], [0x33, 0x33, 0, 0, 0, 1]);
    let ip = &f[L3..L3 + 40];
    assert_eq!(ip[7], 1, "hop limit 1");
    assert_eq!(ip[8..10], [0xfe, 0x80], "link-local source (RFC 3810 §6.2)");
    assert_eq!(ip[8..24], link_local_of(src));
    assert_eq!(ip[24..40], v6_bytes("ff02::1"));
    assert_eq!(
        f[L3 + 40..L3 + 44],
        [58, 0, 5, 2],
        "hop-by-hop Router Alert"
    );
    assert_eq!(f[L3 + 44..L3 + 46], [0, 0], "Router Alert value 0: MLD");
    let q = &f[MLD..];
    assert_eq!(q.len(), 28, "MLDv2 query length");
    let p = pseudo_sum(&ip[8..24], &ip[24..40], q.len(), 58);
    assert_eq!(fold(sum16(q, p)), 0xffff, "ICMPv6 checksum");
    assert_eq!(q[0], 130);
    assert_eq!(
        u16::from_be_bytes([q[4], q[5]]),
        10_000,
        "max response 10 s"
    );
    assert_eq!(q[8..24], [0; 16], "general query");
    assert_eq!((q[24] & 7, q[25]), (2, 125), "QRV, QQIC");
}

fn v6_bytes(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

#[test]
fn checksum_matches_the_rfc1071_example() {
    // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
    let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(fold(sum16(&data, 0)), 0xddf2);
    assert_eq!(checksum(&data, 0), !0xddf2);
    // Odd length pads with a zero byte.
    assert_eq!(fold(sum16(&[0x12, 0x34, 0x56], 0)), 0x1234 + 0x5600);
}

// -----------------------------------------------------------------------------------------------
// Membership table

const S: Duration = Duration::from_secs(1);

fn table(max_groups: usize) -> MembershipTable {
    MembershipTable::new(TableConfig {
        max_groups,
        ..TableConfig::default()
    })
}

fn member(group: GroupAddr, joined: bool) -> Membership {
    Membership {
        vlan: None,
        group,
        mac: group.mac(),
        joined,
    }
}

fn step(t: &mut MembershipTable, m: Membership, now: Duration) -> Diff {
    let mut d = Diff::with_capacity(t.config().max_groups);
    t.apply(&m, now, &mut d);
    d
}

#[test]
fn join_installs_the_mac_once_and_refresh_changes_nothing() {
    let mut t = table(4);
    let d = step(&mut t, member(g4(), true), S);
    assert_eq!(d.add, [g4().mac()]);
    assert!(d.remove.is_empty() && d.allmulti.is_none());
    assert!(step(&mut t, member(g4(), true), 2 * S).is_empty());
    let c = t.counters();
    assert_eq!((c.groups, c.joins, c.refreshes), (1, 1, 1));
    assert_eq!(t.macs().collect::<Vec<_>>(), [g4().mac()]);
}

#[test]
fn groups_sharing_a_mac_keep_it_until_the_last_leaves() {
    let (a, b) = (v4(224, 1, 2, 3), v4(239, 129, 2, 3));
    assert_eq!(a.mac(), b.mac());
    let mut t = table(4);
    assert_eq!(step(&mut t, member(a, true), S).add, [a.mac()]);
    assert!(step(&mut t, member(b, true), S).is_empty());
    assert!(
        step(&mut t, member(a, false), S).is_empty(),
        "b still needs it"
    );
    assert_eq!(t.macs().count(), 1);
    assert_eq!(step(&mut t, member(b, false), S).remove, [a.mac()]);
    assert_eq!(t.macs().count(), 0);
    assert_eq!(t.counters().leaves, 2);
}

#[test]
fn same_group_on_two_vlans_is_two_memberships() {
    let mut t = table(4);
    let on = |vlan| Membership {
        vlan,
        ..member(g6(), true)
    };
    assert_eq!(step(&mut t, on(Some(10)), S).add, [g6().mac()]);
    assert!(step(&mut t, on(Some(20)), S).is_empty());
    assert_eq!(t.groups(), 2);
    let off = Membership {
        joined: false,
        ..on(Some(20))
    };
    assert!(step(&mut t, off, S).is_empty(), "VLAN 10 still a member");
    assert_eq!(t.macs().count(), 1);
}

#[test]
fn leave_of_an_unknown_group_changes_nothing() {
    let mut t = table(4);
    assert!(step(&mut t, member(g4(), false), S).is_empty());
    assert_eq!(t.counters().leaves, 0);
}

#[test]
fn group_expires_after_max_age_and_not_before() {
    let mut t = table(4);
    step(&mut t, member(g4(), true), 10 * S);
    let mut d = Diff::with_capacity(4);
    let age = DEFAULT_MEMBERSHIP_TIMEOUT;
    assert_eq!(t.next_deadline(), Some(10 * S + age));
    t.expire(10 * S + age - Duration::from_nanos(1), &mut d);
    assert!(d.is_empty());
    assert_eq!(t.groups(), 1);
    t.expire(10 * S + age, &mut d);
    assert_eq!(d.remove, [g4().mac()]);
    assert_eq!((t.groups(), t.counters().expiries), (0, 1));
    assert_eq!(t.next_deadline(), None);
}

#[test]
fn refresh_postpones_expiry() {
    let mut t = table(4);
    step(&mut t, member(g4(), true), S);
    step(&mut t, member(g6(), true), S);
    step(&mut t, member(g4(), true), 200 * S);
    let mut d = Diff::with_capacity(4);
    t.expire(261 * S, &mut d);
    assert_eq!(d.remove, [g6().mac()]);
    assert_eq!(t.next_deadline(), Some(460 * S));
    d.clear();
    t.expire(460 * S, &mut d);
    assert_eq!(d.remove, [g4().mac()]);
}

#[test]
fn clock_going_backwards_neither_panics_nor_expires() {
    let mut t = table(4);
    step(&mut t, member(g4(), true), 1000 * S);
    let mut d = Diff::with_capacity(4);
    t.expire(S, &mut d);
    step(&mut t, member(g4(), false), S);
    assert_eq!(t.counters().expiries, 0);
    assert_eq!(t.counters().leaves, 1);
}

#[test]
fn join_past_the_cap_turns_allmulti_on_once_and_is_refused() {
    let mut t = table(2);
    step(&mut t, member(v4(239, 0, 0, 1), true), S);
    step(&mut t, member(v4(239, 0, 0, 2), true), S);
    let d = step(&mut t, member(v4(239, 0, 0, 3), true), S);
    assert_eq!(d.allmulti, Some(true));
    assert!(d.add.is_empty(), "the refused group is not installed");
    assert!(step(&mut t, member(v4(239, 0, 0, 4), true), S).is_empty());
    let c = t.counters();
    assert_eq!((c.groups, c.refused_joins, c.overflows), (2, 2, 1));
    assert!(t.allmulti());
    // A refresh of a stored group is not a refusal.
    assert!(step(&mut t, member(v4(239, 0, 0, 1), true), S).is_empty());
    assert_eq!(t.counters().refused_joins, 2);
}

#[test]
fn allmulti_ends_when_below_the_cap_and_the_hold_is_over() {
    let mut t = table(2);
    let hold = t.config().overflow_hold;
    step(&mut t, member(v4(239, 0, 0, 1), true), S);
    step(&mut t, member(v4(239, 0, 0, 2), true), S);
    step(&mut t, member(v4(239, 0, 0, 3), true), 10 * S);
    // Below the cap, but a join was refused 5 s ago: the refused group may still be wanted.
    let d = step(&mut t, member(v4(239, 0, 0, 2), false), 15 * S);
    assert_eq!(d.remove, [v4(239, 0, 0, 2).mac()]);
    assert_eq!(d.allmulti, None);
    // The next deadline is the remaining group's timeout (joined at 1 s), before the hold.
    assert_eq!(t.next_deadline(), Some(S + DEFAULT_MEMBERSHIP_TIMEOUT));
    let mut d = Diff::with_capacity(2);
    t.expire(S + DEFAULT_MEMBERSHIP_TIMEOUT, &mut d);
    assert_eq!(d.remove, [v4(239, 0, 0, 1).mac()]);
    assert_eq!(d.allmulti, None, "hold not over");
    assert_eq!(t.next_deadline(), Some(10 * S + hold));
    d.clear();
    t.expire(10 * S + hold, &mut d);
    assert_eq!(d.allmulti, Some(false));
    assert!(!t.allmulti());
    assert_eq!(t.next_deadline(), None);
    // Back at the cap without refusal: allmulti stays off.
    let d = step(&mut t, member(v4(239, 0, 0, 5), true), 300 * S);
    assert_eq!(d.allmulti, None);
}

#[test]
fn allmulti_ends_at_once_with_a_zero_hold() {
    let mut t = MembershipTable::new(TableConfig {
        max_groups: 1,
        overflow_hold: Duration::ZERO,
        ..TableConfig::default()
    });
    step(&mut t, member(v4(239, 0, 0, 1), true), S);
    assert_eq!(
        step(&mut t, member(v4(239, 0, 0, 2), true), S).allmulti,
        Some(true)
    );
    let d = step(&mut t, member(v4(239, 0, 0, 1), false), S);
    assert_eq!(d.allmulti, Some(false));
}

#[test]
fn clear_removes_every_mac_and_allmulti() {
    let mut t = table(3);
    for i in 0..5 {
        step(&mut t, member(v4(239, 0, 0, i), true), S);
    }
    assert!(t.allmulti());
    let mut d = Diff::with_capacity(3);
    t.clear(&mut d);
    let removed: BTreeSet<_> = d.remove.iter().copied().collect();
    let want: BTreeSet<_> = (0..3).map(|i| v4(239, 0, 0, i).mac()).collect();
    assert_eq!(removed, want);
    assert_eq!(d.allmulti, Some(false));
    assert!(d.add.is_empty());
    assert_eq!((t.groups(), t.macs().count(), t.allmulti()), (0, 0, false));
    assert_eq!(t.counters().groups, 0);
    d.clear();
    t.clear(&mut d);
    assert!(d.is_empty(), "clearing twice does nothing");
}

#[test]
fn diff_cancels_a_join_and_leave_within_one_batch() {
    let mut t = table(4);
    let mut d = Diff::with_capacity(4);
    t.apply(&member(g4(), true), S, &mut d);
    t.apply(&member(g4(), false), S, &mut d);
    assert!(d.is_empty());
    t.apply(&member(g6(), true), S, &mut d);
    d.clear(); // applied
    t.apply(&member(g6(), false), S, &mut d);
    t.apply(&member(g6(), true), S, &mut d);
    assert!(
        d.is_empty(),
        "remove then add of an installed MAC is no change"
    );
}

#[test]
fn learn_counts_reports_and_malformed_ones() {
    let mut t = table(8);
    let mut d = Diff::with_capacity(8);
    let f = mldv2_report(
        &[Record::new(2, g6(), 0), Record::new(2, v6("ff05::1"), 0)],
        true,
        None,
    );
    assert_eq!(t.learn(&f, f.len(), S, &mut d), report(2, 0));
    assert_eq!(d.add.len(), 2);
    let mut bad = f.clone();
    bad[MLD + 2] ^= 1;
    assert!(matches!(
        t.learn(&bad, bad.len(), S, &mut d),
        Verdict::Malformed(_)
    ));
    let long = mldv2_report(
        &(0..100)
            .map(|i| Record::new(2, v6(&format!("ff05::{i:x}")), 0))
            .collect::<Vec<_>>(),
        true,
        None,
    );
    t.learn(&long[..COPY_LEN], long.len(), S, &mut d);
    t.learn(&unicast_udp(60), 60, S, &mut d);
    let c = t.counters();
    assert_eq!(
        (c.reports, c.malformed, c.incomplete, c.joins),
        (1, 1, 1, 2)
    );
}

#[test]
fn table_never_grows_its_memory() {
    // Proxy for "no allocation per update" (tests/dp_no_alloc.rs counts allocations): the slot
    // arrays and the diff keep the capacity they were built with through churn at the cap.
    let mut t = table(16);
    let slots = (
        t.groups.slots.len(),
        t.macs.slots.len(),
        t.scratch.capacity(),
    );
    let mut d = Diff::with_capacity(16);
    let caps = (d.add.capacity(), d.remove.capacity());
    for round in 0..50u32 {
        for i in 0..40u8 {
            let g = v4(239, 0, (round % 7) as u8, i);
            t.apply(
                &member(g, round % 3 != 2),
                Duration::from_secs(u64::from(round)),
                &mut d,
            );
        }
        t.expire(Duration::from_secs(u64::from(round) * 30), &mut d);
        d.clear();
    }
    t.clear(&mut d);
    assert_eq!(
        slots,
        (
            t.groups.slots.len(),
            t.macs.slots.len(),
            t.scratch.capacity()
        )
    );
    assert_eq!(caps, (d.add.capacity(), d.remove.capacity()));
}

/// The table against a plain model over a long pseudo-random run: same groups, and applying
/// every diff to a set of installed MACs gives the table's MACs, with no add of an installed
/// MAC and no remove of an absent one.
#[test]
fn table_agrees_with_a_model_through_random_churn() {
    let mut t = MembershipTable::new(TableConfig {
        max_groups: 12,
        max_age: 50 * S,
        overflow_hold: 20 * S,
    });
    let mut model: BTreeMap<(Option<u16>, GroupAddr), Duration> = BTreeMap::new();
    let mut installed: BTreeSet<[u8; 6]> = BTreeSet::new();
    let mut allmulti = false;
    let mut d = Diff::with_capacity(12);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut now = Duration::ZERO;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        now += Duration::from_millis(x % 4000);
        let group = if x & 1 == 0 {
            v4(239, 128 * ((x >> 3) & 1) as u8, 0, ((x >> 4) % 10) as u8)
        } else {
            v6(&format!("ff02::{:x}", (x >> 4) % 10))
        };
        let vlan = ((x >> 20) % 3 == 0).then_some(5);
        let op = (x >> 30) % 100;
        if op < 65 {
            let m = Membership {
                vlan,
                group,
                mac: group.mac(),
                joined: op < 50,
            };
            t.apply(&m, now, &mut d);
            if m.joined {
                if model.contains_key(&(vlan, group)) || model.len() < 12 {
                    model.insert((vlan, group), now);
                }
            } else {
                model.remove(&(vlan, group));
            }
        } else if op < 99 {
            t.expire(now, &mut d);
            model.retain(|_, seen| now.saturating_sub(*seen) < 50 * S);
        } else {
            t.clear(&mut d);
            model.clear();
        }
        for m in &d.add {
            assert!(installed.insert(*m), "added twice: {m:02x?}");
        }
        for m in &d.remove {
            assert!(installed.remove(m), "removed but absent: {m:02x?}");
        }
        if let Some(on) = d.allmulti {
            assert_ne!(on, allmulti, "allmulti change to the same state");
            allmulti = on;
        }
        d.clear();
        let have: BTreeSet<_> = t.memberships().collect();
        let want: BTreeSet<_> = model.keys().copied().collect();
        assert_eq!(have, want);
        let macs: BTreeSet<_> = t.macs().collect();
        let want_macs: BTreeSet<_> = model.keys().map(|(_, g)| g.mac()).collect();
        assert_eq!(macs, want_macs);
        assert_eq!(installed, macs);
        assert_eq!(allmulti, t.allmulti());
        assert_eq!(t.counters().groups, model.len() as u64);
    }
    let c = t.counters();
    assert!(c.overflows > 0 && c.expiries > 0 && c.leaves > 0, "{c:?}");
}
