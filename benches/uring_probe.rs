//! Does io_uring beat one `writev`/`readv` per frame on a tap / macvtap queue fd, and does this
//! kernel issue those requests inline or punt them to io-wq worker threads?
//!
//! `sudo cargo bench --bench uring_probe` (root; `ip`). Runs in a private network and mount
//! namespace of its own (`unshare`), so everything it creates vanishes with the process.
//!
//! For each device (tap; macvtap over a veth pair), on one queue fd opened with
//! `HostDevice::open` exactly as macvhost opens it, 64-byte frames:
//! - TX: a `writev` loop vs io_uring batches of `B` `Writev` SQEs per `io_uring_enter`;
//! - RX: draining a backlog of generated frames with a `readv` loop vs `B` `Readv` SQEs per
//!   `io_uring_enter` (the backlog is queued first, so the reads find frames);
//!
//! and reports Mframes/s, CPU µs per frame, and how many `iou-wrk` threads appeared (io-wq
//! workers: none means the requests completed inline, at submission).

use std::fs;
use std::os::fd::{AsRawFd, RawFd};
use std::process::Command;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use macvhost::host::{HostDevice, HostSpec};

const HDR: usize = 12;
const FRAME: usize = 64;
const GUEST_MAC: [u8; 6] = [0x02, 0x6d, 0x76, 0x68, 0x00, 0x02];

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("uring_probe: not run (use `cargo bench --bench uring_probe` as root)");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("uring_probe: needs root; skipped");
        return;
    }
    enter_private_namespaces();
    let secs = 2.0;
    println!(
        "kernel {}",
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
    );
    println!("| device | direction | method | Mframes/s | CPU µs/frame | iou-wrk threads |");
    println!("|---|---|---|---|---|---|");
    for kind in ["tap", "macvtap"] {
        let (spec, peer) = topology(kind);
        let dev = HostDevice::open(&spec, 1).expect("open device");
        let fd = dev.queues()[0].as_raw_fd();
        for batch in [0usize, 8, 32, 64] {
            let (rate, cpu, wrk) = tx(fd, batch, secs, kind);
            let method = method_name(batch);
            println!("| {kind} | TX | {method} | {rate:.3} | {cpu:.2} | {wrk} |");
        }
        for batch in [0usize, 8, 32, 64] {
            let (rate, cpu, wrk) = rx(fd, batch, &peer);
            let method = method_name(batch);
            println!("| {kind} | RX | {method} | {rate:.3} | {cpu:.2} | {wrk} |");
        }
        drop(dev);
    }
}

fn method_name(batch: usize) -> String {
    if batch == 0 {
        "writev/readv loop".into()
    } else {
        format!("io_uring, {batch} per enter")
    }
}

fn run(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}");
}

fn enter_private_namespaces() {
    // SAFETY: unshare affects only this (still single-threaded) process.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) };
    assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
    run(&["mount", "--make-rprivate", "/"]);
    // /sys must describe this network namespace (macvtap's /dev/tapN lookup reads it).
    run(&["mount", "-t", "sysfs", "sysfs", "/sys"]);
    run(&["ip", "link", "set", "lo", "up"]);
}

/// Creates the device; returns its spec and the interface a generator sends on.
fn topology(kind: &str) -> (HostSpec, String) {
    if kind == "tap" {
        run(&[
            "ip",
            "tuntap",
            "add",
            "dev",
            "upt0",
            "mode",
            "tap",
            "multi_queue",
        ]);
        run(&["ip", "link", "set", "upt0", "up"]);
        (
            HostSpec::Tap {
                iface: "upt0".into(),
            },
            "upt0".into(),
        )
    } else {
        run(&[
            "ip", "link", "add", "upp0", "type", "veth", "peer", "name", "upl0",
        ]);
        let mac = GUEST_MAC
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let index = (30000 + std::process::id() % 30000..)
            .find(|i| !std::path::Path::new(&format!("/dev/tap{i}")).exists())
            .unwrap()
            .to_string();
        run(&[
            "ip", "link", "add", "link", "upl0", "name", "upm0", "index", &index, "address", &mac,
            "type", "macvtap", "mode", "bridge",
        ]);
        for l in ["upp0", "upl0", "upm0"] {
            run(&["ip", "link", "set", l, "up"]);
        }
        (
            HostSpec::Macvtap {
                iface: "upm0".into(),
            },
            "upp0".into(),
        )
    }
}

fn frame() -> Vec<u8> {
    let mut f = vec![0u8; HDR + FRAME];
    f[HDR..HDR + 6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0]);
    f[HDR + 6..HDR + 12].copy_from_slice(&GUEST_MAC);
    f[HDR + 12..HDR + 14].copy_from_slice(&0x88b5u16.to_be_bytes());
    f
}

fn cpu_now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec; the process CPU clock covers io-wq threads too.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn iou_workers() -> usize {
    fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("iou-wrk"))
        .count()
}

