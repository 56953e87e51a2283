//! Link facts: ifindex, MAC, MTU, up/carrier, and the two things only sysfs knows.
//!
//! # Network namespaces and sysfs
//!
//! Interface ioctls (`SIOCGIF*`) answer for the network namespace of the *socket* they are issued
//! on, while `/sys/class/net` shows the namespace that *mounted* sysfs, which is not necessarily
//! ours (`nsenter --net` or a thread that called `setns` keeps the old /sys; `ip netns exec`
//! remounts it). So:
//! - everything ioctls can tell (index, name, MAC, MTU, flags) goes through a control socket
//!   created at open time; that socket stays in the device's namespace whichever thread asks later;
//! - sysfs is read only for the macvtap char-device number and `tun_flags`, and only after
//!   [`Link::sysfs_dir`] checked that sysfs describes the same interface (same ifindex and MAC as
//!   the socket sees), so a mismatched /sys is reported instead of silently misread.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::sys;
use super::HostError;

/// `ARPHRD_ETHER`: taps and macvtaps are Ethernet links.
const ARPHRD_ETHER: u16 = 1;

/// Checks `name` the way the kernel's `dev_valid_name` does, so the operator gets a clear error
/// instead of an ioctl's EINVAL (or a silently cut name).
pub fn validate_ifname(name: &str) -> Result<(), HostError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() >= sys::IFNAMSIZ {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("reserved name")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        Some("contains '/', ':', NUL or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(HostError::InvalidIfName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// A control socket for interface ioctls, bound (by creation) to the current thread's netns.
#[derive(Debug)]
pub struct Link {
    sock: OwnedFd,
}

impl Link {
    /// Opens the control socket. `AF_UNIX` works for interface ioctls and exists even when IPv4
    /// is disabled (glibc's `if_nametoindex` makes the same choice).
    pub fn new() -> Result<Self, HostError> {
        let sock = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| HostError::Io {
            what: "creating the interface control socket",
            source: e.into(),
        })?;
        Ok(Link { sock })
    }

    /// The ifindex of `name`, or `None` when no such interface exists in this namespace.
    pub fn index(&self, name: &str) -> Result<Option<u32>, HostError> {
        match sys::if_index(self.sock.as_fd(), name) {
            Ok(i) => Ok(Some(i)),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(ioctl_err("SIOCGIFINDEX", name, e)),
        }
    }

    /// The ifindex of `name`; its absence is the operator's error.
    pub fn require_index(&self, name: &str) -> Result<u32, HostError> {
        self.index(name)?.ok_or_else(|| HostError::NoSuchInterface {
            name: name.to_owned(),
        })
    }

    /// The current name of interface `ifindex` (it may have been renamed since open).
    pub fn name_of(&self, ifindex: u32) -> Result<String, HostError> {
        sys::if_name(self.sock.as_fd(), ifindex).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENODEV) {
                HostError::LinkGone { ifindex }
            } else {
                ioctl_err("SIOCGIFNAME", &format!("#{ifindex}"), e)
            }
        })
    }

    /// The Ethernet address of `name`.
    pub fn mac(&self, name: &str) -> Result<[u8; 6], HostError> {
        let (family, mac) = sys::if_hwaddr(self.sock.as_fd(), name)
            .map_err(|e| ioctl_err("SIOCGIFHWADDR", name, e))?;
        if family != ARPHRD_ETHER {
            return Err(HostError::NotEthernet {
                name: name.to_owned(),
                arphrd: family,
            });
        }
        Ok(mac)
    }

    /// The MTU of `name` (`SIOCGIFMTU`).
    pub fn mtu(&self, name: &str) -> Result<u32, HostError> {
        sys::if_mtu(self.sock.as_fd(), name).map_err(|e| ioctl_err("SIOCGIFMTU", name, e))
    }

    /// `IFF_*` flags (low 16 bits), widened to the `c_int` of libc's constants.
    pub fn flags(&self, name: &str) -> Result<i32, HostError> {
        self.flags16(name).map(i32::from)
    }

    fn flags16(&self, name: &str) -> Result<u16, HostError> {
        sys::if_flags(self.sock.as_fd(), name).map_err(|e| ioctl_err("SIOCGIFFLAGS", name, e))
    }

    /// Administratively up and operationally running. `IFF_RUNNING` is the kernel's
    /// `netif_oper_up`: carrier present and, for stacked links like macvtap, the lower link up.
    pub fn carrier(&self, name: &str) -> Result<bool, HostError> {
        let f = self.flags(name)?;
        Ok(f & libc::IFF_UP != 0 && f & libc::IFF_RUNNING != 0)
    }

    /// Sets `IFF_UP` (a freshly created tap starts down and would drop every frame).
    pub fn set_up(&self, name: &str) -> Result<(), HostError> {
        const UP: u16 = sys::c_u16(libc::IFF_UP);
        let f = self.flags16(name)?;
        if f & UP != 0 {
            return Ok(());
        }
        sys::if_set_flags(self.sock.as_fd(), name, f | UP)
            .map_err(|e| ioctl_err("SIOCSIFFLAGS", name, e))
    }

    /// `/sys/class/net/NAME`, after checking it describes the interface this socket sees.
    pub fn sysfs_dir(&self, name: &str, ifindex: u32) -> Result<PathBuf, HostError> {
        let dir = Path::new("/sys/class/net").join(name);
        let mismatch = || HostError::SysfsOtherNetns {
            name: name.to_owned(),
        };
        let sys_index = match read_sysfs(&dir.join("ifindex")) {
            Ok(s) => s,
            Err(HostError::Sysfs { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(mismatch())
            }
            Err(e) => return Err(e),
        };
        if sys_index.parse::<u32>().ok() != Some(ifindex) {
            return Err(mismatch());
        }
        // Same name and index can exist in two namespaces; link type and (for Ethernet) MAC
        // make a collision unlikely.
        let (family, mac) = sys::if_hwaddr(self.sock.as_fd(), name)
            .map_err(|e| ioctl_err("SIOCGIFHWADDR", name, e))?;
        if read_sysfs(&dir.join("type"))?.parse::<u16>().ok() != Some(family) {
            return Err(mismatch());
        }
        if family == ARPHRD_ETHER && parse_mac(&read_sysfs(&dir.join("address"))?) != Some(mac) {
            return Err(mismatch());
        }
        Ok(dir)
    }
}

