use super::*;

use std::io::IoSliceMut;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

fn vars(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> ListenVars {
    ListenVars {
        pid: pid.map(str::to_string),
        fds: fds.map(str::to_string),
        names: names.map(str::to_string),
    }
}

fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only probes the number.
    fcntl(unsafe { BorrowedFd::borrow_raw(fd) }, FcntlArg::F_GETFD).is_ok()
}

fn cloexec(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only probes the number.
    let flags = fcntl(unsafe { BorrowedFd::borrow_raw(fd) }, FcntlArg::F_GETFD).unwrap();
    FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC)
}

/// Places dups of `fds` at `start`, `start + 1`, … (numbers no other test uses) without
/// close-on-exec, as a service manager leaves them. The caller adopts or closes them.
fn place_at(start: RawFd, fds: &[BorrowedFd<'_>]) {
    for (target, fd) in (start..).zip(fds) {
        assert!(!is_open(target), "fd {target} is already in use");
        // SAFETY: dup2 onto a number nothing in this process uses (checked above); the new fd
        // is adopted or closed by the calling test.
        let r = unsafe { libc::dup2(fd.as_raw_fd(), target) };
        assert_eq!(r, target, "dup2: {}", std::io::Error::last_os_error());
    }
}

fn same_file(a: impl AsFd, b: impl AsFd) -> bool {
    let (a, b) = (
        nix::sys::stat::fstat(a.as_fd()).unwrap(),
        nix::sys::stat::fstat(b.as_fd()).unwrap(),
    );
    (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
}

// ------------------------------------------------------------ activation variables ---

/// Activation variables that parse, and the fds they give process 42: none unless they are
/// addressed to it.
#[test]
fn listen_variables_name_only_our_fds() {
    let names = "vhost-user:queue-0:queue-1";
    let cases: [(&str, ListenVars, &[&str]); 5] = [
        ("no LISTEN_PID", vars(None, Some("2"), Some("a:b")), &[]),
        (
            "another pid's",
            vars(Some("41"), Some("2"), Some("a:b")),
            &[],
        ),
        (
            "ours, named in order",
            vars(Some("42"), Some("3"), Some(names)),
            &["vhost-user", "queue-0", "queue-1"],
        ),
        (
            "no LISTEN_FDNAMES",
            vars(Some("42"), Some("2"), None),
            &["unknown", "unknown"],
        ),
        (
            "LISTEN_FDS=0, LISTEN_FDNAMES empty",
            vars(Some("42"), Some("0"), Some("")),
            &[],
        ),
    ];
    for (case, v, want) in cases {
        assert_eq!(v.names_for(42).unwrap(), want, "{case}");
    }
}

#[test]
fn fdnames_count_mismatch_is_the_service_managers_fault() {
    let v = vars(Some("42"), Some("2"), Some("vhost-user"));
    let e = v.names_for(42).unwrap_err();
    assert!(
        matches!(e, SystemdError::NameCount { names: 1, fds: 2 }),
        "{e:?}"
    );
    assert!(e.to_string().starts_with("service manager:"), "{e}");
}

#[test]
fn non_numeric_listen_variables_are_refused() {
    for v in [
        vars(Some("x"), Some("1"), None),
        vars(Some("42"), Some("-1"), None),
        vars(Some("42"), Some("one"), None),
    ] {
        let e = v.names_for(42).unwrap_err();
        assert!(matches!(e, SystemdError::BadVariable { .. }), "{e:?}");
        assert!(e.to_string().starts_with("service manager:"), "{e}");
    }
}

#[test]
fn absurd_listen_fds_count_is_refused() {
    let v = vars(Some("42"), Some("100000"), None);
    assert!(matches!(
        v.names_for(42),
        Err(SystemdError::TooManyFds(100000))
    ));
}

// ------------------------------------------------------------------------- adoption ---

#[test]
fn adopted_fds_are_owned_and_close_on_exec() {
    let (a, b) = UnixStream::pair().unwrap();
    place_at(600, &[a.as_fd(), b.as_fd()]);
    assert!(!cloexec(600) && !cloexec(601));
    // SAFETY: 600 and 601 were placed by this test for adoption.
    let mut fds = unsafe { ListenFds::adopt(vec!["x".into(), "y".into()], 600) }.unwrap();
    assert!(cloexec(600) && cloexec(601));
    assert_eq!(fds.names().collect::<Vec<_>>(), ["x", "y"]);
    let y = fds.take("y").unwrap();
    assert!(same_file(&y, &b));
    drop(fds);
    assert!(!is_open(600), "an untaken fd closes with the set");
    assert!(is_open(601));
    drop(y);
    assert!(!is_open(601));
}

#[test]
fn an_announced_fd_that_is_not_open_is_the_service_managers_fault() {
    let (a, _b) = UnixStream::pair().unwrap();
    place_at(610, &[a.as_fd()]);
    assert!(!is_open(611));
    // SAFETY: 610 was placed by this test for adoption; 611 is not open.
    let e =
        unsafe { ListenFds::adopt(vec!["vhost-user".into(), "queue-0".into()], 610) }.unwrap_err();
    assert!(
        matches!(e, SystemdError::FdNotOpen { fd: 611, .. }),
        "{e:?}"
    );
    assert!(e.to_string().starts_with("service manager:"), "{e}");
    assert!(e.to_string().contains("queue-0"), "{e}");
    assert!(!is_open(610), "the fds taken before the error are closed");
}

fn adopt_one(fd: BorrowedFd<'_>, at: RawFd, name: &str) -> ListenFds {
    place_at(at, &[fd]);
    // SAFETY: `at` was placed by the calling test for adoption.
    unsafe { ListenFds::adopt(vec![name.to_string()], at) }.unwrap()
}

#[test]
fn the_vhost_user_listener_is_served_from_the_passed_fd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vhost.sock");
    let l = UnixListener::bind(&path).unwrap();
    let mut fds = adopt_one(l.as_fd(), 620, VHOST_USER_FD_NAME);
    drop(l);
    let listener = fds
        .take_unix_listener(VHOST_USER_FD_NAME)
        .unwrap()
        .expect("named fd");
    assert!(fds.is_empty());
    let _client = UnixStream::connect(&path).unwrap();
    listener.accept().unwrap();
}

#[test]
fn a_missing_listener_name_is_none_not_an_error() {
    let mut fds = ListenFds::default();
    assert!(fds
        .take_unix_listener(VHOST_USER_FD_NAME)
        .unwrap()
        .is_none());
}

#[test]
fn a_passed_fd_that_is_no_unix_listener_is_the_operators_fault() {
    let dir = tempfile::tempdir().unwrap();
    let dgram = UnixDatagram::bind(dir.path().join("d.sock")).unwrap();
    let (stream, _peer) = UnixStream::pair().unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let file = std::fs::File::open("/dev/null").unwrap();
    let cases: [(BorrowedFd<'_>, &str); 4] = [
        (dgram.as_fd(), "not a stream socket"),
        (stream.as_fd(), "not listening"),
        (tcp.as_fd(), "not a unix socket"),
        (file.as_fd(), "not a socket"),
    ];
    for (target, (fd, why)) in (630..).zip(cases) {
        let mut fds = adopt_one(fd, target, VHOST_USER_FD_NAME);
        let e = fds.take_unix_listener(VHOST_USER_FD_NAME).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("operator:"), "{msg}");
        assert!(msg.contains(why), "case {why}: {msg}");
        assert!(msg.contains("ListenStream="), "{msg}");
    }
}

#[test]
fn stored_queue_fds_are_found_by_name_and_the_rest_stays() {
    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..5).map(|_| nix::unistd::pipe().unwrap()).collect();
    let fds: Vec<BorrowedFd<'_>> = pipes.iter().map(|p| p.0.as_fd()).collect();
    place_at(640, &fds);
    let names = ["vhost-user", "queue-1", "queue-0", "queue-1", "queue-x"];
    // SAFETY: 640..645 were placed by this test for adoption.
    let mut set =
        unsafe { ListenFds::adopt(names.iter().map(|s| s.to_string()).collect(), 640) }.unwrap();
    let queues = set.take_queues();
    assert_eq!(queues.keys().copied().collect::<Vec<_>>(), [0, 1]);
    assert!(same_file(&queues[&0], &pipes[2].0));
    assert!(
        same_file(&queues[&1], &pipes[1].0),
        "the first queue-1 wins"
    );
    let rest: Vec<String> = set.into_remaining().into_iter().map(|f| f.name).collect();
    assert_eq!(rest, ["vhost-user", "queue-1", "queue-x"]);
}

