//! One frontend connection: its device ([`NetBackend`]), vhost-user-backend's daemon serving it,
//! and the shim relaying the frontend's messages to that daemon.
//!
//! Threads per connection: the shim's relay (`vu-shim`), the daemon's request thread
//! (`macvhost`), and one epoll thread per queue pair running that pair's worker.
//! [`Connection::close`] ends them all and none of them waits on the frontend: it shuts down
//! the daemon's socket and the frontend's (which wakes the relay wherever it waits), the
//! workers' fds to the frontend never block (see `vring`), and a worker stuck in a frontend
//! fd anyway is interrupted by the vring watchdog.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::sys::socket::{
    bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::backend::{DeviceIdentity, HostSide, NetBackend};
use super::shim::{self, ConfigNotifier, RelayContext};
use crate::datapath::QueueStats;
use crate::worker::{EpollRegistry, EventRegistry, PairQueue};

/// Why a connection could not be set up. All are host failures (resources, threads).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Building the device (workers, eventfds, timers) failed.
    #[error("cannot set up the device: {0}")]
    Device(io::Error),
    /// vhost-user-backend refused to build or start its daemon.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// The private channel to the daemon could not be made.
    #[error("private channel to the vhost-user handler: {0}")]
    Rendezvous(io::Error),
    /// The frontend's socket could not be duplicated (fd table full).
    #[error("cannot duplicate the frontend's socket: {0}")]
    Socket(io::Error),
}

/// A served frontend (see the module doc).
pub struct Connection<Q: PairQueue> {
    backend: Arc<NetBackend<Q>>,
    daemon: VhostUserDaemon<Arc<NetBackend<Q>>>,
    notifier: Arc<ConfigNotifier>,
    /// Our copy of the frontend's socket: shutting it down wakes the relay (see `close`).
    frontend: UnixStream,
    relay: Option<JoinHandle<Result<(), shim::ShimError>>>,
}

impl<Q: PairQueue> std::fmt::Debug for Connection<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl<Q: PairQueue> Connection<Q> {
    /// Builds a fresh device for `frontend` over the persistent host queues and counters, and
    /// starts serving it.
    pub fn start(
        frontend: UnixStream,
        identity: DeviceIdentity,
        host: HostSide<Q>,
        stats: &[Arc<QueueStats>],
    ) -> Result<Connection<Q>, ConnectionError> {
        let backend =
            Arc::new(NetBackend::new(identity, host, stats).map_err(ConnectionError::Device)?);
        let mut daemon = VhostUserDaemon::new(
            "macvhost".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ConnectionError::Daemon(e.to_string()))?;
        let registries = daemon
            .get_epoll_handlers()
            .iter()
            .map(|h| {
                // A duplicate of the handler's epoll fd: the same epoll set, owned by the worker.
                let fd = crate::host::dup_cloexec(h.as_raw_fd())?;
                Ok(Box::new(EpollRegistry::new(fd)) as Box<dyn EventRegistry>)
            })
            .collect::<io::Result<Vec<_>>>()
            .map_err(ConnectionError::Device)?;
        backend.set_registries(registries);

        let (mut listener, to_daemon) = rendezvous().map_err(ConnectionError::Rendezvous)?;
        daemon
            .start(&mut listener)
            .map_err(|e| ConnectionError::Daemon(e.to_string()))?;
        drop(listener);
        let notifier = Arc::new(ConfigNotifier::default());
        let ctx = RelayContext {
            dirty_log: backend.dirty_log(),
            notifier: notifier.clone(),
            vrings: usize::from(identity.queue_pairs) * 2,
            queue_size: identity.queue_size,
        };
        let ours = frontend.try_clone().map_err(ConnectionError::Socket)?;
        let relay = std::thread::Builder::new()
            .name("vu-shim".into())
            .spawn(move || {
                if let Err(e) = crate::sandbox::enter_thread(crate::sandbox::ThreadKind::Relay) {
                    tracing::error!("the relay thread stays under the process filter: {e}");
                }
                let ended = shim::relay(frontend, to_daemon, ctx);
                match &ended {
                    Ok(()) => tracing::debug!("vhost-user relay ended"),
                    // The serve loop logs the frontend's fault (rate-limited across connections).
                    Err(e) if e.frontend_fault() => {}
                    Err(e) => tracing::debug!("vhost-user relay ended: {e}"),
                }
                ended
            })
            .map_err(|e| ConnectionError::Daemon(e.to_string()))?;
        Ok(Connection {
            backend,
            daemon,
            notifier,
            frontend: ours,
            relay: Some(relay),
        })
    }

