//! The QMP watcher (`server::qmp`) against a real QEMU: the test guest on macvhost (vhost-user,
//! TCG, a macvtap in a namespace the test makes), QEMU with two QMP sockets — one for the
//! watcher run in this test, one for macvhost's own `--qmp` — and, inside the guest, a MAC
//! change and a multicast join and leave. Proves that under vhost-user QEMU reports the guest's
//! filter changes, that the watcher sees them (MAC, group MAC, leave), and that macvhost
//! without `--trust-guest-rx-filters` says once that the guest left its MAC and leaves the
//! macvtap's MAC alone. Needs root, `ip`, QEMU and the guest image; otherwise it skips through
//! `require!`, or fails under `MACVHOST_E2E_REQUIRED=1`.

#[path = "support/guest.rs"]
mod guest;

mod common;

use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use common::{require, Daemon, MacvtapTopo, NetNs};
use guest::{one_at_a_time as one_guest_at_a_time, secs, Qemu, QemuConfig, GUEST};
use macvhost::host::MacAddr;
use macvhost::server::qmp::{RxFilter, WatchConfig, Watcher};

/// Filters from the watcher, kept in arrival order.
struct Seen {
    rx: Receiver<RxFilter>,
    all: Vec<(Instant, RxFilter)>,
}

impl Seen {
    /// Waits for a filter that satisfies `pred` (already seen ones count); returns it and when
    /// it arrived.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&RxFilter) -> bool,
    ) -> (Instant, RxFilter) {
        if let Some(hit) = self.all.iter().rev().find(|(_, f)| pred(f)) {
            return hit.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(f) => {
                    println!("qmp: {f}");
                    let hit = (Instant::now(), f);
                    self.all.push(hit.clone());
                    if pred(&hit.1) {
                        return hit;
                    }
                }
                Err(_) => panic!(
                    "no filter with {what} within {timeout:?}; seen:\n{}",
                    self.all
                        .iter()
                        .map(|(_, f)| format!("  {f:?}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }
}

/// What both tests start from: the guest lock, a namespace with a bridge macvtap and its peer,
/// the guest's MAC (the macvtap's) and a temp dir for sockets and logs.
struct Net {
    _one: std::sync::MutexGuard<'static, ()>,
    ns: NetNs,
    topo: MacvtapTopo,
    guest_mac: String,
    dir: tempfile::TempDir,
}

impl Net {
    fn new() -> Net {
        let _one = one_guest_at_a_time();
        let ns = NetNs::quiet("guest");
        let topo = guest::macvtap_with_peer(&ns);
        Net {
            _one,
            guest_mac: topo.macvtap_mac.to_string(),
            ns,
            topo,
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

#[test]
fn qmp_reports_the_guests_new_mac_and_multicast_group_under_vhost_user() {
    require!(GUEST);
    let net = Net::new();
    let new_mac = "02:6d:76:68:00:99";
    let group = MacAddr([0x01, 0x00, 0x5e, 0x01, 0x02, 0x03]); // 239.1.2.3

    let qmp_test = net.dir.path().join("qmp-test.sock");
    let qmp_mvh = net.dir.path().join("qmp-macvhost.sock");
    let qmp_mvh_arg = qmp_mvh.to_str().unwrap();
    let mut mvh = Daemon::spawn(
        &net.ns,
        net.dir.path(),
        &["--macvtap", net.topo.macvtap, "--qmp", qmp_mvh_arg],
    );

    // The watcher starts before QEMU exists: it retries until the socket appears.
    let (tx, rx) = channel();
    let watcher = Watcher::spawn(
        WatchConfig::new(
            qmp_test.clone(),
            None,
            Some(MacAddr::parse(&net.guest_mac).unwrap()),
        ),
        move |f: &RxFilter| {
            let _ = tx.send(f.clone());
        },
    )
    .unwrap();
    let mut seen = Seen {
        rx,
        all: Vec::new(),
    };

    let mut cfg = QemuConfig::vhost_user("qmp", mvh.socket(), 1);
    cfg.mac = net.guest_mac.clone();
    for sock in [&qmp_test, &qmp_mvh] {
        cfg.extra_args.push("-qmp".into());
        cfg.extra_args
            .push(format!("unix:{},server=on,wait=off", sock.display()));
    }
    let vm = Qemu::spawn(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let ready = vm
        .wait_ready(secs(300))
        .unwrap_or_else(|e| panic!("{e}\n--- macvhost ---\n{}", mvh.log_text()));
    assert_eq!(ready.mac, net.guest_mac);
    println!("guest ready in {:.2} s", ready.wall.as_secs_f64());

    // The driver is up: not promiscuous, our MAC, the all-hosts groups.
    let (_, f) = seen.wait_for("the guest's driver's filter", secs(60), |f| {
        !f.promisc && f.multicast.contains(&MacAddr([0x01, 0, 0x5e, 0, 0, 1]))
    });
    assert_eq!(f.mac.to_string(), net.guest_mac);
    assert_eq!(
        f.nic, "virtio-net-pci.0",
        "a NIC without id, found without --qmp-nic"
    );

    // Join 239.1.2.3 on eth0.
    let t = Instant::now();
    let o = vm.exec_ok(
        "mvh-mcast recv eth0 239.1.2.3 5000 600 > /tmp/recv.out 2>&1 &\n\
         echo $! > /tmp/recv.pid\n\
         i=0; until grep -q joined /tmp/recv.out || [ $i -ge 200 ]; do sleep 0.05; i=$((i+1)); done\n\
         cat /tmp/recv.out",
        secs(120),
    );
    assert!(o.output.contains("joined 239.1.2.3"), "{}", o.output);
    let (at, _) = seen.wait_for("the group's MAC", secs(30), |f| {
        f.multicast.contains(&group)
    });
    println!(
        "join reported {:.2} s after the command was sent",
        at.duration_since(t).as_secs_f64()
    );

    // A new MAC, with the interface up.
    let t = Instant::now();
    vm.exec_ok(&format!("ip link set eth0 address {new_mac}"), secs(60));
    let (at, f) = seen.wait_for("the new MAC", secs(30), |f| f.mac.to_string() == new_mac);
    assert!(f.multicast.contains(&group), "the group stays: {f:?}");
    println!(
        "MAC change reported {:.2} s after the command was sent",
        at.duration_since(t).as_secs_f64()
    );

    // Leave: the group's MAC goes away.
    let t = Instant::now();
    let o = vm.exec_ok(
        "kill -TERM $(cat /tmp/recv.pid)\n\
         i=0; until grep -q '^left' /tmp/recv.out || [ $i -ge 200 ]; do sleep 0.05; i=$((i+1)); done\n\
         cat /tmp/recv.out",
        secs(60),
    );
    assert!(o.output.contains("left 239.1.2.3"), "{}", o.output);
    let (at, f) = seen.wait_for("the group gone", secs(30), |f| {
        !f.multicast.contains(&group) && f.mac.to_string() == new_mac
    });
    println!(
        "leave reported {:.2} s after the command was sent: {f}",
        at.duration_since(t).as_secs_f64()
    );
    let [connects, events, queries, filters, bad] = watcher.stats().snapshot();
    println!(
        "watcher: connects {connects} events {events} queries {queries} filters {filters} \
         bad_input {bad}"
    );
    assert_eq!(bad, 0);
    assert!(connects >= 1);

    // macvhost followed the same NIC on its own socket, without trust: one line, and the
    // macvtap keeps its MAC.
    let said = format!(
        "the guest changed its MAC to {new_mac}; its receive path stays on {} because \
         --trust-guest-rx-filters is off",
        net.guest_mac
    );
    let saw = common::wait_until(secs(10), || mvh.log_text().contains(&said));
    let log = mvh.log_text();
    assert!(saw, "macvhost did not say {said:?}:\n{log}");
    assert_eq!(log.matches(&said).count(), 1, "{log}");
    assert!(log.contains("QMP connected"), "{log}");
    assert_eq!(net.ns.mac(net.topo.macvtap), net.topo.macvtap_mac);
    // Counted once, whether QMP or the TX path saw it first; nothing applied.
    let dev = mvh.device_stats();
    assert_eq!(dev["guest_mac_changes_seen"], 1, "{dev:?}");
    assert_eq!(dev["guest_mac_changes_applied"], 0, "{dev:?}");

    drop(watcher);
    let st = vm.shutdown(secs(120)).expect("guest did not power off");
    assert!(st.success(), "qemu exit status {st}");
    mvh.shutdown_clean();
}

#[test]
fn trusted_guest_mac_change_moves_the_macvtap_and_ping_goes_on() {
    require!(GUEST);
    let net = Net::new();
    let new_mac = "02:6d:76:68:00:98";
    let qmp = net.dir.path().join("qmp.sock");
    let mut mvh = Daemon::spawn_trusting_qmp(&net.ns, net.dir.path(), net.topo.macvtap, &qmp);
    let mut cfg = QemuConfig::vhost_user("qmptrust", mvh.socket(), 1);
    cfg.mac = net.guest_mac.clone();
    cfg.extra_args.push("-qmp".into());
    cfg.extra_args
        .push(format!("unix:{},server=on,wait=off", qmp.display()));
    let vm = Qemu::spawn(&cfg).unwrap_or_else(|e| panic!("{e}"));
    vm.wait_ready(secs(300))
        .unwrap_or_else(|e| panic!("{e}\n--- macvhost ---\n{}", mvh.log_text()));
    let ping = || {
        let out = net
            .ns
            .command("ping")
            .args(["-c", "3", "-W", "2", "-i", "0.5", guest::GUEST_IP])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(" 3 received")
    };
    assert!(ping(), "the guest answers before the change");
    let t = Instant::now();
    vm.exec_ok(&format!("ip link set eth0 address {new_mac}"), secs(60));
    assert!(
        common::wait_until(secs(30), || net.ns.mac(net.topo.macvtap).to_string()
            == new_mac),
        "the macvtap never took the guest's new MAC:\n{}",
        mvh.log_text()
    );
    println!(
        "macvtap carries the new MAC {:.2} s after the command was sent",
        t.elapsed().as_secs_f64()
    );
    // The peer's ARP entry still names the old MAC: the guest announces nothing by itself.
    net.ns.ip(&["neigh", "flush", "dev", net.topo.peer]);
    assert!(ping(), "the guest answers on its new MAC");
    let dev = mvh.device_stats();
    assert!(dev["guest_mac_changes_applied"] >= 1, "{dev:?}");
    let st = vm.shutdown(secs(120)).expect("guest did not power off");
    assert!(st.success(), "qemu exit status {st}");
    mvh.shutdown_clean();
}
