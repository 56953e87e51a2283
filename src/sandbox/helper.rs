//! The privileged helper: what the sealed daemon still needs `CAP_NET_ADMIN` for, done by a
//! small process that never maps guest memory.
//!
//! # Contract
//!
//! The daemon starts `macvhost link-helper IFINDEX NAME [--delete] [--set-mac]` (the same
//! binary) before sealing, connected by a socketpair, when it needs either operation:
//!
//! - `--delete`: the macvtap macvhost created (`--macvtap-parent` without `--keep`) is deleted
//!   on the [`Request::Delete`] request (on exit) and also when the socket reaches EOF, so it
//!   goes away when macvhost is killed or fails to seal;
//! - `--set-mac`: `--trust-guest-rx-filters` moves the guest's MAC onto the macvtap
//!   ([`Request::SetMac`]), which a sealed process cannot (`RTM_SETLINK` needs the capability).
//!
//! The helper keeps only `CAP_NET_ADMIN` (effective and permitted; ambient cleared, bounding
//! set emptied but for it when it may), sets `no_new_privs`, is not dumpable, closes every fd
//! it inherited but its socket, and ignores SIGINT/SIGTERM (a terminal's Ctrl-C reaches the
//! whole process group; it must outlive the daemon to clean up). It acts on one link only: the
//! ifindex on its command line, and only while that ifindex still carries the name it was
//! given and is a macvtap (re-checked before every action).
//!
//! # Wire format
//!
//! The sealed side may be compromised: every record is validated like untrusted input. A
//! request is [`RECORD`] bytes: `op` (`b'D'` delete, `b'M'` set-mac), three zero bytes, the
//! ifindex (u32, little endian), the MAC (six bytes; zero for delete), two zero bytes. The
//! answer is [`RECORD`] bytes: `b'A'` done, `b'R'` refused (then byte 1 is a [`Refusal`]),
//! `b'F'` failed (then bytes 4..8 are the kernel's errno, i32 little endian); the rest zero.
//!
//! A request is refused, and the helper goes on, when its op is unknown or was not enabled at
//! start, a reserved byte is not zero, the ifindex is not the helper's, the MAC is multicast or
//! zero, or the link no longer is the one the helper was started for. Each kind of refusal is
//! logged once on stderr. MAC changes are paced to one per [`SET_MAC_INTERVAL`] (the request
//! waits). EOF or a short record ends the helper (deleting the link with `--delete`); a
//! completed delete ends it too.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::SandboxError;
use crate::host::netlink::{self, NetlinkError};
use crate::host::MacAddr;

/// Bytes in a request and in an answer.
pub const RECORD: usize = 16;
/// The byte the helper writes once it holds only `CAP_NET_ADMIN`.
pub const READY: u8 = 0x52;

/// MAC changes are paced to at most one per this interval: a guest flipping its MAC in a loop
/// costs the host at most ten `RTM_SETLINK`s a second.
pub const SET_MAC_INTERVAL: Duration = Duration::from_millis(100);

/// How long the daemon waits for an answer before it gives the helper up.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

const OP_DELETE: u8 = b'D';
const OP_SET_MAC: u8 = b'M';
const DONE: u8 = b'A';
const REFUSED: u8 = b'R';
const FAILED: u8 = b'F';

/// A request of the sealed side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Delete the link now (only with `--delete`).
    Delete,
    /// Give the link this MAC (only with `--set-mac`).
    SetMac(MacAddr),
}

/// Why the helper refused a request (the sealed side's fault, or the link changed hands).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[repr(u8)]
pub enum Refusal {
    /// Not a request the helper knows.
    #[error("unknown request")]
    UnknownOp = 1,
    /// A byte that must be zero is not.
    #[error("reserved bytes set")]
    Reserved = 2,
    /// The request names another link than the helper's.
    #[error("another ifindex than the helper's")]
    OtherIfindex = 3,
    /// The helper was not started for this operation.
    #[error("operation not enabled for this helper")]
    NotEnabled = 4,
    /// A multicast or all-zero MAC.
    #[error("not a unicast MAC")]
    BadMac = 5,
    /// The ifindex no longer carries the helper's name, or is no macvtap.
    #[error("the link is no longer the helper's macvtap")]
    NotOurLink = 6,
}

