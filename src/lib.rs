//! macvhost: a vhost-user virtio-net backend on macvtap and tap.
//!
//! Shape: backend process → host macvtap/tap queue fds (multiqueue, vnet header) → one worker
//! thread per queue pair.
//!
//! # Layers
//!
//! Modules point one way, top to bottom; none imports one above it (`docs/architecture.md`
//! draws it):
//!
//! | layer | module | what it owns |
//! |---|---|---|
//! | 1 | [`config`] | command line (`Args`) → validated [`server::Settings`]; operator errors |
//! | 2 | [`server`] | start-up (host device, link watcher, control socket), where frontends come from, the serve loop, signals |
//! | 2 | [`control`] | the stats control socket and the Prometheus endpoint |
//! | 3 | [`vhost_user`] | one frontend connection: the `VhostUserBackend` impl (features, config space, dispatch), the message shim in front of vhost-user-backend, the vring wrapper |
//! | 4 | [`worker`] | one queue pair: its state machine, the rate limiters, the calls into the datapath |
//! | 5 | [`datapath`] | the frame path over `virtio-queue` + `vm-memory`, no vhost-user types; the dirty-page log |
//! | 6 | [`host`] | tap/macvtap queue fds, their ioctls, link facts, rtnetlink (create, watch, delete) |
//! | - | [`ratelimit`] | token buckets (pure; used by config and worker) |
//! | - | [`takeover`] | `--take-over`: the listener and host queue fds handed from a running macvhost to its successor over the control socket (leaf; used by server and control) |
//! | - | [`systemd`] | socket activation, `sd_notify` (readiness, status, watchdog), the fd store (leaf; used by server) |
//! | - | [`sandbox`] | sealing after start-up: capabilities, the empty root, Landlock, seccomp per thread kind, the link helper (uses `host`; used by server; `docs/security.md`) |
//! | - | `testkit` (tests, feature `test-utils`) | the test kit: `require`, guest ring driver, fake host queue, netns topologies, daemon guard, fuzz entry points; above everything, imported only by test code |
//!
//! # Threads
//!
//! Per process: `main` (start-up, then the serve loop), `signals` (SIGTERM/SIGINT), the link
//! watcher (rtnetlink), the control socket and metrics servers when configured, `qmp` (the
//! guest's rx filter from QEMU, [`server::qmp`]) with `--qmp`, and from the first connection on
//! `vu-fd-watchdog` (interrupts a read or write stuck on a frontend's fd; see
//! [`vhost_user::vring`]).
//! Per connection: `vu-shim` (the relay), `macvhost` (vhost-user-backend's request handler), and
//! one `vring_worker` per queue pair (vhost-user-backend's epoll loop, calling
//! [`worker::PairWorker::handle_event`]). A link follower runs beside each connection.
//! Every thread runs sealed once the serve loop starts ([`sandbox::seal`]): no capability, an
//! empty root, and its kind's seccomp filter.
//!
//! # Control path
//!
//! frontend socket → [`vhost_user::shim`] (reads each message once, bounded, and refuses what
//! the device does not implement; answers QEMU's early `SET_VRING_ENABLE` and repeated
//! `ADD_MEM_REG`, takes `SET_LOG_BASE`, notes the backend channel) → vhost-user-backend's handler over a private socket → [`vhost_user::backend`]
//! (features, memory, config space) → [`worker::PairWorker`] (settings, memory, vring state
//! events) → [`datapath`].
//!
//! # Unsafe
//!
//! `#![deny(unsafe_code)]` holds everywhere except: [`host`]'s `sys` (ioctls, fd ownership,
//! getrandom), [`datapath::iovec`] (`readv`/`writev` on guest memory), [`datapath::dirty`] (the
//! dirty-log mapping), [`datapath::vnet`]
//! (`ByteValued` for the header), [`vhost_user::shim`] (fds received with `SCM_RIGHTS`),
//! [`vhost_user::vring`] (the kick fd borrowed under the vring lock, the fd watchdog's signal)
//! and
//! [`vhost_user::backend`] (closing fds vhost-user-backend leaks) and [`systemd`] (adopting the
//! fds a service manager or parent passed at exec) and [`takeover`] (owning the fds received
//! with `SCM_RIGHTS`) and [`sandbox`] (raw syscalls for
//! capabilities, namespaces, Landlock and seccomp, and async-signal-safe handlers), and in test
//! code only the test kit's fuzz frontend (`testkit::fuzz`, ignoring SIGPIPE). Every block says
//! which invariant makes it sound.
//!
//! # Errors
//!
//! One `thiserror` enum per module, each variant saying who is at fault: the guest (a bad chain
//! or ring: counted, returned with length 0, the queue stopped if the ring itself is broken), the
//! frontend (a bad message: the connection ends, logged once), the host (a failing fd: counted,
//! logged once until it works again) or the operator (a bad flag: named, exit status 2).

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
