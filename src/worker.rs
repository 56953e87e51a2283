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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost_user_backend::VringT;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

use crate::backend::{EpollHandler, GuestMem, QueueControl, Vring};
use crate::datapath::rx::{process_rx, RxOptions, RxScratch};
use crate::datapath::tx::{process_tx, TxOptions, TxScratch};
use crate::datapath::{vnet, QueueStats};

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
}

/// One queue pair (see the module doc).
pub struct PairWorker<Q: QueueControl> {
    index: usize,
    /// First event id above the vring ids (`num_queues`, reserved for exit); ours follow it.
    event_base: u64,
    tap: Arc<Q>,
    tap_out: OwnedFd,
    stats: Arc<QueueStats>,
    state: Mutex<PairState<Q>>,
}

impl<Q: QueueControl> std::fmt::Debug for PairWorker<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairWorker")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

fn vring_live(v: &Vring) -> bool {
    let s = v.get_ref();
    s.get_queue().ready() && s.is_enabled()
}

impl<Q: QueueControl> PairWorker<Q> {
    /// A worker for queue pair `index` over host queue `tap`.
    pub fn new(
        index: usize,
        num_queues: usize,
        tap: Arc<Q>,
        stats: Arc<QueueStats>,
        mtu: u16,
    ) -> io::Result<PairWorker<Q>> {
        let tap_out = nix::unistd::dup(&*tap).map_err(io::Error::from)?;
        Ok(PairWorker {
            index,
            event_base: num_queues as u64,
            tap,
            tap_out,
            stats,
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

    fn activate(&self, st: &mut PairState<Q>, base: u64) {
        if st.active {
            return;
        }
        if let Err(e) = self.tap.attach() {
            tracing::warn!(queue_pair = self.index, "attaching host queue failed: {e}");
        }
        st.active = true;
        st.rx_watch = false;
        self.watch_rx(st, base);
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
            self.activate(st, base);
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
        let mut run_tx = !st.tx_wait_out;
        match ev {
            e if e == RX_QUEUE as u64 => {
                // The guest posted RX buffers: watch the host queue again.
                st.host_rx_failed = false;
                self.reconcile(&mut st, vrings, base);
                self.watch_rx(&mut st, base);
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
            e if e == base + VRING_STATE => {
                for v in vrings {
                    v.consume_state_event();
                }
                self.reconcile(&mut st, vrings, base);
                if !st.active {
                    return Ok(());
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
        if st.rx_watch {
            self.unregister(st, self.tap.as_raw_fd(), EventSet::IN, base + TAP_IN);
            st.rx_watch = false;
        }
        if !st.host_rx_failed {
            // Logged once; the next guest RX kick retries, so a failing fd never spins us.
            tracing::error!(queue_pair = self.index, "host queue read failed: {why}");
            st.host_rx_failed = true;
        }
    }

    fn service(&self, st: &mut PairState<Q>, vrings: &[Vring], base: u64, mut run_tx: bool) {
        let Some(atomic) = st.mem.clone() else {
            return;
        };
        // One memory snapshot per service round: no host pointer outlives it.
        let mem = atomic.memory();
        let settings = st.settings;
        loop {
            let mut more = false;
            if run_tx && !st.tx_broken && vring_live(&vrings[TX_QUEUE]) {
                let mut vs = vrings[TX_QUEUE].get_mut();
                let out = process_tx(
                    vs.get_queue_mut(),
                    &*mem,
                    &*self.tap,
                    &self.stats,
                    &mut st.tx_scratch,
                    &TxOptions {
                        hdr_len: settings.hdr_len,
                        budget: BATCH,
                    },
                );
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
                if out.blocked {
                    self.register(st, self.tap_out.as_raw_fd(), EventSet::OUT, base + TAP_OUT);
                    st.tx_wait_out = true;
                    run_tx = false;
                }
                more |= out.more;
            }
            if st.rx_watch && !st.rx_broken && vring_live(&vrings[RX_QUEUE]) {
                let mut vs = vrings[RX_QUEUE].get_mut();
                let out = process_rx(
                    vs.get_queue_mut(),
                    &*mem,
                    &*self.tap,
                    &self.stats,
                    &mut st.rx_scratch,
                    &RxOptions {
                        hdr_len: settings.hdr_len,
                        mrg_rxbuf: settings.mrg_rxbuf,
                        max_frame_len: settings.rx_max_frame_len,
                        budget: BATCH,
                    },
                );
                if out.notify {
                    if let Err(e) = vs.signal_used_queue() {
                        tracing::warn!(queue_pair = self.index, "RX call eventfd: {e}");
                    }
                    QueueStats::inc(&self.stats.rx_notifications);
                }
                drop(vs);
                if out.broken {
                    st.rx_broken = true;
                    tracing::error!(
                        queue_pair = self.index,
                        "guest broke the RX ring (avail index out of range); RX stopped until reset"
                    );
                }
                if out.no_buffers {
                    // Stop watching the host queue until the guest kicks RX (no spin).
                    self.unregister(st, self.tap.as_raw_fd(), EventSet::IN, base + TAP_IN);
                    st.rx_watch = false;
                }
                match out.host_error {
                    // One frame was lost (too big for the buffers); the queue is fine.
                    Some(_) if out.more => {}
                    Some(errno) => {
                        let err = io::Error::from_raw_os_error(errno);
                        self.host_rx_failure(st, base, &err.to_string());
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
