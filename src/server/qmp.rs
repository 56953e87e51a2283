//! The guest's receive filter as QEMU sees it, read over QMP (`--qmp PATH`).
//!
//! Under vhost-user QEMU keeps the control virtqueue: when the guest changes its MAC, its
//! unicast or multicast address lists or its rx modes, only QEMU hears of it. QEMU announces each
//! change with a `NIC_RX_FILTER_CHANGED` event on every monitor, then stays silent about that
//! NIC until someone runs `query-rx-filter` for it (its rate limit). [`Watcher`] runs that
//! protocol on its own thread (`qmp`) and hands every new filter of our NIC to a callback, as a
//! typed, bounded [`RxFilter`]:
//!
//! 1. connect to the socket (QEMU: `-qmp unix:PATH,server=on,wait=off`), read the greeting,
//!    send `qmp_capabilities`;
//! 2. `query-rx-filter`, pick our NIC (below) and deliver its filter: the first filter of every
//!    connection is delivered, so a consumer re-syncs after QEMU restarts;
//! 3. on each `NIC_RX_FILTER_CHANGED` that may be ours, `query-rx-filter name=OURS` (which also
//!    re-arms the event) and deliver the filter when it differs from the last one delivered;
//! 4. when the connection ends (QEMU exited, restarted, or said something we refuse), back to 1
//!    after a backoff (100 ms doubling to 5 s, reset once a connection works).
//!
//! Events that arrive while a query is outstanding mark the NIC dirty and cost one more query
//! after the answer, however many they were; queries are at least 20 ms apart. So a guest that
//! flips its filter in a loop costs at most 50 queries a second.
//!
//! # Which NIC
//! With `--qmp-nic ID` (the NIC's `-device …,id=ID`; libvirt's alias, e.g. `net0`), that one.
//! Without it: the VM's only NIC, or among several the only one whose current MAC is ours
//! (`--mac`, or the macvtap's). Otherwise the connection fails with an operator error that asks
//! for `--qmp-nic`. A NIC without an `id` is named `MODEL.N` by QEMU (`virtio-net-pci.0`), and
//! its events carry only a QOM `path`, no `name`: such events are taken as maybe ours.
//!
//! # Bounds (the monitor's output is untrusted input, and the filter in it is the guest's)
//! - Lines (one JSON message each, QEMU's compact output) of at most [`MAX_LINE`] bytes; a
//!   longer one ends the connection. `-mon …,pretty=on` output is not supported.
//! - Nesting of at most [`MAX_DEPTH`], checked before parsing; a line that is not JSON, nests too
//!   deep or has an unknown shape is skipped and counted (a reply lost that way times out, and
//!   the connection is made again).
//! - At most [`MAX_NICS`] NICs in a listing and [`MAX_TABLE`] entries per address table (QEMU
//!   keeps 64 in all): entries past that are dropped and the table's overflow flag set, which
//!   means "receive all" as in QEMU. Entries that are not MACs, or whose group bit disagrees
//!   with their table, are dropped and counted (the guest wrote them). A filter whose main MAC
//!   is not a unicast MAC is refused and counted.
//! - Answers within 5 s of a command, writes within 5 s.
//!
//! Each class of failure is logged once (at warn) until a connection works again; the rest go
//! to debug. [`QmpStats`] counts connections, events, queries, delivered filters and refused
//! input.
//!
//! # QEMU 7.2 facts (measured)
//! - `broadcast-allowed` reports the guest's *no-broadcast* flag (false while broadcast is
//!   received), so it is not passed on.
//! - A NIC is promiscuous after reset until the guest's driver sets its rx mode, and reports a
//!   VLAN table of all 4096 ids until then (a 24 KB line).
//! - Every change is one event: a guest bringing its interface up produces a dozen.
//!
//! The consumer decides what to do with a filter (`--trust-guest-rx-filters`); this module
//! only reads.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use serde_json::{Map, Value};

use crate::host::MacAddr;

/// Longest QMP line accepted, in bytes (QEMU's largest answer here is ~24 KB).
pub const MAX_LINE: usize = 64 * 1024;
/// Deepest JSON nesting accepted (QMP's messages nest 4 deep).
pub const MAX_DEPTH: usize = 16;
/// Most entries kept per address table (QEMU's `MAC_TABLE_ENTRIES`).
pub const MAX_TABLE: usize = 64;
/// Most NICs considered in one `query-rx-filter` listing.
pub const MAX_NICS: usize = 64;
/// Longest NIC name kept.
const MAX_NAME: usize = 256;
/// Minimum time between two queries.
const MIN_QUERY_GAP: Duration = Duration::from_millis(20);

