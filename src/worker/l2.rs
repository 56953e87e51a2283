//! The guest's layer 2 on the macvtap: the multicast groups it joins (learned from the IGMP/MLD
//! reports it sends, [`crate::datapath::mcast`]) go into the macvtap's multicast filter, and it
//! is asked to report them (general queries injected into its RX queue).
//!
//! One [`GuestL2`] per connection, shared by the connection's queue pairs: each pair's TX path
//! hands it the multicast frames it sends ([`GuestL2::watch`]); the connection's ticker expires
//! silent groups and schedules queries ([`GuestL2::tick`]); closing the connection removes every
//! group ([`GuestL2::clear`]). The filter itself ([`FilterSink`]) is opened at start-up and
//! outlives connections.
//!
//! Errors applying a diff are the host's: logged once per failure episode, and the next change
//! resyncs from the table.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use serde::Serialize;

use crate::datapath::mcast::{
    self, Diff, McastCounters, MembershipTable, QueryRound, TableConfig, IGMPV3_QUERY_FRAME_LEN,
    MLDV2_QUERY_FRAME_LEN,
};
use crate::datapath::tx::{SharedMac, TxWatch};
use crate::datapath::{HostQueue, IoVecBuf};
use crate::host::mcfilter::{McFilter, McFilterError};

/// What `--rx-filter` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RxFilterMode {
    /// Follow the guest's reports: its groups go into the macvtap's filter (the default).
    #[default]
    Follow,
    /// The macvtap takes every multicast frame (allmulticast): simple, more traffic.
    AllMulti,
    /// Only the macvtap's own groups (the behaviour before following existed).
    Strict,
}

impl std::str::FromStr for RxFilterMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "follow" => Ok(RxFilterMode::Follow),
            "allmulti" => Ok(RxFilterMode::AllMulti),
            "strict" => Ok(RxFilterMode::Strict),
            _ => Err(format!(
                "'{s}' is not a mode; expected follow, allmulti or strict"
            )),
        }
    }
}

/// Where membership changes go: the macvtap's filter ([`McFilter`]), or a fake in tests.
pub trait FilterSink: Send + std::fmt::Debug {
    /// Applies one diff: removals, additions, then allmulticast.
    fn apply(&mut self, diff: &Diff) -> Result<(), McFilterError>;
}

impl FilterSink for McFilter {
    fn apply(&mut self, diff: &Diff) -> Result<(), McFilterError> {
        McFilter::apply(self, &diff.remove, &diff.add, diff.allmulti)
    }
}

/// The device's layer-2 counters, for the stats socket and Prometheus. They live for the whole
/// process; each connection's table updates them.
#[derive(Debug, Default)]
pub struct L2Stats {
    counters: Mutex<McastCounters>,
    /// Queries injected toward the guest.
    pub queries_sent: AtomicU64,
    /// Diffs the macvtap refused.
    pub filter_errors: AtomicU64,
    /// Times the guest was seen sending from a MAC other than its own (once per new MAC).
    pub guest_mac_changes_seen: AtomicU64,
    /// Guest MAC changes applied to the macvtap (`--trust-guest-rx-filters`).
    pub guest_mac_changes_applied: AtomicU64,
    /// The last foreign guest MAC said (one line per new MAC, whoever saw it: the TX path or
    /// QMP).
    foreign_told: Mutex<Option<[u8; 6]>>,
}

/// A point-in-time copy of [`L2Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct L2Snapshot {
    /// The membership table's counters.
    #[serde(flatten)]
    pub table: McastCounters,
    /// Queries injected toward the guest.
    pub queries_sent: u64,
    /// Diffs the macvtap refused.
    pub filter_errors: u64,
    /// Times the guest was seen sending from a MAC other than its own.
    pub guest_mac_changes_seen: u64,
    /// Guest MAC changes applied to the macvtap.
    pub guest_mac_changes_applied: u64,
}

