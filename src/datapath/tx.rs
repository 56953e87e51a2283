//! Guest → host: one `writev` per frame, straight from guest memory.
//!
//! [`process_tx`] drains the TX virtqueue in batches of at most `budget` chains.
//!
//! # Per chain
//! The descriptors are walked once (`ring` reads each descriptor once into a local copy;
//! nothing here re-reads guest memory). A chain is dropped — returned with used length 0 and
//! counted — when:
//! - a descriptor is device-writable, a range is not mapped guest memory, the chain is cut short
//!   (loop, `next` out of range, bad indirect table) or needs more than [`MAX_SEGMENTS`] iovecs:
//!   `tx_drop_bad_chain`;
//! - its total length is below the vnet header: `tx_drop_too_short`;
//! - its total length exceeds header + 65550: `tx_drop_too_big` (the walk stops right there).
//!
//! A descriptor spanning two memory regions is legal and becomes two iovecs; zero-length
//! descriptors are skipped. A head index `>= queue size` cannot be put in the used ring at all:
//! it is counted as `tx_drop_bad_chain` and skipped.
//!
//! Valid chains go to the host queue as they are, header included, in one
//! [`HostQueue::send_frame`]. The header is not parsed: the kernel validates it (`EINVAL`).
//! Zero-copy has the usual TOCTOU caveat: the guest can rewrite its buffer while the kernel copies
//! it; that only hurts the guest's own frame (the kernel re-validates what it copies).
//!
//! # Host outcomes
//! - success: used length 0, `tx_frames`, `tx_bytes` (header excluded);
//! - `EAGAIN`: the chain is *not* consumed (`next_avail` goes back one), `tx_eagain`, and the batch
//!   stops with [`TxOutcome::blocked`]: the worker waits for `EPOLLOUT` then calls again;
//! - `EINTR`: the chain is put back and the batch stops with [`TxOutcome::more`];
//! - any other error (`EIO` link down, `EINVAL` bad header, `ENOBUFS`, `EBADFD`...): the frame is
//!   dropped (used length 0, `tx_drop_host_error`) and the batch goes on;
//!   [`TxOutcome::host_error`] holds the last such errno so the worker can log it (rate-limited).
//!
//! # Notifications
//! Guest kicks are disabled while draining; when the ring is empty they are re-enabled and, if the
//! guest slipped in more chains meanwhile, draining resumes (the standard virtio-queue loop, which
//! handles EVENT_IDX). They stay disabled when the batch stops early (`blocked`, `more`): the
//! worker is going to call again anyway. `needs_notification` is checked once per call, and only
//! when something was put in the used ring.
//!
//! # Broken ring policy
//! If the avail index is more than the queue size ahead of `next_avail`, or the rings are not in
//! guest memory (an avail entry the index announces cannot be read, the used ring cannot be
//! written), the driver is broken or malicious: [`TxOutcome::broken`] is set, `queue_broken` is
//! counted and nothing more is touched. The worker must stop the queue until the frontend resets
//! it, and log it once. Chains completed earlier in the same call are still notified.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemory, Permissions};

use super::mcast;
use super::ring::{rewind_avail, Chain, Pop, Ring};
use super::stats::QueueStats;
use super::used::UsedBatch;
use super::vnet::{
    tx_max_frame_len, vnet_hdr_len, GSO_TYPE_OFFSET, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
};
use super::{HostQueue, IoVecBuf};

/// Most iovecs one frame may need (`IOV_MAX` on Linux). Longer chains are dropped, not cut.
pub const MAX_SEGMENTS: usize = 1024;

/// Most chains popped per read of the avail index.
const POP_BATCH: usize = super::BATCH;

/// Per-queue TX parameters, fixed between feature negotiations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxOptions {
    /// vnet header length ([`vnet_hdr_len`]): 10 or 12.
    pub hdr_len: usize,
    /// Most chains handled per call (dropped ones included). 0 is treated as 1.
    pub budget: usize,
}

impl TxOptions {
    /// Options for the guest's acked features.
    pub fn new(acked_features: u64, budget: usize) -> Self {
        TxOptions {
            hdr_len: vnet_hdr_len(acked_features),
            budget,
        }
    }
}

/// What one [`process_tx`] call did, and what the worker must do next.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxOutcome {
    /// Frames handed to the host queue.
    pub frames: usize,
    /// The used ring changed and the guest asked to be told: signal the call eventfd.
    pub notify: bool,
    /// The host queue returned `EAGAIN`: wait for `EPOLLOUT`, then call again. The chain that got
    /// it is still in the avail ring.
    pub blocked: bool,
    /// The call stopped before the ring was empty (budget spent, or `EINTR`): call again soon;
    /// guest kicks are still disabled.
    pub more: bool,
    /// The guest broke the ring: stop the queue until the frontend resets it (log once).
    pub broken: bool,
    /// The last host error (not `EAGAIN`/`EINTR`) of this call; those frames were dropped.
    pub host_error: Option<i32>,
}

/// Watches what the guest sends, for the layer-2 following above the datapath (see
/// [`super::mcast`]). Every frame sent costs one 12-byte read of its MAC addresses:
/// - a frame to an IP multicast MAC is copied — at most [`mcast::COPY_LEN`] bytes, into a buffer
///   allocated once — and the copy handed to the sink with the frame's length (never guest
///   memory: the guest may rewrite it meanwhile; the copy is what gets parsed);
/// - a frame whose source MAC is not `own_mac` (and not multicast) is counted in
///   `tx_foreign_src_mac`: the guest changed its MAC, or bridges other hosts.
pub struct TxWatch {
    own_mac: Arc<SharedMac>,
    copy: Box<[u8]>,
    sink: MulticastSink,
    foreign: ForeignSink,
}

/// The guest's MAC as the TX watch compares it: changed when the macvtap follows a trusted
/// guest's new MAC, read (relaxed) once per frame.
#[derive(Debug)]
pub struct SharedMac(AtomicU64);

