//! Serving frontends: listen (or connect), serve one connection, tear it down, serve the next.
//!
//! The host queues and counters live for the whole process; everything a frontend negotiates
//! lives in a `NetBackend` made for its connection. The one listener is kept across
//! connections, so a frontend reconnecting never races a re-created socket; the exception is
//! `--disconnect-on-link-down`, which unbinds it while the host link has no carrier (see
//! [`HostSide::link_down_disconnects`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{DeviceIdentity, HostSide, NetBackend, QueueControl};
use crate::config::{Config, MacAddr, SocketMode};
use crate::datapath::QueueStats;
use crate::host::{HostDevice, HostError, HostKind, HostSpec};

/// Why the server could not start or keep going.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The host device could not be opened or queried (host or operator).
    #[error("host device: {0}")]
    Host(#[from] HostError),
    /// The socket could not be bound (operator: path, permissions).
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: vhost::vhost_user::Error,
    },
    /// `--fd` is not a listening unix socket (operator).
    #[error("--fd {fd}: {reason}")]
    BadFd {
        /// The fd.
        fd: RawFd,
        /// Why it was refused.
        reason: String,
    },
    /// Building the per-connection device failed (host).
    #[error("cannot set up the device: {0}")]
    Device(std::io::Error),
    /// vhost-user-backend refused to build the daemon (host).
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// The control socket or metrics endpoint could not start (operator).
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// Creating the macvtap failed (operator: parent, mode, name; or host).
    #[error("--macvtap-parent: {0}")]
    Netlink(#[from] crate::netlink::NetlinkError),
    /// Signal handling could not be installed (host).
    #[error("signal handling: {0}")]
    Signals(nix::Error),
    /// Dropping privileges failed (host, or operator for --user/--group).
    #[error("sandbox: {0} (--no-sandbox runs without it)")]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// What the signal thread needs to stop whatever the server is doing.
#[derive(Default)]
struct Stopper {
    requested: AtomicBool,
    connection: Mutex<Option<ShutdownHandle>>,
    listener_fd: Mutex<Option<RawFd>>,
}

impl Stopper {
    fn stop(&self) {
        self.requested.store(true, Ordering::SeqCst);
        self.end_connection();
        if let Some(fd) = *self.listener_fd.lock().unwrap_or_else(|e| e.into_inner()) {
            // Wakes a blocked accept() with EINVAL; the fd itself stays valid until main drops it.
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        }
    }

    fn stopping(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Ends the current connection (if any) without stopping the loop.
    fn end_connection(&self) {
        if let Some(h) = self
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            h.shutdown();
        }
    }

    fn set_listener_fd(&self, fd: Option<RawFd>) {
        *self.listener_fd.lock().unwrap_or_else(|e| e.into_inner()) = fd;
    }
}

/// Blocks SIGTERM/SIGINT in every thread and waits for them on a dedicated one.
/// Must run before any other thread is spawned so all threads inherit the mask.
fn install_signal_thread(stopper: Arc<Stopper>) -> Result<(), ServerError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().map_err(ServerError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                tracing::info!("{sig:?}: stopping");
                stopper.stop();
            }
        })
        .map_err(|e| ServerError::Signals(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))?;
    Ok(())
}