#[test]
fn queue_fd_names_round_trip_and_nothing_else_parses() {
    for i in [0, 1, 9, 10, 255] {
        assert_eq!(parse_queue_fd_name(&queue_fd_name(i)), Some(i));
    }
    for bad in [
        "queue-",
        "queue-01",
        "queue--1",
        "queue-1a",
        "queue-+1",
        "Queue-1",
        "vhost-user",
        "queue-99999999999999999999999",
    ] {
        assert_eq!(parse_queue_fd_name(bad), None, "{bad}");
    }
}

// ------------------------------------------------------------------------ rendering ---

#[test]
fn a_status_line_cannot_inject_another_assignment() {
    let s = render(&[Notify::Status("up\nREADY=1\r\tx")]).unwrap();
    assert_eq!(s, "STATUS=up READY=1  x\n");
}

#[test]
fn notifications_render_one_assignment_per_line() {
    let s = render(&[
        Notify::Ready,
        Notify::Status("serving"),
        Notify::MainPid(7),
        Notify::Watchdog,
        Notify::Stopping,
    ])
    .unwrap();
    assert_eq!(
        s,
        "READY=1\nSTATUS=serving\nMAINPID=7\nWATCHDOG=1\nSTOPPING=1\n"
    );
}

#[test]
fn invalid_fd_names_are_refused_before_sending() {
    for bad in ["", "a:b", "tab\there", "é", &"x".repeat(256)] {
        let e = render(&[Notify::FdStore, Notify::FdName(bad)]).unwrap_err();
        assert!(matches!(e, SystemdError::BadFdName(_)), "{bad:?}: {e:?}");
    }
    assert!(fd_name_is_valid(&"x".repeat(255)));
}

