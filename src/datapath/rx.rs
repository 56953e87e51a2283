//! Host → guest: one `readv` per frame, straight into guest buffers.
//!
//! [`process_rx`] reads frames from the host queue into the RX virtqueue's buffers until the host
//! queue is empty, the guest runs out of buffers, an error occurs or the budget is spent.
//!
//! # Chains
//! Popped chains are checked once (virtio-queue reads each descriptor once; the ranges are kept
//! in [`RxScratch`], never re-read from guest memory). A chain is *dead* — returned with used
//! length 0 and counted — when a descriptor is device-readable, a range is not mapped guest
//! memory, the chain is cut short (loop, `next` out of range, bad indirect table) or needs more
//! than [`MAX_SEGMENTS`] iovecs (`rx_drop_bad_chain`), or when it is smaller than the vnet header
//! (`rx_drop_buffer_too_small`: a buffer shorter than the header is never read into). A head
//! index `>= queue size` cannot be put in the used ring: it is counted as `rx_drop_bad_chain`
//! and skipped.
//!
//! # Frames
//! - Without MRG_RXBUF: one chain per frame, whatever its size (the guest may use small frames).
//! - With MRG_RXBUF: chains are gathered until their capacity reaches
//!   [`RxOptions::max_frame_len`] (or [`MAX_SEGMENTS`] iovecs), one `readv` spans all of them, and
//!   the frame takes as many as it fills, in order, each returned with the bytes it got (the last
//!   may be partial). Chains the frame did not reach stay popped, in order, for the next frame
//!   of the same call.
//!
//! With a 12-byte header the backend writes `num_buffers` (the number of chains used; 1 without
//! MRG_RXBUF, as the spec requires: the tap does not write those two bytes). A frame's used
//! entries are contiguous in the used ring; a dead chain met in the middle of a window is
//! returned right after the frame.
//!
//! At the end of the call the chains still held (never used) are given back by moving
//! `next_avail` back over them: chains are popped and consumed in avail order, so the held ones are
//! always the last ones popped and the rewind is exact. They are checked afresh when popped again.
//!
//! # Stopping
//! - Host queue empty (`EAGAIN`): [`RxOutcome::host_empty`]; keep watching the host fd.
//! - Not enough buffers for the next frame (ring empty): guest kicks are re-enabled *before* the
//!   held chains are given back (with EVENT_IDX, `avail_event` must name the guest's current avail
//!   index or its next kick never comes) and, if the guest slipped buffers in meanwhile, gathering
//!   resumes; else [`RxOutcome::no_buffers`]: stop watching the host fd until the guest kicks
//!   (the frame stays in the host queue). If the guest has every descriptor of the ring posted and
//!   they still do not add up to `max_frame_len`, the frame is read into what there is.
//! - A host error other than `EAGAIN`: the chains are given back (not used) and
//!   [`RxOutcome::host_error`] is set. `EFAULT`/`EMSGSIZE` mean the frame did not fit (the kernel
//!   dropped it): `rx_drop_buffer_too_small`, and [`RxOutcome::more`] is set because the queue
//!   is fine. Anything else (`EBADFD`, `EIO`, ...) is `rx_drop_host_error` with `more` unset: the
//!   host queue itself failed; the worker decides (stop reading it, log once).
//! - Budget spent: [`RxOutcome::more`].
//! - A frame shorter than the header from the host is counted `rx_drop_host_error`; one longer
//!   than the buffers but reported as read is counted `rx_drop_buffer_too_small`. Neither uses the
//!   chains, and the call goes on.
//!
//! Guest kicks stay disabled except in the no-buffers case (as vhost-net does): while buffers are
//! posted, the host fd drives RX. `needs_notification` is checked once per call, only when
//! something was put in the used ring.
//!
//! # Broken ring policy
//! As for TX (see `tx`): an avail index more than the queue size ahead, or rings outside guest
//! memory (an announced avail entry unreadable, the used ring unwritable), set [`RxOutcome::broken`] and count `queue_broken`; nothing more is read or used. The
//! queue stays stopped until the frontend resets it; the worker logs it once.

use std::io;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::dirty::DirtyLog;
use super::ring::{rewind_avail, Pop, Ring};
use super::stats::QueueStats;
use super::tx::{errno_of, MAX_SEGMENTS};
use super::used::UsedBatch;
use super::vnet::{
    has, rx_max_frame_len, vnet_hdr_len, NUM_BUFFERS_OFFSET, VIRTIO_NET_F_MRG_RXBUF,
    VNET_HDR_LEN_V1,
};
use super::{HostQueue, IoVecBuf};

/// Per-queue RX parameters, fixed between feature negotiations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxOptions {
    /// vnet header length: 10 or 12.
    pub hdr_len: usize,
    /// `VIRTIO_NET_F_MRG_RXBUF` acked: a frame may span several chains.
    pub mrg_rxbuf: bool,
    /// Largest frame the host may deliver, header included ([`rx_max_frame_len`]).
    pub max_frame_len: usize,
    /// Most host frames read (dropped ones included) plus dead chains returned per call.
    /// 0 is treated as 1.
    pub budget: usize,
}

impl RxOptions {
    /// Options for the guest's acked features and the link MTU.
    pub fn new(acked_features: u64, mtu: usize, budget: usize) -> Self {
        RxOptions {
            hdr_len: vnet_hdr_len(acked_features),
            mrg_rxbuf: has(acked_features, VIRTIO_NET_F_MRG_RXBUF),
            max_frame_len: rx_max_frame_len(acked_features, mtu),
            budget,
        }
    }
}

/// What one [`process_rx`] call did, and what the worker must do next.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxOutcome {
    /// Frames delivered to the guest.
    pub frames: usize,
    /// The used ring changed and the guest asked to be told: signal the call eventfd.
    pub notify: bool,
    /// The guest has too few buffers posted for the next frame: stop watching the host fd until
    /// the guest kicks the RX queue (kicks are enabled). Also set when the queue is not ready.
    pub no_buffers: bool,
    /// The host queue is empty (`EAGAIN`): wait for `EPOLLIN`.
    pub host_empty: bool,
    /// A host read failed with this errno (see the module doc; `more` tells a dropped frame
    /// from a failed queue).
    pub host_error: Option<i32>,
    /// Stopped early (budget spent, `EINTR`, or a frame dropped for size): call again soon.
    pub more: bool,
    /// The guest broke the ring: stop the queue until the frontend resets it (log once).
    pub broken: bool,
}

/// Why a popped chain cannot take a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dead {
    /// Malformed: returned with length 0, `rx_drop_bad_chain`.
    BadChain,
    /// Smaller than the vnet header: returned with length 0, `rx_drop_buffer_too_small`.
    TooSmall,
    /// Head index out of range: cannot be returned at all, `rx_drop_bad_chain`.
    BadHead,
}

/// One popped chain, in avail order. Its descriptor ranges are `segs[seg_start..seg_end]`.
#[derive(Debug, Clone, Copy)]
struct Held {
    head: u16,
    seg_start: usize,
    seg_end: usize,
    capacity: usize,
    slices: usize,
    descs: usize,
    dead: Option<Dead>,
}

/// Reusable RX buffers (one per queue pair): no allocation per frame in steady state.
#[derive(Debug, Default)]
pub struct RxScratch {
    iov: IoVecBuf<'static>,
    held: Vec<Held>,
    segs: Vec<(u64, u32)>,
}

