//! Where frontends come from: a socket path we listen on, a listening fd a manager passed us,
//! or a frontend's socket we connect to (`--client`).

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vhost::vhost_user::Listener;

use super::signals::Stopper;
use super::{ServerError, SocketMode};

/// How often a lost or returned carrier is looked for while it matters.
pub(super) const CARRIER_POLL: Duration = Duration::from_millis(50);

/// The source of frontend connections for one [`SocketMode`]. The one listener is kept across
/// connections, so a frontend reconnecting never races a re-created socket; the exception is
/// [`Frontends::pause_until_carrier`].
pub(super) struct Frontends<'a> {
    socket: &'a SocketMode,
    listener: Option<Listener>,
    stopper: &'a Stopper,
}

impl<'a> Frontends<'a> {
    /// Binds (or adopts) the listener; nothing to do for `--client`.
    pub(super) fn open(socket: &'a SocketMode, stopper: &'a Stopper) -> Result<Self, ServerError> {
        let listener = match socket {
            SocketMode::Listen(path) => Some(bind(path)?),
            SocketMode::ListenFd(fd) => Some(listener_from_fd(*fd)?),
            SocketMode::Connect(_) => None,
        };
        if let Some(l) = &listener {
            stopper.set_listener_fd(Some(l.as_raw_fd()));
            tracing::info!(socket = ?socket, "listening for a vhost-user frontend");
        }
        Ok(Frontends {
            socket,
            listener,
            stopper,
        })
    }

    /// The next frontend: accepted, or connected to with backoff. An error means a stop or a
    /// failed listener.
    pub(super) fn next(&mut self) -> Result<UnixStream, String> {
        match (&self.listener, self.socket) {
            (Some(l), _) => accept_frontend(l),
            (None, SocketMode::Connect(path)) => connect_with_backoff(path, self.stopper),
            (None, _) => Err("no listener".into()),
        }
    }

    /// Serves nobody until `link_up` (or a stop): a socket path is unbound so that connects
    /// fail at once (a frontend with reconnect keeps retrying), a passed-in listening fd has each
    /// connection closed as it comes, and a client does not connect.
    pub(super) fn pause_until_carrier(&mut self, link_up: &AtomicBool) -> Result<(), ServerError> {
        tracing::info!("host link has no carrier: serving no frontend until it returns");
        if let SocketMode::Listen(_) = self.socket {
            self.stopper.set_listener_fd(None);
            self.listener = None;
        }
        if let Some(l) = &self.listener {
            let _ = l.set_nonblocking(true);
        }
        while !link_up.load(Ordering::SeqCst) && !self.stopper.stopping() {
            if let Some(l) = &self.listener {
                while let Ok(Some(refused)) = l.accept() {
                    drop(refused);
                }
            }
            std::thread::sleep(CARRIER_POLL);
        }
        if let Some(l) = &self.listener {
            let _ = l.set_nonblocking(false);
        }
        if let SocketMode::Listen(path) = self.socket {
            if !self.stopper.stopping() {
                let l = bind(path)?;
                self.stopper.set_listener_fd(Some(l.as_raw_fd()));
                self.listener = Some(l);
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
        self.stopper.set_listener_fd(None);
        // Dropping the listener removes the socket path it created.
    }
}

fn bind(path: &Path) -> Result<Listener, ServerError> {
    Listener::new(path, true).map_err(|source| ServerError::Listen {
        path: path.to_path_buf(),
        source,
    })
}

fn listener_from_fd(fd: RawFd) -> Result<Listener, ServerError> {
    let bad = |reason: &str| ServerError::BadFd {
        fd,
        reason: reason.to_string(),
    };
    // The operator handed the fd to us to own (--fd).
    let owned = crate::host::adopt_fd(fd).map_err(|_| bad("is not an open file descriptor"))?;
    let listening = nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::AcceptConn)
        .map_err(|_| bad("is not a socket"))?;
    if !listening {
        return Err(bad("is a socket but not listening"));
    }
    nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(owned.as_raw_fd())
        .map_err(|_| bad("is not a unix socket"))?;
    Ok(Listener::from(UnixListener::from(owned)))
}

fn connect_with_backoff(path: &Path, stopper: &Stopper) -> Result<UnixStream, String> {
    let mut delay = Duration::from_millis(50);
    let mut logged = false;
    loop {
        if stopper.stopping() {
            return Err("stopping".into());
        }
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if !logged {
                    tracing::info!("waiting for a frontend at {} ({e})", path.display());
                    logged = true;
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn accept_frontend(listener: &Listener) -> Result<UnixStream, String> {
    loop {
        match listener.accept() {
            Ok(Some(s)) => return Ok(s),
            // A client that connected and left before we accepted: wait for the next.
            Ok(None) => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
}
