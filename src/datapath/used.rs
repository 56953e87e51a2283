//! Used-ring updates batched per call.
//!
//! `virtio_queue::Queue::add_used` stores `used.idx` (a release store the guest polls) after every
//! element. Here each completed chain's element is written as it completes, but `used.idx` is
//! published once, at the end of the `process_tx` / `process_rx` call, and the notification
//! decision is made once for the whole batch (EVENT_IDX: did `used.idx` cross `used_event`?).
//! The guest sees the same elements in the same order; it sees them up to one batch later, as
//! with vhost-net, which also signals used buffers in batches.
//!
//! The `Queue`'s `next_used` is kept current, so everything else (saving the ring state on
//! `GET_VRING_BASE`, tests) sees what `add_used` would have left.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::ring::Area;

/// `flags` and `idx` before the used ring's elements.
const USED_HEADER: usize = 4;
/// Bytes per used element (`id`, `len`).
const USED_ELEM: usize = 8;

/// The ring is unusable (an element or the index lies outside guest memory, or a head index is
/// out of range): the caller marks the queue broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct UsedRingError;

/// Used entries added in one call, published together.
pub(super) struct UsedBatch<'m, M: GuestMemory> {
    /// `next_used` when the batch began (the last index the guest was told about).
    old: u16,
    added: u16,
    /// The used ring's elements, found once for the call (one slice when in one region).
    elems: Area<'m, M>,
}

impl<'m, M: GuestMemory> UsedBatch<'m, M> {
    pub(super) fn new(queue: &Queue, mem: &'m M) -> Self {
        let elems = usize::from(queue.size()) * USED_ELEM;
        UsedBatch {
            old: queue.next_used(),
            added: 0,
            elems: Area::new(mem, GuestAddress(queue.used_ring()), USED_HEADER + elems),
        }
    }

    /// Writes the used element `(head, len)` at `next_used` and advances it, without publishing.
    pub(super) fn add(
        &mut self,
        queue: &mut Queue,
        head: u16,
        len: u32,
    ) -> Result<(), UsedRingError> {
        let size = queue.size();
        if head >= size {
            return Err(UsedRingError);
        }
        let next = queue.next_used();
        let offset = USED_HEADER + USED_ELEM * usize::from(next % size);
        let mut elem = [0u8; USED_ELEM];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        self.elems.write(offset, &elem).ok_or(UsedRingError)?;
        queue.set_next_used(next.wrapping_add(1));
        self.added = self.added.wrapping_add(1);
        Ok(())
    }

    /// Publishes `used.idx` (release: the elements are visible first). No-op for an empty batch.
    pub(super) fn publish(&self, queue: &Queue, mem: &M) -> Result<(), UsedRingError> {
        if self.added == 0 {
            return Ok(());
        }
        let addr = GuestAddress(queue.used_ring())
            .checked_add(2)
            .ok_or(UsedRingError)?;
        mem.store(queue.next_used().to_le(), addr, Ordering::Release)
            .map_err(|_| UsedRingError)
    }

    /// Whether the guest asked to be told about this batch (call after [`UsedBatch::publish`]).
    /// Without EVENT_IDX always (as `Queue::needs_notification`); an unreadable `used_event`
    /// means a broken ring, and notifying is the safe answer.
    pub(super) fn needs_notification(&self, queue: &Queue, mem: &M) -> bool {
        if self.added == 0 {
            return false;
        }
        if !queue.event_idx_enabled() {
            return true;
        }
        // The index store must be visible before `used_event` is read.
        fence(Ordering::SeqCst);
        let used_event_addr =
            GuestAddress(queue.avail_ring()).checked_add(4 + 2 * u64::from(queue.size()));
        let Some(addr) = used_event_addr else {
            return true;
        };
        let Ok(used_event) = mem.load::<u16>(addr, Ordering::Relaxed) else {
            return true;
        };
        let new = Wrapping(queue.next_used());
        let old = Wrapping(self.old);
        new - Wrapping(u16::from_le(used_event)) - Wrapping(1) < new - old
    }
}
