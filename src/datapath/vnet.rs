//! The virtio-net header, the feature bits the datapath cares about, and the mapping from the
//! guest's acked offloads to the tap's `TUNSETOFFLOAD` bits.
//!
//! The backend never parses the header on TX: the guest's bytes go to the tap as they are and the
//! kernel validates them (a bad header makes the write fail with `EINVAL`, which the TX path counts
//! as a host error). On RX the tap writes the first 10 bytes; the backend only fills `num_buffers`.

use vm_memory::{ByteValued, Le16};

pub use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
pub use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_GUEST_USO6, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_HOST_USO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
};
pub use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Header lengths: 12 with `VIRTIO_F_VERSION_1` or `VIRTIO_NET_F_MRG_RXBUF` (`virtio_net_hdr_v1`),
/// 10 for a legacy device (`virtio_net_hdr`). Defined once, where the tap is told the length.
pub use crate::host::{VNET_HDR_LEN_LEGACY, VNET_HDR_LEN_V1};
/// Byte offset of the little-endian `u16 num_buffers` in a 12-byte header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Byte offset of `gso_type` in every header version.
pub const GSO_TYPE_OFFSET: usize = 1;
/// `gso_type` with no segmentation asked for.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `gso_type` flag: the frames carry ECN (combined with a GSO type).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// Largest Ethernet frame behind the header when GSO is in use: a 64 KiB IP packet plus the
/// 14-byte Ethernet header (65550, the same bound as QEMU and Firecracker).
pub const MAX_GSO_FRAME_LEN: usize = 65536 + ETH_HLEN;
/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// One 802.1Q tag.
pub const VLAN_HLEN: usize = 4;

/// `TUNSETOFFLOAD` bits (`linux/if_tun.h`).
pub use libc::{
    TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, TUN_F_USO4, TUN_F_USO6,
};

/// One offload: the `TUN_F_*` bit the tap must accept, the virtio feature that lets the guest send
/// such frames (`HOST_*`) and the one that lets it receive them (`GUEST_*`).
#[derive(Debug, Clone, Copy)]
pub struct Offload {
    /// `TUNSETOFFLOAD` bit.
    pub tun: u32,
    /// Guest → host feature (the guest may send such frames).
    pub host_feature: u32,
    /// Host → guest feature (the guest accepts such frames).
    pub guest_feature: u32,
    /// Whether macvhost offers it when the tap accepts it.
    pub offered: bool,
}

/// The offloads, checksum first: every other one needs it. The one table both directions use:
/// what is offered ([`offered_offload_features`]) and what the tap is told the guest accepts
/// ([`tap_offloads_for`]). USO is mapped but not offered: no frontend on our test machines
/// (QEMU 7.2, DPDK 22.11) knows it, so that path is untested.
pub const OFFLOADS: [Offload; 7] = [
    Offload {
        tun: TUN_F_CSUM,
        host_feature: VIRTIO_NET_F_CSUM,
        guest_feature: VIRTIO_NET_F_GUEST_CSUM,
        offered: true,
    },
    Offload {
        tun: TUN_F_TSO4,
        host_feature: VIRTIO_NET_F_HOST_TSO4,
        guest_feature: VIRTIO_NET_F_GUEST_TSO4,
        offered: true,
    },
    Offload {
        tun: TUN_F_TSO6,
        host_feature: VIRTIO_NET_F_HOST_TSO6,
        guest_feature: VIRTIO_NET_F_GUEST_TSO6,
        offered: true,
    },
    Offload {
        tun: TUN_F_TSO_ECN,
        host_feature: VIRTIO_NET_F_HOST_ECN,
        guest_feature: VIRTIO_NET_F_GUEST_ECN,
        offered: true,
    },
    Offload {
        tun: TUN_F_UFO,
        host_feature: VIRTIO_NET_F_HOST_UFO,
        guest_feature: VIRTIO_NET_F_GUEST_UFO,
        offered: true,
    },
    Offload {
        tun: TUN_F_USO4,
        host_feature: VIRTIO_NET_F_HOST_USO,
        guest_feature: VIRTIO_NET_F_GUEST_USO4,
        offered: false,
    },
    Offload {
        tun: TUN_F_USO6,
        host_feature: VIRTIO_NET_F_HOST_USO,
        guest_feature: VIRTIO_NET_F_GUEST_USO6,
        offered: false,
    },
];

