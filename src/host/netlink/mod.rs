//! macvtap management over rtnetlink: create, inspect and delete macvtaps, and watch link state.
//!
//! Everything speaks `NETLINK_ROUTE` directly through a synchronous [`netlink_sys::Socket`] with
//! messages built and parsed by `netlink-packet-route`; nothing shells out to `ip` and no async
//! runtime is involved.
//!
//! # Network namespaces
//! A netlink socket belongs to the network namespace of the thread that created it, for its
//! whole life. The free functions ([`create_macvtap`], [`delete_link`], [`macvtap_info`],
//! [`watch_links`]) open their socket on the calling thread, so they act on that thread's
//! namespace. A [`CreatedLink`] keeps the socket it was created with, so dropping it deletes the
//! link in the right namespace whichever thread drops it.
//!
//! # Who is at fault
//! [`NetlinkError::is_operator_error`] separates what the operator asked for wrongly (missing
//! parent, a second passthru macvtap, a name in use) from host failures.

mod rtnl;
mod watch;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::str::FromStr;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoMacVlan, InfoMacVtap, LinkAttribute, LinkFlags, LinkInfo,
    LinkLayerType, LinkMessage, MacVlanMode,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::host::{validate_ifname, MacAddr};
use rtnl::{KernelError, Rtnl};

pub use watch::{watch_links, LinkEvent, LinkWatcher};

/// Longest interface name (`IFNAMSIZ` - 1).
const MAX_IFNAME: usize = 15;

/// How a macvtap shares its parent with the other macvlan/macvtap links on it
/// (`IFLA_MACVLAN_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MacvtapMode {
    /// No traffic between macvtaps on the same parent, even if the outside switch hairpins it.
    Private,
    /// Every frame goes out through the parent; macvtaps reach each other only through a
    /// hairpinning (802.1Qbg reflective relay) switch.
    Vepa,
    /// Frames between macvtaps on the same parent are switched inside the kernel.
    Bridge,
    /// The only macvtap on the parent; it takes the parent's MAC and receives everything.
    Passthru,
}

impl MacvtapMode {
    /// The name `ip link` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            MacvtapMode::Private => "private",
            MacvtapMode::Vepa => "vepa",
            MacvtapMode::Bridge => "bridge",
            MacvtapMode::Passthru => "passthru",
        }
    }

    fn to_kernel(self) -> MacVlanMode {
        match self {
            MacvtapMode::Private => MacVlanMode::Private,
            MacvtapMode::Vepa => MacVlanMode::Vepa,
            MacvtapMode::Bridge => MacVlanMode::Bridge,
            MacvtapMode::Passthru => MacVlanMode::Passthrough,
        }
    }

    fn from_kernel(mode: MacVlanMode) -> Result<Self, u32> {
        match mode {
            MacVlanMode::Private => Ok(MacvtapMode::Private),
            MacVlanMode::Vepa => Ok(MacvtapMode::Vepa),
            MacVlanMode::Bridge => Ok(MacvtapMode::Bridge),
            MacVlanMode::Passthrough => Ok(MacvtapMode::Passthru),
            other => Err(u32::from(other)),
        }
    }
}

impl fmt::Display for MacvtapMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MacvtapMode {
    type Err = NetlinkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "private" => Ok(MacvtapMode::Private),
            "vepa" => Ok(MacvtapMode::Vepa),
            "bridge" => Ok(MacvtapMode::Bridge),
            "passthru" => Ok(MacvtapMode::Passthru),
            _ => Err(NetlinkError::UnknownMode {
                given: s.to_owned(),
            }),
        }
    }
}

/// What macvtap to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacvtapSpec {
    /// The parent (lower) link, e.g. `eth0`.
    pub parent: String,
    /// The macvtap's name; `None` generates `mvh<parent ifindex>-<n>` with the first free `n`.
    pub name: Option<String>,
    /// How it shares the parent (`--mode`, default bridge).
    pub mode: MacvtapMode,
    /// The macvtap's MAC; `None` lets the kernel pick a random local one (passthru always
    /// takes the parent's).
    pub mac: Option<[u8; 6]>,
}

