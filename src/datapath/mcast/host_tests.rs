//! Tests of this module against the host: the table's diffs applied to a real macvtap through
//! `host::mcfilter`, and a Linux host answering our general queries. Root only (network
//! namespaces, `ip`); they skip through `require!` otherwise.

use std::fs;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::*;
use crate::host::mcfilter::tests::{
    fmt, ifindex, maddrs, packet_socket, setup, sys_flags, IFF_ALLMULTI, ROOT,
};
use crate::host::mcfilter::McFilter;
use crate::require;
use crate::testkit::netns::NetNs;

#[test]
fn table_diffs_applied_to_the_macvtap_follow_reports_and_clear() {
    require!(ROOT);
    let ns = setup();
    ns.run(|| {
        let mut filter = McFilter::open(ifindex("mvt0")).unwrap();
        let mut table = MembershipTable::new(TableConfig {
            max_groups: 3,
            ..TableConfig::default()
        });
        let mut diff = Diff::with_capacity(3);
        let now = Duration::from_secs(1);
        let groups: Vec<_> = (1..=4u8)
            .map(|i| frames::v6(&format!("ff02::1:ff00:{i:x}")))
            .collect();
        let recs: Vec<_> = groups
            .iter()
            .map(|g| frames::Record::new(4, *g, 0))
            .collect();
        let report = frames::mldv2_report(&recs, true, None);
        table.learn(&report, report.len(), now, &mut diff);
        filter
            .apply(&diff.remove, &diff.add, diff.allmulti)
            .unwrap();
        let list = maddrs("mvt0");
        for g in &groups[..3] {
            assert!(list.contains(&fmt(g.mac())), "{g} missing from {list:?}");
        }
        assert!(!list.contains(&fmt(groups[3].mac())), "past the cap");
        assert_ne!(
            sys_flags("mvt0") & IFF_ALLMULTI,
            0,
            "cap overflow → allmulticast"
        );

        diff.clear();
        table.clear(&mut diff);
        filter
            .apply(&diff.remove, &diff.add, diff.allmulti)
            .unwrap();
        let list = maddrs("mvt0");
        assert!(
            groups.iter().all(|g| !list.contains(&fmt(g.mac()))),
            "{list:?}"
        );
        assert_eq!(sys_flags("mvt0") & IFF_ALLMULTI, 0);
    });
}

/// Our general queries are ones a Linux host answers, and its answers are reports our parser
/// reads: veth `q0` is the querier's side (an AF_PACKET socket), `q1` a Linux "guest" that
/// joined 239.1.2.3 and ff0e::1234 (`autojoin`). After its unsolicited reports are over, the
/// queries go out of q0 and the reports that come back (within the startup query's 1 s max response) name
/// both groups, and q1's solicited-node group.
#[test]
fn linux_answers_our_general_queries_with_reports_we_parse() {
    require!(ROOT);
    let ns = NetNs::new("mcast");
    ns.ip(&["link", "add", "q0", "type", "veth", "peer", "name", "q1"]);
    ns.ip(&["link", "set", "q0", "up"]);
    ns.ip(&["link", "set", "q1", "up"]);
    ns.ip(&["addr", "add", "10.9.0.2/24", "dev", "q1"]);
    ns.ip(&["addr", "add", "239.1.2.3/32", "dev", "q1", "autojoin"]);
    ns.ip(&[
        "-6",
        "addr",
        "add",
        "ff0e::1234/128",
        "dev",
        "q1",
        "autojoin",
    ]);
    ns.run(|| {
        let sock = packet_socket(ifindex("q0"));
        let q1_mac = {
            let s = fs::read_to_string("/sys/class/net/q1/address").unwrap();
            let b: Vec<u8> = s
                .trim()
                .split(':')
                .map(|x| u8::from_str_radix(x, 16).unwrap())
                .collect();
            [b[0], b[1], b[2], b[3], b[4], b[5]]
        };
        // Let the unsolicited reports (robustness 2, 1 s apart) and DAD pass, then drain.
        std::thread::sleep(Duration::from_secs(3));
        let mut buf = [0u8; 4096];
        while nix::unistd::read(&sock, &mut buf).is_ok() {}

        // Control: q1 sends no report now (router solicitations may go on), so the reports
        // that come after the queries answer them.
        let quiet_until = Instant::now() + Duration::from_secs(1);
        while let Some(left) = quiet_until.checked_duration_since(Instant::now()) {
            let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
            let ms = PollTimeout::try_from(left.as_millis() as i32).unwrap();
            if poll(&mut fds, ms).unwrap() == 0 {
                break;
            }
            if let Ok(n) = nix::unistd::read(&sock, &mut buf) {
                let v = parse_report(&buf[..n], n, |_| {});
                assert!(
                    buf[6..12] != q1_mac || !matches!(v, Verdict::Report { .. }),
                    "q1 still sends unsolicited reports; the test would prove nothing"
                );
            }
        }

        let querier = [0x02, 0x71, 0x75, 0x65, 0x72, 0x79];
        nix::unistd::write(&sock, &igmpv3_general_query(querier, [0; 4], QueryRound::Startup)).unwrap();
        nix::unistd::write(&sock, &mldv2_general_query(querier, QueryRound::Startup)).unwrap();

        let want = [
            GroupAddr::V4([239, 1, 2, 3]),
            GroupAddr::V6("ff0e::1234".parse::<std::net::Ipv6Addr>().unwrap().octets()),
        ];
        let mut seen = Vec::new();
        // The startup query's max response time, and slack for a loaded machine: answers that
        // came only within the periodic 10 s would fail here.
        let deadline = Instant::now() + STARTUP_QUERY_RESPONSE_INTERVAL + Duration::from_secs(2);
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
            let ms = PollTimeout::try_from(left.as_millis() as i32).unwrap();
            if poll(&mut fds, ms).unwrap() == 0 {
                break;
            }
            let Ok(n) = nix::unistd::read(&sock, &mut buf) else {
                continue;
            };
            if buf[6..12] != q1_mac {
                continue; // our own queries, looped back by the packet socket
            }
            let v = parse_report(&buf[..n], n, |m| {
                if m.joined {
                    seen.push(m.group)
                }
            });
            assert!(!matches!(v, Verdict::Malformed(_)), "{v:?}");
            let sol_node = seen.iter().any(|g| g.mac()[..3] == [0x33, 0x33, 0xff] && g.mac()[3..] == q1_mac[3..]);
            if want.iter().all(|g| seen.contains(g)) && sol_node {
                return;
            }
        }
        panic!("reports answering our queries named {seen:?}, want {want:?} and q1's solicited-node group");
    });
}
