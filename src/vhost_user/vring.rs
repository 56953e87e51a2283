//! A vring that tells its worker when the frontend enables, disables or stops it.
//!
//! vhost-user-backend handles SET_VRING_ENABLE itself and gives the backend no hook, but a
//! disabled queue pair must detach its tap queue at once, or the kernel keeps steering frames
//! to a queue nobody reads. `NetVring` wraps the stock `VringMutex`, forwards every call, and
//! signals an eventfd whenever the enabled/ready state changes; the worker watches that eventfd.
//!
//! It also keeps a running ring's `next_used` from being reset under its worker (see
//! `set_queue_next_used`).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use nix::sys::eventfd::{EfdFlags, EventFd};
use vhost_user_backend::{VringMutex, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as VirtQueError, QueueT};
use vm_memory::GuestAddressSpace;

use crate::worker::{GuestMem, PairVring};

/// `VringMutex` plus a state-change eventfd (see the module doc).
#[derive(Clone)]
pub struct NetVring<M: GuestAddressSpace> {
    inner: VringMutex<M>,
    state_changed: Arc<EventFd>,
}

impl<M: GuestAddressSpace> std::fmt::Debug for NetVring<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetVring")
            .field("state_changed", &self.state_changed.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl PairVring for NetVring<GuestMem> {
    fn state_fd(&self) -> BorrowedFd<'_> {
        self.state_changed.as_fd()
    }

    fn consume_state_event(&self) {
        // EAGAIN only means nothing was pending.
        let _ = self.state_changed.read();
    }
}

impl<M: GuestAddressSpace> NetVring<M> {
    fn signal_state(&self) {
        // The counter saturating (EAGAIN) still leaves the fd readable, which is all we need.
        let _ = self.state_changed.write(1);
    }
}

impl<'a, M: 'a + GuestAddressSpace> VringStateGuard<'a, M> for NetVring<M> {
    type G = <VringMutex<M> as VringStateGuard<'a, M>>::G;
}

impl<'a, M: 'a + GuestAddressSpace> VringStateMutGuard<'a, M> for NetVring<M> {
    type G = <VringMutex<M> as VringStateMutGuard<'a, M>>::G;
}

impl<M: 'static + GuestAddressSpace> VringT<M> for NetVring<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, VirtQueError> {
        let state_changed = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|_| VirtQueError::InvalidSize)?;
        Ok(NetVring {
            inner: VringMutex::new(mem, max_queue_size)?,
            state_changed: Arc::new(state_changed),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, M>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, M>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled);
        self.signal_state();
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        // vhost-user-backend calls this only from SET_VRING_ADDR, with `used.idx` re-read from
        // guest memory a moment earlier. QEMU sends SET_VRING_ADDR to a running ring to toggle
        // VHOST_VRING_F_LOG when a migration starts or ends; a worker round between that read
        // and this store would be undone: used entries overwritten, `used.idx` going backwards
        // in the guest's eyes, buffers handed back twice (seen as guest kernel crashes after
        // migration). A started ring's `next_used` belongs to its worker; keep it.
        let mut state = self.inner.get_mut();
        if state.get_queue().ready() {
            return;
        }
        state.get_queue_mut().set_next_used(idx);
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready);
        self.signal_state();
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

    fn vring() -> NetVring<Mem> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        NetVring::new(GuestMemoryAtomic::new(mem), 256).unwrap()
    }

    #[test]
    fn set_vring_addr_on_a_running_ring_keeps_the_workers_next_used() {
        let v = vring();
        v.set_queue_size(256);
        v.set_queue_ready(true);
        v.get_mut().get_queue_mut().set_next_used(7);
        // What SET_VRING_ADDR does with a used.idx it read before the worker's last round.
        v.set_queue_next_used(5);
        assert_eq!(v.get_ref().get_queue().next_used(), 7);
    }

    #[test]
    fn set_vring_addr_on_a_stopped_ring_takes_used_idx_from_memory() {
        let v = vring();
        v.set_queue_size(256);
        v.get_mut().get_queue_mut().set_next_used(7);
        // After GET_VRING_BASE (or a guest reset) the ring is not ready: the reset applies.
        v.set_queue_next_used(0);
        assert_eq!(v.get_ref().get_queue().next_used(), 0);
    }
}
