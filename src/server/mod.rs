//! Serving frontends: start-up, then listen (or connect), serve one connection, tear it down,
//! serve the next.
//!
//! The host queues and counters live for the whole process; everything a frontend negotiates
//! lives in a [`Connection`] made for it. Threads of the process: main (this loop), `signals`,
//! the link watcher, the control socket, metrics and `qmp` threads when asked for, and per
//! connection those listed in [`crate::vhost_user::connection`].
//!
//! - `signals`: SIGTERM/SIGINT and the [`StopHandle`].
//! - `listen`: where frontends come from (path, inherited fd, `--client`).
//! - `link`: the host link's carrier, watched and followed by each connection.
//! - [`qmp`]: the guest's receive filter as QEMU reports it (`--qmp`).

mod failures;
mod link;
mod listen;
pub mod qmp;
mod service;
mod signals;
mod trust;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::control;
use crate::datapath::mcast::TableConfig;
use crate::datapath::tx::SharedMac;
use crate::datapath::QueueStats;
use crate::host::mcfilter::{McFilter, McFilterError};
use crate::host::netlink::MacvtapSpec;
use crate::host::{HostDevice, HostError, HostKind, HostSpec, MacAddr};
use crate::ratelimit::RateSpec;
use crate::vhost_user::backend::{DeviceIdentity, HostSide};
use crate::vhost_user::connection::Connection;
use crate::worker::l2::{L2Host, RxFilterMode};
use crate::worker::PairQueue;
use listen::Frontends;
use service::{Phase, Service};
pub use signals::StopHandle;

/// How the vhost-user socket is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketMode {
    /// Bind and listen on a path.
    Listen(PathBuf),
    /// Serve on an inherited listening fd.
    ListenFd(RawFd),
    /// Connect to a frontend that listens on a path.
    Connect(PathBuf),
}

/// Owner and permissions for a socket macvhost creates (`--socket-owner`, `--socket-mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketPerms {
    /// uid and optional gid.
    pub owner: Option<(u32, Option<u32>)>,
    /// Permission bits.
    pub mode: Option<u32>,
}

/// Where frontends come from, and how a socket macvhost creates is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Listen on a path, on an inherited fd, or connect.
    pub mode: SocketMode,
    /// Owner and mode of a socket macvhost creates.
    pub perms: SocketPerms,
}

impl From<&SocketMode> for Endpoint {
    fn from(mode: &SocketMode) -> Endpoint {
        Endpoint {
            mode: mode.clone(),
            perms: SocketPerms::default(),
        }
    }
}

/// What the server runs with: the validated command line (`config` builds it).
#[derive(Debug, Clone)]
pub struct Settings {
    /// How frontends reach us.
    pub socket: SocketMode,
    /// Owner and mode of the socket we create.
    pub socket_perms: SocketPerms,
    /// Which host device to open.
    pub host: HostSpec,
    /// Queue pairs.
    pub queue_pairs: u16,
    /// Largest virtqueue size.
    pub queue_size: u16,
    /// Guest MAC, when given; otherwise taken from the host device at start.
    pub mac: Option<MacAddr>,
    /// MTU, when given; otherwise the link's.
    pub mtu: Option<u16>,
    /// Control socket path.
    pub control_socket: Option<PathBuf>,
    /// Prometheus endpoint.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Busy polling after each wake-up, µs (`--poll-us`; 0 = off).
    pub poll_us: u32,
    /// How the guest's multicast groups reach the macvtap (`--rx-filter`).
    pub rx_filter: RxFilterMode,
    /// Most multicast groups followed before falling back to allmulticast (`--max-groups`).
    pub max_groups: usize,
    /// End the frontend connection while the host link has no carrier.
    pub disconnect_on_link_down: bool,
    /// The macvtap to create (`--macvtap-parent`); `host` then names it once created.
    pub create_macvtap: Option<MacvtapSpec>,
    /// Keep the created macvtap on exit.
    pub keep_macvtap: bool,
    /// Guest → host rate limit.
    pub tx_rate: Option<RateSpec>,
    /// Host → guest rate limit.
    pub rx_rate: Option<RateSpec>,
    /// `--seccomp`, `--no-sandbox`, `--user`, `--group`.
    pub sandbox: crate::sandbox::SandboxOptions,
    /// QEMU's QMP socket to follow the guest's rx filter on (`--qmp`, `--qmp-nic`,
    /// `--trust-guest-rx-filters`).
    pub qmp: Option<qmp::QmpSettings>,
    /// The control socket of a running macvhost to take the listener and host queues from
    /// (`--take-over`, [`crate::takeover`]).
    pub take_over: Option<PathBuf>,
}