/// Facts about a macvtap, from one `RTM_GETLINK`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacvtapInfo {
    /// `IFLA_IFNAME`: the name now (it may have been renamed since creation).
    pub name: String,
    /// The interface index in the namespace the query ran in.
    pub ifindex: u32,
    /// `IFLA_INFO_DATA` / `IFLA_MACVLAN_MODE`.
    pub mode: MacvtapMode,
    /// `IFLA_ADDRESS`.
    pub mac: [u8; 6],
    /// `IFLA_MTU`.
    pub mtu: u32,
    /// `IFLA_LINK`: the parent's ifindex (in `parent_netnsid`'s namespace when that is set).
    pub parent_ifindex: u32,
    /// `IFLA_LINK_NETNSID`: set when the parent lives in another network namespace (the macvtap
    /// was moved); `parent_ifindex` then is an index there, not here.
    pub parent_netnsid: Option<i32>,
    /// Administratively up and operationally running (`IFF_UP && IFF_RUNNING`).
    pub up: bool,
}

/// Errors of this module. [`NetlinkError::is_operator_error`] tells the operator's mistakes from
/// host failures.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    // --- Operator errors ---
    /// `--mode` is not a macvtap mode.
    #[error("unknown macvtap mode {given:?}; expected one of private, vepa, bridge, passthru")]
    UnknownMode {
        /// The mode as given.
        given: String,
    },
    /// `--macvtap-parent` or `--macvtap-name` is not a name the kernel takes.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidIfName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// `--macvtap-parent` names no interface in this network namespace.
    #[error("macvtap parent {parent:?} does not exist in this network namespace")]
    NoSuchParent {
        /// The parent as given.
        parent: String,
    },
    /// The parent is loopback or not Ethernet; checked here because the kernel answers only
    /// a bare `EINVAL`.
    #[error("{parent:?} cannot be a macvtap parent: {reason}")]
    BadParent {
        /// The parent as given.
        parent: String,
        /// Why it cannot carry a macvtap.
        reason: String,
    },
    /// A passthru macvtap was asked for on a parent that already carries macvlans/macvtaps.
    #[error(
        "parent {parent:?} already has a macvlan/macvtap ({holders}); a passthru macvtap must be \
         the only one on its parent"
    )]
    PassthruTaken {
        /// The parent.
        parent: String,
        /// The links already on it, comma-separated.
        holders: String,
    },
    /// The parent already carries a passthru macvlan/macvtap, which admits no sibling.
    #[error(
        "parent {parent:?} is held by passthru macvtap/macvlan {holder:?}; no other macvtap can \
         share it"
    )]
    ParentInPassthru {
        /// The parent.
        parent: String,
        /// The passthru link on it.
        holder: String,
    },
    /// `--macvtap-name` is already taken (`EEXIST`).
    #[error("an interface named {name:?} already exists")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// `--mac` is already the address of a sibling macvlan/macvtap (`EADDRINUSE`).
    #[error("MAC {mac} is already used by another macvlan/macvtap on {parent:?}")]
    MacInUse {
        /// The MAC asked for.
        mac: MacAddr,
        /// The parent.
        parent: String,
    },
    /// `--mac` for a new macvtap is multicast or all zeros.
    #[error("MAC {mac} is not a valid unicast address")]
    InvalidMac {
        /// The MAC asked for.
        mac: MacAddr,
    },
    /// A link looked up by name does not exist in this network namespace.
    #[error("no interface named {name:?} in this network namespace")]
    NoSuchLink {
        /// The name.
        name: String,
    },
    /// A link looked up by index does not exist (any more) in this network namespace; deleting
    /// a link treats this as done.
    #[error("interface #{ifindex} does not exist in this network namespace")]
    NoSuchIfindex {
        /// The index.
        ifindex: u32,
    },
    /// The link is a macvlan, veth or other kind, not a macvtap.
    #[error("interface {name:?} is not a macvtap (kind {kind:?})")]
    NotMacvtap {
        /// The link.
        name: String,
        /// Its `IFLA_INFO_KIND`, `none` when it has none.
        kind: String,
    },
    /// The kernel answered `EPERM`: the process lacks `CAP_NET_ADMIN` in the namespace.
    #[error("{op}: not permitted (needs CAP_NET_ADMIN in this network namespace)")]
    NotPermitted {
        /// The request refused.
        op: String,
    },

    // --- Host errors ---
    /// Every generated name `mvh<ifindex>-<n>` on this parent is taken.
    #[error("no free macvtap name on {parent:?} (tried {first}..{last})")]
    NamesExhausted {
        /// The parent.
        parent: String,
        /// First name tried.
        first: String,
        /// Last name tried.
        last: String,
    },
    /// The kernel reports a macvlan mode newer than the four macvhost knows (e.g. `source`).
    #[error("macvtap {name:?} reports mode {raw}, which macvhost does not handle")]
    UnsupportedMode {
        /// The link.
        name: String,
        /// The kernel's `IFLA_MACVLAN_MODE` value.
        raw: u32,
    },
    /// Opening, binding, sending on or receiving from the netlink socket failed.
    #[error("netlink socket: {what}: {source}")]
    Socket {
        /// The step that failed.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The kernel refused a request with an errno other than those above.
    #[error("{op}: {source}{}", extack.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        /// The request.
        op: String,
        /// The errno.
        source: io::Error,
        /// The kernel's extended-ack message, when it gave one.
        extack: Option<String>,
    },
    /// A reply that does not decode, or lacks an attribute every kernel sends.
    #[error("{op}: unexpected reply: {detail}")]
    Protocol {
        /// The request.
        op: String,
        /// What was wrong with the reply.
        detail: String,
    },
    /// The link watcher thread could not be spawned.
    #[error("link watcher thread: {0}")]
    Thread(io::Error),
}

