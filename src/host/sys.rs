//! Every `unsafe` of the host module: tun/tap ioctls, interface ioctls and fd duplication.
//!
//! Each function is a thin, safe wrapper over one syscall. Callers pass `BorrowedFd`s, so an fd
//! cannot be closed while the ioctl runs; the argument structs live on the stack for the call.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// `IFNAMSIZ`: interface names are at most 15 bytes plus the NUL.
pub const IFNAMSIZ: usize = libc::IFNAMSIZ;

/// `struct ifreq` as plain bytes: the name, then the 24-byte union read through accessors.
///
/// Keeping the union as bytes means no union field is ever read (which would be `unsafe`): every
/// ioctl used here exchanges a `short`, an `int` or a `struct sockaddr` at offset 0 of the union.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug)]
pub struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

// The kernel copies exactly `sizeof(struct ifreq)` bytes; ours must match libc's layout.
const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());

impl IfReq {
    /// An all-zero request naming `name`. Names longer than 15 bytes are cut; callers validate
    /// names first (`link::validate_ifname`).
    pub fn new(name: &str) -> Self {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        let n = name.len().min(IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        req
    }

    /// The NUL-terminated name the kernel wrote back.
    pub fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    /// `ifr_flags`: a C `short` holding 16 flag bits, read unsigned (bit 15, `IFF_TUN_EXCL` or
    /// `IFF_DYNAMIC`, is a flag, not a sign). Interface flags above bit 15 are not reported
    /// through it. `i32::from` widens it to the `c_int` of libc's `IFF_*` constants.
    pub fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.data[0], self.data[1]])
    }

    /// Sets `ifr_flags`; build the value with [`c_u16`] from libc's `IFF_*` constants.
    pub fn set_flags(&mut self, flags: u16) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    /// `ifr_ifindex` / `ifr_mtu` (both a C `int` at offset 0).
    pub fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }

    /// Sets `ifr_ifindex` (the `int` at offset 0).
    pub fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    /// `ifr_hwaddr`: (`sa_family`, first six bytes of `sa_data`).
    pub fn hwaddr(&self) -> (u16, [u8; 6]) {
        let family = u16::from_ne_bytes([self.data[0], self.data[1]]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.data[2..8]);
        (family, mac)
    }
}

/// A libc constant spelled `c_int` (`IFF_*`, `PACKET_MR_*`, `AF_PACKET`, `ETH_P_*`) as the 16-bit
/// field the kernel keeps it in (`ifr_flags`, `mr_type`, `sll_family`, `sll_protocol`). Call it in
/// a `const` context (a `const` item or `const { .. }`): a value that does not fit 16 bits then
/// stops the build instead of being cut off.
pub const fn c_u16(v: libc::c_int) -> u16 {
    assert!(v >= 0 && v <= 0xffff, "does not fit a 16-bit field");
    // In range: checked just above.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let bits = v as u16;
    bits
}

