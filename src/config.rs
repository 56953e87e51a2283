//! Command line → validated configuration.
//!
//! `Args` is what clap parses; `Config` is what the rest of the program trusts. Every refusal
//! names the flag and the reason (the operator is at fault), and `main` exits with status 2.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::Parser;

use crate::host::{HostSpec, MacAddr};
use crate::server::{SocketMode, SocketPerms};
use crate::worker::l2::RxFilterMode;

pub use crate::datapath::MAX_QUEUE_SIZE;
pub use crate::host::MAX_QUEUE_PAIRS;
/// Default `--queue-size`: every size QEMU can ask for. Measured: a macvhost serving 1024-entry
/// rings has 20 KiB more anonymous memory than with 256-entry ones (README, "Command line").
pub const DEFAULT_QUEUE_SIZE: u16 = MAX_QUEUE_SIZE;

/// A vhost-user virtio-net backend on a macvtap or tap device.
#[derive(Parser, Debug, Clone)]
#[command(name = "macvhost", version, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    /// Subcommands (`macvhost stats PATH`); without one, macvhost runs the backend.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Listen on this vhost-user socket (or connect to it with --client).
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,

    /// Serve on an already-listening unix socket inherited from a manager.
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,

    /// Connect to --socket-path instead of listening, retrying until the frontend appears.
    #[arg(long)]
    pub client: bool,

    /// Print the vhost-user.json capabilities object and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Host side: an existing macvtap interface (opened once per queue pair).
    #[arg(long, value_name = "IFACE")]
    pub macvtap: Option<String>,

    /// Host side: create a macvtap on this parent link (deleted on exit unless --keep).
    #[arg(long, value_name = "DEV")]
    pub macvtap_parent: Option<String>,

    /// Mode of the macvtap --macvtap-parent creates: bridge, vepa, private or passthru.
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,

    /// Name of the macvtap --macvtap-parent creates (default: `mvh<parent ifindex>-<n>`).
    #[arg(
        long,
        value_name = "NAME",
        help = "Name of the macvtap --macvtap-parent creates (default: mvh<parent ifindex>-<n>)"
    )]
    pub macvtap_name: Option<String>,

    /// Keep the macvtap --macvtap-parent created when macvhost exits.
    #[arg(long)]
    pub keep: bool,

    /// Host side: a tap interface, created when absent.
    #[arg(long, value_name = "IFACE")]
    pub tap: Option<String>,

    /// Host side: tap/macvtap queue fds opened by a manager, one per queue pair.
    #[arg(long, value_name = "FD[,FD...]", value_delimiter = ',')]
    pub tap_fd: Vec<RawFd>,

    /// Queue pairs (RX+TX virtqueues), one worker thread each.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u16,

    /// Largest virtqueue size the frontend may set (a power of two). The default takes every
    /// ring QEMU can ask for (`rx_queue_size`/`tx_queue_size` up to 1024); a larger limit costs
    /// macvhost no memory of its own (the ring lives in guest memory).
    #[arg(long, value_name = "S", default_value_t = DEFAULT_QUEUE_SIZE)]
    pub queue_size: u16,

    /// Guest MAC (default: the macvtap's own MAC; for tap, a random local MAC).
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,

    /// MTU offered to the guest (default: the link's MTU).
    #[arg(long, value_name = "M")]
    pub mtu: Option<u32>,

    /// Log filter: error, warn, info, debug, trace (or a tracing EnvFilter directive).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,

    /// Owner of the vhost-user socket macvhost creates, so that a frontend running as another
    /// user (libvirt's QEMU runs as `libvirt-qemu`) can connect: `USER[:GROUP]`.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub socket_owner: Option<String>,

    /// Permissions of the vhost-user socket macvhost creates, in octal (e.g. 0660). Connecting
    /// needs write permission.
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,

    /// Serve per-queue counters on this unix socket (read them with `macvhost stats PATH`).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Limit guest → host traffic: `average=BYTES/S[,peak=BYTES/S][,burst=BYTES][,pps=N]`.
    #[arg(
        long,
        value_name = "SPEC",
        help = "Limit guest → host traffic: average=BYTES/S[,peak=BYTES/S][,burst=BYTES][,pps=N]"
    )]
    pub tx_rate: Option<String>,

    /// Limit host → guest traffic (same syntax as --tx-rate).
    #[arg(long, value_name = "SPEC")]
    pub rx_rate: Option<String>,

    /// Serve Prometheus metrics over HTTP on this address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// After each wake-up, keep polling the rings and the host queue this many µs before
    /// sleeping again (0 = off, at most 1000000): lower latency under moderate load for a core
    /// that spins meanwhile; an idle queue pair is never woken, so it never spins.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub poll_us: u32,

    /// How the guest's multicast groups reach the macvtap: follow (learn them from the guest's
    /// IGMP/MLD reports; the default), allmulti (the macvtap takes every multicast frame) or
    /// strict (only the macvtap's own groups).
    #[arg(long, value_name = "MODE", default_value = "follow")]
    pub rx_filter: String,

    /// Most multicast groups followed per device; past it the macvtap goes allmulticast until
    /// the count drops.
    #[arg(long, value_name = "N", default_value_t = crate::datapath::mcast::DEFAULT_MAX_GROUPS)]
    pub max_groups: usize,

    /// While the host link has no carrier, end the frontend's connection and serve none until
    /// carrier returns: QEMU (chardev `reconnect=N`) and DPDK virtio-user then show the guest
    /// its link down, and up again when they reconnect.
    #[arg(long)]
    pub disconnect_on_link_down: bool,

    /// What a syscall outside the seccomp allowlist does: `enforce` (default: the process dies
    /// of SIGSYS, naming the syscall on stderr) or `log` (the kernel logs it, the call goes on).
    #[arg(long, value_name = "MODE")]
    pub seccomp: Option<String>,

    /// Run without the sandbox: keep every capability, the whole filesystem, no seccomp
    /// filter (logged). For debugging only.
    #[arg(long)]
    pub no_sandbox: bool,

    /// Switch to this user (name or uid) when sealing, after start-up.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Switch to this group (name or gid) when sealing (default: the --user's group).
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Follow the guest's receive filter (MAC, address lists, rx modes) on QEMU's QMP socket:
    /// QEMU needs `-qmp unix:PATH,server=on,wait=off`. Reconnects when QEMU restarts.
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<PathBuf>,

    /// The NIC to follow on --qmp: its `-device virtio-net-pci,id=ID` (libvirt: the interface's
    /// alias, e.g. net0). Default: the VM's only NIC, or the one with our MAC.
    #[arg(long, value_name = "ID")]
    pub qmp_nic: Option<String>,

    /// Apply the guest's MAC, unicast and multicast lists and rx modes (read with --qmp) to the
    /// macvtap. The guest can then take any MAC and receive every frame sent to it.
    #[arg(long)]
    pub trust_guest_rx_filters: bool,

    /// Take the vhost-user socket and the host queues over from the macvhost running with this
    /// --control-socket (an upgrade): it hands them over, ends its frontend connection once
    /// this one is ready, and exits. Same flags as the running one otherwise.
    #[arg(long, value_name = "CONTROL_SOCKET")]
    pub take_over: Option<PathBuf>,
}

/// Subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Print a running macvhost's per-queue counters.
    Stats {
        /// The running macvhost's --control-socket.
        path: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Test helper: seal a small process like the daemon and run commands from stdin.
    #[command(hide = true)]
    SandboxProbe(crate::sandbox::probe::ProbeArgs),
    /// Started by the daemon before it seals: deletes the macvtap it created, sets a trusted
    /// guest's MAC on the macvtap (keeps only CAP_NET_ADMIN).
    #[command(hide = true)]
    LinkHelper(crate::sandbox::helper::LinkHelperArgs),
}

/// Validated configuration: what the server runs with (defined there, built here).
pub use crate::server::Settings as Config;

/// A command-line value the operator got wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{flag}: {reason}")]
pub struct ConfigError {
    /// The flag at fault, e.g. `--queues`.
    pub flag: &'static str,
    /// Why it was refused.
    pub reason: String,
}

fn bad(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        reason: reason.into(),
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        let socket = match (&args.socket_path, args.fd, args.client) {
            (Some(_), Some(_), _) => {
                return Err(bad("--fd", "give either --socket-path or --fd, not both"))
            }
            (None, None, _) => {
                return Err(bad(
                    "--socket-path",
                    "required (or --fd N for an inherited listening socket)",
                ))
            }
            (None, Some(_), true) => {
                return Err(bad("--client", "needs --socket-path to connect to"))
            }
            (None, Some(fd), false) => {
                if fd < 0 {
                    return Err(bad("--fd", format!("{fd} is not a file descriptor")));
                }
                SocketMode::ListenFd(fd)
            }
            (Some(p), None, true) => SocketMode::Connect(p.clone()),
            (Some(p), None, false) => SocketMode::Listen(p.clone()),
        };

        let socket_perms = socket_perms(&args, &socket)?;
        let qmp = qmp_settings(&args)?;
        check_take_over(&args, &socket)?;

        if args.queues == 0 || args.queues > MAX_QUEUE_PAIRS {
            return Err(bad(
                "--queues",
                format!("must be 1..={MAX_QUEUE_PAIRS} (got {})", args.queues),
            ));
        }
        if !args.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&args.queue_size) {
            return Err(bad(
                "--queue-size",
                format!(
                    "must be a power of two in 2..={MAX_QUEUE_SIZE} (got {})",
                    args.queue_size
                ),
            ));
        }

        let host_count = usize::from(args.macvtap.is_some())
            + usize::from(args.tap.is_some())
            + usize::from(!args.tap_fd.is_empty())
            + usize::from(args.macvtap_parent.is_some());
        if host_count != 1 {
            return Err(bad(
                "--macvtap",
                "give exactly one host side: --macvtap IFACE, --macvtap-parent DEV, --tap IFACE \
                 or --tap-fd FD[,FD...]",
            ));
        }
        if args.macvtap_parent.is_none() {
            for (given, flag) in [
                (args.mode.is_some(), "--mode"),
                (args.macvtap_name.is_some(), "--macvtap-name"),
                (args.keep, "--keep"),
            ] {
                if given {
                    return Err(bad(flag, "only applies with --macvtap-parent"));
                }
            }
        }
        let mac = args
            .mac
            .as_deref()
            .map(MacAddr::parse)
            .transpose()
            .map_err(|r| bad("--mac", r))?;
        let mut create_macvtap = None;
        let host = if let Some(parent) = args.macvtap_parent {
            check_ifname("--macvtap-parent", &parent)?;
            if let Some(n) = &args.macvtap_name {
                check_ifname("--macvtap-name", n)?;
            }
            let mode = args
                .mode
                .as_deref()
                .unwrap_or("bridge")
                .parse::<crate::host::netlink::MacvtapMode>()
                .map_err(|e| bad("--mode", e.to_string()))?;
            let spec = crate::host::netlink::MacvtapSpec {
                parent,
                name: args.macvtap_name.clone(),
                mode,
                mac: mac.map(|m| m.0),
            };
            let iface = spec.name.clone().unwrap_or_default();
            create_macvtap = Some(spec);
            HostSpec::Macvtap { iface }
        } else if let Some(iface) = args.macvtap {
            check_ifname("--macvtap", &iface)?;
            HostSpec::Macvtap { iface }
        } else if let Some(iface) = args.tap {
            check_ifname("--tap", &iface)?;
            HostSpec::Tap { iface }
        } else {
            if args.tap_fd.len() != usize::from(args.queues) {
                return Err(bad(
                    "--tap-fd",
                    format!(
                        "needs one fd per queue pair: {} fds for --queues {}",
                        args.tap_fd.len(),
                        args.queues
                    ),
                ));
            }
            if let Some(fd) = args.tap_fd.iter().find(|fd| **fd < 0) {
                return Err(bad("--tap-fd", format!("{fd} is not a file descriptor")));
            }
            HostSpec::TapFds { fds: args.tap_fd }
        };

        let mtu = args
            .mtu
            .map(|mtu| {
                u16::try_from(mtu)
                    .ok()
                    .filter(|m| *m >= 68)
                    .ok_or_else(|| bad("--mtu", format!("must be 68..=65535 (got {mtu})")))
            })
            .transpose()?;

        let rate = |flag: &'static str, v: Option<String>| {
            v.map(|s| s.parse::<crate::ratelimit::RateSpec>())
                .transpose()
                .map_err(|e| bad(flag, e.to_string()))
        };
        let tx_rate = rate("--tx-rate", args.tx_rate)?;
        let rx_rate = rate("--rx-rate", args.rx_rate)?;
        let sandbox = sandbox_options(
            args.no_sandbox,
            args.seccomp.as_deref(),
            args.user.as_deref(),
            args.group.as_deref(),
        )?;

        let rx_filter = args
            .rx_filter
            .parse::<RxFilterMode>()
            .map_err(|e| bad("--rx-filter", e))?;
        let limit = crate::datapath::mcast::MAX_GROUPS_LIMIT;
        if !(1..=limit).contains(&args.max_groups) {
            return Err(bad(
                "--max-groups",
                format!("must be 1..={limit} (got {})", args.max_groups),
            ));
        }

        if args.poll_us > crate::worker::MAX_POLL_US {
            return Err(bad(
                "--poll-us",
                format!(
                    "must be 0..={} (got {})",
                    crate::worker::MAX_POLL_US,
                    args.poll_us
                ),
            ));
        }

        Ok(Config {
            poll_us: args.poll_us,
            rx_filter,
            max_groups: args.max_groups,
            disconnect_on_link_down: args.disconnect_on_link_down,
            create_macvtap,
            keep_macvtap: args.keep,
            tx_rate,
            rx_rate,
            sandbox,
            socket,
            host,
            queue_pairs: args.queues,
            queue_size: args.queue_size,
            mac,
            mtu,
            socket_perms,
            control_socket: args.control_socket,
            metrics_addr: args.metrics_addr,
            qmp,
            take_over: args.take_over,
        })
    }
}