impl NetlinkError {
    /// True when the operator's request is at fault rather than the host.
    pub fn is_operator_error(&self) -> bool {
        matches!(
            self,
            NetlinkError::UnknownMode { .. }
                | NetlinkError::InvalidIfName { .. }
                | NetlinkError::NoSuchParent { .. }
                | NetlinkError::BadParent { .. }
                | NetlinkError::PassthruTaken { .. }
                | NetlinkError::ParentInPassthru { .. }
                | NetlinkError::NameTaken { .. }
                | NetlinkError::MacInUse { .. }
                | NetlinkError::InvalidMac { .. }
                | NetlinkError::NoSuchLink { .. }
                | NetlinkError::NoSuchIfindex { .. }
                | NetlinkError::NotMacvtap { .. }
                | NetlinkError::NotPermitted { .. }
        )
    }

    /// The errno behind a kernel refusal, if this is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { source, .. } | NetlinkError::Socket { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    fn kernel(op: impl Into<String>, e: KernelError) -> NetlinkError {
        match e {
            KernelError::Errno { errno, .. } if errno == libc::EPERM => {
                NetlinkError::NotPermitted { op: op.into() }
            }
            KernelError::Errno { errno, extack } => NetlinkError::Kernel {
                op: op.into(),
                source: io::Error::from_raw_os_error(errno),
                extack,
            },
            KernelError::Io { what, source } => NetlinkError::Socket { what, source },
            KernelError::Decode(detail) => NetlinkError::Protocol {
                op: op.into(),
                detail,
            },
        }
    }
}

/// A macvtap this process created. Dropping it deletes the link (through the netlink socket it
/// was created with, so in the namespace it was created in) unless [`CreatedLink::keep`] was
/// called.
#[derive(Debug)]
pub struct CreatedLink {
    name: String,
    ifindex: u32,
    mac: [u8; 6],
    parent_ifindex: u32,
    mode: MacvtapMode,
    keep: bool,
    rtnl: Rtnl,
}

impl CreatedLink {
    /// The name it was created with (the generated one when none was asked for).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its index in the namespace it was created in.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The MAC the kernel reports after creation (the parent's, for passthru).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The parent's index.
    pub fn parent_ifindex(&self) -> u32 {
        self.parent_ifindex
    }

    /// The mode it was created in.
    pub fn mode(&self) -> MacvtapMode {
        self.mode
    }