/// `--qmp`, `--qmp-nic` and `--trust-guest-rx-filters`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpSettings {
    /// QEMU's QMP socket.
    pub path: PathBuf,
    /// The NIC's id (`-device virtio-net-pci,id=ID`); `None`: found by the rules of the module
    /// doc.
    pub nic: Option<String>,
    /// Apply the guest's filter to the macvtap (otherwise it is only observed).
    pub trust: bool,
}

/// What a [`Watcher`] watches, and how patiently.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// QEMU's QMP socket.
    pub path: PathBuf,
    /// Our NIC's name, when the operator gave it.
    pub nic: Option<String>,
    /// Our MAC: picks our NIC among several when `nic` is not given.
    pub mac_hint: Option<MacAddr>,
    /// How long QEMU may take to answer a command (and to take a write).
    pub reply_timeout: Duration,
    /// First delay before connecting again.
    pub backoff_first: Duration,
    /// Longest delay between connection attempts.
    pub backoff_max: Duration,
}

impl WatchConfig {
    /// The production timings: 5 s answers, backoff 100 ms → 5 s.
    pub fn new(path: PathBuf, nic: Option<String>, mac_hint: Option<MacAddr>) -> WatchConfig {
        WatchConfig {
            path,
            nic,
            mac_hint,
            reply_timeout: Duration::from_secs(5),
            backoff_first: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Starts the `--qmp` watcher. With `trust` (`--trust-guest-rx-filters`) every filter is applied
/// to the macvtap; without, a guest MAC other than `device_mac` is counted and said once (in
/// `l2`, shared with the TX path's own detection).
pub(super) fn follow(
    settings: &QmpSettings,
    device_mac: MacAddr,
    mut trust: Option<super::trust::Trust>,
    l2: std::sync::Arc<crate::worker::l2::L2Stats>,
) -> Result<Watcher, QmpError> {
    let cfg = WatchConfig::new(
        settings.path.clone(),
        settings.nic.clone(),
        Some(device_mac),
    );
    Watcher::spawn(cfg, move |f: &RxFilter| {
        super::trust::on_filter(trust.as_mut(), f, device_mac, &l2)
    })
}

/// One of QEMU's rx modes for unicast or multicast frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxMode {
    /// Frames to the listed addresses (and, for unicast, the main MAC).
    Normal,
    /// No such frames (`nouni` / `nomulti`).
    None,
    /// All such frames (`alluni` / `allmulti`).
    All,
}

/// The guest's receive filter of one NIC, as QEMU reported it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFilter {
    /// QEMU's name of the NIC (its `id`, or `MODEL.N`).
    pub nic: String,
    /// The guest's current MAC (a unicast address).
    pub mac: MacAddr,
    /// The guest asked for every frame.
    pub promisc: bool,
    /// Unicast mode.
    pub unicast_mode: RxMode,
    /// Extra unicast addresses (macvlan, bonding in the guest...), at most [`MAX_TABLE`].
    pub unicast: Vec<MacAddr>,
    /// The guest's unicast list did not fit (QEMU's, or ours): receive all unicast.
    pub unicast_overflow: bool,
    /// Multicast mode.
    pub multicast_mode: RxMode,
    /// Multicast addresses the guest listens to, at most [`MAX_TABLE`].
    pub multicast: Vec<MacAddr>,
    /// The guest's multicast list did not fit: receive all multicast.
    pub multicast_overflow: bool,
}

impl RxFilter {
    /// Every multicast frame is wanted (mode `all`, or the list overflowed).
    pub fn allmulti(&self) -> bool {
        self.multicast_mode == RxMode::All || self.multicast_overflow
    }

    /// Every unicast frame is wanted (mode `all`, or the list overflowed).
    pub fn alluni(&self) -> bool {
        self.unicast_mode == RxMode::All || self.unicast_overflow
    }
}

impl std::fmt::Display for RxFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = |m: RxMode| match m {
            RxMode::Normal => "normal",
            RxMode::None => "none",
            RxMode::All => "all",
        };
        write!(
            f,
            "nic {} mac {} promisc {} unicast {}{} +{} multicast {}{} {}",
            self.nic,
            self.mac,
            self.promisc,
            mode(self.unicast_mode),
            if self.unicast_overflow {
                "/overflow"
            } else {
                ""
            },
            self.unicast.len(),
            mode(self.multicast_mode),
            if self.multicast_overflow {
                "/overflow"
            } else {
                ""
            },
            self.multicast.len(),
        )
    }
}

