//! One queue pair's worker: owns the datapath calls for its RX and TX virtqueues and its host
//! queue fd. Runs on the queue pair's own epoll thread (vhost-user-backend's `VringEpollHandler`),
//! so nothing here is shared with other queue pairs on the hot path.
//!
//! Epoll event ids on a worker thread: 0 = RX kick, 1 = TX kick (per-thread vring indices),
//! `num_queues` = exit (reserved by vhost-user-backend), then ours: [`TAP_IN`], [`TAP_OUT`],
//! [`VRING_STATE`] as offsets above `num_queues`.
//!
//! Life of a pair: inactive (host queue detached, fd unwatched) until one of its vrings is ready
//! and enabled; then the host queue is attached and its fd watched for input. With no RX buffer
//! posted the fd is unwatched until the guest kicks (no spin). A TX write that hits EAGAIN waits
//! for EPOLLOUT on a dup of the fd (epoll cannot hold one fd twice). When both vrings are disabled
//! or stopped, the host queue is detached so the kernel stops steering frames to it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

use crate::backend::{EpollHandler, GuestMem, QueueControl, Vring};
use crate::datapath::rx::{process_rx, RxOptions, RxScratch};
use crate::datapath::tx::{process_tx, TxOptions, TxScratch};
use crate::datapath::DirtyLog;
use crate::datapath::{vnet, HostQueue, IoVecBuf, QueueStats};
use crate::dirty_log::DirtyLogState;
use crate::ratelimit::RateLimiter;

/// Per-thread vring index of the RX queue.
pub const RX_QUEUE: usize = 0;
/// Per-thread vring index of the TX queue.
pub const TX_QUEUE: usize = 1;
/// Host queue readable (offset above `num_queues`).
pub const TAP_IN: u64 = 1;
/// Host queue writable again after EAGAIN.
pub const TAP_OUT: u64 = 2;
/// A vring was enabled, disabled or stopped.
pub const VRING_STATE: u64 = 3;
/// The rate limiter's wait is over.
pub const THROTTLE_TIMER: u64 = 4;

/// The device's rate limiters, one per direction, shared by every queue pair.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Guest → host.
    pub tx: Option<Arc<Mutex<RateLimiter>>>,
    /// Host → guest.
    pub rx: Option<Arc<Mutex<RateLimiter>>>,
}

impl Limits {
    fn any(&self) -> bool {
        self.tx.is_some() || self.rx.is_some()
    }
}

/// The host queue seen through the rate limiters. A frame over the TX limit is refused with
/// EAGAIN, which the datapath treats as "keep the chain, try later"; RX refuses to read while
/// the RX bucket is in debt and charges each frame's real size after reading it. The waits
/// it records tell the worker to arm its timer instead of waiting for epoll.
struct Throttle<'a, Q> {
    q: &'a Q,
    limits: &'a Limits,
    now_ns: u64,
    hdr_len: usize,
    tx_wait_ns: AtomicU64,
    rx_wait_ns: AtomicU64,
}

fn lock_limiter(m: &Mutex<RateLimiter>) -> MutexGuard<'_, RateLimiter> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<Q: HostQueue> AsRawFd for Throttle<'_, Q> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.q.as_raw_fd()
    }
}

impl<Q: HostQueue> HostQueue for Throttle<'_, Q> {
    fn send_frame(&self, frame: &IoVecBuf<'_>) -> io::Result<usize> {
        if let Some(l) = &self.limits.tx {
            let bytes = frame.total_len().saturating_sub(self.hdr_len) as u64;
            let mut l = lock_limiter(l);
            if !l.try_consume(self.now_ns, bytes) {
                let wait = l.wait_ns(self.now_ns, bytes).max(1);
                self.tx_wait_ns.store(wait, Ordering::Relaxed);
                return Err(io::Error::from_raw_os_error(libc::EAGAIN));
            }
        }
        self.q.send_frame(frame)
    }

    fn recv_frame(&self, bufs: &IoVecBuf<'_>) -> io::Result<usize> {
        if let Some(l) = &self.limits.rx {
            let wait = lock_limiter(l).wait_ns(self.now_ns, 1);
            if wait > 0 {
                self.rx_wait_ns.store(wait, Ordering::Relaxed);
                return Err(io::Error::from_raw_os_error(libc::EAGAIN));
            }
        }
        let n = self.q.recv_frame(bufs)?;
        if let Some(l) = &self.limits.rx {
            lock_limiter(l).consume(self.now_ns, n.saturating_sub(self.hdr_len) as u64);
        }
        Ok(n)
    }
}