fn listener_from_fd(fd: RawFd) -> Result<Listener, ServerError> {
    let bad = |reason: &str| ServerError::BadFd {
        fd,
        reason: reason.to_string(),
    };
    nix::fcntl::fcntl(
        // SAFETY: F_GETFD only probes the descriptor number; a closed fd fails with EBADF.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .map_err(|_| bad("is not an open file descriptor"))?;
    // SAFETY: the fd is open (checked above) and the operator handed it to us to own (--fd);
    // nothing else in this process uses it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listening = nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::AcceptConn)
        .map_err(|_| bad("is not a socket"))?;
    if !listening {
        return Err(bad("is a socket but not listening"));
    }
    let addr = nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(owned.as_raw_fd())
        .map_err(|_| bad("is not a unix socket"))?;
    let _ = addr;
    Ok(Listener::from(UnixListener::from(owned)))
}

fn device_identity(config: &Config, host: &HostDevice) -> Result<DeviceIdentity, ServerError> {
    let link_mac = host.mac()?;
    let mac = match (config.mac, host.kind()) {
        (Some(m), HostKind::Macvtap) if m.0 != link_mac => {
            tracing::warn!(
                "--mac {m} differs from the macvtap's MAC {}: macvtap only delivers frames \
                 addressed to its own MAC, so the guest will not receive unicast replies",
                MacAddr(link_mac)
            );
            m
        }
        (Some(m), _) => m,
        (None, HostKind::Macvtap) => MacAddr(link_mac),
        (None, HostKind::Tap) => MacAddr::random_local(),
    };
    let link_mtu = host.mtu()?;
    let mtu = config.mtu.unwrap_or(link_mtu);
    if mtu > link_mtu {
        tracing::warn!("--mtu {mtu} is above the link's MTU {link_mtu}: larger frames will drop");
    }
    Ok(DeviceIdentity {
        mac,
        mtu,
        queue_pairs: config.queue_pairs,
        queue_size: config.queue_size,
        tx_rate: config.tx_rate,
        rx_rate: config.rx_rate,
    })
}

/// Runs until SIGTERM/SIGINT. Returns Ok on a clean stop.
pub fn run(config: Config) -> Result<(), ServerError> {
    let stopper = StopHandle::default();
    install_signal_thread(stopper.0.clone())?;
    if config.io_uring {
        crate::worker::set_tx_io_uring(true);
    }

    // With --macvtap-parent, create the macvtap first; it is deleted when `created` drops at the
    // end of `run` (after the last frontend), unless --keep.
    let mut created = None;
    let host_spec = match &config.create_macvtap {
        Some(spec) => {
            let mut link = crate::netlink::create_macvtap(spec)?;
            tracing::info!(
                iface = link.name(),
                parent = %spec.parent,
                mode = %spec.mode,
                mac = %MacAddr(link.mac()),
                keep = config.keep_macvtap,
                "created macvtap"
            );
            if config.keep_macvtap {
                link.keep();
            }
            let iface = link.name().to_string();
            created = Some(link);
            HostSpec::Macvtap { iface }
        }
        None => config.host.clone(),
    };
    let host = HostDevice::open(&host_spec, config.queue_pairs)?;
    let mut watched = vec![host.ifindex()];
    if host.kind() == HostKind::Macvtap {
        match crate::netlink::macvtap_info(host.ifname()) {
            Ok(info) => {
                tracing::info!(
                    iface = %info.name,
                    mode = %info.mode,
                    mac = %MacAddr(info.mac),
                    mtu = info.mtu,
                    parent_ifindex = info.parent_ifindex,
                    "macvtap"
                );
                if info.parent_netnsid.is_none() {
                    watched.push(info.parent_ifindex);
                }
            }
            Err(e) => tracing::warn!("cannot read the macvtap's mode: {e}"),
        }
    }
    let identity = device_identity(&config, &host)?;
    let stats: Vec<Arc<QueueStats>> = (0..config.queue_pairs)
        .map(|_| Arc::new(QueueStats::default()))
        .collect();
    tracing::info!(
        iface = host.ifname(),
        kind = ?host.kind(),
        mac = %identity.mac,
        mtu = identity.mtu,
        queue_pairs = identity.queue_pairs,
        offloads = format_args!("{:#x}", host.supported_offloads()),
        "host device open"
    );

    let source = crate::control::StatsSource::new(host.ifname(), stats.clone());
    let _control = config
        .control_socket
        .as_deref()
        .map(|p| crate::control::serve_control_socket(p, source.clone()))
        .transpose()?;
    if let Some(addr) = config.metrics_addr {
        let bound = crate::control::serve_metrics(addr, source)?;
        tracing::info!("Prometheus metrics on http://{bound}/metrics");
    }

    let link_up = Arc::new(AtomicBool::new(host.carrier()));
    let _watcher = watch_link_state(host.ifname(), watched, link_up.clone());
    let side = HostSide {
        queues: host.queues().to_vec(),
        supported_offloads: host.supported_offloads(),
        link_up,
        link_down_disconnects: config.disconnect_on_link_down,
    };
    // Start-up is over: drop every privilege before the first frontend (issue 11).
    let _sealed = crate::sandbox::seal_daemon(&config, created.as_mut())?;
    let result = serve(&config.socket, identity, side, &stats, &stopper);
    drop(host);
    drop(created);
    result
}

/// Keeps `link_up` equal to "the host link and its parent are up with carrier", and logs
/// changes once each. The config space's STATUS field reads it; with
/// `--disconnect-on-link-down` the serve loop also ends the connection while it is false (no
/// frontend acts on a config-change message for net; see the README's "Link state").
fn watch_link_state(
    iface: &str,
    ifindexes: Vec<u32>,
    link_up: Arc<AtomicBool>,
) -> Option<crate::netlink::LinkWatcher> {
    let iface = iface.to_string();
    let state: Mutex<std::collections::HashMap<u32, bool>> = Mutex::default();
    let watched = ifindexes.clone();
    let on_change = move |ev: crate::netlink::LinkEvent| {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        match ev {
            crate::netlink::LinkEvent::Carrier { ifindex, up } => {
                st.insert(ifindex, up);
            }
            crate::netlink::LinkEvent::Deleted { ifindex } => {
                tracing::error!(
                    ifindex,
                    "host link {iface} (or its parent) was deleted: the guest's frames are \
                     dropped; macvhost keeps serving its socket"
                );
                st.insert(ifindex, false);
            }
        }
        let up = watched.iter().all(|i| st.get(i).copied().unwrap_or(true));
        if link_up.swap(up, Ordering::SeqCst) != up {
            tracing::info!(link_up = up, "host link state changed");
        }
    };
    match crate::netlink::watch_links(ifindexes, on_change) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!("cannot watch link state (status stays as at start): {e}");
            None
        }
    }
}

