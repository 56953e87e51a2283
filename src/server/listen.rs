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
/// connections, so a frontend reconnecting never races a re-created socket; the exception is
/// [`Frontends::pause_until_carrier`].
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

    /// The next frontend: accepted, or connected to with backoff. An error means a stop or a
    /// failed listener.
    pub(super) fn next(&mut self) -> Result<UnixStream, String> {
        match (&self.listener, &self.endpoint.mode) {
            (Some(l), _) => accept_frontend(l, self.stopper),
            (None, SocketMode::Connect(path)) => connect_with_backoff(path, self.stopper),
            (None, _) => Err("no listener".into()),
        }
    }

    /// Serves nobody until `link_up` (or a stop): a socket path is unbound so that connects
    /// fail at once (a frontend with reconnect keeps retrying), a passed-in listening fd has each
    /// connection closed as it comes, and a client does not connect.
    pub(super) fn pause_until_carrier(&mut self, link_up: &AtomicBool) -> Result<(), ServerError> {
        tracing::info!("host link has no carrier: serving no frontend until it returns");
        if let SocketMode::Listen(_) = self.endpoint.mode {
            self.listener = None;
            self.file = None;
        }
        while !link_up.load(Ordering::SeqCst) && !self.stopper.stopping() {
            if let Some(l) = &self.listener {
                while let Ok((refused, _)) = l.accept() {
                    drop(refused);
                }
            }
            self.stopper.sleep(CARRIER_POLL);
        }
        if let SocketMode::Listen(path) = &self.endpoint.mode {
            if !self.stopper.stopping() {
                let (l, f) = bind(path, &self.endpoint.perms)?;
                l.set_nonblocking(true).map_err(|e| ServerError::Listen {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                self.listener = Some(l);
                self.file = Some(f);
            }
        }
        if !self.stopper.stopping() {
            tracing::info!("host link has carrier again: serving frontends");
        }
        Ok(())
    }
}

impl Drop for Frontends<'_> {
    fn drop(&mut self) {
        // The listener closes, then `file` removes the socket file if it is still ours.
        self.listener = None;
    }
}

/// A socket file macvhost created. Dropping it removes the file, but only if the path still
/// names the same file: a successor that took over the path keeps its socket.
#[derive(Debug)]
pub(super) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
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
                    "another process is listening on this socket; refusing to take it over                      (stop it first, or choose another path)"
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
