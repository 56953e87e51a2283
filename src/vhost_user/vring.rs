//! A vring that tells its worker when the frontend enables, disables or stops it, and whose
//! frontend fds can never hold a worker.
//!
//! vhost-user-backend handles SET_VRING_ENABLE itself and gives the backend no hook, but a
//! disabled queue pair must detach its tap queue at once, or the kernel keeps steering frames
//! to a queue nobody reads. `NetVring` wraps the stock `VringMutex`, forwards every call, and
//! signals an eventfd whenever the enabled/ready state changes; the worker watches that eventfd.
//!
//! It also keeps a running ring's `next_used` from being reset under its worker (see
//! `set_queue_next_used`).
//!
//! # Frontend fds (kick, call, err)
//!
//! They are the frontend's file descriptions, and a worker reads the kick fd and writes the
//! call fd while it holds the vring's lock. vhost-user-backend does both with blocking I/O that
//! retries on `EINTR`, so a call eventfd at its maximum count, a full pipe, or a kick fd that the
//! frontend drains first would stop the worker, then the request handler waiting for the lock,
//! then the connection's teardown. Here:
//! - each fd is switched to `O_NONBLOCK` when it arrives (QEMU and DPDK create these eventfds
//!   non-blocking already, so this changes nothing for them);
//! - the kick is read and the call written by `NetVring` itself, once, with no retry: a call
//!   that cannot be written is dropped and reported to the worker (which counts it in
//!   `notify_dropped`), logged once per vring; a kick read that would block is no kick;
//! - the frontend can clear `O_NONBLOCK` again on its side of the description, so each read
//!   and write runs under a [`watchdog`] guard: one that has not returned after 100 ms gets
//!   its thread interrupted (`SIGURG`, a no-op handler without `SA_RESTART`), and fails with
//!   `EINTR`.
//!
//! A kick fd that reports end of file or an error is the frontend's fault: that queue pair's
//! thread stops for the rest of the connection (returning the error is how vhost-user-backend
//! lets a worker stop), instead of spinning on a descriptor that stays readable.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::eventfd::{EfdFlags, EventFd};
use vhost_user_backend::{VringMutex, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as VirtQueError, QueueT};
use vm_memory::GuestAddressSpace;

use crate::worker::{GuestMem, PairVring};

/// `VringMutex` plus a state-change eventfd and guarded frontend fds (see the module doc).
#[derive(Clone)]
pub struct NetVring<M: GuestAddressSpace> {
    inner: VringMutex<M>,
    state_changed: Arc<EventFd>,
    frontend: Arc<FrontendFds>,
}

/// The call fd (kept here, not in the crate's state, so that a worker holding the vring's lock
/// can write it) and what the watchdog and the logs need.
#[derive(Debug)]
struct FrontendFds {
    call: Mutex<Option<File>>,
    guard: Arc<watchdog::Guard>,
    call_logged: AtomicBool,
}

impl<M: GuestAddressSpace> std::fmt::Debug for NetVring<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetVring")
            .field("state_changed", &self.state_changed.as_raw_fd())
            .finish_non_exhaustive()
    }
}