/// `size_of::<T>()` as the `socklen_t` the socket calls take. Call it in a `const` context: a
/// type too large for a `socklen_t` then stops the build.
const fn socklen_of<T>() -> libc::socklen_t {
    let n = std::mem::size_of::<T>();
    assert!(n <= 0xffff, "socket argument structs are small");
    // In range: checked just above.
    #[allow(clippy::cast_possible_truncation)]
    let len = n as libc::socklen_t;
    len
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `TUNSETIFF`: binds a `/dev/net/tun` fd to (or creates) interface `req.name` with `req.flags`;
/// on macvtap it only changes the queue's flags. The kernel writes the final name back into `req`.
pub fn tun_set_iff(fd: BorrowedFd<'_>, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: `fd` is open for the call (borrowed); `req` is a valid, writable `struct ifreq`
    // (size checked above) that outlives the call. The kernel reads and writes only that struct.
    check(unsafe { ioctl_with_mut_ref(&fd, libc::TUNSETIFF, req) }).map(drop)
}

/// `TUNGETIFF`: the interface name and `IFF_*` flags of a tun or macvtap queue fd.
pub fn tun_get_iff(fd: BorrowedFd<'_>) -> io::Result<IfReq> {
    let mut req = IfReq::new("");
    // SAFETY: as in `tun_set_iff`; the kernel only writes into `req`.
    check(unsafe { ioctl_with_mut_ref(&fd, libc::TUNGETIFF, &mut req) })?;
    Ok(req)
}

/// `TUNSETVNETHDRSZ`: the vnet header length prepended to every frame. A length beyond the C
/// `int` is refused with `EINVAL`, as the kernel refuses any length it does not support.
pub fn tun_set_vnet_hdr_sz(fd: BorrowedFd<'_>, len: usize) -> io::Result<()> {
    let len = libc::c_int::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    set_int(fd, libc::TUNSETVNETHDRSZ, len)
}

/// `TUNGETVNETHDRSZ`.
pub fn tun_get_vnet_hdr_sz(fd: BorrowedFd<'_>) -> io::Result<i32> {
    get_int(fd, libc::TUNGETVNETHDRSZ)
}

/// `TUNSETOFFLOAD`: the `TUN_F_*` offloads the reader of this fd accepts. The argument is passed
/// by value, not by pointer.
pub fn tun_set_offload(fd: BorrowedFd<'_>, tun_flags: u32) -> io::Result<()> {
    // SAFETY: `fd` is open for the call; the argument is an integer, no memory is shared.
    check(unsafe { ioctl_with_val(&fd, libc::TUNSETOFFLOAD, tun_flags.into()) }).map(drop)
}

/// `TUNSETSNDBUF`: the send buffer (bytes) that bounds how much written-but-not-yet-consumed
/// data the queue may hold; a write beyond it fails with `EAGAIN` on a nonblocking fd.
pub fn tun_set_sndbuf(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    set_int(fd, libc::TUNSETSNDBUF, bytes)
}

/// `TUNGETSNDBUF`.
pub fn tun_get_sndbuf(fd: BorrowedFd<'_>) -> io::Result<i32> {
    get_int(fd, libc::TUNGETSNDBUF)
}

/// An ioctl `req` that reads one `int` from its argument pointer (a `TUNSET*` of a number).
fn set_int(fd: BorrowedFd<'_>, req: libc::c_ulong, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is open for the call; for the requests passed here the kernel reads one `int`
    // from `&value`, which lives on the stack for the duration of the call.
    check(unsafe { ioctl_with_ref(&fd, req, &value) }).map(drop)
}

/// An ioctl `req` that writes one `int` through its argument pointer (a `TUNGET*` of a number).
fn get_int(fd: BorrowedFd<'_>, req: libc::c_ulong) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    // SAFETY: `fd` is open for the call; for the requests passed here the kernel writes one
    // `int` into `value`.
    check(unsafe { ioctl_with_mut_ref(&fd, req, &mut value) })?;
    Ok(value)
}

/// `TUNSETQUEUE` with `IFF_ATTACH_QUEUE` or `IFF_DETACH_QUEUE`.
pub fn tun_set_queue(fd: BorrowedFd<'_>, flags: u16) -> io::Result<()> {
    let mut req = IfReq::new("");
    req.set_flags(flags);
    // SAFETY: `fd` is open for the call; the kernel reads the `struct ifreq` at `&req`.
    check(unsafe { ioctl_with_ref(&fd, libc::TUNSETQUEUE, &req) }).map(drop)
}

/// `TUNGETDEVNETNS` (tun only, Linux 5.2+): an fd for the network namespace of the tap.
pub fn tun_get_dev_netns(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: `fd` is open for the call; this ioctl takes no argument and returns a new fd.
    let ns = check(unsafe { ioctl(&fd, libc::TUNGETDEVNETNS) })?;
    // SAFETY: on success the return value is a fresh fd installed for us and owned by nobody
    // else, so taking ownership of it is sound.
    Ok(unsafe { OwnedFd::from_raw_fd(ns) })
}

/// A close-on-exec duplicate of `raw`, an fd number handed to us by a manager.
///
/// We duplicate rather than take ownership: the number came from the command line, so nothing
/// proves we are its only owner, and a duplicate can never be closed twice.
pub fn dup_cloexec(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: `fcntl(F_DUPFD_CLOEXEC)` takes integers only and touches no memory; if `raw` is
    // not an open fd the kernel returns EBADF and nothing happens.
    let new = check(unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `new` is a fresh fd the kernel just installed; no one else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Fills `buf` from the kernel's random pool (getrandom(2)); falls back to the clock if the
/// pool is unavailable. For names and MACs that must be hard to guess, not for keys.
pub fn random_bytes(buf: &mut [u8]) {
    // SAFETY: `buf` is a writable slice the caller lends for the duration of the call, and the
    // kernel writes at most `buf.len()` bytes into it.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if usize::try_from(n).ok() != Some(buf.len()) {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ u128::from(std::process::id()) << 64;
        for (b, t) in buf.iter_mut().zip(t.to_le_bytes().into_iter().cycle()) {
            *b = t;
        }
    }
}

/// An interface ioctl (`SIOC*IF*`) on a control socket; the socket's network namespace decides
/// which interfaces are visible.
fn if_ioctl(sock: BorrowedFd<'_>, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: `sock` is an open socket for the call; `ifr` is a valid, writable `struct ifreq`
    // that outlives the call, and every request passed here exchanges only that struct.
    check(unsafe { ioctl_with_mut_ref(&sock, req, ifr) }).map(drop)
}

/// The kernel's ifindex is a positive C `int`; rtnetlink and sysfs show it unsigned.
fn ifindex_from_c(index: libc::c_int) -> io::Result<u32> {
    u32::try_from(index).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("kernel reported ifindex {index}"),
        )
    })
}

