//! macvhost: a vhost-user virtio-net backend on macvtap and tap.
//!
//! Shape: backend process → host macvtap/tap queue fds (multiqueue, vnet header) → one worker
//! thread per queue pair.
//!
//! Module map:
//! - [`config`]: command line (`Args`) → validated [`config::Config`]; operator errors.
//! - [`host`]: opening macvtap / tap queues, tap ioctls, link facts (MAC, MTU, carrier).
//! - [`datapath`]: the frame path over `virtio-queue` + `vm-memory`, free of vhost-user types.
//! - [`dirty_log`]: the per-connection dirty-page log for live migration (maps `SET_LOG_BASE`).
//! - [`backend`]: the `VhostUserBackend` impl: features, config space, dispatch to workers.
//! - [`worker`]: per-queue-pair state and event handling (owns the datapath calls).
//! - [`server`]: listening / connecting, serving one frontend after another, signals.
//! - [`shim`]: a vhost-user message relay: answers what QEMU sends and the crates mishandle,
//!   and takes `SET_LOG_BASE` for [`dirty_log`].
//! - [`control`]: the stats control socket and the Prometheus endpoint.
//! - [`vring`]: a vring wrapper that tells workers about enable/disable.
//! - [`sandbox`]: after start-up, drop every capability, hide the filesystem and install
//!   seccomp allowlists (issue 11; `docs/security.md`).

#![deny(missing_debug_implementations)]

pub mod backend;
pub mod config;
pub mod control;
pub mod datapath;
pub mod dirty_log;
#[cfg(feature = "test-utils")]
pub mod fuzzing;
pub mod host;
pub mod netlink;
pub mod ratelimit;
pub mod sandbox;
pub mod server;
pub mod shim;
pub mod vring;
pub mod worker;

/// The vhost-user.json capabilities object printed by `--print-capabilities`.
pub fn capabilities_json() -> String {
    serde_json::json!({ "type": "net" }).to_string()
}

/// Installs the stderr log subscriber with the `--log-level` filter.
pub fn init_logging(filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("'{filter}' is not a log filter: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init()
        .map_err(|e| e.to_string())
}