    /// Leaves the link in place when this is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Whether [`CreatedLink::keep`] was called.
    pub fn is_kept(&self) -> bool {
        self.keep
    }

    /// Deletes the link now and reports the outcome (Drop only logs it). A link that is already
    /// gone counts as deleted.
    pub fn delete(mut self) -> Result<(), NetlinkError> {
        self.keep = true; // Drop has nothing left to do
        match del_link(&mut self.rtnl, self.ifindex) {
            Err(NetlinkError::NoSuchIfindex { .. }) => Ok(()),
            r => r,
        }
    }
}

impl Drop for CreatedLink {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        match del_link(&mut self.rtnl, self.ifindex) {
            Ok(()) => tracing::debug!(iface = %self.name, "deleted macvtap"),
            Err(NetlinkError::NoSuchIfindex { .. }) => {}
            Err(e) => tracing::warn!(iface = %self.name, "cannot delete macvtap: {e}"),
        }
    }
}

/// Creates a macvtap on `spec.parent`, brings it up (in the same request, so a link that cannot
/// come up is not left behind), and returns what the kernel made of it.
pub fn create_macvtap(spec: &MacvtapSpec) -> Result<CreatedLink, NetlinkError> {
    validate_ifname(&spec.parent).map_err(|e| ifname_err(&spec.parent, e))?;
    if let Some(name) = &spec.name {
        validate_ifname(name).map_err(|e| ifname_err(name, e))?;
    }
    if let Some(mac) = spec.mac {
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetlinkError::InvalidMac { mac: MacAddr(mac) });
        }
    }
    let mut rtnl = Rtnl::new()?;
    let parent = match get_link_by_name(&mut rtnl, &spec.parent) {
        Ok(m) => m,
        Err(NetlinkError::NoSuchLink { .. }) => {
            return Err(NetlinkError::NoSuchParent {
                parent: spec.parent.clone(),
            })
        }
        Err(e) => return Err(e),
    };
    check_parent(&spec.parent, &parent)?;
    let parent_ifindex = parent.header.index;

    let created_name = match &spec.name {
        Some(name) => {
            new_macvtap(&mut rtnl, spec, name, parent_ifindex)?;
            name.clone()
        }
        None => {
            let candidates = generated_names(parent_ifindex);
            let (first, last) = match (candidates.first(), candidates.last()) {
                (Some(f), Some(l)) => (f.clone(), l.clone()),
                _ => unreachable!("generated_names yields at least one name"),
            };
            let mut made = None;
            for name in candidates {
                match new_macvtap(&mut rtnl, spec, &name, parent_ifindex) {
                    Ok(()) => {
                        made = Some(name);
                        break;
                    }
                    Err(NetlinkError::NameTaken { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            made.ok_or_else(|| NetlinkError::NamesExhausted {
                parent: spec.parent.clone(),
                first,
                last,
            })?
        }
    };

    // From here on the link exists: a failure must not leak it.
    let msg = match get_link_by_name(&mut rtnl, &created_name) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(iface = %created_name, "created macvtap unreadable, deleting it: {e}");
            let _ = del_link_by_name(&mut rtnl, &created_name);
            return Err(e);
        }
    };
    let mut link = CreatedLink {
        name: created_name,
        ifindex: msg.header.index,
        mac: [0; 6],
        parent_ifindex,
        mode: spec.mode,
        keep: false,
        rtnl,
    };
    // Dropping `link` on error deletes it.
    link.mac = mac_of(&msg).ok_or_else(|| NetlinkError::Protocol {
        op: format!("RTM_GETLINK {}", link.name),
        detail: "no 6-byte IFLA_ADDRESS".into(),
    })?;
    tracing::info!(iface = %link.name, ifindex = link.ifindex, parent = %spec.parent,
        mode = %spec.mode, mac = %MacAddr(link.mac), "created macvtap");
    Ok(link)
}

/// Deletes link `ifindex` in the calling thread's network namespace.
pub fn delete_link(ifindex: u32) -> Result<(), NetlinkError> {
    let mut rtnl = Rtnl::new()?;
    del_link(&mut rtnl, ifindex)
}

/// Sets link `ifindex`'s MAC (`RTM_SETLINK` with `IFLA_ADDRESS`) in the calling thread's
/// network namespace. Needs `CAP_NET_ADMIN`; a MAC another macvlan on the same parent uses is
/// refused by the kernel (`EADDRINUSE`).
pub fn set_mac(ifindex: u32, mac: MacAddr) -> Result<(), NetlinkError> {
    let mut rtnl = Rtnl::new()?;
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    msg.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
    match rtnl.request(RouteNetlinkMessage::SetLink(msg), NLM_F_REQUEST | NLM_F_ACK) {
        Ok(_) => Ok(()),
        Err(KernelError::Errno { errno, .. }) if errno == libc::ENODEV => {
            Err(NetlinkError::NoSuchIfindex { ifindex })
        }
        Err(e) => Err(NetlinkError::kernel(
            format!("setting the MAC of link #{ifindex} to {mac}"),
            e,
        )),
    }
}

/// Mode, MAC, MTU and parent of macvtap `name`.
pub fn macvtap_info(name: &str) -> Result<MacvtapInfo, NetlinkError> {
    validate_ifname(name).map_err(|e| ifname_err(name, e))?;
    let mut rtnl = Rtnl::new()?;
    let msg = get_link_by_name(&mut rtnl, name)?;
    info_from_msg(name, &msg)
}

fn info_from_msg(name: &str, msg: &LinkMessage) -> Result<MacvtapInfo, NetlinkError> {
    let protocol = |detail: &str| NetlinkError::Protocol {
        op: format!("RTM_GETLINK {name}"),
        detail: detail.to_owned(),
    };
    let (kind, data) = link_kind(msg);
    match kind {
        Some(InfoKind::MacVtap) => {}
        other => {
            return Err(NetlinkError::NotMacvtap {
                name: name.to_owned(),
                kind: other.map_or_else(|| "none".to_owned(), |k| k.to_string()),
            })
        }
    }
    let raw_mode = match data {
        Some(InfoData::MacVtap(d)) => d.iter().find_map(|a| match a {
            InfoMacVtap::Mode(m) => Some(*m),
            _ => None,
        }),
        _ => None,
    }
    .ok_or_else(|| protocol("no IFLA_MACVLAN_MODE"))?;
    let mode = MacvtapMode::from_kernel(raw_mode).map_err(|raw| NetlinkError::UnsupportedMode {
        name: name.to_owned(),
        raw,
    })?;
    let mut mtu = None;
    let mut parent = None;
    let mut netnsid = None;
    for a in &msg.attributes {
        match a {
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            LinkAttribute::Link(l) => parent = Some(*l),
            LinkAttribute::LinkNetNsId(id) => netnsid = Some(*id),
            _ => {}
        }
    }
    Ok(MacvtapInfo {
        name: name.to_owned(),
        ifindex: msg.header.index,
        mode,
        mac: mac_of(msg).ok_or_else(|| protocol("no 6-byte IFLA_ADDRESS"))?,
        mtu: mtu.ok_or_else(|| protocol("no IFLA_MTU"))?,
        parent_ifindex: parent.ok_or_else(|| protocol("no IFLA_LINK"))?,
        parent_netnsid: netnsid,
        up: flags_up(msg.header.flags.bits()),
    })
}

/// `IFF_UP && IFF_RUNNING`: administratively up and operationally up (`IFF_RUNNING` is the
/// kernel's `netif_oper_up`: carrier, and for stacked links such as macvtap the lower link's
/// state too). The same test as `HostDevice::carrier`.
pub(crate) fn flags_up(flags: u32) -> bool {
    let f = LinkFlags::from_bits_retain(flags);
    f.contains(LinkFlags::Up) && f.contains(LinkFlags::Running)
}

fn ifname_err(name: &str, e: crate::host::HostError) -> NetlinkError {
    let reason = match e {
        crate::host::HostError::InvalidIfName { reason, .. } => reason.to_owned(),
        other => other.to_string(),
    };
    NetlinkError::InvalidIfName {
        name: name.to_owned(),
        reason,
    }
}

/// `mvh<parent ifindex>-<n>` for n = 0.., as long as the name fits 15 bytes (at most 100).
fn generated_names(parent_ifindex: u32) -> Vec<String> {
    let mut names: Vec<String> = (0..100)
        .map(|n| format!("mvh{parent_ifindex}-{n}"))
        .take_while(|s| s.len() <= MAX_IFNAME)
        .collect();
    if names.is_empty() {
        // ifindex has 10 digits: "mvh" + 10 + "-" leaves one more byte for n.
        names.push(format!("mvh{parent_ifindex}"));
    }
    names
}

fn mac_of(msg: &LinkMessage) -> Option<[u8; 6]> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(a) => <[u8; 6]>::try_from(a.as_slice()).ok(),
        _ => None,
    })
}