/// An ifindex as the C `int` the kernel takes. No interface has an index above `i32::MAX`, so
/// such an index names no interface: `ENODEV`, as for any other index the kernel does not know.
fn ifindex_to_c(index: u32) -> io::Result<libc::c_int> {
    libc::c_int::try_from(index).map_err(|_| io::Error::from_raw_os_error(libc::ENODEV))
}

/// `SIOCGIFINDEX`.
pub fn if_index(sock: BorrowedFd<'_>, name: &str) -> io::Result<u32> {
    let mut ifr = IfReq::new(name);
    if_ioctl(sock, libc::SIOCGIFINDEX, &mut ifr)?;
    ifindex_from_c(ifr.int())
}

/// `SIOCGIFNAME`: the current name of interface `index` (follows renames).
pub fn if_name(sock: BorrowedFd<'_>, index: u32) -> io::Result<String> {
    let mut ifr = IfReq::new("");
    ifr.set_int(ifindex_to_c(index)?);
    if_ioctl(sock, libc::SIOCGIFNAME, &mut ifr)?;
    Ok(ifr.name())
}

/// `SIOCGIFHWADDR`: (`ARPHRD_*` type, first six address bytes).
pub fn if_hwaddr(sock: BorrowedFd<'_>, name: &str) -> io::Result<(u16, [u8; 6])> {
    let mut ifr = IfReq::new(name);
    if_ioctl(sock, libc::SIOCGIFHWADDR, &mut ifr)?;
    Ok(ifr.hwaddr())
}

/// `SIOCGIFMTU`. The kernel keeps the MTU unsigned and hands it out as a C `int`; a negative
/// one would be a kernel bug, reported as `InvalidData`.
pub fn if_mtu(sock: BorrowedFd<'_>, name: &str) -> io::Result<u32> {
    let mut ifr = IfReq::new(name);
    if_ioctl(sock, libc::SIOCGIFMTU, &mut ifr)?;
    let mtu = ifr.int();
    u32::try_from(mtu).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("kernel reported MTU {mtu}"),
        )
    })
}

/// `SIOCGIFFLAGS` (the low 16 `IFF_*` bits: `IFF_UP`, `IFF_RUNNING`, ...).
pub fn if_flags(sock: BorrowedFd<'_>, name: &str) -> io::Result<u16> {
    let mut ifr = IfReq::new(name);
    if_ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr)?;
    Ok(ifr.flags())
}

