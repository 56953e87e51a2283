//! Taps: by name through `/dev/net/tun`, or as queue fds passed in by a manager.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::fstat;

use super::link::{self, Link};
use super::{macvtap, sys, HostError, HostKind, Opened, VNET_HDR_LEN_V1};

const TUN_PATH: &str = "/dev/net/tun";

/// `/dev/net/tun` is the misc device 10:200; a tun/tap queue fd has this `st_rdev`.
const TUN_DEV: (u32, u32) = (10, 200);

/// `ifr_flags` of every queue we open: a tap (layer 2), no packet info, vnet headers.
const QUEUE_FLAGS: u16 = sys::c_u16(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);

/// Opens `queues` queues on tap `iface`, creating it when absent.
///
/// A tap we create is not persistent: it disappears when the last queue fd closes. An existing
/// tap is reused as is (its up/down state is the operator's), but it must be a tap, and
/// multi-queue when more than one queue is asked for.
pub fn open(link: &Link, iface: &str, queues: u16) -> Result<Opened, HostError> {
    let existing = link.index(iface)?;
    let multi_queue = match existing {
        Some(ifindex) => {
            let flags = existing_tun_flags(link, iface, ifindex)?;
            if flags & libc::IFF_TAP == 0 {
                return Err(HostError::TunNotTap {
                    name: iface.to_owned(),
                });
            }
            let mq = flags & libc::IFF_MULTI_QUEUE != 0;
            if queues > 1 && !mq {
                return Err(HostError::TapNotMultiQueue {
                    name: iface.to_owned(),
                    queue_pairs: queues,
                });
            }
            // TUNSETIFF must repeat the device's IFF_MULTI_QUEUE setting exactly (EINVAL
            // otherwise), even for a single queue.
            mq
        }
        None => queues > 1,
    };
    let mq_flag = if multi_queue {
        const { sys::c_u16(libc::IFF_MULTI_QUEUE) }
    } else {
        0
    };
    let flags = QUEUE_FLAGS | mq_flag;

    // The kernel may rename on creation (`tap%d`); later queues must use the real name.
    let mut name = iface.to_owned();
    let mut fds = Vec::with_capacity(queues.into());
    for _ in 0..queues {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(|source| HostError::Open {
                path: TUN_PATH.into(),
                source,
            })?;
        let fd: OwnedFd = file.into();
        let mut req = sys::IfReq::new(&name);
        req.set_flags(flags);
        sys::tun_set_iff(fd.as_fd(), &mut req).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => HostError::TapBusy { name: name.clone() },
            _ => HostError::Ioctl {
                op: "TUNSETIFF",
                name: name.clone(),
                source: e,
            },
        })?;
        name = req.name();
        sys::tun_set_vnet_hdr_sz(fd.as_fd(), VNET_HDR_LEN_V1).map_err(|e| HostError::Ioctl {
            op: "TUNSETVNETHDRSZ",
            name: name.clone(),
            source: e,
        })?;
        let (got_name, got_flags) = get_iff(fd.as_fd(), &name)?;
        // IFF_NO_PI is not checked here: TUNGETIFF on tun reports IFF_NOFILTER in the same bit.
        if got_name != name || got_flags & (libc::IFF_TAP | libc::IFF_VNET_HDR) == 0 {
            return Err(HostError::Verify {
                name,
                detail: format!("queue reports {got_name:?} flags {got_flags:#x}"),
            });
        }
        fds.push(fd);
    }

    let ifindex = link.require_index(&name)?;
    if existing.is_none() {
        // A new tap starts down, and tun drops (EIO) every frame written while it is down.
        link.set_up(&name)?;
        tracing::info!(tap = %name, queues, "created tap");
    }
    Ok(Opened {
        kind: HostKind::Tap,
        ifname: name,
        ifindex,
        fds,
        multi_queue,
    })
}

/// `tun_flags` of an existing interface; an interface without it is not a tun/tap at all.
fn existing_tun_flags(link: &Link, iface: &str, ifindex: u32) -> Result<i32, HostError> {
    let dir = link.sysfs_dir(iface, ifindex)?;
    let path = dir.join("tun_flags");
    if !path.exists() {
        return Err(HostError::NotTap {
            name: iface.to_owned(),
        });
    }
    let text = link::read_sysfs(&path)?;
    link::parse_tun_flags(&text).ok_or_else(|| HostError::Sysfs {
        path,
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad tun_flags {text:?}"),
        ),
    })
}

fn get_iff(fd: BorrowedFd<'_>, name: &str) -> Result<(String, i32), HostError> {
    let req = sys::tun_get_iff(fd).map_err(|e| HostError::Ioctl {
        op: "TUNGETIFF",
        name: name.to_owned(),
        source: e,
    })?;
    Ok((req.name(), i32::from(req.flags())))
}

