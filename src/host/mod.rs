//! The host side: macvtap and tap queue fds with a vnet header, and facts about their link.
//!
//! [`HostDevice::open`] turns a [`HostSpec`] (from the command line) into one nonblocking queue
//! fd per queue pair, each with `IFF_VNET_HDR` and a 12-byte header, and probes which
//! `TUNSETOFFLOAD` bits the device takes. Each [`TapQueue`] is one queue fd; the datapath moves
//! frames through it (`datapath::HostQueue`) and the workers control it ([`QueueControl`]).
//!
//! - `sys`: every `unsafe` (ioctls, fd duplication).
//! - `macvtap`: `/dev/tapN` lookup by ifindex and char-device number, stale-node handling.
//! - `tap`: `/dev/net/tun` taps by name, and manager-passed fds.
//! - `link`: ifindex/MAC/MTU/carrier through a control socket; sysfs only where unavoidable.
//! - [`mcfilter`]: the macvtap's multicast list and allmulticast (packet-socket memberships).

mod link;
mod mac;
mod macvtap;
pub mod mcfilter;
pub mod netlink;
#[allow(unsafe_code)] // ioctls, fd ownership, getrandom
mod sys;
mod tap;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

pub use link::validate_ifname;
pub use mac::MacAddr;
pub use sys::{dup_cloexec, random_bytes};

/// vnet header length of `virtio_net_hdr_v1` (VERSION_1 or MRG_RXBUF guests), set at open.
/// The one definition: `datapath::vnet` re-exports it.
pub const VNET_HDR_LEN_V1: usize = 12;
/// vnet header length of the legacy `virtio_net_hdr` (guests without VERSION_1 and MRG_RXBUF).
pub const VNET_HDR_LEN_LEGACY: usize = 10;

/// Control of one host queue beyond moving frames: what the vhost-user layer and the workers
/// need from a tap/macvtap queue. [`TapQueue`] is the real one; the test kit has a fake.
pub trait QueueControl {
    /// Programs the offloads the host may hand us (TUNSETOFFLOAD, TUN_F_* bits).
    fn set_offload(&self, tun_flags: u32) -> io::Result<()>;
    /// Sets the vnet header length (TUNSETVNETHDRSZ): [`VNET_HDR_LEN_V1`] or
    /// [`VNET_HDR_LEN_LEGACY`].
    fn set_vnet_hdr_len(&self, len: usize) -> io::Result<()>;
    /// Lets the kernel steer frames to this queue again (TUNSETQUEUE attach).
    fn attach(&self) -> io::Result<()>;
    /// Stops the kernel from steering frames to this queue (TUNSETQUEUE detach).
    fn detach(&self) -> io::Result<()>;
}

/// Most queues one tap or macvtap can have (`MAX_TAP_QUEUES` in tun.c and tap.c).
pub const MAX_QUEUE_PAIRS: u16 = 256;

/// All `TUN_F_*` offload bits we know and probe.
pub const TUN_F_ALL: u32 = libc::TUN_F_CSUM
    | libc::TUN_F_TSO4
    | libc::TUN_F_TSO6
    | libc::TUN_F_TSO_ECN
    | libc::TUN_F_UFO
    | libc::TUN_F_USO4
    | libc::TUN_F_USO6;

