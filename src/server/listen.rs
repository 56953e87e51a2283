//! Where frontends come from: a socket path we listen on, a listening fd a manager passed us,
//! or a frontend's socket we connect to (`--client`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::signals::Stopper;
use super::{Endpoint, ServerError, SocketMode, SocketPerms};

/// How often a lost or returned carrier is looked for while it matters.
pub(super) const CARRIER_POLL: Duration = Duration::from_millis(50);

/// The source of frontend connections for one [`SocketMode`]. The one listener is kept across
/// connections (and across link loss, see [`Frontends::pause_until_carrier`]), so a frontend
/// reconnecting never races a re-created socket, and the socket keeps the owner and mode set
/// at start-up.
pub(super) struct Frontends<'a> {
    endpoint: &'a Endpoint,
    listener: Option<UnixListener>,
    /// The socket file we created (removed when we are done with it).
    file: Option<SocketFile>,
    stopper: &'a Stopper,
}

impl<'a> Frontends<'a> {
    /// Binds (or adopts) the listener; nothing to do for `--client`.
    pub(super) fn open(endpoint: &'a Endpoint, stopper: &'a Stopper) -> Result<Self, ServerError> {
        let socket = &endpoint.mode;
        let (listener, file) = match socket {
            SocketMode::Listen(path) => {
                let (l, f) = bind(path, &endpoint.perms)?;
                (Some(l), Some(f))
            }
            SocketMode::ListenFd(fd) => (Some(listener_from_fd(*fd)?), None),
            SocketMode::Connect(_) => (None, None),
        };
        if let Some(l) = &listener {
            // Nonblocking: accept waits in poll beside the stop signal.
            l.set_nonblocking(true).map_err(|e| ServerError::Listen {
                path: format!("{socket:?}").into(),
                reason: e.to_string(),
            })?;
            tracing::info!(socket = ?socket, "listening for a vhost-user frontend");
        }
        Ok(Frontends {
            endpoint,
            listener,
            file,
            stopper,
        })
    }

    /// Takes over a running macvhost's listener (`--take-over`): `listener` was handed over
    /// and is checked to be bound to the `--socket-path`; the file there stays as it is (no
    /// unlink, no bind: a frontend reconnecting finds the same socket) and becomes ours to
    /// remove on exit. With `--client` there is no listener.
    pub(super) fn adopt(
        endpoint: &'a Endpoint,
        listener: Option<UnixListener>,
        stopper: &'a Stopper,
    ) -> Result<Self, ServerError> {
        let (listener, file) = match (&endpoint.mode, listener) {
            (SocketMode::Listen(path), Some(l)) => {
                let refuse = |reason: String| ServerError::Listen {
                    path: path.clone(),
                    reason,
                };
                let meta = std::fs::symlink_metadata(path)
                    .map_err(|e| refuse(format!("the socket taken over is not there: {e}")))?;
                if !meta.file_type().is_socket() {
                    return Err(refuse("the file taken over is not a socket".into()));
                }
                // Still the old process's until the take-over completes
                // ([`Frontends::own_socket_file`]): a new process that fails leaves it alone.
                let file = SocketFile {
                    path: path.clone(),
                    dev: meta.dev(),
                    ino: meta.ino(),
                    owned: false,
                };
                (Some(l), Some(file))
            }
            (SocketMode::Connect(_), None) => (None, None),
            (mode, l) => {
                return Err(ServerError::Listen {
                    path: format!("{mode:?}").into(),
                    reason: format!(
                        "--take-over: {} listener handed over for this socket mode",
                        if l.is_some() { "a" } else { "no" }
                    ),
                })
            }
        };
        if let Some(l) = &listener {
            l.set_nonblocking(true).map_err(|e| ServerError::Listen {
                path: format!("{:?}", endpoint.mode).into(),
                reason: e.to_string(),
            })?;
            tracing::info!(socket = ?endpoint.mode, "took over the listening socket");
        }
        Ok(Frontends {
            endpoint,
            listener,
            file,
            stopper,
        })
    }

    /// The take-over is complete: the socket file taken over is ours to remove on exit.
    pub(super) fn own_socket_file(&mut self) {
        if let Some(f) = self.file.as_mut() {
            f.owned = true;
        }
    }

