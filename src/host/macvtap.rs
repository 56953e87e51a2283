//! Opening a macvtap by interface name: `/dev/tapN` (N = ifindex), once per queue.
//!
//! The char device number comes from sysfs (`/sys/class/net/IFACE/macvtap/tapN/dev`), which is
//! per network namespace, while `/dev` is shared by all of them. So `/dev/tapN` may be missing
//! (no devtmpfs/udev in a container), or it may belong to another macvtap: a stale node left by a
//! deleted one, or a macvtap with the same ifindex in another namespace (devtmpfs keeps the first
//! node of a given name). We never trust the name: the node must carry our major:minor, and every
//! opened fd is checked again with `fstat`, because the node can change between check and open.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::stat::{mknod, Mode, SFlag};

use super::link::{self, Link};
use super::{sys, HostError, HostKind, Opened, VNET_HDR_LEN_V1};

/// Where `/dev/tapN` lives.
const DEV_DIR: &str = "/dev";

/// Flags every macvtap queue must carry. macvtap refuses TUNSETIFF without `IFF_NO_PI` and
/// opens queues with these already set, but we set them explicitly rather than rely on that.
const QUEUE_FLAGS: i32 = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Opens `queues` queue fds on macvtap `iface`.
pub fn open(link: &Link, iface: &str, queues: u16) -> Result<Opened, HostError> {
    let ifindex = link.require_index(iface)?;
    let dev = char_dev(link, iface, ifindex)?;
    let node = DevNode::resolve(Path::new(DEV_DIR), ifindex, dev)?;

    let mut fds = Vec::with_capacity(queues.into());
    for _ in 0..queues {
        // Each open of a macvtap node creates one more queue on the device.
        let fd = open_node(node.path(), dev)?;
        setup_queue(fd.as_fd(), iface)?;
        fds.push(fd);
    }
    // Dropping `node` unlinks a private node now that every queue is open.
    drop(node);
    Ok(Opened {
        kind: HostKind::Macvtap,
        ifname: iface.to_owned(),
        ifindex,
        fds,
        multi_queue: true,
    })
}

/// The macvtap's char device number, read from sysfs.
pub fn char_dev(link: &Link, iface: &str, ifindex: u32) -> Result<libc::dev_t, HostError> {
    let dir = link.sysfs_dir(iface, ifindex)?;
    let path = dir.join(format!("macvtap/tap{ifindex}/dev"));
    if !dir.join("macvtap").is_dir() {
        return Err(HostError::NotMacvtap {
            name: iface.to_owned(),
        });
    }
    let text = link::read_sysfs(&path)?;
    let (maj, min) = link::parse_dev(&text).ok_or_else(|| HostError::Sysfs {
        path: path.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, format!("bad dev {text:?}")),
    })?;
    Ok(libc::makedev(maj, min))
}

fn fmt_dev(dev: libc::dev_t) -> String {
    format!("{}:{}", libc::major(dev), libc::minor(dev))
}

/// Sets the queue's flags and vnet header size, then reads them back.
fn setup_queue(fd: std::os::fd::BorrowedFd<'_>, iface: &str) -> Result<(), HostError> {
    let ioctl = |op, source| HostError::Ioctl {
        op,
        name: iface.to_owned(),
        source,
    };
    // macvtap ignores the name for TUNSETIFF and only updates the queue's flags.
    let mut req = sys::IfReq::new("");
    req.set_flags(const { sys::c_u16(QUEUE_FLAGS) });
    sys::tun_set_iff(fd, &mut req).map_err(|e| ioctl("TUNSETIFF", e))?;
    sys::tun_set_vnet_hdr_sz(fd, VNET_HDR_LEN_V1).map_err(|e| ioctl("TUNSETVNETHDRSZ", e))?;
    let got = sys::tun_get_iff(fd).map_err(|e| ioctl("TUNGETIFF", e))?;
    let flags = i32::from(got.flags());
    if got.name() != iface || flags & QUEUE_FLAGS != QUEUE_FLAGS {
        return Err(HostError::Verify {
            name: iface.to_owned(),
            detail: format!(
                "queue reports interface {:?} flags {flags:#x}, expected {QUEUE_FLAGS:#x}",
                got.name()
            ),
        });
    }
    Ok(())
}

/// Opens one queue through `path` and checks the fd really is device `dev`.
fn open_node(path: &Path, dev: libc::dev_t) -> Result<OwnedFd, HostError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        // std adds O_CLOEXEC. O_NOFOLLOW/O_NOCTTY: a swapped-in symlink or tty is not opened as
        // a queue (and a tty never becomes our controlling terminal).
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| HostError::Open {
            path: path.to_owned(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| HostError::Open {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_char_device() || meta.rdev() != dev {
        return Err(HostError::DevNodeChanged {
            path: path.to_owned(),
            want: fmt_dev(dev),
            got: fmt_dev(meta.rdev()),
        });
    }
    Ok(file.into())
}

/// Makes the char device node `path` for `dev`, readable and writable by us only; `Ok(false)`
/// when the name exists already (someone made it first: the caller looks again or picks another).
fn make_node(path: &Path, dev: libc::dev_t) -> Result<bool, HostError> {
    match mknod(path, SFlag::S_IFCHR, Mode::S_IRUSR | Mode::S_IWUSR, dev) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EEXIST) => Ok(false),
        Err(e) => Err(HostError::Mknod {
            path: path.to_owned(),
            source: e.into(),
        }),
    }
}

/// The node we open the macvtap through: `/dev/tapN` itself, or a private node unlinked on drop.
#[derive(Debug)]
pub struct DevNode {
    path: PathBuf,
    private: bool,
}

