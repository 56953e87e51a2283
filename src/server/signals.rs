//! Stopping: SIGTERM/SIGINT on a dedicated thread, and the handle that ends whatever the
//! server is doing (the current connection, a blocked accept, the loop).

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{SigSet, Signal};
use vhost_user_backend::ShutdownHandle;

use super::ServerError;

/// What the signal thread needs to stop whatever the server is doing.
pub(super) struct Stopper {
    requested: AtomicBool,
    /// The stop is a hand-over to a `--take-over` process: what it took (the socket file) is
    /// not ours to remove any more.
    handed_over: AtomicBool,
    connection: Mutex<Option<ShutdownHandle>>,
    /// Readable once a stop is requested: the serve loop waits on it beside the listener (a
    /// `shutdown()` of the listener would also stop it for a service manager that holds it).
    wake: EventFd,
}

impl Default for Stopper {
    fn default() -> Self {
        Stopper {
            requested: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            connection: Mutex::new(None),
            wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .expect("eventfd for the stop signal"),
        }
    }
}

impl Stopper {
    pub(super) fn stop(&self) {
        self.requested.store(true, Ordering::SeqCst);
        self.end_connection();
        // Saturating is fine: the fd stays readable.
        let _ = self.wake.write(1);
    }

    /// Stops for a hand-over to a `--take-over` process (see [`Stopper::handed_over`]).
    pub(super) fn hand_over(&self) {
        self.handed_over.store(true, Ordering::SeqCst);
        self.stop();
    }

    /// Whether the stop is a hand-over.
    pub(super) fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` (forever: `None`) for `fd` to be readable; false when a stop came
    /// first (or the wait failed).
    pub(super) fn wait_readable(&self, fd: BorrowedFd<'_>, timeout: Option<Duration>) -> bool {
        let ms = timeout.map_or(PollTimeout::NONE, |t| {
            PollTimeout::try_from(t.as_millis().min(60_000) as u32).unwrap_or(PollTimeout::MAX)
        });
        let mut fds = [
            PollFd::new(fd, PollFlags::POLLIN),
            PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
        ];
        loop {
            match poll(&mut fds, ms) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
                Ok(_) => break,
            }
        }
        let woken = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        !self.stopping() && !woken(&fds[1]) && woken(&fds[0])
    }

    /// Sleeps up to `d`, waking early on a stop.
    pub(super) fn sleep(&self, d: Duration) {
        let ms =
            PollTimeout::try_from(d.as_millis().min(60_000) as u32).unwrap_or(PollTimeout::MAX);
        let _ = poll(&mut [PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)], ms);
    }

    pub(super) fn stopping(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Ends the current connection (if any) without stopping the loop.
    pub(super) fn end_connection(&self) {
        if let Some(h) = self
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            h.shutdown();
        }
    }

    /// Sets (or clears) the connection a stop must end.
    pub(super) fn set_connection(&self, h: Option<ShutdownHandle>) {
        *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = h;
    }
}

/// How long a stop may take before the process exits anyway (status 1).
const STOP_DEADLINE: std::time::Duration = std::time::Duration::from_millis(1500);

/// Blocks SIGTERM/SIGINT in every thread and waits for them on a dedicated one.
/// Must run before any other thread is spawned so all threads inherit the mask.
pub(super) fn install_signal_thread(stopper: Arc<Stopper>) -> Result<(), ServerError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().map_err(ServerError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                tracing::info!("{sig:?}: stopping");
                stopper.stop();
                // A stop ends the connection at once (nothing waits on a frontend). This only
                // fires if something still does (a worker stuck in a page fault on memory
                // the frontend serves, say): SIGTERM ends macvhost within 2 s in every state.
                std::thread::sleep(STOP_DEADLINE);
                tracing::error!("still stopping {STOP_DEADLINE:?} after {sig:?}: exiting now");
                std::process::exit(1);
            }
        })
        .map_err(|e| ServerError::Signals(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))?;
    Ok(())
}

/// Stops a running [`serve`](super::serve) loop from another thread (signals, tests).
#[derive(Clone, Default)]
pub struct StopHandle(pub(super) Arc<Stopper>);

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopHandle")
            .field("stopping", &self.0.stopping())
            .finish()
    }
}

impl StopHandle {
    /// Ends the current connection and the loop; `serve` then returns Ok.
    pub fn stop(&self) {
        self.0.stop()
    }
}
