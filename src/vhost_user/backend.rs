//! The `VhostUserBackend` implementation: features, config space, and dispatch to workers.
//!
//! It holds no datapath logic. Each queue pair is served by its own worker thread
//! (`queues_per_thread`), and `handle_event` only forwards to that pair's [`PairWorker`].
//! A new `NetBackend` is built for every frontend connection, so per-connection state
//! (vrings, memory, acked features) starts fresh while the host queues and counters persist.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::vring::NetVring;
use crate::datapath::tx::SharedMac;
use crate::datapath::{vnet, DirtyLogState, QueueStats};
use crate::host::MacAddr;
use crate::ratelimit::RateSpec;
use crate::sandbox::ThreadKind;
use crate::worker::l2::{GuestL2, L2Host};
use crate::worker::throttle::Limits;
use crate::worker::{EventRegistry, GuestMem, PairQueue, PairSettings, PairWorker};

/// The vring type every queue uses.
pub type Vring = NetVring<GuestMem>;

/// `VHOST_F_LOG_ALL`: the frontend may ask us to log all writes (live migration).
pub const VHOST_F_LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

/// What a connection's device needs to know about the host side.
#[derive(Debug)]
pub struct HostSide<Q> {
    /// One queue per queue pair.
    pub queues: Vec<Arc<Q>>,
    /// TUN_F_* offload bits the queues accept.
    pub supported_offloads: u32,
    /// Whether the host link is up with carrier; kept current by the link watcher and read
    /// into the config space's STATUS field.
    pub link_up: Arc<AtomicBool>,
    /// End the frontend's connection while `link_up` is false, and serve none until it is
    /// true again (`--disconnect-on-link-down`): how a vhost-user frontend shows the guest a
    /// link change today (the serve loop does it).
    pub link_down_disconnects: bool,
    /// The guest's multicast groups into the macvtap's filter (`--rx-filter`).
    pub l2: L2Host,
}

/// Link status bit in the config space (`VIRTIO_NET_S_LINK_UP`).
pub const LINK_UP: u16 = 1;

/// Guest-visible device identity.
#[derive(Debug, Clone, Copy)]
pub struct DeviceIdentity {
    /// The guest's MAC.
    pub mac: MacAddr,
    /// The MTU offered to the guest.
    pub mtu: u16,
    /// Queue pairs offered.
    pub queue_pairs: u16,
    /// Largest virtqueue size.
    pub queue_size: u16,
    /// Limit on guest → host traffic (libvirt's `<outbound>`).
    pub tx_rate: Option<RateSpec>,
    /// Limit on host → guest traffic (libvirt's `<inbound>`).
    pub rx_rate: Option<RateSpec>,
}

/// One frontend connection's device.
pub struct NetBackend<Q: PairQueue = crate::host::TapQueue> {
    identity: DeviceIdentity,
    offered_features: u64,
    queues: Vec<Arc<Q>>,
    workers: Vec<PairWorker<Q>>,
    /// The guest's multicast groups and MAC (see `worker::l2`).
    l2: Arc<GuestL2>,
    link_up: Arc<AtomicBool>,
    acked_features: AtomicU64,
    /// The feature set last logged (all ones before the first).
    logged_features: AtomicU64,
    /// Where this connection's writes are logged while the frontend migrates the guest.
    dirty_log: Arc<DirtyLogState>,
    /// Exit-event fds handed to vhost-user-backend, which registers them with `into_raw_fd()`
    /// and never closes them (one leaked fd per worker per connection). Closed in `Drop`.
    exit_consumer_fds: Mutex<Vec<std::os::fd::RawFd>>,
}