/// `--take-over` takes a listener bound to `--socket-path` (or none with `--client`) and the
/// queues of a named device: not an inherited listener, not a manager's queue fds, not a
/// macvtap this process would create.
fn check_take_over(args: &Args, socket: &SocketMode) -> Result<(), ConfigError> {
    if args.take_over.is_none() {
        return Ok(());
    }
    if matches!(socket, SocketMode::ListenFd(_)) {
        return Err(bad(
            "--take-over",
            "needs --socket-path (with or without --client), not --fd or socket activation: a \
             service manager keeps the socket itself (use its fd store: systemctl restart)",
        ));
    }
    if args.macvtap_parent.is_some() {
        return Err(bad(
            "--take-over",
            "cannot be used with --macvtap-parent: the running macvhost's macvtap is taken \
             over, not created; name it with --macvtap (the running one must have --keep)",
        ));
    }
    if !args.tap_fd.is_empty() {
        return Err(bad(
            "--take-over",
            "cannot be used with --tap-fd: the queues are taken from the running macvhost; \
             name the device with --macvtap or --tap",
        ));
    }
    // --socket-owner/--socket-mode are accepted (the same flags as the running one) and have
    // nothing to do: the socket file is taken over as it is.
    Ok(())
}

/// `--no-sandbox`, `--seccomp`, `--user`, `--group` → options, with names resolved now (the
/// sealed process can no longer read /etc/passwd).
fn sandbox_options(
    disabled: bool,
    seccomp: Option<&str>,
    user: Option<&str>,
    group: Option<&str>,
) -> Result<crate::sandbox::SandboxOptions, ConfigError> {
    use nix::unistd::{Gid, Group, Uid, User};
    if disabled {
        for (given, flag) in [
            (seccomp.is_some(), "--seccomp"),
            (user.is_some(), "--user"),
            (group.is_some(), "--group"),
        ] {
            if given {
                return Err(bad(flag, "has no effect with --no-sandbox"));
            }
        }
    }
    let seccomp = seccomp
        .map(str::parse::<crate::sandbox::SeccompMode>)
        .transpose()
        .map_err(|e| bad("--seccomp", e))?
        .unwrap_or_default();
    let user = match user {
        None => None,
        Some(u) => {
            let found = match u.parse::<u32>() {
                Ok(n) => User::from_uid(Uid::from_raw(n)),
                Err(_) => User::from_name(u),
            }
            .map_err(|e| bad("--user", format!("looking up '{u}': {e}")))?;
            let found = found.ok_or_else(|| bad("--user", format!("no user '{u}'")))?;
            Some((found.uid.as_raw(), found.gid.as_raw()))
        }
    };
    let gid = match group {
        None => None,
        Some(g) => {
            let found = match g.parse::<u32>() {
                Ok(n) => Group::from_gid(Gid::from_raw(n)),
                Err(_) => Group::from_name(g),
            }
            .map_err(|e| bad("--group", format!("looking up '{g}': {e}")))?;
            Some(
                found
                    .ok_or_else(|| bad("--group", format!("no group '{g}'")))?
                    .gid
                    .as_raw(),
            )
        }
    };
    let run_as = match (user, gid) {
        (None, None) => None,
        (Some((uid, primary)), g) => Some(crate::sandbox::RunAs {
            uid,
            gid: g.unwrap_or(primary),
        }),
        (None, Some(gid)) => Some(crate::sandbox::RunAs {
            uid: nix::unistd::geteuid().as_raw(),
            gid,
        }),
    };
    Ok(crate::sandbox::SandboxOptions {
        disabled,
        seccomp,
        run_as,
    })
}

