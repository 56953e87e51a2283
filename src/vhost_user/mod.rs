//! The vhost-user glue: what a frontend connection negotiates, and the relay in front of
//! vhost-user-backend's request handler.
//!
//! - [`connection`]: one frontend connection: device, daemon, relay; set up and torn down.
//! - [`backend`]: the `VhostUserBackend` impl: features, config space, dispatch to workers.
//! - [`shim`]: the message relay between the frontend and vhost-user-backend's handler.
//! - [`vring`]: a vring that tells its worker about enable/disable.

#[allow(unsafe_code)] // closes the exit fds vhost-user-backend leaks
pub mod backend;
pub mod connection;
#[allow(unsafe_code)] // fds received with SCM_RIGHTS
pub mod shim;
pub mod vring;