/// Switches a frontend fd to `O_NONBLOCK` (its file description is shared with the frontend).
fn nonblocking(file: File) -> File {
    let set = fcntl(&file, FcntlArg::F_GETFL).and_then(|fl| {
        let fl = OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK;
        fcntl(&file, FcntlArg::F_SETFL(fl))
    });
    if let Err(e) = set {
        // Still safe: the watchdog interrupts a read or write that blocks.
        tracing::debug!("cannot make a frontend fd non-blocking: {e}");
    }
    file
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
            frontend: Arc::new(FrontendFds {
                call: Mutex::new(None),
                guard: watchdog::register(),
                call_logged: AtomicBool::new(false),
            }),
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

    /// Writes the call fd once, never blocking for long (see the module doc). An error means
    /// the notification was dropped.
    fn signal_used_queue(&self) -> io::Result<()> {
        let call = self.frontend.call.lock().unwrap_or_else(|e| e.into_inner());
        let Some(file) = call.as_ref() else {
            return Ok(());
        };
        let written = self
            .frontend
            .guard
            .run(|| nix::unistd::write(file, &1u64.to_ne_bytes()));
        match written {
            Ok(_) => Ok(()),
            Err(e) => {
                if !self.frontend.call_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "the frontend's call fd cannot take a notification ({e}): such \
                         notifications are dropped (counted in notify_dropped); logged once \
                         per vring"
                    );
                }
                Err(e.into())
            }
        }
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
        let queue = state.get_queue_mut();
        // The base (SET_VRING_BASE, sent just before) is stale when the previous backend went
        // away without answering GET_VRING_BASE: QEMU 7.2 then sets last_avail_idx from its
        // cached used index *before* refreshing that cache (`vhost_virtqueue_stop`), so after
        // a restart under traffic the base lags the guest's ring by any amount, and the ring
        // looks broken (seen with `--client` restarts, tests/guest_restart.rs). What the guest
        // got back is `used.idx` (macvhost completes in order): resume there, as DPDK's vhost
        // library does. Entries taken but not completed are taken again (a TX frame resent,
        // an RX buffer filled anew). A guest that writes `used.idx` only misleads itself.
        if queue.next_avail() != idx {
            tracing::info!(
                base = queue.next_avail(),
                used_idx = idx,
                "the frontend's vring base differs from the guest's used index; resuming at \
                 the used index"
            );
            queue.set_next_avail(idx);
        }
        queue.set_next_used(idx);
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
        self.inner.set_kick(file.map(nonblocking))
    }

    /// Reads the kick fd once (see the module doc); the crate calls this on each kick event.
    fn read_kick(&self) -> io::Result<bool> {
        let state = self.inner.get_ref();
        if let Some(kick) = state.get_kick() {
            // SAFETY: the fd belongs to the `EventConsumer` in the vring's state, which we
            // hold locked (`state`) until the borrow ends: it cannot be closed or replaced.
            let fd = unsafe { BorrowedFd::borrow_raw(kick.as_raw_fd()) };
            let mut buf = [0u8; 8];
            match self.frontend.guard.run(|| nix::unistd::read(fd, &mut buf)) {
                Ok(0) => return Err(kick_failed(io::ErrorKind::UnexpectedEof.into())),
                // A short read (a pipe) is a kick too.
                Ok(_) => {}
                // Nothing to read after all (the frontend read it), or interrupted by the
                // watchdog: serve the ring anyway, it costs one round.
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(kick_failed(e.into())),
            }
        }
        Ok(state.is_enabled())
    }

    fn set_call(&self, file: Option<File>) {
        // The crate's copy stays empty: only `signal_used_queue` above writes the call fd.
        *self.frontend.call.lock().unwrap_or_else(|e| e.into_inner()) = file.map(nonblocking);
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file.map(nonblocking))
    }
}

/// Logs why a queue pair stops reading its kick fd (the frontend's fault) and passes the error
/// on, which ends that pair's thread for the rest of the connection.
fn kick_failed(e: io::Error) -> io::Error {
    tracing::warn!(
        "the frontend's kick fd failed ({e}): its queue pair stops for the rest of the connection"
    );
    e
}

pub mod watchdog {
    //! Interrupts a thread stuck in a read or write on a frontend fd (see the `vring` module
    //! doc).
    //!
    //! One process-wide thread (`vu-fd-watchdog`), started with the first vring, looks at every
    //! live [`Guard`] each [`STUCK`]; a guard that shows the same thread in the same operation
    //! twice in a row gets that thread a `SIGURG`. It sleeps on a condvar while no vring exists.

    use std::collections::HashMap;
    use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
    use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
    use std::time::Duration;

