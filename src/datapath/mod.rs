//! The frame path: guest virtqueues ⇄ host queue fd, with no vhost-user types.
//!
//! Everything here works on a `virtio_queue::Queue`, a `vm_memory::GuestMemory` and a
//! [`HostQueue`], so it can be unit-tested with `virtio_queue::mock`, fuzzed and benched without a
//! socket. The layer above (the workers) locks vrings, watches eventfds and calls in here.
//!
//! - [`iovec`]: iovec lists over guest memory and the `readv`/`writev` calls (`unsafe`).
//! - [`vnet`]: the 12-byte `virtio_net_hdr_v1`, the offload table (features ⇄ tap bits).
//! - [`tx`]: guest → host, one `writev` per frame.
//! - `ring`: the avail ring and descriptor tables, read from one slice per call.
//! - [`rx`]: host → guest, one `readv` per frame, MRG_RXBUF across chains.
//! - [`stats`]: per-queue-pair counters, one per drop reason.
//! - [`mcast`]: IGMP/MLD report parsing and the guest's multicast membership table.
//! - [`dirty`]: one connection's dirty-page log for live migration (`unsafe`: maps it).

#[allow(unsafe_code)] // maps the frontend's dirty log
pub mod dirty;
#[allow(unsafe_code)] // readv/writev on guest memory
pub mod iovec;
pub mod mcast;
mod ring;
pub mod rx;
pub mod stats;
pub mod tx;
mod used;
#[allow(unsafe_code)] // ByteValued for the header
pub mod vnet;

use std::io;
use std::os::fd::AsRawFd;

/// Chains handled per batch: popped per read of the avail index, and handled per direction before the other direction of a queue pair gets a turn. The one
/// batch size; everything else derives from it.
pub const BATCH: usize = 64;

/// Largest virtqueue size macvhost accepts (QEMU's virtio-net allows up to 1024). Here, the layer
/// every other one may import: `config` checks `--queue-size` against it and the vhost-user shim
/// names it when a frontend asks for more.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// `len` bytes at guest address `addr` as one slice when they lie inside one memory region;
/// `None` when they do not (or are not guest memory): the caller then takes vm-memory's general
/// `get_slices` path, which splits across regions and reports the error. Per descriptor this
/// saves the general path's iterator and `Result` plumbing, which the micro-benchmark measured
/// at half of the TX call's CPU (`tx/null/64` 402 → 189 ns per frame). Only for memory without
/// an IOMMU in between (`GuestMemory::physical_memory`), where no access check applies.
fn one_region_slice<P: vm_memory::GuestMemoryBackend + ?Sized>(
    phys: &P,
    addr: vm_memory::GuestAddress,
    len: usize,
) -> Option<
    vm_memory::VolatileSlice<
        '_,
        vm_memory::bitmap::BS<'_, <P::R as vm_memory::GuestMemoryRegion>::B>,
    >,
> {
    use vm_memory::GuestMemoryRegion;
    let (region, off) = phys.to_region_addr(addr)?;
    region.get_slice(off, len).ok()
}

pub use dirty::{DirtyLog, DirtyLogState};
pub use iovec::IoVecBuf;
pub use rx::{process_rx, RxOptions, RxOutcome, RxScratch};
pub use stats::{QueueStats, StatsSnapshot};
pub use tx::{process_tx, TxOptions, TxOutcome, TxScratch};

/// One host queue (a tap or macvtap queue fd opened with a vnet header): one frame per call.
///
/// The real implementation is `host::TapQueue` (below); tests use the test kit's fake.
pub trait HostQueue: AsRawFd + Send + Sync {
    /// Writes one frame (12-byte vnet header + Ethernet frame) gathered from `frame`.
    fn send_frame(&self, frame: &IoVecBuf<'_>) -> io::Result<usize>;
    /// Reads one frame (vnet header + Ethernet frame) scattered into `bufs`. Returns its length.
    fn recv_frame(&self, bufs: &IoVecBuf<'_>) -> io::Result<usize>;
}

/// The real host queue: one `writev`/`readv` per frame on the tap or macvtap queue fd.
impl HostQueue for crate::host::TapQueue {
    fn send_frame(&self, frame: &IoVecBuf<'_>) -> io::Result<usize> {
        iovec::writev_fd(self.as_raw_fd(), frame)
    }

    fn recv_frame(&self, bufs: &IoVecBuf<'_>) -> io::Result<usize> {
        iovec::readv_fd(self.as_raw_fd(), bufs)
    }
}