/// Stops a running [`serve`] loop from another thread (signals, tests).
#[derive(Clone, Default)]
pub struct StopHandle(Arc<Stopper>);

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopHandle")
            .field("stopping", &self.0.stopping())
            .finish()
    }
}

impl StopHandle {
    /// Ends the current connection and the loop; `serve` then returns Ok.
    pub fn stop(&self) {
        self.0.stop()
    }
}

/// Serves frontends one after another over `host` until `stop` is triggered.
///
/// The host queues and `stats` outlive every connection; each connection gets a fresh
/// `NetBackend`. Generic over the queue type so tests can run it over fake host queues.
pub fn serve<Q: QueueControl>(
    socket: &SocketMode,
    identity: DeviceIdentity,
    host: HostSide<Q>,
    stats: &[Arc<QueueStats>],
    stop: &StopHandle,
) -> Result<(), ServerError> {
    let stopper = &stop.0;
    // No frontend yet: keep the kernel from queueing frames nobody will read.
    for q in &host.queues {
        let _ = q.detach();
    }
    let mut listener = match socket {
        SocketMode::Listen(path) => Some(bind(path)?),
        SocketMode::ListenFd(fd) => Some(listener_from_fd(*fd)?),
        SocketMode::Connect(_) => None,
    };
    if let Some(l) = &listener {
        stopper.set_listener_fd(Some(l.as_raw_fd()));
        tracing::info!(socket = ?socket, "listening for a vhost-user frontend");
    }
    let link_gone = || host.link_down_disconnects && !host.link_up.load(Ordering::SeqCst);

    // The daemon serves connections relayed by the shim (`crate::shim`) from a private socket.
    let private = PrivateDir::new().map_err(ServerError::Device)?;
    let private_path = private.0.join("handler.sock");
    let mut private_listener =
        Listener::new(&private_path, true).map_err(|source| ServerError::Listen {
            path: private_path.clone(),
            source,
        })?;

    while !stopper.stopping() {
        if link_gone() {
            listener = wait_for_carrier(socket, listener, &host.link_up, stopper)?;
            continue;
        }
        let backend =
            Arc::new(NetBackend::new(identity, host.clone(), stats).map_err(ServerError::Device)?);
        let mut daemon = VhostUserDaemon::new(
            "macvhost".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServerError::Daemon(e.to_string()))?;
        backend.set_epoll_handlers(daemon.get_epoll_handlers());

        let frontend = match (&listener, socket) {
            (Some(l), _) => accept_frontend(l),
            (None, SocketMode::Connect(path)) => connect_with_backoff(path, stopper),
            (None, _) => unreachable!("listening modes always have a listener"),
        };
        let frontend = match frontend {
            // Carrier went while we waited for the frontend: refuse it (closing it is the
            // message), then wait for carrier.
            Ok(_) if link_gone() => {
                tracing::debug!("host link down: closing a frontend that just connected");
                Err("host link down".to_string())
            }
            other => other,
        };
        let dirty_log = backend.dirty_log();
        let notifier = Arc::new(crate::shim::ConfigNotifier::default());
        let relay_notifier = notifier.clone();
        let started = frontend.and_then(|front| {
            let inner = UnixStream::connect(&private_path).map_err(|e| e.to_string())?;
            daemon
                .start(&mut private_listener)
                .map_err(|e| e.to_string())?;
            std::thread::Builder::new()
                .name("vu-shim".into())
                .spawn(move || {
                    if let Err(e) = crate::shim::relay(front, inner, dirty_log, relay_notifier) {
                        tracing::debug!("vhost-user relay ended: {e}");
                    }
                })
                .map_err(|e| e.to_string())
        });
        match started {
            Ok(relay) => {
                *stopper.connection.lock().unwrap_or_else(|e| e.into_inner()) =
                    daemon.shutdown_handle();
                // A stop that raced the accept must still end this connection.
                if stopper.stopping() {
                    daemon.request_shutdown();
                }
                tracing::info!("frontend connected");
                // Dropping `connected` when the connection ends wakes the link follower at once.
                let (connected, ended_rx) = std::sync::mpsc::channel::<()>();
                let ended = std::thread::scope(|scope| {
                    scope.spawn(|| follow_link_for_connection(&host, &notifier, ended_rx, stopper));
                    let ended = daemon.wait();
                    drop(connected);
                    ended
                });
                match ended {
                    Ok(())
                    | Err(vhost_user_backend::Error::HandleRequest(
                        vhost::vhost_user::Error::Disconnected
                        | vhost::vhost_user::Error::PartialMessage,
                    )) => tracing::info!("frontend disconnected"),
                    Err(e) if stopper.stopping() => tracing::debug!("connection ended: {e}"),
                    Err(e) => tracing::warn!("frontend connection ended with an error: {e}"),
                }
                daemon.request_shutdown();
                let _ = relay.join();
                *stopper.connection.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            Err(e) if stopper.stopping() => tracing::debug!("accept interrupted: {e}"),
            Err(_) if link_gone() => {}
            Err(e) => {
                tracing::error!("accepting a frontend failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        backend.teardown();
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
    }
    stopper.set_listener_fd(None);
    // Dropping the listener removes the socket path it created.
    drop(listener);
    tracing::info!("stopped");
    Ok(())
}

fn bind(path: &Path) -> Result<Listener, ServerError> {
    Listener::new(path, true).map_err(|source| ServerError::Listen {
        path: path.to_path_buf(),
        source,
    })
}

/// How often a lost or returned carrier is looked for while it matters.
const CARRIER_POLL: Duration = Duration::from_millis(50);

/// Runs beside each connection and follows the host link: every change of carrier is
/// announced with CONFIG_CHANGE_MSG where the frontend negotiated it (the STATUS field already
/// reads the new value), and with `--disconnect-on-link-down` a loss of carrier ends the
/// connection. The frontend seeing its backend go away is the one link change QEMU and DPDK
/// show their guests for vhost-user net (neither acts on a config change for net).
fn follow_link_for_connection<Q>(
    host: &HostSide<Q>,
    notifier: &crate::shim::ConfigNotifier,
    ended: std::sync::mpsc::Receiver<()>,
    stopper: &Stopper,
) {
    let mut was_up = host.link_up.load(Ordering::SeqCst);
    while !stopper.stopping() {
        let up = host.link_up.load(Ordering::SeqCst);
        if up != was_up {
            was_up = up;
            if notifier.config_changed() {
                tracing::debug!(link_up = up, "config change sent to the frontend");
            }
        }
        if !up && host.link_down_disconnects {
            tracing::info!(
                "host link lost carrier: ending the frontend connection (--disconnect-on-link-down)"
            );
            stopper.end_connection();
            return;
        }
        match ended.recv_timeout(CARRIER_POLL) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // The connection ended (its sender is gone).
            _ => return,
        }
    }
}

/// Serves nobody until the host link has carrier again (or a stop): a socket path is unbound
/// so that connects fail at once (a frontend with reconnect keeps retrying), a passed-in
/// listening fd has each connection closed as it comes, and a client does not connect.
/// Returns the listener to serve with afterwards.
fn wait_for_carrier(
    socket: &SocketMode,
    mut listener: Option<Listener>,
    link_up: &AtomicBool,
    stopper: &Stopper,
) -> Result<Option<Listener>, ServerError> {
    tracing::info!("host link has no carrier: serving no frontend until it returns");
    if let SocketMode::Listen(_) = socket {
        stopper.set_listener_fd(None);
        listener = None;
    }
    if let Some(l) = &listener {
        let _ = l.set_nonblocking(true);
    }
    while !link_up.load(Ordering::SeqCst) && !stopper.stopping() {
        if let Some(l) = &listener {
            while let Ok(Some(refused)) = l.accept() {
                drop(refused);
            }
        }
        std::thread::sleep(CARRIER_POLL);
    }
    if let Some(l) = &listener {
        let _ = l.set_nonblocking(false);
    }
    if let SocketMode::Listen(path) = socket {
        if !stopper.stopping() {
            let l = bind(path)?;
            stopper.set_listener_fd(Some(l.as_raw_fd()));
            listener = Some(l);
        }
    }
    if !stopper.stopping() {
        tracing::info!("host link has carrier again: serving frontends");
    }
    Ok(listener)
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

/// A 0700 directory for the shim's private socket, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> std::io::Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("macvhost-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(PrivateDir(dir))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
