//! A test rig: the real serve loop over fake host queues (datagram socketpairs), so the whole
//! backend runs over a real vhost-user socket without root.
#![allow(dead_code)]

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use macvhost::datapath::QueueStats;
use macvhost::host::MacAddr;
use macvhost::server::SocketMode;
use macvhost::server::{serve, Endpoint, StopHandle};
use macvhost::testkit::fuzz::hostile::{Proc, Target};
use macvhost::testkit::FakeHostQueue;
use macvhost::vhost_user::backend::{DeviceIdentity, HostSide};

use super::vu_driver::VuGuest;

/// What a rig's device has beyond the defaults.
#[derive(Default)]
struct Options {
    tx_rate: Option<macvhost::ratelimit::RateSpec>,
    rx_rate: Option<macvhost::ratelimit::RateSpec>,
    link_down_disconnects: bool,
    l2: macvhost::worker::l2::L2Host,
}

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub sock: std::path::PathBuf,
    pub queues: Vec<Arc<FakeHostQueue>>,
    /// The host's end of each queue (the same sockets as `queues[i].peer()`), blocking for up
    /// to 2 s per read.
    pub peers: Vec<UnixDatagram>,
    pub stats: Vec<Arc<QueueStats>>,
    pub stop: StopHandle,
    /// The host link's carrier as the serve loop sees it (the link watcher's flag).
    pub link_up: Arc<AtomicBool>,
    /// Sets `link_up`, as the link watcher would: how a hostile frontend's [`Target`] turns the
    /// link down and up.
    set_link: Box<dyn Fn(bool) + Send + Sync>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Rig {
    pub fn start(pairs: u16) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vu.sock");
        Rig::start_with(pairs, dir, SocketMode::Listen(sock.clone()), sock)
    }

    pub fn start_with(
        pairs: u16,
        dir: tempfile::TempDir,
        mode: SocketMode,
        sock: std::path::PathBuf,
    ) -> Rig {
        Rig::start_full(pairs, dir, &mode, sock, Options::default())
    }

    /// A rig serving with `--disconnect-on-link-down`.
    pub fn start_disconnecting_on_link_down(
        pairs: u16,
        dir: tempfile::TempDir,
        mode: SocketMode,
        sock: std::path::PathBuf,
    ) -> Rig {
        let opts = Options {
            link_down_disconnects: true,
            ..Options::default()
        };
        Rig::start_full(pairs, dir, &mode, sock, opts)
    }

    /// A rig whose device has `--tx-rate` / `--rx-rate` limits.
    pub fn start_limited(
        pairs: u16,
        tx_rate: Option<macvhost::ratelimit::RateSpec>,
        rx_rate: Option<macvhost::ratelimit::RateSpec>,
    ) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vu.sock");
        let opts = Options {
            tx_rate,
            rx_rate,
            ..Options::default()
        };
        Rig::start_full(pairs, dir, &SocketMode::Listen(sock.clone()), sock, opts)
    }

    /// A rig whose device follows the guest's multicast groups into `l2`'s filter.
    pub fn start_l2(pairs: u16, l2: macvhost::worker::l2::L2Host) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vu.sock");
        let mode = SocketMode::Listen(sock.clone());
        let opts = Options {
            l2,
            ..Options::default()
        };
        Rig::start_full(pairs, dir, &mode, sock, opts)
    }

    /// A rig serving `endpoint` (socket mode plus owner and permissions).
    pub fn start_endpoint(
        pairs: u16,
        dir: tempfile::TempDir,
        endpoint: Endpoint,
        sock: std::path::PathBuf,
    ) -> Rig {
        Rig::start_full(pairs, dir, endpoint, sock, Options::default())
    }

    fn start_full(
        pairs: u16,
        dir: tempfile::TempDir,
        endpoint: impl Into<Endpoint>,
        sock: std::path::PathBuf,
        opts: Options,
    ) -> Rig {
        let Options {
            tx_rate,
            rx_rate,
            link_down_disconnects,
            l2,
        } = opts;
        let queues: Vec<_> = (0..pairs)
            .map(|_| Arc::new(FakeHostQueue::with_peer_timeout(Duration::from_secs(2))))
            .collect();
        let peers = queues
            .iter()
            .map(|q| q.peer().try_clone().unwrap())
            .collect();
        let stats: Vec<_> = (0..pairs)
            .map(|_| Arc::new(QueueStats::default()))
            .collect();
        let stop = StopHandle::default();
        let identity = DeviceIdentity {
            mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            mtu: 1500,
            queue_pairs: pairs,
            queue_size: 256,
            tx_rate,
            rx_rate,
        };
        let link_up = Arc::new(AtomicBool::new(true));
        let side = HostSide {
            queues: queues.clone(),
            supported_offloads: 0x1f,
            link_up: link_up.clone(),
            link_down_disconnects,
            l2,
        };
        let (s2, st2) = (stop.clone(), stats.clone());
        let endpoint = endpoint.into();
        let listening = matches!(endpoint.mode, SocketMode::Listen(_));
        let thread = std::thread::spawn(move || {
            serve(endpoint, identity, side, &st2, &s2).expect("serve");
        });
        if listening {
            assert!(
                eventually(|| sock.exists()),
                "backend never bound {}",
                sock.display()
            );
        }
        let link = link_up.clone();
        Rig {
            dir,
            sock,
            queues,
            peers,
            stats,
            stop,
            link_up,
            set_link: Box::new(move |up| link.store(up, Ordering::SeqCst)),
            thread: Some(thread),
        }
    }

    /// What a hostile frontend attacks: this rig's socket, served by this process, with the
    /// link flag to flip.
    pub fn target(&self) -> Target<'_> {
        Target {
            socket: self.sock.clone(),
            proc_: Proc::this(),
            set_link: Some(&*self.set_link),
        }
    }

    pub fn guest(&self, pairs: usize, features: u64) -> VuGuest {
        VuGuest::connect(&self.sock, pairs, 256, features, Duration::from_secs(5))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = &self.dir;
    }
}

/// Polls `cond` for up to two seconds.
pub fn eventually(cond: impl FnMut() -> bool) -> bool {
    macvhost::testkit::wait_until(Duration::from_secs(2), cond)
}

/// Every virtio feature the backend offers.
pub const ALL: u64 = u64::MAX;
/// VIRTIO_NET_F_MRG_RXBUF.
pub const MRG_RXBUF: u64 = 1 << 15;

/// A recognisable Ethernet frame of `len` bytes carrying `seq`.
pub fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = (seq as usize * 31 + i * 7) as u8;
    }
    f[14..18].copy_from_slice(&seq.to_be_bytes());
    f
}

/// Sends one frame from the guest and checks it arrives intact on the host queue.
pub fn tx_one_and_check(rig: &Rig, g: &mut VuGuest, seq: u32) {
    let f = frame(seq, 300);
    assert!(g.send(0, &f), "TX ring full");
    g.kick(g.tx(0));
    let mut buf = vec![0u8; 2048];
    let n = rig.peers[0]
        .recv(&mut buf)
        .expect("frame on the host queue");
    assert_eq!(&buf[super::vu_driver::HDR_LEN..n], &f[..]);
}
