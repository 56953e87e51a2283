//! QEMU workarounds: what the shim answers itself so that vhost-user-backend does not drop a
//! QEMU connection. Each keeps bounded state (no payloads, no fds) and names the fix that
//! would retire it.

use vhost::vhost_user::message::{VhostUserMemoryRegion, VhostUserSingleMemoryRegion};

/// Early `SET_VRING_ENABLE`s: QEMU (7.2 and later, `queues>1`) treats
/// `VHOST_USER_F_PROTOCOL_FEATURES` as negotiated as soon as the backend offers it and sends
/// SET_VRING_ENABLE for the extra queue pairs while realizing the device, before any
/// SET_FEATURES. The `vhost` crate (0.18) and vhost-user-backend (0.24) check the *acked*
/// features (the check came with rust-vmm/vhost#34) and end the connection, which leaves QEMU
/// unable to use multiqueue and crashes QEMU 7.2 on its reconnect path.
///
/// Rings start disabled when protocol features are in use, so an early "disable" is exactly a
/// no-op and an early "enable" only has to happen right after SET_FEATURES: the shim answers
/// the early message itself and replays the latest state of each ring after SET_FEATURES.
///
/// Retire when vhost-user-backend accepts SET_VRING_ENABLE before SET_FEATURES once it has
/// offered `PROTOCOL_FEATURES` (as DPDK's vhost library does). No such change exists upstream
/// as of vhost 0.18 / vhost-user-backend 0.24 (searched rust-vmm/vhost issues and pull
/// requests; the newest handler still checks `acked_virtio_features`).
///
/// Bound: one entry per vring of the device (the latest request wins); an index outside the
/// device is refused, and the messages themselves (8 bytes, no fds) are never kept.
#[derive(Debug)]
pub struct EarlyEnables {
    /// Latest early state per vring index: `None` = never sent.
    latest: Vec<Option<bool>>,
}

/// Why an early SET_VRING_ENABLE was refused (the frontend's fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuirkError {
    /// A vring the device does not have.
    #[error("frontend sent SET_VRING_ENABLE for vring {index}, but the device has {count}")]
    VringOutOfRange {
        /// The index sent.
        index: u32,
        /// Vrings of the device.
        count: usize,
    },
    /// `num` other than 0 or 1.
    #[error("frontend sent SET_VRING_ENABLE with state {0} (want 0 or 1)")]
    BadEnable(u32),
    /// More memory regions than the backend has slots.
    #[error("frontend added more than {0} memory regions")]
    TooManyRegions(usize),
}

impl EarlyEnables {
    /// Room for `vrings` rings (2 × queue pairs).
    pub fn new(vrings: usize) -> EarlyEnables {
        EarlyEnables {
            latest: vec![None; vrings],
        }
    }

    /// Notes an early SET_VRING_ENABLE(`index`, `num`).
    pub fn note(&mut self, index: u32, num: u32) -> Result<(), QuirkError> {
        let enable = match num {
            0 => false,
            1 => true,
            n => return Err(QuirkError::BadEnable(n)),
        };
        let count = self.latest.len();
        let slot = self
            .latest
            .get_mut(index as usize)
            .ok_or(QuirkError::VringOutOfRange { index, count })?;
        *slot = Some(enable);
        Ok(())
    }

    /// After SET_FEATURES: the rings to enable now (ascending), forgetting the rest. Only when
    /// the frontend acked `PROTOCOL_FEATURES`; without it, SET_FEATURES enables every ring
    /// itself and a SET_VRING_ENABLE would be refused.
    pub fn take(&mut self, protocol_features_acked: bool) -> Vec<u32> {
        let out = if protocol_features_acked {
            (0u32..)
                .zip(&self.latest)
                .filter(|(_, s)| **s == Some(true))
                .map(|(i, _)| i)
                .collect()
        } else {
            Vec::new()
        };
        self.latest.iter_mut().for_each(|s| *s = None);
        out
    }
}

/// A memory region as the frontend names it: guest address, size, frontend address, offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    gpa: u64,
    size: u64,
    uaddr: u64,
    offset: u64,
}

impl From<&VhostUserMemoryRegion> for Region {
    fn from(r: &VhostUserMemoryRegion) -> Region {
        Region {
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            uaddr: r.user_addr,
            offset: r.mmap_offset,
        }
    }
}

impl From<&VhostUserSingleMemoryRegion> for Region {
    fn from(r: &VhostUserSingleMemoryRegion) -> Region {
        Region::from(&**r)
    }
}

/// What to do with an ADD_MEM_REG or REM_MEM_REG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionVerdict {
    /// New to the table: forward it.
    Forward,
    /// An exact repeat: answer it here.
    Repeat,
}

