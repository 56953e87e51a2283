//! A queue pair's state as explicit enums, and every transition between them.
//!
//! The state is the truth; which fds are watched follows from it ([`PairState::sync`]):
//! - the host queue fd is watched for input iff the pair is active and RX is [`RxState::Watching`];
//! - the dup of the host queue fd is watched for output iff TX is [`TxState::WaitingForHost`];
//! - the timer is watched iff the pair is active.
//!
//! Deriving the watches from the state keeps the one invariant the worker cannot break without
//! spinning: a readable fd is never watched while nobody will read it (the watches are
//! level-triggered). Side effects go through [`Watches`], so every transition is unit-tested
//! against a fake.

/// How long RX waits before looking at the host queue again once, after it stopped for lack of
/// guest buffers (see [`RxState::NoBuffers`]).
pub const RX_RECHECK_NS: u64 = 200_000_000;

/// Host → guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// The RX ring is not live (not ready or disabled) or the pair is inactive.
    Off,
    /// The host queue is watched; frames are moved as they come.
    Watching,
    /// The guest had no buffer posted: unwatched until it kicks RX. `recheck` says whether the
    /// one-off recheck timer is armed: a kick that lands while vhost-user-backend sees the ring
    /// disabled is consumed and dropped (seen with QEMU at start-up), and one look per episode
    /// covers that without polling.
    NoBuffers {
        /// The recheck timer is armed for this episode.
        recheck: bool,
    },
    /// Over `--rx-rate`: frames wait in the host queue until the timer fires.
    Throttled,
    /// Reading the host queue failed: unwatched until the guest kicks RX (then retried).
    HostFailed,
    /// The guest broke the ring: stopped until the frontend re-initialises it.
    Broken,
}

/// Guest → host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxState {
    /// Kicks run a TX round.
    Ready,
    /// A write got `EAGAIN`: wait for the host queue to be writable (the chain stays in the ring).
    WaitingForHost,
    /// Over `--tx-rate`: frames wait in the ring until the timer fires.
    Throttled,
    /// The guest broke the ring: stopped until the frontend re-initialises it.
    Broken,
}

/// What a worker thread was woken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The guest kicked the RX queue (posted buffers).
    RxKick,
    /// The guest kicked the TX queue.
    TxKick,
    /// The host queue is readable; `failed` when it reported an error or hang-up.
    HostReadable {
        /// EPOLLERR or EPOLLHUP came with it.
        failed: bool,
    },
    /// The host queue is writable again after `EAGAIN`.
    HostWritable,
    /// The timer fired (rate-limit wait over, or the RX recheck is due).
    Timer,
    /// A vring was enabled, disabled, started or stopped.
    VringState,
    /// Frames wait to be injected into the guest's RX queue (they go with the next RX round).
    Inject,
}

/// Which of the pair's vrings the frontend has live (ready and enabled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Live {
    /// The RX ring is live.
    pub rx: bool,
    /// The TX ring is live.
    pub tx: bool,
}

/// What a TX round reported (from `datapath::TxOutcome` and the rate limiter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxRound {
    /// The guest broke the ring.
    pub broken: bool,
    /// A write would block.
    pub blocked: bool,
    /// How long the rate limiter wants TX to wait (0: not limited).
    pub limited_ns: u64,
}

/// What an RX round reported (from `datapath::RxOutcome` and the rate limiter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RxRound {
    /// Frames delivered.
    pub frames: usize,
    /// The guest broke the ring.
    pub broken: bool,
    /// The guest had no buffer for the next frame.
    pub no_buffers: bool,
    /// Reading the host queue failed (not a single dropped frame).
    pub host_failed: bool,
    /// How long the rate limiter wants RX to wait (0: not limited).
    pub limited_ns: u64,
}