/// Why a QMP connection failed, and whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    // --- Operator: the socket or the NIC named is not usable ---
    /// Nothing listens on the path (yet): QEMU not started, or another path.
    #[error(
        "cannot connect to QEMU's QMP socket {path:?}: {source} (QEMU needs -qmp \
         unix:PATH,server=on,wait=off)"
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// What answered is not a QMP monitor.
    #[error("{path:?} is not a QMP monitor (its first message has no \"QMP\" greeting)")]
    NotQmp {
        /// The socket.
        path: PathBuf,
    },
    /// The VM has no NIC with an rx filter.
    #[error("QEMU lists no NIC with an rx filter")]
    NoNic,
    /// Several NICs and none of them recognisably ours.
    #[error(
        "the VM has several NICs ({names}) and not exactly one has our MAC {mac}: give --qmp-nic ID"
    )]
    AmbiguousNic {
        /// The NICs QEMU listed.
        names: String,
        /// The MAC looked for.
        mac: String,
    },
    /// `--qmp-nic` names no NIC of this VM.
    #[error("--qmp-nic {want}: QEMU refused to query it: {desc}")]
    NicNotFound {
        /// The name given.
        want: String,
        /// QEMU's words.
        desc: String,
    },
    // --- Host ---
    /// The thread or its eventfd could not be made.
    #[error("cannot start the QMP watcher: {0}")]
    Start(io::Error),
    // --- QEMU (or whatever speaks on the socket) ---
    /// The connection ended.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// Reading or writing failed.
    #[error("QMP socket: {0}")]
    Io(io::Error),
    /// A line longer than [`MAX_LINE`].
    #[error("a QMP line is longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// No answer in time.
    #[error("no answer to {command} within {timeout:?}")]
    Timeout {
        /// The command.
        command: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
    /// QEMU answered a command with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Refused {
        /// The command.
        command: &'static str,
        /// QMP error class.
        class: String,
        /// QMP error text.
        desc: String,
    },
    /// An answer that is JSON but not what the command returns.
    #[error("QEMU's answer to {command} is malformed: {reason}")]
    BadAnswer {
        /// The command.
        command: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl QmpError {
    /// True when the operator must fix something (socket path, `--qmp-nic`).
    pub fn is_operator_error(&self) -> bool {
        self.class().1
    }

    /// The failure class, for logging each class once, and whether the operator must fix it
    /// (the rest are QEMU's, the connection's or the host's): one exhaustive table, so a new
    /// variant cannot go unclassified.
    fn class(&self) -> (&'static str, bool) {
        const OPERATOR: bool = true;
        const OTHERS: bool = false;
        match self {
            QmpError::Connect { .. } => ("connect", OPERATOR),
            QmpError::NotQmp { .. } => ("not-qmp", OPERATOR),
            QmpError::NoNic => ("no-nic", OPERATOR),
            QmpError::AmbiguousNic { .. } => ("ambiguous-nic", OPERATOR),
            QmpError::NicNotFound { .. } => ("nic-not-found", OPERATOR),
            QmpError::Start(_) => ("start", OTHERS),
            QmpError::Closed => ("closed", OTHERS),
            QmpError::Io(_) => ("io", OTHERS),
            QmpError::LineTooLong => ("line-too-long", OTHERS),
            QmpError::Timeout { .. } => ("timeout", OTHERS),
            QmpError::Refused { .. } => ("refused", OTHERS),
            QmpError::BadAnswer { .. } => ("bad-answer", OTHERS),
        }
    }
}

/// Counters of a [`Watcher`].
#[derive(Debug, Default)]
pub struct QmpStats {
    /// Connections that got through the handshake and found the NIC.
    pub connects: AtomicU64,
    /// `NIC_RX_FILTER_CHANGED` events taken as maybe ours.
    pub events: AtomicU64,
    /// `query-rx-filter` commands sent.
    pub queries: AtomicU64,
    /// Filters handed to the callback.
    pub filters: AtomicU64,
    /// Lines skipped (not JSON, too deep, unknown shape), table entries dropped and filters
    /// refused.
    pub bad_input: AtomicU64,
}

impl QmpStats {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// `(connects, events, queries, filters, bad_input)` now.
    pub fn snapshot(&self) -> [u64; 5] {
        [
            &self.connects,
            &self.events,
            &self.queries,
            &self.filters,
            &self.bad_input,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }
}

/// The `qmp` thread. Dropping it stops the thread (an eventfd wakes its `poll`) and joins it.
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<QmpStats>,
}

impl Watcher {
    /// Starts watching; `on_filter` runs on the watcher's thread with each new filter.
    pub fn spawn(
        cfg: WatchConfig,
        on_filter: impl FnMut(&RxFilter) + Send + 'static,
    ) -> Result<Watcher, QmpError> {
        let stop = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| QmpError::Start(e.into()))?,
        );
        let stats = Arc::new(QmpStats::default());
        let mut run = Run {
            cfg,
            stop: stop.clone(),
            stats: stats.clone(),
            on_filter,
            logged: Logged::default(),
            buf: Vec::with_capacity(MAX_LINE + 4096),
        };
        let thread = std::thread::Builder::new()
            .name("qmp".into())
            .spawn(move || run.run())
            .map_err(QmpError::Start)?;
        Ok(Watcher {
            stop,
            thread: Some(thread),
            stats,
        })
    }

    /// The watcher's counters.
    pub fn stats(&self) -> &Arc<QmpStats> {
        &self.stats
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            tracing::warn!("cannot wake the QMP watcher: {e}");
            return; // joining could hang
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("QMP watcher thread panicked");
            }
        }
    }
}