fn name_of(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_kind(msg: &LinkMessage) -> (Option<&InfoKind>, Option<&InfoData>) {
    let mut kind = None;
    let mut data = None;
    for a in &msg.attributes {
        if let LinkAttribute::LinkInfo(infos) = a {
            for i in infos {
                match i {
                    LinkInfo::Kind(k) => kind = Some(k),
                    LinkInfo::Data(d) => data = Some(d),
                    _ => {}
                }
            }
        }
    }
    (kind, data)
}

/// The macvlan mode of a macvlan or macvtap link.
fn macvlan_mode(msg: &LinkMessage) -> Option<MacVlanMode> {
    match link_kind(msg).1? {
        InfoData::MacVtap(d) => d.iter().find_map(|a| match a {
            InfoMacVtap::Mode(m) => Some(*m),
            _ => None,
        }),
        InfoData::MacVlan(d) => d.iter().find_map(|a| match a {
            InfoMacVlan::Mode(m) => Some(*m),
            _ => None,
        }),
        _ => None,
    }
}

/// Refuses parents the kernel would refuse with a bare EINVAL.
fn check_parent(name: &str, msg: &LinkMessage) -> Result<(), NetlinkError> {
    let bad = |reason: &str| {
        Err(NetlinkError::BadParent {
            parent: name.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if msg.header.flags.contains(LinkFlags::Loopback) {
        return bad("it is a loopback device");
    }
    if msg.header.link_layer_type != LinkLayerType::Ether {
        return bad(&format!(
            "it is not Ethernet (link type {:?})",
            msg.header.link_layer_type
        ));
    }
    Ok(())
}

/// One `RTM_NEWLINK` creating a macvtap named `name`, already up.
fn new_macvtap(
    rtnl: &mut Rtnl,
    spec: &MacvtapSpec,
    name: &str,
    parent_ifindex: u32,
) -> Result<(), NetlinkError> {
    let mut msg = LinkMessage::default();
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    msg.attributes.push(LinkAttribute::Link(parent_ifindex));
    if let Some(mac) = spec.mac {
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
    }
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::MacVtap),
        LinkInfo::Data(InfoData::MacVtap(vec![InfoMacVtap::Mode(
            spec.mode.to_kernel(),
        )])),
    ]));
    let op = || format!("creating macvtap {name:?} on {:?}", spec.parent);
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    match rtnl.request(RouteNetlinkMessage::NewLink(msg), flags) {
        Ok(_) => Ok(()),
        Err(KernelError::Errno { errno, .. }) if errno == libc::EEXIST => {
            Err(NetlinkError::NameTaken {
                name: name.to_owned(),
            })
        }
        Err(KernelError::Errno { errno, .. }) if errno == libc::EADDRINUSE => {
            Err(NetlinkError::MacInUse {
                mac: MacAddr(spec.mac.unwrap_or_default()),
                parent: spec.parent.clone(),
            })
        }
        Err(KernelError::Errno { errno, .. }) if errno == libc::EADDRNOTAVAIL => {
            Err(NetlinkError::InvalidMac {
                mac: MacAddr(spec.mac.unwrap_or_default()),
            })
        }
        Err(e @ KernelError::Errno { errno, .. })
            if errno == libc::EINVAL || errno == libc::EBUSY =>
        {
            // macvlan says EINVAL both for "passthru must be alone" and for much else; look
            // at the parent's other macvlan/macvtap links to tell the operator which it was.
            let fallback = NetlinkError::kernel(op(), e);
            Err(explain_passthru_conflict(rtnl, spec, parent_ifindex).unwrap_or(fallback))
        }
        Err(e) => Err(NetlinkError::kernel(op(), e)),
    }
}