/// `--qmp`, `--qmp-nic`, `--trust-guest-rx-filters`.
fn qmp_settings(args: &Args) -> Result<Option<crate::server::qmp::QmpSettings>, ConfigError> {
    let Some(path) = args.qmp.clone() else {
        if args.qmp_nic.is_some() {
            return Err(bad("--qmp-nic", "needs --qmp PATH"));
        }
        if args.trust_guest_rx_filters {
            return Err(bad(
                "--trust-guest-rx-filters",
                "needs --qmp PATH: the guest's filter is read from QEMU's QMP socket",
            ));
        }
        return Ok(None);
    };
    if let Some(id) = &args.qmp_nic {
        // QEMU's id syntax (a letter, then letters, digits, '-', '.', '_'); also fits the
        // names QEMU gives NICs without an id (virtio-net-pci.0).
        let ok = id.len() <= 128
            && id.starts_with(|c: char| c.is_ascii_alphabetic())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
        if !ok {
            return Err(bad(
                "--qmp-nic",
                format!("{id:?} is not a QEMU device id (a letter, then letters, digits, -._)"),
            ));
        }
    }
    if args.trust_guest_rx_filters && args.tap.is_some() {
        return Err(bad(
            "--trust-guest-rx-filters",
            "applies to a macvtap (a tap already receives every frame)",
        ));
    }
    Ok(Some(crate::server::qmp::QmpSettings {
        path,
        nic: args.qmp_nic.clone(),
        trust: args.trust_guest_rx_filters,
    }))
}

