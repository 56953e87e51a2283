//! `--tx-rate` / `--rx-rate`: the host queue seen through the device's rate limiters.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::datapath::{HostQueue, IoVecBuf};
use crate::ratelimit::{RateLimiter, RateSpec};

/// The device's rate limiters, one per direction, shared by every queue pair (libvirt's
/// `<bandwidth>` is per interface).
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Guest → host.
    pub tx: Option<Arc<Mutex<RateLimiter>>>,
    /// Host → guest.
    pub rx: Option<Arc<Mutex<RateLimiter>>>,
}

impl Limits {
    /// Limiters for the given specs (none for a direction without one).
    pub fn new(tx: Option<RateSpec>, rx: Option<RateSpec>) -> Limits {
        let limiter = |s: RateSpec| Arc::new(Mutex::new(RateLimiter::new(s)));
        Limits {
            tx: tx.map(limiter),
            rx: rx.map(limiter),
        }
    }

    /// Whether any direction is limited (a pair takes a limiter's lock only then).
    pub fn any(&self) -> bool {
        self.tx.is_some() || self.rx.is_some()
    }
}

fn lock(m: &Mutex<RateLimiter>) -> MutexGuard<'_, RateLimiter> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The host queue seen through the rate limiters. A frame over the TX limit is refused with
/// EAGAIN, which the datapath treats as "keep the chain, try later"; RX refuses to read while
/// the RX bucket is in debt and charges each frame's real size after reading it. The waits it
/// records tell the worker to arm its timer instead of waiting for epoll.
#[derive(Debug)]
pub struct Throttle<'a, Q> {
    q: &'a Q,
    limits: &'a Limits,
    now_ns: u64,
    hdr_len: usize,
    tx_wait_ns: AtomicU64,
    rx_wait_ns: AtomicU64,
}

impl<'a, Q> Throttle<'a, Q> {
    /// `q` seen through `limits` at time `now_ns`; frames carry a `hdr_len`-byte vnet header,
    /// which is not charged.
    pub fn new(q: &'a Q, limits: &'a Limits, now_ns: u64, hdr_len: usize) -> Self {
        Throttle {
            q,
            limits,
            now_ns,
            hdr_len,
            tx_wait_ns: AtomicU64::new(0),
            rx_wait_ns: AtomicU64::new(0),
        }
    }

    /// How long TX must wait (0: it was not limited since the last call).
    pub fn take_tx_wait(&self) -> u64 {
        self.tx_wait_ns.swap(0, Ordering::Relaxed)
    }

    /// How long RX must wait (0: it was not limited since the last call).
    pub fn take_rx_wait(&self) -> u64 {
        self.rx_wait_ns.swap(0, Ordering::Relaxed)
    }
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
            let mut l = lock(l);
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
            let wait = lock(l).wait_ns(self.now_ns, 1);
            if wait > 0 {
                self.rx_wait_ns.store(wait, Ordering::Relaxed);
                return Err(io::Error::from_raw_os_error(libc::EAGAIN));
            }
        }
        let n = self.q.recv_frame(bufs)?;
        if let Some(l) = &self.limits.rx {
            lock(l).consume(self.now_ns, n.saturating_sub(self.hdr_len) as u64);
        }
        Ok(n)
    }
}