fn ioctl_err(op: &'static str, name: &str, source: io::Error) -> HostError {
    HostError::Ioctl {
        op,
        name: name.to_owned(),
        source,
    }
}

/// One sysfs attribute, trimmed.
pub fn read_sysfs(path: &Path) -> Result<String, HostError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| HostError::Sysfs {
            path: path.to_owned(),
            source,
        })
}

/// `"aa:bb:cc:dd:ee:ff"` → bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A sysfs `dev` attribute (`"246:1"`) → `(major, minor)`.
pub fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (maj, min) = s.trim().split_once(':')?;
    Some((maj.parse().ok()?, min.parse().ok()?))
}

/// A sysfs `tun_flags` attribute (`"0x5102"`) → `IFF_*` bits.
pub fn parse_tun_flags(s: &str) -> Option<i32> {
    let hex = s.trim().strip_prefix("0x")?;
    i32::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_rules_follow_the_kernel() {
        for ok in ["mvt0", "tap%d", "a", "exactly15bytes_"] {
            validate_ifname(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "sixteen_bytes_xx",
            "tab\t",
        ] {
            assert!(
                matches!(validate_ifname(bad), Err(HostError::InvalidIfName { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(validate_ifname("sixteen_bytes_xx")
            .unwrap_err()
            .is_operator_error());
    }

    #[test]
    fn parses_sysfs_values() {
        assert_eq!(parse_dev("246:1\n"), Some((246, 1)));
        assert_eq!(parse_dev("246"), None);
        assert_eq!(parse_dev("x:1"), None);
        assert_eq!(parse_tun_flags("0x5102\n"), Some(0x5102));
        assert_eq!(parse_tun_flags("5102"), None);
        assert_eq!(
            parse_mac("da:7f:ef:19:2d:9e\n"),
            Some([0xda, 0x7f, 0xef, 0x19, 0x2d, 0x9e])
        );
        assert_eq!(parse_mac("da:7f:ef:19:2d"), None);
        assert_eq!(parse_mac("da:7f:ef:19:2d:9e:00"), None);
    }

    #[test]
    fn loopback_facts_via_ioctl() {
        // Needs no privilege: every namespace has `lo` at ifindex 1.
        let link = Link::new().unwrap();
        assert_eq!(link.index("lo").unwrap(), Some(1));
        assert_eq!(link.name_of(1).unwrap(), "lo");
        assert_eq!(link.index("no-such-if0").unwrap(), None);
        assert!(matches!(
            link.require_index("no-such-if0"),
            Err(HostError::NoSuchInterface { .. })
        ));
        assert!(link.mtu("lo").unwrap() >= 1280);
        // lo is ARPHRD_LOOPBACK, not Ethernet.
        assert!(matches!(link.mac("lo"), Err(HostError::NotEthernet { .. })));
    }
}
