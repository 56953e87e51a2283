//! `vhost_user_msgs`: vhost-user message sequences into a real `VhostUserDaemon` serving
//! `NetBackend<FakeHostQueue>`, the way `server::serve` builds one per connection.
//!
//! # Input
//! `cfg` (bit 0: two queue pairs; bits 1–2: max queue size; bit 3: carrier), `offloads` (u8, the
//! tap's TUN_F bits), `mtu` (u16), then ops (`op % 26`): well-framed messages with fuzzed
//! fields (features, memory tables over a memfd, vring num/addr/base/kick/call/err/enable, config,
//! status...), raw messages (any request code, flags, size field, payload, 0–2 attached
//! eventfds), and guest/host actions: post a chain in a ring (written straight into the memfd),
//! kick a ring, inject a host frame. Memory regions are kept inside the memfd (a region past the
//! end of its file is a separate, known issue: SIGBUS on access).
//!
//! # Oracles
//! - No panic on any thread (the daemon's, the workers', ours).
//! - No hang: the daemon keeps reading (a write that blocks for 5 s is a hang) and, after the
//!   frontend closes its end, `wait()` returns and the teardown (exit events, joining the
//!   worker threads) finishes within 10 s.
//! - `wait()` ends with `Ok` or a request-handling error, never a daemon-thread panic.
//! - Nothing leaks: afterwards the backend has no other owner, and the process has as many
//!   open fds as before.

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Once};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::cursor::Cursor;
use super::layout::{MEM_SIZE, RINGS, RING_STRIDE, VMM_BASE};
use crate::datapath::QueueStats;
use crate::host::MacAddr;
use crate::testkit::{pattern_frame, FakeHostQueue};
use crate::vhost_user::backend::{DeviceIdentity, HostSide};
use crate::vhost_user::connection::Connection;

/// Buffers live in `[BUFS, MEM_SIZE)`.
const BUFS: u64 = 0x2_0000;
/// Most ops per input.
const MAX_OPS: usize = 128;
/// How long the daemon may take to read one message / to stop after the frontend left.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// vhost-user request codes used by the structured ops.
mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const RESET_DEVICE: u32 = 34;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
    pub const SET_STATUS: u32 = 39;
    pub const GET_STATUS: u32 = 40;
}

/// Header flags: version 1, and "reply please".
const VERSION_1: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;

/// The protocol features macvhost offers (what a well-behaved frontend acks).
const OUR_PROTOCOL_FEATURES: u64 = VhostUserProtocolFeatures::MQ.bits()
    | VhostUserProtocolFeatures::REPLY_ACK.bits()
    | VhostUserProtocolFeatures::CONFIG.bits()
    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS.bits()
    | VhostUserProtocolFeatures::BACKEND_REQ.bits()
    | VhostUserProtocolFeatures::LOG_SHMFD.bits();

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // A Rust `main` ignores SIGPIPE; libFuzzer's C main does not. Match the real binary.
        // SAFETY: setting a signal disposition to SIG_IGN has no handler to race with.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            prev(info)
        }));
    });
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// One frontend connection's worth of state on the fuzzer side.
struct Front {
    sock: UnixStream,
    memfd: File,
    nq: u32,
    /// Ring size per vring as last set (for posting chains), and the next free descriptor.
    ring_size: Vec<u16>,
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
    kicks: Vec<Option<EventFd>>,
    keep_socks: Vec<UnixStream>,
    queues: Vec<Arc<FakeHostQueue>>,
    inject_left: usize,
    offered: u64,
    /// The daemon closed the connection (a rejected message): stop sending.
    closed: bool,
}

impl Front {
    /// Sends one message (header + payload) with `fds` attached.
    fn send(&mut self, request: u32, flags: u32, size: u32, payload: &[u8], fds: &[RawFd]) {
        if self.closed {
            return;
        }
        let mut buf = Vec::with_capacity(12 + payload.len());
        buf.extend_from_slice(&request.to_le_bytes());
        buf.extend_from_slice(&flags.to_le_bytes());
        buf.extend_from_slice(&size.to_le_bytes());
        buf.extend_from_slice(payload);
        let iov = [IoSlice::new(&buf)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
        match sendmsg::<()>(
            self.sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) if n == buf.len() => {}
            Ok(n) => {
                if let Err(e) = self.sock.write_all(&buf[n..]) {
                    self.fail(e);
                }
            }
            Err(e) => self.fail(std::io::Error::from(e)),
        }
    }