    /// The listening socket, when we listen (to hand over with `--take-over`).
    pub(super) fn listener(&self) -> Option<&UnixListener> {
        self.listener.as_ref()
    }

    /// The next frontend: accepted, or connected to with backoff. An error means a stop or a
    /// failed listener.
    pub(super) fn next(&mut self) -> Result<UnixStream, String> {
        match (&self.listener, &self.endpoint.mode) {
            (Some(l), _) => accept_frontend(l, self.stopper),
            (None, SocketMode::Connect(path)) => connect_with_backoff(path, self.stopper),
            (None, _) => Err("no listener".into()),
        }
    }

    /// Serves nobody until `link_up` (or a stop): a `--socket-path` is moved aside so that
    /// connects to it fail at once (a frontend with reconnect keeps retrying), a passed-in
    /// listening fd has each connection closed as it comes, and a client does not connect.
    ///
    /// Moving aside renames the socket to a hidden name beside it ([`aside_path`]) and back
    /// when carrier returns: the listener stays bound, so nothing is bound again and the file
    /// keeps the owner and mode set at start-up (a sealed process could not chown a new one).
    /// When the socket cannot be moved (the hidden name is taken by something that is not a
    /// stale socket, or the path no longer names our socket), it stays where it is and each
    /// connection is closed as it comes, like `--fd`.
    pub(super) fn pause_until_carrier(&mut self, link_up: &AtomicBool) -> Result<(), ServerError> {
        tracing::info!("host link has no carrier: serving no frontend until it returns");
        let mut aside = false;
        if let (SocketMode::Listen(path), Some(file)) = (&self.endpoint.mode, &mut self.file) {
            match file.move_to(&aside_path(path)) {
                Ok(()) => aside = true,
                Err(e) => tracing::warn!(
                    "cannot move {} aside while the link is down ({e}): it stays, and each \
                     connection is closed as it comes",
                    path.display()
                ),
            }
        }
        while !link_up.load(Ordering::SeqCst) && !self.stopper.stopping() {
            self.refuse_pending();
            self.stopper.sleep(CARRIER_POLL);
        }
        if aside && !self.stopper.stopping() {
            // Nobody is served from the backlog of the hidden name.
            self.refuse_pending();
            if let (SocketMode::Listen(path), Some(file)) = (&self.endpoint.mode, &mut self.file) {
                file.move_back(path)?;
            }
        }
        if !self.stopper.stopping() {
            tracing::info!("host link has carrier again: serving frontends");
        }
        Ok(())
    }

    /// Accepts and closes every connection waiting on the listener.
    fn refuse_pending(&self) {
        if let Some(l) = &self.listener {
            while let Ok((refused, _)) = l.accept() {
                drop(refused);
            }
        }
    }
}

/// Where a `--socket-path` waits while the link is down: a hidden name in the same directory
/// (`/run/macvhost/vm0.sock` → `/run/macvhost/.vm0.sock.link-down`), so that renaming it stays
/// inside the directory the sealed process may write.
pub(super) fn aside_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".link-down");
    path.with_file_name(name)
}

impl Drop for Frontends<'_> {
    fn drop(&mut self) {
        // The listener closes, then `file` removes the socket file if it is still ours: not
        // after a hand-over, when the new process serves it.
        self.listener = None;
        if self.stopper.handed_over() {
            if let Some(f) = self.file.as_mut() {
                f.disown();
            }
        }
    }
}

/// A socket file macvhost created. Dropping it removes the file, but only if the path still
/// names the same file: a successor that took over the path keeps its socket.
#[derive(Debug)]
pub(super) struct SocketFile {
    /// Where the file is now (the socket path, or its aside name while the link is down).
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// False once handed over (or while a take-over is not complete): not ours to remove.
    owned: bool,
}

impl SocketFile {
    /// Whether `path` names this file.
    fn is_at(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }

    /// Forgets the file: another process serves it now, dropping leaves it alone.
    fn disown(&mut self) {
        self.owned = false;
    }