impl Refusal {
    const ALL: [Refusal; 6] = [
        Refusal::UnknownOp,
        Refusal::Reserved,
        Refusal::OtherIfindex,
        Refusal::NotEnabled,
        Refusal::BadMac,
        Refusal::NotOurLink,
    ];

    fn from_code(c: u8) -> Option<Refusal> {
        Self::ALL.into_iter().find(|r| *r as u8 == c)
    }
}

/// The helper's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Done.
    Done,
    /// Refused; nothing was changed.
    Refused(Refusal),
    /// The kernel refused it (errno).
    Failed(i32),
}

/// Encodes `req` for link `ifindex` (see the module doc).
pub fn encode_request(req: Request, ifindex: u32) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[4..8].copy_from_slice(&ifindex.to_le_bytes());
    match req {
        Request::Delete => r[0] = OP_DELETE,
        Request::SetMac(mac) => {
            r[0] = OP_SET_MAC;
            r[8..14].copy_from_slice(&mac.0);
        }
    }
    r
}

fn encode_reply(reply: Reply) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    match reply {
        Reply::Done => r[0] = DONE,
        Reply::Refused(why) => {
            r[0] = REFUSED;
            r[1] = why as u8;
        }
        Reply::Failed(errno) => {
            r[0] = FAILED;
            r[4..8].copy_from_slice(&errno.to_le_bytes());
        }
    }
    r
}

/// Decodes an answer; `None` for a record no helper sends.
pub fn decode_reply(r: &[u8; RECORD]) -> Option<Reply> {
    match r[0] {
        DONE => Some(Reply::Done),
        REFUSED => Refusal::from_code(r[1]).map(Reply::Refused),
        FAILED => Some(Reply::Failed(i32::from_le_bytes([r[4], r[5], r[6], r[7]]))),
        _ => None,
    }
}

/// Why a request through [`MacSetter`] or [`LinkHelper`] did not happen (host: the helper, or
/// the kernel behind it).
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// The helper refused it.
    #[error("the link helper refused it: {0}")]
    Refused(Refusal),
    /// The kernel refused it.
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Failed(i32),
    /// The helper is gone, or answered nothing a helper sends.
    #[error("the link helper is gone ({0})")]
    Gone(String),
}

/// What the helper is started for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperSpec {
    /// The macvtap's ifindex.
    pub ifindex: u32,
    /// Its name.
    pub name: String,
    /// Delete it on request and at EOF (a macvtap macvhost created).
    pub delete: bool,
    /// Accept MAC changes (`--trust-guest-rx-filters`).
    pub set_mac: bool,
}

/// The socket to the helper, shared by the daemon's handle and its [`MacSetter`]s. `None` once
/// the daemon let the helper go.
type Channel = Arc<Mutex<Option<UnixStream>>>;

fn ask(chan: &Channel, req: Request, ifindex: u32) -> Result<(), HelperError> {
    let mut guard = chan.lock().unwrap_or_else(PoisonError::into_inner);
    let sock = guard
        .as_mut()
        .ok_or_else(|| HelperError::Gone("closed".into()))?;
    let mut answer = [0u8; RECORD];
    let io = sock
        .write_all(&encode_request(req, ifindex))
        .and_then(|()| sock.read_exact(&mut answer));
    if let Err(e) = io {
        // Out of step with the helper (a timeout may leave its answer in flight): stop using it.
        *guard = None;
        return Err(HelperError::Gone(e.to_string()));
    }
    match decode_reply(&answer) {
        Some(Reply::Done) => Ok(()),
        Some(Reply::Refused(r)) => Err(HelperError::Refused(r)),
        Some(Reply::Failed(errno)) => Err(HelperError::Failed(errno)),
        None => {
            *guard = None;
            Err(HelperError::Gone("an answer no helper sends".into()))
        }
    }
}

/// Sets the helper's macvtap's MAC from any thread (the `qmp` thread holds one).
#[derive(Debug, Clone)]
pub struct MacSetter {
    chan: Channel,
    ifindex: u32,
}

