//! One queue pair's worker: owns the datapath calls for its RX and TX virtqueues and its host
//! queue fd. Runs on the queue pair's own epoll thread (vhost-user-backend's `VringEpollHandler`
//! calls [`PairWorker::handle_event`]), so nothing here is shared with other queue pairs on the
//! hot path.
//!
//! - [`state`]: the pair's state as enums, every transition, and which fds it watches.
//! - [`l2`]: the guest's multicast groups into the macvtap's filter, queries toward the guest.
//! - [`throttle`]: `--tx-rate`/`--rx-rate` in front of the host queue.
//!
//! Epoll event ids on a worker thread: 0 = RX kick, 1 = TX kick (per-thread vring indices),
//! `num_queues` = exit (reserved by vhost-user-backend), then ours: [`HOST_IN`], [`HOST_OUT`],
//! [`VRING_STATE`], [`TIMER`], [`INJECT`] as offsets above `num_queues`. A worker registers its fds on a
//! duplicate of its thread's epoll fd ([`EpollRegistry`]): it holds no reference back to the
//! vhost-user layer.
//!
//! Life of a pair: inactive (host queue detached, fd unwatched) until one of its vrings is ready
//! and enabled; then the host queue is attached and its fd watched for input. With no RX buffer
//! posted the fd is unwatched until the guest kicks (no spin). A TX write that hits EAGAIN waits
//! for EPOLLOUT on a dup of the fd (epoll cannot hold one fd twice). When both vrings are disabled
//! or stopped, the host queue is detached so the kernel stops steering frames to it.

pub mod l2;
pub mod state;
pub mod throttle;

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::datapath::rx::{process_rx, RxOptions, RxOutcome, RxScratch};
use crate::datapath::tx::{process_tx, TxOptions, TxOutcome, TxScratch, TxWatch};
use crate::datapath::{vnet, DirtyLog, DirtyLogState, HostQueue, QueueStats, BATCH};
use crate::host::QueueControl;
use state::{Event, Live, PairState, RxRound, TxRound, Watches};
use throttle::{Limits, Throttle};

/// Guest memory as the workers see it (swapped atomically on memory-table updates).
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Per-thread vring index of the RX queue.
pub const RX_QUEUE: usize = 0;
/// Per-thread vring index of the TX queue.
pub const TX_QUEUE: usize = 1;
/// Host queue readable (offset above `num_queues`).
pub const HOST_IN: u64 = 1;
/// Host queue writable again after EAGAIN.
pub const HOST_OUT: u64 = 2;
/// A vring was enabled, disabled or stopped.
pub const VRING_STATE: u64 = 3;
/// The rate limiter's wait is over, or the RX recheck is due.
pub const TIMER: u64 = 4;
/// Frames wait to be injected into the guest's RX queue ([`l2::Injector`]).
pub const INJECT: u64 = 5;

/// A vring as a worker needs it: the crate's vring plus an eventfd signalled whenever the
/// frontend enables, disables, starts or stops it (the vhost-user layer's `NetVring`).
pub trait PairVring: VringT<GuestMem> {
    /// The eventfd signalled on every enable/ready change.
    fn state_fd(&self) -> BorrowedFd<'_>;
    /// Clears a pending state-change signal.
    fn consume_state_event(&self);
}

/// A host queue as a worker needs it: frames ([`HostQueue`]) and control ([`QueueControl`]).
pub trait PairQueue: HostQueue + QueueControl + AsFd + std::fmt::Debug + 'static {}
impl<T: HostQueue + QueueControl + AsFd + std::fmt::Debug + 'static> PairQueue for T {}