    /// Renames the file to `to`, which must not exist; a stale socket there (nobody listens,
    /// left by a killed macvhost) is removed first.
    fn move_to(&mut self, to: &Path) -> io::Result<()> {
        if !self.is_at(&self.path) {
            return Err(io::Error::other(format!(
                "{} is no longer our socket",
                self.path.display()
            )));
        }
        let rename = || {
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                self.path.as_path(),
                nix::fcntl::AT_FDCWD,
                to,
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            )
        };
        match rename() {
            Err(nix::errno::Errno::EEXIST) if is_stale_socket(to) => {
                tracing::info!(path = %to.display(), "removing a stale socket");
                std::fs::remove_file(to)?;
                rename()?;
            }
            r => r?,
        }
        self.path = to.to_path_buf();
        Ok(())
    }

    /// Renames the file back to `path` when carrier returns, refusing (like [`bind`]) to
    /// replace anything there but a stale socket.
    fn move_back(&mut self, path: &Path) -> Result<(), ServerError> {
        let refuse = |reason: String| ServerError::Listen {
            path: path.to_path_buf(),
            reason,
        };
        match self.move_to(path) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                Err(refuse(match std::fs::symlink_metadata(path) {
                    Ok(m) if !m.file_type().is_socket() => {
                        "was replaced while the link was down by something that is not a \
                         socket; refusing to replace it"
                            .into()
                    }
                    _ => "another process listens on this socket since the link went down; \
                          refusing to take it over"
                        .into(),
                }))
            }
            Err(e) => Err(refuse(format!(
                "cannot move the socket back from {}: {e}",
                self.path.display()
            ))),
        }
    }
}

/// Whether `path` is a socket nobody listens on.
fn is_stale_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
        && UnixStream::connect(path).is_err_and(|e| e.raw_os_error() == Some(libc::ECONNREFUSED))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.owned && self.is_at(&self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds a listening socket at `path`. Refuses to replace anything that is not a stale socket:
/// a regular file, a directory, or a socket another process still listens on (probed by
/// connecting). Applies `perms` before anyone can be accepted.
fn bind(path: &Path, perms: &SocketPerms) -> Result<(UnixListener, SocketFile), ServerError> {
    let refuse = |reason: String| ServerError::Listen {
        path: path.to_path_buf(),
        reason,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(refuse(
                "exists and is not a socket; refusing to replace it".into(),
            ))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(refuse(
                    "another process is listening on this socket; refusing to take it over \
                     (stop it first, or choose another path)"
                        .into(),
                ))
            }
            // Nobody listens: a stale socket left by a process that died.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                tracing::info!(path = %path.display(), "removing a stale socket");
                std::fs::remove_file(path)
                    .map_err(|e| refuse(format!("cannot remove the stale socket: {e}")))?;
            }
            Err(e) => return Err(refuse(format!("cannot probe the existing socket: {e}"))),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(refuse(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| refuse(e.to_string()))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| refuse(e.to_string()))?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
        owned: true,
    };
    if let Some((uid, gid)) = perms.owner {
        std::os::unix::fs::chown(path, Some(uid), gid)
            .map_err(|e| refuse(format!("--socket-owner: {e}")))?;
    }
    if let Some(mode) = perms.mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| refuse(format!("--socket-mode: {e}")))?;
    }
    Ok((listener, file))
}

fn listener_from_fd(fd: RawFd) -> Result<UnixListener, ServerError> {
    let bad = |reason: &str| ServerError::BadFd {
        fd,
        reason: reason.to_string(),
    };
    // The operator (or libvirt) handed the fd to us to own (--fd).
    let owned = crate::systemd::adopt_inherited_fd(fd)
        .ok_or_else(|| bad("is not an open file descriptor"))?;
    let listening = nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::AcceptConn)
        .map_err(|_| bad("is not a socket"))?;
    if !listening {
        return Err(bad("is a socket but not listening"));
    }
    nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(owned.as_raw_fd())
        .map_err(|_| bad("is not a unix socket"))?;
    Ok(UnixListener::from(owned))
}