/// Errors of the host module. Operator errors (the command line names something unusable) are
/// the ones [`HostError::is_operator_error`] returns true for; the rest are host failures.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    // --- Operator errors ---
    /// An interface name from the command line the kernel would refuse: empty, 16 bytes or
    /// longer, `.` or `..`, or holding `/`, `:`, NUL or whitespace.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidIfName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The named interface does not exist in this process's network namespace.
    #[error("no network interface named {name:?} in this network namespace")]
    NoSuchInterface {
        /// The name as given.
        name: String,
    },
    /// `--macvtap` names an interface of another kind.
    #[error("interface {name:?} is not a macvtap")]
    NotMacvtap {
        /// The name as given.
        name: String,
    },
    /// `--tap` names an existing interface that is no tun/tap device at all.
    #[error("interface {name:?} exists but is not a tap")]
    NotTap {
        /// The name as given.
        name: String,
    },
    /// `--tap` names a layer-3 tun device, which carries no Ethernet frames.
    #[error("interface {name:?} is a tun (layer 3) device; a tap (Ethernet) is needed")]
    TunNotTap {
        /// The name as given.
        name: String,
    },
    /// An existing single-queue tap cannot give one fd per queue pair for `--queues` > 1.
    #[error(
        "tap {name:?} exists without multi-queue support and cannot serve {queue_pairs} queue \
         pairs; recreate it with `ip tuntap add dev {name} mode tap multi_queue` or use 1 pair"
    )]
    TapNotMultiQueue {
        /// The tap.
        name: String,
        /// Queue pairs asked for.
        queue_pairs: u16,
    },
    /// The tap is attached to another process (`TUNSETIFF` answered `EBUSY`).
    #[error("tap {name:?} is already in use by another process")]
    TapBusy {
        /// The tap.
        name: String,
    },
    /// `--tap-fd` lists a different number of fds than `--queues` asks for.
    #[error("{got} tap fds given for {expected} queue pairs; pass exactly one per queue pair")]
    FdCount {
        /// Queue pairs asked for.
        expected: u16,
        /// Fds given.
        got: usize,
    },
    /// A `--tap-fd` fd is not usable as a queue: not open, given twice, not a tap/macvtap queue,
    /// a tun (layer 3) queue, opened without `IFF_VNET_HDR` or `IFF_NO_PI`, or of another
    /// interface or network namespace than the others.
    #[error("tap fd {fd}: {reason}")]
    BadTapFd {
        /// The fd number as given.
        fd: RawFd,
        /// What is wrong with it.
        reason: String,
    },
    /// `--queues 0`.
    #[error("at least one queue pair is needed")]
    NoQueues,
    /// More queue pairs than a tap or macvtap has queues ([`MAX_QUEUE_PAIRS`]).
    #[error("{0} queue pairs asked for; tap and macvtap take at most {MAX_QUEUE_PAIRS}")]
    TooManyQueues(u16),
    /// The interface's hardware type is not Ethernet, so it has no MAC to give the guest.
    #[error("interface {name:?} is not Ethernet (ARPHRD {arphrd})")]
    NotEthernet {
        /// The interface.
        name: String,
        /// Its `ARPHRD_*` type.
        arphrd: u16,
    },

    // --- Caller (programming) errors ---
    /// A caller asked for a vnet header length the kernel does not take; the vhost-user layer
    /// only ever passes [`VNET_HDR_LEN_V1`] or [`VNET_HDR_LEN_LEGACY`].
    #[error("vnet header length {0} is not 10 (legacy) or 12 (VERSION_1 / MRG_RXBUF)")]
    BadVnetHdrLen(usize),
    /// A queue of a single-queue tap cannot be detached; the caller should leave it attached.
    #[error("queue {index} of {name:?} cannot be detached: the tap is not multi-queue")]
    DetachUnsupported {
        /// The tap.
        name: String,
        /// The queue pair.
        index: usize,
    },

    // --- Host errors ---
    /// `/sys/class/net/NAME` belongs to another network namespace than this process's sockets
    /// (the host's mount setup is at fault, or the operator entered the netns without `ip
    /// netns exec`).
    #[error(
        "/sys/class/net/{name} does not describe the interface this process sees: sysfs is \
         mounted for another network namespace (enter it with `ip netns exec`, which remounts \
         /sys)"
    )]
    SysfsOtherNetns {
        /// The interface.
        name: String,
    },
    /// A sysfs attribute could not be read, or did not parse.
    #[error("reading {path}: {source}", path = path.display())]
    Sysfs {
        /// The attribute file.
        path: PathBuf,
        /// Why (for a parse failure, `InvalidData`).
        source: io::Error,
    },
    /// `/dev/tapN` exists but is no character device: refused rather than opened.
    #[error("{path} is not a character device; refusing to use it", path = path.display())]
    DevNodeNotChar {
        /// The node.
        path: PathBuf,
    },
    /// The node opened is not the macvtap's device (major:minor changed under us, e.g. the
    /// macvtap was recreated between the check and the open).
    #[error("{path} opened device {got}, expected {want}", path = path.display())]
    DevNodeChanged {
        /// The node.
        path: PathBuf,
        /// The macvtap's `major:minor` from sysfs.
        want: String,
        /// The opened node's `major:minor`.
        got: String,
    },
    /// A private device node for the macvtap could not be made.
    #[error("cannot create device node {path}: {source}", path = path.display())]
    Mknod {
        /// The node.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// `/dev/tapN` or `/dev/net/tun` could not be opened.
    #[error("cannot open {path}: {source}", path = path.display())]
    Open {
        /// The device node.
        path: PathBuf,
        /// Why (`EACCES`, `ENOENT`, ...).
        source: io::Error,
    },
    /// An ioctl on a queue fd or the control socket failed.
    #[error("{op} on {name:?} failed: {source}")]
    Ioctl {
        /// The ioctl (`TUNSETIFF`, `SIOCGIFHWADDR`, ...).
        op: &'static str,
        /// The interface.
        name: String,
        /// The kernel's answer.
        source: io::Error,
    },
    /// Another system call failed (creating the interface control socket).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The kernel reports other state than what was just set (a queue of another interface,
    /// missing flags, an MTU over 16 bits): the fd is not what it should be.
    #[error("kernel state of {name:?} is not what was set: {detail}")]
    Verify {
        /// The interface.
        name: String,
        /// What differs.
        detail: String,
    },
    /// The interface was deleted after it was opened.
    #[error("interface #{ifindex} no longer exists")]
    LinkGone {
        /// Its index at open time.
        ifindex: u32,
    },
    /// A queue's interface was deleted: the fd stays open but serves no link.
    #[error("the queues of {name:?} have no interface any more (deleted)")]
    QueueGone {
        /// The interface's name at open time.
        name: String,
    },
}