/// After a refused create: the passthru conflict on `parent_ifindex`, if there is one.
fn explain_passthru_conflict(
    rtnl: &mut Rtnl,
    spec: &MacvtapSpec,
    parent_ifindex: u32,
) -> Option<NetlinkError> {
    let children = macvlan_children(rtnl, parent_ifindex).ok()?;
    if let Some((holder, _)) = children
        .iter()
        .find(|(_, mode)| *mode == Some(MacVlanMode::Passthrough))
    {
        return Some(NetlinkError::ParentInPassthru {
            parent: spec.parent.clone(),
            holder: holder.clone(),
        });
    }
    if spec.mode == MacvtapMode::Passthru && !children.is_empty() {
        let holders = children
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        return Some(NetlinkError::PassthruTaken {
            parent: spec.parent.clone(),
            holders,
        });
    }
    None
}

/// Names and modes of the macvlan/macvtap links whose lower link is `parent_ifindex`.
fn macvlan_children(
    rtnl: &mut Rtnl,
    parent_ifindex: u32,
) -> Result<Vec<(String, Option<MacVlanMode>)>, NetlinkError> {
    let replies = rtnl
        .request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_REQUEST | NLM_F_DUMP,
        )
        .map_err(|e| NetlinkError::kernel("listing links", e))?;
    let mut out = Vec::new();
    for r in replies {
        let RouteNetlinkMessage::NewLink(m) = r else {
            continue;
        };
        let is_macvlan = matches!(
            link_kind(&m).0,
            Some(InfoKind::MacVtap) | Some(InfoKind::MacVlan)
        );
        // IFLA_LINK_NETNSID set: IFLA_LINK is an index in another namespace.
        let on_parent = m
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Link(l) if *l == parent_ifindex))
            && !m
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
        if is_macvlan && on_parent {
            let name = name_of(&m).unwrap_or("?").to_owned();
            out.push((name, macvlan_mode(&m)));
        }
    }
    Ok(out)
}