/// `--socket-owner` / `--socket-mode`, resolved now (names are looked up before anything is
/// created, and before any sandbox hides /etc/passwd).
fn socket_perms(args: &Args, socket: &SocketMode) -> Result<SocketPerms, ConfigError> {
    let mut perms = SocketPerms::default();
    if let Some(spec) = &args.socket_owner {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec.as_str(), None),
        };
        let uid = resolve_id(user, |n| {
            nix::unistd::User::from_name(n).map(|u| u.map(|u| u.uid.as_raw()))
        })
        .map_err(|r| bad("--socket-owner", format!("user {user:?}: {r}")))?;
        let gid = group
            .map(|g| {
                resolve_id(g, |n| {
                    nix::unistd::Group::from_name(n).map(|g| g.map(|g| g.gid.as_raw()))
                })
                .map_err(|r| bad("--socket-owner", format!("group {g:?}: {r}")))
            })
            .transpose()?;
        perms.owner = Some((uid, gid));
    }
    if let Some(mode) = &args.socket_mode {
        let m = u32::from_str_radix(mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                bad(
                    "--socket-mode",
                    format!("{mode:?} is not an octal mode like 0660"),
                )
            })?;
        perms.mode = Some(m);
    }
    if perms != SocketPerms::default() && !matches!(socket, SocketMode::Listen(_)) {
        let flag = if args.socket_owner.is_some() {
            "--socket-owner"
        } else {
            "--socket-mode"
        };
        return Err(bad(
            flag,
            "only applies to a socket macvhost creates (--socket-path without --client)",
        ));
    }
    Ok(perms)
}