impl<Q: PairQueue> Drop for NetBackend<Q> {
    fn drop(&mut self) {
        // Every `VringEpollHandler` holds an `Arc` of this backend, so by now they are all
        // gone, their epoll fds closed and their threads finished: nobody uses these fds.
        let fds = std::mem::take(
            self.exit_consumer_fds
                .get_mut()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for fd in fds {
            // SAFETY: `fd` came from an EventConsumer we created in `exit_event`; the epoll
            // handler took it with `into_raw_fd()` and never closes it, so this is its only
            // owner, and (see above) no thread can still be using it.
            drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        }
    }
}

impl<Q: PairQueue> std::fmt::Debug for NetBackend<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetBackend")
            .field("identity", &self.identity)
            .field(
                "offered_features",
                &format_args!("{:#x}", self.offered_features),
            )
            .finish_non_exhaustive()
    }
}

/// The virtio features macvhost offers, given the TUN_F_* bits the host queue accepted.
pub fn offered_features(tun_offloads: u32, queue_pairs: u16) -> u64 {
    let bit = vnet::bit;
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_F_NOTIFY_ON_EMPTY)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_MTU)
        | bit(VIRTIO_NET_F_STATUS)
        // The control queue is served by the frontend (QEMU, virtio-user), never by us; it is
        // what lets a guest change queue pairs (`ethtool -L`) and announce itself.
        | bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        // Live migration: we log our writes to guest memory (see `datapath::dirty`).
        | VHOST_F_LOG_ALL
        | vnet::offered_offload_features(tun_offloads);
    if queue_pairs > 1 {
        f |= bit(VIRTIO_NET_F_MQ);
    }
    f
}

impl<Q> Clone for HostSide<Q> {
    fn clone(&self) -> Self {
        HostSide {
            queues: self.queues.clone(),
            supported_offloads: self.supported_offloads,
            link_up: self.link_up.clone(),
            link_down_disconnects: self.link_down_disconnects,
            l2: self.l2.clone(),
        }
    }
}

impl<Q: PairQueue> NetBackend<Q> {
    /// Builds the device for one connection over persistent host queues and counters.
    pub fn new(
        identity: DeviceIdentity,
        host: HostSide<Q>,
        stats: &[Arc<QueueStats>],
    ) -> io::Result<NetBackend<Q>> {
        if host.queues.len() != usize::from(identity.queue_pairs)
            || stats.len() != host.queues.len()
        {
            return Err(io::Error::other(
                "one host queue and one counter set per queue pair",
            ));
        }
        let offered_features = offered_features(host.supported_offloads, identity.queue_pairs);
        let nq = usize::from(identity.queue_pairs) * 2;
        // One limiter per direction for the whole device, shared by the pairs (libvirt's
        // <bandwidth> is per interface); a pair takes its lock only when a limit is set.
        let limits = Limits::new(identity.tx_rate, identity.rx_rate);
        let dirty_log = Arc::new(DirtyLogState::new());
        let workers = host
            .queues
            .iter()
            .zip(stats)
            .enumerate()
            .map(|(i, (q, s))| {
                PairWorker::new(
                    i,
                    nq,
                    q.clone(),
                    s.clone(),
                    identity.mtu,
                    limits.clone(),
                    dirty_log.clone(),
                )
            })
            .collect::<io::Result<Vec<PairWorker<Q>>>>()?;
        let l2 = GuestL2::new(
            host.l2.table,
            host.l2.filter.clone(),
            host.l2
                .guest_mac
                .clone()
                .unwrap_or_else(|| Arc::new(SharedMac::new(identity.mac.0))),
            host.l2.stats.clone(),
        )?;
        let mut workers = workers;
        for w in &workers {
            w.set_watch(l2.watch());
        }
        if let Some(first) = workers.first_mut() {
            first.set_injector(l2.injector());
        }
        Ok(NetBackend {
            identity,
            offered_features,
            queues: host.queues,
            workers,
            l2,
            link_up: host.link_up.clone(),
            acked_features: AtomicU64::new(0),
            logged_features: AtomicU64::new(u64::MAX),
            dirty_log,
            exit_consumer_fds: Mutex::new(Vec::new()),
        })
    }

