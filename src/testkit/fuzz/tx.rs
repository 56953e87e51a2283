//! `tx_chain`: guest TX rings built from the input → `process_tx` → oracles.
//!
//! # Input
//! `cfg` (queue size `1 << (cfg % 9)`, ring placement `cfg >> 4`), `opt` (bit 0 EVENT_IDX,
//! bit 1 legacy 10-byte header), `budget % 65`, then ops (`op % 9`):
//! 0 chain of 1–8 descriptors published, 1 raw descriptor, 2 publish a head, 3 move `avail.idx`,
//! 4 indirect chain, 5 queue a host errno, 6 run `process_tx`, 7 set `used_event`,
//! 8 guest writes bytes. After the ops the queue is drained (a bounded number of calls).
//!
//! # Oracles (every call)
//! - Every chain the call consumed (`next_avail` moved past it) is in the used ring exactly once,
//!   in avail order, with length 0 — unless its head is out of range (never returned) or the
//!   ring broke (the entries are then a prefix).
//! - Each consumed chain that is valid by the spec (all device-readable, mapped, properly
//!   terminated, header ≤ length ≤ header + 65550, ≤ 1024 segments) got exactly one send, and the
//!   host received exactly its bytes unless that send was failed by an injected errno; invalid
//!   chains got none. A chain whose send hit EAGAIN/EINTR is the next avail entry, not consumed.
//! - Guest memory outside the used ring is unchanged.
//! - `frames`, `host_error`, `blocked`, counters agree with what happened; `broken` only for a
//!   ring that is out of memory or an avail index more than the queue size ahead.
//! - Notification decision per the virtio rules; kicks enabled whenever the call drained the ring.
//! - At most `budget` chains and sends per call; the whole input is a bounded number of calls.

use virtio_queue::{Queue, QueueT};

use super::cursor::Cursor;
use super::vq::*;
use crate::datapath::tx::MAX_SEGMENTS;
use crate::datapath::vnet::{tx_max_frame_len, VNET_HDR_LEN_LEGACY, VNET_HDR_LEN_V1};
use crate::datapath::{process_tx, QueueStats, TxOptions, TxScratch};
use crate::testkit::FakeHostQueue;

/// Runs one `tx_chain` input (see the module doc).
pub fn tx_chain(data: &[u8]) {
    let mut c = Cursor::new(data);
    let cfg = c.u8();
    let opt = c.u8();
    let event_idx = opt & 1 != 0;
    let hdr_len = if opt & 2 != 0 {
        VNET_HDR_LEN_LEGACY
    } else {
        VNET_HDR_LEN_V1
    };
    let budget = usize::from(c.u8() % 65);
    let mem = memory();
    let (mut d, mut q, mapped) = rings(&mem, cfg, event_idx);
    let mut t = Tx {
        calls: Calls::new(event_idx, mapped),
        opts: TxOptions { hdr_len, budget },
        host: FakeHostQueue::new(),
        stats: QueueStats::default(),
        scratch: TxScratch::new(),
    };
    run_ops(&mut c, &mut d, 9, 0, |op, c, d| {
        if op == 5 {
            let e = errno(c);
            t.host.fail_next_send(e);
            t.calls.faults.0.push_back(e);
        } else {
            t.run(d, &mut q);
        }
    });
    for _ in 0..4 {
        if !t.run(&d, &mut q) {
            break;
        }
    }
}

/// The frame the device must send for `ch`, or None when the chain must be dropped.
fn tx_frame(
    ch: &Chain,
    mem: &vm_memory::GuestMemoryMmap,
    hdr_len: usize,
    size: u16,
) -> Option<Vec<u8>> {
    if ch.head >= size || ch.cut || ch.descs.iter().any(|d| d.2) {
        return None;
    }
    let total = ch.total();
    if total < hdr_len as u64 || total > tx_max_frame_len(hdr_len) as u64 {
        return None;
    }
    if ch.mapped_segments(mem)? > MAX_SEGMENTS {
        return None;
    }
    Some(ch.read(mem, false, total as usize))
}

struct Tx {
    host: FakeHostQueue,
    stats: QueueStats,
    scratch: TxScratch,
    opts: TxOptions,
    calls: Calls,
}