/// Why a session ended.
enum End {
    /// The watcher is being dropped.
    Stop,
    /// The connection failed or ended.
    Failed(QmpError),
}

impl From<QmpError> for End {
    fn from(e: QmpError) -> End {
        End::Failed(e)
    }
}

/// The watcher thread's state.
struct Run<F> {
    cfg: WatchConfig,
    stop: Arc<EventFd>,
    stats: Arc<QmpStats>,
    on_filter: F,
    /// Failure classes logged at warn since the last working connection.
    logged: Logged,
    /// The line buffer, reused by every connection.
    buf: Vec<u8>,
}

impl<F: FnMut(&RxFilter)> Run<F> {
    fn run(&mut self) {
        let mut backoff = self.cfg.backoff_first;
        loop {
            let mut established = false;
            match self.session(&mut established) {
                End::Stop => return,
                End::Failed(e) => {
                    if established {
                        // A working connection ended: a new outage gets its log lines again.
                        self.logged.clear();
                        backoff = self.cfg.backoff_first;
                    }
                    let level_info = established && matches!(e, QmpError::Closed);
                    self.logged
                        .once(e.class().0, level_info, || format!("{e}; connecting again"));
                }
            }
            if wait(&self.stop, None, Some(Instant::now() + backoff)) == Wake::Stop {
                return;
            }
            backoff = (backoff * 2).min(self.cfg.backoff_max);
        }
    }