fn get_link_by_name(rtnl: &mut Rtnl, name: &str) -> Result<LinkMessage, NetlinkError> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    let op = || format!("RTM_GETLINK {name:?}");
    match rtnl.request(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST) {
        Ok(replies) => replies
            .into_iter()
            .find_map(|r| match r {
                RouteNetlinkMessage::NewLink(m) => Some(m),
                _ => None,
            })
            .ok_or_else(|| NetlinkError::Protocol {
                op: op(),
                detail: "no RTM_NEWLINK in the reply".into(),
            }),
        Err(KernelError::Errno { errno, .. }) if errno == libc::ENODEV => {
            Err(NetlinkError::NoSuchLink {
                name: name.to_owned(),
            })
        }
        Err(e) => Err(NetlinkError::kernel(op(), e)),
    }
}

fn del_link_by_name(rtnl: &mut Rtnl, name: &str) -> Result<(), NetlinkError> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    rtnl.request(RouteNetlinkMessage::DelLink(msg), NLM_F_REQUEST | NLM_F_ACK)
        .map(|_| ())
        .map_err(|e| NetlinkError::kernel(format!("deleting link {name:?}"), e))
}

fn del_link(rtnl: &mut Rtnl, ifindex: u32) -> Result<(), NetlinkError> {
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    match rtnl.request(RouteNetlinkMessage::DelLink(msg), NLM_F_REQUEST | NLM_F_ACK) {
        Ok(_) => Ok(()),
        Err(KernelError::Errno { errno, .. }) if errno == libc::ENODEV => {
            Err(NetlinkError::NoSuchIfindex { ifindex })
        }
        Err(e) => Err(NetlinkError::kernel(format!("deleting link #{ifindex}"), e)),
    }
}
