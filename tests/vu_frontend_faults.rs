//! A misbehaving vhost-user frontend: disconnects at every handshake stage, malformed and
//! unknown messages, memory tables swapped under traffic, a memory region past its file.
//! Expected everywhere: an error reply or a clean disconnect, and the backend keeps serving.

mod support {
    #[path = "rig.rs"]
    pub mod rig;
    #[path = "vu_driver.rs"]
    pub mod vu_driver;
}

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use support::rig::*;
use support::vu_driver::{VuGuest, HDR_LEN};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_KICK: u32 = 12;
const VERSION_1_NEED_REPLY: u32 = 0x1 | 0x8;

fn message(req: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + payload.len());
    m.extend_from_slice(&req.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// Sends raw bytes (optionally with fds), then reads until the backend answers or hangs up.
/// Returns the bytes it answered with (empty: it closed the connection).
fn exchange(rig: &Rig, bytes: &[u8], fds: &[i32]) -> Vec<u8> {
    let mut s = UnixStream::connect(&rig.sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    if fds.is_empty() {
        let _ = s.write_all(bytes);
    } else {
        let iov = [std::io::IoSlice::new(bytes)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let _ = sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None);
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    match s.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("backend neither answered nor hung up: {e}"),
    }
    answer
}

/// One handshake step of a frontend.
type Step = Box<dyn Fn(&mut Frontend)>;

fn still_serving(rig: &Rig, seq: u32) {
    let mut g = rig.guest(1, ALL);
    tx_one_and_check(rig, &mut g, seq);
}

#[test]
fn disconnect_at_every_handshake_stage_leaves_the_backend_serving() {
    let rig = Rig::start(1);
    let mut seq = 0;
    for stage in 0..=12 {
        {
            let mut fe = Frontend::connect(&rig.sock, 2).expect("connect");
            let steps: Vec<Step> = vec![
                Box::new(|fe| fe.set_owner().unwrap()),
                Box::new(|fe| {
                    fe.get_features().unwrap();
                }),
                Box::new(|fe| {
                    fe.get_protocol_features().unwrap();
                }),
                Box::new(|fe| {
                    fe.set_protocol_features(
                        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
                    )
                    .unwrap()
                }),
                Box::new(|fe| fe.set_features(1 << 30 | 1 << 32).unwrap()),
                Box::new(|fe| {
                    fe.get_queue_num().unwrap();
                }),
                Box::new(|fe| fe.set_vring_num(0, 256).unwrap()),
                Box::new(|fe| fe.set_vring_num(1, 256).unwrap()),
                Box::new(|fe| fe.set_vring_base(0, 0).unwrap()),
                Box::new(|fe| fe.set_vring_base(1, 0).unwrap()),
                Box::new(|fe| {
                    let e = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
                    fe.set_vring_call(0, &e).unwrap()
                }),
                Box::new(|fe| {
                    let e = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
                    fe.set_vring_kick(1, &e).unwrap()
                }),
            ];
            for step in steps.iter().take(stage) {
                step(&mut fe);
            }
        } // the frontend vanishes here
          // A full guest must still get through, with fresh per-connection state.
        still_serving(&rig, seq);
        seq += 1;
    }
    // And mid-traffic: a guest that vanishes with frames in flight.
    {
        let mut g = rig.guest(1, ALL);
        for i in 0..20 {
            g.send(0, &frame(1000 + i, 100));
        }
        g.kick(g.tx(0));
    }
    let mut buf = vec![0u8; 2048];
    while rig.peers[0].recv(&mut buf).is_ok() {}
    still_serving(&rig, seq);
}

#[test]
fn unknown_and_malformed_messages_get_an_error_or_a_clean_disconnect() {
    let rig = Rig::start(1);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "unknown request code",
            message(9999, VERSION_1_NEED_REPLY, &[]),
        ),
        ("request code zero", message(0, VERSION_1_NEED_REPLY, &[])),
        ("bad version flags", message(GET_FEATURES, 0x7, &[])),
        ("size field far beyond the payload", {
            let mut m = message(SET_FEATURES, 1, &[0; 8]);
            m[8..12].copy_from_slice(&0x1000_0000u32.to_le_bytes());
            m
        }),
        ("truncated header", GET_FEATURES.to_le_bytes().to_vec()),
        (
            "SET_FEATURES with a short payload",
            message(SET_FEATURES, 1, &[1, 2, 3]),
        ),
        (
            "SET_VRING_NUM before SET_OWNER",
            message(SET_VRING_NUM, VERSION_1_NEED_REPLY, &[0; 8]),
        ),
        (
            "SET_VRING_NUM with a queue index out of range",
            [
                message(SET_OWNER, 1, &[]),
                message(SET_VRING_NUM, VERSION_1_NEED_REPLY, &{
                    let mut p = [0u8; 8];
                    p[..4].copy_from_slice(&4096u32.to_le_bytes());
                    p[4..].copy_from_slice(&256u32.to_le_bytes());
                    p
                }),
            ]
            .concat(),
        ),
        (
            "SET_VRING_NUM larger than the queue size",
            [
                message(SET_OWNER, 1, &[]),
                message(SET_VRING_NUM, VERSION_1_NEED_REPLY, &{
                    let mut p = [0u8; 8];
                    p[4..].copy_from_slice(&65535u32.to_le_bytes());
                    p
                }),
            ]
            .concat(),
        ),
        (
            "SET_VRING_ADDR with no memory table",
            [
                message(SET_OWNER, 1, &[]),
                message(SET_VRING_ADDR, VERSION_1_NEED_REPLY, &[0; 40]),
            ]
            .concat(),
        ),
        (
            "SET_OWNER twice",
            [
                message(SET_OWNER, 1, &[]),
                message(SET_OWNER, VERSION_1_NEED_REPLY, &[]),
            ]
            .concat(),
        ),
        (
            "SET_MEM_TABLE with no fd",
            message(SET_MEM_TABLE, VERSION_1_NEED_REPLY, &[0; 40]),
        ),
        ("garbage", (0..500u32).map(|i| (i * 97) as u8).collect()),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let answer = exchange(&rig, bytes, &[]);
        // Either nothing (hung up) or well-formed replies; never a crash or a hang.
        assert!(
            answer.len() % 4 == 0 || answer.is_empty(),
            "{what}: odd reply {answer:?}"
        );
        still_serving(&rig, i as u32);
    }
}

