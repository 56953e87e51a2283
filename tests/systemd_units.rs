//! The unit files in `contrib/systemd/` (issue 12): `systemd-analyze verify` accepts them
//! without a warning (it works without systemd as PID 1), and they say what
//! `macvhost::systemd` expects: the socket's fd name, `Type=notify`, a watchdog, an fd store
//! large enough for every queue pair. Needs `systemd-analyze` (Debian `systemd`); without it the
//! test skips through `require!` (a failure with `MACVHOST_E2E_REQUIRED=1`).

use macvhost::require;
use macvhost::testkit::Need;

use std::fs;
use std::path::PathBuf;
use std::process::Command;

fn unit(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/systemd")
        .join(name);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The value of `key=` in `text` (the last one wins, as in systemd).
fn setting<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
}

#[test]
fn systemd_units_pass_systemd_analyze_verify_without_a_warning() {
    require!(&[Need::Tool("systemd-analyze")]);
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart= is executable: point it at the binary under test.
    let service = unit("macvhost@.service").replace(
        "ExecStart=/usr/local/bin/macvhost ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_macvhost")),
    );
    assert!(service.contains(env!("CARGO_BIN_EXE_macvhost")));
    fs::write(dir.path().join("macvhost@.service"), service).unwrap();
    fs::write(
        dir.path().join("macvhost@.socket"),
        unit("macvhost@.socket"),
    )
    .unwrap();
    for kind in ["service", "socket"] {
        std::os::unix::fs::symlink(
            format!("macvhost@.{kind}"),
            dir.path().join(format!("macvhost@vm0-net0.{kind}")),
        )
        .unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("macvhost@vm0-net0.service"))
        .arg(dir.path().join("macvhost@vm0-net0.socket"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );
}

#[test]
fn systemd_units_match_what_macvhost_expects() {
    let socket = unit("macvhost@.socket");
    let service = unit("macvhost@.service");
    assert_eq!(
        setting(&socket, "FileDescriptorName"),
        Some(macvhost::systemd::VHOST_USER_FD_NAME),
        "macvhost takes the listener by this name"
    );
    assert_eq!(
        setting(&socket, "ListenStream"),
        Some("/run/macvhost/%i.sock")
    );
    assert_eq!(setting(&socket, "SocketUser"), Some("libvirt-qemu"));
    assert_eq!(setting(&socket, "SocketMode"), Some("0660"));
    assert_eq!(setting(&service, "Type"), Some("notify"));
    assert_eq!(setting(&service, "NotifyAccess"), Some("main"));
    assert_eq!(
        setting(&service, "EnvironmentFile"),
        Some("/etc/macvhost/%i.conf")
    );
    assert_eq!(
        setting(&service, "ExecStart"),
        Some("/usr/local/bin/macvhost $MACVHOST_ARGS")
    );
    assert!(setting(&service, "WatchdogSec").is_some());
    let store: u32 = setting(&service, "FileDescriptorStoreMax")
        .expect("FileDescriptorStoreMax=")
        .parse()
        .unwrap();
    assert!(
        store >= u32::from(macvhost::host::MAX_QUEUE_PAIRS),
        "the fd store must hold one fd per queue pair"
    );
    assert_eq!(setting(&service, "Requires"), Some("macvhost@%i.socket"));
}
