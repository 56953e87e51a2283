//! The QMP watcher against a fake QEMU: a `UnixListener` in the test speaking the protocol,
//! well and badly.

use super::*;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::sync::mpsc::{channel, Receiver};

const GUEST_MAC: &str = "52:54:00:4d:56:48";
const NEW_MAC: &str = "02:11:22:33:44:55";

/// A QMP server socket in a tempdir.
struct FakeQemu {
    listener: UnixListener,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeQemu {
    fn new() -> FakeQemu {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        FakeQemu {
            listener,
            path,
            _dir: dir,
        }
    }

    /// The next connection from the watcher (within 5 s).
    fn accept(&self) -> Peer {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    return Peer {
                        r: BufReader::new(s.try_clone().unwrap()),
                        w: s,
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the watcher never connected");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// Fast timings for tests.
    fn config(&self) -> WatchConfig {
        WatchConfig {
            path: self.path.clone(),
            nic: None,
            mac_hint: Some(MacAddr::parse(GUEST_MAC).unwrap()),
            reply_timeout: Duration::from_millis(500),
            backoff_first: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
        }
    }
}

/// The fake QEMU's end of one connection.
struct Peer {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Peer {
    fn send_raw(&mut self, line: &str) {
        self.w.write_all(line.as_bytes()).unwrap();
        self.w.write_all(b"\r\n").unwrap();
    }

    fn send(&mut self, v: Value) {
        self.send_raw(&v.to_string());
    }

    fn greet(&mut self) {
        self.send(
            json!({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7},
            "package": "fake"}, "capabilities": ["oob"]}}),
        );
    }

    /// The next command the watcher sent: `(execute, arguments, id)`.
    fn command(&mut self) -> (String, Option<Value>, Value) {
        let mut line = String::new();
        let n = self
            .r
            .read_line(&mut line)
            .expect("a command from the watcher");
        assert!(n > 0, "the watcher closed the connection");
        let v: Value = serde_json::from_str(&line).unwrap();
        (
            v["execute"].as_str().unwrap().to_string(),
            v.get("arguments").cloned(),
            v["id"].clone(),
        )
    }

    /// Reads the next command, checks it, returns its id.
    fn expect(&mut self, execute: &str, args: Option<Value>) -> Value {
        let (cmd, a, id) = self.command();
        assert_eq!(cmd, execute);
        assert_eq!(a, args, "arguments of {execute}");
        id
    }

    fn reply(&mut self, id: Value, ret: Value) {
        self.send(json!({"return": ret, "id": id}));
    }

    /// Greeting and `qmp_capabilities`.
    fn handshake(&mut self) {
        self.greet();
        let id = self.expect("qmp_capabilities", None);
        self.reply(id, json!({}));
    }

    /// Handshake, then answers the listing with `nics`.
    fn connect_with(&mut self, nics: Value) {
        self.handshake();
        let id = self.expect("query-rx-filter", None);
        self.reply(id, nics);
    }

    fn event_for(&mut self, name: Option<&str>) {
        let data = match name {
            Some(n) => {
                json!({"name": n, "path": format!("/machine/peripheral/{n}/virtio-backend")})
            }
            None => json!({"path": "/machine/peripheral-anon/device[0]/virtio-backend"}),
        };
        self.send(json!({"timestamp": {"seconds": 1, "microseconds": 2},
            "event": "NIC_RX_FILTER_CHANGED", "data": data}));
    }

    /// True when the watcher sends nothing within `d`.
    fn silent_for(&mut self, d: Duration) -> bool {
        self.w.set_read_timeout(Some(d)).unwrap();
        let mut line = String::new();
        let r = self.r.read_line(&mut line);
        self.w
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        match r {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                true
            }
            Ok(0) => panic!("the watcher closed the connection"),
            Ok(_) => {
                println!("unexpected: {line}");
                false
            }
            Err(e) => panic!("read: {e}"),
        }
    }

