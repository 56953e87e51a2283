//! A minimal virtio-net "guest" over a real vhost-user connection, for tests.
//!
//! It plays QEMU's part (the vhost-user frontend, through the `vhost` crate's `Frontend`: the
//! handshake, memory table, vring setup, dirty log) over memfd-backed shared memory; the
//! guest driver's part is the test kit's split-ring driver (`macvhost::testkit::ring`), one per
//! virtqueue, with a buffer area per queue. Tests drive macvhost over its real socket without
//! a VM and can also misbehave on purpose.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use macvhost::testkit::ring::{Layout, SplitRing, WRITE};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `VHOST_F_LOG_ALL`.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// vnet header length with VERSION_1.
pub const HDR_LEN: usize = macvhost::host::VNET_HDR_LEN_V1;
/// Where the frontend pretends guest memory lives in its own address space (translated by
/// the backend from vring addresses).
const VMM_BASE: u64 = 0x7f00_0000_0000;

/// One virtqueue: the kit's ring driver (no ledger) over the shared guest memory, the buffer
/// area its descriptors use, and its kick and call eventfds. Derefs to the ring driver.
#[derive(Debug)]
pub struct Ring {
    pub ring: SplitRing<GuestMemoryMmap>,
    /// Buffer area: descriptor i owns [bufs + i*buf_size, +buf_size).
    pub bufs: u64,
    pub buf_size: u64,
    /// Descriptor slots (= buffers) not handed to the device.
    pub free: Vec<u16>,
    pub kick: std::sync::Arc<EventFd>,
    pub call: std::sync::Arc<EventFd>,
}

impl std::ops::Deref for Ring {
    type Target = SplitRing<GuestMemoryMmap>;
    fn deref(&self) -> &Self::Target {
        &self.ring
    }
}

impl std::ops::DerefMut for Ring {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.ring
    }
}

/// The fake guest.
pub struct VuGuest {
    pub frontend: Frontend,
    pub mem: GuestMemoryMmap,
    pub memfd: File,
    pub rings: Vec<Ring>,
    pub acked_features: u64,
}

pub const MEM_SIZE: usize = 64 << 20;