impl HostError {
    /// True when the operator's configuration is at fault rather than the host.
    pub fn is_operator_error(&self) -> bool {
        matches!(
            self,
            HostError::InvalidIfName { .. }
                | HostError::NoSuchInterface { .. }
                | HostError::NotMacvtap { .. }
                | HostError::NotTap { .. }
                | HostError::TunNotTap { .. }
                | HostError::TapNotMultiQueue { .. }
                | HostError::TapBusy { .. }
                | HostError::FdCount { .. }
                | HostError::BadTapFd { .. }
                | HostError::NoQueues
                | HostError::TooManyQueues(_)
                | HostError::NotEthernet { .. }
        )
    }
}

/// What the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSpec {
    /// `--macvtap IFACE`: an existing macvtap, opened through `/dev/tapN`.
    Macvtap {
        /// Its name in this process's network namespace.
        iface: String,
    },
    /// `--tap IFACE`: a tap, created when absent.
    Tap {
        /// Its name in this process's network namespace.
        iface: String,
    },
    /// `--tap-fd FD[,FD...]`: queue fds (tap or macvtap) opened by a manager, one per pair.
    TapFds {
        /// Raw fd numbers inherited from the manager; duplicated at open, never adopted.
        fds: Vec<RawFd>,
    },
}

/// What kind of device the queues belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// A macvtap, opened through its `/dev/tapN` node; queues always detachable.
    Macvtap,
    /// A tap, opened through `/dev/net/tun`; queues detachable only with `IFF_MULTI_QUEUE`.
    Tap,
}

/// What `macvtap`/`tap` hand back: configured queue fds and the link they belong to.
#[derive(Debug)]
struct Opened {
    kind: HostKind,
    ifname: String,
    ifindex: u32,
    fds: Vec<OwnedFd>,
    /// Queues can be detached (macvtap always; tun only with `IFF_MULTI_QUEUE`).
    multi_queue: bool,
}