    /// True when the watcher closes the connection within 5 s (lines before that are read
    /// and ignored).
    fn closed_by_watcher(&mut self) -> bool {
        let mut line = String::new();
        loop {
            line.clear();
            match self.r.read_line(&mut line) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// A QEMU `RxFilterInfo` like QEMU 7.2 prints it.
fn info(name: &str, mac: &str, multicast: &[&str]) -> Value {
    json!({"promiscuous": false, "name": name, "main-mac": mac, "unicast": "normal",
        "vlan": "none", "vlan-table": [], "unicast-table": [], "multicast": "normal",
        "multicast-overflow": false, "unicast-overflow": false,
        "multicast-table": multicast, "broadcast-allowed": false})
}

fn watch(cfg: WatchConfig) -> (Watcher, Receiver<RxFilter>) {
    let (tx, rx) = channel();
    let w = Watcher::spawn(cfg, move |f: &RxFilter| {
        let _ = tx.send(f.clone());
    })
    .unwrap();
    (w, rx)
}

fn next(rx: &Receiver<RxFilter>) -> RxFilter {
    rx.recv_timeout(Duration::from_secs(5))
        .expect("a filter from the watcher")
}

fn mac(s: &str) -> MacAddr {
    MacAddr(parse_mac(s).unwrap())
}

// ------------------------------------------------------------------ protocol, good input ---

#[test]
fn delivers_the_filter_at_connect_and_after_each_event_for_our_nic() {
    let q = FakeQemu::new();
    let (w, rx) = watch(q.config());
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &["33:33:00:00:00:01"])]));
    let f = next(&rx);
    assert_eq!(f.nic, "net0");
    assert_eq!(f.mac, mac(GUEST_MAC));
    assert_eq!(f.multicast, vec![mac("33:33:00:00:00:01")]);
    assert!(!f.promisc && !f.allmulti() && !f.alluni());

    // The guest takes a new MAC and joins 239.1.2.3.
    p.event_for(Some("net0"));
    let id = p.expect("query-rx-filter", Some(json!({"name": "net0"})));
    p.reply(
        id,
        json!([info(
            "net0",
            NEW_MAC,
            &["01:00:5e:01:02:03", "33:33:00:00:00:01"]
        )]),
    );
    let f = next(&rx);
    assert_eq!(f.mac, mac(NEW_MAC));
    assert_eq!(
        f.multicast,
        vec![mac("01:00:5e:01:02:03"), mac("33:33:00:00:00:01")]
    );
    let [connects, events, queries, filters, bad] = w.stats().snapshot();
    assert_eq!((connects, events, queries, filters, bad), (1, 1, 2, 2, 0));
}

#[test]
fn an_unchanged_filter_is_not_delivered_again() {
    let q = FakeQemu::new();
    let (_w, rx) = watch(q.config());
    let mut p = q.accept();
    let a = info("net0", GUEST_MAC, &[]);
    p.connect_with(json!([a.clone()]));
    next(&rx);
    p.event_for(Some("net0"));
    let id = p.expect("query-rx-filter", Some(json!({"name": "net0"})));
    p.reply(id, json!([a]));
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    // The next real change still comes through.
    p.event_for(Some("net0"));
    let id = p.expect("query-rx-filter", Some(json!({"name": "net0"})));
    let mut b = info("net0", GUEST_MAC, &[]);
    b["promiscuous"] = json!(true);
    b["multicast"] = json!("all");
    p.reply(id, json!([b]));
    let f = next(&rx);
    assert!(f.promisc && f.allmulti());
}