/// The offload features to offer when the tap accepts the `TUN_F_*` bits `tun_supported`:
/// nothing without checksum offload (every segmentation offload needs it).
pub fn offered_offload_features(tun_supported: u32) -> u64 {
    if tun_supported & TUN_F_CSUM == 0 {
        return 0;
    }
    OFFLOADS
        .iter()
        .filter(|o| o.offered && tun_supported & o.tun != 0)
        .fold(0, |f, o| f | bit(o.host_feature) | bit(o.guest_feature))
}

/// The feature mask of one feature bit number.
#[inline]
pub const fn bit(feature: u32) -> u64 {
    1u64 << feature
}

/// True when feature bit number `feature` is set in `features`.
#[inline]
pub const fn has(features: u64, feature: u32) -> bool {
    features & bit(feature) != 0
}

/// The virtio-net header as laid out in guest memory (`virtio_net_hdr_v1`, little-endian).
///
/// A legacy 10-byte header is the same without `num_buffers`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: Le16,
    /// Segment payload size.
    pub gso_size: Le16,
    /// Where checksumming starts.
    pub csum_start: Le16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: Le16,
    /// Number of RX descriptor chains this frame spans (MRG_RXBUF; 1 otherwise).
    pub num_buffers: Le16,
}

// SAFETY: `VirtioNetHdr` is `repr(C)`, made only of `u8` and `Le16` (itself `ByteValued`), has no
// padding (2 × u8 then 5 × u16, 12 bytes, alignment 2; checked below) and every bit pattern is a
// valid value.
unsafe impl ByteValued for VirtioNetHdr {}

const _: () = assert!(std::mem::size_of::<VirtioNetHdr>() == VNET_HDR_LEN_V1);
const _: () = assert!(std::mem::offset_of!(VirtioNetHdr, num_buffers) == NUM_BUFFERS_OFFSET);
const _: () = assert!(std::mem::offset_of!(VirtioNetHdr, gso_type) == GSO_TYPE_OFFSET);

/// The header length the guest and the tap use: 12 with `VERSION_1` or `MRG_RXBUF`, else 10.
/// The tap must be set to the same size (`TUNSETVNETHDRSZ`).
pub fn vnet_hdr_len(acked_features: u64) -> usize {
    if has(acked_features, VIRTIO_F_VERSION_1) || has(acked_features, VIRTIO_NET_F_MRG_RXBUF) {
        VNET_HDR_LEN_V1
    } else {
        VNET_HDR_LEN_LEGACY
    }
}