#[test]
fn fdstoreremove_needs_a_name() {
    assert!(matches!(
        render(&[Notify::FdStoreRemove]),
        Err(SystemdError::BadMessage(_))
    ));
    assert!(matches!(render(&[]), Err(SystemdError::BadMessage(_))));
}

// ------------------------------------------------------------- the notify socket ---

/// A fake service manager: a datagram socket bound where `NOTIFY_SOCKET` points.
struct FakeManager {
    sock: UnixDatagram,
    spec: String,
    _dir: Option<tempfile::TempDir>,
}

impl FakeManager {
    fn at_path() -> FakeManager {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        FakeManager {
            sock,
            spec: path.to_str().unwrap().to_string(),
            _dir: Some(dir),
        }
    }

    fn abstract_name() -> FakeManager {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("macvhost-test-notify-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        FakeManager {
            sock,
            spec: format!("@{name}"),
            _dir: None,
        }
    }

    /// The manager, and a notifier that reaches it.
    fn with_notifier(self) -> (FakeManager, Notifier) {
        let n = Notifier::new(&self.spec).unwrap();
        (self, n)
    }

    /// One datagram: its text and the fds that came with it.
    fn recv(&self) -> (String, Vec<OwnedFd>) {
        self.sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; 8]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .expect("a notification within 5 s");
        assert!(!msg.flags.contains(MsgFlags::MSG_CTRUNC), "fds truncated");
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let socket::ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds in this process for us.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let n = msg.bytes;
        (String::from_utf8(buf[..n].to_vec()).unwrap(), fds)
    }

    /// Asserts that the next datagram is `text` and carries no fd.
    fn expect_without_fds(&self, text: &str) {
        let (got, fds) = self.recv();
        assert_eq!(got, text);
        assert!(fds.is_empty(), "{text:?} came with {} fds", fds.len());
    }
}

#[test]
fn readiness_status_watchdog_and_stopping_reach_a_path_notify_socket() {
    let (m, n) = FakeManager::at_path().with_notifier();
    assert_eq!(n.address(), m.spec);
    n.ready("serving /run/macvhost/vm0.sock, link up").unwrap();
    assert_eq!(
        m.recv().0,
        "READY=1\nSTATUS=serving /run/macvhost/vm0.sock, link up\n"
    );
    n.status("frontend connected").unwrap();
    assert_eq!(m.recv().0, "STATUS=frontend connected\n");
    n.watchdog().unwrap();
    assert_eq!(m.recv().0, "WATCHDOG=1\n");
    n.main_pid(1234).unwrap();
    assert_eq!(m.recv().0, "MAINPID=1234\n");
    n.stopping("SIGTERM").unwrap();
    m.expect_without_fds("STOPPING=1\nSTATUS=SIGTERM\n");
}