/// What a transition asks of the outside world: the fd watches and the timer, and attaching or
/// detaching the host queue. Calls are idempotent.
pub trait Watches {
    /// Watch (or stop watching) the host queue for input.
    fn watch_host_in(&mut self, on: bool);
    /// Watch (or stop watching) the host queue for output.
    fn watch_host_out(&mut self, on: bool);
    /// Watch (or stop watching) the timer.
    fn watch_timer(&mut self, on: bool);
    /// Arms the timer to fire once in `ns` nanoseconds (replacing an earlier setting).
    fn arm_timer(&mut self, ns: u64);
    /// Whether the timer is armed.
    fn timer_armed(&self) -> bool;
    /// Lets the kernel steer frames to the host queue (`true`) or stops it (`false`).
    fn attach_host(&mut self, on: bool);
}

/// One queue pair's state (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairState {
    /// Host queue attached and the pair's fds watched: a vring of the pair is live.
    pub active: bool,
    /// Host → guest.
    pub rx: RxState,
    /// Guest → host.
    pub tx: TxState,
    /// Reads failed and were logged; cleared (and "works again" logged) when a read works.
    pub rx_host_failing: bool,
    /// Writes failed and were logged; cleared when a write works.
    pub tx_host_failing: bool,
    /// The RX recheck was spent since RX last delivered a frame (one per episode).
    pub rx_rechecked: bool,
}

impl Default for PairState {
    fn default() -> Self {
        PairState {
            active: false,
            rx: RxState::Off,
            tx: TxState::Ready,
            rx_host_failing: false,
            tx_host_failing: false,
            rx_rechecked: false,
        }
    }
}

impl PairState {
    /// Applies the watches the state implies (see the module doc).
    pub fn sync(&self, w: &mut impl Watches) {
        w.watch_host_in(self.active && self.rx == RxState::Watching);
        w.watch_host_out(self.active && self.tx == TxState::WaitingForHost);
        w.watch_timer(self.active);
    }

    /// Whether a TX round may run now.
    pub fn tx_runs(&self) -> bool {
        self.active && self.tx == TxState::Ready
    }

    /// Whether an RX round may run now.
    pub fn rx_runs(&self) -> bool {
        self.active && self.rx == RxState::Watching
    }

    /// Follows the frontend's view of the rings: a pair with a live ring is active, one with
    /// none is not; a ring that is not live forgets a guest-caused stop (the frontend
    /// re-initialises it).
    pub fn reconcile(&mut self, live: Live, w: &mut impl Watches) {
        let was_active = self.active;
        self.active = live.rx || live.tx;
        if self.active != was_active {
            w.attach_host(self.active);
        }
        if !self.active {
            self.rx = RxState::Off;
            self.tx = TxState::Ready;
            return;
        }
        if !live.tx && self.tx == TxState::Broken {
            self.tx = TxState::Ready;
        }
        self.rx = match (live.rx, self.rx) {
            (false, _) => RxState::Off,
            (true, RxState::Off) => RxState::Watching,
            (true, other) => other,
        };
    }

    /// Handles one wake-up, before any round runs. `live` is read afresh on every wake-up: a
    /// ring may stop between its state event and the next host-queue event.
    pub fn on_event(&mut self, ev: Event, live: Live, w: &mut impl Watches) {
        self.reconcile(live, w);
        match ev {
            Event::RxKick => {
                // The guest posted buffers: read the host queue again (a failed queue is retried
                // too; `rx_host_failing` stays set until a read works, so a kicking guest cannot
                // make the same failure log again).
                if matches!(self.rx, RxState::NoBuffers { .. } | RxState::HostFailed) {
                    self.rx = RxState::Watching;
                }
            }
            Event::TxKick | Event::Inject => {}
            Event::VringState => {
                if matches!(self.rx, RxState::NoBuffers { .. } | RxState::HostFailed) {
                    // A ring became live or was reset: RX may read again.
                    self.rx = RxState::Watching;
                }
            }
            Event::HostReadable { failed: true } => {
                if self.rx == RxState::Watching {
                    self.rx = RxState::HostFailed;
                }
            }
            Event::HostReadable { failed: false } => {}
            Event::HostWritable => {
                if self.tx == TxState::WaitingForHost {
                    self.tx = TxState::Ready;
                }
            }
            Event::Timer => {
                if self.tx == TxState::Throttled {
                    self.tx = TxState::Ready;
                }
                match self.rx {
                    RxState::Throttled => self.rx = RxState::Watching,
                    RxState::NoBuffers { recheck: true } => {
                        self.rx = RxState::Watching;
                        self.rx_rechecked = true;
                    }
                    _ => {}
                }
            }
        }
        self.sync(w);
    }

