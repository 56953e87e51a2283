//! The whole backend over a real vhost-user socket, with fake host queues (datagram
//! socketpairs) instead of taps: runs without root. The frontend is `support::vu_driver`.

#[path = "support/vu_driver.rs"]
mod vu_driver;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use macvhost::backend::{DeviceIdentity, HostSide, QueueControl};
use macvhost::config::{MacAddr, SocketMode};
use macvhost::datapath::iovec::{readv_fd, writev_fd};
use macvhost::datapath::{HostQueue, IoVecBuf, QueueStats};
use macvhost::server::{serve, StopHandle};
use vu_driver::{VuGuest, HDR_LEN};

#[derive(Debug)]
struct FakeQueue {
    ours: UnixDatagram,
    attached: AtomicBool,
    offloads: AtomicU32,
    hdr_len: AtomicUsize,
}

impl AsRawFd for FakeQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.ours.as_raw_fd()
    }
}
impl AsFd for FakeQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ours.as_fd()
    }
}
impl HostQueue for FakeQueue {
    fn send_frame(&self, frame: &IoVecBuf<'_>) -> std::io::Result<usize> {
        writev_fd(self.ours.as_raw_fd(), frame)
    }
    fn recv_frame(&self, bufs: &IoVecBuf<'_>) -> std::io::Result<usize> {
        readv_fd(self.ours.as_raw_fd(), bufs)
    }
}
impl QueueControl for FakeQueue {
    fn set_offload(&self, f: u32) -> std::io::Result<()> {
        self.offloads.store(f, Ordering::SeqCst);
        Ok(())
    }
    fn set_vnet_hdr_len(&self, len: usize) -> std::io::Result<()> {
        self.hdr_len.store(len, Ordering::SeqCst);
        Ok(())
    }
    fn attach(&self) -> std::io::Result<()> {
        self.attached.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn detach(&self) -> std::io::Result<()> {
        self.attached.store(false, Ordering::SeqCst);
        Ok(())
    }
}

struct Rig {
    dir: tempfile::TempDir,
    sock: std::path::PathBuf,
    queues: Vec<Arc<FakeQueue>>,
    peers: Vec<UnixDatagram>,
    stats: Vec<Arc<QueueStats>>,
    stop: StopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Rig {
    fn start(pairs: u16) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vu.sock");
        Rig::start_with(pairs, dir, SocketMode::Listen(sock.clone()), sock)
    }

    fn start_with(
        pairs: u16,
        dir: tempfile::TempDir,
        mode: SocketMode,
        sock: std::path::PathBuf,
    ) -> Rig {
        let mut queues = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..pairs {
            let (a, b) = UnixDatagram::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            b.set_read_timeout(Some(Duration::from_millis(2000)))
                .unwrap();
            queues.push(Arc::new(FakeQueue {
                ours: a,
                attached: AtomicBool::new(true),
                offloads: AtomicU32::new(0),
                hdr_len: AtomicUsize::new(12),
            }));
            peers.push(b);
        }
        let stats: Vec<_> = (0..pairs)
            .map(|_| Arc::new(QueueStats::default()))
            .collect();
        let stop = StopHandle::default();
        let identity = DeviceIdentity {
            mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            mtu: 1500,
            queue_pairs: pairs,
            queue_size: 256,
        };
        let side = HostSide {
            queues: queues.clone(),
            supported_offloads: 0x1f,
            carrier: true,
        };
        let (s2, st2) = (stop.clone(), stats.clone());
        let thread = std::thread::spawn(move || {
            serve(&mode, identity, side, &st2, &s2).expect("serve");
        });
        Rig {
            dir,
            sock,
            queues,
            peers,
            stats,
            stop,
            thread: Some(thread),
        }
    }