/// A host link with one queue fd per queue pair. Dropping it closes the queues (and removes a
/// tap that [`HostDevice::open`] created).
#[derive(Debug)]
pub struct HostDevice {
    kind: HostKind,
    ifname: String,
    ifindex: u32,
    /// Control socket in the link's network namespace, so facts stay right from any thread.
    link: link::Link,
    queues: Vec<Arc<TapQueue>>,
    offloads: u32,
}

impl HostDevice {
    /// Opens `queue_pairs` queue fds (nonblocking, CLOEXEC, IFF_VNET_HDR, vnet hdr size 12).
    ///
    /// Runs in the calling thread's network namespace; see `link` for how sysfs is used.
    pub fn open(spec: &HostSpec, queue_pairs: u16) -> Result<HostDevice, HostError> {
        if queue_pairs == 0 {
            return Err(HostError::NoQueues);
        }
        if queue_pairs > MAX_QUEUE_PAIRS {
            return Err(HostError::TooManyQueues(queue_pairs));
        }
        let link = link::Link::new()?;
        let opened = match spec {
            HostSpec::Macvtap { iface } => {
                validate_ifname(iface)?;
                macvtap::open(&link, iface, queue_pairs)?
            }
            HostSpec::Tap { iface } => {
                validate_ifname(iface)?;
                tap::open(&link, iface, queue_pairs)?
            }
            HostSpec::TapFds { fds } => tap::from_fds(&link, fds, queue_pairs)?,
        };
        let name: Arc<str> = opened.ifname.as_str().into();
        let queues: Vec<Arc<TapQueue>> = opened
            .fds
            .into_iter()
            .enumerate()
            .map(|(index, fd)| {
                Arc::new(TapQueue {
                    fd,
                    index,
                    ifname: name.clone(),
                    kind: opened.kind,
                    multi_queue: opened.multi_queue,
                })
            })
            .collect();
        let offloads = probe_offloads(|bits| sys::tun_set_offload(queues[0].fd.as_fd(), bits))
            .map_err(|source| HostError::Ioctl {
                op: "TUNSETOFFLOAD",
                name: opened.ifname.clone(),
                source,
            })?;
        tracing::debug!(iface = %opened.ifname, offloads = format_args!("{offloads:#x}"),
            "probed tap offloads");
        Ok(HostDevice {
            kind: opened.kind,
            ifname: opened.ifname,
            ifindex: opened.ifindex,
            link,
            queues,
            offloads,
        })
    }

    /// The queue fds, one per queue pair, in pair order.
    pub fn queues(&self) -> &[Arc<TapQueue>] {
        &self.queues
    }

    /// The interface name at open time.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The interface index, fixed for the link's life (facts are looked up by it, not by
    /// name, so a rename does not matter).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Whether the queues belong to a macvtap or a tap (`--tap-fd` fds are classified at open).
    pub fn kind(&self) -> HostKind {
        self.kind
    }

    /// The link's current MAC (looked up by ifindex, so a rename does not matter).
    pub fn mac(&self) -> Result<[u8; 6], HostError> {
        let name = self.link.name_of(self.ifindex)?;
        self.link.mac(&name)
    }

    /// The link's MTU.
    pub fn mtu(&self) -> Result<u16, HostError> {
        let name = self.link.name_of(self.ifindex)?;
        let mtu = self.link.mtu(&name)?;
        // Ethernet MTUs stop at 65535 (ETH_MAX_MTU); anything above means a bogus reply.
        u16::try_from(mtu).map_err(|_| HostError::Verify {
            name,
            detail: format!("MTU {mtu} does not fit 16 bits"),
        })
    }

    /// The link is administratively up and has carrier (for macvtap: its lower link too).
    /// A link that vanished, or whose flags cannot be read, has no carrier.
    pub fn carrier(&self) -> bool {
        self.link
            .name_of(self.ifindex)
            .and_then(|name| self.link.carrier(&name))
            .unwrap_or(false)
    }