/// A user or group given by name or number.
fn resolve_id(
    name: &str,
    lookup: impl Fn(&str) -> nix::Result<Option<u32>>,
) -> Result<u32, String> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    match lookup(name) {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err("no such name".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn check_ifname(flag: &'static str, name: &str) -> Result<(), ConfigError> {
    crate::host::validate_ifname(name).map_err(|e| bad(flag, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Config, ConfigError> {
        let mut full = vec!["macvhost"];
        full.extend_from_slice(argv);
        Config::try_from(Args::try_parse_from(full).expect("clap accepts the shape"))
    }

    #[test]
    fn minimal_macvtap_listen_config() {
        let c = parse(&["--socket-path", "/tmp/s", "--macvtap", "mvt0"]).unwrap();
        assert_eq!(c.socket, SocketMode::Listen("/tmp/s".into()));
        assert_eq!(c.queue_pairs, 1);
        assert_eq!(c.queue_size, 1024, "the default takes QEMU's largest ring");
        assert!(matches!(c.host, HostSpec::Macvtap { ref iface } if iface == "mvt0"));
    }

    #[test]
    fn poll_us_defaults_to_off_and_refuses_more_than_a_second() {
        let c = parse(&["--socket-path", "/s", "--tap", "t0"]).unwrap();
        assert_eq!(c.poll_us, 0);
        let c = parse(&["--socket-path", "/s", "--tap", "t0", "--poll-us", "50"]).unwrap();
        assert_eq!(c.poll_us, 50);
        let e = parse(&["--socket-path", "/s", "--tap", "t0", "--poll-us", "1000001"]).unwrap_err();
        assert_eq!(e.flag, "--poll-us", "{e}");
    }

    #[test]
    fn io_uring_flag_is_gone() {
        // Removed after it lost to writev (BENCHMARKS.md): clap refuses it, exit status 2.
        let e = Args::try_parse_from([
            "macvhost",
            "--socket-path",
            "/s",
            "--tap",
            "t0",
            "--io-uring",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn take_over_needs_a_socket_path_and_a_named_device() {
        let c = parse(&[
            "--socket-path",
            "/s",
            "--macvtap",
            "mvt0",
            "--take-over",
            "/run/ctl",
        ])
        .unwrap();
        assert_eq!(
            c.take_over.as_deref(),
            Some(std::path::Path::new("/run/ctl"))
        );
        let c = parse(&[
            "--socket-path",
            "/s",
            "--client",
            "--tap",
            "t0",
            "--take-over",
            "/c",
        ]);
        assert!(c.is_ok());
        for (argv, names) in [
            (
                &["--fd", "3", "--tap", "t0", "--take-over", "/c"][..],
                "--fd",
            ),
            (
                &[
                    "--socket-path",
                    "/s",
                    "--macvtap-parent",
                    "eth0",
                    "--take-over",
                    "/c",
                ][..],
                "--macvtap-parent",
            ),
            (
                &["--socket-path", "/s", "--tap-fd", "3", "--take-over", "/c"][..],
                "--tap-fd",
            ),
        ] {
            let e = parse(argv).unwrap_err();
            assert_eq!(e.flag, "--take-over", "{argv:?}");
            assert!(e.reason.contains(names), "{argv:?}: {e}");
        }
    }

    #[test]
    fn socket_owner_and_mode_take_names_numbers_and_octal() {
        let c = parse(&[
            "--socket-path",
            "/s",
            "--tap",
            "t0",
            "--socket-owner",
            "root:0",
            "--socket-mode",
            "0660",
        ])
        .unwrap();
        assert_eq!(c.socket_perms.owner, Some((0, Some(0))));
        assert_eq!(c.socket_perms.mode, Some(0o660));
        let c = parse(&[
            "--socket-path",
            "/s",
            "--tap",
            "t0",
            "--socket-owner",
            "1234",
        ])
        .unwrap();
        assert_eq!(c.socket_perms.owner, Some((1234, None)));
        for (flag, value) in [
            ("--socket-mode", "0888"),
            ("--socket-mode", "rw"),
            ("--socket-mode", "01777"),
            ("--socket-owner", "mvh-no-such-user"),
            ("--socket-owner", "root:mvh-no-such-group"),
        ] {
            let e = parse(&["--socket-path", "/s", "--tap", "t0", flag, value]).unwrap_err();
            assert_eq!(e.flag, flag, "{value}: {e}");
        }
    }

    #[test]
    fn mtu_above_65535_is_refused_with_the_real_range() {
        let e = parse(&["--socket-path", "/s", "--tap", "t0", "--mtu", "70000"]).unwrap_err();
        assert_eq!(e.to_string(), "--mtu: must be 68..=65535 (got 70000)");
        let c = parse(&["--socket-path", "/s", "--tap", "t0", "--mtu", "65535"]).unwrap();
        assert_eq!(c.mtu, Some(65535));
    }

    #[test]
    fn client_mode_and_fd_mode() {
        let c = parse(&["--socket-path", "/s", "--client", "--tap", "t0"]).unwrap();
        assert_eq!(c.socket, SocketMode::Connect("/s".into()));
        let c = parse(&["--fd", "3", "--tap", "t0"]).unwrap();
        assert_eq!(c.socket, SocketMode::ListenFd(3));
    }

    #[test]
    fn errors_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--macvtap", "m"], "--socket-path"),
            (&["--socket-path", "/s", "--fd", "3", "--tap", "t"], "--fd"),
            (&["--fd", "3", "--client", "--tap", "t"], "--client"),
            (
                &["--socket-path", "/s", "--tap", "t", "--queues", "0"],
                "--queues",
            ),
            (
                &["--socket-path", "/s", "--tap", "t", "--queues", "300"],
                "--queues",
            ),
            (
                &["--socket-path", "/s", "--tap", "t", "--queue-size", "100"],
                "--queue-size",
            ),
            (
                &["--socket-path", "/s", "--tap", "t", "--queue-size", "2048"],
                "--queue-size",
            ),
            (&["--socket-path", "/s"], "--macvtap"),
            (
                &["--socket-path", "/s", "--tap", "a", "--macvtap", "b"],
                "--macvtap",
            ),
            (&["--socket-path", "/s", "--tap-fd", "3,4"], "--tap-fd"),
            (
                &[
                    "--socket-path",
                    "/s",
                    "--tap",
                    "t",
                    "--mac",
                    "01:00:00:00:00:01",
                ],
                "--mac",
            ),
            (
                &[
                    "--socket-path",
                    "/s",
                    "--tap",
                    "t",
                    "--mac",
                    "zz:00:00:00:00:01",
                ],
                "--mac",
            ),
            (
                &["--socket-path", "/s", "--tap", "t", "--mtu", "10"],
                "--mtu",
            ),
            (&["--socket-path", "/s", "--tap", "a/b"], "--tap"),
            (
                &["--socket-path", "/s", "--tap", "t", "--tx-rate", "peak=5"],
                "--tx-rate",
            ),
            (
                &[
                    "--socket-path",
                    "/s",
                    "--tap",
                    "t",
                    "--rx-rate",
                    "average=x",
                ],
                "--rx-rate",
            ),
            (
                &[
                    "--socket-path",
                    "/s",
                    "--macvtap",
                    "waytoolonginterfacename",
                ],
                "--macvtap",
            ),
        ];
        for (argv, flag) in cases {
            let err = parse(argv).expect_err(&format!("{argv:?} must be refused"));
            assert_eq!(err.flag, *flag, "{argv:?}: {err}");
            assert!(err.to_string().starts_with(flag));
        }
    }

    #[test]
    fn macvtap_parent_defaults_to_bridge_mode() {
        let c = parse(&["--socket-path", "/s", "--macvtap-parent", "eth0", "--keep"]).unwrap();
        let spec = c.create_macvtap.expect("a macvtap to create");
        assert_eq!(spec.parent, "eth0");
        assert_eq!(spec.mode, crate::host::netlink::MacvtapMode::Bridge);
        assert!(c.keep_macvtap);
        let c = parse(&[
            "--socket-path",
            "/s",
            "--macvtap-parent",
            "eth0",
            "--mode",
            "passthru",
            "--macvtap-name",
            "mv0",
            "--mac",
            "52:54:00:00:00:01",
        ])
        .unwrap();
        let spec = c.create_macvtap.unwrap();
        assert_eq!(spec.mode, crate::host::netlink::MacvtapMode::Passthru);
        assert_eq!(spec.name.as_deref(), Some("mv0"));
        assert_eq!(spec.mac, Some([0x52, 0x54, 0, 0, 0, 1]));
    }

    #[test]
    fn sandbox_flags_resolve_names_and_refuse_contradictions() {
        let c = parse(&["--socket-path", "/s", "--tap", "t"]).unwrap();
        assert_eq!(c.sandbox, crate::sandbox::SandboxOptions::default());
        let c = parse(&[
            "--socket-path",
            "/s",
            "--tap",
            "t",
            "--seccomp",
            "log",
            "--user",
            "root",
            "--group",
            "0",
        ])
        .unwrap();
        assert_eq!(c.sandbox.seccomp, crate::sandbox::SeccompMode::Log);
        assert_eq!(
            c.sandbox.run_as,
            Some(crate::sandbox::RunAs { uid: 0, gid: 0 })
        );
        let c = parse(&["--socket-path", "/s", "--tap", "t", "--no-sandbox"]).unwrap();
        assert!(c.sandbox.disabled);
        let cases: &[(&[&str], &str)] = &[
            (&["--seccomp", "sometimes"], "--seccomp"),
            (&["--user", "no-such-user-mvh"], "--user"),
            (&["--group", "no-such-group-mvh"], "--group"),
            (&["--no-sandbox", "--seccomp", "log"], "--seccomp"),
            (&["--no-sandbox", "--user", "root"], "--user"),
        ];
        for (extra, flag) in cases {
            let mut argv = vec!["--socket-path", "/s", "--tap", "t"];
            argv.extend_from_slice(extra);
            let err = parse(&argv).expect_err(&format!("{argv:?} must be refused"));
            assert_eq!(err.flag, *flag, "{argv:?}: {err}");
        }
    }

    #[test]
    fn qmp_flags_build_settings_and_trust_needs_qmp() {
        let c = parse(&["--socket-path", "/s", "--macvtap", "m"]).unwrap();
        assert_eq!(c.qmp, None);
        let c = parse(&[
            "--socket-path",
            "/s",
            "--macvtap",
            "m",
            "--qmp",
            "/run/vm.qmp",
            "--qmp-nic",
            "net0",
            "--trust-guest-rx-filters",
        ])
        .unwrap();
        let q = c.qmp.expect("qmp settings");
        assert_eq!(q.path, PathBuf::from("/run/vm.qmp"));
        assert_eq!(q.nic.as_deref(), Some("net0"));
        assert!(q.trust);
        let c = parse(&["--socket-path", "/s", "--macvtap", "m", "--qmp", "/q"]).unwrap();
        let q = c.qmp.unwrap();
        assert_eq!((q.nic, q.trust), (None, false));
        let cases: &[(&[&str], &str)] = &[
            (&["--trust-guest-rx-filters"], "--trust-guest-rx-filters"),
            (&["--qmp-nic", "net0"], "--qmp-nic"),
            (&["--qmp", "/q", "--qmp-nic", "0net"], "--qmp-nic"),
            (&["--qmp", "/q", "--qmp-nic", "net 0"], "--qmp-nic"),
        ];
        for (extra, flag) in cases {
            let mut argv = vec!["--socket-path", "/s", "--macvtap", "m"];
            argv.extend_from_slice(extra);
            let e = parse(&argv).expect_err(&format!("{extra:?} must be refused"));
            assert_eq!(e.flag, *flag, "{extra:?}: {e}");
        }
        let e = parse(&[
            "--socket-path",
            "/s",
            "--tap",
            "t0",
            "--qmp",
            "/q",
            "--trust-guest-rx-filters",
        ])
        .unwrap_err();
        assert_eq!(e.flag, "--trust-guest-rx-filters");
        // Observing a tap-backed guest's filter is allowed.
        assert!(parse(&["--socket-path", "/s", "--tap", "t0", "--qmp", "/q"]).is_ok());
    }

    #[test]
    fn tap_fd_count_must_match_queues() {
        let c = parse(&["--socket-path", "/s", "--tap-fd", "3,4", "--queues", "2"]).unwrap();
        assert!(matches!(c.host, HostSpec::TapFds { ref fds } if fds == &[3, 4]));
    }

    #[test]
    fn mac_parsing_and_random_mac_is_local_unicast() {
        assert_eq!(
            MacAddr::parse("52:54:00:12:34:56").unwrap().to_string(),
            "52:54:00:12:34:56"
        );
        let r = MacAddr::random_local();
        assert_eq!(r.0[0] & 0x03, 0x02);
    }
}