    /// Takes in what a TX round reported.
    pub fn after_tx(&mut self, r: TxRound, w: &mut impl Watches) {
        if r.broken {
            self.tx = TxState::Broken;
        } else if r.blocked && r.limited_ns > 0 {
            self.tx = TxState::Throttled;
            w.arm_timer(r.limited_ns);
        } else if r.blocked {
            self.tx = TxState::WaitingForHost;
        }
        self.sync(w);
    }

    /// Takes in what an RX round reported.
    pub fn after_rx(&mut self, r: RxRound, w: &mut impl Watches) {
        if r.frames > 0 {
            self.rx_rechecked = false;
        }
        if r.broken {
            self.rx = RxState::Broken;
        } else if r.limited_ns > 0 {
            // Frames wait in the host queue; it stays readable, so watching it would spin.
            self.rx = RxState::Throttled;
            w.arm_timer(r.limited_ns);
        } else if r.no_buffers {
            let recheck = !self.rx_rechecked;
            // An armed rate-limit timer fires sooner and serves the recheck too.
            if recheck && !w.timer_armed() {
                w.arm_timer(RX_RECHECK_NS);
            }
            self.rx = RxState::NoBuffers { recheck };
        } else if r.host_failed {
            self.rx = RxState::HostFailed;
        }
        self.sync(w);
    }

    /// RESET_DEVICE: forget guest-caused stops and host failures.
    pub fn reset(&mut self, w: &mut impl Watches) {
        if self.rx == RxState::Broken {
            self.rx = RxState::Off;
        }
        if self.tx == TxState::Broken {
            self.tx = TxState::Ready;
        }
        self.rx_host_failing = false;
        self.sync(w);
    }