#[test]
fn fds_attached_to_messages_that_take_none_are_closed() {
    let rig = Rig::start(1);
    still_serving(&rig, 0); // warm up: the first connection allocates lazily
    let before = open_fds();
    for _ in 0..50 {
        let files: Vec<_> = (0..3)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        let _ = exchange(&rig, &message(GET_FEATURES, 1, &[]), &fds);
        let _ = exchange(&rig, &message(SET_VRING_KICK, 1, &0u64.to_le_bytes()), &fds);
    }
    still_serving(&rig, 1);
    assert!(
        eventually(|| open_fds() <= before),
        "fds leaked: {before} before, {} after",
        open_fds()
    );
}

#[test]
fn memory_region_larger_than_its_file_is_refused_and_traffic_resumes_after() {
    let rig = Rig::start(1);
    let mut fe = Frontend::connect(&rig.sock, 2).unwrap();
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf & VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    fe.set_features(f).unwrap();
    let small = std::fs::File::from(
        nix::sys::memfd::memfd_create(c"small", nix::sys::memfd::MFdFlags::empty()).unwrap(),
    );
    small.set_len(1 << 20).unwrap();
    let region = vhost::VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 64 << 20, // the file has 1 MiB
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
        mmap_handle: small.as_raw_fd(),
    };
    fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    let r = fe.set_mem_table(&[region]);
    assert!(r.is_err(), "the table must be refused");
    drop(fe);
    still_serving(&rig, 0);
}

#[test]
fn memory_table_replaced_under_traffic_keeps_frames_intact() {
    let rig = Rig::start(1);
    let mut g = rig.guest(1, ALL & !MRG_RXBUF);
    g.post_rx(0, 64, 4096);
    g.kick(g.rx(0));
    let mut got = Vec::new();
    for i in 0..1000u32 {
        // New mapping of the same guest memory; the old one goes away under the workers.
        g.set_mem_table();
        let f = frame(i, 64 + (i as usize % 1400));
        assert!(g.send(0, &f));
        g.kick(g.tx(0));
        let mut buf = vec![0u8; 2048];
        let n = rig.peers[0].recv(&mut buf).expect("TX after a table swap");
        assert_eq!(&buf[HDR_LEN..n], &f[..], "TX frame {i}");
        g.take_used(g.tx(0));
        // And the other way.
        rig.peers[0]
            .send(&[&[0u8; HDR_LEN][..], &f[..]].concat())
            .unwrap();
        assert!(
            g.wait_until(Duration::from_secs(2), |g| {
                got.extend(g.recv_frames(0));
                got.len() > i as usize
            }),
            "RX frame {i} after a table swap"
        );
        assert_eq!(got[i as usize], f);
        g.post_rx(0, 1, 4096);
        g.kick(g.rx(0));
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[allow(dead_code)]
fn _uses(_: VuGuest) {}