/// Why the server could not start or keep going.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The host device named by `flag` could not be opened or queried (operator or host:
    /// [`ServerError::is_operator_error`] tells).
    #[error("{flag}: {source}")]
    Host {
        /// The flag that named the host side.
        flag: &'static str,
        /// Cause.
        source: HostError,
    },
    /// The socket could not be made (operator: path, permissions, someone else's file).
    #[error("--socket-path {path}: {reason}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `--fd` is not a listening unix socket (operator).
    #[error("--fd {fd}: {reason}")]
    BadFd {
        /// The fd.
        fd: RawFd,
        /// Why it was refused.
        reason: String,
    },
    /// The control socket or metrics endpoint could not start (operator).
    #[error("{flag}: {source}")]
    Control {
        /// `--control-socket` or `--metrics-addr`.
        flag: &'static str,
        /// Cause.
        source: control::ControlError,
    },
    /// Creating the macvtap failed (operator: parent, mode, name; or host).
    #[error("--macvtap-parent: {0}")]
    Netlink(#[from] crate::host::netlink::NetlinkError),
    /// The macvtap's multicast filter could not be opened (operator: capabilities; or host).
    #[error("--rx-filter: {source}")]
    RxFilter {
        /// Cause.
        source: McFilterError,
    },
    /// Signal handling could not be installed (host).
    #[error("signal handling: {0}")]
    Signals(nix::Error),
    /// Dropping privileges failed (host; operator for --user/--group).
    #[error("sandbox: {0} (--no-sandbox runs without it)")]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// The QMP watcher could not start (host).
    #[error("--qmp: {0}")]
    Qmp(qmp::QmpError),
    /// Taking over from a running macvhost failed (operator: path or flags; the running one
    /// keeps serving).
    #[error(transparent)]
    TakeOver(#[from] crate::takeover::TakeOverError),
}

fn device_identity(config: &Settings, host: &HostDevice) -> Result<DeviceIdentity, HostError> {
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

impl ServerError {
    /// True when the command line named something unusable (exit status 2), false for a host
    /// failure.
    pub fn is_operator_error(&self) -> bool {
        match self {
            ServerError::Host { source, .. } => source.is_operator_error(),
            ServerError::Netlink(e) => e.is_operator_error(),
            ServerError::Listen { .. } | ServerError::BadFd { .. } => true,
            ServerError::Control { .. } => true,
            ServerError::RxFilter { source } => source.is_operator_error(),
            ServerError::Signals(_) => false,
            ServerError::Sandbox(e) => e.is_operator_error(),
            ServerError::Qmp(e) => e.is_operator_error(),
            ServerError::TakeOver(_) => true,
        }
    }
}

/// The macvtap's multicast filter for `--rx-filter`: opened now (it needs CAP_NET_RAW, which a
/// sealed process no longer has). `allmulti` holds allmulticast for the process's life; a tap
/// takes every frame anyway, so it gets no filter.
fn l2_host(
    config: &Settings,
    host: &HostDevice,
    stats: Arc<crate::worker::l2::L2Stats>,
    guest_mac: Arc<SharedMac>,
) -> Result<L2Host, ServerError> {
    let mut l2 = L2Host {
        table: TableConfig {
            max_groups: config.max_groups,
            ..TableConfig::default()
        },
        filter: None,
        stats,
        guest_mac: Some(guest_mac),
    };
    if host.kind() != HostKind::Macvtap || config.rx_filter == RxFilterMode::Strict {
        return Ok(l2);
    }
    let err = |source| ServerError::RxFilter { source };
    let mut filter = McFilter::open(host.ifindex()).map_err(err)?;
    match config.rx_filter {
        RxFilterMode::Follow => l2.filter = Some(Arc::new(Mutex::new(filter))),
        RxFilterMode::AllMulti => {
            filter.set_allmulti(true).map_err(err)?;
            tracing::info!("the macvtap takes every multicast frame (--rx-filter allmulti)");
            // Held until exit: the kernel drops the allmulticast with the socket.
            std::mem::forget(filter);
        }
        RxFilterMode::Strict => {}
    }
    Ok(l2)
}

/// The flag that names the host side in `config`.
fn host_flag(config: &Settings) -> &'static str {
    match (&config.create_macvtap, &config.host) {
        (Some(_), _) => "--macvtap-parent",
        (None, HostSpec::Macvtap { .. }) => "--macvtap",
        (None, HostSpec::Tap { .. }) => "--tap",
        (None, HostSpec::TapFds { .. }) => "--tap-fd",
    }
}

/// Runs until SIGTERM/SIGINT. Returns Ok on a clean stop. `inherited` holds the fds a service
/// manager passed (socket activation and its fd store; empty otherwise): stored host queues
/// are reused when they still belong to the configured device.
pub fn run(config: Settings, mut inherited: crate::systemd::ListenFds) -> Result<(), ServerError> {
    let stopper = StopHandle::default();
    signals::install_signal_thread(stopper.0.clone())?;
    // The socket first: a path that is someone else's is refused before anything is created.
    let endpoint = Endpoint {
        mode: config.socket.clone(),
        perms: config.socket_perms,
    };
    // --take-over: the running macvhost's fds, checked against our flags before anything
    // else is opened (on any error here it keeps serving).
    let mut taken = config
        .take_over
        .as_deref()
        .map(crate::takeover::request)
        .transpose()?;
    let mut frontends = match &mut taken {
        Some(t) => Frontends::adopt(&endpoint, taken_listener(t, &config)?, &stopper.0)?,
        None => Frontends::open(&endpoint, &stopper.0)?,
    };
    crate::worker::set_poll_us(config.poll_us);

    // With --macvtap-parent, create the macvtap first; it is deleted when `created` drops at the
    // end of `run` (after the last frontend), unless --keep.
    let mut created = None;
    let host_spec = match &config.create_macvtap {
        Some(spec) => {
            let mut link = crate::host::netlink::create_macvtap(spec)?;
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
    let flag = host_flag(&config);
    let host_err = |source| ServerError::Host { flag, source };
    let service = Service::from_env();
    let host = match &mut taken {
        Some(t) => {
            if t.facts.queue_pairs != config.queue_pairs {
                return Err(t
                    .mismatch(format!(
                        "the running macvhost serves {} queue pairs: start this one with \
                         --queues {}",
                        t.facts.queue_pairs, t.facts.queue_pairs
                    ))
                    .into());
            }
            let stored = t.fds.take_queues();
            let host = adopt_queues(&config, &stored).map_err(|r| t.mismatch(r))?;
            tracing::info!(
                iface = host.ifname(),
                queues = stored.len(),
                "reusing the host queues handed over by the running macvhost"
            );
            host
        }
        None => {
            let stored = inherited.take_queues();
            match reuse_stored_queues(&config, &stored, &service) {
                Some(h) => h,
                None => HostDevice::open(&host_spec, config.queue_pairs).map_err(host_err)?,
            }
        }
    };
    for leftover in inherited.into_remaining() {
        tracing::warn!(name = %leftover.name, "closing an inherited fd macvhost has no use for");
    }
    if config.create_macvtap.is_none() && !matches!(config.host, HostSpec::TapFds { .. }) {
        // Named devices only: a macvtap we created is deleted on exit, and --tap-fd queues
        // belong to the manager that passed them.
        service.store_queues(&host);
    }
    let mut watched = vec![host.ifindex()];
    if host.kind() == HostKind::Macvtap {
        match crate::host::netlink::macvtap_info(host.ifname()) {
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
    let identity = device_identity(&config, &host).map_err(host_err)?;
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

    let l2_stats = Arc::new(crate::worker::l2::L2Stats::default());
    let source =
        crate::control::StatsSource::new(host.ifname(), stats.clone()).with_l2(l2_stats.clone());
    let control_err = |source| ServerError::Control {
        flag: "--control-socket",
        source,
    };
    let metrics_err = |source| ServerError::Control {
        flag: "--metrics-addr",
        source,
    };
    // A listener handed over at the same address is served as it is; otherwise bound.
    let mut control_adopted = false;
    let control_listener = match &config.control_socket {
        Some(p) => Some(match taken.as_mut().and_then(|t| taken_control(t, p)) {
            Some(l) => {
                control_adopted = true;
                l
            }
            None => crate::control::bind_control_socket(p).map_err(control_err)?,
        }),
        None => None,
    };
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(match taken.as_mut().and_then(|t| taken_metrics(t, addr)) {
            Some(l) => l,
            None => crate::control::bind_metrics(addr).map_err(metrics_err)?,
        }),
        None => None,
    };
    // What a successor's --take-over gets (served by the control thread, which is the only
    // way to ask for it).
    let offer = match (&config.control_socket, &control_listener) {
        (Some(_), Some(c)) => Some(Arc::new(takeover_offer(
            &config,
            &frontends,
            c,
            metrics_listener.as_ref(),
            &host,
            &stopper,
        )?)),
        _ => None,
    };
    let mut control = match (&config.control_socket, control_listener) {
        (Some(p), Some(l)) => Some(
            crate::control::serve_control_on(p, l, source.clone(), offer.clone(), control_adopted)
                .map_err(control_err)?,
        ),
        _ => None,
    };
    if let Some(l) = metrics_listener {
        let bound = crate::control::serve_metrics_on(l, source).map_err(metrics_err)?;
        tracing::info!("Prometheus metrics on http://{bound}/metrics");
    }

    // Before the qmp thread (it may hold a MAC setter) and before sealing (the helper must not
    // inherit a sealed process).
    let helper = start_link_helper(&config, created.as_mut(), &host)?;
    let link_up = Arc::new(AtomicBool::new(host.carrier()));
    let _watcher = link::watch_link_state(host.ifname(), watched, link_up.clone());
    // The guest's MAC as TX compares it; the trusted QMP path moves it with the macvtap's.
    let guest_mac = Arc::new(SharedMac::new(identity.mac.0));
    let _qmp = match &config.qmp {
        Some(q) => {
            let trust = if q.trust {
                // Opened now: it needs CAP_NET_RAW, which a sealed process no longer has.
                let filter = McFilter::open(host.ifindex())
                    .map_err(|source| ServerError::RxFilter { source })?;
                let set_mac: trust::SetMac = match &helper {
                    // Sealed: RTM_SETLINK needs CAP_NET_ADMIN, which only the helper keeps.
                    Some(h) => {
                        let setter = h.mac_setter();
                        Box::new(move |mac| setter.set_mac(mac).map_err(|e| e.to_string()))
                    }
                    None => {
                        let ifindex = host.ifindex();
                        Box::new(move |mac| {
                            crate::host::netlink::set_mac(ifindex, mac).map_err(|e| e.to_string())
                        })
                    }
                };
                Some(trust::Trust::new(
                    filter,
                    set_mac,
                    guest_mac.clone(),
                    l2_stats.clone(),
                ))
            } else {
                None
            };
            Some(qmp::follow(q, identity.mac, trust, l2_stats.clone()).map_err(ServerError::Qmp)?)
        }
        None => None,
    };
    let side = HostSide {
        queues: host.queues().to_vec(),
        supported_offloads: host.supported_offloads(),
        link_up,
        link_down_disconnects: config.disconnect_on_link_down,
        l2: l2_host(&config, &host, l2_stats, guest_mac)?,
    };
    // Start-up is over: drop every privilege before the first frontend (docs/security.md).
    // On failure `helper` drops on the way out and deletes a macvtap we created.
    let _sealed = seal(&config, helper.as_ref())?;
    if let Some(t) = taken {
        // Ready: the old process lets go of its frontend; we serve once it has. Until here a
        // failure left the old process's socket files alone.
        t.ready(control_adopted)?;
        frontends.own_socket_file();
        if let Some(c) = control.as_mut() {
            c.start();
        }
    }
    let result = serve_on(frontends, identity, side, &stats, &stopper, &service);
    if let Some(o) = offer.as_ref().filter(|o| o.handed_over()) {
        // The frontend connection is over and the workers are joined: the successor may serve.
        o.release();
        tracing::info!("handed over to the new macvhost: exiting");
    }
    drop(control);
    drop(host);
    // The helper deletes the macvtap we created (the sealed process cannot).
    drop(helper);
    drop(created);
    result
}

/// The privileged helper, when the sealed process will need one: to delete the macvtap it
/// created (`--macvtap-parent` without `--keep`), and to give the macvtap a trusted guest's MAC
/// (`--trust-guest-rx-filters`). From here on the helper owns the deletion, also when macvhost
/// is killed. None with `--no-sandbox`: the process keeps the privilege to do both itself.
fn start_link_helper(
    config: &Settings,
    created: Option<&mut crate::host::netlink::CreatedLink>,
    host: &HostDevice,
) -> Result<Option<crate::sandbox::helper::LinkHelper>, ServerError> {
    use crate::sandbox::helper::{HelperSpec, LinkHelper};
    if config.sandbox.disabled {
        return Ok(None);
    }
    let created = created.filter(|l| !l.is_kept());
    let spec = HelperSpec {
        ifindex: host.ifindex(),
        name: host.ifname().to_string(),
        delete: created.is_some(),
        set_mac: host.kind() == HostKind::Macvtap && config.qmp.as_ref().is_some_and(|q| q.trust),
    };
    if !spec.delete && !spec.set_mac {
        return Ok(None);
    }
    let helper = LinkHelper::spawn(&spec)?;
    if let Some(link) = created {
        link.keep();
    }
    tracing::info!(
        iface = %spec.name,
        pid = helper.pid(),
        delete = spec.delete,
        set_mac = spec.set_mac,
        "link helper started (keeps only CAP_NET_ADMIN)"
    );
    Ok(Some(helper))
}

/// Seals the process for `config`: the directories of the sockets it still binds, removes or
/// connects to stay visible; the link helper's pid may be reaped.
fn seal(
    config: &Settings,
    helper: Option<&crate::sandbox::helper::LinkHelper>,
) -> Result<crate::sandbox::Sealed, ServerError> {
    use crate::sandbox::{DirUse, SandboxConfig};
    let parent = |p: &std::path::Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut dirs = Vec::new();
    match &config.socket {
        SocketMode::Listen(p) => dirs.push((parent(p), DirUse::Listen)),
        SocketMode::Connect(p) => dirs.push((parent(p), DirUse::Connect)),
        SocketMode::ListenFd(_) => {}
    }
    if let Some(p) = &config.control_socket {
        dirs.push((parent(p), DirUse::Remove));
    }
    if let Some(q) = &config.qmp {
        // The watcher reconnects when QEMU restarts.
        dirs.push((parent(&q.path), DirUse::Connect));
    }
    let sandbox = SandboxConfig {
        disabled: config.sandbox.disabled,
        seccomp: config.sandbox.seccomp,
        run_as: config.sandbox.run_as,
        dirs,
        helper_pid: helper.map(crate::sandbox::helper::LinkHelper::pid),
        ..SandboxConfig::default()
    };
    Ok(crate::sandbox::seal(&sandbox)?)
}

/// Serves frontends one after another over `host` until `stop` is triggered.
///
/// The host queues and `stats` outlive every connection; each connection gets a fresh device.
/// Generic over the queue type so tests can run it over fake host queues.
pub fn serve<Q: PairQueue>(
    endpoint: impl Into<Endpoint>,
    identity: DeviceIdentity,
    host: HostSide<Q>,
    stats: &[Arc<QueueStats>],
    stop: &StopHandle,
) -> Result<(), ServerError> {
    let endpoint = endpoint.into();
    let frontends = Frontends::open(&endpoint, &stop.0)?;
    serve_on(frontends, identity, host, stats, stop, &Service::none())
}

/// Host queues from the service manager's fd store, when there is one per queue pair and they
/// still belong to the configured device; stale ones are dropped from the store.
fn reuse_stored_queues(
    config: &Settings,
    stored: &std::collections::BTreeMap<usize, std::os::fd::OwnedFd>,
    service: &Service,
) -> Option<HostDevice> {
    if stored.is_empty() {
        return None;
    }
    match adopt_queues(config, stored) {
        Ok(h) => {
            tracing::info!(
                iface = h.ifname(),
                queues = stored.len(),
                "reusing the host queues kept by the service manager"
            );
            Some(h)
        }
        Err(why) => {
            tracing::info!(
                stored = stored.len(),
                "the stored host queues are not usable ({why}); opening the device afresh"
            );
            service.forget_queues(stored.keys().copied());
            None
        }
    }
}

/// Host queue fds kept across a restart (the fd store) or handed over (`--take-over`), as the
/// device: one per queue pair, each a queue of the configured `--macvtap`/`--tap` in our
/// network namespace with a vnet header (`TUNGETIFF`, checked like `--tap-fd`). Why not, when
/// they are not.
fn adopt_queues(
    config: &Settings,
    stored: &std::collections::BTreeMap<usize, std::os::fd::OwnedFd>,
) -> Result<HostDevice, String> {
    use std::os::fd::AsRawFd;
    let want = match (&config.create_macvtap, &config.host) {
        (None, HostSpec::Macvtap { iface } | HostSpec::Tap { iface }) => iface.as_str(),
        _ => return Err("queues are reused only for --macvtap or --tap".into()),
    };
    let pairs = usize::from(config.queue_pairs);
    if stored.len() != pairs || !stored.keys().copied().eq(0..pairs) {
        return Err(format!(
            "{} queue fds ({:?}) for --queues {pairs}",
            stored.len(),
            stored.keys().collect::<Vec<_>>()
        ));
    }
    let fds: Vec<_> = stored.values().map(|fd| fd.as_raw_fd()).collect();
    let host = HostDevice::open(&HostSpec::TapFds { fds }, config.queue_pairs)
        .map_err(|e| format!("the queue fds are not usable: {e}"))?;
    if host.ifname() != want {
        return Err(format!(
            "the queues belong to {:?}, not to the configured {want:?}",
            host.ifname()
        ));
    }
    Ok(host)
}

/// The vhost-user listener handed over by `--take-over`, checked against our socket flags:
/// a listening unix stream socket bound to our `--socket-path`; none with `--client` (then the
/// old process must connect to the same path).
fn taken_listener(
    t: &mut crate::takeover::Taken,
    config: &Settings,
) -> Result<Option<std::os::unix::net::UnixListener>, ServerError> {
    let l = t
        .fds
        .take_unix_listener(crate::systemd::VHOST_USER_FD_NAME)
        .map_err(|_| t.mismatch("the handed-over vhost-user fd is not a listening unix socket"))?;
    let (kind, old_path) = t.facts.socket.clone();
    match (&config.socket, l) {
        (SocketMode::Listen(p), Some(l)) => {
            let name = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(std::path::Path::to_path_buf));
            if !name.as_deref().is_some_and(|n| same_socket_path(n, p)) {
                return Err(t
                    .mismatch(format!(
                        "the running macvhost listens on {}, not on --socket-path {}",
                        name.map_or("an unnamed socket".into(), |n| n.display().to_string()),
                        p.display()
                    ))
                    .into());
            }
            Ok(Some(l))
        }
        (SocketMode::Listen(_), None) => Err(t
            .mismatch(format!(
                "the running macvhost does not listen (it connects to {}): start this one with \
                 --client too",
                old_path.display()
            ))
            .into()),
        (SocketMode::Connect(p), None) if kind == "connect" && old_path == *p => Ok(None),
        (SocketMode::Connect(p), None) => Err(t
            .mismatch(format!(
                "the running macvhost connects to {}, not to --socket-path {}",
                old_path.display(),
                p.display()
            ))
            .into()),
        (SocketMode::Connect(_), Some(_)) => Err(t
            .mismatch("the running macvhost listens on its socket: start this one without --client")
            .into()),
        (SocketMode::ListenFd(_), _) => Err(t
            .mismatch(
                "cannot take over with --fd or socket activation (the fd store is the way there)",
            )
            .into()),
    }
}

/// The control listener handed over, when it is bound at our `--control-socket` path.
fn taken_control(
    t: &mut crate::takeover::Taken,
    path: &std::path::Path,
) -> Option<std::os::unix::net::UnixListener> {
    let l = t
        .fds
        .take_unix_listener(crate::takeover::CONTROL_FD_NAME)
        .ok()??;
    let name = l.local_addr().ok()?;
    same_socket_path(name.as_pathname()?, path).then_some(l)
}

/// Whether a socket's bound name and a path from our command line name the same file (spelled
/// alike, or resolving alike: `./vm0.sock` and `/run/vm0.sock`).
fn same_socket_path(bound: &std::path::Path, ours: &std::path::Path) -> bool {
    bound == ours
        || matches!(
            (std::fs::canonicalize(bound), std::fs::canonicalize(ours)),
            (Ok(a), Ok(b)) if a == b
        )
}

/// The Prometheus listener handed over, when it listens on our `--metrics-addr`.
fn taken_metrics(
    t: &mut crate::takeover::Taken,
    addr: std::net::SocketAddr,
) -> Option<std::net::TcpListener> {
    use std::os::fd::AsFd;
    let fd = t.fds.take(crate::takeover::METRICS_FD_NAME)?;
    (crate::takeover::tcp_listener_addr(fd.as_fd()) == Some(addr)).then(|| fd.into())
}

/// What a successor's `--take-over` gets: duplicates of the vhost-user listener (when we
/// listen), the control and metrics listeners and every host queue fd. A macvtap we created
/// and delete on exit is not handed over (the request is refused).
fn takeover_offer(
    config: &Settings,
    frontends: &Frontends<'_>,
    control: &std::os::unix::net::UnixListener,
    metrics: Option<&std::net::TcpListener>,
    host: &HostDevice,
    stopper: &StopHandle,
) -> Result<crate::takeover::Offer, ServerError> {
    use crate::systemd::NamedFd;
    use std::os::fd::{AsRawFd, OwnedFd};
    let dup_err = |e: std::io::Error| ServerError::Control {
        flag: "--control-socket",
        source: control::ControlError::Listen {
            what: "a duplicate for --take-over".into(),
            source: e,
        },
    };
    let mut fds = Vec::new();
    if let Some(l) = frontends.listener() {
        fds.push(NamedFd {
            name: crate::systemd::VHOST_USER_FD_NAME.into(),
            fd: OwnedFd::from(l.try_clone().map_err(dup_err)?),
        });
    }
    fds.push(NamedFd {
        name: crate::takeover::CONTROL_FD_NAME.into(),
        fd: OwnedFd::from(control.try_clone().map_err(dup_err)?),
    });
    if let Some(m) = metrics {
        fds.push(NamedFd {
            name: crate::takeover::METRICS_FD_NAME.into(),
            fd: OwnedFd::from(m.try_clone().map_err(dup_err)?),
        });
    }
    for (i, q) in host.queues().iter().enumerate() {
        fds.push(NamedFd {
            name: crate::systemd::queue_fd_name(i),
            fd: crate::host::dup_cloexec(q.as_raw_fd()).map_err(dup_err)?,
        });
    }
    let socket = match &config.socket {
        SocketMode::Listen(p) => ("listen".to_string(), p.clone()),
        SocketMode::ListenFd(_) => ("listen".to_string(), PathBuf::new()),
        SocketMode::Connect(p) => ("connect".to_string(), p.clone()),
    };
    let refusal = (config.create_macvtap.is_some() && !config.keep_macvtap).then(|| {
        "it created its macvtap (--macvtap-parent without --keep) and deletes it when it \
         exits; stop it and start the new one instead"
            .to_string()
    });
    let stop = stopper.0.clone();
    Ok(crate::takeover::Offer::new(
        crate::takeover::Facts {
            macvhost: String::new(),
            version: 0,
            pid: std::process::id(),
            iface: host.ifname().to_string(),
            ifindex: host.ifindex(),
            queue_pairs: config.queue_pairs,
            socket,
            fds: Vec::new(),
        },
        fds,
        refusal,
        Box::new(move || stop.hand_over()),
    ))
}

/// The serve loop over frontends already set up.
fn serve_on<Q: PairQueue>(
    mut frontends: Frontends<'_>,
    identity: DeviceIdentity,
    host: HostSide<Q>,
    stats: &[Arc<QueueStats>],
    stop: &StopHandle,
    service: &Service,
) -> Result<(), ServerError> {
    let stopper = &*stop.0;
    // No frontend yet: keep the kernel from queueing frames nobody will read.
    for q in &host.queues {
        let _ = q.detach();
    }
    service.ready("waiting for a frontend");
    let link_gone = || host.link_down_disconnects && !host.link_up.load(Ordering::SeqCst);
    let mut failures = failures::Failures::default();
    let mut pause = Duration::ZERO;

    while !stopper.stopping() {
        if !pause.is_zero() {
            // After a misfit: the same frontend would fail the same way at once.
            stopper.sleep(std::mem::take(&mut pause));
            continue;
        }
        if link_gone() {
            service.phase(
                Phase::NoCarrier,
                "host link has no carrier: serving no frontend",
            );
            frontends.pause_until_carrier(&host.link_up)?;
            continue;
        }
        service.phase(Phase::Waiting, "waiting for a frontend");
        let frontend = match frontends.next() {
            // Carrier went while we waited for the frontend: refuse it (closing it is the
            // message), then wait for carrier.
            Ok(_) if link_gone() => {
                tracing::debug!("host link down: closing a frontend that just connected");
                continue;
            }
            Ok(f) => f,
            Err(e) if stopper.stopping() => {
                tracing::debug!("accept interrupted: {e}");
                break;
            }
            Err(_) if link_gone() => continue,
            Err(e) => {
                tracing::error!("accepting a frontend failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let mut conn = match Connection::start(frontend, identity, host.clone(), stats) {
            Ok(c) => c,
            Err(e) => {
                // The frontend sees its connection close and may retry; we keep serving.
                tracing::error!("{e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        stopper.set_connection(conn.shutdown_handle());
        // A stop that raced the accept must still end this connection.
        if stopper.stopping() {
            stopper.end_connection();
        }
        if failures.failing() {
            tracing::debug!("frontend connected");
        } else {
            tracing::info!("frontend connected");
        }
        service.phase(Phase::Serving, "serving a frontend");
        // Dropping `connected` when the connection ends wakes the link follower at once.
        let (connected, ended_rx) = std::sync::mpsc::channel::<()>();
        let notifier = conn.notifier();
        let l2 = conn.backend().l2().clone();
        let tick = move || l2.tick();
        let ended = std::thread::scope(|scope| {
            scope.spawn(|| {
                link::follow_link_for_connection(&host, &notifier, ended_rx, stopper, &tick)
            });
            let ended = conn.wait();
            drop(connected);
            ended
        });
        stopper.set_connection(None);
        service.phase(Phase::Closing, "closing a connection");
        let fault = conn.close();
        let failure = match (fault, ended) {
            (_, Err(e)) if stopper.stopping() => {
                tracing::debug!("connection ended: {e}");
                None
            }
            // The shim's reason says more than the handler's "invalid parameters".
            (Some(f), _) => Some(match f.misfit() {
                Some(m) => (m.to_string(), failures::Severity::Misfit),
                None => (
                    format!("{f}; closing the connection"),
                    failures::Severity::Fault,
                ),
            }),
            (
                None,
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage,
                )),
            ) => None,
            (None, Err(e)) => Some((
                format!("frontend connection ended with an error: {e}"),
                failures::Severity::Fault,
            )),
        };
        let now = std::time::Instant::now();
        match failure {
            None => {
                tracing::info!("frontend disconnected");
                if let Some(line) = failures.good(now) {
                    line.log();
                }
            }
            Some((line, severity)) => {
                let (lines, next) = failures.failed(line, severity, now);
                lines.iter().for_each(failures::Line::log);
                pause = next;
            }
        }
    }
    if let Some(line) = failures.summary(std::time::Instant::now()) {
        line.log();
    }
    service.stopping();
    drop(frontends);
    tracing::info!("stopped");
    Ok(())
}