    /// The connection is over: nothing watched, the host queue detached.
    pub fn teardown(&mut self, w: &mut impl Watches) {
        self.reconcile(Live::default(), w);
        self.sync(w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the watches and the timer; checks that the host queue is never attached twice.
    #[derive(Debug, Default)]
    struct Fake {
        host_in: bool,
        host_out: bool,
        timer_watched: bool,
        armed_ns: Option<u64>,
        attached: bool,
        attach_calls: usize,
    }

    impl Watches for Fake {
        fn watch_host_in(&mut self, on: bool) {
            self.host_in = on;
        }
        fn watch_host_out(&mut self, on: bool) {
            self.host_out = on;
        }
        fn watch_timer(&mut self, on: bool) {
            self.timer_watched = on;
        }
        fn arm_timer(&mut self, ns: u64) {
            self.armed_ns = Some(ns);
        }
        fn timer_armed(&self) -> bool {
            self.armed_ns.is_some()
        }
        fn attach_host(&mut self, on: bool) {
            assert_ne!(self.attached, on, "host queue attach/detach repeated");
            self.attached = on;
            self.attach_calls += 1;
        }
    }

    const BOTH: Live = Live { rx: true, tx: true };
    const TX_ONLY: Live = Live {
        rx: false,
        tx: true,
    };
    const RX_ONLY: Live = Live {
        rx: true,
        tx: false,
    };
    const NONE: Live = Live {
        rx: false,
        tx: false,
    };

    /// The round a datapath pass reports when it reported what `set` writes (all else: nothing
    /// happened), e.g. `round(|r: &mut TxRound| r.blocked = true)`.
    fn round<R: Default>(set: impl FnOnce(&mut R)) -> R {
        let mut r = R::default();
        set(&mut r);
        r
    }

    fn active() -> (PairState, Fake) {
        let mut s = PairState::default();
        let mut w = Fake::default();
        s.on_event(Event::VringState, BOTH, &mut w);
        (s, w)
    }

    /// An active pair after one TX round that reported what `set` writes.
    fn active_after_tx(set: impl FnOnce(&mut TxRound)) -> (PairState, Fake) {
        let (mut s, mut w) = active();
        s.after_tx(round(set), &mut w);
        (s, w)
    }

    /// An active pair after one RX round that reported what `set` writes.
    fn active_after_rx(set: impl FnOnce(&mut RxRound)) -> (PairState, Fake) {
        let (mut s, mut w) = active();
        s.after_rx(round(set), &mut w);
        (s, w)
    }

    #[test]
    fn a_pair_with_no_live_ring_watches_nothing_and_stays_detached() {
        let mut s = PairState::default();
        let mut w = Fake::default();
        s.on_event(Event::TxKick, NONE, &mut w);
        assert!(!s.active && !w.attached && !w.host_in && !w.timer_watched);
        assert!(!s.tx_runs() && !s.rx_runs());
    }

    #[test]
    fn a_live_ring_attaches_the_host_queue_and_watches_it_and_the_timer() {
        let (s, w) = active();
        assert!(s.active && w.attached && w.host_in && w.timer_watched && !w.host_out);
        assert_eq!((s.rx, s.tx), (RxState::Watching, TxState::Ready));
        assert!(s.tx_runs() && s.rx_runs());
    }

    #[test]
    fn tx_only_pair_does_not_watch_the_host_queue_for_input() {
        let mut s = PairState::default();
        let mut w = Fake::default();
        s.on_event(Event::VringState, TX_ONLY, &mut w);
        assert!(w.attached && !w.host_in);
        assert_eq!(s.rx, RxState::Off);
        assert!(s.tx_runs());
    }

    #[test]
    fn both_rings_stopping_detaches_once_and_unwatches_everything() {
        let (mut s, mut w) = active_after_tx(|r| r.blocked = true);
        assert!(w.host_out);
        s.on_event(Event::VringState, NONE, &mut w);
        assert!(!w.attached && !w.host_in && !w.host_out && !w.timer_watched);
        assert_eq!(w.attach_calls, 2);
        assert_eq!((s.rx, s.tx), (RxState::Off, TxState::Ready));
        // Staying stopped does not detach again (the fake asserts that).
        s.on_event(Event::TxKick, NONE, &mut w);
    }

    #[test]
    fn tx_eagain_waits_for_writable_and_kicks_do_not_run_tx_meanwhile() {
        let (mut s, mut w) = active_after_tx(|r| r.blocked = true);
        assert_eq!(s.tx, TxState::WaitingForHost);
        assert!(w.host_out && !s.tx_runs());
        s.on_event(Event::TxKick, BOTH, &mut w);
        assert!(!s.tx_runs(), "a kick must not retry a blocked write");
        s.on_event(Event::HostWritable, BOTH, &mut w);
        assert!(s.tx_runs() && !w.host_out);
    }

    #[test]
    fn tx_over_the_rate_limit_arms_the_timer_and_resumes_when_it_fires() {
        let (mut s, mut w) = active_after_tx(|r| (r.blocked, r.limited_ns) = (true, 5_000));
        assert_eq!(s.tx, TxState::Throttled);
        assert_eq!(w.armed_ns, Some(5_000));
        assert!(!w.host_out, "a throttled TX does not wait for EPOLLOUT");
        s.on_event(Event::TxKick, BOTH, &mut w);
        assert!(!s.tx_runs());
        s.on_event(Event::Timer, BOTH, &mut w);
        assert!(s.tx_runs());
    }

    #[test]
    fn guest_breaking_the_tx_ring_stops_tx_until_the_ring_is_reinitialised() {
        let (mut s, mut w) = active_after_tx(|r| r.broken = true);
        s.on_event(Event::TxKick, BOTH, &mut w);
        assert_eq!(s.tx, TxState::Broken);
        assert!(!s.tx_runs() && s.rx_runs(), "RX keeps working");
        // The frontend stops the TX ring (GET_VRING_BASE) and starts it again.
        s.on_event(Event::VringState, RX_ONLY, &mut w);
        s.on_event(Event::VringState, BOTH, &mut w);
        assert!(s.tx_runs());
    }

    #[test]
    fn guest_breaking_the_rx_ring_unwatches_the_host_queue_until_reset() {
        let (mut s, mut w) = active_after_rx(|r| r.broken = true);
        assert_eq!(s.rx, RxState::Broken);
        assert!(!w.host_in);
        s.on_event(Event::RxKick, BOTH, &mut w);
        assert!(!w.host_in, "a kick does not revive a broken ring");
        s.reset(&mut w);
        s.on_event(Event::VringState, BOTH, &mut w);
        assert!(w.host_in && s.rx_runs());
    }

    #[test]
    fn rx_without_guest_buffers_unwatches_and_rechecks_once_per_episode() {
        let (mut s, mut w) = active_after_rx(|r| r.no_buffers = true);
        assert_eq!(s.rx, RxState::NoBuffers { recheck: true });
        assert!(!w.host_in);
        assert_eq!(w.armed_ns, Some(RX_RECHECK_NS));
        w.armed_ns = None; // it fired
        s.on_event(Event::Timer, BOTH, &mut w);
        assert!(w.host_in && s.rx_rechecked);
        // Still no buffers: no second recheck in the same episode (no polling).
        s.after_rx(round(|r: &mut RxRound| r.no_buffers = true), &mut w);
        assert_eq!(s.rx, RxState::NoBuffers { recheck: false });
        assert_eq!(w.armed_ns, None);
        s.on_event(Event::Timer, BOTH, &mut w);
        assert!(
            !w.host_in,
            "a stray timer does not revive RX without a recheck"
        );
        // The guest posts buffers: watching again; a delivered frame ends the episode.
        s.on_event(Event::RxKick, BOTH, &mut w);
        assert!(w.host_in);
        s.after_rx(round(|r: &mut RxRound| r.frames = 3), &mut w);
        assert!(!s.rx_rechecked);
    }

    #[test]
    fn rx_recheck_does_not_override_an_armed_rate_limit_timer() {
        let (mut s, mut w) = active();
        w.armed_ns = Some(1_000);
        s.after_rx(round(|r: &mut RxRound| r.no_buffers = true), &mut w);
        assert_eq!(w.armed_ns, Some(1_000));
        s.on_event(Event::Timer, BOTH, &mut w);
        assert!(w.host_in, "the earlier timer serves the recheck too");
    }

    #[test]
    fn rx_over_the_rate_limit_stops_watching_until_the_timer_even_if_the_guest_kicks() {
        let (mut s, mut w) = active_after_rx(|r| (r.frames, r.limited_ns) = (1, 7_000));
        assert_eq!(s.rx, RxState::Throttled);
        assert!(!w.host_in);
        assert_eq!(w.armed_ns, Some(7_000));
        s.on_event(Event::RxKick, BOTH, &mut w);
        assert!(!w.host_in, "a kick must not bypass the limiter");
        s.on_event(Event::Timer, BOTH, &mut w);
        assert!(w.host_in);
    }

    #[test]
    fn host_queue_error_or_hangup_unwatches_until_the_guest_kicks() {
        let (mut s, mut w) = active();
        s.on_event(Event::HostReadable { failed: true }, BOTH, &mut w);
        assert_eq!(s.rx, RxState::HostFailed);
        assert!(
            !w.host_in,
            "an fd in error stays readable: watching it would spin"
        );
        s.on_event(Event::RxKick, BOTH, &mut w);
        assert!(w.host_in);
        s.after_rx(round(|r: &mut RxRound| r.host_failed = true), &mut w);
        assert!(!w.host_in);
    }

    #[test]
    fn teardown_detaches_and_unwatches_whatever_the_state() {
        let rx_states: [fn(&mut RxRound); 3] = [
            |r| r.no_buffers = true,
            |r| r.limited_ns = 1,
            |r| r.broken = true,
        ];
        for rx_state in rx_states {
            let (mut s, mut w) = active_after_rx(rx_state);
            s.after_tx(round(|r: &mut TxRound| r.blocked = true), &mut w);
            s.teardown(&mut w);
            assert!(!w.attached && !w.host_in && !w.host_out && !w.timer_watched);
            assert_eq!(s, PairState::default());
        }
    }
}
