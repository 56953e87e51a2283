//! `rx_fill`: guest RX rings and host frames built from the input → `process_rx` → oracles.
//!
//! # Input
//! `cfg` (queue size `1 << (cfg % 9)`, ring placement `cfg >> 4`), `opt` (bit 0 EVENT_IDX,
//! bit 1 MRG_RXBUF, bit 2 VERSION_1, bit 3 guest TSO4+CSUM), `mtu` (u16), `budget % 65`, then
//! ops (`op % 10`): 0 chain of 1–8 descriptors (writable unless the flags say otherwise)
//! published, 1 raw descriptor, 2 publish a head, 3 move `avail.idx`, 4 indirect chain, 5 queue
//! a host errno, 6 run `process_rx`, 7 set `used_event`, 8 guest writes bytes, 9 inject a host
//! frame. The options come from `RxOptions::new(features, mtu, budget)`, as the worker does.
//!
//! # Oracles (every call)
//! - Every chain the call consumed is in the used ring exactly once (any order), unless its
//!   head is out of range; nothing else is (a prefix-free subset when the ring broke).
//! - A chain that is dead by the spec (a device-readable descriptor, unmapped, cut short,
//!   more than 1024 segments, smaller than the header) is returned with length 0; a live one with
//!   a positive length no larger than its writable capacity.
//! - Frames: consecutive non-empty used entries, `num_buffers` of them (1 without MRG_RXBUF,
//!   read from the header with a 12-byte header), all but the last filled to capacity; their
//!   bytes are an injected frame (in injection order, `num_buffers` patched in); `frames` and
//!   `rx_frames` count them (not checked for a call that broke the ring: its last frame may be
//!   cut short).
//! - Guest memory changes only inside writable descriptors of live announced chains and the used
//!   ring.
//! - `broken` only for rings out of memory or an avail index too far ahead; `host_empty` only
//!   when the host queue is empty (or an EAGAIN was injected); notification decision per the
//!   virtio rules; kicks enabled (`avail_event` = avail index) when the call reports no buffers.
//! - At most `budget + 1` host reads per call; a bounded number of calls.
//!
//! When a live writable buffer overlaps the rings or an indirect table, the device may write
//! frame bytes over them, which the spec allows the guest to do to itself: only the checks that
//! do not read rings back (counts, no panic) apply to that call. When live buffers overlap each
//! other, frame contents are not compared.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::cursor::Cursor;
use super::vq::*;
use crate::datapath::tx::MAX_SEGMENTS;
use crate::datapath::vnet::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX,
};
use crate::datapath::{process_rx, QueueStats, RxOptions, RxScratch};
use crate::testkit::{pattern_frame, FakeHostQueue};

/// Most frame bytes one input may inject (the fake host queue's socket buffer is ~208 KiB and
/// `inject_frame` must not block).
const INJECT_BUDGET: usize = 150_000;
/// Per-frame overhead counted against [`INJECT_BUDGET`] (a small datagram's skb truesize).
const INJECT_OVERHEAD: usize = 2048;

/// Runs one `rx_fill` input (see the module doc).
pub fn rx_fill(data: &[u8]) {
    let mut c = Cursor::new(data);
    let cfg = c.u8();
    let opt = c.u8();
    let mut features = 0u64;
    if opt & 1 != 0 {
        features |= bit(VIRTIO_RING_F_EVENT_IDX);
    }
    if opt & 2 != 0 {
        features |= bit(VIRTIO_NET_F_MRG_RXBUF);
    }
    if opt & 4 != 0 {
        features |= bit(VIRTIO_F_VERSION_1);
    }
    if opt & 8 != 0 {
        features |= bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);
    }
    let mtu = usize::from(c.u16());
    let budget = usize::from(c.u8() % 65);
    let opts = RxOptions::new(features, mtu, budget);
    let event_idx = opt & 1 != 0;
    let mem = memory();
    let (mut d, mut q, mapped) = rings(&mem, cfg, event_idx);
    let mut r = Rx {
        host: FakeHostQueue::new(),
        stats: QueueStats::default(),
        opts,
        scratch: RxScratch::new(),
        calls: Calls::new(event_idx, mapped),
        injected: Vec::new(),
        inject_left: INJECT_BUDGET,
        next_frame: 0,
    };
    run_ops(&mut c, &mut d, 10, WRITE, |op, c, d| match op {
        5 => {
            let e = errno(c);
            r.host.fail_next_recv(e);
            r.calls.faults.0.push_back(e);
        }
        6 => {
            r.run(d, &mut q);
        }
        _ => {
            const SIZES: [usize; 12] =
                [9, 10, 11, 12, 60, 64, 1514, 1526, 1530, 9000, 65562, 65563];
            let n = match c.u8() % 4 {
                0 => usize::from(c.u8()),
                1 => usize::from(c.u16()) + usize::from(c.u8() & 7) * 10,
                2 => SIZES[usize::from(c.u8() % 12)],
                _ => usize::from(c.u16() % 2048),
            };
            r.inject(n);
        }
    });
    for _ in 0..4 {
        if !r.run(&d, &mut q) {
            break;
        }
    }
}