#[test]
fn events_for_other_nics_and_other_events_cause_no_query() {
    let q = FakeQemu::new();
    let (w, rx) = watch(q.config());
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &[])]));
    next(&rx);
    p.event_for(Some("net1"));
    p.send(json!({"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 0}}));
    p.send(json!({"event": "NIC_RX_FILTER_CHANGED", "data": {"name": 7}}));
    assert!(p.silent_for(Duration::from_millis(200)));
    p.event_for(Some("net0"));
    let id = p.expect("query-rx-filter", Some(json!({"name": "net0"})));
    p.reply(id, json!([info("net0", GUEST_MAC, &[])]));
    assert!(p.silent_for(Duration::from_millis(200)));
    assert_eq!(w.stats().snapshot()[1], 1, "one event was ours");
}

#[test]
fn nameless_events_of_a_nic_without_id_are_taken_as_maybe_ours() {
    let q = FakeQemu::new();
    let (_w, rx) = watch(q.config());
    let mut p = q.accept();
    p.connect_with(json!([info("virtio-net-pci.0", GUEST_MAC, &[])]));
    assert_eq!(next(&rx).nic, "virtio-net-pci.0");
    p.event_for(None);
    let id = p.expect("query-rx-filter", Some(json!({"name": "virtio-net-pci.0"})));
    p.reply(id, json!([info("virtio-net-pci.0", NEW_MAC, &[])]));
    assert_eq!(next(&rx).mac, mac(NEW_MAC));
}

#[test]
fn events_during_a_query_cost_one_more_query_not_one_each() {
    let q = FakeQemu::new();
    let (w, rx) = watch(q.config());
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &[])]));
    next(&rx);
    p.event_for(Some("net0"));
    let id = p.expect("query-rx-filter", Some(json!({"name": "net0"})));
    // The guest keeps changing its filter while the answer is on its way.
    for _ in 0..10 {
        p.event_for(Some("net0"));
    }
    p.reply(id, json!([info("net0", GUEST_MAC, &["01:00:5e:00:00:01"])]));
    let id = p.expect("query-rx-filter", Some(json!({"name": "net0"})));
    p.reply(id, json!([info("net0", NEW_MAC, &["01:00:5e:00:00:01"])]));
    assert_eq!(next(&rx).multicast.len(), 1);
    assert_eq!(next(&rx).mac, mac(NEW_MAC));
    assert!(p.silent_for(Duration::from_millis(200)));
    assert_eq!(w.stats().snapshot()[2], 3, "the listing and two queries");
}

#[test]
fn qemu_restart_reconnects_and_delivers_the_filter_again() {
    let q = FakeQemu::new();
    let (w, rx) = watch(q.config());
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &[])]));
    next(&rx);
    drop(p); // QEMU exits
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &[])]));
    // The same filter, delivered again: the consumer re-syncs after a restart.
    assert_eq!(next(&rx).mac, mac(GUEST_MAC));
    assert_eq!(w.stats().snapshot()[0], 2);
}

#[test]
fn qmp_nic_is_queried_by_name_and_a_refusal_is_retried() {
    let q = FakeQemu::new();
    let mut cfg = q.config();
    cfg.nic = Some("net1".into());
    let (_w, rx) = watch(cfg);
    let mut p = q.accept();
    p.handshake();
    let id = p.expect("query-rx-filter", Some(json!({"name": "net1"})));
    p.send(json!({"error": {"class": "GenericError",
        "desc": "invalid net client name: net1"}, "id": id}));
    assert!(p.closed_by_watcher());
    // The operator hot-plugs the NIC; the next attempt finds it.
    let mut p = q.accept();
    p.handshake();
    let id = p.expect("query-rx-filter", Some(json!({"name": "net1"})));
    p.reply(id, json!([info("net1", GUEST_MAC, &[])]));
    assert_eq!(next(&rx).nic, "net1");
}

#[test]
fn nic_not_found_is_an_operator_error() {
    let e = QmpError::NicNotFound {
        want: "net1".into(),
        desc: "invalid net client name".into(),
    };
    assert!(e.is_operator_error());
    assert!(!QmpError::LineTooLong.is_operator_error());
    assert!(e.to_string().starts_with("--qmp-nic net1"));
}