/// Takes queue fds opened by a manager (libvirt style), one per queue pair, after checking them.
///
/// The fds are duplicated, not adopted: the originals stay open and owned by whoever holds them.
pub fn from_fds(link: &Link, raw_fds: &[RawFd], queues: u16) -> Result<Opened, HostError> {
    if raw_fds.len() != usize::from(queues) {
        return Err(HostError::FdCount {
            expected: queues,
            got: raw_fds.len(),
        });
    }
    let bad = |fd: RawFd, reason: String| HostError::BadTapFd { fd, reason };

    let repeated = (1..raw_fds.len()).find(|&i| raw_fds[..i].contains(&raw_fds[i]));
    if let Some(i) = repeated {
        let raw = raw_fds[i];
        return Err(bad(
            raw,
            "given twice; each queue pair needs its own fd".into(),
        ));
    }

    let mut fds = Vec::with_capacity(raw_fds.len());
    let mut iface: Option<String> = None;
    let mut kind = HostKind::Tap;
    for (i, &raw) in raw_fds.iter().enumerate() {
        let fd = sys::dup_cloexec(raw).map_err(|e| bad(raw, format!("not an open fd ({e})")))?;
        let req = sys::tun_get_iff(fd.as_fd()).map_err(|e| {
            bad(
                raw,
                match e.raw_os_error() {
                    Some(libc::EBADFD) => "a /dev/net/tun fd not attached to any interface".into(),
                    Some(libc::ENOLINK) => "a macvtap fd whose interface was deleted".into(),
                    Some(libc::ENOTTY | libc::EINVAL) => "not a tap or macvtap queue fd".into(),
                    _ => format!("TUNGETIFF failed: {e}"),
                },
            )
        })?;
        let (name, flags) = (req.name(), i32::from(req.flags()));
        if flags & libc::IFF_TAP == 0 {
            return Err(bad(raw, format!("{name:?} is a tun (layer 3), not a tap")));
        }
        if flags & libc::IFF_VNET_HDR == 0 {
            return Err(bad(
                raw,
                format!("{name:?} queue was opened without IFF_VNET_HDR"),
            ));
        }
        match &iface {
            None => iface = Some(name),
            Some(first) if *first != name => {
                return Err(bad(
                    raw,
                    format!("names interface {name:?} but the first fd names {first:?}"),
                ))
            }
            Some(_) => {}
        }
        let rdev = fstat(fd.as_fd())
            .map(|st| st.st_rdev)
            .map_err(|e| bad(raw, format!("fstat failed: {e}")))?;
        let this_kind = if rdev == libc::makedev(TUN_DEV.0, TUN_DEV.1) {
            HostKind::Tap
        } else {
            HostKind::Macvtap
        };
        if i > 0 && this_kind != kind {
            return Err(bad(raw, "mixes tap and macvtap fds".into()));
        }
        kind = this_kind;
        fds.push((raw, fd, rdev));
    }
    let Some(iface) = iface else {
        return Err(HostError::FdCount {
            expected: queues,
            got: 0,
        });
    };
    let first_raw = raw_fds[0];

    // The fds name an interface; make sure that name, looked up here, is the device behind them.
    let ifindex = link.index(&iface)?.ok_or_else(|| {
        bad(
            first_raw,
            format!("its interface {iface:?} is not in this network namespace"),
        )
    })?;
    let multi_queue = match kind {
        HostKind::Tap => {
            same_netns(fds[0].1.as_fd()).map_err(|reason| bad(first_raw, reason))?;
            let flags = existing_tun_flags(link, &iface, ifindex)?;
            // TUNGETIFF cannot tell us this: on tun, 0x1000 is also IFF_NOFILTER.
            if flags & libc::IFF_NO_PI == 0 {
                return Err(bad(
                    first_raw,
                    format!("{iface:?} was created without IFF_NO_PI"),
                ));
            }
            flags & libc::IFF_MULTI_QUEUE != 0
        }
        HostKind::Macvtap => {
            let dev = macvtap::char_dev(link, &iface, ifindex)?;
            if let Some((raw, _, _)) = fds.iter().find(|(_, _, rdev)| *rdev != dev) {
                return Err(bad(
                    *raw,
                    format!("not a queue of macvtap {iface:?} in this network namespace"),
                ));
            }
            true
        }
    };

    let mut out = Vec::with_capacity(fds.len());
    for (raw, fd, _) in fds {
        // O_NONBLOCK lives on the open file description, which the manager shares with us.
        let fl = fcntl(fd.as_fd(), FcntlArg::F_GETFL)
            .map_err(|e| bad(raw, format!("F_GETFL failed: {e}")))?;
        let fl = OFlag::from_bits_retain(fl) | OFlag::O_NONBLOCK;
        fcntl(fd.as_fd(), FcntlArg::F_SETFL(fl))
            .map_err(|e| bad(raw, format!("cannot set O_NONBLOCK: {e}")))?;
        sys::tun_set_vnet_hdr_sz(fd.as_fd(), VNET_HDR_LEN_V1).map_err(|e| HostError::Ioctl {
            op: "TUNSETVNETHDRSZ",
            name: iface.clone(),
            source: e,
        })?;
        out.push(fd);
    }
    Ok(Opened {
        kind,
        ifname: iface,
        ifindex,
        fds: out,
        multi_queue,
    })
}

/// Checks a tun fd's device lives in our network namespace (same name could exist in both).
/// Kernels without `TUNGETDEVNETNS`, or without the privilege for it, skip the check.
fn same_netns(fd: BorrowedFd<'_>) -> Result<(), String> {
    let ns = match sys::tun_get_dev_netns(fd) {
        Ok(ns) => ns,
        Err(e) => {
            tracing::debug!(error = %e, "TUNGETDEVNETNS unavailable; not checking the tap's netns");
            return Ok(());
        }
    };
    let theirs = fstat(ns.as_fd());
    let ours = fs::metadata("/proc/thread-self/ns/net");
    match (theirs, ours) {
        (Ok(a), Ok(b)) if (a.st_dev, a.st_ino) != (b.dev(), b.ino()) => {
            Err("its tap lives in another network namespace".into())
        }
        _ => Ok(()),
    }
}