    fn fail(&mut self, e: std::io::Error) {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                panic!("the daemon stopped reading its socket for {WRITE_TIMEOUT:?}: hang")
            }
            _ => self.closed = true,
        }
    }

    fn msg(&mut self, request: u32, payload: &[u8], fds: &[RawFd]) {
        self.send(
            request,
            VERSION_1 | NEED_REPLY,
            payload.len() as u32,
            payload,
            fds,
        );
    }

    fn u64_msg(&mut self, request: u32, v: u64) {
        self.msg(request, &v.to_le_bytes(), &[]);
    }

    fn state_msg(&mut self, request: u32, index: u32, num: u32) {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        self.msg(request, &p, &[]);
    }

    fn index(&self, c: &mut Cursor<'_>) -> u32 {
        let b = c.u8();
        if b & 0x80 != 0 {
            c.u32()
        } else {
            u32::from(b) % (self.nq + 1)
        }
    }

    fn ring_addrs(i: u32) -> (u64, u64, u64) {
        let size = 256u64;
        let desc = RINGS + u64::from(i) * RING_STRIDE;
        let avail = desc + 16 * size;
        let used = (avail + 6 + 2 * size + 3) & !3;
        (desc, avail, used)
    }

    /// A memory region `(gpa, size, user_addr, mmap_offset)` kept inside the memfd.
    fn region(c: &mut Cursor<'_>) -> [u64; 4] {
        match c.u8() % 4 {
            0 => [0, MEM_SIZE, VMM_BASE, 0],
            1 => {
                let half = MEM_SIZE / 2;
                if c.u8() & 1 == 0 {
                    [0, half, VMM_BASE, 0]
                } else {
                    [half, half, VMM_BASE + half, half]
                }
            }
            2 => {
                let off = (u64::from(c.u8()) << 12) % MEM_SIZE;
                let size = (u64::from(c.u8()) << 12).min(MEM_SIZE - off);
                [c.u64() & !0xfff, size, c.u64(), off]
            }
            _ => {
                let off = (u64::from(c.u16()) << 12) % MEM_SIZE;
                let size = c.u64() % (MEM_SIZE - off + 1);
                [c.u64(), size, c.u64(), off]
            }
        }
    }

    fn region_bytes(r: &[u64; 4]) -> Vec<u8> {
        r.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Writes a chain into vring `q`'s rings (standard addresses) and publishes it.
    fn post_chain(&mut self, c: &mut Cursor<'_>) {
        let q = (c.u8() as usize) % self.nq as usize;
        let size = self.ring_size[q].max(1);
        let (desc, avail, _) = Self::ring_addrs(q as u32);
        let n = 1 + c.u8() % 4;
        let first = self.next_desc[q];
        for i in 0..u16::from(n) {
            let idx = first.wrapping_add(i) % size;
            let addr = match c.u8() % 4 {
                0 => BUFS + (u64::from(c.u16()) << 4) % (MEM_SIZE - BUFS),
                1 => BUFS + u64::from(c.u8()) * 0x1000,
                2 => u64::from(c.u32()),
                _ => c.u64(),
            };
            let len = match c.u8() % 3 {
                0 => 12 + u32::from(c.u16() % 2048),
                1 => u32::from(c.u16()),
                _ => c.u32(),
            };
            let mut flags = u16::from(c.u8()) & 6;
            let mut next = 0;
            if i + 1 < u16::from(n) {
                flags |= 1;
                next = first.wrapping_add(i + 1) % size;
            }
            let mut d = addr.to_le_bytes().to_vec();
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            let _ = self.memfd.write_at(&d, desc + 16 * u64::from(idx));
        }
        self.next_desc[q] = first.wrapping_add(u16::from(n)) % size;
        let slot = avail + 4 + 2 * u64::from(self.avail_idx[q] % size);
        let _ = self.memfd.write_at(&first.to_le_bytes(), slot);
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        let _ = self
            .memfd
            .write_at(&self.avail_idx[q].to_le_bytes(), avail + 2);
    }

    fn op(&mut self, c: &mut Cursor<'_>) {
        match c.u8() % 26 {
            0 => {
                // Raw: any request code, flags, size field, payload and fds.
                let request = match c.u8() {
                    b if b < 0xf0 => u32::from(b % 48),
                    _ => c.u32(),
                };
                let flags = match c.u8() % 4 {
                    0 => VERSION_1,
                    1 => VERSION_1 | NEED_REPLY,
                    2 => VERSION_1 | 0x4,
                    _ => c.u32(),
                };
                let plen = usize::from(c.u8());
                let payload = c.bytes(plen).to_vec();
                let size = if c.u8() & 1 == 0 {
                    payload.len() as u32
                } else {
                    u32::from(c.u16())
                };
                let nfds = usize::from(c.u8() % 3);
                let efds: Vec<EventFd> = (0..nfds)
                    .filter_map(|_| EventFd::new(EFD_NONBLOCK).ok())
                    .collect();
                let fds: Vec<RawFd> = efds.iter().map(|e| e.as_raw_fd()).collect();
                self.send(request, flags, size, &payload, &fds);
            }
            1 => self.msg(req::GET_FEATURES, &[], &[]),
            2 => {
                let v = match c.u8() % 3 {
                    0 => self.offered,
                    1 => self.offered & c.u64(),
                    _ => c.u64(),
                };
                self.u64_msg(req::SET_FEATURES, v);
            }
            3 => self.msg(req::GET_PROTOCOL_FEATURES, &[], &[]),
            4 => {
                let v = if c.u8() & 1 == 0 {
                    OUR_PROTOCOL_FEATURES
                } else {
                    c.u64()
                };
                self.u64_msg(req::SET_PROTOCOL_FEATURES, v);
            }
            5 => self.msg(req::SET_OWNER, &[], &[]),
            6 => self.msg(req::RESET_OWNER, &[], &[]),
            7 => {
                let n = 1 + c.u8() % 3;
                let mut p = u32::from(n).to_le_bytes().to_vec();
                p.extend_from_slice(&0u32.to_le_bytes());
                for _ in 0..n {
                    p.extend(Self::region_bytes(&Self::region(c)));
                }
                let nfds = match c.u8() % 4 {
                    0 => usize::from(n) - 1,
                    3 => usize::from(n) + 1,
                    _ => usize::from(n),
                };
                let fds: Vec<RawFd> = (0..nfds).map(|_| self.memfd.as_raw_fd()).collect();
                self.msg(req::SET_MEM_TABLE, &p, &fds);
            }
            8 => {
                let mut p = 0u64.to_le_bytes().to_vec();
                p.extend(Self::region_bytes(&Self::region(c)));
                let fd = self.memfd.as_raw_fd();
                self.msg(req::ADD_MEM_REG, &p, &[fd]);
            }
            9 => {
                let mut p = 0u64.to_le_bytes().to_vec();
                p.extend(Self::region_bytes(&Self::region(c)));
                self.msg(req::REM_MEM_REG, &p, &[]);
            }
            10 => {
                const NUMS: [u32; 12] = [0, 1, 2, 3, 4, 8, 16, 64, 256, 1024, 32768, 65535];
                let i = self.index(c);
                let b = c.u8();
                let num = if b & 0x80 != 0 {
                    c.u32()
                } else {
                    NUMS[usize::from(b % 12)]
                };
                if let Some(s) = self.ring_size.get_mut(i as usize) {
                    *s = if num.is_power_of_two() && num <= 256 {
                        num as u16
                    } else {
                        256
                    };
                }
                self.state_msg(req::SET_VRING_NUM, i, num);
            }
            11 => {
                let i = self.index(c);
                let (d, a, u) = Self::ring_addrs(i);
                let (mut d, mut a, mut u, mut flags, mut log) =
                    (VMM_BASE + d, VMM_BASE + a, VMM_BASE + u, 0u32, 0u64);
                match c.u8() % 4 {
                    0 => {}
                    1 => u = c.u64(),
                    2 => a += u64::from(c.u8()),
                    _ => {
                        d = c.u64();
                        a = c.u64();
                        u = c.u64();
                        flags = c.u32();
                        log = c.u64();
                    }
                }
                let mut p = i.to_le_bytes().to_vec();
                p.extend_from_slice(&flags.to_le_bytes());
                for v in [d, u, a, log] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                self.msg(req::SET_VRING_ADDR, &p, &[]);
            }
            12 => {
                let i = self.index(c);
                let num = u32::from(c.u16());
                self.state_msg(req::SET_VRING_BASE, i, num);
            }
            13 => {
                let i = self.index(c);
                self.state_msg(req::GET_VRING_BASE, i, 0);
            }
            14..=16 => {
                let which = [req::SET_VRING_KICK, req::SET_VRING_CALL, req::SET_VRING_ERR];
                let request = which[usize::from(c.u8() % 3)];
                let i = self.index(c);
                let mode = c.u8() % 4;
                let ev = EventFd::new(EFD_NONBLOCK).ok();
                let nofd = if mode == 1 { 0x100 } else { 0 };
                let fds: Vec<RawFd> = match (&ev, mode) {
                    (Some(e), 0 | 2) => vec![e.as_raw_fd()],
                    (Some(e), 3) => vec![e.as_raw_fd(), e.as_raw_fd()],
                    _ => vec![],
                };
                self.msg(request, &(u64::from(i) | nofd).to_le_bytes(), &fds);
                if request == req::SET_VRING_KICK {
                    if let (Some(slot), Some(e)) = (self.kicks.get_mut(i as usize), ev) {
                        *slot = Some(e);
                    }
                }
            }
            17 => {
                let i = self.index(c);
                let num = if c.u8() & 1 == 0 { 1 } else { 0 };
                self.state_msg(req::SET_VRING_ENABLE, i, num);
            }
            18 | 19 => {
                let request = if c.u8() & 1 == 0 {
                    req::GET_CONFIG
                } else {
                    req::SET_CONFIG
                };
                let offset = u32::from(c.u8() % 32);
                let size = u32::from(c.u8() % 32);
                let flags = u32::from(c.u8() & 1);
                let mut p = offset.to_le_bytes().to_vec();
                p.extend_from_slice(&size.to_le_bytes());
                p.extend_from_slice(&flags.to_le_bytes());
                let body = c.bytes(size as usize).to_vec();
                p.extend_from_slice(&body);
                p.resize(12 + size as usize, 0);
                self.msg(request, &p, &[]);
            }
            20 | 21 => self.post_chain(c),
            22 => {
                let i = (c.u8() as usize) % self.kicks.len();
                if let Some(e) = &self.kicks[i] {
                    let _ = e.write(1);
                }
            }
            23 => {
                let p = (c.u8() as usize) % self.queues.len();
                let n = match c.u8() % 3 {
                    0 => 12 + usize::from(c.u8()),
                    1 => usize::from(c.u16()),
                    _ => 1526,
                };
                // Each frame costs its skb's truesize in the socket buffer: count 2 KiB extra.
                if n + 2048 <= self.inject_left {
                    self.inject_left -= n + 2048;
                    self.queues[p].inject_frame(&pattern_frame(12, n.saturating_sub(12), n as u8));
                }
            }
            24 => match c.u8() % 7 {
                0 => self.msg(req::GET_QUEUE_NUM, &[], &[]),
                1 => self.msg(req::RESET_DEVICE, &[], &[]),
                2 => self.msg(req::GET_MAX_MEM_SLOTS, &[], &[]),
                3 => self.u64_msg(req::SET_STATUS, u64::from(c.u8())),
                4 => self.msg(req::GET_STATUS, &[], &[]),
                5 => {
                    let mut p = c.u64().to_le_bytes().to_vec();
                    p.extend_from_slice(&c.u64().to_le_bytes());
                    let fd = self.memfd.as_raw_fd();
                    self.msg(req::SET_LOG_BASE, &p, &[fd]);
                }
                _ => {
                    let p = [0u8; 24];
                    self.msg(req::GET_INFLIGHT_FD, &p, &[]);
                }
            },
            _ => {
                if let Ok((a, b)) = UnixStream::pair() {
                    let fd = a.as_raw_fd();
                    self.msg(req::SET_BACKEND_REQ_FD, &[], &[fd]);
                    // Keep our end readable-but-ignored so backend requests do not block.
                    let _ = b.set_nonblocking(true);
                    self.keep_socks.push(b);
                }
            }
        }
    }
}