// --------------------------------------------------------------- protocol, bad input ---

#[test]
fn garbage_lines_are_skipped_and_counted_and_the_connection_stays() {
    let q = FakeQemu::new();
    let (w, rx) = watch(q.config());
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &[])]));
    next(&rx);
    for junk in [
        "not json",
        "{\"unterminated",
        "[1, 2, 3]",
        "{\"neither\": \"event nor answer\"}",
        "\u{1b}[2J",
        "",
    ] {
        p.send_raw(junk);
    }
    p.event_for(Some("net0"));
    let id = p.expect("query-rx-filter", Some(json!({"name": "net0"})));
    p.reply(id, json!([info("net0", NEW_MAC, &[])]));
    assert_eq!(next(&rx).mac, mac(NEW_MAC));
    assert_eq!(w.stats().snapshot()[4], 6);
}

#[test]
fn json_nested_past_the_cap_is_skipped_without_parsing() {
    let q = FakeQemu::new();
    let (w, rx) = watch(q.config());
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &[])]));
    next(&rx);
    // Deeper than serde_json's own limit, and just past ours.
    p.send_raw(&format!("{}{}", "[".repeat(20_000), "]".repeat(20_000)));
    // A nameless NIC event (which would cost a query) one level past the cap: the message
    // and its `data` object, then MAX_DEPTH - 1 lists.
    let lists = MAX_DEPTH - 1;
    p.send_raw(&format!(
        "{{\"event\": \"NIC_RX_FILTER_CHANGED\", \"data\": {{\"x\": {}1{}}}}}",
        "[".repeat(lists),
        "]".repeat(lists)
    ));
    assert!(
        p.silent_for(Duration::from_millis(200)),
        "parsed and acted on"
    );
    // At the cap it is a message like any other.
    let lists = MAX_DEPTH - 2;
    p.send_raw(&format!(
        "{{\"event\": \"NIC_RX_FILTER_CHANGED\", \"data\": {{\"x\": {}1{}}}}}",
        "[".repeat(lists),
        "]".repeat(lists)
    ));
    let id = p.expect("query-rx-filter", Some(json!({"name": "net0"})));
    p.reply(id, json!([info("net0", GUEST_MAC, &[])]));
    p.event_for(Some("net0"));
    let id = p.expect("query-rx-filter", Some(json!({"name": "net0"})));
    p.reply(id, json!([info("net0", NEW_MAC, &[])]));
    assert_eq!(next(&rx).mac, mac(NEW_MAC));
    assert_eq!(w.stats().snapshot()[4], 2);
}

#[test]
fn brackets_inside_strings_do_not_count_as_depth() {
    let deep_text = format!(
        "{{\"event\": \"{}\\\"{}\"}}",
        "[".repeat(100),
        "{".repeat(100)
    );
    assert!(depth_ok(deep_text.as_bytes()));
    let at_cap = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
    assert!(depth_ok(at_cap.as_bytes()));
    let past = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
    assert!(!depth_ok(past.as_bytes()));
}

#[test]
fn a_line_longer_than_the_cap_ends_the_connection_and_the_watcher_reconnects() {
    let q = FakeQemu::new();
    let (w, rx) = watch(q.config());
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &[])]));
    next(&rx);
    // A line just under the cap is fine (a nameless event with a long path).
    let path = "p".repeat(MAX_LINE - 200);
    p.send(json!({"event": "NIC_RX_FILTER_CHANGED", "data": {"path": path}}));
    let id = p.expect("query-rx-filter", Some(json!({"name": "net0"})));
    p.reply(id, json!([info("net0", GUEST_MAC, &[])]));
    // One past it, with no end in sight.
    let big = vec![b'x'; MAX_LINE + 2];
    p.w.write_all(&big).unwrap();
    assert!(p.closed_by_watcher());
    let mut p = q.accept();
    p.connect_with(json!([info("net0", NEW_MAC, &[])]));
    assert_eq!(next(&rx).mac, mac(NEW_MAC));
    assert_eq!(w.stats().snapshot()[0], 2);
}