    /// Gives each worker where its thread watches fds (one registry per worker thread, in
    /// thread order).
    pub fn set_registries(&self, registries: Vec<Box<dyn EventRegistry>>) {
        for (w, r) in self.workers.iter().zip(registries) {
            w.set_registry(r);
        }
    }

    /// The guest's layer-2 following.
    pub fn l2(&self) -> &Arc<GuestL2> {
        &self.l2
    }

    /// Ends the connection: the guest's groups leave the macvtap's filter, the host queues are
    /// detached, nothing is watched.
    pub fn teardown(&self) {
        self.l2.clear();
        for w in &self.workers {
            w.teardown();
        }
    }

    /// This connection's dirty-page log: the shim hands it `SET_LOG_BASE`.
    pub fn dirty_log(&self) -> Arc<DirtyLogState> {
        self.dirty_log.clone()
    }

    /// The features the guest acked on this connection (0 before SET_FEATURES).
    pub fn acked_features(&self) -> u64 {
        self.acked_features.load(Ordering::Relaxed)
    }

    fn config_space(&self) -> [u8; 12] {
        // struct virtio_net_config { mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu; }
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.identity.mac.0);
        let status = if self.link_up.load(Ordering::Relaxed) {
            LINK_UP
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&self.identity.queue_pairs.to_le_bytes());
        c[10..12].copy_from_slice(&self.identity.mtu.to_le_bytes());
        c
    }
}