    fn guest(&self, pairs: usize, features: u64) -> VuGuest {
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

const ALL: u64 = u64::MAX;
const MRG_RXBUF: u64 = 1 << 15;

fn frame(seq: u32, len: usize) -> Vec<u8> {
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

#[test]
fn tx_frames_reach_the_host_queue_byte_exact() {
    let rig = Rig::start(1);
    let mut g = rig.guest(1, ALL);
    for seq in 0..100u32 {
        let f = frame(seq, 60 + (seq as usize * 13) % 1400);
        assert!(g.send(0, &f));
        g.kick(g.tx(0));
        let mut buf = vec![0u8; 70_000];
        let n = rig.peers[0]
            .recv(&mut buf)
            .expect("frame on the host queue");
        assert_eq!(n, HDR_LEN + f.len());
        assert_eq!(&buf[HDR_LEN..n], &f[..], "frame {seq} altered");
        assert!(
            g.wait_until(Duration::from_secs(2), |g| !g.take_used(g.tx(0)).is_empty()) || seq > 0
        );
    }
    assert!(
        rig.queues[0].attached.load(Ordering::SeqCst),
        "active pair is attached"
    );
    assert!(eventually(|| rig.stats[0].snapshot().tx_frames == 100));
}

#[test]
fn rx_frames_reach_the_guest_with_and_without_mrg_rxbuf() {
    for features in [ALL, ALL & !MRG_RXBUF] {
        let rig = Rig::start(1);
        let mut g = rig.guest(1, features);
        let mrg = g.acked_features & MRG_RXBUF != 0;
        assert_eq!(mrg, features & MRG_RXBUF != 0);
        g.post_rx(0, 128, if mrg { 2048 } else { 65_562 });
        g.kick(g.rx(0));
        let mut got = Vec::new();
        for seq in 0..50u32 {
            let f = frame(seq, 60 + (seq as usize * 29) % 1450);
            let mut pkt = vec![0u8; HDR_LEN];
            pkt.extend_from_slice(&f);
            rig.peers[0].send(&pkt).unwrap();
            assert!(
                g.wait_until(Duration::from_secs(2), |g| {
                    got.extend(g.recv_frames(0));
                    got.len() > seq as usize
                }),
                "frame {seq} not delivered (mrg={mrg})"
            );
            assert_eq!(got[seq as usize], f, "frame {seq} altered (mrg={mrg})");
            g.post_rx(0, 1, if mrg { 2048 } else { 65_562 });
            g.kick(g.rx(0));
        }
        assert!(eventually(|| rig.stats[0].snapshot().rx_frames == 50));
    }
}

#[test]
fn a_second_frontend_is_served_after_the_first_disconnects() {
    let rig = Rig::start(1);
    for round in 0..3u32 {
        let mut g = rig.guest(1, ALL);
        let f = frame(round, 200);
        g.send(0, &f);
        g.kick(g.tx(0));
        let mut buf = vec![0u8; 2048];
        let n = rig.peers[0].recv(&mut buf).expect("frame after reconnect");
        assert_eq!(&buf[HDR_LEN..n], &f[..]);
        drop(g);
    }
    // The worker bumps the counter just after the write the peer already saw.
    assert!(eventually(|| rig.stats[0].snapshot().tx_frames == 3));
}

fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

fn tx_one_and_check(rig: &Rig, g: &mut VuGuest, seq: u32) {
    let f = frame(seq, 300);
    assert!(g.send(0, &f));
    g.kick(g.tx(0));
    let mut buf = vec![0u8; 2048];
    let n = rig.peers[0]
        .recv(&mut buf)
        .expect("frame on the host queue");
    assert_eq!(&buf[HDR_LEN..n], &f[..]);
}

#[test]
fn client_mode_connects_once_the_frontend_listens_and_again_after_it_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("frontend.sock");
    // The backend starts first and retries with backoff until the frontend appears.
    let rig = Rig::start_with(1, dir, SocketMode::Connect(sock.clone()), sock.clone());
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..2 {
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let (stream, _) = listener.accept().unwrap();
        let frontend = vhost::vhost_user::Frontend::from_stream(stream, 2);
        let mut g = VuGuest::over(frontend, 1, 256, ALL);
        tx_one_and_check(&rig, &mut g, round);
        drop(g);
        drop(listener);
        std::fs::remove_file(&sock).unwrap();
    }
    assert!(eventually(|| rig.stats[0].snapshot().tx_frames == 2));
}

#[test]
fn inherited_listening_fd_is_served() {
    use std::os::fd::IntoRawFd;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("inherited.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.into_raw_fd();
    let rig = Rig::start_with(1, dir, SocketMode::ListenFd(fd), sock);
    let mut g = rig.guest(1, ALL);
    tx_one_and_check(&rig, &mut g, 7);
}