impl RxScratch {
    /// Scratch with room for a 64 KiB frame over small buffers.
    pub fn new() -> Self {
        RxScratch {
            iov: IoVecBuf::with_capacity(64),
            held: Vec::with_capacity(64),
            segs: Vec::with_capacity(64),
        }
    }
}

/// Moves host frames into guest RX buffers. See the module doc for the contract.
pub fn process_rx<M: GuestMemory, H: HostQueue>(
    queue: &mut Queue,
    mem: &M,
    host: &H,
    stats: &QueueStats,
    scratch: &mut RxScratch,
    opts: &RxOptions,
    log: Option<DirtyLog<'_>>,
) -> RxOutcome {
    scratch.held.clear();
    scratch.segs.clear();
    let used = UsedBatch::new(queue, mem);
    let ring = Ring::new(queue, mem);
    let mut rx = Rx {
        queue,
        mem,
        host,
        stats,
        opts,
        log,
        budget: opts.budget.max(1),
        iov: std::mem::take(&mut scratch.iov).reuse(),
        iov_valid: true,
        held: &mut scratch.held,
        segs: &mut scratch.segs,
        front: 0,
        win_good: 0,
        win_cap: 0,
        win_slices: 0,
        win_descs: 0,
        work: 0,
        used,
        recheck: false,
        out: RxOutcome::default(),
        ring,
        ahead: [0; POP_AHEAD],
        ahead_start: 0,
        ahead_end: 0,
    };
    rx.run();
    let (out, mut iov) = rx.finish();
    iov.clear();
    scratch.iov = iov.reuse();
    out
}

enum Gather {
    /// The window can take the next frame.
    Ready,
    /// The ring ran out before the window could.
    RingEmpty,
    /// Stop the call (`out` says why).
    Stop,
}

/// One call's state. The *window* is `held[front..]`: popped chains not yet used or returned;
/// `held[front]` is never dead. `iov` covers the window's live chains (capped at
/// [`MAX_SEGMENTS`]) when `iov_valid`.
struct Rx<'a, 'm, M: GuestMemory, H> {
    queue: &'a mut Queue,
    mem: &'m M,
    host: &'a H,
    stats: &'a QueueStats,
    opts: &'a RxOptions,
    /// Set while the frontend migrates the guest: every byte written is logged.
    log: Option<DirtyLog<'a>>,
    budget: usize,
    iov: IoVecBuf<'m>,
    iov_valid: bool,
    held: &'a mut Vec<Held>,
    segs: &'a mut Vec<(u64, u32)>,
    front: usize,
    /// Live chains in the window, their bytes, their iovecs.
    win_good: usize,
    win_cap: usize,
    win_slices: usize,
    /// Descriptors held in the window, dead chains included.
    win_descs: usize,
    work: usize,
    used: UsedBatch<'m, M>,
    /// Kicks were re-enabled and the guest's index said "more": the next gather must pop.
    recheck: bool,
    out: RxOutcome,
    /// The avail ring and descriptor table, found once for the call.
    ring: Ring<'m, M>,
    /// Heads popped ahead of the window with one read of the avail index
    /// (`ahead[ahead_start..ahead_end]`), taken in avail order by [`Rx::next_chain`].
    ahead: [u16; POP_AHEAD],
    ahead_start: usize,
    ahead_end: usize,
}

/// Most chains popped per read of the avail index.
const POP_AHEAD: usize = super::BATCH;

