//! macvhost: a vhost-user virtio-net backend on macvtap and tap.
//!
//! Shape: backend process → host macvtap/tap queue fds (multiqueue, vnet header) → one worker
//! thread per queue pair. `docs/architecture.md` draws what this section lists; each module's
//! own doc is its contract.
//!
//! # Layers
//!
//! Modules point one way, top to bottom: the last column lists what each module's non-test code
//! names (`crate::B`). No module imports one above it, and no two import each other.
//!
//! | layer | module | what it owns | imports |
//! |---|---|---|---|
//! | 1 | [`config`] | command line (`Args`) → validated [`server::Settings`]; operator errors (exit status 2) | server, worker, datapath, host, sandbox, ratelimit |
//! | 2 | [`server`] | start-up (host device, link watcher, link helper, control socket, seal), where frontends come from, the serve loop, signals, failure pacing, the QMP watcher ([`server::qmp`]) | control, vhost_user, worker, datapath, host, sandbox, systemd, ratelimit |
//! | 2 | [`control`] | the stats control socket and the Prometheus endpoint | worker, datapath |
//! | 3 | [`vhost_user`] | one frontend connection ([`vhost_user::connection`]): the `VhostUserBackend` impl ([`vhost_user::backend`]: features, config space, dispatch), the message shim in front of vhost-user-backend ([`vhost_user::shim`]), the vring wrapper ([`vhost_user::vring`]) | worker, datapath, host, sandbox, ratelimit |
//! | 4 | [`worker`] | one queue pair: its state machine ([`worker::state`]), rate limiters ([`worker::throttle`]), the guest's L2 filter ([`worker::l2`]), the calls into the datapath | datapath, host, ratelimit |
//! | 5 | [`datapath`] | the frame path over a `virtio-queue` `Queue`'s addresses + `vm-memory`, no vhost-user types (its own split-ring reader: avail ring, descriptor tables and used ring found once per call); vnet header and offload table; IGMP/MLD learning ([`datapath::mcast`]); the dirty-page log | host |
//! | 6 | [`host`] | tap/macvtap queue fds, their ioctls, link facts, the multicast filter ([`host::mcfilter`]), rtnetlink: create, inspect, watch, delete ([`host::netlink`]) | — |
//! | - | [`ratelimit`] | token buckets (pure leaf) | — |
//! | - | [`takeover`] | `--take-over`: the listener and host queue fds handed from a running macvhost to its successor over the control socket (used by server and control) | systemd, host |
//! | - | [`systemd`] | socket activation, `sd_notify` (readiness, status, watchdog), the fd store (leaf) | — |
//! | - | [`sandbox`] | sealing after start-up: capabilities, the empty root, Landlock, seccomp per thread kind, the privileged link helper (`docs/security.md`) | host |
//! | - | `testkit` (feature `test-utils`) | `require`, guest ring driver, fake host queue, netns topologies, daemon guard, fuzz entry points; above everything, imported only by test code | anything |
//!
//! # Threads
//!
//! Per process: `main` (start-up, then the serve loop), `signals` (SIGTERM/SIGINT),
//! `link-watch` (rtnetlink carrier and deletion, [`host::netlink::watch_links`]), `control` and
//! `metrics` when configured, `watchdog` (systemd `WATCHDOG=1` pings) under a service manager
//! that asks for them, `qmp` (the guest's rx filter from QEMU, [`server::qmp`]) with `--qmp`,
//! and from the first connection on `vu-fd-watchdog` (interrupts a read or write stuck on a
//! frontend's fd; see [`vhost_user::vring`]).
//! Per connection: `vu-shim` (the relay), `macvhost` (vhost-user-backend's request handler),
//! one `vring_worker` per queue pair (vhost-user-backend's epoll loop, calling
//! [`worker::PairWorker::handle_event`]), and an unnamed scoped thread following the link for
//! the connection (carrier → config-change message or disconnect, L2 ticks).
//! A second process, `macvhost link-helper`, keeps only `CAP_NET_ADMIN` when the sealed daemon
//! will need it (deleting a macvtap it created, a trusted guest's MAC; [`sandbox::helper`]).
//! Every thread runs sealed once the serve loop starts ([`sandbox::seal`]): no capability, an
//! empty root, and its kind's seccomp filter.
//!
//! # Control path
//!
//! frontend socket → [`vhost_user::shim`] (reads each message once, bounded; refuses what the
//! device does not implement; ends a frontend that wants more queue pairs or larger rings than
//! configured naming the flag ([`vhost_user::shim::fit`]); answers QEMU's early
//! `SET_VRING_ENABLE` and repeated `ADD_MEM_REG` ([`vhost_user::shim::quirks`]); takes
//! `SET_LOG_BASE` ([`vhost_user::shim::log_base`]); notes the backend channel for
//! `CONFIG_CHANGE_MSG` ([`vhost_user::shim::notifier`])) → vhost-user-backend's handler over a
//! private abstract-namespace socket that admits only our own connection →
//! [`vhost_user::backend`] (features, memory, config space) → [`worker::PairWorker`] (settings,
//! memory, vring state events) → [`datapath`].
//!
//! # Unsafe
//!
//! `#![deny(unsafe_code)]` holds everywhere except these modules, each allowed where it is
//! declared: [`host`]'s `sys` (ioctls, fd ownership, getrandom), [`datapath::iovec`]
//! (`readv`/`writev` on guest memory), [`datapath::dirty`] (the dirty-log mapping),
//! [`datapath::vnet`] (`ByteValued` for the header), [`vhost_user::shim`] (in `wire`: fds
//! received with `SCM_RIGHTS`), [`vhost_user::vring`] (the kick fd borrowed under the vring
//! lock, the fd watchdog's signal), [`vhost_user::backend`] (closing fds vhost-user-backend
//! leaks), [`systemd`] (adopting the fds a service manager or parent passed at exec), [`takeover`]
//! (owning the fds received with `SCM_RIGHTS`) and
//! [`sandbox`] (raw syscalls for capabilities, namespaces, Landlock and seccomp, and
//! async-signal-safe handlers). In test code: the test kit's fuzz frontend (`testkit::fuzz`,
//! ignoring SIGPIPE) and `host::mcfilter`'s tests (`capget`/`capset`). Every block says which
//! invariant makes it sound; clippy's `undocumented_unsafe_blocks` denies one that does not.
//!
//! # Errors
//!
//! One `thiserror` enum per module, each variant's doc saying who is at fault: the guest (a bad
//! chain or ring: counted, returned with length 0, the queue stopped if the ring itself is
//! broken), the frontend (a bad message: the connection ends, logged once), the host (a failing
//! fd: counted, logged once until it works again) or the operator (a bad flag: named, exit
//! status 2). Where a module mixes them, an `is_operator_error` (or the enum's sections) tells
//! them apart. Every public item is documented (`missing_docs` is denied).