fn connect_with_backoff(path: &Path, stopper: &Stopper) -> Result<UnixStream, String> {
    let mut delay = Duration::from_millis(50);
    // Said once per kind of failure: "not there yet" and then "permission denied" are both worth
    // a line, the hundredth retry is not.
    let mut logged = None;
    loop {
        if stopper.stopping() {
            return Err("stopping".into());
        }
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if logged != Some(e.kind()) {
                    if e.kind() == std::io::ErrorKind::PermissionDenied {
                        tracing::warn!(
                            "cannot connect to {}: {e} (the socket must be writable by \
                             macvhost's user, e.g. --user of the frontend's user)",
                            path.display()
                        );
                    } else {
                        tracing::info!("waiting for a frontend at {} ({e})", path.display());
                    }
                    logged = Some(e.kind());
                }
                stopper.sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn accept_frontend(listener: &UnixListener, stopper: &Stopper) -> Result<UnixStream, String> {
    loop {
        if !stopper.wait_readable(listener.as_fd(), None) {
            return Err("stopping".into());
        }
        match listener.accept() {
            Ok((s, _)) => return Ok(s),
            // Nothing there after all, or a client that left before we accepted: wait again.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms() -> SocketPerms {
        SocketPerms {
            owner: None,
            mode: Some(0o640),
        }
    }

    fn ino(p: &Path) -> u64 {
        std::fs::symlink_metadata(p).unwrap().ino()
    }

    #[test]
    fn moving_the_socket_aside_keeps_its_file_and_listener_and_hides_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm0.sock");
        let aside = aside_path(&path);
        assert_eq!(aside, dir.path().join(".vm0.sock.link-down"));
        let (listener, mut file) = bind(&path, &perms()).unwrap();
        let at_bind = ino(&path);

        file.move_to(&aside).unwrap();
        let e = UnixStream::connect(&path).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // Still the same listening socket, only under another name.
        assert_eq!(ino(&aside), at_bind);
        drop(UnixStream::connect(&aside).unwrap());
        listener.accept().unwrap();

        file.move_back(&path).unwrap();
        assert!(!aside.exists());
        assert_eq!(ino(&path), at_bind);
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o640, "mode lost on the way");
        drop(UnixStream::connect(&path).unwrap());
        listener.accept().unwrap();
    }

    #[test]
    fn a_stale_socket_at_the_aside_name_is_replaced_anything_else_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm0.sock");
        let aside = aside_path(&path);
        drop(UnixListener::bind(&aside).unwrap());
        let (_l, mut file) = bind(&path, &perms()).unwrap();
        let ours = ino(&path);
        file.move_to(&aside).unwrap();
        assert_eq!(ino(&aside), ours);
        file.move_back(&path).unwrap();

        // A live socket (another process's) or a regular file: neither is replaced.
        let other = UnixListener::bind(&aside).unwrap();
        let e = file.move_to(&aside).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");
        assert_eq!(ino(&path), ours);
        drop(other);
        std::fs::remove_file(&aside).unwrap();
        std::fs::write(&aside, b"not ours").unwrap();
        assert!(file.move_to(&aside).is_err());
        assert_eq!(std::fs::read(&aside).unwrap(), b"not ours");
        assert_eq!(ino(&path), ours);
    }

    #[test]
    fn moving_back_refuses_a_path_taken_while_the_link_was_down() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm0.sock");
        let (_l, mut file) = bind(&path, &perms()).unwrap();
        file.move_to(&aside_path(&path)).unwrap();

        let successor = UnixListener::bind(&path).unwrap();
        let e = file.move_back(&path).unwrap_err().to_string();
        assert!(e.contains("another process listens"), "{e}");
        drop(successor);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"x").unwrap();
        let e = file.move_back(&path).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
        // Our socket is still aside, and dropping it removes it there.
        let aside = aside_path(&path);
        assert!(aside.exists());
        drop(file);
        assert!(!aside.exists());
        assert!(
            path.exists(),
            "the file at the socket path is not ours to remove"
        );
    }

    #[test]
    fn a_socket_removed_behind_our_back_is_not_moved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm0.sock");
        let (_l, mut file) = bind(&path, &perms()).unwrap();
        std::fs::remove_file(&path).unwrap();
        drop(UnixListener::bind(&path).unwrap());
        let e = file.move_to(&aside_path(&path)).unwrap_err();
        assert!(e.to_string().contains("no longer our socket"), "{e}");
        assert!(!aside_path(&path).exists());
    }
}