impl L2Stats {
    /// The guest uses MAC `new` while its receive path stays on `own` (not trusted, or not yet
    /// followed): counted and said once per new MAC, whether TX or QMP noticed.
    pub fn guest_left_its_mac(&self, new: [u8; 6], own: [u8; 6]) {
        let mut told = self.foreign_told.lock().unwrap_or_else(|e| e.into_inner());
        if *told == Some(new) {
            return;
        }
        *told = Some(new);
        self.guest_mac_changes_seen.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "the guest changed its MAC to {}; its receive path stays on {} because \
             --trust-guest-rx-filters is off",
            crate::host::MacAddr(new),
            crate::host::MacAddr(own),
        );
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> L2Snapshot {
        L2Snapshot {
            table: *self.counters.lock().unwrap_or_else(|e| e.into_inner()),
            queries_sent: self.queries_sent.load(Ordering::Relaxed),
            filter_errors: self.filter_errors.load(Ordering::Relaxed),
            guest_mac_changes_seen: self.guest_mac_changes_seen.load(Ordering::Relaxed),
            guest_mac_changes_applied: self.guest_mac_changes_applied.load(Ordering::Relaxed),
        }
    }
}

impl L2Snapshot {
    /// Counter names and values (for tables and Prometheus).
    pub fn fields(&self) -> Vec<(&'static str, u64)> {
        let t = &self.table;
        vec![
            ("mcast_groups", t.groups),
            ("mcast_joins", t.joins),
            ("mcast_refreshes", t.refreshes),
            ("mcast_leaves", t.leaves),
            ("mcast_expiries", t.expiries),
            ("mcast_refused_joins", t.refused_joins),
            ("mcast_overflows", t.overflows),
            ("mcast_reports", t.reports),
            ("mcast_malformed", t.malformed),
            ("mcast_incomplete", t.incomplete),
            ("mcast_queries_sent", self.queries_sent),
            ("mcast_filter_errors", self.filter_errors),
            ("guest_mac_changes_seen", self.guest_mac_changes_seen),
            ("guest_mac_changes_applied", self.guest_mac_changes_applied),
        ]
    }
}

/// Frames waiting to be delivered to the guest's RX queue ahead of the host queue's (the
/// general queries), and the eventfd that wakes the queue pair that delivers them.
#[derive(Debug)]
pub struct Injector {
    pending: Mutex<Vec<Vec<u8>>>,
    wake: EventFd,
}

/// At most this many frames wait; more are dropped (a guest without RX buffers for minutes).
const MAX_PENDING: usize = 4;

impl Injector {
    /// An empty injector.
    pub fn new() -> io::Result<Injector> {
        Ok(Injector {
            pending: Mutex::new(Vec::with_capacity(MAX_PENDING)),
            wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Vec<u8>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `frame` (an Ethernet frame, no vnet header) and wakes the delivering pair.
    pub fn push(&self, frame: &[u8]) -> bool {
        {
            let mut p = self.lock();
            if p.len() >= MAX_PENDING {
                return false;
            }
            p.push(frame.to_vec());
        }
        let _ = self.wake.write(1);
        true
    }

    /// Whether a frame waits.
    pub fn has_pending(&self) -> bool {
        !self.lock().is_empty()
    }

    /// The eventfd the delivering pair watches.
    pub fn wake_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.wake)
    }

    /// Clears the wake-up.
    pub fn consume_wake(&self) {
        let _ = self.wake.read();
    }

    fn pop(&self) -> Option<Vec<u8>> {
        let mut p = self.lock();
        (!p.is_empty()).then(|| p.remove(0))
    }
}

/// A host queue whose reads first deliver the injector's frames (behind a zeroed vnet header of
/// `hdr_len` bytes), then the real queue's.
#[derive(Debug)]
pub struct Injecting<'a, H> {
    inner: &'a H,
    injector: &'a Injector,
    hdr_len: usize,
}

impl<'a, H> Injecting<'a, H> {
    /// `inner` with `injector`'s frames first.
    pub fn new(inner: &'a H, injector: &'a Injector, hdr_len: usize) -> Self {
        Injecting {
            inner,
            injector,
            hdr_len,
        }
    }
}

impl<H: HostQueue> std::os::fd::AsRawFd for Injecting<'_, H> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.inner.as_raw_fd()
    }
}