/// Makes private node names unique within the process (the pid makes them unique across).
static PRIVATE_SEQ: AtomicU32 = AtomicU32::new(0);

impl DevNode {
    /// Finds or makes a node for char device `dev` named after `tap{ifindex}` in `dir`.
    pub fn resolve(dir: &Path, ifindex: u32, dev: libc::dev_t) -> Result<DevNode, HostError> {
        let path = dir.join(format!("tap{ifindex}"));
        // Two rounds: if someone else creates the node between our lstat and mknod (EEXIST),
        // look at what they made.
        for _ in 0..2 {
            match fs::symlink_metadata(&path) {
                Ok(meta) if !meta.file_type().is_char_device() => {
                    return Err(HostError::DevNodeNotChar { path });
                }
                Ok(meta) if meta.rdev() == dev => {
                    return Ok(DevNode {
                        path,
                        private: false,
                    })
                }
                Ok(meta) => {
                    // Normal on a host with several network namespaces (ifindexes repeat), so
                    // not a warning.
                    tracing::debug!(
                        node = %path.display(),
                        node_dev = %fmt_dev(meta.rdev()),
                        macvtap_dev = %fmt_dev(dev),
                        "device node belongs to another device (stale, or a macvtap with the same \
                         ifindex in another network namespace); leaving it alone and opening \
                         through a private node"
                    );
                    return Self::private(dir, ifindex, dev);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if make_node(&path, dev)? {
                        tracing::info!(node = %path.display(), dev = %fmt_dev(dev),
                            "created missing macvtap device node");
                        return Ok(DevNode {
                            path,
                            private: false,
                        });
                    }
                }
                Err(source) => return Err(HostError::Open { path, source }),
            }
        }
        Err(HostError::Mknod {
            path,
            source: io::Error::from_raw_os_error(libc::EEXIST),
        })
    }

    /// A node only we know about, in the same directory as `/dev/tapN`: `/dev` is devtmpfs and
    /// always honours device nodes, whereas `/run` and `/tmp` are usually mounted `nodev`.
    fn private(dir: &Path, ifindex: u32, dev: libc::dev_t) -> Result<DevNode, HostError> {
        let pid = std::process::id();
        loop {
            let seq = PRIVATE_SEQ.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".macvhost-tap{ifindex}-{pid}-{seq}"));
            // mknod fails on an existing name, so we never reuse someone else's file.
            if make_node(&path, dev)? {
                return Ok(DevNode {
                    path,
                    private: true,
                });
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    #[cfg(test)]
    pub fn is_private(&self) -> bool {
        self.private
    }
}

impl Drop for DevNode {
    fn drop(&mut self) {
        if self.private {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(node = %self.path.display(), error = %e,
                    "could not remove private macvtap node");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::require;
    use crate::testkit::Need;

    // These run in a scratch directory on /tmp: mknod works there for root even when the mount
    // is nodev (only opening is refused), and no real /dev node is touched.

    #[test]
    fn missing_node_is_created_with_the_right_number() {
        require!(&[Need::Root]);
        let dir = tempfile::tempdir().unwrap();
        let dev = libc::makedev(1, 3);
        let node = DevNode::resolve(dir.path(), 7, dev).unwrap();
        assert!(!node.is_private());
        assert_eq!(node.path(), dir.path().join("tap7"));
        let meta = fs::symlink_metadata(node.path()).unwrap();
        assert!(meta.file_type().is_char_device());
        assert_eq!(meta.rdev(), dev);
        assert_eq!(
            meta.mode() & 0o777 & !0o600,
            0,
            "node must not be group/world accessible"
        );
        drop(node);
        assert!(dir.path().join("tap7").exists(), "the canonical node stays");
    }

    #[test]
    fn stale_node_is_left_alone_and_a_private_one_is_used() {
        require!(&[Need::Root]);
        let dir = tempfile::tempdir().unwrap();
        let stale = libc::makedev(1, 3);
        let ours = libc::makedev(1, 5);
        let canonical = dir.path().join("tap9");
        mknod(&canonical, SFlag::S_IFCHR, Mode::S_IRUSR, stale).unwrap();
        let node = DevNode::resolve(dir.path(), 9, ours).unwrap();
        assert!(node.is_private());
        let private = node.path().to_owned();
        assert_ne!(private, canonical);
        assert_eq!(fs::symlink_metadata(&private).unwrap().rdev(), ours);
        drop(node);
        assert!(!private.exists(), "private node must be unlinked");
        let meta = fs::symlink_metadata(&canonical).unwrap();
        assert_eq!(meta.rdev(), stale, "stale node must not be clobbered");
    }

    #[test]
    fn non_char_node_is_refused() {
        // Needs no privilege: a regular file where /dev/tapN should be.
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("tap3"), b"").unwrap();
        let err = DevNode::resolve(dir.path(), 3, libc::makedev(1, 3)).unwrap_err();
        assert!(matches!(err, HostError::DevNodeNotChar { .. }), "{err}");
        std::os::unix::fs::symlink("/dev/null", dir.path().join("tap4")).unwrap();
        let err = DevNode::resolve(dir.path(), 4, libc::makedev(1, 3)).unwrap_err();
        assert!(
            matches!(err, HostError::DevNodeNotChar { .. }),
            "symlink: {err}"
        );
    }

    #[test]
    fn open_node_checks_the_device_number() {
        // /dev/null is 1:3 everywhere; asking for 1:5 through it must fail, not open /dev/null.
        let err = open_node(Path::new("/dev/null"), libc::makedev(1, 5)).unwrap_err();
        assert!(matches!(err, HostError::DevNodeChanged { .. }), "{err}");
        open_node(Path::new("/dev/null"), libc::makedev(1, 3)).unwrap();
    }
}
