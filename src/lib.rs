//! macvhost: a vhost-user virtio-net backend on macvtap and tap.
//!
//! Shape: backend process → host macvtap/tap queue fds (multiqueue, vnet header) → one worker
//! thread per queue pair.
//!
//! Module map:
//! - [`config`]: command line (`Args`) → validated [`config::Config`]; operator errors.
//! - [`host`]: opening macvtap / tap queues, tap ioctls, link facts (MAC, MTU, carrier).
//! - [`datapath`]: the frame path over `virtio-queue` + `vm-memory`, free of vhost-user types.
//! - [`backend`]: the `VhostUserBackend` impl: features, config space, dispatch to workers.
//! - [`worker`]: per-queue-pair state and event handling (owns the datapath calls).
//! - [`server`]: listening / connecting, serving one frontend after another, signals.

#![deny(missing_debug_implementations)]

pub mod datapath;
pub mod host;
