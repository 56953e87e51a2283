//! The one privileged operation the sealed daemon still needs today: deleting the macvtap it
//! created (`--macvtap-parent` without `--keep`). It is done by a small helper process started
//! before sealing, which keeps only `CAP_NET_ADMIN` and never maps guest memory.
//!
//! The helper is told at start which link it guards (ifindex and name, on its command line)
//! and listens on a socketpair. It accepts one one-byte request, `D` (delete now, answered
//! with `A`), and deletes the link just the same when the socket reaches EOF, so the macvtap
//! also goes away when macvhost is killed (or fails to seal and exits). Before deleting it checks that the ifindex still carries that name and is a
//! macvtap. The sealed side sends no data beyond that byte: nothing it says can make the
//! helper touch another link.
//!
//! This is the first request of the privileged-helper split described in `docs/security.md`
//! (multicast filter changes on the macvtap will be the next ones).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use super::SandboxError;

/// The request byte, and its answer.
const DELETE: u8 = b'D';
const ACK: u8 = b'A';

/// The daemon's handle on its link helper.
#[derive(Debug)]
pub struct LinkHelper {
    sock: UnixStream,
    child: Child,
    name: String,
}

impl LinkHelper {
    /// Starts `macvhost link-helper IFINDEX NAME` (the running binary, through
    /// `/proc/self/exe`, before the filesystem is hidden).
    pub fn spawn(ifindex: u32, name: &str) -> Result<LinkHelper, SandboxError> {
        let (ours, theirs) = UnixStream::pair().map_err(SandboxError::step("socketpair"))?;
        let child = Command::new("/proc/self/exe")
            .arg("link-helper")
            .arg(ifindex.to_string())
            .arg(name)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .spawn()
            .map_err(SandboxError::step("starting the link helper"))?;
        Ok(LinkHelper {
            sock: ours,
            child,
            name: name.to_string(),
        })
    }

    /// The helper's pid (the sealed process may wait for it, nothing else).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn request(&mut self, byte: u8) -> bool {
        let _ = self.sock.set_read_timeout(Some(Duration::from_secs(5)));
        let mut ack = [0u8; 1];
        let ok = self.sock.write_all(&[byte]).is_ok()
            && self.sock.read_exact(&mut ack).is_ok()
            && ack[0] == ACK;
        let _ = self.child.wait();
        ok
    }
}

impl Drop for LinkHelper {
    fn drop(&mut self) {
        if self.request(DELETE) {
            tracing::debug!(iface = %self.name, "link helper deleted the macvtap");
        } else {
            tracing::warn!(iface = %self.name, "the link helper did not confirm deleting the macvtap");
        }
    }
}

/// Options of `macvhost link-helper`.
#[derive(clap::Args, Debug, Clone)]
pub struct LinkHelperArgs {
    /// The macvtap's ifindex.
    pub ifindex: u32,
    /// The macvtap's name.
    pub name: String,
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

fn delete_if_ours(ifindex: u32, name: &str) -> Result<(), String> {
    match nix::net::if_::if_nametoindex(name) {
        Ok(i) if i == ifindex => {}
        // Renamed, replaced or already gone: not ours to delete any more.
        _ => return Ok(()),
    }
    crate::host::netlink::macvtap_info(name).map_err(|e| e.to_string())?;
    match crate::host::netlink::delete_link(ifindex) {
        Ok(()) | Err(crate::host::netlink::NetlinkError::NoSuchIfindex { .. }) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// `macvhost link-helper IFINDEX NAME` (hidden; started by [`LinkHelper::spawn`]).
pub fn run(args: &LinkHelperArgs) -> ExitCode {
    // A terminal's Ctrl-C reaches the whole process group: outlive the daemon to clean up.
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
    // `D`, or EOF (the daemon is gone): either way the link goes. Any other byte is not a
    // request we know, and the link goes too.
    let mut req = [0u8; 1];
    let _ = std::io::stdin().lock().read(&mut req);
    let result = delete_if_ours(args.ifindex, &args.name);
    if let Err(e) = &result {
        eprintln!("macvhost link-helper: cannot delete {}: {e}", args.name);
    }
    let _ = std::io::stdout().flush();
    // The answer goes back on the same socket (stdin is its one end).
    // SAFETY: fd 0 is the socketpair end we were started with; write takes a valid buffer.
    unsafe { libc::write(0, [ACK].as_ptr().cast(), 1) };
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