#[test]
fn an_abstract_notify_socket_is_reached_by_its_at_name() {
    let (m, n) = FakeManager::abstract_name().with_notifier();
    n.watchdog().unwrap();
    assert_eq!(m.recv().0, "WATCHDOG=1\n");
}

#[test]
fn fdstore_sends_the_queue_fd_with_scm_rights() {
    let (m, n) = FakeManager::at_path().with_notifier();
    let (r, _w) = nix::unistd::pipe().unwrap();
    n.store_queue(3, &r).unwrap();
    let (text, fds) = m.recv();
    assert_eq!(text, "FDSTORE=1\nFDNAME=queue-3\n");
    assert_eq!(fds.len(), 1);
    assert!(same_file(&fds[0], &r), "the stored fd is the queue's file");

    let (a, b) = UnixStream::pair().unwrap();
    n.store_fds("pair", &[a.as_fd(), b.as_fd()], false).unwrap();
    let (text, fds) = m.recv();
    assert_eq!(text, "FDSTORE=1\nFDNAME=pair\nFDPOLL=0\n");
    assert_eq!(fds.len(), 2);
    assert!(same_file(&fds[0], &a) && same_file(&fds[1], &b));

    n.remove_fds("queue-3").unwrap();
    m.expect_without_fds("FDSTOREREMOVE=1\nFDNAME=queue-3\n");
}

#[test]
fn fdstore_without_fds_is_refused() {
    let (_manager, n) = FakeManager::at_path().with_notifier();
    assert!(matches!(
        n.store_fds("queue-0", &[], false),
        Err(SystemdError::BadMessage(_))
    ));
}

#[test]
fn a_notify_socket_nobody_listens_on_is_a_send_error() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("gone").to_str().unwrap().to_string();
    let n = Notifier::new(&spec).unwrap();
    let e = n.ready("x").unwrap_err();
    assert!(matches!(e, SystemdError::Send { .. }), "{e:?}");
    assert!(e.to_string().contains(&spec), "{e}");
}

#[test]
fn notify_socket_values_other_than_a_path_or_at_name_are_refused() {
    for bad in [
        "",
        "relative/path",
        "vsock:2:1234",
        &format!("/{}", "x".repeat(200)),
    ] {
        let e = Notifier::new(bad).unwrap_err();
        assert!(
            matches!(e, SystemdError::BadNotifySocket(_)),
            "{bad}: {e:?}"
        );
        assert!(e.to_string().starts_with("service manager:"), "{e}");
    }
}

// ------------------------------------------------------------------------- watchdog ---

#[test]
fn watchdog_usec_sets_a_ping_interval_of_half_the_timeout() {
    let t = watchdog_timeout(Some("3000000"), None, 42)
        .unwrap()
        .unwrap();
    assert_eq!(t, Duration::from_secs(3));
    let now = Instant::now();
    let mut w = Watchdog::new(t, now);
    assert_eq!(w.interval(), Duration::from_millis(1500));
    assert_eq!(w.until_due(now), Duration::from_millis(1500));
    assert!(!w.due(now + Duration::from_millis(1499)));
    assert!(w.due(now + Duration::from_millis(1500)));
    assert!(!w.due(now + Duration::from_millis(1600)), "rescheduled");
    assert_eq!(
        w.until_due(now + Duration::from_millis(1600)),
        Duration::from_millis(1400)
    );
    assert!(w.due(now + Duration::from_secs(10)), "overdue is due");
}

#[test]
fn a_watchdog_for_another_pid_is_not_ours() {
    assert_eq!(
        watchdog_timeout(Some("1000000"), Some("41"), 42).unwrap(),
        None
    );
    assert!(watchdog_timeout(Some("1000000"), Some("42"), 42)
        .unwrap()
        .is_some());
    assert_eq!(watchdog_timeout(None, Some("42"), 42).unwrap(), None);
}

#[test]
fn zero_infinite_or_garbage_watchdog_usec_is_the_service_managers_fault() {
    for bad in ["0", "18446744073709551615", "1s", "-5", ""] {
        let e = watchdog_timeout(Some(bad), None, 42).unwrap_err();
        assert!(
            e.to_string().starts_with("service manager: WATCHDOG_USEC"),
            "{e}"
        );
    }
    assert!(watchdog_timeout(Some("1"), Some("x"), 42).is_err());
}

// ------------------------------------------------- socket activation, for real ---