    fn session(&mut self, established: &mut bool) -> End {
        let stream = match UnixStream::connect(&self.cfg.path) {
            Ok(s) => s,
            Err(source) => {
                return End::Failed(QmpError::Connect {
                    path: self.cfg.path.clone(),
                    source,
                })
            }
        };
        if let Err(e) = stream.set_write_timeout(Some(self.cfg.reply_timeout)) {
            return End::Failed(QmpError::Io(e));
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut conn = Conn {
            stream,
            lines: Lines { buf, start: 0 },
            stop: &self.stop,
            stats: &self.stats,
            logged: &mut self.logged,
            next_id: 1,
            nic: None,
            dirty: false,
            timeout: self.cfg.reply_timeout,
        };
        let end = converse(&self.cfg, &mut conn, &mut self.on_filter, established);
        self.buf = std::mem::take(&mut conn.lines.buf);
        match end {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }
}

/// Handshake, find the NIC, then follow it until something ends the connection.
fn converse<F: FnMut(&RxFilter)>(
    cfg: &WatchConfig,
    conn: &mut Conn<'_>,
    on_filter: &mut F,
    established: &mut bool,
) -> Result<std::convert::Infallible, End> {
    let deadline = Instant::now() + cfg.reply_timeout;
    match conn.next_message(Some(deadline))? {
        Some(Msg::Greeting) => {}
        Some(_) => {
            return Err(QmpError::NotQmp {
                path: cfg.path.clone(),
            }
            .into())
        }
        None => {
            return Err(QmpError::Timeout {
                command: "the greeting",
                timeout: cfg.reply_timeout,
            }
            .into())
        }
    }
    conn.execute("qmp_capabilities", None)?;

    // Find our NIC: by name, or among all.
    let args = cfg.nic.as_ref().map(|n| serde_json::json!({ "name": n }));
    let listing = match conn.execute("query-rx-filter", args) {
        Err(End::Failed(QmpError::Refused { desc, .. })) if cfg.nic.is_some() => {
            return Err(QmpError::NicNotFound {
                want: cfg.nic.clone().unwrap_or_default(),
                desc,
            }
            .into())
        }
        r => r?,
    };
    let (filter, dropped) = pick_nic(&listing, cfg.nic.as_deref(), cfg.mac_hint)?;
    let nic = filter.nic.clone();
    conn.nic = Some(nic.clone());
    *established = true;
    QmpStats::bump(&conn.stats.connects);
    tracing::info!(
        path = ?cfg.path,
        %nic,
        "QMP connected: following the guest's rx filter"
    );
    let mut last: Option<RxFilter> = None;
    conn.deliver(filter, dropped, &mut last, on_filter);
    let mut last_query = Instant::now();

    loop {
        if conn.dirty {
            if wait(conn.stop, None, Some(last_query + MIN_QUERY_GAP)) == Wake::Stop {
                return Err(End::Stop);
            }
            conn.dirty = false;
            last_query = Instant::now();
            let answer =
                conn.execute("query-rx-filter", Some(serde_json::json!({ "name": nic })))?;
            match one_filter(&answer, &nic) {
                Ok((f, dropped)) => conn.deliver(f, dropped, &mut last, on_filter),
                Err(reason) => {
                    // The guest's doing (a MAC that is not unicast): counted, the connection
                    // stays.
                    QmpStats::bump(&conn.stats.bad_input);
                    conn.logged.once("bad-filter", false, || {
                        format!("the guest's rx filter of {nic} was refused: {reason}")
                    });
                }
            }
            continue;
        }
        if let Some(Msg::Event { maybe_ours: true }) = conn.next_message(None)? {
            conn.dirty = true;
        }
    }
}

/// Failure classes already logged at warn (or info) since the last working connection.
#[derive(Default)]
struct Logged(Vec<&'static str>);

impl Logged {
    /// Logs `what()` at warn (info when `info`) the first time `class` happens, at debug after.
    fn once(&mut self, class: &'static str, info: bool, what: impl FnOnce() -> String) {
        if self.0.contains(&class) {
            tracing::debug!("QMP: {}", what());
            return;
        }
        self.0.push(class);
        if info {
            tracing::info!("QMP: {}", what());
        } else {
            tracing::warn!("QMP: {} (logged once until a connection works)", what());
        }
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// What woke a [`wait`].
#[derive(Debug, PartialEq, Eq)]
enum Wake {
    Stop,
    Readable,
    Timeout,
}

/// Waits until `fd` is readable, `stop` is signalled or `deadline` passes (`None`: no fd / no
/// deadline).
fn wait(stop: &EventFd, fd: Option<&UnixStream>, deadline: Option<Instant>) -> Wake {
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Wake::Timeout;
                }
                // Rounded up: a deadline 0.4 ms away must not spin through zero timeouts.
                let ms = left.as_millis().saturating_add(1).min(i32::MAX as u128);
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let n = if fd.is_some() { 2 } else { 1 };
        let second = fd.map(|s| s.as_fd()).unwrap_or(stop.as_fd());
        let mut fds = [
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            PollFd::new(second, PollFlags::POLLIN),
        ];
        match poll(&mut fds[..n], timeout) {
            Ok(0) => continue, // re-checks the deadline
            Ok(_) => {
                if fds[0].any().unwrap_or(false) {
                    return Wake::Stop;
                }
                // POLLIN, POLLHUP or POLLERR: the read says which.
                return Wake::Readable;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!("QMP watcher: poll: {e}; stopping");
                return Wake::Stop;
            }
        }
    }
}

/// A bounded line splitter over the socket.
struct Lines {
    /// Bytes read and not yet returned live in `buf[start..]`; never longer than `MAX_LINE`
    /// plus one read.
    buf: Vec<u8>,
    start: usize,
}

impl Lines {
    /// The next complete line (without `\r\n`) in the buffer, if there is one.
    fn take_line(&mut self) -> Result<Option<std::ops::Range<usize>>, QmpError> {
        let pending = &self.buf[self.start..];
        match pending.iter().position(|&b| b == b'\n') {
            Some(i) if i > MAX_LINE => Err(QmpError::LineTooLong),
            Some(i) => {
                let mut end = self.start + i;
                let range_start = self.start;
                self.start += i + 1;
                if end > range_start && self.buf[end - 1] == b'\r' {
                    end -= 1;
                }
                Ok(Some(range_start..end))
            }
            None if pending.len() > MAX_LINE => Err(QmpError::LineTooLong),
            None => Ok(None),
        }
    }

    /// Reads once from `stream` (which poll said is readable).
    fn fill(&mut self, stream: &mut UnixStream) -> Result<(), QmpError> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let have = self.buf.len();
        self.buf.resize(have + 4096, 0);
        let n = match stream.read(&mut self.buf[have..]) {
            Ok(0) => {
                self.buf.truncate(have);
                return Err(QmpError::Closed);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                self.buf.truncate(have);
                return Err(match e.kind() {
                    io::ErrorKind::ConnectionReset => QmpError::Closed,
                    _ => QmpError::Io(e),
                });
            }
        };
        self.buf.truncate(have + n);
        Ok(())
    }
}

/// A message we act on; everything else is skipped.
#[derive(Debug, PartialEq)]
enum Msg {
    /// `{"QMP": …}`.
    Greeting,
    /// `{"return": …, "id": N}`.
    Return { id: Option<u64>, value: Value },
    /// `{"error": {"class", "desc"}, "id": N}`.
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    /// `NIC_RX_FILTER_CHANGED` (`maybe_ours` filled by the connection) or another event.
    Event { maybe_ours: bool },
    /// Valid JSON of no known shape, or too deep, or not JSON.
    Skipped,
}

/// True when `line`'s JSON nests at most [`MAX_DEPTH`] deep (strings are skipped, so brackets
/// inside them do not count). Malformed JSON is left to the parser.
fn depth_ok(line: &[u8]) -> bool {
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for &b in line {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// Classifies one line. `ours`: our NIC's name, once known.
fn parse_line(line: &[u8], ours: Option<&str>) -> Msg {
    if !depth_ok(line) {
        return Msg::Skipped;
    }
    let Ok(Value::Object(mut o)) = serde_json::from_slice::<Value>(line) else {
        return Msg::Skipped;
    };
    let id = o.get("id").and_then(Value::as_u64);
    if o.contains_key("QMP") {
        return Msg::Greeting;
    }
    if let Some(value) = o.remove("return") {
        return Msg::Return { id, value };
    }
    if let Some(err) = o.get("error") {
        let text = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .map(|s| truncate(s, 200))
                .unwrap_or_default()
        };
        return Msg::Error {
            id,
            class: text("class"),
            desc: text("desc"),
        };
    }
    match o.get("event").and_then(Value::as_str) {
        Some("NIC_RX_FILTER_CHANGED") => {
            let name = o.get("data").and_then(|d| d.get("name"));
            let maybe_ours = match (name, ours) {
                // QEMU leaves `name` out for a NIC without an id: it may be ours.
                (None, _) | (_, None) => true,
                (Some(Value::String(n)), Some(ours)) => n == ours,
                (Some(_), Some(_)) => false,
            };
            Msg::Event { maybe_ours }
        }
        Some(_) => Msg::Event { maybe_ours: false },
        None => Msg::Skipped,
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// One QMP connection.
struct Conn<'a> {
    stream: UnixStream,
    lines: Lines,
    stop: &'a EventFd,
    stats: &'a QmpStats,
    logged: &'a mut Logged,
    next_id: u64,
    /// Our NIC, once found.
    nic: Option<String>,
    /// An event that may be ours arrived since the last query was sent.
    dirty: bool,
    timeout: Duration,
}

impl Conn<'_> {
    /// Hands `f` to the callback when it differs from the last one (always the first time).
    fn deliver<F: FnMut(&RxFilter)>(
        &mut self,
        f: RxFilter,
        dropped: usize,
        last: &mut Option<RxFilter>,
        on_filter: &mut F,
    ) {
        if dropped > 0 {
            self.stats
                .bad_input
                .fetch_add(dropped as u64, Ordering::Relaxed);
            self.logged.once("dropped-entries", false, || {
                format!(
                    "dropped {dropped} entries of {}'s address tables (not MACs of their \
                     table's kind, or past {MAX_TABLE})",
                    f.nic
                )
            });
        }
        if last.as_ref() == Some(&f) {
            return;
        }
        QmpStats::bump(&self.stats.filters);
        tracing::debug!("QMP: guest rx filter: {f}");
        on_filter(&f);
        *last = Some(f);
    }

    /// The next message we act on; `None` when `deadline` passed first. Skipped lines are
    /// counted.
    fn next_message(&mut self, deadline: Option<Instant>) -> Result<Option<Msg>, End> {
        loop {
            if let Some(range) = self.lines.take_line()? {
                let msg = parse_line(&self.lines.buf[range], self.nic.as_deref());
                match msg {
                    Msg::Skipped => {
                        QmpStats::bump(&self.stats.bad_input);
                        self.logged.once("bad-line", false, || {
                            "skipped a line that is not JSON, nests too deep or has no known \
                             shape (counted in bad_input)"
                                .into()
                        });
                        continue;
                    }
                    Msg::Event { maybe_ours: true } => QmpStats::bump(&self.stats.events),
                    _ => {}
                }
                return Ok(Some(msg));
            }
            match wait(self.stop, Some(&self.stream), deadline) {
                Wake::Stop => return Err(End::Stop),
                Wake::Timeout => return Ok(None),
                Wake::Readable => self.lines.fill(&mut self.stream)?,
            }
        }
    }

    /// Sends `command` and returns its `return` value. Events seen meanwhile mark `dirty`.
    fn execute(&mut self, command: &'static str, args: Option<Value>) -> Result<Value, End> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), command.into());
        if let Some(a) = args {
            msg.insert("arguments".into(), a);
        }
        msg.insert("id".into(), id.into());
        let mut text = Value::Object(msg).to_string();
        text.push('\n');
        if command == "query-rx-filter" {
            QmpStats::bump(&self.stats.queries);
        }
        self.stream
            .write_all(text.as_bytes())
            .map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => QmpError::Timeout {
                    command,
                    timeout: self.timeout,
                },
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => QmpError::Closed,
                _ => QmpError::Io(e),
            })?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.next_message(Some(deadline))? {
                None => {
                    return Err(QmpError::Timeout {
                        command,
                        timeout: self.timeout,
                    }
                    .into())
                }
                Some(Msg::Return { id: Some(i), value }) if i == id => return Ok(value),
                Some(Msg::Error {
                    id: Some(i),
                    class,
                    desc,
                }) if i == id => {
                    return Err(QmpError::Refused {
                        command,
                        class,
                        desc,
                    }
                    .into())
                }
                Some(Msg::Event { maybe_ours: true }) => self.dirty = true,
                // Other events, stray answers, a second greeting: nothing to do.
                Some(_) => {}
            }
        }
    }
}