impl Tx {
    /// One `process_tx` call with every oracle. Returns true when calling again makes sense.
    fn run(&mut self, d: &Driver<'_>, q: &mut Queue) -> bool {
        let Some(pre) = self.calls.next(d, q) else {
            return false;
        };
        let (l, mem, hdr_len) = (d.layout, d.mem(), self.opts.hdr_len);
        let (budget, st0) = (self.opts.budget.max(1), self.stats.snapshot());
        let sends0 = self.host.send_calls();
        let out = process_tx(
            q,
            mem,
            &self.host,
            &self.stats,
            &mut self.scratch,
            &self.opts,
        );

        let sends = self.host.send_calls() - sends0;
        let faults = self.calls.faults.take(sends);
        let frames = self.host.take_all_frames();
        let st = self.stats.snapshot();
        let consumed = consumed(&pre, q);
        if super::tracing() {
            eprintln!(
                "tx call {}: layout {l:?} budget {budget}\n  pre next_avail {} announced {} \
                 chains {:?}\n  out {out:?} consumed {consumed} sends {sends} faults {faults:?}",
                self.calls.runs, pre.next_avail, pre.announced, pre.chains
            );
            for i in 0..l.size.min(16) {
                eprintln!("  desc {i}: {:x?}", d.read_desc(i));
            }
        }
        assert!(consumed <= budget, "consumed {consumed} > budget {budget}");
        assert!(sends <= budget, "{sends} sends > budget {budget}");
        if self.calls.mapped && pre.announced <= l.size {
            assert!(!out.broken, "a well-formed ring was declared broken");
        }

        // An indirect table over the used ring changes under the device's own used-ring writes
        // (used.flags, entries): the chains it walks then differ from the ones captured before
        // the call. Only the checks above apply.
        if pre
            .indirect_tables
            .iter()
            .any(|&t| overlaps(t, l.used_range()))
        {
            if out.broken {
                self.calls.stopped = true;
            }
            return out.more || out.blocked;
        }

        // Which chains were sent, and what the host must have received.
        let mut s = 0;
        let mut want_frames = Vec::new();
        let mut want_heads = Vec::new();
        let mut last_err = None;
        for ch in &pre.chains[..consumed] {
            if ch.head < l.size {
                want_heads.push(ch.head);
            }
            if let Some(bytes) = tx_frame(ch, mem, hdr_len, l.size) {
                assert!(s < sends, "a valid chain was consumed without being sent");
                match faults[s] {
                    None => want_frames.push(bytes),
                    Some(e) if e == libc::EAGAIN || e == libc::EINTR => {
                        panic!("a chain whose send got errno {e} was consumed")
                    }
                    Some(e) => last_err = Some(e),
                }
                s += 1;
            }
        }
        if s < sends {
            assert_eq!(sends, s + 1, "more sends than valid consumed chains");
            let ch = pre
                .chains
                .get(consumed)
                .expect("the send that was not consumed is on the next avail chain");
            assert!(
                tx_frame(ch, mem, hdr_len, l.size).is_some(),
                "an invalid chain was sent"
            );
            match faults[s] {
                None | Some(libc::EAGAIN) => assert!(out.blocked, "EAGAIN without blocked"),
                Some(libc::EINTR) => assert!(out.more && !out.blocked, "EINTR handling"),
                Some(e) => panic!("chain put back after errno {e}"),
            }
        } else {
            assert!(!out.blocked, "blocked without an EAGAIN");
        }
        assert_eq!(out.host_error, last_err, "host_error");
        assert_eq!(out.frames, want_frames.len(), "frames");
        assert_eq!(st.tx_frames - st0.tx_frames, want_frames.len() as u64);
        let want_bytes: usize = want_frames.iter().map(|f| f.len() - hdr_len).sum();
        assert_eq!(st.tx_bytes - st0.tx_bytes, want_bytes as u64, "tx_bytes");

        // The host got exactly the valid chains' bytes, in order. If a readable buffer overlaps
        // the used ring, the device may legitimately send bytes it wrote there this call.
        let aliased = pre.chains[..consumed].iter().any(|ch| {
            ch.ranges(false)
                .iter()
                .any(|&r| overlaps(r, l.used_range()))
        });
        assert_eq!(frames.len(), want_frames.len(), "frames on the host");
        for (got, want) in frames.iter().zip(&want_frames) {
            assert_eq!(got.len(), want.len(), "frame length on the host");
            if !aliased {
                assert!(
                    got == want,
                    "frame bytes on the host differ from the chain's"
                );
            }
        }

        // Each consumed head returned once, in order, length 0.
        let used = new_used(d, &pre, q);
        let mut got = Vec::new();
        for &(id, len) in &used {
            assert!(id < u32::from(l.size), "used id {id} out of range");
            assert_eq!(len, 0, "TX used length");
            got.push(id as u16);
        }
        if out.broken {
            assert!(
                want_heads.starts_with(&got),
                "used heads {got:?} vs consumed {want_heads:?}"
            );
        } else {
            assert_eq!(got, want_heads, "used heads vs consumed heads");
        }
        if !used.is_empty() {
            if let Some(idx) = d.get(Field::UsedIdx) {
                assert_eq!(idx, q.next_used(), "used.idx");
            }
        }

        // TX writes nothing but the used ring.
        let after = snapshot(mem);
        for (s, e) in changed_ranges(&pre.mem, &after) {
            assert!(
                covered(&[l.used_range()], s, e),
                "TX wrote guest memory [{s:#x}, {e:#x}) outside the used ring"
            );
        }

        let idle = !out.more && !out.blocked;
        let flags = (out.notify, out.broken);
        self.calls.finish(d, &pre, q, flags, idle, "TX drained");
        out.more || out.blocked
    }
}