#[test]
fn a_socket_that_does_not_greet_with_qmp_is_left_and_retried() {
    let q = FakeQemu::new();
    let (_w, rx) = watch(q.config());
    let mut p = q.accept();
    p.send(json!({"hello": "I am not QEMU"}));
    p.send(json!({"return": {}}));
    assert!(p.closed_by_watcher());
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &[])]));
    next(&rx);
}

#[test]
fn no_answer_within_the_timeout_reconnects() {
    let q = FakeQemu::new();
    let (_w, rx) = watch(q.config());
    let mut p = q.accept();
    p.handshake();
    p.expect("query-rx-filter", None);
    let t = Instant::now();
    assert!(p.closed_by_watcher());
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &[])]));
    next(&rx);
}

#[test]
fn answers_to_other_ids_are_ignored() {
    let q = FakeQemu::new();
    let (_w, rx) = watch(q.config());
    let mut p = q.accept();
    p.handshake();
    let id = p.expect("query-rx-filter", None);
    p.reply(json!(999), json!([info("net0", NEW_MAC, &[])]));
    p.send(json!({"return": []})); // no id
    p.send(json!({"error": {"class": "GenericError", "desc": "x"}, "id": 998}));
    p.reply(id, json!([info("net0", GUEST_MAC, &[])]));
    assert_eq!(next(&rx).mac, mac(GUEST_MAC));
}

#[test]
fn a_filter_with_a_multicast_main_mac_is_refused_and_the_connection_stays() {
    let q = FakeQemu::new();
    let (w, rx) = watch(q.config());
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &[])]));
    next(&rx);
    p.event_for(Some("net0"));
    let id = p.expect("query-rx-filter", Some(json!({"name": "net0"})));
    p.reply(id, json!([info("net0", "01:00:5e:00:00:01", &[])]));
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    assert_eq!(w.stats().snapshot()[4], 1);
    p.event_for(Some("net0"));
    let id = p.expect("query-rx-filter", Some(json!({"name": "net0"})));
    p.reply(id, json!([info("net0", NEW_MAC, &[])]));
    assert_eq!(next(&rx).mac, mac(NEW_MAC));
}

#[test]
fn an_answer_for_another_nic_is_refused() {
    let q = FakeQemu::new();
    let (w, rx) = watch(q.config());
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &[])]));
    next(&rx);
    p.event_for(Some("net0"));
    let id = p.expect("query-rx-filter", Some(json!({"name": "net0"})));
    p.reply(id, json!([info("net9", NEW_MAC, &[])]));
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    assert_eq!(w.stats().snapshot()[4], 1);
}

#[test]
fn an_empty_listing_is_no_nic_and_retried() {
    let q = FakeQemu::new();
    let (_w, rx) = watch(q.config());
    let mut p = q.accept();
    p.connect_with(json!([]));
    assert!(p.closed_by_watcher());
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &[])]));
    next(&rx);
}

// ----------------------------------------------------------------------- NIC choice ---