impl<H: HostQueue> HostQueue for Injecting<'_, H> {
    fn send_frame(&self, frame: &IoVecBuf<'_>) -> io::Result<usize> {
        self.inner.send_frame(frame)
    }

    fn recv_frame(&self, bufs: &IoVecBuf<'_>) -> io::Result<usize> {
        if let Some(frame) = self.injector.pop() {
            let len = self.hdr_len + frame.len();
            if len <= bufs.total_len() {
                // The header's fields are all zero (no offloads); the datapath fills
                // `num_buffers`.
                let zeros = [0u8; crate::host::VNET_HDR_LEN_V1];
                bufs.write_at(0, &zeros[..self.hdr_len]);
                bufs.write_at(self.hdr_len, &frame);
                return Ok(len);
            }
            // Buffers too small for a 90-byte query: drop it rather than fail the queue.
        }
        self.inner.recv_frame(bufs)
    }
}

/// What the host side offers for following: the macvtap's filter (opened at start-up, `None`
/// when not following), the table's limits, and the process-wide counters.
#[derive(Clone, Default)]
pub struct L2Host {
    /// The macvtap's multicast filter; `None` for `--rx-filter allmulti`/`strict` and taps.
    pub filter: Option<Arc<Mutex<dyn FilterSink>>>,
    /// Cap and timeouts of the membership table.
    pub table: TableConfig,
    /// The device's counters.
    pub stats: Arc<L2Stats>,
    /// The guest's MAC as the TX watch compares it, when something outside a connection (the
    /// `--trust-guest-rx-filters` path) may move it; `None`: the device's MAC, fixed.
    pub guest_mac: Option<Arc<SharedMac>>,
}

impl std::fmt::Debug for L2Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2Host")
            .field("following", &self.filter.is_some())
            .field("table", &self.table)
            .finish()
    }
}

/// When the first query goes out after a connection starts: the guest's driver is up by then
/// on any frontend we know. That query asks for answers within
/// [`mcast::STARTUP_QUERY_RESPONSE_INTERVAL`] (1 s), so the guest's memberships are back about
/// 2 s after a restart or a take-over; the periodic ones within 10 s.
pub const FIRST_QUERY_AFTER: Duration = Duration::from_secs(1);

struct Inner {
    table: MembershipTable,
    diff: Diff,
    /// `None`: not following (`--rx-filter allmulti` or `strict`, or a tap).
    filter: Option<Arc<Mutex<dyn FilterSink>>>,
    /// The last apply failed: the next change resyncs the whole list.
    failing: bool,
    /// The overflow to allmulticast was said (one warn line per episode, one info line when it
    /// ends), never once per refused join.
    overflow_told: bool,
    next_query: Duration,
}

/// One connection's layer-2 following (see the module doc).
pub struct GuestL2 {
    inner: Mutex<Inner>,
    epoch: Instant,
    /// The guest's MAC as TX compares it (moves with a trusted guest's MAC change).
    guest_mac: Arc<SharedMac>,
    /// Source MAC of the queries: never the guest's.
    querier_mac: [u8; 6],
    injector: Arc<Injector>,
    stats: Arc<L2Stats>,
}

impl std::fmt::Debug for GuestL2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.guest_mac.fmt_holder(f, "GuestL2", "guest_mac")
    }
}

