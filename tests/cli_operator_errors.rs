//! The binary's answer to what an operator gets wrong: one line naming the flag, exit status 2,
//! nothing of anyone else's destroyed. No root needed, except where a test says so.

use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_macvhost");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run macvhost")
}

/// Exit status 2, and stderr names `flag`; returns stderr.
fn refused(args: &[&str], flag: &str) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(flag), "{args:?} did not name {flag}: {err}");
    err
}

#[test]
fn mtu_out_of_range_names_the_real_range() {
    let err = refused(
        &[
            "--socket-path",
            "/tmp/x.sock",
            "--tap",
            "t0",
            "--mtu",
            "70000",
        ],
        "--mtu",
    );
    assert!(err.contains("68..=65535"), "{err}");
    refused(
        &["--socket-path", "/tmp/x.sock", "--tap", "t0", "--mtu", "67"],
        "--mtu",
    );
}

#[test]
fn unknown_log_level_is_refused_not_silenced() {
    let err = refused(
        &[
            "--socket-path",
            "/tmp/x.sock",
            "--tap",
            "t0",
            "--log-level",
            "loud",
        ],
        "--log-level",
    );
    assert!(err.contains("debug"), "the message lists the levels: {err}");
}

#[test]
fn missing_macvtap_interface_names_the_flag() {
    refused(
        &[
            "--socket-path",
            "/tmp/x.sock",
            "--macvtap",
            "mvh-no-such-if",
        ],
        "--macvtap",
    );
}

#[test]
fn tap_fd_that_is_not_open_names_the_flag() {
    refused(
        &["--socket-path", "/tmp/x.sock", "--tap-fd", "999"],
        "--tap-fd",
    );
}

#[test]
fn socket_owner_and_mode_are_checked_before_anything_starts() {
    refused(
        &[
            "--socket-path",
            "/tmp/x.sock",
            "--tap",
            "t0",
            "--socket-owner",
            "mvh-no-such-user",
        ],
        "--socket-owner",
    );
    refused(
        &[
            "--socket-path",
            "/tmp/x.sock",
            "--tap",
            "t0",
            "--socket-mode",
            "999",
        ],
        "--socket-mode",
    );
    refused(
        &[
            "--client",
            "--socket-path",
            "/tmp/x.sock",
            "--tap",
            "t0",
            "--socket-mode",
            "0660",
        ],
        "--socket-mode",
    );
}

#[test]
fn socket_path_in_a_missing_directory_names_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/vu.sock");
    refused(
        &["--socket-path", path.to_str().unwrap(), "--tap-fd", "0"],
        "--socket-path",
    );
}

#[test]
fn socket_path_holding_a_regular_file_is_refused_and_the_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vu.sock");
    std::fs::write(&path, b"precious").unwrap();
    let err = refused(
        &["--socket-path", path.to_str().unwrap(), "--tap-fd", "0"],
        "--socket-path",
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"precious", "{err}");
}

#[test]
fn socket_another_process_listens_on_is_refused_and_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vu.sock");
    let theirs = UnixListener::bind(&path).unwrap();
    let out = run(&["--socket-path", path.to_str().unwrap(), "--tap-fd", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--socket-path") && err.contains("another process"),
        "{err}"
    );
    // Still theirs: connectable, and accepted by the original listener.
    let _c = UnixStream::connect(&path).expect("the other process's socket still works");
    theirs.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match theirs.accept() {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("the original listener lost its socket: {e}"),
        }
    }
}