impl SharedMac {
    /// Starts as `mac`.
    pub fn new(mac: [u8; 6]) -> SharedMac {
        SharedMac(AtomicU64::new(Self::pack(mac)))
    }

    fn pack(mac: [u8; 6]) -> u64 {
        let mut b = [0u8; 8];
        b[..6].copy_from_slice(&mac);
        u64::from_le_bytes(b)
    }

    /// The MAC now.
    pub fn get(&self) -> [u8; 6] {
        let b = self.0.load(Ordering::Relaxed).to_le_bytes();
        [b[0], b[1], b[2], b[3], b[4], b[5]]
    }

    /// Changes it.
    pub fn set(&self, mac: [u8; 6]) {
        self.0.store(Self::pack(mac), Ordering::Relaxed);
    }

    /// Debug output for a `holder` whose one printable field (`field`) is this MAC: the rest
    /// (sinks, locked tables) is left out.
    pub fn fmt_holder(
        &self,
        f: &mut std::fmt::Formatter<'_>,
        holder: &str,
        field: &str,
    ) -> std::fmt::Result {
        f.debug_struct(holder)
            .field(field, self)
            .finish_non_exhaustive()
    }
}

/// Gets a copy of a multicast frame's start and the frame's real length.
pub type MulticastSink = Box<dyn FnMut(&[u8], usize) + Send>;
/// Gets the source MAC of a frame not sent from the guest's MAC.
pub type ForeignSink = Box<dyn FnMut([u8; 6]) + Send>;

impl std::fmt::Debug for TxWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.own_mac.fmt_holder(f, "TxWatch", "own_mac")
    }
}

impl TxWatch {
    /// A watch for a guest whose MAC is `own_mac`: `sink` gets the multicast frames,
    /// `foreign` the source MAC of every frame not sent from `own_mac`.
    pub fn new(own_mac: Arc<SharedMac>, sink: MulticastSink, foreign: ForeignSink) -> TxWatch {
        TxWatch {
            own_mac,
            copy: vec![0u8; mcast::COPY_LEN].into_boxed_slice(),
            sink,
            foreign,
        }
    }

    /// One sent frame of `len` bytes, header included.
    fn frame(&mut self, iov: &IoVecBuf<'_>, hdr_len: usize, len: usize, stats: &QueueStats) {
        let mut macs = [0u8; 12];
        if iov.read_at(hdr_len, &mut macs) < macs.len() {
            return;
        }
        let mut src = [0u8; 6];
        src.copy_from_slice(&macs[6..]);
        if src != self.own_mac.get() && src[0] & 1 == 0 {
            QueueStats::inc(&stats.tx_foreign_src_mac);
            (self.foreign)(src);
        }
        if mcast::is_ip_multicast_mac(&macs[..4]) {
            let wire_len = len - hdr_len;
            let want = wire_len.min(self.copy.len());
            let n = iov.read_at(hdr_len, &mut self.copy[..want]);
            (self.sink)(&self.copy[..n], wire_len);
        }
    }
}

/// Reusable TX buffers (one per queue pair): no allocation per frame in steady state.
#[derive(Debug, Default)]
pub struct TxScratch {
    iov: IoVecBuf<'static>,
    watch: Option<TxWatch>,
}

impl TxScratch {
    /// Scratch with room for a typical frame's iovecs.
    pub fn new() -> Self {
        TxScratch {
            iov: IoVecBuf::with_capacity(64),
            watch: None,
        }
    }

    /// Watches every frame sent from now on (`None`: stop watching).
    pub fn set_watch(&mut self, watch: Option<TxWatch>) {
        self.watch = watch;
    }
}

/// Why a TX chain was dropped (each maps to one counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxDrop {
    BadChain,
    TooShort,
    TooBig,
}

/// The errno of a host error (`EIO` when the error carries none).
pub(super) fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Moves guest TX frames to the host queue. See the module doc for the contract.
pub fn process_tx<M: GuestMemory, H: HostQueue>(
    queue: &mut Queue,
    mem: &M,
    host: &H,
    stats: &QueueStats,
    scratch: &mut TxScratch,
    opts: &TxOptions,
) -> TxOutcome {
    let watch = scratch.watch.as_mut();
    let mut iov: IoVecBuf<'_> = std::mem::take(&mut scratch.iov).reuse();
    let out = tx_batch(queue, mem, host, stats, &mut iov, opts, watch);
    scratch.iov = iov.reuse();
    out
}

