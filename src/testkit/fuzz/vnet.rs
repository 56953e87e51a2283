//! `vnet_hdr`: the header and feature helpers of `datapath::vnet` (and the iovec helpers that
//! place `num_buffers`) for any feature set.
//!
//! # Input
//! `features` (u64), `mtu` (u16), `tun_offloads` (u8, what a tap accepted), `queue_pairs` (u16),
//! 12 header bytes, then segment lengths (u8 each, up to 16) and an offset/length for the iovec
//! checks.
//!
//! # Oracles
//! - Header length is 12 exactly with VERSION_1 or MRG_RXBUF, else 10; `TxOptions`,
//!   `RxOptions` and the worker's `PairSettings` agree with the helpers.
//! - `tap_offloads_for`: only known `TUN_F_*` bits; checksum offload iff GUEST_CSUM; each
//!   segmentation bit iff its guest feature *and* GUEST_CSUM (never TSO/UFO/USO without CSUM);
//!   ECN only with TSO.
//! - `rx_max_frame_len`: room for the header, an Ethernet header, a VLAN tag and an MTU-sized
//!   payload; at least header + 65550 whenever the tap may deliver segmentation-offloaded
//!   frames; exactly that when the guest acked any GSO feature and the MTU is not larger.
//! - Whatever a guest acks out of `offered_features(tun)`, the offloads asked of the tap are a
//!   subset of `tun`; VERSION_1/MRG_RXBUF are always offered; MQ iff more than one pair.
//! - `VirtioNetHdr` round-trips its 12 bytes; `num_buffers` is the little-endian u16 at 10.
//! - `IoVecBuf::write_at`/`read_at`/`truncate` over arbitrarily split segments behave like the
//!   same operations on one flat buffer (the header may span descriptors).

use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend};

use super::cursor::Cursor;
use crate::datapath::vnet::*;
use crate::datapath::{IoVecBuf, RxOptions, TxOptions};
use crate::testkit::{memory_of, read_guest};
use crate::vhost_user::backend::offered_features;
use crate::worker::PairSettings;

/// Runs one `vnet_hdr` input (see the module doc).
pub fn vnet_hdr(data: &[u8]) {
    let mut c = Cursor::new(data);
    let f = c.u64();
    let mtu = c.u16();
    let tun = u32::from(c.u8()) & 0x7f;
    let pairs = c.u16();
    let mut hdr_bytes = [0u8; 12];
    hdr_bytes.copy_from_slice(&{
        let mut v = c.bytes(12).to_vec();
        v.resize(12, 0);
        v
    });

    check_features(f, mtu, tun, pairs);
    check_header(&hdr_bytes);
    check_iovec(&mut c, &hdr_bytes);
}

fn check_features(f: u64, mtu: u16, tun: u32, pairs: u16) {
    let h = vnet_hdr_len(f);
    let v1 = has(f, VIRTIO_F_VERSION_1) || has(f, VIRTIO_NET_F_MRG_RXBUF);
    assert_eq!(
        h,
        if v1 {
            VNET_HDR_LEN_V1
        } else {
            VNET_HDR_LEN_LEGACY
        }
    );

    let off = tap_offloads_for(f);
    let known =
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO | TUN_F_USO4 | TUN_F_USO6;
    assert_eq!(off & !known, 0, "unknown TUN_F bits {off:#x}");
    let csum = has(f, VIRTIO_NET_F_GUEST_CSUM);
    assert_eq!(off & TUN_F_CSUM != 0, csum, "CSUM follows GUEST_CSUM");
    for (tun_bit, guest) in [
        (TUN_F_TSO4, VIRTIO_NET_F_GUEST_TSO4),
        (TUN_F_TSO6, VIRTIO_NET_F_GUEST_TSO6),
        (TUN_F_UFO, VIRTIO_NET_F_GUEST_UFO),
        (TUN_F_USO4, VIRTIO_NET_F_GUEST_USO4),
        (TUN_F_USO6, VIRTIO_NET_F_GUEST_USO6),
    ] {
        assert_eq!(
            off & tun_bit != 0,
            csum && has(f, guest),
            "TUN_F {tun_bit:#x} vs guest feature {guest} (features {f:#x})"
        );
    }
    let tso = off & (TUN_F_TSO4 | TUN_F_TSO6) != 0;
    assert_eq!(
        off & TUN_F_TSO_ECN != 0,
        tso && has(f, VIRTIO_NET_F_GUEST_ECN),
        "ECN only with TSO"
    );
    let seg = TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO | TUN_F_USO4 | TUN_F_USO6;
    if off & seg != 0 {
        assert_ne!(off & TUN_F_CSUM, 0, "segmentation offload without CSUM");
    }

    let mtu_us = usize::from(mtu);
    let rx = rx_max_frame_len(f, mtu_us);
    assert!(
        rx >= h + ETH_HLEN + VLAN_HLEN + mtu_us,
        "rx_max_frame_len {rx} has no room for an MTU {mtu} frame with a VLAN tag (features {f:#x})"
    );
    if off & seg != 0 {
        assert!(rx >= h + MAX_GSO_FRAME_LEN, "GSO frames would not fit");
    }
    if guest_gso_acked(f) && ETH_HLEN + VLAN_HLEN + mtu_us <= MAX_GSO_FRAME_LEN {
        assert_eq!(rx, h + MAX_GSO_FRAME_LEN);
    }
    if !guest_gso_acked(f) {
        assert_eq!(rx, h + ETH_HLEN + VLAN_HLEN + mtu_us);
    }
    assert_eq!(tx_max_frame_len(h), h + MAX_GSO_FRAME_LEN);

    let budget = usize::from(pairs);
    let ro = RxOptions::new(f, mtu_us, budget);
    assert_eq!(ro.hdr_len, h);
    assert_eq!(ro.mrg_rxbuf, has(f, VIRTIO_NET_F_MRG_RXBUF));
    assert_eq!(ro.max_frame_len, rx);
    assert_eq!(ro.budget, budget);
    assert_eq!(TxOptions::new(f, budget).hdr_len, h);
    let ps = PairSettings::from_features(f, mtu);
    assert_eq!(
        (ps.hdr_len, ps.mrg_rxbuf, ps.rx_max_frame_len),
        (ro.hdr_len, ro.mrg_rxbuf, ro.max_frame_len),
        "worker settings differ from RxOptions"
    );

    let offered = offered_features(tun, pairs);
    assert!(has(offered, VIRTIO_F_VERSION_1) && has(offered, VIRTIO_NET_F_MRG_RXBUF));
    assert_eq!(
        has(offered, VIRTIO_NET_F_MQ),
        pairs > 1,
        "MQ iff several pairs"
    );
    let acked = f & offered;
    let asked = tap_offloads_for(acked);
    assert_eq!(
        asked & !tun,
        0,
        "the tap would be asked for offloads {asked:#x} it did not accept ({tun:#x})"
    );
    for host in [
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_HOST_ECN,
    ] {
        if has(offered, host) {
            assert!(
                has(offered, VIRTIO_NET_F_CSUM),
                "HOST offload {host} without CSUM"
            );
        }
    }
}