    /// This connection's device.
    pub fn backend(&self) -> &Arc<NetBackend<Q>> {
        &self.backend
    }

    /// Ends the connection from another thread (a stop, a lost carrier).
    pub fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        self.daemon.shutdown_handle()
    }

    /// Announces config changes to this connection's frontend.
    pub fn notifier(&self) -> Arc<ConfigNotifier> {
        self.notifier.clone()
    }

    /// Blocks until the frontend leaves or the connection is shut down.
    pub fn wait(&mut self) -> Result<(), vhost_user_backend::Error> {
        self.daemon.wait()
    }

    /// Tears the connection down: ends the relay, detaches the host queues, stops the workers.
    /// Returns what ended the relay when it was the frontend's doing (a refused message, or a
    /// device other than the one configured: [`shim::ShimError::misfit`]), for the caller to
    /// log once.
    pub fn close(mut self) -> Option<shim::ShimError> {
        self.daemon.request_shutdown();
        // Wakes the relay whether it waits to read from the frontend or to write to it.
        let _ = self.frontend.shutdown(std::net::Shutdown::Both);
        let fault = self
            .relay
            .take()
            .and_then(|relay| relay.join().ok())
            .and_then(Result::err)
            .filter(shim::ShimError::frontend_fault);
        self.backend.teardown();
        for h in self.daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        fault
    }
}

/// A listener for vhost-user-backend's daemon (which only accepts connections) that can only
/// ever hand it our own connection, and that connection.
///
/// The listener has an abstract-namespace name (no file to create, none left behind, usable
/// with no filesystem access) and a backlog of 0, which Linux treats as room for exactly one
/// pending connection. We connect without blocking: if that fails with `EAGAIN`, someone else
/// got in first, and we try another name; if it succeeds, nobody else can get in before the
/// daemon accepts, and the listener is closed right after.
fn rendezvous() -> io::Result<(Listener, UnixStream)> {
    for _ in 0..8 {
        let mut nonce = [0u8; 8];
        crate::host::random_bytes(&mut nonce);
        let name = format!(
            "macvhost-{}-{:016x}",
            std::process::id(),
            u64::from_ne_bytes(nonce)
        );
        let addr = UnixAddr::new_abstract(name.as_bytes())?;
        let lfd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(lfd.as_raw_fd(), &addr)?;
        listen(&lfd, Backlog::new(0)?)?;
        let cfd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        match connect(cfd.as_raw_fd(), &addr) {
            Ok(()) => {
                let client = UnixStream::from(cfd);
                client.set_nonblocking(false)?;
                return Ok((Listener::from(UnixListener::from(lfd)), client));
            }
            Err(nix::errno::Errno::EAGAIN) => {
                tracing::warn!("someone connected to macvhost's private handler socket first");
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other(
        "others kept connecting to the private handler socket",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn rendezvous_listener_hands_over_our_connection() {
        let (listener, mut ours) = rendezvous().unwrap();
        let mut theirs = listener.accept().unwrap().unwrap();
        ours.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        theirs.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[test]
    fn rendezvous_listener_has_room_for_no_second_connection() {
        let (listener, _ours) = rendezvous().unwrap();
        let name = nix::sys::socket::getsockname::<UnixAddr>(listener.as_raw_fd()).unwrap();
        let intruder = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        assert_eq!(
            connect(intruder.as_raw_fd(), &name),
            Err(nix::errno::Errno::EAGAIN),
            "a second connection must not queue behind ours"
        );
    }
}