impl GuestL2 {
    /// Following for a guest with MAC `guest_mac`, into `filter` (`None`: only the guest's MAC
    /// is watched).
    pub fn new(
        cfg: TableConfig,
        filter: Option<Arc<Mutex<dyn FilterSink>>>,
        guest_mac: Arc<SharedMac>,
        stats: Arc<L2Stats>,
    ) -> io::Result<Arc<GuestL2>> {
        let mut querier_mac = [0x02, 0x6d, 0x76, 0x68, 0x71, 0x00];
        if querier_mac == guest_mac.get() {
            querier_mac[5] = 1;
        }
        Ok(Arc::new(GuestL2 {
            inner: Mutex::new(Inner {
                diff: Diff::with_capacity(cfg.max_groups),
                table: MembershipTable::new(cfg),
                filter,
                failing: false,
                overflow_told: false,
                next_query: FIRST_QUERY_AFTER,
            }),
            epoch: Instant::now(),
            guest_mac,
            querier_mac,
            injector: Arc::new(Injector::new()?),
            stats,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The injector whose frames the connection's first queue pair delivers.
    pub fn injector(&self) -> Arc<Injector> {
        self.injector.clone()
    }

    /// A TX watch for one queue pair: multicast frames go to this table.
    pub fn watch(self: &Arc<Self>) -> TxWatch {
        let (me, me2) = (self.clone(), self.clone());
        TxWatch::new(
            self.guest_mac.clone(),
            Box::new(move |frame, wire_len| me.learn(frame, wire_len)),
            Box::new(move |src| me2.foreign_source(src)),
        )
    }

    /// The guest sent a frame from `src`, not its own MAC: it changed its MAC (or bridges other
    /// hosts). Its receive path stays on its own MAC: a macvtap delivers unicast only to its
    /// own address. Said once per new MAC.
    pub fn foreign_source(&self, src: [u8; 6]) {
        self.stats.guest_left_its_mac(src, self.guest_mac.get());
    }

    /// One multicast frame the guest sent.
    pub fn learn(&self, frame: &[u8], wire_len: usize) {
        let now = self.now();
        let mut inner = self.lock();
        if inner.filter.is_none() {
            return;
        }
        let Inner { table, diff, .. } = &mut *inner;
        table.learn(frame, wire_len, now, diff);
        self.apply(&mut inner);
    }

    /// Expires silent groups and injects the periodic queries; call it often (every 50 ms is
    /// plenty: the times are in seconds).
    pub fn tick(&self) {
        let now = self.now();
        let mut inner = self.lock();
        if inner.filter.is_none() {
            return;
        }
        let Inner { table, diff, .. } = &mut *inner;
        if table.next_deadline().is_some_and(|d| d <= now) {
            table.expire(now, diff);
        }
        if now >= inner.next_query {
            let round = if inner.next_query == FIRST_QUERY_AFTER {
                QueryRound::Startup
            } else {
                QueryRound::Periodic
            };
            inner.next_query = now + mcast::QUERY_INTERVAL;
            let igmp: [u8; IGMPV3_QUERY_FRAME_LEN] =
                mcast::igmpv3_general_query(self.querier_mac, [0; 4], round);
            let mld: [u8; MLDV2_QUERY_FRAME_LEN] =
                mcast::mldv2_general_query(self.querier_mac, round);
            for q in [&igmp[..], &mld[..]] {
                if self.injector.push(q) {
                    self.stats.queries_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.apply(&mut inner);
    }

    /// The frontend is gone: every group leaves the macvtap's filter.
    pub fn clear(&self) {
        let mut inner = self.lock();
        let Inner { table, diff, .. } = &mut *inner;
        table.clear(diff);
        if inner.overflow_told {
            inner.overflow_told = false;
            tracing::info!(
                "the frontend disconnected: the macvtap leaves allmulticast with the guest's \
                 multicast groups"
            );
        }
        self.apply(&mut inner);
    }

    /// Says the table's overflow to allmulticast once when it starts and once when it ends
    /// (the table turns it on at the first refused join and off only after its hold).
    fn tell_overflow(&self, inner: &mut Inner) {
        let on = inner.table.allmulti();
        if on == inner.overflow_told {
            return;
        }
        inner.overflow_told = on;
        let cfg = inner.table.config();
        if on {
            tracing::warn!(
                "the guest joined more than --max-groups {} multicast groups: the macvtap takes \
                 every multicast frame (allmulticast) until the guest has fewer than {} groups \
                 and no join was refused for {:?}",
                cfg.max_groups,
                cfg.max_groups,
                cfg.overflow_hold,
            );
        } else {
            tracing::info!(
                "the guest's {} multicast groups fit --max-groups {} again and no join was \
                 refused for {:?}: the macvtap leaves allmulticast",
                inner.table.groups(),
                cfg.max_groups,
                cfg.overflow_hold,
            );
        }
    }

    /// Groups in the table now.
    pub fn groups(&self) -> usize {
        self.lock().table.groups()
    }

    fn apply(&self, inner: &mut Inner) {
        self.tell_overflow(inner);
        let counters = inner.table.counters();
        *self
            .stats
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = counters;
        if inner.diff.is_empty() && !inner.failing {
            return;
        }
        let Some(filter) = inner.filter.clone() else {
            inner.diff.clear();
            return;
        };
        let mut filter = filter.lock().unwrap_or_else(|e| e.into_inner());
        let result = if inner.failing {
            // Resync: drop what may be stale, then install the table's MACs.
            filter.apply(&Diff {
                remove: inner.diff.remove.clone(),
                add: inner.table.macs().collect(),
                allmulti: Some(inner.table.allmulti()),
            })
        } else {
            filter.apply(&inner.diff)
        };
        inner.diff.clear();
        match result {
            Ok(()) => {
                if inner.failing {
                    tracing::info!("the macvtap's multicast filter takes changes again");
                }
                inner.failing = false;
            }
            Err(e) => {
                self.stats.filter_errors.fetch_add(1, Ordering::Relaxed);
                if !inner.failing {
                    tracing::error!("cannot update the macvtap's multicast filter: {e}");
                }
                inner.failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::mcast::frames as tf;

    /// Records what the filter was told.
    #[derive(Debug, Default)]
    struct Recorder {
        macs: Vec<[u8; 6]>,
        allmulti: bool,
        fail: bool,
    }

    impl FilterSink for Recorder {
        fn apply(&mut self, diff: &Diff) -> Result<(), McFilterError> {
            if self.fail {
                return Err(McFilterError::NoSuchInterface(0));
            }
            self.macs.retain(|m| !diff.remove.contains(m));
            for m in &diff.add {
                if !self.macs.contains(m) {
                    self.macs.push(*m);
                }
            }
            if let Some(on) = diff.allmulti {
                self.allmulti = on;
            }
            Ok(())
        }
    }

    fn setup() -> (Arc<GuestL2>, Arc<Mutex<Recorder>>, Arc<L2Stats>) {
        setup_with(TableConfig::default())
    }

    fn setup_with(cfg: TableConfig) -> (Arc<GuestL2>, Arc<Mutex<Recorder>>, Arc<L2Stats>) {
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let stats = Arc::new(L2Stats::default());
        let l2 = GuestL2::new(
            cfg,
            Some(rec.clone()),
            Arc::new(SharedMac::new([0x52, 0x54, 0, 1, 2, 3])),
            stats.clone(),
        )
        .unwrap();
        (l2, rec, stats)
    }

    /// What `f` logs at info and above on this thread, as the daemon prints it.
    fn logged<R>(f: impl FnOnce() -> R) -> (R, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
            type Writer = Buf;
            fn make_writer(&'a self) -> Buf {
                self.clone()
            }
        }
        let buf = Buf::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_ansi(false)
            .with_target(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let r = tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (r, text)
    }

    /// An IGMPv2 join (0x16) or leave (0x17) of the `i`-th group of 239.128.0.0/9.
    fn igmp(kind: u8, i: u32) -> Vec<u8> {
        let [_, b, c, d] = i.to_be_bytes();
        tf::igmp_v2(kind, tf::v4(239, 128 | b, c, d), None)
    }

    #[test]
    fn ten_thousand_joins_past_the_cap_log_one_warning_and_the_end_one_info_line() {
        let hold = Duration::from_millis(200);
        let (l2, rec, stats) = setup_with(TableConfig {
            max_groups: 8,
            max_age: Duration::from_secs(3600),
            overflow_hold: hold,
        });
        let ((), log) = logged(|| {
            for i in 0..10_000 {
                let f = igmp(0x16, i);
                l2.learn(&f, f.len());
            }
        });
        print!("{log}");
        let s = stats.snapshot().table;
        assert_eq!((s.groups, s.refused_joins, s.overflows), (8, 9_992, 1));
        assert!(rec.lock().unwrap().allmulti);
        assert_eq!(
            log.lines().count(),
            1,
            "one line for 9,992 refused joins:\n{log}"
        );
        assert!(log.contains("WARN"), "{log}");
        assert!(
            log.contains("more than --max-groups 8 multicast groups")
                && log.contains("allmulticast")
                && log.contains("fewer than 8 groups and no join was refused for 200ms"),
            "{log}"
        );

        // The episode ends: below the cap once the hold is over (a leave, or the tick).
        std::thread::sleep(hold + Duration::from_millis(20));
        let ((), log) = logged(|| {
            let f = igmp(0x17, 0);
            l2.learn(&f, f.len());
            l2.tick();
            let f = igmp(0x17, 1);
            l2.learn(&f, f.len());
        });
        print!("{log}");
        assert!(!rec.lock().unwrap().allmulti);
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(
            log.contains("INFO")
                && log.contains("7 multicast groups fit --max-groups 8 again")
                && log.contains("leaves allmulticast"),
            "{log}"
        );
    }

    #[test]
    fn the_tick_expires_a_group_not_refreshed_within_max_age_and_keeps_a_refreshed_one() {
        let max_age = Duration::from_secs(2);
        let (l2, rec, stats) = setup_with(TableConfig {
            max_age,
            ..TableConfig::default()
        });
        let (silent, refreshed) = (igmp(0x16, 1), igmp(0x16, 2));
        let t0 = Instant::now();
        l2.learn(&silent, silent.len());
        l2.learn(&refreshed, refreshed.len());
        std::thread::sleep(max_age * 6 / 10);
        l2.learn(&refreshed, refreshed.len());
        l2.tick();
        assert_eq!(
            rec.lock().unwrap().macs.len(),
            2,
            "nothing is older than max_age yet"
        );
        assert_eq!(stats.snapshot().table.expiries, 0);
        std::thread::sleep((max_age + Duration::from_millis(200)).saturating_sub(t0.elapsed()));
        // Only the tick removes it: no frame arrives in between.
        assert_eq!(rec.lock().unwrap().macs.len(), 2);
        l2.tick();
        let want = tf::v4(239, 128, 0, 2).mac();
        assert_eq!(
            rec.lock().unwrap().macs,
            vec![want],
            "the silent group left"
        );
        let s = stats.snapshot().table;
        assert_eq!((s.expiries, s.groups, s.refreshes), (1, 1, 1));
    }

    #[test]
    fn an_overflow_ended_by_the_disconnect_says_so_once() {
        let (l2, rec, _) = setup_with(TableConfig {
            max_groups: 2,
            ..TableConfig::default()
        });
        let ((), log) = logged(|| {
            for i in 0..100 {
                let f = igmp(0x16, i);
                l2.learn(&f, f.len());
            }
            l2.clear();
            l2.clear();
        });
        print!("{log}");
        assert!(!rec.lock().unwrap().allmulti);
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 2, "{log}");
        assert!(lines[0].contains("WARN") && lines[0].contains("--max-groups 2"));
        assert!(lines[1].contains("INFO") && lines[1].contains("frontend disconnected"));
    }

    #[test]
    fn a_join_reaches_the_filter_and_a_leave_takes_it_out() {
        let (l2, rec, stats) = setup();
        let g = tf::v4(239, 1, 2, 3);
        let join = tf::igmp_v2(0x16, g, None);
        l2.learn(&join, join.len());
        assert_eq!(rec.lock().unwrap().macs, vec![g.mac()]);
        assert_eq!(stats.snapshot().table.joins, 1);
        let leave = tf::igmp_v2(0x17, g, None);
        l2.learn(&leave, leave.len());
        assert!(rec.lock().unwrap().macs.is_empty());
        assert_eq!(stats.snapshot().table.leaves, 1);
    }

    #[test]
    fn clearing_on_disconnect_empties_the_filter() {
        let (l2, rec, _) = setup();
        for i in 1..=5 {
            let f = tf::igmp_v2(0x16, tf::v4(239, 0, 0, i), None);
            l2.learn(&f, f.len());
        }
        assert_eq!(rec.lock().unwrap().macs.len(), 5);
        l2.clear();
        assert!(rec.lock().unwrap().macs.is_empty());
        assert_eq!(l2.groups(), 0);
    }

    #[test]
    fn a_filter_that_failed_is_resynced_from_the_table_when_it_works_again() {
        let (l2, rec, stats) = setup();
        rec.lock().unwrap().fail = true;
        let a = tf::igmp_v2(0x16, tf::v4(239, 0, 0, 1), None);
        l2.learn(&a, a.len());
        assert_eq!(stats.snapshot().filter_errors, 1);
        rec.lock().unwrap().fail = false;
        let b = tf::igmp_v2(0x16, tf::v4(239, 0, 0, 2), None);
        l2.learn(&b, b.len());
        let macs = rec.lock().unwrap().macs.clone();
        assert_eq!(
            macs.len(),
            2,
            "the group learned while failing is there too: {macs:?}"
        );
    }

    #[test]
    fn the_first_tick_after_a_second_queues_both_general_queries_with_a_short_response_time() {
        let (l2, _, stats) = setup();
        l2.tick();
        assert!(
            !l2.injector.has_pending(),
            "no query before the guest is up"
        );
        std::thread::sleep(FIRST_QUERY_AFTER + Duration::from_millis(20));
        l2.tick();
        assert_eq!(stats.snapshot().queries_sent, 2);
        let igmp = l2.injector.pop().unwrap();
        let mld = l2.injector.pop().unwrap();
        assert_eq!(
            igmp[..],
            mcast::igmpv3_general_query(l2.querier_mac, [0; 4], QueryRound::Startup)[..],
            "the first round asks for answers within 1 s"
        );
        assert_eq!(
            mld[..],
            mcast::mldv2_general_query(l2.querier_mac, QueryRound::Startup)[..]
        );
        assert_ne!(
            &igmp[6..12],
            &[0x52, 0x54, 0, 1, 2, 3],
            "never from the guest's MAC"
        );
        l2.tick();
        assert!(
            !l2.injector.has_pending(),
            "the next round is QUERY_INTERVAL away"
        );
    }

    #[test]
    fn injected_frames_come_first_behind_a_zero_header_then_the_host_queue() {
        use crate::testkit::FakeHostQueue;
        use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
        let inj = Injector::new().unwrap();
        assert!(inj.push(&[0xaa; 60]));
        let q = FakeHostQueue::new();
        q.inject_frame(&[0x11; 72]);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut buf = IoVecBuf::with_capacity(1);
        buf.push(&mem.get_slice(GuestAddress(0), 0x800).unwrap());
        let h = Injecting::new(&q, &inj, 12);
        assert_eq!(h.recv_frame(&buf).unwrap(), 72);
        let mut got = [0u8; 72];
        buf.read_at(0, &mut got);
        assert_eq!(&got[..12], &[0u8; 12]);
        assert_eq!(&got[12..], &[0xaa; 60]);
        assert_eq!(
            h.recv_frame(&buf).unwrap(),
            72,
            "then the host queue's frame"
        );
        buf.read_at(0, &mut got);
        assert_eq!(got, [0x11; 72]);
    }

    #[test]
    fn a_foreign_source_mac_is_counted_once_per_new_mac() {
        let (l2, _, stats) = setup();
        for _ in 0..100 {
            l2.foreign_source([0x02, 0, 0, 0, 0, 1]);
        }
        l2.foreign_source([0x02, 0, 0, 0, 0, 2]);
        assert_eq!(stats.snapshot().guest_mac_changes_seen, 2);
    }

    #[test]
    fn without_a_filter_nothing_is_learned_or_queried() {
        let stats = Arc::new(L2Stats::default());
        let l2 = GuestL2::new(
            TableConfig::default(),
            None,
            Arc::new(SharedMac::new([0x52, 0, 0, 0, 0, 1])),
            stats.clone(),
        )
        .unwrap();
        let f = tf::igmp_v2(0x16, tf::v4(239, 0, 0, 1), None);
        l2.learn(&f, f.len());
        std::thread::sleep(FIRST_QUERY_AFTER + Duration::from_millis(20));
        l2.tick();
        assert_eq!(l2.groups(), 0);
        assert!(!l2.injector.has_pending());
        assert_eq!(stats.snapshot().queries_sent, 0);
    }

    #[test]
    fn the_injector_holds_a_bounded_number_of_frames() {
        let inj = Injector::new().unwrap();
        for _ in 0..MAX_PENDING {
            assert!(inj.push(&[1; 60]));
        }
        assert!(!inj.push(&[1; 60]));
    }
}