impl MacSetter {
    /// Asks the helper to give its macvtap `mac`.
    pub fn set_mac(&self, mac: MacAddr) -> Result<(), HelperError> {
        ask(&self.chan, Request::SetMac(mac), self.ifindex)
    }
}

/// The daemon's handle on its helper. Dropping it deletes the link (with `delete`), closes the
/// socket (the helper then exits) and reaps the helper.
#[derive(Debug)]
pub struct LinkHelper {
    chan: Channel,
    child: Child,
    spec: HelperSpec,
}

impl LinkHelper {
    /// Starts the helper (the running binary, through `/proc/self/exe`: call it before the
    /// filesystem is hidden, and before sealing, so the helper does not inherit a sealed
    /// process).
    pub fn spawn(spec: &HelperSpec) -> Result<LinkHelper, SandboxError> {
        let (ours, theirs) = UnixStream::pair().map_err(SandboxError::step("socketpair"))?;
        // Set now: a sealed process may still change timeouts, but there is no reason to.
        ours.set_read_timeout(Some(ANSWER_TIMEOUT))
            .and_then(|()| ours.set_write_timeout(Some(ANSWER_TIMEOUT)))
            .map_err(SandboxError::step("link helper socket timeouts"))?;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg("link-helper")
            .arg(spec.ifindex.to_string())
            .arg(&spec.name);
        if spec.delete {
            cmd.arg("--delete");
        }
        if spec.set_mac {
            cmd.arg("--set-mac");
        }
        let child = cmd
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .spawn()
            .map_err(SandboxError::step("starting the link helper"))?;
        // One byte once the helper holds only CAP_NET_ADMIN: the "link helper started" line that
        // follows, and the seal after it, never describe a helper still holding everything.
        let mut ready = [0u8; 1];
        (&ours).read_exact(&mut ready).map_err(SandboxError::step(
            "waiting for the link helper to drop privileges",
        ))?;
        Ok(LinkHelper {
            chan: Arc::new(Mutex::new(Some(ours))),
            child,
            spec: spec.clone(),
        })
    }

    /// The helper's pid (the sealed process may reap it, nothing else).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A handle for MAC changes (`--set-mac`).
    pub fn mac_setter(&self) -> MacSetter {
        MacSetter {
            chan: self.chan.clone(),
            ifindex: self.spec.ifindex,
        }
    }
}

impl Drop for LinkHelper {
    fn drop(&mut self) {
        if self.spec.delete {
            match ask(&self.chan, Request::Delete, self.spec.ifindex) {
                Ok(()) => {
                    tracing::debug!(iface = %self.spec.name, "link helper deleted the macvtap")
                }
                Err(e) => tracing::warn!(
                    iface = %self.spec.name,
                    "the link helper did not confirm deleting the macvtap: {e}"
                ),
            }
        }
        // EOF tells the helper to go (after deleting the link, with `delete`, if it has not).
        drop(
            self.chan
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let _ = self.child.wait();
    }
}

/// Options of `macvhost link-helper`.
#[derive(clap::Args, Debug, Clone)]
pub struct LinkHelperArgs {
    /// The macvtap's ifindex.
    pub ifindex: u32,
    /// The macvtap's name.
    pub name: String,
    /// Delete the macvtap on request and at EOF.
    #[arg(long)]
    pub delete: bool,
    /// Accept MAC changes.
    #[arg(long)]
    pub set_mac: bool,
}

/// Validates one request record against what this helper was started for.
fn parse(r: &[u8; RECORD], me: &LinkHelperArgs) -> Result<Request, Refusal> {
    let op = match r[0] {
        OP_DELETE => Request::Delete,
        OP_SET_MAC => {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&r[8..14]);
            Request::SetMac(MacAddr(mac))
        }
        _ => return Err(Refusal::UnknownOp),
    };
    if r[1..4] != [0; 3] || r[14..] != [0; 2] {
        return Err(Refusal::Reserved);
    }
    if u32::from_le_bytes([r[4], r[5], r[6], r[7]]) != me.ifindex {
        return Err(Refusal::OtherIfindex);
    }
    match op {
        Request::Delete if r[8..14] != [0; 6] => Err(Refusal::Reserved),
        Request::Delete if !me.delete => Err(Refusal::NotEnabled),
        Request::SetMac(_) if !me.set_mac => Err(Refusal::NotEnabled),
        Request::SetMac(MacAddr(m)) if m[0] & 1 == 1 || m == [0; 6] => Err(Refusal::BadMac),
        op => Ok(op),
    }
}