/// Where a worker watches its fds: its thread's epoll set, or a fake in tests.
pub trait EventRegistry: Send + Sync + std::fmt::Debug {
    /// Watches `fd` for `events`; wake-ups carry `id`.
    fn add(&self, fd: BorrowedFd<'_>, events: EpollFlags, id: u64) -> io::Result<()>;
    /// Stops watching `fd`.
    fn remove(&self, fd: BorrowedFd<'_>) -> io::Result<()>;
}

/// A duplicate of a worker thread's epoll fd: the same epoll set, owned by the worker, so the
/// worker needs no reference to the handler that runs the loop (no `Arc` cycle).
#[derive(Debug)]
pub struct EpollRegistry(Epoll);

impl EpollRegistry {
    /// A registry on `epoll_fd`, a duplicate of vhost-user-backend's `VringEpollHandler` fd.
    pub fn new(epoll_fd: OwnedFd) -> EpollRegistry {
        EpollRegistry(Epoll(epoll_fd))
    }
}

impl EventRegistry for EpollRegistry {
    fn add(&self, fd: BorrowedFd<'_>, events: EpollFlags, id: u64) -> io::Result<()> {
        match self.0.add(fd, EpollEvent::new(events, id)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn remove(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        match self.0.delete(fd) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Busy polling after a wake-up (`--poll-us`), in µs; 0 = off. Set once at start-up, before
/// serving; read per event.
static POLL_US: AtomicU32 = AtomicU32::new(0);

/// Longest `--poll-us` (1 s): a longer spin only burns a core.
pub const MAX_POLL_US: u32 = 1_000_000;

/// Longest continuous polling before the worker's thread looks at its other events again.
const POLL_SLICE: Duration = Duration::from_millis(1);

/// Sets how long a worker keeps polling its rings and host queue after it handled an event,
/// before it goes back to sleep (as vhost-net's `busyloop_timeout`). Each round that moves a
/// frame starts the window again; a window with nothing to do ends it. A pair that is idle is
/// never woken, so it never polls: idle stays at zero wake-ups and zero CPU.
pub fn set_poll_us(us: u32) {
    POLL_US.store(us.min(MAX_POLL_US), Ordering::Relaxed);
}

/// The `--poll-us` in force.
pub fn poll_us() -> u32 {
    POLL_US.load(Ordering::Relaxed)
}

/// What the acked features mean for one queue pair's datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairSettings {
    /// vnet header length on the guest side and on the tap (10 or 12).
    pub hdr_len: usize,
    /// Whether one RX frame may span several chains.
    pub mrg_rxbuf: bool,
    /// Largest frame (header included) the host queue can hand us.
    pub rx_max_frame_len: usize,
}

impl PairSettings {
    /// Settings for a guest that acked `features`, with the device MTU `mtu`.
    pub fn from_features(features: u64, mtu: u16) -> PairSettings {
        PairSettings {
            hdr_len: vnet::vnet_hdr_len(features),
            mrg_rxbuf: features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_max_frame_len: vnet::rx_max_frame_len(features, usize::from(mtu)),
        }
    }
}

/// Which of the worker's fds are in its epoll set now.
#[derive(Debug, Default)]
struct Watched {
    host_in: bool,
    host_out: bool,
    timer: bool,
    vring_state: bool,
}

/// Everything a worker changes, behind its one lock.
struct Inner {
    registry: Option<Box<dyn EventRegistry>>,
    mem: Option<GuestMem>,
    settings: PairSettings,
    tx_scratch: TxScratch,
    rx_scratch: RxScratch,
    state: PairState,
    watched: Watched,
    /// Wakes the worker when a rate-limit wait is over or an RX recheck is due.
    timer: TimerFd,
}

/// The fds and the registry a transition acts on (see [`state::Watches`]).
struct Io<'a, Q> {
    index: usize,
    base: u64,
    tap: &'a Q,
    tap_out: BorrowedFd<'a>,
    registry: Option<&'a dyn EventRegistry>,
    watched: &'a mut Watched,
    timer: &'a TimerFd,
}

impl<Q: PairQueue> Io<'_, Q> {
    fn set(&self, fd: BorrowedFd<'_>, on: bool, events: EpollFlags, id: u64) {
        let Some(r) = self.registry else { return };
        let result = if on {
            r.add(fd, events, self.base + id)
        } else {
            r.remove(fd)
        };
        if let Err(e) = result {
            tracing::error!(queue_pair = self.index, "epoll update failed: {e}");
        }
    }
}

impl<Q: PairQueue> Watches for Io<'_, Q> {
    fn watch_host_in(&mut self, on: bool) {
        if self.watched.host_in != on {
            self.set(self.tap.as_fd(), on, EpollFlags::EPOLLIN, HOST_IN);
            self.watched.host_in = on;
        }
    }

    fn watch_host_out(&mut self, on: bool) {
        if self.watched.host_out != on {
            self.set(self.tap_out, on, EpollFlags::EPOLLOUT, HOST_OUT);
            self.watched.host_out = on;
        }
    }

    fn watch_timer(&mut self, on: bool) {
        if self.watched.timer != on {
            self.set(self.timer.as_fd(), on, EpollFlags::EPOLLIN, TIMER);
            self.watched.timer = on;
        }
    }

    fn arm_timer(&mut self, ns: u64) {
        let when = Expiration::OneShot(TimeSpec::from_duration(Duration::from_nanos(ns.max(1))));
        if let Err(e) = self.timer.set(when, TimerSetTimeFlags::empty()) {
            tracing::error!(queue_pair = self.index, "arming the worker timer: {e}");
        }
    }

    fn timer_armed(&self) -> bool {
        self.timer.get().is_ok_and(|e| e.is_some())
    }

    fn attach_host(&mut self, on: bool) {
        let (what, result) = if on {
            ("attaching", self.tap.attach())
        } else {
            ("detaching", self.tap.detach())
        };
        match result {
            Ok(()) => tracing::debug!(queue_pair = self.index, active = on, "queue pair"),
            // The link was deleted: the link watcher has said so once already.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::debug!(queue_pair = self.index, "{what} host queue: {e}")
            }
            Err(e) => tracing::warn!(queue_pair = self.index, "{what} host queue failed: {e}"),
        }
    }
}

/// What the rounds of one service call share: the guest memory snapshot, the dirty log (while
/// the frontend migrates the guest), the host queue the datapath talks to, and the rate
/// limiter (`None`: no limits, `host` is the queue itself), and the pair's two rings.
struct Pass<'a, H, Q, V> {
    mem: &'a GuestMemoryMmap<()>,
    log: Option<DirtyLog<'a>>,
    host: &'a H,
    throttle: Option<&'a Throttle<'a, Q>>,
    rx: &'a V,
    tx: &'a V,
}