    /// How long a read or write on a frontend fd may block before it is interrupted.
    pub const STUCK: Duration = Duration::from_millis(100);

    /// One vring's frontend-fd operations.
    #[derive(Debug, Default)]
    pub struct Guard {
        /// Kernel thread id inside an operation, 0 when none is.
        tid: AtomicI32,
        /// Operations started (tells two operations of one thread apart).
        seq: AtomicU64,
        /// Interrupts sent.
        interrupts: AtomicU64,
    }

    impl Guard {
        /// Runs `op` (one read or write on a frontend fd) where the watchdog can see it.
        pub fn run<R>(&self, op: impl FnOnce() -> R) -> R {
            self.seq.fetch_add(1, Ordering::SeqCst);
            self.tid
                .store(nix::unistd::gettid().as_raw(), Ordering::SeqCst);
            let r = op();
            self.tid.store(0, Ordering::SeqCst);
            r
        }

        /// Interrupts sent to this guard's operations.
        pub fn interrupts(&self) -> u64 {
            self.interrupts.load(Ordering::Relaxed)
        }
    }

    struct Registry {
        guards: Mutex<Vec<Weak<Guard>>>,
        wake: Condvar,
    }

    /// A new guard, watched for as long as it lives.
    pub fn register() -> Arc<Guard> {
        let reg = registry();
        let guard = Arc::new(Guard::default());
        let mut guards = reg.guards.lock().unwrap_or_else(|e| e.into_inner());
        guards.push(Arc::downgrade(&guard));
        reg.wake.notify_one();
        guard
    }