    /// `TUN_F_*` bits that `TUNSETOFFLOAD` accepted on queue 0 when probed at open (CSUM, TSO4,
    /// TSO6, TSO_ECN, UFO, USO4, USO6). Offloads are reset to 0 after probing.
    ///
    /// Both drivers take USO only as the pair USO4|USO6, and TSO_ECN only with a TSO bit, so
    /// callers should set them that way (tun rejects USO4 alone with EINVAL; macvtap accepts it
    /// and ignores it). UFO is accepted for compatibility but the kernel no longer produces UFO.
    pub fn supported_offloads(&self) -> u32 {
        self.offloads
    }
}

/// Finds which offload bits the device accepts by trying combinations on one queue.
///
/// Every GSO bit needs CSUM. The kernel rejects unknown bits with EINVAL (how older kernels say
/// "no USO"). tun also rejects TSO_ECN without a TSO bit and USO4 or USO6 alone, so those are
/// probed in the combinations that mean something; macvtap accepts any known bit. Offloads end
/// at 0: the datapath sets them from what the guest acks.
fn probe_offloads(mut set: impl FnMut(u32) -> io::Result<()>) -> io::Result<u32> {
    use libc::{
        TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, TUN_F_USO4, TUN_F_USO6,
    };
    // (bits to try, bits credited when accepted)
    const PROBES: [(u32, u32); 5] = [
        (TUN_F_CSUM | TUN_F_TSO4, TUN_F_TSO4),
        (TUN_F_CSUM | TUN_F_TSO6, TUN_F_TSO6),
        (
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
            TUN_F_TSO_ECN,
        ),
        (TUN_F_CSUM | TUN_F_UFO, TUN_F_UFO),
        (
            TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6,
            TUN_F_USO4 | TUN_F_USO6,
        ),
    ];
    let mut accepted = 0;
    let mut try_set = |bits| match set(bits) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    };
    if try_set(TUN_F_CSUM)? {
        accepted |= TUN_F_CSUM;
        for (bits, credit) in PROBES {
            if try_set(bits)? {
                accepted |= credit;
            }
        }
    }
    set(0)?;
    Ok(accepted)
}

/// One queue fd of a tap or macvtap.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
    index: usize,
    ifname: Arc<str>,
    kind: HostKind,
    multi_queue: bool,
}

impl TapQueue {
    fn ioctl_err(&self, op: &'static str, source: io::Error) -> HostError {
        HostError::Ioctl {
            op,
            name: self.ifname.to_string(),
            source,
        }
    }

    /// `TUNSETOFFLOAD`: the `TUN_F_*` offloads the reader of this queue accepts. Offloads are
    /// per device, so this affects every queue of the link.
    pub fn set_offload(&self, tun_flags: u32) -> Result<(), HostError> {
        sys::tun_set_offload(self.fd.as_fd(), tun_flags)
            .map_err(|e| self.ioctl_err("TUNSETOFFLOAD", e))
    }

    /// `TUNSETVNETHDRSZ`: 12 for VERSION_1 or MRG_RXBUF guests, 10 for legacy ones.
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<(), HostError> {
        if len != VNET_HDR_LEN_V1 && len != VNET_HDR_LEN_LEGACY {
            return Err(HostError::BadVnetHdrLen(len));
        }
        sys::tun_set_vnet_hdr_sz(self.fd.as_fd(), len)
            .map_err(|e| self.ioctl_err("TUNSETVNETHDRSZ", e))
    }

    /// `TUNGETVNETHDRSZ`.
    pub fn vnet_hdr_len(&self) -> Result<i32, HostError> {
        sys::tun_get_vnet_hdr_sz(self.fd.as_fd()).map_err(|e| self.ioctl_err("TUNGETVNETHDRSZ", e))
    }

    /// `TUNSETSNDBUF`: how many bytes written to this queue may be in flight (queued in the
    /// host stack, not yet consumed) before a write fails with `EAGAIN`. Both drivers default to
    /// `INT_MAX`, so without a finite value here the datapath never sees `EAGAIN` on TX.
    ///
    /// On a tap the value is per device (every queue of the link gets it); on a macvtap it is
    /// per queue. `bytes` must be positive (the kernel answers `EINVAL` otherwise).
    pub fn set_sndbuf(&self, bytes: i32) -> Result<(), HostError> {
        sys::tun_set_sndbuf(self.fd.as_fd(), bytes).map_err(|e| self.ioctl_err("TUNSETSNDBUF", e))
    }

