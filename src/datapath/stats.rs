//! Per-queue-pair counters.
//!
//! Each queue pair has exactly one writer (its worker thread), so counters are bumped with a
//! relaxed load + store instead of a locked read-modify-write: no atomic RMW on the per-frame
//! path. Any thread may read them (stats socket, metrics, tests).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters of one queue pair (see the module doc for the single-writer rule).
        #[derive(Debug, Default)]
        #[repr(align(64))]
        pub struct QueueStats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`QueueStats`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl QueueStats {
            /// Copies every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }

            /// Zeroes every counter (a new frontend starts from zero only when asked).
            pub fn reset(&self) {
                $(self.$name.store(0, Ordering::Relaxed);)*
            }
        }

        impl StatsSnapshot {
            /// Counter names and values, in declaration order (for tables and Prometheus).
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }

            /// Field-wise sum, for device totals.
            pub fn add(&self, other: &StatsSnapshot) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name + other.$name,)* }
            }
        }
    };
}

counters! {
    /// Frames the guest sent that reached the host queue.
    tx_frames,
    /// Bytes of those frames (vnet header excluded).
    tx_bytes,
    /// Of `tx_frames`, those whose vnet header asked the host for segmentation (TSO/UFO/USO):
    /// each leaves as several wire frames.
    tx_gso_frames,
    /// Of `tx_frames`, those whose source MAC is not the guest's (the guest changed its MAC, or
    /// bridges other hosts); counted only while the multicast following watches TX.
    tx_foreign_src_mac,
    /// Frames delivered to the guest.
    rx_frames,
    /// Bytes of those frames (vnet header excluded).
    rx_bytes,
    /// Guest notifications (interrupts) raised for the TX queue.
    tx_notifications,
    /// Guest notifications raised for the RX queue.
    rx_notifications,
    /// Worker wake-ups (kicks, host-queue readiness) handled.
    wakeups,
    /// TX writes that got EAGAIN; the frame was kept and retried on EPOLLOUT.
    tx_eagain,
    /// RX rounds stopped because the guest had posted no buffer (not a drop).
    rx_no_buffers,
    /// TX rounds held by the --tx-rate limiter (frames wait in the ring, not dropped).
    tx_throttled,
    /// RX rounds held by the --rx-rate limiter (frames wait in the host queue).
    rx_throttled,
    /// Drop: TX descriptor chain malformed (bad address, loop, writable descriptor...). Guest fault.
    tx_drop_bad_chain,
    /// Drop: TX frame shorter than the vnet header. Guest fault.
    tx_drop_too_short,
    /// Drop: TX frame larger than 64 KiB plus header. Guest fault.
    tx_drop_too_big,
    /// Drop: the host queue refused the frame (EIO link down, EINVAL bad vnet header...).
    tx_drop_host_error,
    /// Drop: RX descriptor chain malformed (bad address, read-only descriptor...). Guest fault.
    rx_drop_bad_chain,
    /// Drop: RX buffers too small for the header or the frame. Guest fault.
    rx_drop_buffer_too_small,
    /// Drop: reading the host queue failed for a reason other than EAGAIN.
    rx_drop_host_error,
    /// The queue was stopped because the guest broke the ring (see `datapath` policy).
    queue_broken,
}

impl QueueStats {
    /// Adds `n` to a counter. Only the queue pair's worker may call this.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Adds one to a counter. Only the queue pair's worker may call this.
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        Self::add(counter, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reflects_increments_and_reset_clears() {
        let s = QueueStats::default();
        QueueStats::inc(&s.tx_frames);
        QueueStats::add(&s.tx_bytes, 60);
        let snap = s.snapshot();
        assert_eq!(snap.tx_frames, 1);
        assert_eq!(snap.tx_bytes, 60);
        assert_eq!(snap.add(&snap).tx_bytes, 120);
        assert!(snap.fields().contains(&("tx_bytes", 60)));
        s.reset();
        assert_eq!(s.snapshot(), StatsSnapshot::default());
    }
}
