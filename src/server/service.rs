//! What the service manager hears from the serve loop: readiness, a status line, stopping, the
//! watchdog, and the host queue fds kept in its fd store across restarts (see
//! [`crate::systemd`]). Without `NOTIFY_SOCKET` all of it is silent.

use std::os::fd::AsFd;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::host::HostDevice;
use crate::systemd::{Notifier, Watchdog};

/// What the serve loop is doing (the watchdog's view of its health).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Setting up or waiting for a frontend.
    Waiting,
    /// Serving a frontend.
    Serving,
    /// Tearing a connection down: must finish promptly.
    Closing,
    /// Serving none while the host link has no carrier.
    NoCarrier,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    since: Instant,
}

/// The serve loop's line to the service manager (see the module doc).
#[derive(Debug)]
pub(super) struct Service {
    notifier: Option<Arc<Notifier>>,
    state: Arc<Mutex<State>>,
    /// Dropping it stops the watchdog thread.
    _watchdog: Option<Sender<()>>,
}

impl Service {
    /// Silent: no service manager (tests, a shell).
    pub(super) fn none() -> Service {
        Service {
            notifier: None,
            state: Arc::new(Mutex::new(State {
                phase: Phase::Waiting,
                since: Instant::now(),
            })),
            _watchdog: None,
        }
    }

    /// From `NOTIFY_SOCKET` and `WATCHDOG_USEC`; a bad variable is logged once and ignored (the
    /// manager then times us out, which says more than refusing to start).
    pub(super) fn from_env() -> Service {
        let mut s = Service::none();
        s.notifier = match Notifier::from_env() {
            Ok(n) => n.map(Arc::new),
            Err(e) => {
                tracing::error!("{e}; not notifying the service manager");
                None
            }
        };
        let watchdog = match Watchdog::from_env() {
            Ok(w) => w,
            Err(e) => {
                tracing::error!("{e}; no watchdog pings");
                None
            }
        };
        if let (Some(n), Some(w)) = (s.notifier.clone(), watchdog) {
            let (tx, rx) = std::sync::mpsc::channel();
            let state = s.state.clone();
            let spawned = std::thread::Builder::new()
                .name("watchdog".into())
                .spawn(move || ping_while_healthy(&n, w, &state, &rx));
            match spawned {
                Ok(_) => s._watchdog = Some(tx),
                Err(e) => tracing::error!("cannot start the watchdog thread: {e}"),
            }
        }
        s
    }

    fn send(
        &self,
        what: &str,
        f: impl FnOnce(&Notifier) -> Result<(), crate::systemd::SystemdError>,
    ) {
        if let Some(n) = &self.notifier {
            if let Err(e) = f(n) {
                tracing::warn!("service manager: {what}: {e}");
            }
        }
    }

    /// Enters `phase` and says so in the status line.
    pub(super) fn phase(&self, phase: Phase, status: &str) {
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.phase != phase {
                st.phase = phase;
                st.since = Instant::now();
            }
        }
        self.send("STATUS", |n| n.status(status));
    }

    /// `READY=1`: the host side is open and the socket is served.
    pub(super) fn ready(&self, status: &str) {
        self.send("READY", |n| n.ready(status));
    }

    /// `STOPPING=1`.
    pub(super) fn stopping(&self) {
        self.send("STOPPING", |n| n.stopping("stopping"));
    }

    /// Keeps each host queue in the manager's fd store (`FDNAME=queue-N`), so that a restart
    /// gets the same queues back: no new tap, no carrier flap, no new ifindex.
    pub(super) fn store_queues(&self, host: &HostDevice) {
        for (i, q) in host.queues().iter().enumerate() {
            self.send("FDSTORE", |n| n.store_queue(i, q.as_fd()));
        }
    }

    /// Drops stored queue fds that turned out stale (`FDSTOREREMOVE=1`).
    pub(super) fn forget_queues(&self, pairs: impl IntoIterator<Item = usize>) {
        for i in pairs {
            let name = crate::systemd::queue_fd_name(i);
            self.send("FDSTOREREMOVE", |n| n.remove_fds(&name));
        }
    }
}

/// How long a connection may take to tear down before the watchdog stops vouching for us.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Pings the manager every watchdog interval while the serve loop is healthy: anything but a
/// teardown that has taken longer than [`CLOSE_GRACE`] (a wedged connection). Then the manager
/// restarts us, which is the one cure for a stuck thread.
fn ping_while_healthy(n: &Notifier, mut w: Watchdog, state: &Mutex<State>, stop: &Receiver<()>) {
    let mut said = false;
    loop {
        match stop.recv_timeout(w.until_due(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if !w.due(Instant::now()) {
            continue;
        }
        let stuck = {
            let st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.phase == Phase::Closing && st.since.elapsed() > CLOSE_GRACE
        };
        if stuck {
            if !said {
                tracing::error!(
                    "connection teardown has not finished in {CLOSE_GRACE:?}: watchdog pings \
                     stop until it does"
                );
                said = true;
            }
            continue;
        }
        said = false;
        if let Err(e) = n.watchdog() {
            tracing::warn!("service manager: WATCHDOG: {e}");
        }
    }
}