/// Repeated ADD_MEM_REG / REM_MEM_REG: QEMU 7.2 sends the same ADD_MEM_REG (and REM_MEM_REG)
/// once per queue pair's vhost device on the one connection; vhost-user-backend refuses the
/// repeat as an overlapping region and ends the connection. The shim keeps the connection's
/// region table and answers an exact repeat (an add of a region present, a removal of one
/// gone) itself.
///
/// Retire when vhost-user-backend treats an exact duplicate add (and a removal of a missing
/// region) as done, or when QEMU sends them once per connection. Neither exists upstream as of
/// vhost-user-backend 0.24 (searched rust-vmm/vhost issues and pull requests).
///
/// The table follows the requests, not the replies: vhost 0.18's request handler ends the
/// connection on any request its backend refuses (it acks the failure, then returns the
/// error), so a region the shim forwarded is either in the backend's table or the connection
/// is ending, and the table dies with it. Bound: the backend's slot count.
#[derive(Debug)]
pub struct Regions {
    table: Vec<Region>,
    slots: usize,
}

impl Regions {
    /// An empty table with room for `slots` regions.
    pub fn new(slots: usize) -> Regions {
        Regions {
            table: Vec::new(),
            slots,
        }
    }

    /// SET_MEM_TABLE: the table is exactly `regions`.
    pub fn replace(&mut self, regions: impl IntoIterator<Item = Region>) {
        self.table.clear();
        self.table.extend(regions.into_iter().take(self.slots));
    }

    /// ADD_MEM_REG.
    pub fn add(&mut self, r: Region) -> Result<RegionVerdict, QuirkError> {
        if self.table.contains(&r) {
            return Ok(RegionVerdict::Repeat);
        }
        if self.table.len() >= self.slots {
            return Err(QuirkError::TooManyRegions(self.slots));
        }
        self.table.push(r);
        Ok(RegionVerdict::Forward)
    }

    /// REM_MEM_REG: matched on guest address and size, as the backend does.
    pub fn remove(&mut self, r: Region) -> RegionVerdict {
        let before = self.table.len();
        self.table.retain(|x| (x.gpa, x.size) != (r.gpa, r.size));
        if self.table.len() == before {
            RegionVerdict::Repeat
        } else {
            RegionVerdict::Forward
        }
    }

    /// Regions in the table.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_enables_keep_the_latest_state_per_vring_only() {
        let mut e = EarlyEnables::new(4);
        for _ in 0..10_000 {
            e.note(1, 1).unwrap();
            e.note(3, 1).unwrap();
        }
        e.note(3, 0).unwrap();
        e.note(0, 0).unwrap();
        assert_eq!(e.latest.len(), 4, "state grew with the messages");
        assert_eq!(e.take(true), vec![1]);
        assert_eq!(e.take(true), Vec::<u32>::new(), "replayed twice");
    }

    #[test]
    fn early_enable_out_of_range_or_not_0_or_1_is_refused() {
        let mut e = EarlyEnables::new(4);
        assert_eq!(
            e.note(4, 1),
            Err(QuirkError::VringOutOfRange { index: 4, count: 4 })
        );
        assert_eq!(
            e.note(u32::MAX, 1),
            Err(QuirkError::VringOutOfRange {
                index: u32::MAX,
                count: 4
            })
        );
        assert_eq!(e.note(0, 2), Err(QuirkError::BadEnable(2)));
    }

    #[test]
    fn early_enables_are_dropped_when_protocol_features_were_not_acked() {
        let mut e = EarlyEnables::new(2);
        e.note(0, 1).unwrap();
        assert!(e.take(false).is_empty());
        assert!(e.take(true).is_empty(), "kept after SET_FEATURES");
    }

    fn region(gpa: u64, size: u64) -> Region {
        Region::from(&VhostUserSingleMemoryRegion::new(
            gpa,
            size,
            0x7f00_0000_0000,
            0,
        ))
    }

    #[test]
    fn exact_repeats_are_answered_and_the_table_is_bounded() {
        let mut t = Regions::new(3);
        assert_eq!(t.add(region(0, 4096)), Ok(RegionVerdict::Forward));
        assert_eq!(t.add(region(0, 4096)), Ok(RegionVerdict::Repeat));
        assert_eq!(t.add(region(4096, 4096)), Ok(RegionVerdict::Forward));
        assert_eq!(t.add(region(8192, 4096)), Ok(RegionVerdict::Forward));
        assert_eq!(
            t.add(region(12288, 4096)),
            Err(QuirkError::TooManyRegions(3))
        );
        assert_eq!(t.remove(region(0, 4096)), RegionVerdict::Forward);
        assert_eq!(t.remove(region(0, 4096)), RegionVerdict::Repeat);
        assert_eq!(t.len(), 2);
        t.replace((0..10).map(|i| region(i * 4096, 4096)));
        assert_eq!(t.len(), 3, "SET_MEM_TABLE overfilled the table");
    }
}