/// Our NIC's filter from a `query-rx-filter` listing, and how many entries were dropped.
fn pick_nic(
    listing: &Value,
    want: Option<&str>,
    mac_hint: Option<MacAddr>,
) -> Result<(RxFilter, usize), QmpError> {
    let bad = |reason: String| QmpError::BadAnswer {
        command: "query-rx-filter",
        reason,
    };
    let list = listing.as_array().ok_or_else(|| bad("not a list".into()))?;
    let mut nics = Vec::new();
    for item in list.iter().take(MAX_NICS) {
        nics.push(parse_filter(item).map_err(bad)?);
    }
    if nics.is_empty() {
        return Err(match want {
            Some(w) => QmpError::NicNotFound {
                want: w.to_string(),
                desc: "an empty listing".into(),
            },
            None => QmpError::NoNic,
        });
    }
    let pos = match want {
        Some(w) => nics.iter().position(|(f, _)| f.nic == w).ok_or_else(|| {
            bad(format!(
                "asked for {w:?}, got {}",
                names(nics.iter().map(|(f, _)| f))
            ))
        })?,
        None if nics.len() == 1 => 0,
        None => {
            let mut mine = nics
                .iter()
                .enumerate()
                .filter(|(_, (f, _))| Some(f.mac) == mac_hint);
            match (mine.next(), mine.next()) {
                (Some((i, _)), None) => i,
                _ => {
                    return Err(QmpError::AmbiguousNic {
                        names: names(nics.iter().map(|(f, _)| f)),
                        mac: mac_hint.map(|m| m.to_string()).unwrap_or("(none)".into()),
                    })
                }
            }
        }
    };
    Ok(nics.swap_remove(pos))
}