const CHILD_ENV: &str = "MACVHOST_SYSTEMD_TEST_CHILD";

/// Runs test `name` of this binary again as a child, the way systemd starts a service:
/// `fds` at 3, 4, …, `LISTEN_PID` = the child's own pid (`sh` sets it and `exec`s, keeping
/// the pid), `LISTEN_FDS`/`LISTEN_FDNAMES` from `names`. `pid_override` puts another pid there.
fn run_activated_child(
    name: &str,
    role: &str,
    fds: &[BorrowedFd<'_>],
    names: &str,
    pid_override: Option<u32>,
    extra_env: &[(&str, String)],
) {
    let exe = std::env::current_exe().unwrap();
    // Keep the sources clear of 3..3+n so the dup2s in the child cannot clobber each other.
    let high: Vec<OwnedFd> = fds
        .iter()
        .map(|fd| nix::fcntl::fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(100)).unwrap())
        // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let raw: Vec<RawFd> = high.iter().map(AsRawFd::as_raw_fd).collect();
    let pid_cmd = match pid_override {
        Some(p) => format!("LISTEN_PID={p}"),
        None => "LISTEN_PID=$$".to_string(),
    };
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("export {pid_cmd}; exec \"$0\" \"$@\""))
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, role)
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names)
        .envs(extra_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    // SAFETY: only dup2 (async-signal-safe) on fds that are open in the forked child.
    unsafe {
        cmd.pre_exec(move || {
            for (target, &fd) in (LISTEN_FDS_START..).zip(raw.iter()) {
                if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "activated child failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    drop(high);
}

#[test]
fn socket_activation_hands_over_named_fds_and_unsets_the_variables() {
    const NAME: &str =
        "systemd::tests::socket_activation_hands_over_named_fds_and_unsets_the_variables";
    if std::env::var(CHILD_ENV).as_deref() == Ok("activated") {
        // The child: fds 3 (listener) and 4 (a stored queue) were passed by "systemd".
        assert!(
            !cloexec(3) && !cloexec(4),
            "the manager leaves them inheritable"
        );
        let mut fds = listen_fds().unwrap();
        for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            assert!(std::env::var_os(v).is_none(), "{v} still set");
        }
        assert!(cloexec(3) && cloexec(4), "children must not inherit them");
        assert!(matches!(listen_fds(), Err(SystemdError::AlreadyTaken)));
        assert_eq!(
            fds.names().collect::<Vec<_>>(),
            [VHOST_USER_FD_NAME, "queue-0"]
        );
        let queues = fds.take_queues();
        let ino: u64 = std::env::var("MVH_QUEUE_INO").unwrap().parse().unwrap();
        assert_eq!(nix::sys::stat::fstat(&queues[&0]).unwrap().st_ino, ino);
        let listener = fds.take_unix_listener(VHOST_USER_FD_NAME).unwrap().unwrap();
        let path = std::env::var("MVH_SOCKET").unwrap();
        let _c = UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        assert!(fds.is_empty());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vhost.sock");
    let l = UnixListener::bind(&path).unwrap();
    let (r, _w) = nix::unistd::pipe().unwrap();
    let ino = std::fs::metadata(format!("/proc/self/fd/{}", r.as_raw_fd()))
        .unwrap()
        .ino();
    run_activated_child(
        NAME,
        "activated",
        &[l.as_fd(), r.as_fd()],
        "vhost-user:queue-0",
        None,
        &[
            ("MVH_SOCKET", path.to_str().unwrap().to_string()),
            ("MVH_QUEUE_INO", ino.to_string()),
        ],
    );
}

#[test]
fn socket_activation_for_another_pid_takes_nothing_but_still_unsets_the_variables() {
    const NAME: &str = "systemd::tests::socket_activation_for_another_pid_takes_nothing_but_still_unsets_the_variables";
    if std::env::var(CHILD_ENV).as_deref() == Ok("foreign") {
        let fds = listen_fds().unwrap();
        assert!(fds.is_empty());
        assert!(std::env::var_os("LISTEN_FDS").is_none());
        assert!(!cloexec(3), "fd 3 is not ours: left alone");
        return;
    }
    let l = UnixStream::pair().unwrap().0;
    // Our own pid: certainly not the child's.
    run_activated_child(
        NAME,
        "foreign",
        &[l.as_fd()],
        "vhost-user",
        Some(std::process::id()),
        &[],
    );
}