/// `SIOCSIFFLAGS`.
pub fn if_set_flags(sock: BorrowedFd<'_>, name: &str, flags: u16) -> io::Result<()> {
    let mut ifr = IfReq::new(name);
    ifr.set_flags(flags);
    if_ioctl(sock, libc::SIOCSIFFLAGS, &mut ifr)
}

/// An `AF_PACKET` socket of protocol 0: it receives no frames; it only holds link-layer
/// multicast memberships ([`packet_membership`]), which the kernel drops when it is closed.
/// Needs `CAP_NET_RAW` (`EPERM` otherwise).
pub fn packet_membership_socket() -> io::Result<OwnedFd> {
    // SAFETY: integer-only syscall; on success it returns a fresh fd.
    let raw =
        check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` was just returned by socket(2) and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// What a packet-socket membership holds on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// A multicast MAC in the device's list (`PACKET_MR_MULTICAST`).
    Multicast([u8; 6]),
    /// A unicast MAC in the device's secondary list (`PACKET_MR_UNICAST`).
    Unicast([u8; 6]),
    /// Allmulticast (`PACKET_MR_ALLMULTI`), reference-counted by the kernel.
    AllMulti,
    /// Promiscuity (`PACKET_MR_PROMISC`), reference-counted by the kernel.
    Promisc,
}

/// `PACKET_ADD_MEMBERSHIP` (`add`) or `PACKET_DROP_MEMBERSHIP` of `what` on interface `ifindex`.
pub fn packet_membership(
    sock: BorrowedFd<'_>,
    add: bool,
    ifindex: u32,
    what: Membership,
) -> io::Result<()> {
    // libc spells the `PACKET_MR_*` types as `c_int`; `mr_type` is a `c_ushort`.
    let (mr_type, mac) = match what {
        Membership::Multicast(m) => (const { c_u16(libc::PACKET_MR_MULTICAST) }, Some(m)),
        Membership::Unicast(m) => (const { c_u16(libc::PACKET_MR_UNICAST) }, Some(m)),
        Membership::AllMulti => (const { c_u16(libc::PACKET_MR_ALLMULTI) }, None),
        Membership::Promisc => (const { c_u16(libc::PACKET_MR_PROMISC) }, None),
    };
    let mut mreq = libc::packet_mreq {
        mr_ifindex: ifindex_to_c(ifindex)?,
        mr_type,
        mr_alen: 0,
        mr_address: [0; 8],
    };
    if let Some(mac) = mac {
        mreq.mr_alen = 6;
        mreq.mr_address[..6].copy_from_slice(&mac);
    }
    let opt = if add {
        libc::PACKET_ADD_MEMBERSHIP
    } else {
        libc::PACKET_DROP_MEMBERSHIP
    };
    use std::os::fd::AsRawFd;
    // SAFETY: `sock` is open for the call; the kernel reads `size_of::<packet_mreq>()` bytes
    // from `&mreq`, which lives on the stack for the duration of the call.
    check(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            opt,
            std::ptr::addr_of!(mreq).cast(),
            const { socklen_of::<libc::packet_mreq>() },
        )
    })
    .map(drop)
}

/// Test helper: an `AF_PACKET` raw socket bound to interface `ifindex`, for all ethertypes, so
/// plain `read`/`write` receive from and send on that one interface.
#[cfg(test)]
pub fn packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;

    let proto = const { c_u16(libc::ETH_P_ALL) }.to_be();
    // SAFETY: integer-only syscall; on success it returns a fresh fd.
    let raw = check(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            proto.into(),
        )
    })?;
    // SAFETY: `raw` was just returned by socket(2) and is owned by no one else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `sockaddr_ll` is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = const { c_u16(libc::AF_PACKET) };
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex_to_c(ifindex)?;
    // SAFETY: `sock` is open; the kernel reads `size_of::<sockaddr_ll>()` bytes from `&sll`,
    // which lives on the stack for the call.
    check(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            std::ptr::addr_of!(sll).cast(),
            const { socklen_of::<libc::sockaddr_ll>() },
        )
    })?;
    Ok(sock)
}