fn names<'a>(filters: impl Iterator<Item = &'a RxFilter>) -> String {
    filters
        .map(|f| f.nic.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The single filter of a `query-rx-filter name=NIC` answer.
fn one_filter(answer: &Value, nic: &str) -> Result<(RxFilter, usize), String> {
    let list = answer.as_array().ok_or("the answer is not a list")?;
    let item = list.first().ok_or("the answer is empty")?;
    let (f, dropped) = parse_filter(item)?;
    if f.nic != nic {
        return Err(format!("asked for {nic:?}, got {:?}", f.nic));
    }
    Ok((f, dropped))
}

/// One `RxFilterInfo` object → a validated [`RxFilter`] and the number of table entries
/// dropped. Every field is required (QEMU sends them all); `vlan`, `vlan-table` and
/// `broadcast-allowed` are not read.
fn parse_filter(v: &Value) -> Result<(RxFilter, usize), String> {
    let o = v.as_object().ok_or("a NIC's filter is not an object")?;
    let field = |k: &str| o.get(k).ok_or_else(|| format!("no {k:?}"));
    let boolean = |k: &str| {
        field(k)?
            .as_bool()
            .ok_or_else(|| format!("{k:?} is not a boolean"))
    };
    let string = |k: &str| {
        field(k)?
            .as_str()
            .ok_or_else(|| format!("{k:?} is not a string"))
    };
    let mode = |k: &str| match string(k)? {
        "normal" => Ok(RxMode::Normal),
        "none" => Ok(RxMode::None),
        "all" => Ok(RxMode::All),
        other => Err(format!("{k:?} is {:?}", truncate(other, 20))),
    };
    let nic = string("name")?;
    if nic.is_empty() || nic.len() > MAX_NAME {
        return Err(format!("a NIC name of {} bytes", nic.len()));
    }
    let main = string("main-mac")?;
    let mac = parse_mac(main)
        .filter(|m| m[0] & 1 == 0 && *m != [0; 6])
        .ok_or_else(|| {
            format!(
                "main-mac {:?} is not a unicast MAC (the guest set it)",
                truncate(main, 20)
            )
        })?;
    let mut dropped = 0;
    let mut table = |k: &str, multicast: bool| -> Result<(Vec<MacAddr>, bool), String> {
        let items = field(k)?
            .as_array()
            .ok_or_else(|| format!("{k:?} is not a list"))?;
        let mut out = Vec::with_capacity(items.len().min(MAX_TABLE));
        for item in items {
            let m = item.as_str().and_then(parse_mac);
            match m {
                Some(m) if (m[0] & 1 == 1) == multicast && m != [0; 6] => {
                    if out.len() < MAX_TABLE {
                        out.push(MacAddr(m));
                    } else {
                        dropped += 1;
                    }
                }
                _ => dropped += 1,
            }
        }
        Ok((out, items.len() > MAX_TABLE))
    };
    let (unicast, u_over) = table("unicast-table", false)?;
    let (multicast, m_over) = table("multicast-table", true)?;
    Ok((
        RxFilter {
            nic: nic.to_string(),
            mac: MacAddr(mac),
            promisc: boolean("promiscuous")?,
            unicast_mode: mode("unicast")?,
            unicast,
            unicast_overflow: boolean("unicast-overflow")? || u_over,
            multicast_mode: mode("multicast")?,
            multicast,
            multicast_overflow: boolean("multicast-overflow")? || m_over,
        },
        dropped,
    ))
}

/// `aa:bb:cc:dd:ee:ff` (QEMU's format), any case.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let b = s.as_bytes();
    if b.len() != 17 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, byte) in mac.iter_mut().enumerate() {
        let part = &b[i * 3..i * 3 + 2];
        if i < 5 && b[i * 3 + 2] != b':' {
            return None;
        }
        let hex = |c: u8| (c as char).to_digit(16);
        *byte = u8::try_from(hex(part[0])? * 16 + hex(part[1])?).ok()?;
    }
    Some(mac)
}

#[cfg(test)]
mod tests;