/// The `TUNSETOFFLOAD` bits for what the guest accepted on receive ([`OFFLOADS`]).
///
/// Nothing without `GUEST_CSUM`, as the spec requires; ECN only alongside TSO (the kernel ignores
/// it otherwise).
pub fn tap_offloads_for(acked_features: u64) -> u32 {
    if !has(acked_features, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let off = OFFLOADS
        .iter()
        .filter(|o| has(acked_features, o.guest_feature))
        .fold(0, |t, o| t | o.tun);
    if off & (TUN_F_TSO4 | TUN_F_TSO6) == 0 {
        off & !TUN_F_TSO_ECN
    } else {
        off
    }
}

/// True when the guest acked any receive segmentation offload (it may get 64 KiB frames).
pub fn guest_gso_acked(acked_features: u64) -> bool {
    [
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_GUEST_USO4,
        VIRTIO_NET_F_GUEST_USO6,
    ]
    .iter()
    .any(|&f| has(acked_features, f))
}

/// The largest frame (header included) the host may hand to the guest: header + Ethernet header +
/// one VLAN tag + `mtu`, or header + 65550 when any guest GSO offload is acked and that is more
/// (an MTU above 65532 still needs its full size with GSO).
pub fn rx_max_frame_len(acked_features: u64, mtu: usize) -> usize {
    let hdr = vnet_hdr_len(acked_features);
    let mtu_frame = ETH_HLEN + VLAN_HLEN + mtu;
    if guest_gso_acked(acked_features) {
        hdr + mtu_frame.max(MAX_GSO_FRAME_LEN)
    } else {
        hdr + mtu_frame
    }
}

/// The largest frame (header included) the guest may send: header + 65550.
pub fn tx_max_frame_len(hdr_len: usize) -> usize {
    hdr_len + MAX_GSO_FRAME_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_length_follows_version_1_or_mrg_rxbuf() {
        assert_eq!(vnet_hdr_len(0), VNET_HDR_LEN_LEGACY);
        assert_eq!(vnet_hdr_len(bit(VIRTIO_F_VERSION_1)), VNET_HDR_LEN_V1);
        assert_eq!(vnet_hdr_len(bit(VIRTIO_NET_F_MRG_RXBUF)), VNET_HDR_LEN_V1);
        assert_eq!(
            vnet_hdr_len(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)),
            VNET_HDR_LEN_V1
        );
    }

    #[test]
    fn header_struct_layout_matches_the_spec() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: Le16::from(0x0102),
            gso_size: Le16::from(0x0304),
            csum_start: Le16::from(0x0506),
            csum_offset: Le16::from(0x0708),
            num_buffers: Le16::from(0x090a),
        };
        assert_eq!(
            h.as_slice(),
            &[1, 4, 2, 1, 4, 3, 6, 5, 8, 7, 0x0a, 0x09][..]
        );
    }

    #[test]
    fn offloads_need_guest_csum() {
        let all = bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN)
            | bit(VIRTIO_NET_F_GUEST_UFO)
            | bit(VIRTIO_NET_F_GUEST_USO4)
            | bit(VIRTIO_NET_F_GUEST_USO6);
        assert_eq!(tap_offloads_for(all), 0);
        assert_eq!(tap_offloads_for(0), 0);
        assert_eq!(tap_offloads_for(bit(VIRTIO_NET_F_GUEST_CSUM)), TUN_F_CSUM);
        assert_eq!(
            tap_offloads_for(all | bit(VIRTIO_NET_F_GUEST_CSUM)),
            TUN_F_CSUM
                | TUN_F_TSO4
                | TUN_F_TSO6
                | TUN_F_TSO_ECN
                | TUN_F_UFO
                | TUN_F_USO4
                | TUN_F_USO6
        );
    }

    #[test]
    fn offload_bits_map_one_to_one() {
        let csum = bit(VIRTIO_NET_F_GUEST_CSUM);
        let cases = [
            (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
            (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
            (VIRTIO_NET_F_GUEST_USO4, TUN_F_USO4),
            (VIRTIO_NET_F_GUEST_USO6, TUN_F_USO6),
        ];
        for (f, t) in cases {
            assert_eq!(
                tap_offloads_for(csum | bit(f)),
                TUN_F_CSUM | t,
                "feature {f}"
            );
        }
        // ECN alone means nothing without TSO.
        assert_eq!(
            tap_offloads_for(csum | bit(VIRTIO_NET_F_GUEST_ECN)),
            TUN_F_CSUM
        );
        assert_eq!(
            tap_offloads_for(csum | bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_GUEST_ECN)),
            TUN_F_CSUM | TUN_F_TSO6 | TUN_F_TSO_ECN
        );
    }

    #[test]
    fn rx_max_frame_len_depends_on_gso_and_header() {
        let v1 = bit(VIRTIO_F_VERSION_1);
        assert_eq!(rx_max_frame_len(v1, 1500), 12 + 14 + 4 + 1500);
        assert_eq!(rx_max_frame_len(0, 1500), 10 + 14 + 4 + 1500);
        assert_eq!(rx_max_frame_len(0, 9000), 10 + 14 + 4 + 9000);
        let gso = v1 | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);
        assert_eq!(rx_max_frame_len(gso, 1500), 12 + 65550);
        assert_eq!(
            rx_max_frame_len(bit(VIRTIO_NET_F_GUEST_USO6), 1500),
            10 + 65550
        );
        assert_eq!(tx_max_frame_len(12), 65562);
        // Found by the vnet_hdr fuzz target: with GSO, an MTU above 65532 used to get 65550.
        assert_eq!(rx_max_frame_len(gso, 65535), 12 + 14 + 4 + 65535);
        assert_eq!(rx_max_frame_len(gso, 65532), 12 + 65550);
    }
}