#[test]
fn several_nics_pick_the_one_with_our_mac_or_ask_for_qmp_nic() {
    let ours = MacAddr::parse(GUEST_MAC).unwrap();
    let two = json!([
        info("net0", "52:54:00:00:00:01", &[]),
        info("net1", GUEST_MAC, &[])
    ]);
    let (f, _) = pick_nic(&two, None, Some(ours)).unwrap();
    assert_eq!(f.nic, "net1");
    let (f, _) = pick_nic(&two, Some("net0"), Some(ours)).unwrap();
    assert_eq!(f.nic, "net0");
    let e = pick_nic(&two, None, None).unwrap_err();
    assert!(matches!(e, QmpError::AmbiguousNic { .. }), "{e}");
    assert!(e.is_operator_error());
    assert!(e.to_string().contains("--qmp-nic"), "{e}");
    let same = json!([info("net0", GUEST_MAC, &[]), info("net1", GUEST_MAC, &[])]);
    assert!(matches!(
        pick_nic(&same, None, Some(ours)),
        Err(QmpError::AmbiguousNic { .. })
    ));
    // One NIC is ours whatever its MAC (the guest may have changed it before we connected).
    let one = json!([info("net0", NEW_MAC, &[])]);
    assert_eq!(pick_nic(&one, None, Some(ours)).unwrap().0.nic, "net0");
    assert!(matches!(
        pick_nic(&json!([]), None, None),
        Err(QmpError::NoNic)
    ));
    assert!(matches!(
        pick_nic(&json!({"not": "a list"}), None, None),
        Err(QmpError::BadAnswer { .. })
    ));
}

#[test]
fn a_listing_of_more_than_max_nics_is_cut_at_the_cap() {
    let many: Vec<Value> = (0..MAX_NICS + 50)
        .map(|i| info(&format!("net{i}"), "52:54:00:00:00:01", &[]))
        .collect();
    let mut many = Value::Array(many);
    many[MAX_NICS + 10]["main-mac"] = json!(GUEST_MAC);
    let e = pick_nic(&many, None, Some(mac(GUEST_MAC))).unwrap_err();
    assert!(matches!(e, QmpError::AmbiguousNic { .. }), "{e}");
}

// --------------------------------------------------------------------- filter values ---

#[test]
fn tables_past_the_cap_are_cut_and_flagged_overflow() {
    let groups: Vec<String> = (0..100)
        .map(|i| format!("01:00:5e:00:01:{i:02x}"))
        .collect();
    let refs: Vec<&str> = groups.iter().map(String::as_str).collect();
    let (f, dropped) = parse_filter(&info("net0", GUEST_MAC, &refs)).unwrap();
    assert_eq!(f.multicast.len(), MAX_TABLE);
    assert_eq!(dropped, 100 - MAX_TABLE);
    assert!(f.multicast_overflow && f.allmulti());
    assert!(!f.unicast_overflow);
}

#[test]
fn table_entries_of_the_wrong_kind_or_not_macs_are_dropped() {
    let mut v = info(
        "net0",
        GUEST_MAC,
        &[
            "01:00:5e:00:00:fb",
            "52:54:00:00:00:02",
            "zz:00:5e:00:00:01",
            "",
        ],
    );
    v["multicast-table"].as_array_mut().unwrap().extend([
        json!(5),
        json!(null),
        json!("01:00:5e:00:00:fb:00"),
    ]);
    v["unicast-table"] = json!([
        "52:54:00:00:00:03",
        "33:33:00:00:00:01",
        "00:00:00:00:00:00"
    ]);
    let (f, dropped) = parse_filter(&v).unwrap();
    assert_eq!(f.multicast, vec![mac("01:00:5e:00:00:fb")]);
    assert_eq!(f.unicast, vec![mac("52:54:00:00:00:03")]);
    assert_eq!(dropped, 6 + 2);
    assert!(!f.multicast_overflow && !f.unicast_overflow);
}

#[test]
fn a_main_mac_that_is_not_unicast_or_not_a_mac_is_refused() {
    for bad in [
        "01:00:5e:00:00:01",
        "ff:ff:ff:ff:ff:ff",
        "00:00:00:00:00:00",
        "52-54-00-4d-56-48",
        "52:54:00:4d:56",
        "52:54:00:4d:56:481",
        "",
    ] {
        let e = parse_filter(&info("net0", bad, &[])).unwrap_err();
        assert!(e.contains("main-mac"), "{bad}: {e}");
    }
    let (f, _) = parse_filter(&info("net0", "52:54:00:4D:56:4A", &[])).unwrap();
    assert_eq!(f.mac, mac("52:54:00:4d:56:4a"));
}