impl<Q: PairQueue> VhostUserBackend for NetBackend<Q> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.identity.queue_pairs) * 2
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.identity.queue_size)
    }

    fn features(&self) -> u64 {
        // GET_FEATURES is the first callback on vhost-user-backend's request thread: seal it to
        // its own filter (the main thread never gets here; the name check makes sure).
        if std::thread::current().name() == Some("macvhost") {
            enter_thread(ThreadKind::Request);
        }
        self.offered_features
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
        // Before `set_settings` below, which takes each worker's state lock and so waits out any
        // round that began before logging was switched on: once this returns (and the frontend
        // gets its reply), every write to guest memory is logged.
        self.dirty_log.set_log_all(features & VHOST_F_LOG_ALL != 0);
        let settings = PairSettings::from_features(features, self.identity.mtu);
        let offloads = vnet::tap_offloads_for(features);
        for (i, q) in self.queues.iter().enumerate() {
            // The tap must produce exactly what the guest acked, nothing more (GUEST_* bits).
            if let Err(e) = q.set_offload(offloads) {
                tracing::error!(queue_pair = i, "TUNSETOFFLOAD {offloads:#x} failed: {e}");
            }
            if let Err(e) = q.set_vnet_hdr_len(settings.hdr_len) {
                tracing::error!(queue_pair = i, "TUNSETVNETHDRSZ failed: {e}");
            }
        }
        for w in &self.workers {
            w.set_settings(settings);
        }
        // QEMU sends SET_FEATURES once per queue pair's vhost device: say it once per value.
        if self.logged_features.swap(features, Ordering::Relaxed) == features {
            return;
        }
        // A frontend that reconnects (or keeps failing, see `server::failures`) acks the same
        // set every time: say it again only when it changes.
        static LAST_CONNECTION: AtomicU64 = AtomicU64::new(u64::MAX);
        if LAST_CONNECTION.swap(features, Ordering::Relaxed) == features {
            tracing::debug!(
                features = format_args!("{features:#x}"),
                "frontend acked features"
            );
            return;
        }
        tracing::info!(
            features = format_args!("{features:#x}"),
            mrg_rxbuf = settings.mrg_rxbuf,
            event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            hdr_len = settings.hdr_len,
            tap_offloads = format_args!("{offloads:#x}"),
            "frontend acked features"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn reset_device(&self) {
        for w in &self.workers {
            w.reset();
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // virtio-queue tracks EVENT_IDX per queue (SET_FEATURES reaches every vring).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let start = (offset as usize).min(space.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(space.len());
        let mut out = space[start..end].to_vec();
        // Reads past our fields (speed, duplex, rss...) see zeros, as on real hardware.
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        // vhost-user-backend has already swapped the table in; if it is unsafe to touch, the
        // workers get no memory at all (the datapath pauses) and the frontend gets an error.
        if let Err(e) = check_regions_fit_files(&mem.memory()) {
            tracing::error!("frontend sent a bad memory table: {e}");
            for w in &self.workers {
                w.clear_memory();
            }
            return Err(e);
        }
        for w in &self.workers {
            w.set_memory(mem.clone());
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread per queue pair: RX = 2i, TX = 2i+1.
        (0..u64::from(self.identity.queue_pairs))
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        self.exit_consumer_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(std::os::fd::AsRawFd::as_raw_fd(&consumer));
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // The pair's epoll thread takes its own, narrower filter at its first event.
        enter_thread(ThreadKind::Worker);
        let worker = self.workers.get(thread_id).ok_or_else(|| {
            io::Error::other(format!("event for unknown worker thread {thread_id}"))
        })?;
        worker.handle_event(device_event, evset, vrings)
    }
}

/// Installs `kind`'s seccomp filter on the calling thread (once; nothing when not sealed). A
/// failure leaves the thread under the process filter; it is said once.
fn enter_thread(kind: ThreadKind) {
    if let Err(e) = crate::sandbox::enter_thread(kind) {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| tracing::error!("{kind:?} thread stays under the process filter: {e}"));
    }
}

/// Refuses regions that extend past the end of their backing file: touching such a page raises
/// SIGBUS in the backend, so a frontend could kill us with one descriptor (fault class F3).
/// A frontend shrinking its file later is not caught here; QEMU's memfd backend seals it.
pub fn check_regions_fit_files(mem: &GuestMemoryMmap<()>) -> io::Result<()> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let meta = fo.file().metadata()?;
        // Only regular files (memfd, tmpfs, hugetlbfs) have a meaningful length.
        if !meta.file_type().is_file() {
            continue;
        }
        let end = fo.start().checked_add(region.len()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "region offset + size overflows",
            )
        })?;
        if end > meta.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "region at guest address {:#x} needs {end} bytes of its file, which has {}",
                    region.start_addr().0,
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_what_the_tap_accepts() {
        let bit = |b: u32| 1u64 << b;
        let none = offered_features(0, 1);
        assert_eq!(none & bit(VIRTIO_NET_F_CSUM), 0);
        assert_eq!(none & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(none & bit(VIRTIO_NET_F_MQ), 0);
        assert_ne!(none & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
        let csum_tso4 = offered_features(vnet::TUN_F_CSUM | vnet::TUN_F_TSO4, 2);
        assert_ne!(csum_tso4 & bit(VIRTIO_NET_F_HOST_TSO4), 0);
        assert_ne!(csum_tso4 & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(csum_tso4 & bit(VIRTIO_NET_F_GUEST_TSO6), 0);
        assert_ne!(csum_tso4 & bit(VIRTIO_NET_F_MQ), 0);
        // TSO without checksum offload is meaningless; the tap would reject it too.
        let tso_only = offered_features(vnet::TUN_F_TSO4, 1);
        assert_eq!(tso_only & bit(VIRTIO_NET_F_HOST_TSO4), 0);
    }

    #[test]
    fn memory_region_past_the_end_of_its_file_is_refused() {
        use std::fs::File;
        use vm_memory::{FileOffset, GuestAddress};
        let file = File::from(
            nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::empty()).unwrap(),
        );
        file.set_len(0x1000).unwrap();
        let fits = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            0x1000,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        assert!(check_regions_fit_files(&fits).is_ok());
        // mmap happily maps past EOF; the first access would SIGBUS.
        let too_big = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            0x10_0000,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        let err = check_regions_fit_files(&too_big).unwrap_err();
        assert!(err.to_string().contains("needs 1048576 bytes"), "{err}");
    }
}