    /// `TUNGETSNDBUF` (tap only: macvtap answers `EINVAL`).
    pub fn sndbuf(&self) -> Result<i32, HostError> {
        sys::tun_get_sndbuf(self.fd.as_fd()).map_err(|e| self.ioctl_err("TUNGETSNDBUF", e))
    }

    /// Whether the kernel currently steers frames to this queue: `Some` for tun (TUNGETIFF
    /// reports `IFF_DETACH_QUEUE`), `None` for macvtap, which does not report it.
    pub fn is_attached(&self) -> Result<Option<bool>, HostError> {
        let req = sys::tun_get_iff(self.fd.as_fd()).map_err(|e| self.ioctl_err("TUNGETIFF", e))?;
        Ok(match self.kind {
            HostKind::Tap => Some(i32::from(req.flags()) & libc::IFF_DETACH_QUEUE == 0),
            HostKind::Macvtap => None,
        })
    }

    /// `TUNSETQUEUE IFF_ATTACH_QUEUE`; succeeds without change if already attached.
    pub fn attach(&self) -> Result<(), HostError> {
        self.set_queue(const { sys::c_u16(libc::IFF_ATTACH_QUEUE) }, true)
    }

    /// `TUNSETQUEUE IFF_DETACH_QUEUE`: the kernel stops steering frames to this queue;
    /// succeeds without change if already detached.
    pub fn detach(&self) -> Result<(), HostError> {
        if !self.multi_queue {
            return Err(HostError::DetachUnsupported {
                name: self.ifname.to_string(),
                index: self.index,
            });
        }
        self.set_queue(const { sys::c_u16(libc::IFF_DETACH_QUEUE) }, false)
    }

    fn set_queue(&self, flag: u16, attach: bool) -> Result<(), HostError> {
        let err = match sys::tun_set_queue(self.fd.as_fd(), flag) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        // Both drivers answer EINVAL when the queue is already in the wanted state (and when
        // the link is gone); ask the kernel which one it is.
        if err.raw_os_error() == Some(libc::EINVAL) {
            match self.is_attached() {
                // tun says where the queue is.
                Ok(Some(now)) if now == attach => return Ok(()),
                // macvtap answers TUNGETIFF while its link exists, and then EINVAL can only mean
                // the queue is already enabled/disabled.
                Ok(None) => return Ok(()),
                // TUNGETIFF fails too: the link is gone (deleted under us). The link watcher
                // reports that once; this queue has nothing to attach to.
                Err(_) => {
                    return Err(HostError::QueueGone {
                        name: self.ifname.to_string(),
                    })
                }
                _ => {}
            }
        }
        Err(self.ioctl_err("TUNSETQUEUE", err))
    }

    /// Position of this queue among the device's queues (= queue pair index).
    pub fn index(&self) -> usize {
        self.index
    }
}

/// A queue error as `io::Error`; a queue whose link is gone is `NotFound`, which callers
/// expect and do not warn about.
fn queue_err(e: HostError) -> io::Error {
    let kind = match e {
        HostError::QueueGone { .. } => io::ErrorKind::NotFound,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl QueueControl for TapQueue {
    fn set_offload(&self, tun_flags: u32) -> io::Result<()> {
        TapQueue::set_offload(self, tun_flags).map_err(io::Error::other)
    }
    fn set_vnet_hdr_len(&self, len: usize) -> io::Result<()> {
        TapQueue::set_vnet_hdr_len(self, len).map_err(io::Error::other)
    }
    fn attach(&self) -> io::Result<()> {
        TapQueue::attach(self).map_err(queue_err)
    }
    fn detach(&self) -> io::Result<()> {
        match TapQueue::detach(self) {
            // A single-queue tap has nothing to steer frames away to: nothing to do.
            Err(HostError::DetachUnsupported { .. }) => Ok(()),
            other => other.map_err(queue_err),
        }
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for TapQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests;