#[test]
fn missing_or_mistyped_fields_are_refused() {
    for (key, value) in [
        ("promiscuous", json!("yes")),
        ("unicast", json!("some")),
        ("multicast", json!(1)),
        ("multicast-table", json!("01:00:5e:00:00:01")),
        ("unicast-overflow", json!(null)),
        ("name", json!("")),
        ("name", json!("n".repeat(MAX_NAME + 1))),
    ] {
        let mut v = info("net0", GUEST_MAC, &[]);
        v[key] = value;
        assert!(parse_filter(&v).is_err(), "{key}");
    }
    for key in [
        "name",
        "main-mac",
        "promiscuous",
        "unicast-table",
        "multicast-overflow",
    ] {
        let mut v = info("net0", GUEST_MAC, &[]);
        v.as_object_mut().unwrap().remove(key);
        let e = parse_filter(&v).unwrap_err();
        assert!(e.contains(key), "{key}: {e}");
    }
    assert!(parse_filter(&json!([1])).is_err());
}

#[test]
fn modes_and_overflow_flags_map_to_allmulti_and_alluni() {
    let mut v = info("net0", GUEST_MAC, &[]);
    v["unicast"] = json!("all");
    v["multicast"] = json!("none");
    let (f, _) = parse_filter(&v).unwrap();
    assert!(f.alluni() && !f.allmulti());
    assert_eq!(f.multicast_mode, RxMode::None);
    v["unicast"] = json!("normal");
    v["unicast-overflow"] = json!(true);
    v["multicast-overflow"] = json!(true);
    let (f, _) = parse_filter(&v).unwrap();
    assert!(f.alluni() && f.allmulti());
}

#[test]
fn mac_parsing_takes_qemus_format_only() {
    assert_eq!(
        parse_mac("52:54:00:4d:56:48"),
        Some([0x52, 0x54, 0, 0x4d, 0x56, 0x48])
    );
    for bad in [
        "52:54:00:4d:56:4",
        "52:54:00:4d:56:4g",
        "52:54:00:4d:56:48:",
        "5254004d5648xxxxx",
        "52:54:00:4d:56;48",
        "é2:54:00:4d:56:48",
    ] {
        assert_eq!(parse_mac(bad), None, "{bad}");
    }
}

// ------------------------------------------------------------------- thread behaviour ---

#[test]
fn stopping_while_backing_off_or_connected_is_prompt() {
    // Nothing listens: the watcher is in a 5 s backoff.
    let q = FakeQemu::new();
    let mut cfg = q.config();
    cfg.path = q.path.with_extension("absent");
    cfg.backoff_first = Duration::from_secs(5);
    cfg.backoff_max = Duration::from_secs(5);
    let (w, _rx) = watch(cfg);
    std::thread::sleep(Duration::from_millis(50));
    crate::testkit::assert_drops_within(w, Duration::from_millis(500));

    // Connected and idle, waiting for events.
    let (w, rx) = watch(q.config());
    let mut p = q.accept();
    p.connect_with(json!([info("net0", GUEST_MAC, &[])]));
    next(&rx);
    crate::testkit::assert_drops_within(w, Duration::from_millis(500));
    assert!(p.closed_by_watcher());
}

#[test]
fn a_qemu_that_hangs_up_at_once_is_retried_with_backoff_not_in_a_spin() {
    let q = FakeQemu::new();
    let (w, _rx) = watch(q.config()); // backoff 10 ms doubling to 50 ms
    let start = Instant::now();
    let mut attempts = 0;
    while start.elapsed() < Duration::from_millis(600) {
        if let Ok((s, _)) = q.listener.accept() {
            attempts += 1;
            drop(s);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(w);
    // 10 + 20 + 40 + 50 × n ms: about 12 attempts in 600 ms; a spin would make thousands.
    assert!((5..=20).contains(&attempts), "{attempts} attempts");
}