// By hand: derived impls would ask `H: Copy` and `Q: Copy`, and only references are copied.
impl<H, Q, V> Clone for Pass<'_, H, Q, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<H, Q, V> Copy for Pass<'_, H, Q, V> {}

impl<'a, H, Q, V> Pass<'a, H, Q, V> {
    /// The same pass talking to another host queue (one that injects frames first).
    fn with_host<'b, G>(self, host: &'b G) -> Pass<'b, G, Q, V>
    where
        'a: 'b,
    {
        Pass {
            mem: self.mem,
            log: self.log,
            host,
            throttle: self.throttle,
            rx: self.rx,
            tx: self.tx,
        }
    }
}

/// What `PairWorker::on_ring` needs from a datapath pass's outcome.
trait PassOutcome {
    /// The guest wants a used-buffer notification.
    fn notify(&self) -> bool;
}

impl PassOutcome for TxOutcome {
    fn notify(&self) -> bool {
        self.notify
    }
}

impl PassOutcome for RxOutcome {
    fn notify(&self) -> bool {
        self.notify
    }
}

/// One queue pair (see the module doc).
pub struct PairWorker<Q: PairQueue> {
    index: usize,
    /// First event id above the vring ids (`num_queues`, reserved for exit); ours follow it.
    event_base: u64,
    tap: Arc<Q>,
    tap_out: OwnedFd,
    stats: Arc<QueueStats>,
    limits: Limits,
    /// The connection's dirty-page log (live migration).
    dirty_log: Arc<DirtyLogState>,
    /// Frames to deliver to the guest ahead of the host queue's (the first pair only).
    injector: Option<Arc<l2::Injector>>,
    epoch: Instant,
    inner: Mutex<Inner>,
}