fn tx_batch<'m, M: GuestMemory, H: HostQueue>(
    queue: &mut Queue,
    mem: &'m M,
    host: &H,
    stats: &QueueStats,
    iov: &mut IoVecBuf<'m>,
    opts: &TxOptions,
    mut watch: Option<&mut TxWatch>,
) -> TxOutcome {
    let mut out = TxOutcome::default();
    let budget = opts.budget.max(1);
    let max_len = tx_max_frame_len(opts.hdr_len);
    let mut done = 0usize;
    let mut used = UsedBatch::new(queue, mem);

    if queue.disable_notification(mem).is_err() {
        out.broken = true;
    }
    // Set when the guest's avail index said "more" after kicks were re-enabled: the next pass
    // must then pop something, or the ring entry is unreadable and we would spin.
    let mut recheck = false;
    // Heads popped with one read of the avail index (the guest rewrites it all the time: one
    // cache-line transfer per batch instead of one per frame).
    let ring = Ring::new(queue, mem);
    let mut heads = [0u16; POP_BATCH];
    'batch: while !out.broken {
        let mut popped = 0usize;
        while done < budget {
            let want = (budget - done).min(POP_BATCH);
            let n = match ring.pop_batch(queue, &mut heads, want) {
                Pop::Chain(n) => n,
                Pop::Empty => 0,
                Pop::NotReady => break 'batch,
                Pop::Broken => {
                    out.broken = true;
                    break 'batch;
                }
            };
            if n == 0 {
                if recheck && popped == 0 {
                    out.broken = true;
                    break 'batch;
                }
                break;
            }
            for (k, &head) in heads[..n].iter().enumerate() {
                // Chains `k..n` go back to the avail ring when the batch stops at `k`.
                let put_back = |queue: &mut Queue| rewind_avail(queue, n - k);
                done += 1;
                popped += 1;
                if head >= queue.size() {
                    QueueStats::inc(&stats.tx_drop_bad_chain);
                    continue;
                }
                iov.clear();
                match gather_tx(ring.chain(head), mem, iov, opts.hdr_len, max_len) {
                    Err(TxDrop::BadChain) => QueueStats::inc(&stats.tx_drop_bad_chain),
                    Err(TxDrop::TooShort) => QueueStats::inc(&stats.tx_drop_too_short),
                    Err(TxDrop::TooBig) => QueueStats::inc(&stats.tx_drop_too_big),
                    Ok(len) => match host.send_frame(iov) {
                        Ok(_) => {
                            out.frames += 1;
                            sent(iov, len, opts, stats, watch.as_deref_mut());
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            put_back(queue);
                            QueueStats::inc(&stats.tx_eagain);
                            out.blocked = true;
                            break 'batch;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                            put_back(queue);
                            out.more = true;
                            break 'batch;
                        }
                        Err(e) => {
                            QueueStats::inc(&stats.tx_drop_host_error);
                            out.host_error = Some(errno_of(&e));
                        }
                    },
                }
                if used.add(queue, head, 0).is_err() {
                    out.broken = true;
                    break 'batch;
                }
            }
        }
        if done >= budget {
            out.more = true;
            break;
        }
        // Ring drained: ask for kicks again, and go on if the guest slipped chains in meanwhile.
        match queue.enable_notification(mem) {
            Ok(false) => break,
            Ok(true) => {
                recheck = true;
                if queue.disable_notification(mem).is_err() {
                    out.broken = true;
                }
            }
            Err(_) => out.broken = true,
        }
    }
    iov.clear();

    // One `used.idx` update and one notification decision for the whole batch.
    if used.publish(queue, mem).is_err() {
        out.broken = true;
    }
    if out.broken {
        QueueStats::inc(&stats.queue_broken);
    }
    out.notify = used.needs_notification(queue, mem);
    out
}

/// Counts one frame the host queue took (`len` bytes, header included), and shows it to the
/// watch.
fn sent(
    iov: &IoVecBuf<'_>,
    len: usize,
    opts: &TxOptions,
    stats: &QueueStats,
    watch: Option<&mut TxWatch>,
) {
    QueueStats::inc(&stats.tx_frames);
    QueueStats::add(&stats.tx_bytes, (len - opts.hdr_len) as u64);
    count_gso(iov, stats);
    if let Some(w) = watch {
        w.frame(iov, opts.hdr_len, len, stats);
    }
}

/// Counts a sent frame whose vnet header carries a GSO type. The byte is only counted, never
/// acted on (the kernel reads and checks the header itself), so a guest changing it meanwhile
/// can only skew its own counter.
fn count_gso(iov: &IoVecBuf<'_>, stats: &QueueStats) {
    let mut gso_type = [0u8; 1];
    if iov.read_at(GSO_TYPE_OFFSET, &mut gso_type) == 1
        && gso_type[0] & !VIRTIO_NET_HDR_GSO_ECN != VIRTIO_NET_HDR_GSO_NONE
    {
        QueueStats::inc(&stats.tx_gso_frames);
    }
}