/// The writable capacity of a chain the device must accept, or None when it is dead.
fn rx_capacity(ch: &Chain, mem: &GuestMemoryMmap, hdr_len: usize, size: u16) -> Option<u64> {
    if ch.head >= size || ch.cut || ch.descs.iter().any(|d| !d.2) {
        return None;
    }
    if ch.mapped_segments(mem)? > MAX_SEGMENTS {
        return None;
    }
    let cap = ch.total();
    (cap >= hdr_len as u64).then_some(cap)
}

struct Rx {
    host: FakeHostQueue,
    stats: QueueStats,
    scratch: RxScratch,
    opts: RxOptions,
    calls: Calls,
    injected: Vec<Vec<u8>>,
    inject_left: usize,
    /// Injected frames before this one were delivered or dropped.
    next_frame: usize,
}

impl Rx {
    fn inject(&mut self, n: usize) {
        let cost = n + INJECT_OVERHEAD;
        if cost > self.inject_left {
            return;
        }
        self.inject_left -= cost;
        let f = pattern_frame(0, n, self.injected.len() as u8);
        self.host.inject_frame(&f);
        self.injected.push(f);
    }

    /// Finds `frame` (as delivered, `num_buffers` = `nb`) among the injected frames not yet
    /// passed, in order.
    fn match_frame(&mut self, frame: &[u8], nb: u16) {
        let hdr = self.opts.hdr_len;
        while self.next_frame < self.injected.len() {
            let inj = &self.injected[self.next_frame];
            self.next_frame += 1;
            let same = inj.len() == frame.len()
                && if hdr >= 12 {
                    inj[..10] == frame[..10]
                        && frame[10..12] == nb.to_le_bytes()
                        && inj[12..] == frame[12..]
                } else {
                    inj[..] == frame[..]
                };
            if same {
                return;
            }
        }
        panic!(
            "a delivered frame of {} bytes is none of the injected frames (in order)",
            frame.len()
        );
    }