impl<'m, M: GuestMemory, H: HostQueue> Rx<'_, 'm, M, H> {
    fn run(&mut self) {
        if self.queue.disable_notification(self.mem).is_err() {
            self.out.broken = true;
        }
        while !self.out.broken {
            if self.work >= self.budget {
                self.out.more = true;
                break;
            }
            match self.gather() {
                Gather::Ready => {}
                Gather::Stop => break,
                Gather::RingEmpty if self.recheck => {
                    // The avail index announced chains that cannot be read: do not spin.
                    self.out.broken = true;
                    break;
                }
                Gather::RingEmpty => {
                    // Ask for a kick while `next_avail` still covers the held chains, so that
                    // with EVENT_IDX `avail_event` is the guest's current avail index.
                    match self.queue.enable_notification(self.mem) {
                        Ok(true) => {
                            self.recheck = true;
                            if self.queue.disable_notification(self.mem).is_err() {
                                self.out.broken = true;
                            }
                            continue;
                        }
                        Ok(false) => {
                            self.out.no_buffers = true;
                            QueueStats::inc(&self.stats.rx_no_buffers);
                        }
                        Err(_) => self.out.broken = true,
                    }
                    break;
                }
            }
            if !self.iov_valid && !self.rebuild_iov() {
                continue;
            }
            self.work += 1;
            match self.host.recv_frame(&self.iov) {
                Ok(n) if n < self.opts.hdr_len => QueueStats::inc(&self.stats.rx_drop_host_error),
                Ok(n) if n > self.iov.total_len() => {
                    QueueStats::inc(&self.stats.rx_drop_buffer_too_small)
                }
                Ok(n) => self.deliver(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.work -= 1;
                    self.out.host_empty = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    self.work -= 1;
                    self.out.more = true;
                    break;
                }
                Err(e) => {
                    let errno = errno_of(&e);
                    if errno == libc::EFAULT || errno == libc::EMSGSIZE {
                        QueueStats::inc(&self.stats.rx_drop_buffer_too_small);
                        self.out.more = true;
                    } else {
                        QueueStats::inc(&self.stats.rx_drop_host_error);
                    }
                    self.out.host_error = Some(errno);
                    break;
                }
            }
        }
    }

    /// Gives the unused chains back, counts, and decides on the notification.
    fn finish(self) -> (RxOutcome, IoVecBuf<'m>) {
        let mut out = self.out;
        // Held chains never used, then the ones popped ahead: the last ones popped, in order.
        let unused = self.held.len() - self.front + (self.ahead_end - self.ahead_start);
        if unused > 0 {
            // `unused` <= queue size <= 32768 (see `gather`).
            rewind_avail(self.queue, unused);
        }
        // One `used.idx` update and one notification decision for the whole batch.
        if self.used.publish(self.queue, self.mem).is_err() {
            out.broken = true;
        }
        if out.broken {
            QueueStats::inc(&self.stats.queue_broken);
        }
        out.notify = self.used.needs_notification(self.queue, self.mem);
        (out, self.iov)
    }

    fn ready(&self) -> bool {
        self.win_good > 0
            && (!self.opts.mrg_rxbuf
                || self.win_cap >= self.opts.max_frame_len
                || self.win_slices >= MAX_SEGMENTS)
    }

    /// Pops chains until the window can take a frame.
    fn gather(&mut self) -> Gather {
        loop {
            if self.ready() {
                return Gather::Ready;
            }
            if self.work >= self.budget {
                self.out.more = true;
                return Gather::Stop;
            }
            // Never hold more chains than the ring has entries: a driver re-publishing heads
            // while we gather cannot grow the window (or the rewind) past the queue size. The
            // window is not empty here (its front is live), so read into what there is.
            if self.held.len() - self.front >= usize::from(self.queue.size()) {
                return Gather::Ready;
            }
            match self.next_chain() {
                Pop::Chain(c) => {
                    self.recheck = false;
                    self.hold(c);
                }
                Pop::Empty => {
                    // The guest cannot post more than the ring holds: use what there is.
                    if self.win_good > 0 && self.win_descs >= usize::from(self.queue.size()) {
                        return Gather::Ready;
                    }
                    return Gather::RingEmpty;
                }
                Pop::NotReady => {
                    self.out.no_buffers = true;
                    return Gather::Stop;
                }
                Pop::Broken => {
                    self.out.broken = true;
                    return Gather::Stop;
                }
            }
            if self.out.broken {
                return Gather::Stop;
            }
        }
    }

    /// The next avail chain: from the chains popped ahead, or from a fresh batch (one read of the
    /// avail index for up to [`POP_AHEAD`] chains, fewer when the window already holds many, so
    /// that everything to give back at the end stays within the queue size).
    fn next_chain(&mut self) -> Pop<u16> {
        if self.ahead_start == self.ahead_end {
            self.ahead_start = 0;
            self.ahead_end = 0;
            let held = self.held.len() - self.front;
            let want = POP_AHEAD.min(usize::from(self.queue.size()).saturating_sub(held));
            match self.ring.pop_batch(self.queue, &mut self.ahead, want) {
                Pop::Chain(n) => self.ahead_end = n,
                Pop::Empty => return Pop::Empty,
                Pop::NotReady => return Pop::NotReady,
                Pop::Broken => return Pop::Broken,
            }
        }
        let head = self.ahead[self.ahead_start];
        self.ahead_start += 1;
        Pop::Chain(head)
    }

    /// Checks a freshly popped chain and appends it to the window (and to `iov` when valid).
    fn hold(&mut self, head: u16) {
        let mem: &'m M = self.mem;
        let seg_start = self.segs.len();
        let iov_mark = self.iov.total_len();
        let mut h = Held {
            head,
            seg_start,
            seg_end: seg_start,
            capacity: 0,
            slices: 0,
            descs: 0,
            dead: None,
        };
        if head >= self.queue.size() {
            h.dead = Some(Dead::BadHead);
        } else {
            let mut last_has_next = false;
            'walk: for desc in self.ring.chain(head) {
                // `desc` is our private copy of the guest descriptor (read once by `ring`).
                h.descs += 1;
                last_has_next = desc.has_next();
                if !desc.is_write_only() {
                    h.dead = Some(Dead::BadChain);
                    break;
                }
                let len = desc.len() as usize;
                if len == 0 {
                    continue;
                }
                // Fast path: the whole descriptor inside one region (the common case).
                if let Some(s) = mem
                    .physical_memory()
                    .and_then(|p| super::one_region_slice(p, desc.addr(), len))
                {
                    h.slices += 1;
                    if h.slices > MAX_SEGMENTS {
                        h.dead = Some(Dead::BadChain);
                        break;
                    }
                    if self.iov_valid && self.iov.len() < MAX_SEGMENTS {
                        self.iov.push(&s);
                    }
                } else {
                    let Ok(slices) = mem.get_slices(desc.addr(), len, Permissions::Write) else {
                        h.dead = Some(Dead::BadChain);
                        break;
                    };
                    for s in slices {
                        let Ok(s) = s else {
                            h.dead = Some(Dead::BadChain);
                            break 'walk;
                        };
                        h.slices += 1;
                        if h.slices > MAX_SEGMENTS {
                            h.dead = Some(Dead::BadChain);
                            break 'walk;
                        }
                        if self.iov_valid && self.iov.len() < MAX_SEGMENTS {
                            self.iov.push(&s);
                        }
                    }
                }
                h.capacity += len;
                self.segs.push((desc.addr().0, desc.len()));
            }
            if h.dead.is_none() && (h.descs == 0 || last_has_next) {
                h.dead = Some(Dead::BadChain);
            }
            if h.dead.is_none() && h.capacity < self.opts.hdr_len {
                h.dead = Some(Dead::TooSmall);
            }
        }
        if h.dead.is_some() {
            self.segs.truncate(seg_start);
            if self.iov_valid {
                self.iov.truncate(iov_mark);
            }
            h.capacity = 0;
            h.slices = 0;
        } else {
            self.win_good += 1;
            self.win_cap += h.capacity;
            self.win_slices += h.slices;
        }
        h.seg_end = self.segs.len();
        self.win_descs += h.descs;
        self.held.push(h);
        self.flush_front();
    }

    /// Rebuilds `iov` over the window from the saved ranges. On a range that no longer
    /// translates (an IOMMU mapping changed), that chain is made dead and false is returned.
    fn rebuild_iov(&mut self) -> bool {
        let mem: &'m M = self.mem;
        self.iov.clear();
        for j in self.front..self.held.len() {
            let h = self.held[j];
            if h.dead.is_some() {
                continue;
            }
            for &(addr, len) in &self.segs[h.seg_start..h.seg_end] {
                let mut ok = false;
                if let Ok(slices) =
                    mem.get_slices(GuestAddress(addr), len as usize, Permissions::Write)
                {
                    ok = true;
                    for s in slices {
                        match s {
                            Ok(s) if self.iov.len() < MAX_SEGMENTS => self.iov.push(&s),
                            Ok(_) => {}
                            Err(_) => {
                                ok = false;
                                break;
                            }
                        }
                    }
                }
                if !ok {
                    self.held[j].dead = Some(Dead::BadChain);
                    self.win_good -= 1;
                    self.win_cap -= h.capacity;
                    self.win_slices -= h.slices;
                    self.iov_valid = false;
                    self.flush_front();
                    return false;
                }
            }
        }
        self.iov_valid = true;
        true
    }

    /// Hands the `n` bytes just read to the window's chains, in order.
    fn deliver(&mut self, n: usize) {
        // Which chains the frame filled: it ends within the window since n <= iov bytes.
        let mut left = n;
        let mut end = self.front;
        let mut nbuf = 0u16;
        while left > 0 {
            let h = &self.held[end];
            if h.dead.is_none() {
                left -= h.capacity.min(left);
                nbuf += 1;
            }
            end += 1;
        }
        if self.opts.hdr_len >= VNET_HDR_LEN_V1 {
            // The first live chain holds at least a header, so this lands in it.
            self.iov.write_at(NUM_BUFFERS_OFFSET, &nbuf.to_le_bytes());
        }
        // The iovecs of the chains the frame used lead the list (dead chains have none); when
        // the list covered the whole window, dropping them leaves the rest of the window ready
        // for the next frame without translating its ranges again.
        let complete = self.win_slices <= MAX_SEGMENTS;
        let consumed: usize = self.held[self.front..end]
            .iter()
            .filter(|h| h.dead.is_none())
            .map(|h| h.slices)
            .sum();
        // The frame's used entries first, contiguous, then the dead chains it passed over.
        let mut left = n;
        for j in self.front..end {
            let h = self.held[j];
            if h.dead.is_some() {
                continue;
            }
            let take = h.capacity.min(left);
            left -= take;
            if let Some(log) = self.log {
                self.log_written(log, &h, take);
            }
            // take <= n, the length of one frame (at most `rx_max_frame_len`), far below
            // u32::MAX; saturating only guards against a length that would wrap.
            let used_len = u32::try_from(take).unwrap_or(u32::MAX);
            if self.used.add(self.queue, h.head, used_len).is_err() {
                self.out.broken = true;
                // The chains before this one are in the used ring already: they must not be
                // given back by the rewind in `finish` (that would let them be popped again).
                self.front = j;
                return;
            }
            self.win_good -= 1;
            self.win_cap -= h.capacity;
            self.win_slices -= h.slices;
            self.win_descs -= h.descs;
        }
        self.out.frames += 1;
        QueueStats::inc(&self.stats.rx_frames);
        QueueStats::add(&self.stats.rx_bytes, (n - self.opts.hdr_len) as u64);
        for j in self.front..end {
            let h = self.held[j];
            if h.dead.is_some() {
                self.return_dead(h);
                if self.out.broken {
                    // The frame's chains are in the used ring: never rewind over them.
                    self.front = end;
                    return;
                }
            }
        }
        self.front = end;
        if complete {
            self.iov.drain_front(consumed);
        } else {
            self.iov_valid = false;
        }
        self.flush_front();
    }

    /// Marks the pages of the first `bytes` bytes of chain `h` (its saved ranges, in order).
    fn log_written(&self, log: DirtyLog<'_>, h: &Held, bytes: usize) {
        let mut left = bytes as u64;
        for &(addr, len) in &self.segs[h.seg_start..h.seg_end] {
            if left == 0 {
                break;
            }
            let n = u64::from(len).min(left);
            log.mark(addr, n);
            left -= n;
        }
    }

    /// Returns the dead chains at the front of the window, keeping `held[front]` live.
    fn flush_front(&mut self) {
        while self.front < self.held.len() && !self.out.broken {
            let h = self.held[self.front];
            if h.dead.is_none() {
                break;
            }
            self.return_dead(h);
            self.front += 1;
        }
        if self.front == self.held.len() {
            self.iov.clear();
            self.iov_valid = true;
        }
    }

    fn return_dead(&mut self, h: Held) {
        self.work += 1;
        self.win_descs -= h.descs;
        match h.dead {
            Some(Dead::TooSmall) => QueueStats::inc(&self.stats.rx_drop_buffer_too_small),
            _ => QueueStats::inc(&self.stats.rx_drop_bad_chain),
        }
        if h.dead == Some(Dead::BadHead) {
            return;
        }
        if self.used.add(self.queue, h.head, 0).is_err() {
            self.out.broken = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::stats::StatsSnapshot;
    use crate::datapath::vnet::{bit, MAX_GSO_FRAME_LEN, VIRTIO_F_VERSION_1, VNET_HDR_LEN_LEGACY};
    use crate::testkit::*;
    use std::collections::HashMap;
    use vm_memory::GuestMemoryMmap;

    const HDR: usize = VNET_HDR_LEN_V1;
    /// MTU-sized frames, no GSO: 12 + 14 + 4 + 1500.
    const SMALL_MAX: usize = 1530;
    /// GSO acked: 12 + 65550.
    const GSO_MAX: usize = HDR + MAX_GSO_FRAME_LEN;

    struct Fx {
        host: FakeHostQueue,
        stats: QueueStats,
        scratch: RxScratch,
        opts: RxOptions,
    }

    impl Fx {
        fn new(mrg_rxbuf: bool, max_frame_len: usize) -> Self {
            Fx {
                host: FakeHostQueue::new(),
                stats: QueueStats::default(),
                scratch: RxScratch::new(),
                opts: RxOptions {
                    hdr_len: HDR,
                    mrg_rxbuf,
                    max_frame_len,
                    budget: 64,
                },
            }
        }

        fn run(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> RxOutcome {
            self.run_with_log(q, mem, None)
        }

        fn run_with_log(
            &mut self,
            q: &mut Queue,
            mem: &GuestMemoryMmap,
            log: Option<DirtyLog<'_>>,
        ) -> RxOutcome {
            process_rx(
                q,
                mem,
                &self.host,
                &self.stats,
                &mut self.scratch,
                &self.opts,
                log,
            )
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

    /// Posts `n` one-descriptor writable chains of `size` bytes, back to back from `base`.
    /// Returns head → buffer address.
    fn post(gq: &mut GuestQueue<'_>, n: usize, size: u32, base: u64) -> HashMap<u16, u64> {
        (0..n)
            .map(|i| {
                let addr = base + i as u64 * u64::from(size);
                (gq.add_desc_chain(&[(addr, size, WRITE)]), addr)
            })
            .collect()
    }

    /// The bytes the guest sees for one frame spread over `used` entries.
    fn frame_in_guest(
        mem: &GuestMemoryMmap,
        bufs: &HashMap<u16, u64>,
        used: &[(u16, u32)],
    ) -> Vec<u8> {
        used.iter()
            .flat_map(|&(h, len)| read_guest(mem, bufs[&h], len as usize))
            .collect()
    }

    /// `frame` with `num_buffers` set as the backend writes it.
    fn with_num_buffers(frame: &[u8], n: u16) -> Vec<u8> {
        let mut f = frame.to_vec();
        f[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&n.to_le_bytes());
        f
    }

    #[test]
    fn rx_without_mrg_one_frame_fills_one_chain_and_sets_num_buffers_to_1() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let bufs = post(&mut gq, 2, 2048, DATA_BASE);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(false, SMALL_MAX);
        let frame = pattern_frame(HDR, 1000, 1);
        fx.host.inject_frame(&frame);

        let out = fx.run(&mut q, &mem);

        assert_eq!(out.frames, 1);
        assert!(out.notify && out.host_empty);
        assert!(!out.no_buffers && !out.more && !out.broken && out.host_error.is_none());
        let used = gq.collect_used();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].1 as usize, frame.len());
        // The spec wants num_buffers = 1 without MRG_RXBUF (the tap leaves those bytes alone).
        assert_eq!(
            frame_in_guest(&mem, &bufs, &used),
            with_num_buffers(&frame, 1)
        );
        assert_eq!(q.next_avail(), 1, "the second chain was given back");
        expect_counters(fx.snap(), &[("rx_frames", 1), ("rx_bytes", 1000)]);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn rx_with_dirty_log_marks_exactly_the_pages_it_wrote() {
        use crate::datapath::dirty::LOG_PAGE_SIZE;
        use std::collections::BTreeSet;
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 64);
        // Chains of 1536 bytes straddle page boundaries; one read-only chain sits in the middle
        // (dead: returned with length 0, never written) and the tail is never reached.
        let mut bufs = post(&mut gq, 3, 1536, DATA_BASE);
        let ro_addr = DATA_BASE + 0x10_0000;
        gq.add_desc_chain(&[(ro_addr, 4096, 0)]);
        bufs.extend(post(&mut gq, 20, 1536, DATA_BASE + 3 * 1536));
        let mut q = gq.create_queue();
        let mut fx = Fx::new(true, SMALL_MAX);
        let frame = pattern_frame(HDR, 1400, 7);
        for _ in 0..4 {
            fx.host.inject_frame(&frame);
        }
        let bits: Vec<std::sync::atomic::AtomicU8> = (0..4096)
            .map(|_| std::sync::atomic::AtomicU8::new(0))
            .collect();
        let log = DirtyLog::new(&bits);

        let out = fx.run_with_log(&mut q, &mem, Some(log));

        assert_eq!(out.frames, 4);
        let used = gq.collect_used();
        let mut want = BTreeSet::new();
        for &(h, len) in &used {
            if len == 0 {
                continue;
            }
            let a = bufs[&h];
            want.extend(a / LOG_PAGE_SIZE..=(a + u64::from(len) - 1) / LOG_PAGE_SIZE);
        }
        assert!(
            used.iter().any(|&(_, l)| l == 0),
            "the read-only chain came back dead"
        );
        let got: BTreeSet<u64> = log.marked_pages().into_iter().collect();
        assert_eq!(got, want, "marked pages = pages of the bytes written");
        assert!(!log.is_marked(ro_addr / LOG_PAGE_SIZE));
    }

    #[test]
    fn rx_legacy_header_leaves_frame_bytes_untouched() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let bufs = post(&mut gq, 2, 2048, DATA_BASE);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(false, SMALL_MAX);
        fx.opts.hdr_len = VNET_HDR_LEN_LEGACY;
        let frame = pattern_frame(VNET_HDR_LEN_LEGACY, 500, 2);
        fx.host.inject_frame(&frame);

        let out = fx.run(&mut q, &mem);

        assert_eq!(out.frames, 1);
        let used = gq.collect_used();
        assert_eq!(frame_in_guest(&mem, &bufs, &used), frame);
        expect_counters(fx.snap(), &[("rx_frames", 1), ("rx_bytes", 500)]);
    }

    #[test]
    fn rx_without_mrg_small_chain_still_takes_a_small_frame() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        // 100-byte buffer although max_frame_len is 64 KiB.
        let bufs = post(&mut gq, 1, 100, DATA_BASE);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(false, GSO_MAX);
        let frame = pattern_frame(HDR, 88, 3);
        fx.host.inject_frame(&frame);

        let out = fx.run(&mut q, &mem);

        assert_eq!(out.frames, 1);
        let used = gq.collect_used();
        assert_eq!(
            frame_in_guest(&mem, &bufs, &used),
            with_num_buffers(&frame, 1)
        );
    }

    #[test]
    fn rx_chain_of_several_descriptors_and_across_regions_receives_intact() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        // Header split over two descriptors (num_buffers straddles them), then a buffer that
        // crosses the boundary between the two memory regions.
        let a = DATA_BASE;
        let b = DATA_BASE + 0x1000;
        let c = REGION_SPLIT - 300;
        let head = gq.add_desc_chain(&[(a, 11, WRITE), (b, 5, WRITE), (c, 2000, WRITE)]);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(false, SMALL_MAX);
        let frame = pattern_frame(HDR, 1500, 4);
        fx.host.inject_frame(&frame);

        let out = fx.run(&mut q, &mem);

        assert_eq!(out.frames, 1);
        assert_eq!(gq.collect_used(), vec![(head, frame.len() as u32)]);
        let mut got = read_guest(&mem, a, 11);
        got.extend(read_guest(&mem, b, 5));
        got.extend(read_guest(&mem, c, frame.len() - 16));
        assert_eq!(got, with_num_buffers(&frame, 1));
    }

    #[test]
    fn rx_mrg_64k_frame_spans_many_small_chains() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 256);
        let bufs = post(&mut gq, 50, 1536, DATA_BASE);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(true, GSO_MAX);
        let frame = pattern_frame(HDR, MAX_GSO_FRAME_LEN, 5);
        fx.host.inject_frame(&frame);

        let out = fx.run(&mut q, &mem);

        assert_eq!(out.frames, 1);
        assert_eq!(fx.host.recv_calls(), 1, "one readv for the whole frame");
        let used = gq.collect_used();
        // 65562 bytes = 42 full chains + 1050 bytes.
        assert_eq!(used.len(), 43);
        assert!(used[..42].iter().all(|&(_, l)| l == 1536));
        assert_eq!(used[42].1, 1050);
        assert_eq!(
            frame_in_guest(&mem, &bufs, &used),
            with_num_buffers(&frame, 43)
        );
        // Used entries follow avail order.
        let order: Vec<u16> = used.iter().map(|&(h, _)| h).collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted);
        // 7 chains left cannot hold another 64 KiB frame: the rest is given back.
        assert!(out.no_buffers && !out.host_empty);
        assert_eq!(q.next_avail(), 43);
        expect_counters(
            fx.snap(),
            &[
                ("rx_frames", 1),
                ("rx_bytes", MAX_GSO_FRAME_LEN as u64),
                ("rx_no_buffers", 1),
            ],
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn rx_mrg_small_frames_use_one_chain_each() {
        for max in [SMALL_MAX, GSO_MAX] {
            let mem = test_memory();
            let mut gq = GuestQueue::new(&mem, 256);
            let bufs = post(&mut gq, 64, 1536, DATA_BASE);
            let mut q = gq.create_queue();
            let mut fx = Fx::new(true, max);
            let frames: Vec<_> = (0..5)
                .map(|i| pattern_frame(HDR, 60 + 100 * i, i as u8))
                .collect();
            for f in &frames {
                fx.host.inject_frame(f);
            }

            let out = fx.run(&mut q, &mem);

            assert_eq!(out.frames, 5, "max {max}");
            assert!(out.host_empty && !out.no_buffers);
            let used = gq.collect_used();
            assert_eq!(used.len(), 5);
            for (f, u) in frames.iter().zip(&used) {
                assert_eq!(u.1 as usize, f.len());
                assert_eq!(
                    frame_in_guest(&mem, &bufs, std::slice::from_ref(u)),
                    with_num_buffers(f, 1)
                );
            }
            assert_eq!(q.next_avail(), 5, "held chains rewound exactly (max {max})");
            gq.assert_popped_returned_once(&q);
            // The rewound chains are used next time, in order.
            fx.host.inject_frame(&frames[0]);
            let out = fx.run(&mut q, &mem);
            assert_eq!(out.frames, 1);
            assert_eq!(gq.collect_used()[0].0, *gq_avail_head(&gq, 5));
            gq.assert_popped_returned_once(&q);
        }
    }

    /// The head the guest published at avail position `i`.
    fn gq_avail_head<'a>(gq: &'a GuestQueue<'_>, i: usize) -> &'a u16 {
        gq.avail_log().get(i).expect("published")
    }

    #[test]
    fn rx_read_only_descriptor_chain_is_dropped() {
        for mrg in [false, true] {
            let mem = test_memory();
            let mut gq = GuestQueue::new(&mem, 16);
            let bad1 = gq.add_desc_chain(&[(DATA_BASE, 2048, 0)]);
            let bad2 = gq.add_desc_chain(&[(DATA_BASE, 100, WRITE), (DATA_BASE + 100, 2000, 0)]);
            let bufs = post(&mut gq, 2, 2048, DATA_BASE + 0x4000);
            let mut q = gq.create_queue();
            let mut fx = Fx::new(mrg, SMALL_MAX);
            let frame = pattern_frame(HDR, 300, 6);
            fx.host.inject_frame(&frame);

            let out = fx.run(&mut q, &mem);

            assert_eq!(out.frames, 1, "mrg {mrg}");
            let used = gq.collect_used();
            assert_eq!(&used[..2], &[(bad1, 0), (bad2, 0)]);
            assert_eq!(
                frame_in_guest(&mem, &bufs, &used[2..]),
                with_num_buffers(&frame, 1)
            );
            assert_eq!(
                read_guest(&mem, DATA_BASE, 100),
                vec![0u8; 100],
                "nothing written"
            );
            expect_counters(
                fx.snap(),
                &[
                    ("rx_drop_bad_chain", 2),
                    ("rx_frames", 1),
                    ("rx_bytes", 300),
                ],
            );
            gq.assert_popped_returned_once(&q);
        }
    }

    #[test]
    fn rx_buffer_smaller_than_header_is_dropped() {
        for mrg in [false, true] {
            let mem = test_memory();
            let mut gq = GuestQueue::new(&mem, 16);
            let small = gq.add_desc_chain(&[(DATA_BASE, HDR as u32 - 1, WRITE)]);
            let split =
                gq.add_desc_chain(&[(DATA_BASE + 0x100, 6, WRITE), (DATA_BASE + 0x200, 5, WRITE)]);
            let bufs = post(&mut gq, 2, 2048, DATA_BASE + 0x4000);
            let mut q = gq.create_queue();
            let mut fx = Fx::new(mrg, SMALL_MAX);
            let frame = pattern_frame(HDR, 20, 7);
            fx.host.inject_frame(&frame);

            let out = fx.run(&mut q, &mem);

            assert_eq!(out.frames, 1, "mrg {mrg}");
            assert_eq!(fx.host.recv_calls(), 2, "one frame, then EAGAIN");
            let used = gq.collect_used();
            assert_eq!(&used[..2], &[(small, 0), (split, 0)]);
            assert_eq!(
                frame_in_guest(&mem, &bufs, &used[2..]),
                with_num_buffers(&frame, 1)
            );
            expect_counters(
                fx.snap(),
                &[
                    ("rx_drop_buffer_too_small", 2),
                    ("rx_frames", 1),
                    ("rx_bytes", 20),
                ],
            );
            gq.assert_popped_returned_once(&q);
        }
    }

    #[test]
    fn rx_descriptor_outside_guest_memory_is_dropped() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        gq.add_desc_chain(&[(HOLE_START - 10, 2048, WRITE)]);
        gq.add_desc_chain(&[(DATA_BASE, 100, WRITE), (u64::MAX - 5, 100, WRITE)]);
        let bufs = post(&mut gq, 2, 2048, DATA_BASE + 0x4000);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(false, SMALL_MAX);
        let frame = pattern_frame(HDR, 50, 8);
        fx.host.inject_frame(&frame);

        let out = fx.run(&mut q, &mem);

        assert_eq!(out.frames, 1);
        let used = gq.collect_used();
        assert_eq!(
            frame_in_guest(&mem, &bufs, &used[2..]),
            with_num_buffers(&frame, 1)
        );
        expect_counters(
            fx.snap(),
            &[("rx_drop_bad_chain", 2), ("rx_frames", 1), ("rx_bytes", 50)],
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn rx_no_buffers_consumes_nothing() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(false, SMALL_MAX);
        let frame = pattern_frame(HDR, 50, 9);
        fx.host.inject_frame(&frame);

        let out = fx.run(&mut q, &mem);

        assert!(out.no_buffers && !out.host_empty && !out.notify);
        assert_eq!(out.frames, 0);
        assert_eq!(fx.host.recv_calls(), 0);
        assert!(
            fx.host.has_pending_rx(),
            "the frame waits in the host queue"
        );
        assert_eq!(gq.used_flags() & 1, 0, "guest kicks enabled");
        expect_counters(fx.snap(), &[("rx_no_buffers", 1)]);

        // The guest posts a buffer (and kicks): the frame arrives.
        let bufs = post(&mut gq, 1, 2048, DATA_BASE);
        let out = fx.run(&mut q, &mem);
        assert_eq!(out.frames, 1);
        let used = gq.collect_used();
        assert_eq!(
            frame_in_guest(&mem, &bufs, &used),
            with_num_buffers(&frame, 1)
        );
    }

    #[test]
    fn rx_mrg_too_few_buffers_gives_them_back_and_asks_for_a_kick() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 256);
        post(&mut gq, 3, 1536, DATA_BASE);
        let mut q = gq.create_queue_event_idx();
        let mut fx = Fx::new(true, GSO_MAX);
        fx.host.inject_frame(&pattern_frame(HDR, 100, 0));

        let out = fx.run(&mut q, &mem);

        assert!(out.no_buffers);
        assert_eq!(out.frames, 0);
        assert_eq!(fx.host.recv_calls(), 0);
        assert_eq!(q.next_avail(), 0, "popped chains given back");
        assert_eq!(gq.used_idx(), 0);
        // EVENT_IDX: kick when avail.idx moves past 3 (what the guest has published), not past
        // next_avail (0), which the guest has already passed and would never kick for.
        assert_eq!(gq.avail_event(), 3);
        expect_counters(fx.snap(), &[("rx_no_buffers", 1)]);
        gq.assert_popped_returned_once(&q);

        // Enough buffers now: the frame goes into the first one.
        let bufs = {
            let mut b = post(&mut gq, 45, 1536, DATA_BASE + 0x1000 * 8);
            b.extend((0..3).map(|i| {
                (
                    gq_avail_head(&gq, i).to_owned(),
                    DATA_BASE + 1536 * i as u64,
                )
            }));
            b
        };
        let out = fx.run(&mut q, &mem);
        assert_eq!(out.frames, 1);
        let used = gq.collect_used();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, *gq_avail_head(&gq, 0));
        assert_eq!(frame_in_guest(&mem, &bufs, &used).len(), HDR + 100);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn rx_mrg_whole_ring_smaller_than_max_frame_still_receives() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        // Every descriptor posted: 16 × 1536 < 65562, the guest cannot do more.
        let bufs = post(&mut gq, 16, 1536, DATA_BASE);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(true, GSO_MAX);
        let frame = pattern_frame(HDR, 3000, 10);
        fx.host.inject_frame(&frame);

        let out = fx.run(&mut q, &mem);

        assert_eq!(out.frames, 1);
        let used = gq.collect_used();
        assert_eq!(used.len(), 2);
        assert_eq!(
            frame_in_guest(&mem, &bufs, &used),
            with_num_buffers(&frame, 2)
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn rx_eagain_reports_host_empty() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        post(&mut gq, 4, 2048, DATA_BASE);
        for mrg in [false, true] {
            let mut q = gq.create_queue();
            let mut fx = Fx::new(mrg, SMALL_MAX);

            let out = fx.run(&mut q, &mem);

            assert!(out.host_empty && !out.no_buffers && !out.notify);
            assert_eq!(out.frames, 0);
            assert_eq!(q.next_avail(), 0, "nothing consumed (mrg {mrg})");
            assert_eq!(gq.used_idx(), 0);
            expect_counters(fx.snap(), &[]);
        }
    }

    #[test]
    fn rx_event_idx_suppresses_notification_until_used_event_is_crossed() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        post(&mut gq, 8, 2048, DATA_BASE);
        let mut q = gq.create_queue_event_idx();
        let mut fx = Fx::new(false, SMALL_MAX);
        let frame = pattern_frame(HDR, 40, 0);

        gq.set_used_event(1);
        fx.host.inject_frame(&frame);
        let out = fx.run(&mut q, &mem);
        assert_eq!((out.frames, out.notify), (1, false), "used.idx 1: not yet");
        fx.host.inject_frame(&frame);
        let out = fx.run(&mut q, &mem);
        assert_eq!((out.frames, out.notify), (1, true), "used.idx 2 crosses 1");
        fx.host.inject_frame(&frame);
        let out = fx.run(&mut q, &mem);
        assert_eq!(
            (out.frames, out.notify),
            (1, false),
            "used_event behind: quiet"
        );
        gq.set_used_event(4);
        for _ in 0..3 {
            fx.host.inject_frame(&frame);
        }
        let out = fx.run(&mut q, &mem);
        assert_eq!(
            (out.frames, out.notify),
            (3, true),
            "batch crossing used_event"
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn rx_host_error_gives_chains_back() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let bufs = post(&mut gq, 2, 2048, DATA_BASE);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(false, SMALL_MAX);
        let frame = pattern_frame(HDR, 40, 0);
        fx.host.inject_frame(&frame);
        fx.host.fail_next_recv(libc::EBADFD);

        let out = fx.run(&mut q, &mem);

        assert_eq!(out.host_error, Some(libc::EBADFD));
        assert!(!out.more && !out.host_empty && !out.notify);
        assert_eq!(q.next_avail(), 0);
        assert_eq!(gq.used_idx(), 0);
        expect_counters(fx.snap(), &[("rx_drop_host_error", 1)]);

        // The queue recovers: the same chain takes the frame.
        let out = fx.run(&mut q, &mem);
        assert_eq!(out.frames, 1);
        let used = gq.collect_used();
        assert_eq!(used[0].0, *gq_avail_head(&gq, 0));
        assert_eq!(
            frame_in_guest(&mem, &bufs, &used),
            with_num_buffers(&frame, 1)
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn rx_frame_bigger_than_buffers_is_dropped_and_chain_reused() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let bufs = post(&mut gq, 2, 100, DATA_BASE);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(false, SMALL_MAX);
        fx.host.inject_frame(&pattern_frame(HDR, 200, 1));
        let fits = pattern_frame(HDR, 80, 2);
        fx.host.inject_frame(&fits);

        let out = fx.run(&mut q, &mem);

        // The fake behaves like macvtap: the frame is consumed and the read fails with EFAULT.
        assert_eq!(out.host_error, Some(libc::EFAULT));
        assert!(out.more, "a dropped frame, not a dead queue");
        assert_eq!(out.frames, 0);
        assert_eq!(q.next_avail(), 0);
        let out = fx.run(&mut q, &mem);
        assert_eq!(out.frames, 1);
        let used = gq.collect_used();
        assert_eq!(
            frame_in_guest(&mem, &bufs, &used),
            with_num_buffers(&fits, 1)
        );
        expect_counters(
            fx.snap(),
            &[
                ("rx_drop_buffer_too_small", 1),
                ("rx_frames", 1),
                ("rx_bytes", 80),
            ],
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn rx_runt_frame_from_host_is_counted_and_chain_reused() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let bufs = post(&mut gq, 2, 2048, DATA_BASE);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(true, SMALL_MAX);
        fx.host.inject_frame(&[1, 2, 3]);
        let frame = pattern_frame(HDR, 64, 3);
        fx.host.inject_frame(&frame);

        let out = fx.run(&mut q, &mem);

        assert_eq!(out.frames, 1);
        let used = gq.collect_used();
        assert_eq!(
            frame_in_guest(&mem, &bufs, &used),
            with_num_buffers(&frame, 1)
        );
        expect_counters(
            fx.snap(),
            &[
                ("rx_drop_host_error", 1),
                ("rx_frames", 1),
                ("rx_bytes", 64),
            ],
        );
    }

    #[test]
    fn rx_interrupted_read_keeps_chain() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        post(&mut gq, 2, 2048, DATA_BASE);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(false, SMALL_MAX);
        fx.host.inject_frame(&pattern_frame(HDR, 64, 3));
        fx.host.fail_next_recv(libc::EINTR);

        let out = fx.run(&mut q, &mem);
        assert!(out.more && out.host_error.is_none());
        assert_eq!(q.next_avail(), 0);
        let out = fx.run(&mut q, &mem);
        assert_eq!(out.frames, 1);
        expect_counters(fx.snap(), &[("rx_frames", 1), ("rx_bytes", 64)]);
    }

    #[test]
    fn rx_mrg_dead_chain_inside_window_is_returned_after_the_frame() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 256);
        let mut bufs = post(&mut gq, 2, 1536, DATA_BASE);
        let bad = gq.add_desc_chain(&[(DATA_BASE + 0x10_000, 1536, 0)]);
        bufs.extend(post(&mut gq, 45, 1536, DATA_BASE + 0x20_000));
        let heads: Vec<u16> = gq.avail_log().to_vec();
        let mut q = gq.create_queue();
        let mut fx = Fx::new(true, GSO_MAX);
        let f1 = pattern_frame(HDR, 100, 1);
        let f2 = pattern_frame(HDR, 2500, 2); // two chains: heads[1] and, past `bad`, heads[3]
        fx.host.inject_frame(&f1);
        fx.host.inject_frame(&f2);

        let out = fx.run(&mut q, &mem);

        assert_eq!(out.frames, 2);
        let used = gq.collect_used();
        assert_eq!(
            used,
            vec![
                (heads[0], f1.len() as u32),
                (heads[1], 1536),
                (heads[3], (f2.len() - 1536) as u32),
                (bad, 0),
            ]
        );
        assert_eq!(
            frame_in_guest(&mem, &bufs, &used[..1]),
            with_num_buffers(&f1, 1)
        );
        assert_eq!(
            frame_in_guest(&mem, &bufs, &used[1..3]),
            with_num_buffers(&f2, 2)
        );
        assert_eq!(q.next_avail(), 4, "exact rewind past the dead chain");
        expect_counters(
            fx.snap(),
            &[
                ("rx_drop_bad_chain", 1),
                ("rx_frames", 2),
                ("rx_bytes", 2600),
            ],
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn rx_mrg_dead_chain_held_at_call_end_is_rewound_not_returned() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 256);
        post(&mut gq, 2, 1536, DATA_BASE);
        gq.add_desc_chain(&[(DATA_BASE + 0x10_000, 1536, 0)]);
        post(&mut gq, 45, 1536, DATA_BASE + 0x20_000);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(true, GSO_MAX);
        fx.host.inject_frame(&pattern_frame(HDR, 100, 1));

        let out = fx.run(&mut q, &mem);

        assert_eq!(out.frames, 1);
        assert_eq!(
            q.next_avail(),
            1,
            "the dead chain is behind a held one: rewound"
        );
        assert_eq!(gq.collect_used().len(), 1);
        expect_counters(fx.snap(), &[("rx_frames", 1), ("rx_bytes", 100)]);
        gq.assert_popped_returned_once(&q);
        // Next call: it is met again and returned once.
        fx.host.inject_frame(&pattern_frame(HDR, 100, 1));
        fx.host.inject_frame(&pattern_frame(HDR, 100, 1));
        let out = fx.run(&mut q, &mem);
        assert_eq!(out.frames, 2);
        assert_eq!(fx.snap().rx_drop_bad_chain, 1);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn rx_head_index_out_of_range_is_skipped() {
        for mrg in [false, true] {
            let mem = test_memory();
            let mut gq = GuestQueue::new(&mem, 16);
            let mut q = gq.create_queue();
            gq.publish(99);
            let bufs = post(&mut gq, 1, 2048, DATA_BASE);
            let mut fx = Fx::new(mrg, SMALL_MAX);
            let frame = pattern_frame(HDR, 64, 3);
            fx.host.inject_frame(&frame);

            let out = fx.run(&mut q, &mem);

            assert_eq!(out.frames, 1);
            let used = gq.collect_used();
            assert_eq!(used.len(), 1);
            assert_eq!(
                frame_in_guest(&mem, &bufs, &used),
                with_num_buffers(&frame, 1)
            );
            assert_eq!(fx.snap().rx_drop_bad_chain, 1);
        }
    }

    #[test]
    fn rx_descriptor_loop_is_dropped() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        let d = gq.alloc_descs(2);
        gq.write_desc(d, DATA_BASE, 100, WRITE | NEXT, d + 1);
        gq.write_desc(d + 1, DATA_BASE + 100, 100, WRITE | NEXT, d);
        gq.publish(d);
        post(&mut gq, 2, 2048, DATA_BASE + 0x4000);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(false, SMALL_MAX);
        fx.host.inject_frame(&pattern_frame(HDR, 64, 3));

        let out = fx.run(&mut q, &mem);

        assert_eq!(out.frames, 1);
        expect_counters(
            fx.snap(),
            &[("rx_drop_bad_chain", 1), ("rx_frames", 1), ("rx_bytes", 64)],
        );
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn rx_broken_avail_index_marks_queue_broken() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        post(&mut gq, 1, 2048, DATA_BASE);
        let mut q = gq.create_queue();
        gq.set_avail_idx(40);
        let mut fx = Fx::new(true, SMALL_MAX);
        fx.host.inject_frame(&pattern_frame(HDR, 64, 3));

        let out = fx.run(&mut q, &mem);

        assert!(out.broken);
        assert_eq!(out.frames, 0);
        assert!(!out.notify);
        assert_eq!(q.next_avail(), 0);
        assert_eq!(gq.used_idx(), 0);
        assert_eq!(fx.host.recv_calls(), 0);
        assert!(fx.host.has_pending_rx());
        expect_counters(fx.snap(), &[("queue_broken", 1)]);
    }

    #[test]
    fn rx_unreadable_avail_entry_marks_broken_instead_of_spinning() {
        for mrg in [false, true] {
            let (mem, mut q) = queue_with_unreadable_avail_entry();
            let mut fx = Fx::new(mrg, SMALL_MAX);
            fx.host.inject_frame(&pattern_frame(HDR, 64, 3));

            let out = fx.run(&mut q, &mem);

            assert!(out.broken && !out.no_buffers, "mrg {mrg}");
            assert_eq!(q.next_avail(), 200);
            assert_eq!(fx.host.recv_calls(), 0);
            expect_counters(fx.snap(), &[("queue_broken", 1)]);
        }
    }

    #[test]
    fn rx_used_ring_outside_memory_marks_broken() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        post(&mut gq, 2, 2048, DATA_BASE);
        let q0 = gq.create_queue();
        let mut q = raw_queue(16, q0.desc_table(), q0.avail_ring(), HOLE_START);
        let mut fx = Fx::new(false, SMALL_MAX);
        fx.host.inject_frame(&pattern_frame(HDR, 64, 3));

        let out = fx.run(&mut q, &mem);

        assert!(out.broken);
        expect_counters(fx.snap(), &[("queue_broken", 1)]);
    }

    #[test]
    fn rx_budget_is_respected() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        post(&mut gq, 8, 2048, DATA_BASE);
        let mut q = gq.create_queue();
        let mut fx = Fx::new(false, SMALL_MAX);
        fx.opts.budget = 2;
        for i in 0..5 {
            fx.host.inject_frame(&pattern_frame(HDR, 64, i));
        }

        let out = fx.run(&mut q, &mem);
        assert_eq!(out.frames, 2);
        assert!(out.more && !out.host_empty);
        assert_eq!(q.next_avail(), 2);
        let out = fx.run(&mut q, &mem);
        assert_eq!(out.frames, 2);
        let out = fx.run(&mut q, &mem);
        assert_eq!(out.frames, 1);
        assert!(out.host_empty && !out.more);
        assert_eq!(fx.snap().rx_frames, 5);
        gq.assert_popped_returned_once(&q);
    }

    #[test]
    fn rx_queue_not_ready_stops_host_polling() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        post(&mut gq, 1, 2048, DATA_BASE);
        let mut q = gq.create_queue();
        q.set_ready(false);
        let mut fx = Fx::new(false, SMALL_MAX);
        fx.host.inject_frame(&pattern_frame(HDR, 64, 3));

        let out = fx.run(&mut q, &mem);

        assert!(out.no_buffers && !out.broken);
        assert_eq!(fx.host.recv_calls(), 0);
        assert_eq!(q.next_avail(), 0);
    }

    #[test]
    fn rx_options_follow_features() {
        let o = RxOptions::new(bit(VIRTIO_F_VERSION_1), 1500, 32);
        assert_eq!(
            o,
            RxOptions {
                hdr_len: 12,
                mrg_rxbuf: false,
                max_frame_len: SMALL_MAX,
                budget: 32
            }
        );
        let o = RxOptions::new(bit(VIRTIO_NET_F_MRG_RXBUF), 1500, 32);
        assert!(o.mrg_rxbuf && o.hdr_len == 12);
    }

    #[test]
    fn rx_each_head_returned_exactly_once_across_mixed_traffic() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 128);
        let mut q = gq.create_queue_event_idx();
        let mut fx = Fx::new(true, 6000);
        fx.opts.budget = 5;
        let mut injected = 0u64;
        let mut rounds_with_no_buffers = 0;
        for round in 0..80u64 {
            // The guest refills buffers of varying shapes while few are pending, so the
            // sequential descriptor allocator never reuses a live descriptor.
            let base = DATA_BASE + 0x8000 * (round % 16);
            if gq.avail_idx().wrapping_sub(q.next_avail()) < 8 {
                match round % 5 {
                    0 => drop(gq.add_desc_chain(&[(base, 2048, 0)])),
                    1 => drop(gq.add_desc_chain(&[(base, 8, WRITE)])),
                    2 => drop(gq.add_desc_chain(&[(HOLE_START, 2048, WRITE)])),
                    _ => {}
                }
                for k in 0..3 {
                    gq.add_desc_chain(&[
                        (base + 0x2000 * k, 1000, WRITE),
                        (base + 0x2000 * k + 0x1000, 1000, WRITE),
                    ]);
                }
            }
            for k in 0..(round % 4) {
                fx.host
                    .inject_frame(&pattern_frame(HDR, 100 + 1500 * k as usize, k as u8));
                injected += 1;
            }
            if round % 7 == 3 {
                fx.host.fail_next_recv(libc::EIO);
            }
            loop {
                let out = fx.run(&mut q, &mem);
                assert!(!out.broken);
                gq.assert_popped_returned_once(&q);
                rounds_with_no_buffers += usize::from(out.no_buffers);
                if !out.more {
                    break;
                }
            }
        }
        // Drain: plenty of good buffers.
        while fx.host.has_pending_rx() {
            if gq.avail_idx().wrapping_sub(q.next_avail()) < 8 {
                for k in 0..4 {
                    gq.add_desc_chain(&[(DATA_BASE + 0x2000 * k, 4000, WRITE)]);
                }
            }
            let out = fx.run(&mut q, &mem);
            assert!(!out.broken && out.host_error.is_none());
            gq.assert_popped_returned_once(&q);
        }
        let s = fx.snap();
        assert_eq!(s.rx_frames, injected, "every frame delivered once");
        assert_eq!(
            s.rx_drop_host_error,
            (0..80).filter(|r| r % 7 == 3).count() as u64
        );
        assert!(s.rx_drop_bad_chain > 0 && s.rx_drop_buffer_too_small > 0);
        assert!(rounds_with_no_buffers > 0);
        assert_eq!(s.queue_broken, 0);
    }
}