impl<Q: PairQueue> std::fmt::Debug for PairWorker<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairWorker")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// Marks a queue's whole used ring (flags, index, elements, `avail_event`): a few pages at most,
/// and cheaper than tracking which of its bytes a round wrote.
fn log_used_ring(log: DirtyLog<'_>, q: &virtio_queue::Queue) {
    log.mark(q.used_ring(), 6 + 8 * u64::from(q.size()));
}

fn vring_live<V: PairVring>(v: &V) -> bool {
    let s = v.get_ref();
    s.get_queue().ready() && s.is_enabled()
}

impl<Q: PairQueue> PairWorker<Q> {
    /// A worker for queue pair `index` over host queue `tap`.
    pub fn new(
        index: usize,
        num_queues: usize,
        tap: Arc<Q>,
        stats: Arc<QueueStats>,
        mtu: u16,
        limits: Limits,
        dirty_log: Arc<DirtyLogState>,
    ) -> io::Result<PairWorker<Q>> {
        let tap_out = tap.as_fd().try_clone_to_owned()?;
        Ok(PairWorker {
            index,
            event_base: num_queues as u64,
            tap,
            tap_out,
            stats,
            limits,
            dirty_log,
            injector: None,
            epoch: Instant::now(),
            inner: Mutex::new(Inner {
                registry: None,
                mem: None,
                settings: PairSettings::from_features(0, mtu),
                tx_scratch: TxScratch::default(),
                rx_scratch: RxScratch::default(),
                state: PairState::default(),
                watched: Watched::default(),
                timer: TimerFd::new(
                    ClockId::CLOCK_MONOTONIC,
                    TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
                )?,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would already have taken the worker down; the state
        // itself stays consistent, so keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes this pair deliver `injector`'s frames to the guest (one pair per connection).
    pub fn set_injector(&mut self, injector: Arc<l2::Injector>) {
        self.injector = Some(injector);
    }

    /// Watches every frame the guest sends on this pair (see [`TxWatch`]).
    pub fn set_watch(&self, watch: TxWatch) {
        self.lock().tx_scratch.set_watch(Some(watch));
    }

    /// Hands over where this worker's thread watches fds.
    pub fn set_registry(&self, registry: Box<dyn EventRegistry>) {
        self.lock().registry = Some(registry);
    }

    /// New guest memory (SET_MEM_TABLE, ADD/REM_MEM_REG). Workers load it afresh per round.
    pub fn set_memory(&self, mem: GuestMem) {
        self.lock().mem = Some(mem);
    }

    /// The memory table is unusable: stop touching guest memory until a good one arrives.
    pub fn clear_memory(&self) {
        self.lock().mem = None;
    }

    /// New acked features.
    pub fn set_settings(&self, settings: PairSettings) {
        self.lock().settings = settings;
    }

    /// RESET_DEVICE: forget guest-caused stops.
    pub fn reset(&self) {
        let mut inner = self.lock();
        self.io(&mut inner, |state, io| state.reset(io));
    }

    /// The frontend is gone: stop watching, detach the host queue, let go of the registry and
    /// guest memory.
    pub fn teardown(&self) {
        let mut inner = self.lock();
        self.io(&mut inner, |state, io| state.teardown(io));
        // The vring state fds stay in the epoll set, which dies with its thread.
        inner.watched = Watched::default();
        inner.registry = None;
        inner.mem = None;
    }

    /// Handles one epoll event of this pair's thread.
    pub fn handle_event<V: PairVring>(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[V],
    ) -> io::Result<()> {
        let [rx_vring, tx_vring] = vrings else {
            return Err(io::Error::other("a queue pair needs exactly two vrings"));
        };
        QueueStats::inc(&self.stats.wakeups);
        let base = self.event_base;
        let ev = match u64::from(device_event) {
            e if e == RX_QUEUE as u64 => Event::RxKick,
            e if e == TX_QUEUE as u64 => Event::TxKick,
            e if e == base + HOST_IN => Event::HostReadable {
                failed: evset.intersects(EventSet::ERROR | EventSet::HANG_UP),
            },
            e if e == base + HOST_OUT => Event::HostWritable,
            e if e == base + TIMER => Event::Timer,
            e if e == base + VRING_STATE => {
                rx_vring.consume_state_event();
                tx_vring.consume_state_event();
                Event::VringState
            }
            e if e == base + INJECT => {
                if let Some(i) = &self.injector {
                    i.consume_wake();
                }
                Event::Inject
            }
            other => {
                tracing::warn!(
                    queue_pair = self.index,
                    event = other,
                    "unexpected event id"
                );
                return Ok(());
            }
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        if ev == Event::Timer {
            // Consume the expiry (nonblocking: a spurious wake-up reads EAGAIN).
            let _ = inner.timer.wait();
        }
        if !inner.watched.vring_state {
            if let Some(r) = inner.registry.as_deref() {
                for v in [rx_vring, tx_vring] {
                    if let Err(e) = r.add(v.state_fd(), EpollFlags::EPOLLIN, base + VRING_STATE) {
                        tracing::error!(queue_pair = self.index, "epoll add failed: {e}");
                    }
                }
                if let Some(i) = &self.injector {
                    if let Err(e) = r.add(i.wake_fd(), EpollFlags::EPOLLIN, base + INJECT) {
                        tracing::error!(queue_pair = self.index, "epoll add failed: {e}");
                    }
                }
                inner.watched.vring_state = true;
            }
        }
        let live = Live {
            rx: vring_live(rx_vring),
            tx: vring_live(tx_vring),
        };
        let was_failing = inner.state.rx_host_failing;
        self.io(inner, |state, io| state.on_event(ev, live, io));
        if matches!(ev, Event::HostReadable { failed: true }) && !was_failing {
            self.host_read_failed(inner, "host queue reported an error or hang-up");
        }
        if inner.state.active {
            self.service(inner, rx_vring, tx_vring);
            let poll = poll_us();
            if poll > 0 {
                drop(guard);
                self.busy_poll(rx_vring, tx_vring, Duration::from_micros(poll.into()));
            }
        }
        Ok(())
    }

    /// `--poll-us`: keeps servicing the pair without sleeping until `window` passes with no
    /// frame moved either way. Each service call is what a kick or a readable host queue would
    /// have run (a TX round on the avail ring, an RX round whose `readv` answers EAGAIN when the
    /// host queue is empty), so no new syscall is made and every state rule still holds; the
    /// state machine may stop a direction meanwhile (EAGAIN, no buffers, a broken ring), and a
    /// pair with nothing that may run stops polling. The lock is taken per round, so control
    /// calls (memory table, teardown) get in between, and the thread goes back to its epoll
    /// loop at least every [`POLL_SLICE`] (longer windows: every window) even under
    /// continuous traffic, so its other events (exit, ring state) are never starved.
    fn busy_poll<V: PairVring>(&self, rx: &V, tx: &V, window: Duration) {
        let moved = || {
            self.stats.tx_frames.load(Ordering::Relaxed)
                + self.stats.rx_frames.load(Ordering::Relaxed)
        };
        let start = Instant::now();
        let slice = window.max(POLL_SLICE);
        let mut last = moved();
        let mut until = start + window;
        loop {
            let now = Instant::now();
            if now >= until || now.duration_since(start) >= slice {
                break;
            }
            std::hint::spin_loop();
            let mut guard = self.lock();
            let inner = &mut *guard;
            if !(inner.state.tx_runs() || inner.state.rx_runs()) {
                break;
            }
            self.service(inner, rx, tx);
            drop(guard);
            let m = moved();
            if m != last {
                last = m;
                until = Instant::now() + window;
            }
        }
    }

    fn io<R>(&self, inner: &mut Inner, f: impl FnOnce(&mut PairState, &mut Io<'_, Q>) -> R) -> R {
        let Inner {
            registry,
            state,
            watched,
            timer,
            ..
        } = inner;
        let mut io = Io {
            index: self.index,
            base: self.event_base,
            tap: &*self.tap,
            tap_out: self.tap_out.as_fd(),
            registry: registry.as_deref(),
            watched,
            timer,
        };
        f(state, &mut io)
    }

    /// Logs a host read failure once per failure (until a read works again): the next guest RX
    /// kick retries, so a failing fd never spins us, and a kicking guest cannot flood the log.
    fn host_read_failed(&self, inner: &mut Inner, why: &str) {
        if !inner.state.rx_host_failing {
            tracing::error!(queue_pair = self.index, "host queue read failed: {why}");
            inner.state.rx_host_failing = true;
        }
    }

    fn service<V: PairVring>(&self, inner: &mut Inner, rx: &V, tx: &V) {
        let Some(atomic) = inner.mem.clone() else {
            return;
        };
        // One memory snapshot per service call: no host pointer outlives it.
        let mem = atomic.memory();
        // Held for the whole call while the frontend migrates the guest (see `datapath::dirty`).
        let active_log = self.dirty_log.active();
        let log = active_log.as_ref().and_then(|a| a.view());
        let hdr_len = inner.settings.hdr_len;
        if !self.limits.any() {
            // The common case: the datapath talks to the host queue directly.
            let pass = Pass {
                mem: &mem,
                log,
                host: &*self.tap,
                throttle: None,
                rx,
                tx,
            };
            return self.rounds(inner, pass);
        }
        let now_ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let throttle = Throttle::new(&*self.tap, &self.limits, now_ns, hdr_len);
        let pass = Pass {
            mem: &mem,
            log,
            host: &throttle,
            throttle: Some(&throttle),
            rx,
            tx,
        };
        self.rounds(inner, pass);
    }

    /// Alternates TX and RX rounds of at most [`BATCH`] chains each until neither has more.
    fn rounds<H: HostQueue, V: PairVring>(&self, inner: &mut Inner, pass: Pass<'_, H, Q, V>) {
        loop {
            let mut more = false;
            if inner.state.tx_runs() && vring_live(pass.tx) {
                more |= self.tx_round(inner, pass);
            }
            if inner.state.rx_runs() && vring_live(pass.rx) {
                more |= match self.injector.as_deref() {
                    Some(inj) if inj.has_pending() => {
                        let host = l2::Injecting::new(pass.host, inj, inner.settings.hdr_len);
                        self.rx_round(inner, pass.with_host(&host))
                    }
                    _ => self.rx_round(inner, pass),
                };
            }
            if !more {
                break;
            }
        }
    }

    /// Runs one datapath pass on `vring`'s queue under its lock and ends the round there:
    /// marks the used ring dirty for a migrating frontend and, when the pass asks for it,
    /// notifies the guest. Never blocks: a notification the frontend's call fd cannot take is
    /// dropped and counted (the vring logs it once).
    fn on_ring<V: PairVring, O: PassOutcome>(
        &self,
        vring: &V,
        log: Option<DirtyLog<'_>>,
        notifications: &AtomicU64,
        pass: impl FnOnce(&mut virtio_queue::Queue) -> O,
    ) -> O {
        let mut vs = vring.get_mut();
        let out = pass(vs.get_queue_mut());
        if let Some(log) = log {
            log_used_ring(log, vs.get_queue());
        }
        if out.notify() {
            if vring.signal_used_queue().is_err() {
                QueueStats::inc(&self.stats.notify_dropped);
            }
            QueueStats::inc(notifications);
        }
        out
    }

    /// One TX round; returns whether TX has more to do right away.
    fn tx_round<H: HostQueue, V: PairVring>(
        &self,
        inner: &mut Inner,
        pass: Pass<'_, H, Q, V>,
    ) -> bool {
        let opts = TxOptions {
            hdr_len: inner.settings.hdr_len,
            budget: BATCH,
        };
        let out = self.on_ring(pass.tx, pass.log, &self.stats.tx_notifications, |q| {
            process_tx(
                q,
                pass.mem,
                pass.host,
                &self.stats,
                &mut inner.tx_scratch,
                &opts,
            )
        });
        if out.broken {
            tracing::error!(
                queue_pair = self.index,
                "guest broke the TX ring (avail index out of range); TX stopped until reset"
            );
        }
        match out.host_error {
            // Frames are dropped and counted per frame; the log says it once.
            Some(errno) if !inner.state.tx_host_failing => {
                tracing::warn!(
                    queue_pair = self.index,
                    "host queue write failed: {}; dropping TX frames until it works \
                     again (counted in tx_drop_host_error)",
                    io::Error::from_raw_os_error(errno)
                );
                inner.state.tx_host_failing = true;
            }
            None if inner.state.tx_host_failing && out.frames > 0 => {
                tracing::info!(queue_pair = self.index, "host queue writes work again");
                inner.state.tx_host_failing = false;
            }
            _ => {}
        }
        let limited_ns = pass.throttle.map_or(0, |t| t.take_tx_wait());
        if out.blocked && limited_ns > 0 {
            QueueStats::inc(&self.stats.tx_throttled);
        }
        let round = TxRound {
            broken: out.broken,
            blocked: out.blocked,
            limited_ns,
        };
        self.io(inner, |state, io| state.after_tx(round, io));
        out.more
    }

    /// One RX round; returns whether RX has more to do right away.
    fn rx_round<H: HostQueue, V: PairVring>(
        &self,
        inner: &mut Inner,
        pass: Pass<'_, H, Q, V>,
    ) -> bool {
        let settings = inner.settings;
        let opts = RxOptions {
            hdr_len: settings.hdr_len,
            mrg_rxbuf: settings.mrg_rxbuf,
            max_frame_len: settings.rx_max_frame_len,
            budget: BATCH,
        };
        let out = self.on_ring(pass.rx, pass.log, &self.stats.rx_notifications, |q| {
            let scratch = &mut inner.rx_scratch;
            process_rx(
                q,
                pass.mem,
                pass.host,
                &self.stats,
                scratch,
                &opts,
                pass.log,
            )
        });
        if out.no_buffers && tracing::enabled!(tracing::Level::DEBUG) {
            // Debug only: the ring is locked again to say where it stands.
            let vs = pass.rx.get_mut();
            let q = vs.get_queue();
            tracing::debug!(
                queue_pair = self.index,
                next_avail = q.next_avail(),
                avail_idx = ?q.avail_idx(pass.mem, Ordering::Acquire).ok(),
                "RX: no guest buffers; waiting for a kick"
            );
        }
        if out.broken {
            tracing::error!(
                queue_pair = self.index,
                "guest broke the RX ring (avail index out of range); RX stopped until reset"
            );
        }
        let limited_ns = pass.throttle.map_or(0, |t| t.take_rx_wait());
        if limited_ns > 0 {
            // Over --rx-rate: frames wait in the host queue until the timer fires.
            QueueStats::inc(&self.stats.rx_throttled);
        }
        let host_failed = match out.host_error {
            // One frame was lost (too big for the buffers); the queue is fine.
            Some(_) if out.more => false,
            Some(errno) => {
                let err = io::Error::from_raw_os_error(errno);
                self.host_read_failed(inner, &err.to_string());
                true
            }
            None => {
                if inner.state.rx_host_failing && (out.frames > 0 || out.host_empty) {
                    tracing::info!(queue_pair = self.index, "host queue reads work again");
                    inner.state.rx_host_failing = false;
                }
                false
            }
        };
        let round = RxRound {
            frames: out.frames,
            broken: out.broken,
            no_buffers: out.no_buffers,
            host_failed,
            limited_ns,
        };
        self.io(inner, |state, io| state.after_rx(round, io));
        out.more && inner.state.rx_runs()
    }
}