fn memfd(size: usize) -> File {
    let fd = nix::sys::memfd::memfd_create(c"vu-guest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .expect("memfd_create");
    let f = File::from(fd);
    f.set_len(size as u64).expect("ftruncate memfd");
    f
}

impl VuGuest {
    /// Connects to `sock` (retrying up to `timeout`), negotiates `features & offered`, maps
    /// memory and sets up `pairs` queue pairs of `qsize` entries, all enabled.
    pub fn connect(
        sock: &Path,
        pairs: usize,
        qsize: u16,
        features: u64,
        timeout: Duration,
    ) -> VuGuest {
        let deadline = Instant::now() + timeout;
        let frontend = loop {
            match Frontend::connect(sock, (pairs * 2) as u64) {
                Ok(f) => break f,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to {}: {e}", sock.display()),
            }
        };
        VuGuest::over(frontend, pairs, qsize, features)
    }

    /// Like [`VuGuest::connect`] over an already-connected frontend (backend in client mode).
    pub fn over(frontend: Frontend, pairs: usize, qsize: u16, features: u64) -> VuGuest {
        let file = memfd(MEM_SIZE);
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .expect("map guest memory");
        let mut g = VuGuest {
            frontend,
            mem,
            memfd: file,
            rings: Vec::new(),
            acked_features: 0,
        };
        g.handshake(pairs, qsize, features);
        g
    }

    fn handshake(&mut self, pairs: usize, qsize: u16, want: u64) {
        let fe = &mut self.frontend;
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        assert!(offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
        let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let pf_want = pf
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::BACKEND_REQ
                | VhostUserProtocolFeatures::LOG_SHMFD);
        fe.set_protocol_features(pf_want)
            .expect("SET_PROTOCOL_FEATURES");
        let qn = fe.get_queue_num().expect("GET_QUEUE_NUM");
        assert!(qn as usize >= pairs * 2, "backend offers {qn} queues");
        let acked = offered & (want | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        fe.set_features(acked).expect("SET_FEATURES");
        self.acked_features = acked;
        self.set_mem_table();

        // Layout: rings from 1 MiB, buffers from 4 MiB, 64 KiB+ per descriptor slot.
        // 64 KiB + header per descriptor when it fits (non-MRG GSO guests need it), less with
        // many queues.
        let per_slot = (MEM_SIZE as u64 - 0x40_0000) / (pairs as u64 * 2 * u64::from(qsize));
        let buf_size = (per_slot & !0xff).min(0x1_0000 + 0x100);
        let mut next_ring = 0x10_0000u64;
        let mut next_buf = 0x40_0000u64;
        for q in 0..pairs * 2 {
            let layout = Layout::at(next_ring, qsize);
            next_ring = (layout.end() + 0xfff) & !0xfff;
            let bufs = next_buf;
            next_buf += buf_size * u64::from(qsize);
            assert!(next_buf as usize <= MEM_SIZE, "guest memory too small");
            // Zeroed rings (a reconnect may reuse the memory).
            let ring = Ring {
                ring: SplitRing::at(self.mem.clone(), layout.desc, qsize).without_ledger(),
                bufs,
                buf_size,
                free: (0..qsize).rev().collect(),
                kick: std::sync::Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                call: std::sync::Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            };
            let fe = &mut self.frontend;
            fe.set_vring_num(q, qsize).expect("SET_VRING_NUM");
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: qsize,
                    queue_size: qsize,
                    flags: 0,
                    desc_table_addr: VMM_BASE + layout.desc,
                    used_ring_addr: VMM_BASE + layout.used,
                    avail_ring_addr: VMM_BASE + layout.avail,
                    log_addr: None,
                },
            )
            .expect("SET_VRING_ADDR");
            fe.set_vring_base(q, 0).expect("SET_VRING_BASE");
            fe.set_vring_call(q, &ring.call).expect("SET_VRING_CALL");
            fe.set_vring_kick(q, &ring.kick).expect("SET_VRING_KICK");
            self.rings.push(ring);
        }
        for q in 0..pairs * 2 {
            self.frontend
                .set_vring_enable(q, true)
                .expect("SET_VRING_ENABLE");
        }
    }

    /// Hands the backend a request channel (SET_BACKEND_REQ_FD) and returns the frontend's end,
    /// on which the backend's requests (CONFIG_CHANGE_MSG...) arrive.
    pub fn open_backend_channel(&mut self) -> std::os::unix::net::UnixStream {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        self.frontend
            .set_backend_request_fd(&theirs)
            .expect("SET_BACKEND_REQ_FD");
        ours
    }

    /// The `status` field of `virtio_net_config` (offset 6) as GET_CONFIG reports it.
    pub fn link_status(&mut self) -> u16 {
        let flags = vhost::vhost_user::message::VhostUserConfigFlags::empty();
        let (_, data) = self
            .frontend
            .get_config(6, 2, flags, &[0u8; 2])
            .expect("GET_CONFIG");
        u16::from_le_bytes([data[0], data[1]])
    }

    /// (Re)sends SET_MEM_TABLE for the one memfd region.
    pub fn set_mem_table(&mut self) {
        let region = self.mem.iter().next().unwrap();
        let info = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: VMM_BASE,
            mmap_offset: 0,
            mmap_handle: self.memfd.as_raw_fd(),
        };
        self.frontend.set_mem_table(&[info]).expect("SET_MEM_TABLE");
    }

    pub fn rx(&self, pair: usize) -> usize {
        pair * 2
    }
    pub fn tx(&self, pair: usize) -> usize {
        pair * 2 + 1
    }

    /// Writes descriptor `i` of queue `q`.
    pub fn write_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.rings[q].write_desc(i, addr, len, flags, next);
    }

    /// Makes `head` available on queue `q` (without kicking).
    pub fn push_avail(&mut self, q: usize, head: u16) {
        self.rings[q].publish(head);
    }

    /// Overwrites the avail index (for hostile-ring tests).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.rings[q].set_avail_idx(idx);
    }

    pub fn kick(&self, q: usize) {
        self.rings[q].kick.write(1).unwrap();
    }

    /// Queues one TX frame (a zeroed 12-byte vnet header is prepended), in `segments` pieces.
    pub fn send(&mut self, pair: usize, frame: &[u8]) -> bool {
        let q = self.tx(pair);
        let Some(i) = self.rings[q].free.pop() else {
            return false;
        };
        let addr = self.rings[q].bufs + u64::from(i) * self.rings[q].buf_size;
        self.mem
            .write_slice(&[0u8; HDR_LEN], GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(frame, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        self.write_desc(q, i, addr, (HDR_LEN + frame.len()) as u32, 0, 0);
        self.push_avail(q, i);
        true
    }

    /// Posts up to `n` RX buffers of `len` bytes on `pair`. Returns how many were posted.
    pub fn post_rx(&mut self, pair: usize, n: usize, len: u32) -> usize {
        let q = self.rx(pair);
        let mut posted = 0;
        while posted < n {
            let Some(i) = self.rings[q].free.pop() else {
                break;
            };
            let addr = self.rings[q].bufs + u64::from(i) * self.rings[q].buf_size;
            self.write_desc(q, i, addr, len.min(self.rings[q].buf_size as u32), WRITE, 0);
            self.push_avail(q, i);
            posted += 1;
        }
        posted
    }

    /// New used entries of queue `q` as (head, len); frees their slots.
    pub fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let r = &mut self.rings[q];
        let used = r.ring.take_used();
        for &(id, _) in &used {
            if id < u32::from(r.layout.size) {
                r.free.push(id as u16);
            }
        }
        used.into_iter().map(|(id, len)| (id as u16, len)).collect()
    }

    /// Starts a migration's dirty logging as QEMU does: SET_LOG_BASE with a fresh memfd of
    /// `bytes` (enough for all guest memory), then SET_FEATURES with `VHOST_F_LOG_ALL`.
    /// Returns the log file.
    pub fn start_dirty_log(&mut self, bytes: usize) -> File {
        let log = memfd(bytes);
        self.frontend
            .set_log_base(
                0,
                Some(vhost::VhostUserDirtyLogRegion {
                    mmap_size: bytes as u64,
                    mmap_offset: 0,
                    mmap_handle: log.as_raw_fd(),
                }),
            )
            .expect("SET_LOG_BASE");
        self.frontend
            .set_features(self.acked_features | VHOST_F_LOG_ALL)
            .expect("SET_FEATURES with LOG_ALL");
        // SET_FEATURES has no reply without NEED_REPLY: a GET_FEATURES round trip makes sure
        // the backend applied it (QEMU does the same when it turns logging on).
        self.frontend.get_features().expect("GET_FEATURES");
        log
    }

    /// Ends logging: SET_FEATURES without `VHOST_F_LOG_ALL` (a finished or cancelled migration).
    pub fn stop_dirty_log(&mut self) {
        self.frontend
            .set_features(self.acked_features & !VHOST_F_LOG_ALL)
            .expect("SET_FEATURES without LOG_ALL");
        self.frontend.get_features().expect("GET_FEATURES");
    }

    /// The guest pages marked in `log`, clearing them (as QEMU's harvest does).
    pub fn harvest_log(log: &File) -> std::collections::BTreeSet<u64> {
        use std::os::unix::fs::FileExt;
        let len = log.metadata().unwrap().len() as usize;
        let mut bytes = vec![0u8; len];
        log.read_exact_at(&mut bytes, 0).unwrap();
        log.write_all_at(&vec![0u8; len], 0).unwrap();
        let mut pages = std::collections::BTreeSet::new();
        for (i, b) in bytes.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    pages.insert(i as u64 * 8 + bit);
                }
            }
        }
        pages
    }

    /// Sends SET_VRING_ADDR again for queue `q` with its current addresses, with or without
    /// `VHOST_VRING_F_LOG` (what QEMU does to a running ring when a migration starts or ends).
    pub fn resend_vring_addr(&mut self, q: usize, log: bool) {
        let l = self.rings[q].layout;
        self.frontend
            .set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: l.size,
                    queue_size: l.size,
                    flags: u32::from(log),
                    desc_table_addr: VMM_BASE + l.desc,
                    used_ring_addr: VMM_BASE + l.used,
                    avail_ring_addr: VMM_BASE + l.avail,
                    log_addr: log.then_some(l.used),
                },
            )
            .expect("SET_VRING_ADDR");
    }

    /// Pages of the used ring of queue `q`.
    pub fn used_ring_pages(&self, q: usize) -> std::ops::RangeInclusive<u64> {
        let (start, end) = self.rings[q].layout.used_range();
        start / 4096..=(end - 1) / 4096
    }

    /// Pages of RX buffer `head` on `pair`, first `len` bytes.
    pub fn rx_buffer_pages(
        &self,
        pair: usize,
        head: u16,
        len: u32,
    ) -> std::ops::RangeInclusive<u64> {
        let r = &self.rings[self.rx(pair)];
        let a = r.bufs + u64::from(head) * r.buf_size;
        a / 4096..=(a + u64::from(len).max(1) - 1) / 4096
    }

    /// Bytes of RX buffer `head` on `pair`.
    pub fn rx_buffer(&self, pair: usize, head: u16, len: u32) -> Vec<u8> {
        let r = &self.rings[self.rx(pair)];
        let mut v = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut v, GuestAddress(r.bufs + u64::from(head) * r.buf_size))
            .unwrap();
        v
    }

    /// Collects received frames on `pair` (vnet header stripped; MRG_RXBUF frames are merged).
    pub fn recv_frames(&mut self, pair: usize) -> Vec<Vec<u8>> {
        let used = self.take_used(self.rx(pair));
        let mut frames = Vec::new();
        let mut it = used.into_iter();
        while let Some((head, len)) = it.next() {
            let first = self.rx_buffer(pair, head, len);
            if first.len() < HDR_LEN {
                continue;
            }
            let nbuf = u16::from_le_bytes([first[10], first[11]]).max(1);
            let mut frame = first[HDR_LEN..].to_vec();
            for _ in 1..nbuf {
                if let Some((h, l)) = it.next() {
                    frame.extend(self.rx_buffer(pair, h, l));
                }
            }
            frames.push(frame);
        }
        frames
    }

    /// Waits until `cond` holds, polling every millisecond, up to `timeout`.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        mut cond: impl FnMut(&mut VuGuest) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        cond(self)
    }
}

/// A socket path for one test, in a fresh temp dir.
pub fn socket_in(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
    dir.path().join(name)
}
