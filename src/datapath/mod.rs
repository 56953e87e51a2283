//! The frame path: guest virtqueues ⇄ host queue fd, with no vhost-user types.
//!
//! Everything here works on a `virtio_queue::Queue`, a `vm_memory::GuestMemory` and a
//! [`HostQueue`], so it can be unit-tested with `virtio_queue::mock`, fuzzed and benched without a
//! socket. The worker (`crate::worker`) owns the vhost-user side: locking vrings, eventfds.
//!
//! - [`iovec`]: iovec lists over guest memory and the `readv`/`writev` calls (the datapath's only `unsafe`).
//! - [`vnet`]: the 12-byte `virtio_net_hdr_v1`, feature → tap offload mapping.
//! - [`tx`]: guest → host, one `writev` per frame.
//! - [`rx`]: host → guest, one `readv` per frame, MRG_RXBUF across chains.
//! - [`stats`]: per-queue-pair counters, one per drop reason.
//! - [`mcast`]: IGMP/MLD report parsing and the guest's multicast membership table.
//! - [`dirty`]: the dirty-page log view used while the frontend migrates the guest.
//! - `testutil` (tests and feature `test-utils`): fake host queue, mock guest queues.

pub mod dirty;
pub mod iovec;
pub mod mcast;
pub mod rx;
pub mod stats;
#[cfg(any(test, feature = "test-utils"))]
pub mod testutil;
pub mod tx;
pub mod uring;
mod used;
pub mod vnet;

use std::io;
use std::os::fd::AsRawFd;

pub use dirty::DirtyLog;
pub use iovec::IoVecBuf;
pub use rx::{process_rx, RxOptions, RxOutcome, RxScratch};
pub use stats::{QueueStats, StatsSnapshot};
pub use tx::{process_tx, TxOptions, TxOutcome, TxScratch};

/// One host queue (a tap or macvtap queue fd opened with a vnet header): one frame per call.
///
/// The real implementation is `host::TapQueue`; unit tests use a socketpair with fault injection.
pub trait HostQueue: AsRawFd + Send + Sync {
    /// Writes one frame (12-byte vnet header + Ethernet frame) gathered from `frame`.
    fn send_frame(&self, frame: &IoVecBuf<'_>) -> io::Result<usize>;
    /// Reads one frame (vnet header + Ethernet frame) scattered into `bufs`. Returns its length.
    fn recv_frame(&self, bufs: &IoVecBuf<'_>) -> io::Result<usize>;
}