#![deny(missing_debug_implementations)]
#![deny(unsafe_code)]

pub mod config;
pub mod control;
pub mod datapath;
pub mod host;
pub mod ratelimit;
#[allow(unsafe_code)] // raw syscalls: capabilities, namespaces, Landlock, seccomp, signal handlers
pub mod sandbox;
pub mod server;
#[allow(unsafe_code)] // adopts the fds a service manager or parent passed at exec
pub mod systemd;
#[allow(unsafe_code)] // owns the fds a running macvhost hands over with SCM_RIGHTS
pub mod takeover;
#[cfg(any(test, feature = "test-utils"))]
pub mod testkit;
pub mod vhost_user;
pub mod worker;

/// The vhost-user.json capabilities object printed by `--print-capabilities`.
pub fn capabilities_json() -> String {
    serde_json::json!({ "type": "net" }).to_string()
}

/// `--log-level` as a filter, or why it is refused.
fn check_log_filter(filter: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let is_level = LOG_LEVELS.contains(&filter.to_ascii_lowercase().as_str());
    if !is_level && !filter.contains(['=', ',']) {
        return Err(format!(
            "'{filter}' is not a level ({}) or a directive like info,macvhost=debug",
            LOG_LEVELS.join(", ")
        ));
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("'{filter}' is not a log filter: {e}"))
}

/// The levels `--log-level` takes by name.
pub const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Installs the stderr log subscriber with the `--log-level` filter: a level name, or a tracing
/// directive list (`info,macvhost::worker=debug`). A bare word that is not a level is refused
/// (tracing would read it as a target and silently log nothing).
pub fn init_logging(filter: &str) -> Result<(), String> {
    let filter = check_log_filter(filter)?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_level_takes_levels_and_directives_and_refuses_bare_words() {
        assert!(super::check_log_filter("debug").is_ok());
        assert!(super::check_log_filter("WARN").is_ok());
        assert!(super::check_log_filter("info,macvhost::worker=trace").is_ok());
        let e = super::check_log_filter("loud").unwrap_err();
        assert!(e.contains("not a level"), "{e}");
    }
}