/// Delay of the one-off RX recheck after RX parks for lack of guest buffers.
const RX_RECHECK_NS: u64 = 200_000_000;

/// Chains handled per direction before the other direction gets a turn.
pub const BATCH: usize = 64;

/// TX through io_uring (the `--io-uring` runtime option): one `io_uring_enter` per batch of
/// frames instead of one `writev` per frame. Set once at start-up, before serving.
static TX_IO_URING: AtomicBool = AtomicBool::new(false);

/// Turns the io_uring TX path on or off for queue pairs created from now on.
pub fn set_tx_io_uring(on: bool) {
    TX_IO_URING.store(on, Ordering::Relaxed);
}

/// Whether new queue pairs write TX frames through io_uring (`set_tx_io_uring`, or the
/// environment variable `MACVHOST_IO_URING=1`).
pub fn tx_io_uring() -> bool {
    TX_IO_URING.load(Ordering::Relaxed)
        || std::env::var_os("MACVHOST_IO_URING").is_some_and(|v| v == "1")
}

fn new_tx_scratch(index: usize) -> TxScratch {
    if tx_io_uring() {
        match TxScratch::with_io_uring() {
            Ok(s) => return s,
            Err(e) => tracing::warn!(
                queue_pair = index,
                "io_uring unavailable ({e}); TX uses one writev per frame"
            ),
        }
    }
    TxScratch::default()
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

struct PairState<Q: QueueControl> {
    epoll: Option<Arc<EpollHandler<Q>>>,
    mem: Option<GuestMem>,
    settings: PairSettings,
    tx_scratch: TxScratch,
    rx_scratch: RxScratch,
    /// Host queue attached and its fd watched (a vring of this pair is live).
    active: bool,
    /// Host queue fd registered for EPOLLIN.
    rx_watch: bool,
    /// Dup fd registered for EPOLLOUT after a TX EAGAIN.
    tx_wait_out: bool,
    state_fds_registered: bool,
    rx_broken: bool,
    tx_broken: bool,
    host_rx_failed: bool,
    /// TX writes to the host queue are failing (logged once per failure, like RX).
    host_tx_failed: bool,
    /// TX held by the rate limiter until the timer fires.
    tx_throttled: bool,
    /// RX held (host queue unwatched) by the rate limiter until the timer fires.
    rx_throttled: bool,
    /// RX parked for lack of guest buffers has a one-off recheck armed on `timer`.
    rx_recheck_pending: bool,
    /// That recheck was used since RX last delivered a frame (one per episode, not a poll).
    rx_rechecked: bool,
    /// Wakes the worker when a rate-limit wait is over or an RX recheck is due.
    timer: vmm_sys_util::timerfd::TimerFd,
}

/// One queue pair (see the module doc).
pub struct PairWorker<Q: QueueControl> {
    index: usize,
    /// First event id above the vring ids (`num_queues`, reserved for exit); ours follow it.
    event_base: u64,
    tap: Arc<Q>,
    tap_out: OwnedFd,
    stats: Arc<QueueStats>,
    limits: Limits,
    /// The connection's dirty-page log (live migration).
    dirty_log: Arc<DirtyLogState>,
    epoch: Instant,
    state: Mutex<PairState<Q>>,
}

impl<Q: QueueControl> std::fmt::Debug for PairWorker<Q> {
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

fn vring_live(v: &Vring) -> bool {
    let s = v.get_ref();
    s.get_queue().ready() && s.is_enabled()
}

/// RX can move frames from the host queue to the guest: its ring is live and not broken.
fn rx_usable<Q: QueueControl>(st: &PairState<Q>, vrings: &[Vring]) -> bool {
    !st.rx_broken && vring_live(&vrings[RX_QUEUE])
}

impl<Q: QueueControl> PairWorker<Q> {
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
        let tap_out = nix::unistd::dup(&*tap).map_err(io::Error::from)?;
        Ok(PairWorker {
            index,
            event_base: num_queues as u64,
            tap,
            tap_out,
            stats,
            limits,
            dirty_log,
            epoch: Instant::now(),
            state: Mutex::new(PairState {
                epoll: None,
                mem: None,
                settings: PairSettings::from_features(0, mtu),
                tx_scratch: new_tx_scratch(index),
                rx_scratch: RxScratch::default(),
                active: false,
                rx_watch: false,
                tx_wait_out: false,
                state_fds_registered: false,
                rx_broken: false,
                tx_broken: false,
                host_rx_failed: false,
                host_tx_failed: false,
                tx_throttled: false,
                rx_throttled: false,
                rx_recheck_pending: false,
                rx_rechecked: false,
                timer: vmm_sys_util::timerfd::TimerFd::new()?,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, PairState<Q>> {
        // A panic while holding the lock would already have taken the worker down; the state
        // itself stays consistent, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands over the worker thread's epoll handler.
    pub fn set_epoll_handler(&self, h: Arc<EpollHandler<Q>>) {
        self.lock().epoll = Some(h);
    }

    /// New guest memory (SET_MEM_TABLE, ADD/REM_MEM_REG). Workers load it afresh per batch.
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

    /// EVENT_IDX negotiated or not (virtio-queue tracks it per queue; nothing to keep here).
    pub fn set_event_idx(&self, _enabled: bool) {}

    /// RESET_DEVICE: forget guest-caused stops.
    pub fn reset(&self) {
        let mut st = self.lock();
        st.rx_broken = false;
        st.tx_broken = false;
        st.host_rx_failed = false;
    }

    /// The frontend is gone: stop watching, detach the host queue, drop the epoll handler.
    pub fn teardown(&self) {
        let mut st = self.lock();
        self.deactivate(&mut st);
        st.epoll = None;
        st.mem = None;
    }

    fn register(&self, st: &PairState<Q>, fd: i32, ev: EventSet, id: u64) {
        if let Some(ep) = &st.epoll {
            if let Err(e) = ep.register_listener(fd, ev, id) {
                if e.kind() != io::ErrorKind::AlreadyExists {
                    tracing::error!(queue_pair = self.index, "epoll add failed: {e}");
                }
            }
        }
    }

    fn unregister(&self, st: &PairState<Q>, fd: i32, ev: EventSet, id: u64) {
        if let Some(ep) = &st.epoll {
            let _ = ep.unregister_listener(fd, ev, id);
        }
    }

    /// Attaches the host queue; watches it for input when `rx_usable`.
    fn activate(&self, st: &mut PairState<Q>, base: u64, rx_usable: bool) {
        if st.active {
            return;
        }
        if let Err(e) = self.tap.attach() {
            tracing::warn!(queue_pair = self.index, "attaching host queue failed: {e}");
        }
        st.active = true;
        st.rx_watch = false;
        self.register(
            st,
            st.timer.as_raw_fd(),
            EventSet::IN,
            base + THROTTLE_TIMER,
        );
        if rx_usable {
            self.watch_rx(st, base);
        }
        tracing::debug!(queue_pair = self.index, "queue pair active");
    }

    fn deactivate(&self, st: &mut PairState<Q>) {
        if !st.active {
            return;
        }
        let base = self.event_base;
        if st.rx_watch {
            self.unregister(st, self.tap.as_raw_fd(), EventSet::IN, base + TAP_IN);
            st.rx_watch = false;
        }
        if st.tx_wait_out {
            self.unregister(st, self.tap_out.as_raw_fd(), EventSet::OUT, base + TAP_OUT);
            st.tx_wait_out = false;
        }
        self.unregister(
            st,
            st.timer.as_raw_fd(),
            EventSet::IN,
            base + THROTTLE_TIMER,
        );
        st.tx_throttled = false;
        st.rx_throttled = false;
        st.rx_recheck_pending = false;
        if let Err(e) = self.tap.detach() {
            tracing::warn!(queue_pair = self.index, "detaching host queue failed: {e}");
        }
        st.active = false;
        tracing::debug!(queue_pair = self.index, "queue pair inactive");
    }

    fn watch_rx(&self, st: &mut PairState<Q>, base: u64) {
        if !st.rx_watch && st.active {
            self.register(st, self.tap.as_raw_fd(), EventSet::IN, base + TAP_IN);
            st.rx_watch = true;
        }
    }

    /// Stops watching the host queue for input. Must happen whenever RX will not read it (RX
    /// ring broken or not live, no buffers, queue failed): the watch is level-triggered, so a
    /// readable fd nobody reads would wake the worker in a busy loop.
    fn unwatch_rx(&self, st: &mut PairState<Q>, base: u64) {
        if st.rx_watch {
            self.unregister(st, self.tap.as_raw_fd(), EventSet::IN, base + TAP_IN);
            st.rx_watch = false;
        }
    }

    fn reconcile(&self, st: &mut PairState<Q>, vrings: &[Vring], base: u64) {
        if !st.state_fds_registered {
            for v in vrings {
                self.register(st, v.state_fd(), EventSet::IN, base + VRING_STATE);
            }
            st.state_fds_registered = true;
        }
        let rx_live = vring_live(&vrings[RX_QUEUE]);
        let tx_live = vring_live(&vrings[TX_QUEUE]);
        // A stopped or disabled ring forgets a guest-caused stop: the frontend re-initialises it.
        if !rx_live {
            st.rx_broken = false;
        }
        if !tx_live {
            st.tx_broken = false;
        }
        if rx_live || tx_live {
            let rx_usable = rx_usable(st, vrings);
            self.activate(st, base, rx_usable);
            if !rx_usable {
                self.unwatch_rx(st, base);
            }
        } else {
            self.deactivate(st);
        }
    }

    /// Handles one epoll event of this pair's thread.
    pub fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
    ) -> io::Result<()> {
        if vrings.len() != 2 {
            return Err(io::Error::other("a queue pair needs exactly two vrings"));
        }
        let base = self.event_base;
        let mut st = self.lock();
        QueueStats::inc(&self.stats.wakeups);
        let ev = u64::from(device_event);
        let mut run_tx = !st.tx_wait_out && !st.tx_throttled;
        match ev {
            e if e == RX_QUEUE as u64 => {
                // The guest posted RX buffers: watch the host queue again. A failed host queue is
                // retried too, but `host_rx_failed` stays set until a read works: clearing it
                // here let every guest kick log the same failure again.
                self.reconcile(&mut st, vrings, base);
                if rx_usable(&st, vrings) {
                    self.watch_rx(&mut st, base);
                }
            }
            e if e == TX_QUEUE as u64 => self.reconcile(&mut st, vrings, base),
            e if e == base + TAP_IN => {
                if evset.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    self.host_rx_failure(&mut st, base, "host queue reported an error or hang-up");
                    return Ok(());
                }
            }
            e if e == base + TAP_OUT => {
                self.unregister(&st, self.tap_out.as_raw_fd(), EventSet::OUT, base + TAP_OUT);
                st.tx_wait_out = false;
                run_tx = true;
            }
            e if e == base + THROTTLE_TIMER => {
                let _ = st.timer.wait();
                run_tx = !st.tx_wait_out;
                st.tx_throttled = false;
                if st.rx_throttled {
                    st.rx_throttled = false;
                    self.watch_rx(&mut st, base);
                }
                if st.rx_recheck_pending {
                    st.rx_recheck_pending = false;
                    st.rx_rechecked = true;
                    self.watch_rx(&mut st, base);
                }
            }
            e if e == base + VRING_STATE => {
                for v in vrings {
                    v.consume_state_event();
                }
                self.reconcile(&mut st, vrings, base);
                if !st.active {
                    return Ok(());
                }
                // A ring became live (or was reset): RX may read again.
                if rx_usable(&st, vrings) {
                    self.watch_rx(&mut st, base);
                }
            }
            other => {
                tracing::warn!(
                    queue_pair = self.index,
                    event = other,
                    "unexpected event id"
                );
                return Ok(());
            }
        }
        if st.active {
            self.service(&mut st, vrings, base, run_tx);
        }
        Ok(())
    }

    fn host_rx_failure(&self, st: &mut PairState<Q>, base: u64, why: &str) {
        self.unwatch_rx(st, base);
        if !st.host_rx_failed {
            // Logged once per failure (until a read works again); the next guest RX kick
            // retries, so a failing fd never spins us, and a kicking guest cannot flood the log.
            tracing::error!(queue_pair = self.index, "host queue read failed: {why}");
            st.host_rx_failed = true;
        }
    }

    fn service(&self, st: &mut PairState<Q>, vrings: &[Vring], base: u64, run_tx: bool) {
        if !self.limits.any() {
            // The common case: the datapath talks to the host queue directly.
            return self.service_with(st, vrings, base, run_tx, &*self.tap, None);
        }
        let throttle = Throttle {
            q: &*self.tap,
            limits: &self.limits,
            now_ns: u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX),
            hdr_len: st.settings.hdr_len,
            tx_wait_ns: AtomicU64::new(0),
            rx_wait_ns: AtomicU64::new(0),
        };
        self.service_with(st, vrings, base, run_tx, &throttle, Some(&throttle));
    }

    fn arm_throttle_timer(&self, st: &mut PairState<Q>, wait_ns: u64) {
        if let Err(e) = st.timer.reset(Duration::from_nanos(wait_ns.max(1)), None) {
            tracing::error!(queue_pair = self.index, "arming the rate-limit timer: {e}");
        }
    }

    fn service_with<H: HostQueue>(
        &self,
        st: &mut PairState<Q>,
        vrings: &[Vring],
        base: u64,
        mut run_tx: bool,
        host: &H,
        throttle: Option<&Throttle<'_, Q>>,
    ) {
        let Some(atomic) = st.mem.clone() else {
            return;
        };
        // One memory snapshot per service round: no host pointer outlives it.
        let mem = atomic.memory();
        let settings = st.settings;
        // Held for the whole round while the frontend migrates the guest (see `dirty_log`).
        let active_log = self.dirty_log.active();
        let log = active_log.as_ref().and_then(|a| a.view());
        loop {
            let mut more = false;
            if run_tx && !st.tx_broken && vring_live(&vrings[TX_QUEUE]) {
                let mut vs = vrings[TX_QUEUE].get_mut();
                let out = process_tx(
                    vs.get_queue_mut(),
                    &*mem,
                    host,
                    &self.stats,
                    &mut st.tx_scratch,
                    &TxOptions {
                        hdr_len: settings.hdr_len,
                        budget: BATCH,
                    },
                );
                if let Some(log) = log {
                    log_used_ring(log, vs.get_queue());
                }
                if out.notify {
                    if let Err(e) = vs.signal_used_queue() {
                        tracing::warn!(queue_pair = self.index, "TX call eventfd: {e}");
                    }
                    QueueStats::inc(&self.stats.tx_notifications);
                }
                drop(vs);
                if out.broken {
                    st.tx_broken = true;
                    tracing::error!(
                        queue_pair = self.index,
                        "guest broke the TX ring (avail index out of range); TX stopped until reset"
                    );
                }
                match out.host_error {
                    // Frames are dropped and counted per frame; the log says it once.
                    Some(errno) if !st.host_tx_failed => {
                        tracing::warn!(
                            queue_pair = self.index,
                            "host queue write failed: {}; dropping TX frames until it works \
                             again (counted in tx_drop_host_error)",
                            io::Error::from_raw_os_error(errno)
                        );
                        st.host_tx_failed = true;
                    }
                    None if st.host_tx_failed && out.frames > 0 => {
                        tracing::info!(queue_pair = self.index, "host queue writes work again");
                        st.host_tx_failed = false;
                    }
                    _ => {}
                }
                let limited = throttle.map_or(0, |t| t.tx_wait_ns.swap(0, Ordering::Relaxed));
                if out.blocked && limited > 0 {
                    // Over --tx-rate: the frame stays in the ring until the timer fires.
                    QueueStats::inc(&self.stats.tx_throttled);
                    st.tx_throttled = true;
                    self.arm_throttle_timer(st, limited);
                    run_tx = false;
                } else if out.blocked {
                    self.register(st, self.tap_out.as_raw_fd(), EventSet::OUT, base + TAP_OUT);
                    st.tx_wait_out = true;
                    run_tx = false;
                }
                more |= out.more;
            }
            if st.rx_watch && !rx_usable(st, vrings) {
                self.unwatch_rx(st, base);
            }
            if st.rx_watch {
                let mut vs = vrings[RX_QUEUE].get_mut();
                let out = process_rx(
                    vs.get_queue_mut(),
                    &*mem,
                    host,
                    &self.stats,
                    &mut st.rx_scratch,
                    &RxOptions {
                        hdr_len: settings.hdr_len,
                        mrg_rxbuf: settings.mrg_rxbuf,
                        max_frame_len: settings.rx_max_frame_len,
                        budget: BATCH,
                    },
                    log,
                );
                if let Some(log) = log {
                    log_used_ring(log, vs.get_queue());
                }
                if out.notify {
                    if let Err(e) = vs.signal_used_queue() {
                        tracing::warn!(queue_pair = self.index, "RX call eventfd: {e}");
                    }
                    QueueStats::inc(&self.stats.rx_notifications);
                }
                drop(vs);
                if out.broken {
                    st.rx_broken = true;
                    self.unwatch_rx(st, base);
                    tracing::error!(
                        queue_pair = self.index,
                        "guest broke the RX ring (avail index out of range); RX stopped until reset"
                    );
                }
                let limited = throttle.map_or(0, |t| t.rx_wait_ns.swap(0, Ordering::Relaxed));
                if limited > 0 && st.rx_watch {
                    // Over --rx-rate: frames wait in the host queue; stop watching it (it stays
                    // readable, so watching would spin) until the timer fires.
                    QueueStats::inc(&self.stats.rx_throttled);
                    self.unwatch_rx(st, base);
                    st.rx_throttled = true;
                    self.arm_throttle_timer(st, limited);
                }
                if out.no_buffers && st.rx_watch {
                    // Stop watching the host queue until the guest kicks RX (no spin).
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let vs = vrings[RX_QUEUE].get_ref();
                        let q = vs.get_queue();
                        tracing::debug!(
                            queue_pair = self.index,
                            next_avail = q.next_avail(),
                            avail_idx = ?q.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire).ok(),
                            ready = q.ready(),
                            "RX: no guest buffers; waiting for a kick"
                        );
                    }
                    self.unwatch_rx(st, base);
                    // The guest's kick is what wakes RX again. A kick that lands while
                    // vhost-user-backend sees the ring disabled is consumed and dropped
                    // (`VringEpollHandler` reads it, then skips a disabled ring); seen with
                    // QEMU at start-up. One recheck per episode covers that without polling.
                    if !st.rx_rechecked && !st.rx_recheck_pending && !st.rx_throttled {
                        st.rx_recheck_pending = true;
                        // An armed rate-limit timer fires sooner and serves the recheck too.
                        if !st.timer.is_armed().unwrap_or(false) {
                            self.arm_throttle_timer(st, RX_RECHECK_NS);
                        }
                    }
                }
                if out.frames > 0 {
                    st.rx_rechecked = false;
                }
                match out.host_error {
                    // One frame was lost (too big for the buffers); the queue is fine.
                    Some(_) if out.more => {}
                    Some(errno) => {
                        let err = io::Error::from_raw_os_error(errno);
                        self.host_rx_failure(st, base, &err.to_string());
                    }
                    None if st.host_rx_failed && (out.frames > 0 || out.host_empty) => {
                        tracing::info!(queue_pair = self.index, "host queue reads work again");
                        st.host_rx_failed = false;
                    }
                    None => {}
                }
                more |= out.more;
            }
            if !more {
                break;
            }
        }
    }
}