/// Writes frames for `secs`; `batch` 0 = one writev per frame. Returns (Mframes/s, CPU µs per
/// frame, io-wq workers seen).
fn tx(fd: RawFd, batch: usize, secs: f64, _kind: &str) -> (f64, f64, usize) {
    let f = frame();
    let iov = libc::iovec {
        iov_base: f.as_ptr() as *mut _,
        iov_len: f.len(),
    };
    let mut ring = IoUring::new(256).expect("io_uring");
    let (t0, c0) = (Instant::now(), cpu_now());
    let mut frames = 0u64;
    let mut workers = 0;
    while t0.elapsed().as_secs_f64() < secs {
        if batch == 0 {
            for _ in 0..64 {
                // SAFETY: `iov` points at `f`, alive for the loop.
                if unsafe { libc::writev(fd, &iov, 1) } > 0 {
                    frames += 1;
                }
            }
            continue;
        }
        let e = opcode::Writev::new(types::Fd(fd), &iov, 1).build();
        for _ in 0..batch {
            // SAFETY: the iovec and the frame outlive the request (we wait for completion).
            unsafe { ring.submission().push(&e).expect("sq full") };
        }
        ring.submit_and_wait(batch).expect("submit");
        for cqe in ring.completion() {
            if cqe.result() > 0 {
                frames += 1;
            }
        }
        workers = workers.max(iou_workers());
    }
    let (dt, cpu) = (t0.elapsed().as_secs_f64(), cpu_now() - c0);
    (
        frames as f64 / dt / 1e6,
        cpu / frames as f64 * 1e6,
        workers.max(iou_workers()),
    )
}

/// Queues a backlog of frames (AF_PACKET on `peer`), then drains it. Returns (Mframes/s, CPU µs
/// per frame, io-wq workers seen).
fn rx(fd: RawFd, batch: usize, peer: &str) -> (f64, f64, usize) {
    let backlog = 200_000u64;
    let dev = if peer == "upt0" { "upt0" } else { "upm0" };
    run(&["ip", "link", "set", dev, "txqueuelen", &backlog.to_string()]);
    generate(peer, backlog);
    let mut bufs = vec![vec![0u8; 2048]; batch.max(1)];
    let iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut ring = IoUring::new(256).expect("io_uring");
    let (t0, c0) = (Instant::now(), cpu_now());
    let mut last = t0;
    let mut frames = 0u64;
    let mut workers = 0;
    if batch == 0 {
        // SAFETY: `iovs[0]` covers `bufs[0]`.
        while unsafe { libc::readv(fd, &iovs[0], 1) } > 0 {
            frames += 1;
        }
        last = Instant::now();
    } else {
        // `batch` reads in flight, each resubmitted as it completes; a read on an empty queue
        // waits (io_uring arms a poll), so the drain ends when nothing completes for 100 ms.
        let submit = |ring: &mut IoUring, i: usize| {
            let e = opcode::Readv::new(types::Fd(fd), &iovs[i], 1)
                .build()
                .user_data(i as u64);
            // SAFETY: buffer `i` is owned by this request until its completion is reaped.
            unsafe { ring.submission().push(&e).expect("sq full") };
        };
        for i in 0..batch {
            submit(&mut ring, i);
        }
        let ts = types::Timespec::from(Duration::from_millis(100));
        let args = types::SubmitArgs::new().timespec(&ts);
        loop {
            match ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => panic!("io_uring_enter: {e}"),
            }
            let done: Vec<(usize, i32)> = ring
                .completion()
                .map(|c| (c.user_data() as usize, c.result()))
                .collect();
            if done.is_empty() {
                break;
            }
            for (i, r) in done {
                if r > 0 {
                    frames += 1;
                    last = Instant::now();
                }
                submit(&mut ring, i);
            }
            workers = workers.max(iou_workers());
        }
        // Cancel the reads still waiting on the empty queue before the buffers go away.
        let _ = ring
            .submitter()
            .register_sync_cancel(None, types::CancelBuilder::any());
    }
    let (dt, cpu) = (last.duration_since(t0).as_secs_f64(), cpu_now() - c0);
    // Leave the queue empty for the next method.
    let mut b = [0u8; 2048];
    // SAFETY: reads into `b`.
    while unsafe { libc::read(fd, b.as_mut_ptr().cast(), b.len()) } > 0 {}
    (
        frames as f64 / dt / 1e6,
        cpu / frames as f64 * 1e6,
        workers.max(iou_workers()),
    )
}

/// Sends `n` 64-byte frames to the guest MAC on `iface` (AF_PACKET, qdisc bypass).
fn generate(iface: &str, n: u64) {
    let ifindex: i32 = fs::read_to_string(format!("/sys/class/net/{iface}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: plain socket(2).
    let s = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        )
    };
    assert!(s >= 0);
    let big: libc::c_int = 1 << 30;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with int options on our socket.
    unsafe {
        libc::setsockopt(
            s,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&big as *const i32).cast(),
            4,
        );
        libc::setsockopt(
            s,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const i32).cast(),
            4,
        );
    }
    // SAFETY: zeroed sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex;
    // SAFETY: valid sockaddr_ll.
    let rc = unsafe {
        libc::bind(
            s,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0);
    let mut f = frame()[HDR..].to_vec();
    f[0..6].copy_from_slice(&GUEST_MAC);
    f[6..12].copy_from_slice(&[0x02, 0x6d, 0x76, 0x68, 0x00, 0x01]);
    let mut sent = 0;
    let end = Instant::now() + Duration::from_secs(10);
    while sent < n && Instant::now() < end {
        // SAFETY: sends `f`.
        if unsafe { libc::send(s, f.as_ptr().cast(), f.len(), libc::MSG_DONTWAIT) } > 0 {
            sent += 1;
        }
    }
    // SAFETY: closing our socket (queued frames stay queued).
    unsafe { libc::close(s) };
    std::thread::sleep(Duration::from_millis(100));
}