/// Runs one `vhost_user_msgs` input (see the module doc).
pub fn vhost_user_msgs(data: &[u8]) {
    init();
    let panics0 = PANICS.load(Ordering::SeqCst);
    let fds0 = open_fds();
    run_connection(data);
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        panics0,
        "a thread panicked while serving the connection"
    );
    assert_eq!(
        open_fds(),
        fds0,
        "file descriptors leaked by the connection"
    );
}

fn run_connection(data: &[u8]) {
    let mut c = Cursor::new(data);
    let cfg = c.u8();
    let pairs: u16 = if cfg & 1 != 0 { 2 } else { 1 };
    let queue_size = [256u16, 1024, 8, 32768][usize::from((cfg >> 1) & 3)];
    let offloads = u32::from(c.u8() & 0x1f);
    let mtu = c.u16();

    let queues: Vec<Arc<FakeHostQueue>> =
        (0..pairs).map(|_| Arc::new(FakeHostQueue::new())).collect();
    let stats: Vec<Arc<QueueStats>> = (0..pairs)
        .map(|_| Arc::new(QueueStats::default()))
        .collect();
    let identity = DeviceIdentity {
        mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        mtu,
        queue_pairs: pairs,
        queue_size,
        tx_rate: None,
        rx_rate: None,
    };
    let host = HostSide {
        queues: queues.clone(),
        supported_offloads: offloads,
        link_up: Arc::new(std::sync::atomic::AtomicBool::new(cfg & 8 != 0)),
        link_down_disconnects: false,
        l2: Default::default(),
    };
    // The frontend's end of a socketpair; the other end goes through the whole connection
    // set-up the server uses: the shim relay in front of vhost-user-backend's handler.
    let (sock, theirs) = UnixStream::pair().expect("socketpair");
    let conn = Connection::start(theirs, identity, host, &stats).expect("connection");
    let offered = vhost_user_backend::VhostUserBackend::features(&**conn.backend());
    let backend = Arc::downgrade(conn.backend());

    // Replies are read and dropped so the daemon never blocks on a full socket.
    let mut rd = sock.try_clone().expect("clone socket");
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(rd.read(&mut buf), Ok(n) if n > 0) {}
    });
    sock.set_write_timeout(Some(WRITE_TIMEOUT))
        .expect("write timeout");

    let memfd = File::from(
        nix::sys::memfd::memfd_create(c"fuzz-guest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd_create"),
    );
    memfd.set_len(MEM_SIZE).expect("size memfd");
    let nq = u32::from(pairs) * 2;
    let mut f = Front {
        sock,
        memfd,
        nq,
        ring_size: vec![256; nq as usize],
        next_desc: vec![0; nq as usize],
        avail_idx: vec![0; nq as usize],
        kicks: (0..nq).map(|_| None).collect(),
        keep_socks: Vec::new(),
        queues: queues.clone(),
        inject_left: 150_000,
        offered,
        closed: false,
    };
    let mut ops = 0;
    while !c.is_empty() && ops < MAX_OPS && !f.closed {
        ops += 1;
        f.op(&mut c);
    }

    // The frontend leaves: the daemon must notice and stop, and teardown must finish.
    let _ = f.sock.shutdown(std::net::Shutdown::Write);
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut conn = conn;
        let r = conn.wait();
        conn.close();
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    let res = rx
        .recv_timeout(STOP_TIMEOUT)
        .unwrap_or_else(|_| panic!("the daemon did not stop within {STOP_TIMEOUT:?}: hang"));
    // Joined so that no thread of this input outlives it (LeakSanitizer saw its TLS otherwise).
    waiter.join().expect("waiter thread");
    if let Err(e) = &res {
        assert!(
            !e.contains("failed to wait for daemon exit"),
            "the daemon thread panicked: {e}"
        );
    }
    let _ = f.sock.shutdown(std::net::Shutdown::Both);
    reader.join().expect("reader thread");
    drop(f);
    assert_eq!(
        backend.strong_count(),
        0,
        "the backend is still referenced after teardown (a reference cycle leaks it)"
    );
    drop(queues);
}