fn keep_only_net_admin() -> Result<(), String> {
    const CAP_NET_ADMIN: u32 = 12;
    let last = super::caps::last_cap().map_err(|e| e.to_string())?;
    for cap in (0..=last).filter(|&c| c != CAP_NET_ADMIN) {
        // SAFETY: prctl with integer arguments only. EPERM (no CAP_SETPCAP) leaves the
        // bounding set as it is, which no_new_privs makes moot.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    super::caps::raw_clear_ambient().map_err(|e| format!("ambient: errno {e}"))?;
    super::caps::raw_keep_only(CAP_NET_ADMIN).map_err(|e| format!("capset: errno {e}"))?;
    super::caps::raw_no_new_privs().map_err(|e| format!("no_new_privs: errno {e}"))?;
    super::caps::set_not_dumpable().map_err(|e| e.to_string())
}

fn errno_of(e: &NetlinkError) -> i32 {
    match e {
        NetlinkError::NotPermitted { .. } => libc::EPERM,
        NetlinkError::NoSuchIfindex { .. } | NetlinkError::NoSuchLink { .. } => libc::ENODEV,
        e => e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Whether `ifindex` still is the macvtap named `name` (one `RTM_GETLINK` by name answers
/// both: the kind is checked, and the ifindex it names).
fn still_ours(me: &LinkHelperArgs) -> bool {
    netlink::macvtap_info(&me.name).is_ok_and(|info| info.ifindex == me.ifindex)
}

fn delete_if_ours(me: &LinkHelperArgs) -> Reply {
    if !still_ours(me) {
        // Renamed, replaced or already gone: not ours to delete any more.
        return Reply::Refused(Refusal::NotOurLink);
    }
    match netlink::delete_link(me.ifindex) {
        Ok(()) | Err(NetlinkError::NoSuchIfindex { .. }) => Reply::Done,
        Err(e) => {
            eprintln!("macvhost link-helper: cannot delete {}: {e}", me.name);
            Reply::Failed(errno_of(&e))
        }
    }
}

/// `macvhost link-helper IFINDEX NAME [--delete] [--set-mac]` (hidden; started by
/// [`LinkHelper::spawn`], its socket on stdin).
pub fn run(args: &LinkHelperArgs) -> ExitCode {
    // SAFETY: SIG_IGN dispositions; no handler runs.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    // Fds the daemon inherited without CLOEXEC (--tap-fd, --fd) are not ours to hold.
    // SAFETY: integer arguments; closes every fd above stderr in this fresh process.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if let Err(e) = keep_only_net_admin() {
        eprintln!("macvhost link-helper: cannot drop privileges: {e}");
        return ExitCode::FAILURE;
    }
    // SAFETY: fd 0 is the socketpair end we were started with, owned by nobody else here.
    let mut sock = unsafe { UnixStream::from_raw_fd(0) };
    // Privileges are down: say so (the daemon waits for this byte before going on).
    if sock.write_all(&[READY]).is_err() {
        return ExitCode::FAILURE;
    }
    let mut said = [false; Refusal::ALL.len() + 1];
    let mut last_mac_change: Option<Instant> = None;
    loop {
        let mut rec = [0u8; RECORD];
        if sock.read_exact(&mut rec).is_err() {
            // EOF (the daemon is gone or let us go), or a short record.
            break;
        }
        let (reply, finished) = match parse(&rec, args) {
            Err(why) => (Reply::Refused(why), false),
            Ok(Request::Delete) => (delete_if_ours(args), true),
            Ok(Request::SetMac(mac)) => {
                if let Some(t) = last_mac_change {
                    std::thread::sleep(SET_MAC_INTERVAL.saturating_sub(t.elapsed()));
                }
                last_mac_change = Some(Instant::now());
                let reply = if !still_ours(args) {
                    Reply::Refused(Refusal::NotOurLink)
                } else {
                    match netlink::set_mac(args.ifindex, mac) {
                        Ok(()) => Reply::Done,
                        Err(e) => Reply::Failed(errno_of(&e)),
                    }
                };
                (reply, false)
            }
        };
        if let Reply::Refused(why) = reply {
            if !std::mem::replace(&mut said[why as usize], true) {
                eprintln!(
                    "macvhost link-helper: refused a request for {} (#{}): {why} (said once)",
                    args.name, args.ifindex
                );
            }
        }
        if sock.write_all(&encode_reply(reply)).is_err() || finished {
            return ExitCode::SUCCESS;
        }
    }
    if args.delete {
        if let Reply::Failed(_) = delete_if_ours(args) {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(delete: bool, set_mac: bool) -> LinkHelperArgs {
        LinkHelperArgs {
            ifindex: 42,
            name: "mvt0".into(),
            delete,
            set_mac,
        }
    }

    const MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 1]);

    #[test]
    fn requests_round_trip_through_the_wire_format() {
        for req in [Request::Delete, Request::SetMac(MAC)] {
            assert_eq!(parse(&encode_request(req, 42), &me(true, true)), Ok(req));
        }
        for reply in [
            Reply::Done,
            Reply::Failed(libc::EADDRINUSE),
            Reply::Refused(Refusal::BadMac),
        ] {
            assert_eq!(decode_reply(&encode_reply(reply)), Some(reply));
        }
        assert_eq!(decode_reply(&[0u8; RECORD]), None);
        let mut bad = encode_reply(Reply::Refused(Refusal::BadMac));
        bad[1] = 200;
        assert_eq!(decode_reply(&bad), None);
    }

    #[test]
    fn multicast_zero_and_broadcast_macs_are_refused() {
        for mac in [
            [0u8; 6],
            [0x01, 0x00, 0x5e, 0, 0, 1],
            [0x33, 0x33, 0, 0, 0, 1],
            [0xff; 6],
        ] {
            let r = encode_request(Request::SetMac(MacAddr(mac)), 42);
            assert_eq!(parse(&r, &me(true, true)), Err(Refusal::BadMac), "{mac:?}");
        }
    }

    #[test]
    fn request_for_another_ifindex_is_refused() {
        for other in [0, 41, 43, u32::MAX] {
            let r = encode_request(Request::SetMac(MAC), other);
            assert_eq!(parse(&r, &me(true, true)), Err(Refusal::OtherIfindex));
            let r = encode_request(Request::Delete, other);
            assert_eq!(parse(&r, &me(true, true)), Err(Refusal::OtherIfindex));
        }
    }

    #[test]
    fn operations_not_enabled_at_start_are_refused() {
        let del = encode_request(Request::Delete, 42);
        let set = encode_request(Request::SetMac(MAC), 42);
        assert_eq!(parse(&del, &me(false, true)), Err(Refusal::NotEnabled));
        assert_eq!(parse(&set, &me(true, false)), Err(Refusal::NotEnabled));
    }

    #[test]
    fn unknown_ops_and_nonzero_reserved_bytes_are_refused() {
        for op in [0u8, b'd', b'm', b'A', 0xff] {
            let mut r = encode_request(Request::SetMac(MAC), 42);
            r[0] = op;
            assert_eq!(parse(&r, &me(true, true)), Err(Refusal::UnknownOp), "{op}");
        }
        for i in [1, 2, 3, 14, 15] {
            let mut r = encode_request(Request::SetMac(MAC), 42);
            r[i] = 1;
            assert_eq!(
                parse(&r, &me(true, true)),
                Err(Refusal::Reserved),
                "byte {i}"
            );
        }
        // A delete carries no MAC.
        let mut r = encode_request(Request::Delete, 42);
        r[9] = 1;
        assert_eq!(parse(&r, &me(true, true)), Err(Refusal::Reserved));
    }
}
