//! The relay between a frontend and a fake handler (the test holds both outer ends).

use super::*;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

const V: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;
const REPLY: u32 = 0x4;

fn msg(code: FrontendReq, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&u32::from(code).to_ne_bytes());
    v.extend_from_slice(&flags.to_ne_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
    v.extend_from_slice(payload);
    v
}

fn u64_msg(code: FrontendReq, flags: u32, v: u64) -> Vec<u8> {
    msg(code, flags, &v.to_ne_bytes())
}

fn enable(index: u32, on: u32, flags: u32) -> Vec<u8> {
    msg(
        FrontendReq::SET_VRING_ENABLE,
        flags,
        VhostUserVringState::new(index, on).as_slice(),
    )
}

fn send(sock: &UnixStream, data: &[u8], fds: &[RawFd]) {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[io::IoSlice::new(data)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// What the fake handler received: the bytes (header + payload) and the fd count.
type Seen = (Vec<u8>, usize);

/// A handler that answers GET_FEATURES (after `delay`) and GET_PROTOCOL_FEATURES, and reports
/// every message it gets, barriers included.
fn fake_handler(sock: UnixStream, delay: Duration) -> Receiver<Seen> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        while let Ok(Some(m)) = read_message(&sock, Side::Frontend) {
            let mut bytes = msg(m.code().unwrap(), m.hdr.flags, &m.payload);
            bytes.truncate(12 + m.payload.len());
            let _ = tx.send((bytes, m.fds.len()));
            let reply = match m.code() {
                Some(FrontendReq::GET_FEATURES) => {
                    std::thread::sleep(delay);
                    Some(u64_msg(FrontendReq::GET_FEATURES, V | REPLY, 1 << 30))
                }
                Some(FrontendReq::GET_PROTOCOL_FEATURES) => {
                    Some(u64_msg(FrontendReq::GET_PROTOCOL_FEATURES, V | REPLY, 0x8))
                }
                _ => None,
            };
            if let Some(r) = reply {
                if (&sock).write_all(&r).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

struct Rig {
    front: UnixStream,
    seen: Receiver<Seen>,
    log: Arc<DirtyLogState>,
    relay: std::thread::JoinHandle<Result<(), ShimError>>,
}

impl Rig {
    fn new(delay: Duration) -> Rig {
        let (front, front_inner) = UnixStream::pair().unwrap();
        let (handler_inner, handler) = UnixStream::pair().unwrap();
        let log = Arc::new(DirtyLogState::new());
        let ctx = RelayContext {
            dirty_log: log.clone(),
            notifier: Arc::new(ConfigNotifier::default()),
            vrings: 4,
            queue_size: 256,
        };
        let relay = std::thread::spawn(move || relay(front_inner, handler_inner, ctx));
        front
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Rig {
            front,
            seen: fake_handler(handler, delay),
            log,
            relay,
        }
    }

    /// A rig whose frontend has sent SET_VRING_CALL (no fd) for vrings `0..vrings`.
    fn with_calls(vrings: u64) -> Rig {
        let rig = Rig::new(Duration::ZERO);
        for index in 0..vrings {
            (&rig.front).write_all(&call_nofd(index)).unwrap();
        }
        rig
    }

    /// The next message the handler got that is not a barrier.
    fn next_forwarded(&self) -> Seen {
        loop {
            let s = self.seen.recv_timeout(Duration::from_secs(5)).unwrap();
            if s.0[0..4] != u32::from(FrontendReq::GET_PROTOCOL_FEATURES).to_ne_bytes() {
                return s;
            }
        }
    }

    /// Sends GET_FEATURES.
    fn ask_features(&mut self) {
        self.front
            .write_all(&msg(FrontendReq::GET_FEATURES, V, &[]))
            .unwrap();
    }

    /// Asserts that the next bytes back are the handler's GET_FEATURES reply.
    fn expect_features_reply(&mut self) {
        assert_eq!(
            read_n(&mut self.front, 20),
            u64_msg(FrontendReq::GET_FEATURES, V | REPLY, 1 << 30)
        );
    }

    /// Sends SET_OWNER and asserts that it is the next message the handler sees: what was
    /// sent before it was not forwarded.
    fn assert_next_forwarded_is_the_next_sent(&mut self) {
        self.front
            .write_all(&msg(FrontendReq::SET_OWNER, V, &[]))
            .unwrap();
        assert_eq!(self.next_forwarded().0, msg(FrontendReq::SET_OWNER, V, &[]));
    }

    /// GET_FEATURES + SET_PROTOCOL_FEATURES(`pf`): what makes the handler ack NEED_REPLY.
    fn negotiate(&mut self, pf: u64) {
        self.ask_features();
        read_n(&mut self.front, 20);
        self.front
            .write_all(&u64_msg(FrontendReq::SET_PROTOCOL_FEATURES, V, pf))
            .unwrap();
        self.next_forwarded();
        self.next_forwarded();
    }

    fn finish(self) -> Result<(), ShimError> {
        drop(self.front);
        self.relay.join().unwrap()
    }

    fn ended(self) -> ShimError {
        let Rig { front, relay, .. } = self;
        let e = relay.join().unwrap().unwrap_err();
        drop(front);
        e
    }
}

const REPLY_ACK: u64 = 0x8;
const LOG_SHMFD: u64 = 0x2;

#[test]
fn early_vring_disable_is_acked_by_the_shim_and_not_forwarded() {
    let mut rig = Rig::new(Duration::ZERO);
    rig.negotiate(REPLY_ACK);
    rig.front.write_all(&enable(2, 0, V | NEED_REPLY)).unwrap();
    assert_eq!(
        read_n(&mut rig.front, 20),
        u64_msg(FrontendReq::SET_VRING_ENABLE, V | REPLY, 0)
    );
    // The next message the handler sees is the one after it.
    rig.assert_next_forwarded_is_the_next_sent();
    rig.finish().unwrap();
}

#[test]
fn early_vring_enable_is_not_acked_without_reply_ack() {
    let mut rig = Rig::new(Duration::ZERO);
    rig.front.write_all(&enable(2, 1, V | NEED_REPLY)).unwrap();
    rig.ask_features();
    // The first thing back is GET_FEATURES's reply: no ack for the early enable.
    rig.expect_features_reply();
    rig.finish().unwrap();
}

#[test]
fn early_vring_enable_is_replayed_after_set_features() {
    let mut rig = Rig::new(Duration::ZERO);
    for _ in 0..1000 {
        rig.front.write_all(&enable(1, 1, V)).unwrap();
    }
    rig.front.write_all(&enable(3, 1, V)).unwrap();
    rig.front.write_all(&enable(3, 0, V)).unwrap();
    let features = u64_msg(FrontendReq::SET_FEATURES, V, 1 << 30);
    rig.front.write_all(&features).unwrap();
    assert_eq!(rig.next_forwarded().0, features);
    // Only the latest state of each ring, once.
    assert_eq!(rig.next_forwarded().0, enable(1, 1, V));
    // After SET_FEATURES, SET_VRING_ENABLE passes straight through.
    rig.front.write_all(&enable(0, 0, V)).unwrap();
    assert_eq!(rig.next_forwarded().0, enable(0, 0, V));
    rig.finish().unwrap();
}

#[test]
fn early_vring_enable_for_a_pair_the_device_lacks_ends_with_a_misfit_naming_queues() {
    let rig = Rig::new(Duration::ZERO);
    (&rig.front).write_all(&enable(4, 1, V)).unwrap();
    (&rig.front)
        .write_all(&u64_msg(FrontendReq::SET_FEATURES, V, 1 << 30))
        .unwrap();
    let e = rig.ended();
    assert!(e.misfit().is_some(), "{e:?}");
    assert!(e.to_string().contains("--queues 3"), "{e}");
}

/// `SET_VRING_CALL` without an fd (`VHOST_USER_VRING_NOFD_MASK`) for vring `index`.
fn call_nofd(index: u64) -> Vec<u8> {
    u64_msg(FrontendReq::SET_VRING_CALL, V, index | 0x100)
}

#[test]
fn frontend_with_four_pairs_against_two_ends_with_one_misfit_and_the_handler_never_sees_them() {
    let rig = Rig::with_calls(8);
    // QEMU starts the device once every pair is set up.
    (&rig.front)
        .write_all(&u64_msg(FrontendReq::SET_FEATURES, V, 1 << 30))
        .unwrap();
    for index in 0..4 {
        assert_eq!(rig.next_forwarded().0, call_nofd(index));
    }
    let seen = rig.seen.recv_timeout(Duration::from_secs(5));
    let Rig { front, relay, .. } = rig;
    let e = relay.join().unwrap().unwrap_err();
    drop(front);
    assert!(seen.is_err(), "the handler got more: {seen:?}");
    assert!(e.to_string().contains("uses 4 queue pairs"), "{e}");
    assert!(e.to_string().contains("--queues 4"), "{e}");
}

#[test]
fn frontend_that_leaves_after_setting_up_more_pairs_ends_with_the_misfit() {
    let rig = Rig::with_calls(12);
    let e = rig.finish().unwrap_err();
    assert!(e.to_string().contains("--queues 6"), "{e}");
}

#[test]
fn frontend_that_sets_up_more_pairs_then_waits_for_its_guest_ends_with_the_misfit() {
    // QEMU reconnecting under a running guest: it sets up every pair, then waits.
    let rig = Rig::with_calls(8);
    let t = std::time::Instant::now();
    let e = rig.ended();
    assert!(e.to_string().contains("--queues 4"), "{e}");
    assert!(
        t.elapsed() < Duration::from_millis(u64::from(super::fit::DRAIN_QUIET_MS) * 3),
        "verdict after {:?}",
        t.elapsed()
    );
}

#[test]
fn ring_larger_than_queue_size_ends_with_the_flag_and_size_named() {
    let rig = Rig::new(Duration::ZERO);
    (&rig.front)
        .write_all(&msg(
            FrontendReq::SET_VRING_NUM,
            V,
            VhostUserVringState::new(0, 1024).as_slice(),
        ))
        .unwrap();
    let e = rig.ended();
    assert!(e.misfit().is_some(), "{e:?}");
    assert!(e.to_string().contains("--queue-size 1024"), "{e}");
}

#[test]
fn replies_keep_request_order_when_the_shim_answers_itself() {
    // The handler takes 200 ms to answer GET_FEATURES; the shim's own ack must come after it.
    let mut rig = Rig::new(Duration::from_millis(200));
    rig.negotiate(REPLY_ACK);
    rig.ask_features();
    rig.front.write_all(&enable(0, 1, V | NEED_REPLY)).unwrap();
    rig.expect_features_reply();
    assert_eq!(
        read_n(&mut rig.front, 20),
        u64_msg(FrontendReq::SET_VRING_ENABLE, V | REPLY, 0)
    );
    rig.finish().unwrap();
}

#[test]
fn fds_and_replies_cross_unchanged() {
    let mut rig = Rig::new(Duration::ZERO);
    let e = nix::sys::eventfd::EventFd::new().unwrap();
    let m = u64_msg(FrontendReq::SET_VRING_CALL, V, 0);
    send(&rig.front, &m, &[e.as_raw_fd()]);
    assert_eq!(rig.next_forwarded(), (m, 1));
    rig.ask_features();
    rig.expect_features_reply();
    rig.finish().unwrap();
}

#[test]
fn vring_fd_that_is_a_regular_file_ends_the_connection() {
    let rig = Rig::new(Duration::ZERO);
    let f = tempfile::tempfile().unwrap();
    send(
        &rig.front,
        &u64_msg(FrontendReq::SET_VRING_CALL, V, 0),
        &[f.as_raw_fd()],
    );
    let e = rig.ended();
    assert!(e.to_string().contains("a regular file"), "{e}");
}

#[test]
fn unsupported_or_oversized_requests_end_the_connection() {
    let rig = Rig::new(Duration::ZERO);
    (&rig.front)
        .write_all(&msg(FrontendReq::GPU_SET_SOCKET, V, &[]))
        .unwrap();
    assert!(rig.ended().to_string().contains("does not implement"));

    let rig = Rig::new(Duration::ZERO);
    let mut m = msg(FrontendReq::SET_FEATURES, V, &[]);
    m[8..12].copy_from_slice(&(1u32 << 30).to_ne_bytes());
    (&rig.front).write_all(&m).unwrap();
    let e = rig.ended();
    assert!(e.frontend_fault());
    assert!(e.to_string().contains("1073741824-byte payload"), "{e}");
}

/// A file of `len` bytes to pass as the dirty log's fd.
fn log_file(len: u64) -> std::fs::File {
    let file = tempfile::tempfile().unwrap();
    file.set_len(len).unwrap();
    file
}

fn log_base_msg(size: u64, offset: u64) -> Vec<u8> {
    msg(
        FrontendReq::SET_LOG_BASE,
        V,
        vhost::vhost_user::message::VhostUserLog::new(size, offset).as_slice(),
    )
}

#[test]
fn set_log_base_is_mapped_and_answered_by_the_shim() {
    let mut rig = Rig::new(Duration::ZERO);
    rig.negotiate(LOG_SHMFD);
    let file = log_file(4096);
    let m = log_base_msg(4096, 0);
    send(&rig.front, &m, &[file.as_raw_fd()]);
    let mut want = m.clone();
    want[4..8].copy_from_slice(&(V | REPLY).to_ne_bytes());
    assert_eq!(read_n(&mut rig.front, m.len()), want);
    assert_eq!(rig.log.bases_set(), 1);
    // Not forwarded: the handler's next message is the one sent after it.
    rig.assert_next_forwarded_is_the_next_sent();
    rig.finish().unwrap();
}

#[test]
fn set_log_base_without_log_shmfd_or_larger_than_its_fd_ends_the_connection() {
    let rig = Rig::new(Duration::ZERO);
    let file = log_file(4096);
    send(&rig.front, &log_base_msg(4096, 0), &[file.as_raw_fd()]);
    let log = rig.log.clone();
    assert!(matches!(rig.ended(), ShimError::LogShmfd));
    assert_eq!(log.bases_set(), 0);

    let mut rig = Rig::new(Duration::ZERO);
    rig.negotiate(LOG_SHMFD);
    file.set_len(100).unwrap();
    send(&rig.front, &log_base_msg(4096, 0), &[file.as_raw_fd()]);
    let log = rig.log.clone();
    let e = rig.ended();
    assert!(e.to_string().contains("larger than its fd"), "{e}");
    assert_eq!(log.bases_set(), 0);
}

fn region_msg(code: FrontendReq, gpa: u64, size: u64) -> Vec<u8> {
    msg(
        code,
        V | NEED_REPLY,
        VhostUserSingleMemoryRegion::new(gpa, size, 0x7f00_0000_0000, 0).as_slice(),
    )
}

#[test]
fn repeated_add_mem_reg_is_acked_once_forwarded_once() {
    let mut rig = Rig::new(Duration::ZERO);
    rig.negotiate(REPLY_ACK);
    let memfd = tempfile::tempfile().unwrap();
    let add = region_msg(FrontendReq::ADD_MEM_REG, 0, 0x2000_0000);
    send(&rig.front, &add, &[memfd.as_raw_fd()]);
    assert_eq!(
        rig.next_forwarded(),
        (add.clone(), 1),
        "first add forwarded"
    );
    send(&rig.front, &add, &[memfd.as_raw_fd()]);
    assert_eq!(
        read_n(&mut rig.front, 20),
        u64_msg(FrontendReq::ADD_MEM_REG, V | REPLY, 0)
    );
    // Removal is forwarded once; the repeat is answered by the shim.
    let rem = region_msg(FrontendReq::REM_MEM_REG, 0, 0x2000_0000);
    rig.front.write_all(&rem).unwrap();
    assert_eq!(rig.next_forwarded().0, rem, "first removal forwarded");
    rig.front.write_all(&rem).unwrap();
    assert_eq!(
        read_n(&mut rig.front, 20),
        u64_msg(FrontendReq::REM_MEM_REG, V | REPLY, 0)
    );
    // A different region is forwarded.
    let other = region_msg(FrontendReq::ADD_MEM_REG, 0x1_0000_0000, 0x1000);
    send(&rig.front, &other, &[memfd.as_raw_fd()]);
    assert_eq!(rig.next_forwarded().0, other);
    rig.finish().unwrap();
}