    /// One `process_rx` call with every oracle. Returns true when calling again makes sense.
    fn run(&mut self, d: &Driver<'_>, q: &mut Queue) -> bool {
        let Some(pre) = self.calls.next(d, q) else {
            return false;
        };
        let (l, mem, hdr_len) = (d.layout, d.mem(), self.opts.hdr_len);
        let budget = self.opts.budget.max(1);
        let (recv0, st0) = (self.host.recv_calls(), self.stats.snapshot());
        let (host, stats) = (&self.host, &self.stats);
        let out = process_rx(q, mem, host, stats, &mut self.scratch, &self.opts, None);

        let recvs = self.host.recv_calls() - recv0;
        let faults = self.calls.faults.take(recvs);
        let st = self.stats.snapshot();
        self.calls.stopped |= out.broken;
        let consumed = consumed(&pre, q);
        let added = usize::from(q.next_used().wrapping_sub(pre.next_used));
        if super::tracing() {
            eprintln!(
                "rx call {}: layout {l:?} opts {:?}\n  pre next_avail {} announced {} \
                 chains {:?}\n  out {out:?} consumed {consumed} added {added} recvs {recvs} \
                 faults {faults:?}",
                self.calls.runs, self.opts, pre.next_avail, pre.announced, pre.chains
            );
        }
        assert!(
            added <= consumed,
            "{added} used entries for {consumed} chains"
        );
        assert!(
            recvs <= budget + 1,
            "{recvs} host reads > budget {budget} + 1"
        );
        assert_eq!(st.rx_frames - st0.rx_frames, out.frames as u64, "rx_frames");
        if out.host_empty && faults.last() != Some(&Some(libc::EAGAIN)) {
            assert!(
                !self.host.has_pending_rx(),
                "host_empty with a frame pending"
            );
        }

        // Which memory the device may write: live chains' writable descriptors.
        let caps: Vec<Option<u64>> = pre
            .chains
            .iter()
            .map(|ch| rx_capacity(ch, mem, hdr_len, l.size))
            .collect();
        let live_ranges: Vec<(u64, u64)> = pre
            .chains
            .iter()
            .zip(&caps)
            .filter(|(_, cap)| cap.is_some())
            .flat_map(|(ch, _)| ch.ranges(true))
            .collect();
        let mut protected = l.driver_ranges().to_vec();
        protected.push(l.used_range());
        protected.extend_from_slice(&pre.indirect_tables);
        // Also an indirect table over the used ring: the device's used-ring writes change it.
        let aliased = live_ranges
            .iter()
            .any(|r| protected.iter().any(|p| overlaps(*r, *p)))
            || pre
                .indirect_tables
                .iter()
                .any(|&t| overlaps(t, l.used_range()));
        if aliased {
            return out.more;
        }
        if self.calls.mapped && pre.announced <= l.size {
            assert!(!out.broken, "a well-formed ring was declared broken");
        }

        // Each consumed head returned once; lengths within capacity.
        let used = new_used(d, &pre, q);
        let consumed_heads: Vec<u16> = pre.chains[..consumed]
            .iter()
            .map(|ch| ch.head)
            .filter(|&h| h < l.size)
            .collect();
        let mut got = Vec::new();
        for &(id, _) in &used {
            assert!(id < u32::from(l.size), "used id {id} out of range");
            got.push(id as u16);
        }
        if out.broken {
            let mut left = consumed_heads.clone();
            for h in &got {
                let i = left
                    .iter()
                    .position(|x| x == h)
                    .unwrap_or_else(|| panic!("head {h} returned but not consumed"));
                left.swap_remove(i);
            }
        } else {
            assert!(
                same_heads(got.clone(), consumed_heads.clone()),
                "used heads {got:?} vs consumed heads {consumed_heads:?}"
            );
        }
        // Duplicate heads in the avail ring name the same descriptors (memory was not written
        // where descriptors live), so a head identifies its chain.
        let chain_of = |id: u32| {
            let i = pre.chains[..consumed]
                .iter()
                .position(|ch| u32::from(ch.head) == id)
                .expect("a returned head was consumed");
            (&pre.chains[i], caps[i])
        };
        for &(id, len) in &used {
            match chain_of(id).1 {
                Some(cap) => assert!(
                    len > 0 && u64::from(len) <= cap,
                    "live chain {id} returned with length {len}, capacity {cap}"
                ),
                None => assert_eq!(len, 0, "dead chain {id} returned with a length"),
            }
        }

        // Frames: groups of non-empty entries.
        let mut sorted = live_ranges.clone();
        sorted.sort_unstable();
        let overlap = sorted.windows(2).any(|w| overlaps(w[0], w[1]));
        let nonempty = used.iter().filter(|u| u.1 > 0).count();
        // A ring that broke mid-frame leaves that frame's last buffers unreturned.
        if overlap || out.broken {
            assert!(out.frames <= nonempty, "more frames than used buffers");
        } else {
            let mut i = 0;
            let mut frames = 0;
            while i < used.len() {
                let (id, len) = used[i];
                if len == 0 {
                    i += 1;
                    continue;
                }
                let (ch, _) = chain_of(id);
                let first = ch.read(mem, true, len as usize);
                let nb = if hdr_len >= 12 {
                    u16::from_le_bytes([first[10], first[11]])
                } else {
                    1
                };
                if !self.opts.mrg_rxbuf {
                    assert_eq!(nb, 1, "num_buffers without MRG_RXBUF");
                }
                let nb_us = usize::from(nb);
                assert!(
                    nb >= 1 && i + nb_us <= used.len(),
                    "num_buffers {nb} but {} used entries left",
                    used.len() - i
                );
                let mut frame = first;
                for k in 1..nb_us {
                    let (pid, plen) = used[i + k - 1];
                    let pcap = chain_of(pid).1.expect("live");
                    assert_eq!(u64::from(plen), pcap, "a frame's non-last buffer not full");
                    let (id2, len2) = used[i + k];
                    assert!(
                        len2 > 0,
                        "a frame's buffers are not contiguous in the used ring"
                    );
                    frame.extend(chain_of(id2).0.read(mem, true, len2 as usize));
                }
                assert!(frame.len() >= hdr_len, "frame shorter than the header");
                self.match_frame(&frame, nb);
                frames += 1;
                i += nb_us;
            }
            assert_eq!(out.frames, frames, "frames");
        }

        // Memory: only live buffers and the used ring changed.
        let mut allowed = live_ranges;
        allowed.push(l.used_range());
        let after = snapshot(mem);
        for (s, e) in changed_ranges(&pre.mem, &after) {
            assert!(
                covered(&allowed, s, e),
                "RX wrote guest memory [{s:#x}, {e:#x}) outside live writable buffers"
            );
        }

        let flags = (out.notify, out.broken);
        self.calls
            .finish(d, &pre, q, flags, out.no_buffers, "RX out of buffers");
        out.more
    }
}