fn check_header(bytes: &[u8; 12]) {
    let hdr = VirtioNetHdr::from_slice(bytes).expect("12 bytes make a header");
    assert_eq!(hdr.as_slice(), &bytes[..]);
    let nb: u16 = hdr.num_buffers.into();
    assert_eq!(
        nb,
        u16::from_le_bytes([bytes[NUM_BUFFERS_OFFSET], bytes[NUM_BUFFERS_OFFSET + 1]])
    );
    let hl: u16 = hdr.hdr_len.into();
    assert_eq!(hl, u16::from_le_bytes([bytes[2], bytes[3]]));
    assert_eq!((hdr.flags, hdr.gso_type), (bytes[0], bytes[1]));
}

fn check_iovec(c: &mut Cursor<'_>, hdr: &[u8; 12]) {
    let nseg = usize::from(c.u8() % 17);
    let lens: Vec<usize> = (0..nseg).map(|_| usize::from(c.u8() % 24)).collect();
    let total: usize = lens.iter().sum();
    let mem = memory_of(&[(0, 0x1000)]);
    // Segments 32 bytes apart so that writes past a segment would show.
    let starts: Vec<u64> = (0..nseg).map(|i| 32 * i as u64).collect();
    let before = read_guest(&mem, 0, 0x1000);
    let mut iov = IoVecBuf::with_capacity(nseg);
    for (i, &l) in lens.iter().enumerate() {
        iov.push(&mem.get_slice(GuestAddress(starts[i]), l).expect("slice"));
    }
    assert_eq!(iov.total_len(), total);
    assert_eq!(iov.len(), lens.iter().filter(|&&l| l > 0).count());

    let off = usize::from(c.u8() % 64);
    let n = usize::from(c.u8() % 16).min(hdr.len());
    let src = &hdr[..n];
    let wrote = iov.write_at(off, src);
    let want = total.saturating_sub(off).min(n);
    assert_eq!(wrote, want, "write_at({off}, {n}) over {lens:?}");
    // The flat view: the segments' bytes in order.
    let flat = |mem: &vm_memory::GuestMemoryMmap| -> Vec<u8> {
        lens.iter()
            .enumerate()
            .flat_map(|(i, &l)| read_guest(mem, starts[i], l))
            .collect()
    };
    let mut expect: Vec<u8> = lens
        .iter()
        .enumerate()
        .flat_map(|(i, &l)| before[starts[i] as usize..starts[i] as usize + l].to_vec())
        .collect();
    expect[off.min(total)..off.min(total) + want].copy_from_slice(&src[..want]);
    assert_eq!(flat(&mem), expect, "write_at landed in the wrong bytes");
    // Nothing outside the segments changed.
    let after = read_guest(&mem, 0, 0x1000);
    for (a, (x, y)) in before.iter().zip(&after).enumerate() {
        if x != y {
            let inside = lens
                .iter()
                .enumerate()
                .any(|(i, &l)| (starts[i] as usize..starts[i] as usize + l).contains(&a));
            assert!(inside, "write_at wrote byte {a} outside every segment");
        }
    }
    let mut back = vec![0u8; n];
    let read = iov.read_at(off, &mut back);
    assert_eq!(read, want);
    assert_eq!(&back[..want], &src[..want]);

    let cut = usize::from(c.u8() % 64);
    iov.truncate(cut);
    assert_eq!(iov.total_len(), cut.min(total), "truncate({cut})");
    let sum: usize = iov.as_iovecs().iter().map(|v| v.iov_len).sum();
    assert_eq!(
        sum,
        iov.total_len(),
        "iovec lengths vs total after truncate"
    );
}