/// Walks one TX chain into `iov`. Returns the frame length (header included).
fn gather_tx<'m, M: GuestMemory>(
    chain: Chain<'m, M>,
    mem: &'m M,
    iov: &mut IoVecBuf<'m>,
    hdr_len: usize,
    max_len: usize,
) -> Result<usize, TxDrop> {
    let mut total = 0usize;
    let mut ndesc = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        // `desc` is our private copy of the guest descriptor (read once by `ring`): each field
        // is used from it, never fetched again.
        ndesc += 1;
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            return Err(TxDrop::BadChain);
        }
        let len = desc.len() as usize;
        total += len;
        if total > max_len {
            return Err(TxDrop::TooBig);
        }
        if len == 0 {
            continue;
        }
        // Fast path: the whole descriptor inside one region (the common case) is one slice.
        if let Some(s) = mem
            .physical_memory()
            .and_then(|p| super::one_region_slice(p, desc.addr(), len))
        {
            if iov.len() == MAX_SEGMENTS {
                return Err(TxDrop::BadChain);
            }
            iov.push(&s);
            continue;
        }
        let slices = mem
            .get_slices(desc.addr(), len, Permissions::Read)
            .map_err(|_| TxDrop::BadChain)?;
        for s in slices {
            let s = s.map_err(|_| TxDrop::BadChain)?;
            if iov.len() == MAX_SEGMENTS {
                return Err(TxDrop::BadChain);
            }
            iov.push(&s);
        }
    }
    // The iterator ends early, without an error, on a loop, an out-of-range `next` or a bad
    // indirect table: the last descriptor then still claims a successor.
    if ndesc == 0 || last_has_next {
        return Err(TxDrop::BadChain);
    }
    if total < hdr_len {
        return Err(TxDrop::TooShort);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::stats::StatsSnapshot;
    use crate::datapath::vnet::{MAX_GSO_FRAME_LEN, VNET_HDR_LEN_LEGACY, VNET_HDR_LEN_V1};
    use crate::testkit::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
    use vm_memory::GuestMemoryMmap;

    const HDR: usize = VNET_HDR_LEN_V1;

    struct Fx {
        host: FakeHostQueue,
        stats: QueueStats,
        scratch: TxScratch,
    }

    impl Fx {
        fn new() -> Self {
            Fx {
                host: FakeHostQueue::new(),
                stats: QueueStats::default(),
                scratch: TxScratch::new(),
            }
        }

        fn run(&mut self, q: &mut Queue, mem: &GuestMemoryMmap, budget: usize) -> TxOutcome {
            self.run_hdr(q, mem, HDR, budget)
        }

        fn run_hdr(
            &mut self,
            q: &mut Queue,
            mem: &GuestMemoryMmap,
            hdr_len: usize,
            budget: usize,
        ) -> TxOutcome {
            let opts = TxOptions { hdr_len, budget };
            process_tx(q, mem, &self.host, &self.stats, &mut self.scratch, &opts)
        }

        fn snap(&self) -> StatsSnapshot {
            self.stats.snapshot()
        }
    }

    /// Only the listed counters are non-zero.
    fn expect_counters(s: StatsSnapshot, want: &[(&str, u64)]) {
        for (name, v) in s.fields() {
            let w = want.iter().find(|(n, _)| *n == name).map_or(0, |(_, w)| *w);
            assert_eq!(v, w, "counter {name}");
        }
    }

    /// A frame written into guest memory as one descriptor per `(addr, len)` piece.
    fn put_frame(
        mem: &GuestMemoryMmap,
        frame: &[u8],
        pieces: &[(u64, u32)],
    ) -> Vec<(u64, u32, u16)> {
        let mut off = 0usize;
        let mut descs = Vec::new();
        for &(addr, len) in pieces {
            let end = (off + len as usize).min(frame.len());
            write_guest(mem, addr, &frame[off..end]);
            off = end;
            descs.push((addr, len, 0));
        }
        assert_eq!(off, frame.len(), "pieces must cover the frame");
        descs
    }

    #[test]
    fn tx_single_descriptor_chain_reaches_host() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let frame = pattern_frame(HDR, 60, 1);
        let d = put_frame(&mem, &frame, &[(DATA_BASE, frame.len() as u32)]);
        let head = gq.add_desc_chain(&d);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 1);
        assert!(out.notify && !out.blocked && !out.more && !out.broken);
        assert_eq!(fx.host.take_all_frames(), vec![frame]);
        assert_eq!(gq.collect_used(), vec![(head, 0)]);
        expect_counters(fx.snap(), &[("tx_frames", 1), ("tx_bytes", 60)]);
        assert_eq!(fx.host.send_calls(), 1);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_multi_descriptor_chain_arrives_byte_for_byte() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let frame = pattern_frame(HDR, 3000, 7);
        // Header alone, then odd-sized scattered pieces.
        let d = put_frame(
            &mem,
            &frame,
            &[
                (DATA_BASE, HDR as u32),
                (DATA_BASE + 0x8000, 1),
                (DATA_BASE + 0x2000, 1499),
                (DATA_BASE + 0x5000, 1500),
            ],
        );
        gq.add_desc_chain(&d);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 1);
        assert_eq!(fx.host.send_calls(), 1, "one writev per frame");
        assert_eq!(fx.host.take_all_frames(), vec![frame]);
        expect_counters(fx.snap(), &[("tx_frames", 1), ("tx_bytes", 3000)]);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_descriptor_spanning_two_regions_is_split_and_sent() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let frame = pattern_frame(HDR, 1000, 3);
        let start = REGION_SPLIT - 100;
        let d = put_frame(&mem, &frame, &[(start, frame.len() as u32)]);
        gq.add_desc_chain(&d);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 1);
        assert_eq!(fx.host.take_all_frames(), vec![frame]);
        expect_counters(fx.snap(), &[("tx_frames", 1), ("tx_bytes", 1000)]);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_chain_with_writable_descriptor_is_dropped() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let h1 = gq.add_desc_chain(&[(DATA_BASE, 100, 0), (DATA_BASE + 100, 100, WRITE)]);
        let h2 = gq.add_desc_chain(&[(DATA_BASE + 0x1000, 100, WRITE)]);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 0);
        assert!(out.notify && !out.broken);
        assert_eq!(fx.host.send_calls(), 0);
        assert_eq!(gq.collect_used(), vec![(h1, 0), (h2, 0)]);
        expect_counters(fx.snap(), &[("tx_drop_bad_chain", 2)]);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_descriptor_outside_guest_memory_is_dropped() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        // Entirely in the hole; straddling the end of RAM into the hole; far beyond RAM;
        // and an address whose end overflows u64.
        gq.add_desc_chain(&[(DATA_BASE, 12, 0), (HOLE_START + 0x100, 100, 0)]);
        gq.add_desc_chain(&[(HOLE_START - 50, 100, 0)]);
        gq.add_desc_chain(&[(0x1_0000_0000_0000, 100, 0)]);
        gq.add_desc_chain(&[(u64::MAX - 10, 100, 0)]);
        // A good one afterwards still goes out.
        let frame = pattern_frame(HDR, 50, 9);
        let d = put_frame(&mem, &frame, &[(DATA_BASE + 0x3000, frame.len() as u32)]);
        gq.add_desc_chain(&d);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 1);
        assert_eq!(fx.host.take_all_frames(), vec![frame]);
        expect_counters(
            fx.snap(),
            &[("tx_drop_bad_chain", 4), ("tx_frames", 1), ("tx_bytes", 50)],
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_zero_length_descriptors_are_skipped() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let frame = pattern_frame(HDR, 40, 5);
        write_guest(&mem, DATA_BASE, &frame[..20]);
        write_guest(&mem, DATA_BASE + 0x100, &frame[20..]);
        // A zero-length descriptor is never dereferenced, even at an unmapped address.
        gq.add_desc_chain(&[
            (DATA_BASE, 20, 0),
            (HOLE_START, 0, 0),
            (DATA_BASE + 0x100, 32, 0),
            (DATA_BASE + 0x200, 0, 0),
        ]);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 1);
        assert_eq!(fx.host.take_all_frames(), vec![frame]);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_chain_of_only_zero_length_descriptors_is_too_short() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        gq.add_desc_chain(&[(DATA_BASE, 0, 0)]);
        gq.add_desc_chain(&[(DATA_BASE, 0, 0), (DATA_BASE, 0, 0)]);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 0);
        assert_eq!(fx.host.send_calls(), 0);
        expect_counters(fx.snap(), &[("tx_drop_too_short", 2)]);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_frame_shorter_than_vnet_header_is_dropped() {
        for hdr in [VNET_HDR_LEN_LEGACY, VNET_HDR_LEN_V1] {
            let mem = test_memory();
            let mut gq = GuestQueue::new(&mem, 16);
            gq.add_desc_chain(&[(DATA_BASE, hdr as u32 - 1, 0)]);
            gq.add_desc_chain(&[(DATA_BASE, 4, 0), (DATA_BASE + 8, hdr as u32 - 5, 0)]);
            // Exactly a header (an empty frame) is the kernel's business, not a guest fault here.
            gq.add_desc_chain(&[(DATA_BASE, hdr as u32, 0)]);
            let mut q = gq.create_queue();
            let mut fx = Fx::new();

            let out = fx.run_hdr(&mut q, &mem, hdr, 64);

            assert_eq!(out.frames, 1, "hdr {hdr}");
            expect_counters(
                fx.snap(),
                &[("tx_drop_too_short", 2), ("tx_frames", 1), ("tx_bytes", 0)],
            );
            gq.assert_popped_returned_once(&q);
        }
    }

    #[test]
    fn tx_frame_larger_than_64k_plus_header_is_dropped() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let max = (HDR + MAX_GSO_FRAME_LEN) as u32;
        // One byte too many, in one descriptor and split across two.
        gq.add_desc_chain(&[(DATA_BASE, max + 1, 0)]);
        gq.add_desc_chain(&[(DATA_BASE, max, 0), (DATA_BASE, 1, 0)]);
        // A huge length must be rejected by the bound before any translation.
        gq.add_desc_chain(&[(DATA_BASE, u32::MAX, 0)]);
        // Exactly the maximum goes through (the socket accepts a 64 KiB datagram).
        let frame = pattern_frame(HDR, MAX_GSO_FRAME_LEN, 2);
        let d = put_frame(&mem, &frame, &[(DATA_BASE + 0x4_0000, max)]);
        gq.add_desc_chain(&d);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 1);
        assert_eq!(fx.host.take_all_frames(), vec![frame]);
        expect_counters(
            fx.snap(),
            &[
                ("tx_drop_too_big", 3),
                ("tx_frames", 1),
                ("tx_bytes", MAX_GSO_FRAME_LEN as u64),
            ],
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_eagain_keeps_chain_and_later_succeeds() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let frames: Vec<_> = (0..3)
            .map(|i| pattern_frame(HDR, 100 + i, i as u8))
            .collect();
        let mut heads = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let d = put_frame(&mem, f, &[(DATA_BASE + 0x1000 * i as u64, f.len() as u32)]);
            heads.push(gq.add_desc_chain(&d));
        }
        let mut q = gq.create_queue();
        let mut fx = Fx::new();
        // The host queue is full when the first frame is written.
        fx.host.fail_next_send(libc::EAGAIN);
        let out = fx.run(&mut q, &mem, 64);
        assert!(out.blocked && !out.more && !out.broken);
        assert_eq!(out.frames, 0);
        assert!(!out.notify, "nothing was used");
        assert_eq!(q.next_avail(), 0, "the blocked chain stays in the ring");
        assert!(gq.collect_used().is_empty());
        expect_counters(fx.snap(), &[("tx_eagain", 1)]);

        // EPOLLOUT: everything goes, in order, once.
        let out = fx.run(&mut q, &mem, 64);
        assert_eq!(out.frames, 3);
        assert!(!out.blocked);
        assert_eq!(fx.host.take_all_frames(), frames);
        assert_eq!(
            gq.collect_used(),
            heads.iter().map(|&h| (h, 0)).collect::<Vec<_>>()
        );
        expect_counters(
            fx.snap(),
            &[("tx_eagain", 1), ("tx_frames", 3), ("tx_bytes", 303)],
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_eagain_mid_batch_keeps_the_rest() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let frames: Vec<_> = (0..3).map(|i| pattern_frame(HDR, 64, 10 + i)).collect();
        for (i, f) in frames.iter().enumerate() {
            let d = put_frame(&mem, f, &[(DATA_BASE + 0x1000 * i as u64, f.len() as u32)]);
            gq.add_desc_chain(&d);
        }
        let mut q = gq.create_queue();
        let mut fx = Fx::new();
        fx.host.fail_next_send(libc::ENOBUFS); // frame 0: dropped
        fx.host.fail_next_send(libc::EWOULDBLOCK); // frame 1: kept

        let out = fx.run(&mut q, &mem, 64);
        assert!(out.blocked);
        assert_eq!(out.host_error, Some(libc::ENOBUFS));
        assert!(out.notify, "frame 0 was returned");
        assert_eq!(q.next_avail(), 1);

        let out = fx.run(&mut q, &mem, 64);
        assert_eq!(out.frames, 2);
        assert_eq!(fx.host.take_all_frames(), frames[1..].to_vec());
        expect_counters(
            fx.snap(),
            &[
                ("tx_drop_host_error", 1),
                ("tx_eagain", 1),
                ("tx_frames", 2),
                ("tx_bytes", 128),
            ],
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_host_eio_and_einval_drop_and_queue_keeps_going() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let frames: Vec<_> = (0..4).map(|i| pattern_frame(HDR, 80, 20 + i)).collect();
        for (i, f) in frames.iter().enumerate() {
            let d = put_frame(&mem, f, &[(DATA_BASE + 0x1000 * i as u64, f.len() as u32)]);
            gq.add_desc_chain(&d);
        }
        let mut q = gq.create_queue();
        let mut fx = Fx::new();
        fx.host.fail_next_send(libc::EIO);
        fx.host.fail_next_send(libc::EINVAL);

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 2);
        assert!(!out.blocked && !out.more && !out.broken);
        assert_eq!(out.host_error, Some(libc::EINVAL));
        assert_eq!(fx.host.take_all_frames(), frames[2..].to_vec());
        assert_eq!(gq.collect_used().len(), 4);
        expect_counters(
            fx.snap(),
            &[
                ("tx_drop_host_error", 2),
                ("tx_frames", 2),
                ("tx_bytes", 160),
            ],
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_interrupted_send_keeps_chain() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let frame = pattern_frame(HDR, 30, 4);
        let d = put_frame(&mem, &frame, &[(DATA_BASE, frame.len() as u32)]);
        gq.add_desc_chain(&d);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();
        fx.host.fail_next_send(libc::EINTR);

        let out = fx.run(&mut q, &mem, 64);
        assert!(out.more && !out.blocked);
        assert_eq!(q.next_avail(), 0);
        let out = fx.run(&mut q, &mem, 64);
        assert_eq!(out.frames, 1);
        assert_eq!(fx.host.take_all_frames(), vec![frame]);
        expect_counters(fx.snap(), &[("tx_frames", 1), ("tx_bytes", 30)]);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_event_idx_suppresses_notification_until_used_event_is_crossed() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let mut q = gq.create_queue_event_idx();
        let mut fx = Fx::new();
        let frame = pattern_frame(HDR, 20, 0);
        write_guest(&mem, DATA_BASE, &frame);
        let chain = [(DATA_BASE, frame.len() as u32, 0)];

        // The guest wants an interrupt only after used.idx passes 2.
        gq.set_used_event(2);
        gq.add_desc_chain(&chain);
        let out = fx.run(&mut q, &mem, 64);
        assert_eq!((out.frames, out.notify), (1, false), "used.idx 1: not yet");
        gq.add_desc_chain(&chain);
        let out = fx.run(&mut q, &mem, 64);
        assert_eq!((out.frames, out.notify), (1, false), "used.idx 2: not yet");
        gq.add_desc_chain(&chain);
        let out = fx.run(&mut q, &mem, 64);
        assert_eq!((out.frames, out.notify), (1, true), "used.idx 3 crosses 2");
        // A batch that jumps over used_event notifies once.
        gq.set_used_event(4);
        for _ in 0..3 {
            gq.add_desc_chain(&chain);
        }
        let out = fx.run(&mut q, &mem, 64);
        assert_eq!((out.frames, out.notify), (3, true));
        // When draining ends, avail_event asks for a kick at the next chain.
        assert_eq!(gq.avail_event(), q.next_avail());
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_without_event_idx_disables_kicks_while_draining_and_reenables_when_empty() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();
        let frame = pattern_frame(HDR, 20, 0);
        write_guest(&mem, DATA_BASE, &frame);
        for _ in 0..3 {
            gq.add_desc_chain(&[(DATA_BASE, frame.len() as u32, 0)]);
        }
        let out = fx.run(&mut q, &mem, 2);
        assert!(out.more && out.notify);
        assert_eq!(gq.used_flags() & 1, 1, "NO_NOTIFY while work remains");
        let out = fx.run(&mut q, &mem, 2);
        assert!(!out.more && out.notify);
        assert_eq!(gq.used_flags() & 1, 0, "kicks re-enabled once drained");
    }

    #[test]
    fn tx_budget_is_respected() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 32);
        let frame = pattern_frame(HDR, 20, 0);
        write_guest(&mem, DATA_BASE, &frame);
        for i in 0..10 {
            // Mix good and bad chains: both count toward the budget.
            let flags = if i % 3 == 0 { WRITE } else { 0 };
            gq.add_desc_chain(&[(DATA_BASE, frame.len() as u32, flags)]);
        }
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 4);
        assert!(out.more);
        assert_eq!(q.next_avail(), 4);
        assert_eq!(gq.collect_used().len(), 4);
        let out = fx.run(&mut q, &mem, 4);
        assert!(out.more);
        let out = fx.run(&mut q, &mem, 4);
        assert!(!out.more);
        assert_eq!(q.next_avail(), 10);
        expect_counters(
            fx.snap(),
            &[
                ("tx_drop_bad_chain", 4),
                ("tx_frames", 6),
                ("tx_bytes", 120),
            ],
        );
        // Budget 0 still makes progress.
        gq.add_desc_chain(&[(DATA_BASE, frame.len() as u32, 0)]);
        let out = fx.run(&mut q, &mem, 0);
        assert_eq!(out.frames, 1);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_broken_avail_index_marks_queue_broken() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let frame = pattern_frame(HDR, 20, 0);
        write_guest(&mem, DATA_BASE, &frame);
        gq.add_desc_chain(&[(DATA_BASE, frame.len() as u32, 0)]);
        let mut q = gq.create_queue();
        gq.set_avail_idx(17); // 17 chains "available" on a 16-entry ring

        let mut fx = Fx::new();
        let out = fx.run(&mut q, &mem, 64);

        assert!(out.broken);
        assert_eq!(out.frames, 0);
        assert!(!out.notify);
        assert_eq!(q.next_avail(), 0);
        assert_eq!(gq.used_idx(), 0, "used ring untouched");
        assert_eq!(fx.host.send_calls(), 0);
        expect_counters(fx.snap(), &[("queue_broken", 1)]);
    }

    #[test]
    fn tx_unreadable_avail_entry_marks_broken_instead_of_spinning() {
        let (mem, mut q) = queue_with_unreadable_avail_entry();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert!(out.broken);
        assert_eq!(q.next_avail(), 200);
        expect_counters(fx.snap(), &[("queue_broken", 1)]);
    }

    #[test]
    fn tx_used_ring_outside_memory_marks_broken() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        gq.add_desc_chain(&[(DATA_BASE, 100, 0)]);
        let q0 = gq.create_queue();
        let mut q = raw_queue(16, q0.desc_table(), q0.avail_ring(), HOLE_START);
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert!(out.broken);
        assert_eq!(fx.host.send_calls(), 0);
        expect_counters(fx.snap(), &[("queue_broken", 1)]);
    }

    #[test]
    fn tx_descriptor_loop_is_dropped() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let first = gq.alloc_descs(2);
        gq.write_desc(first, DATA_BASE, 100, NEXT, first + 1);
        gq.write_desc(first + 1, DATA_BASE, 100, NEXT, first); // back to the head
        gq.publish(first);
        // Self-loop.
        let me = gq.alloc_descs(1);
        gq.write_desc(me, DATA_BASE, 1, NEXT, me);
        gq.publish(me);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 0);
        assert_eq!(fx.host.send_calls(), 0);
        expect_counters(fx.snap(), &[("tx_drop_bad_chain", 2)]);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_next_index_out_of_range_is_dropped() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let d = gq.alloc_descs(1);
        gq.write_desc(d, DATA_BASE, 100, NEXT, 16);
        gq.publish(d);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        fx.run(&mut q, &mem, 64);

        expect_counters(fx.snap(), &[("tx_drop_bad_chain", 1)]);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_head_index_out_of_range_is_skipped_without_used_entry() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let frame = pattern_frame(HDR, 20, 0);
        write_guest(&mem, DATA_BASE, &frame);
        // avail entry with head 40 on a 16-entry ring, then a good chain.
        let mut q = gq.create_queue();
        gq.publish(40);
        let good = gq.add_desc_chain(&[(DATA_BASE, frame.len() as u32, 0)]);
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 1);
        assert!(!out.broken);
        assert_eq!(gq.collect_used(), vec![(good, 0)]);
        expect_counters(
            fx.snap(),
            &[("tx_drop_bad_chain", 1), ("tx_frames", 1), ("tx_bytes", 20)],
        );
    }

    #[test]
    fn tx_indirect_chain_is_sent() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let frame = pattern_frame(HDR, 200, 8);
        write_guest(&mem, DATA_BASE, &frame[..100]);
        write_guest(&mem, DATA_BASE + 0x1000, &frame[100..]);
        let table = DATA_BASE + 0x10000;
        gq.write_indirect_table(table, &[(DATA_BASE, 100, 0), (DATA_BASE + 0x1000, 112, 0)]);
        gq.add_desc_chain(&[(table, 32, VRING_DESC_F_INDIRECT as u16)]);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 1);
        assert_eq!(fx.host.take_all_frames(), vec![frame]);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_bad_indirect_table_is_dropped() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let table = DATA_BASE + 0x10000;
        // Length not a multiple of 16; table in the hole; nested indirect.
        gq.add_desc_chain(&[(table, 24, VRING_DESC_F_INDIRECT as u16)]);
        gq.add_desc_chain(&[(HOLE_START, 32, VRING_DESC_F_INDIRECT as u16)]);
        gq.write_indirect_table(
            table,
            &[
                (DATA_BASE, 100, 0),
                (table, 32, VRING_DESC_F_INDIRECT as u16),
            ],
        );
        gq.add_desc_chain(&[(table, 32, VRING_DESC_F_INDIRECT as u16)]);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 0);
        expect_counters(fx.snap(), &[("tx_drop_bad_chain", 3)]);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_chain_needing_more_than_1024_iovecs_is_dropped() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let table = DATA_BASE + 0x20000;
        let many: Vec<_> = (0..1025).map(|i| (DATA_BASE + 2 * i, 1u32, 0u16)).collect();
        gq.write_indirect_table(table, &many);
        gq.add_desc_chain(&[(table, 16 * 1025, VRING_DESC_F_INDIRECT as u16)]);
        // 1024 exactly is fine.
        let table2 = DATA_BASE + 0x30000;
        gq.write_indirect_table(table2, &many[..1024]);
        gq.add_desc_chain(&[(table2, 16 * 1024, VRING_DESC_F_INDIRECT as u16)]);
        let mut q = gq.create_queue();
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out.frames, 1);
        assert_eq!(fx.host.take_all_frames()[0].len(), 1024);
        expect_counters(
            fx.snap(),
            &[
                ("tx_drop_bad_chain", 1),
                ("tx_frames", 1),
                ("tx_bytes", 1012),
            ],
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn tx_queue_not_ready_does_nothing() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        gq.add_desc_chain(&[(DATA_BASE, 100, 0)]);
        let mut q = gq.create_queue();
        q.set_ready(false);
        let mut fx = Fx::new();

        let out = fx.run(&mut q, &mem, 64);

        assert_eq!(out, TxOutcome::default());
        assert_eq!(q.next_avail(), 0);
        expect_counters(fx.snap(), &[]);
    }

    #[test]
    fn tx_each_head_returned_exactly_once_across_mixed_traffic() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 64);
        let mut q = gq.create_queue_event_idx();
        let mut fx = Fx::new();
        let frame = pattern_frame(HDR, 100, 1);
        write_guest(&mem, DATA_BASE, &frame);
        let mut sent = 0;
        for round in 0..40u32 {
            // Two chains per round: one of several classes, then a good one.
            let class = round % 6;
            match class {
                0 => gq.add_desc_chain(&[(DATA_BASE, 112, WRITE)]),
                1 => gq.add_desc_chain(&[(HOLE_START, 112, 0)]),
                2 => gq.add_desc_chain(&[(DATA_BASE, 5, 0)]),
                _ => gq.add_desc_chain(&[(DATA_BASE, 112, 0)]),
            };
            gq.add_desc_chain(&[(DATA_BASE, 56, 0), (DATA_BASE + 56, 56, 0)]);
            match round % 4 {
                0 => fx.host.fail_next_send(libc::EAGAIN),
                1 => fx.host.fail_next_send(libc::EIO),
                _ => {}
            }
            loop {
                let out = fx.run(&mut q, &mem, 3);
                assert!(!out.broken);
                if !out.more && !out.blocked {
                    break;
                }
            }
            sent += fx.host.take_all_frames().len();
            gq.assert_popped_returned_once(&q);
            assert_eq!(q.next_avail(), gq.avail_idx());
        }
        let s = fx.snap();
        assert_eq!(s.tx_frames as usize, sent);
        assert_eq!(
            s.tx_frames + s.tx_drop_bad_chain + s.tx_drop_too_short + s.tx_drop_host_error,
            80
        );
        assert_eq!(s.tx_eagain, 10);
        assert_eq!(s.tx_drop_host_error, 10);
    }

    /// Frames with gso_type TCPV4, TCPV6|ECN, NONE and NONE|ECN: two of four ask for
    /// segmentation. Returns the counters after sending them through `fx`.
    fn send_gso_mix(fx: &mut Fx) -> StatsSnapshot {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let mut q = gq.create_queue();
        for (i, gso_type) in [1u8, 4 | 0x80, 0, 0x80].into_iter().enumerate() {
            let mut frame = pattern_frame(HDR, 100, i as u8);
            frame[GSO_TYPE_OFFSET] = gso_type;
            let addr = DATA_BASE + i as u64 * 0x1000;
            let d = put_frame(
                &mem,
                &frame,
                &[(addr, 5), (addr + 5, frame.len() as u32 - 5)],
            );
            gq.add_desc_chain(&d);
        }
        let out = fx.run(&mut q, &mem, 64);
        assert_eq!(out.frames, 4);
        assert_eq!(fx.host.take_all_frames().len(), 4);
        fx.snap()
    }

    #[test]
    fn tx_gso_frames_counts_only_headers_asking_for_segmentation() {
        let s = send_gso_mix(&mut Fx::new());
        expect_counters(
            s,
            &[("tx_frames", 4), ("tx_bytes", 400), ("tx_gso_frames", 2)],
        );
    }

    /// Sends `frames` (Ethernet frames, a header put before each, split after the destination
    /// MAC's first bytes) through a watch for guest MAC `own`; returns what the sink and the
    /// foreign-MAC callback saw.
    #[allow(clippy::type_complexity)]
    fn watched(
        fx: &mut Fx,
        own: [u8; 6],
        frames: &[Vec<u8>],
    ) -> (Vec<(Vec<u8>, usize)>, Vec<[u8; 6]>) {
        use std::sync::Mutex;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let foreign = Arc::new(Mutex::new(Vec::new()));
        let (s2, f2) = (seen.clone(), foreign.clone());
        fx.scratch.set_watch(Some(TxWatch::new(
            Arc::new(SharedMac::new(own)),
            Box::new(move |f, n| s2.lock().unwrap().push((f.to_vec(), n))),
            Box::new(move |m| f2.lock().unwrap().push(m)),
        )));
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let mut q = gq.create_queue();
        for (i, eth) in frames.iter().enumerate() {
            let mut frame = vec![0u8; HDR];
            frame.extend_from_slice(eth);
            let addr = DATA_BASE + i as u64 * 0x1000;
            let cut = HDR + 3;
            let d = put_frame(
                &mem,
                &frame,
                &[
                    (addr, cut as u32),
                    (addr + 0x800, (frame.len() - cut) as u32),
                ],
            );
            gq.add_desc_chain(&d);
        }
        let out = fx.run(&mut q, &mem, 64);
        assert_eq!(out.frames, frames.len());
        let seen = seen.lock().unwrap().clone();
        let foreign = foreign.lock().unwrap().clone();
        (seen, foreign)
    }

    fn eth(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.resize(len, 0x5a);
        f
    }

    #[test]
    fn tx_watch_gets_a_copy_of_multicast_frames_only() {
        let own = [0x52, 0x54, 0, 0, 0, 1];
        let v4 = eth([0x01, 0x00, 0x5e, 0x01, 0x02, 0x03], own, 60);
        let v6 = eth([0x33, 0x33, 0xff, 0, 0, 2], own, 3000);
        let frames = vec![
            eth([0x52, 0x54, 0, 0, 0, 9], own, 60),
            v4.clone(),
            eth([0xff; 6], own, 60),
            // 01:00:5e with the next bit set is not IPv4 multicast.
            eth([0x01, 0x00, 0x5e, 0x80, 0, 1], own, 60),
            v6.clone(),
        ];
        let mut fx = Fx::new();
        let (seen, foreign) = watched(&mut fx, own, &frames);
        assert_eq!(seen.len(), 2, "only the two IP multicast frames");
        assert_eq!(seen[0], (v4.clone(), 60));
        // A long frame is copied up to COPY_LEN, with its real length.
        assert_eq!(seen[1].0, v6[..mcast::COPY_LEN].to_vec());
        assert_eq!(seen[1].1, 3000);
        assert!(foreign.is_empty());
        assert_eq!(fx.snap().tx_foreign_src_mac, 0);
    }

    #[test]
    fn tx_watch_counts_frames_from_a_mac_other_than_the_guests() {
        let own = [0x52, 0x54, 0, 0, 0, 1];
        let other = [0x02, 0, 0, 0, 0, 7];
        let frames = vec![
            eth([0xff; 6], other, 60),
            eth([0xff; 6], own, 60),
            eth([0xff; 6], other, 60),
            // A multicast source MAC is nonsense, not a MAC change.
            eth([0xff; 6], [0x03, 0, 0, 0, 0, 1], 60),
        ];
        let mut fx = Fx::new();
        let (_, foreign) = watched(&mut fx, own, &frames);
        assert_eq!(foreign, vec![other, other]);
        assert_eq!(fx.snap().tx_foreign_src_mac, 2);
    }

    #[test]
    fn tx_watch_sees_nothing_of_frames_too_short_for_two_macs() {
        let own = [0x52, 0x54, 0, 0, 0, 1];
        let mut fx = Fx::new();
        let (seen, foreign) = watched(&mut fx, own, &[vec![0x33, 0x33, 0, 0, 0]]);
        assert!(seen.is_empty() && foreign.is_empty());
    }
}