    fn registry() -> &'static Registry {
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        REGISTRY.get_or_init(|| {
            install_handler();
            let reg = Registry {
                guards: Mutex::new(Vec::new()),
                wake: Condvar::new(),
            };
            let spawned = std::thread::Builder::new()
                .name("vu-fd-watchdog".into())
                .spawn(|| watch(registry()));
            if let Err(e) = spawned {
                // Non-blocking fds still protect every well-behaved case.
                tracing::error!("cannot start the frontend-fd watchdog: {e}");
            }
            reg
        })
    }

    extern "C" fn interrupted(_: libc::c_int) {}

    fn install_handler() {
        // No SA_RESTART: the interrupted read or write returns EINTR instead of resuming.
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(interrupted),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler does nothing, so it is async-signal-safe; SIGURG is otherwise
        // ignored by default and not used by macvhost (no socket has an owner set with
        // F_SETOWN), so no other handler is replaced.
        if let Err(e) = unsafe { nix::sys::signal::sigaction(nix::sys::signal::SIGURG, &action) } {
            tracing::error!("cannot install the frontend-fd watchdog's signal handler: {e}");
        }
    }

    fn watch(reg: &'static Registry) {
        let mut last: HashMap<usize, (i32, u64)> = HashMap::new();
        loop {
            let live: Vec<Arc<Guard>> = {
                let mut guards = reg.guards.lock().unwrap_or_else(|e| e.into_inner());
                guards.retain(|g| g.strong_count() > 0);
                if guards.is_empty() {
                    last.clear();
                    drop(reg.wake.wait(guards));
                    continue;
                }
                guards.iter().filter_map(Weak::upgrade).collect()
            };
            let mut seen = HashMap::with_capacity(live.len());
            for guard in &live {
                let tid = guard.tid.load(Ordering::SeqCst);
                let seq = guard.seq.load(Ordering::SeqCst);
                if tid == 0 {
                    continue;
                }
                let key = Arc::as_ptr(guard) as usize;
                if last.get(&key) == Some(&(tid, seq)) {
                    guard.interrupts.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: tgkill only sends a signal. The kernel checks that `tid` is a
                    // thread of this process; if the thread left the operation since we
                    // looked (or even exited and its id was reused by another of our
                    // threads), that thread gets one spurious EINTR, which every blocking
                    // call in macvhost and its crates retries or tolerates.
                    unsafe {
                        libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGURG);
                    }
                    tracing::debug!(tid, "interrupted a read or write stuck on a frontend fd");
                }
                seen.insert(key, (tid, seq));
            }
            last = seen;
            drop(live);
            std::thread::sleep(STUCK);
        }
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

    use std::os::fd::OwnedFd;
    use std::time::{Duration, Instant};

    /// A blocking eventfd holding `count`, and a second fd on the same file description (what
    /// the frontend keeps).
    fn eventfd(count: u64) -> (File, OwnedFd) {
        let e = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap();
        if count > 0 {
            e.write(count).unwrap();
        }
        let theirs = e.as_fd().try_clone_to_owned().unwrap();
        (File::from(OwnedFd::from(e)), theirs)
    }

    #[test]
    fn call_eventfd_at_its_maximum_count_drops_the_notification_at_once() {
        let v = vring();
        let (ours, _theirs) = eventfd(0xffff_ffff_ffff_fffe);
        v.set_call(Some(ours));
        let t = Instant::now();
        for _ in 0..100 {
            let e = v.signal_used_queue().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        }
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    #[test]
    fn call_pipe_that_is_full_drops_the_notification_at_once() {
        let v = vring();
        let (r, w) = nix::unistd::pipe().unwrap();
        let w = File::from(w);
        // Fill it while it is still blocking-free on our side.
        fcntl(&w, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
        while nix::unistd::write(&w, &[0u8; 4096]).is_ok() {}
        fcntl(&w, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
        v.set_call(Some(w));
        let e = v.signal_used_queue().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        drop(r);
    }

    #[test]
    fn call_fd_the_frontend_makes_blocking_again_is_interrupted_by_the_watchdog() {
        let v = vring();
        let (ours, theirs) = eventfd(0xffff_ffff_ffff_fffe);
        v.set_call(Some(ours));
        // The frontend clears O_NONBLOCK on its side of the shared description.
        fcntl(&theirs, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
        let t = Instant::now();
        let e = v.signal_used_queue().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        assert!(
            t.elapsed() < watchdog::STUCK * 5,
            "blocked for {:?}",
            t.elapsed()
        );
        assert!(v.frontend.guard.interrupts() >= 1);
    }

    #[test]
    fn kick_fd_drained_by_the_frontend_is_no_kick_and_one_at_end_of_file_fails() {
        let v = vring();
        let (ours, _theirs) = eventfd(0);
        v.set_kick(Some(ours));
        v.set_enabled(true);
        // Nothing to read (the frontend got there first): no error, the ring is served.
        assert!(v.read_kick().unwrap());
        let (r, w) = nix::unistd::pipe().unwrap();
        v.set_kick(Some(File::from(r)));
        drop(w);
        let e = v.read_kick().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn frontend_fds_are_made_non_blocking() {
        let v = vring();
        let (ours, theirs) = eventfd(0);
        v.set_call(Some(ours));
        let fl = OFlag::from_bits_truncate(fcntl(&theirs, FcntlArg::F_GETFL).unwrap());
        assert!(fl.contains(OFlag::O_NONBLOCK));
        assert!(v.signal_used_queue().is_ok());
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
    fn stale_base_resumes_at_the_guests_used_index_and_a_matching_one_is_kept() {
        // (case, SET_VRING_BASE, used.idx in memory, where the ring resumes)
        for (case, base, used_idx, resume) in [
            // QEMU's base from a stale cache, far behind a guest that kept going.
            ("stale base after a broken connection", 3, 40_000, 40_000),
            ("base matching the used index", 17, 17, 17),
        ] {
            let v = vring();
            v.set_queue_size(256);
            v.set_queue_next_avail(base);
            v.set_queue_next_used(used_idx);
            let state = v.get_ref();
            let q = state.get_queue();
            assert_eq!((q.next_avail(), q.next_used()), (resume, resume), "{case}");
        }
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
