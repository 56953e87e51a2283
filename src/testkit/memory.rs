//! Test guest memory: a standard map with adjacent regions and a hole, any map of ranges, and
//! the read/write helpers setup and checks use (they panic on unmapped memory: a test bug).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::ring::Layout;

/// End of the first region of [`test_memory`] / start of the second (adjacent) one.
pub const REGION_SPLIT: u64 = 0x10_0000;
/// Start of the unmapped hole in [`test_memory`].
pub const HOLE_START: u64 = 0x20_0000;
/// Start of the third region of [`test_memory`], after the hole.
pub const HIGH_REGION: u64 = 0x40_0000;
/// First address tests should use for buffers (the rings live below it).
pub const DATA_BASE: u64 = 0x1_0000;

/// Guest memory `[0, 1 MiB) [1 MiB, 2 MiB)` (adjacent regions), a hole `[2 MiB, 4 MiB)`, and
/// `[4 MiB, 5 MiB)`. Queues go at 0, buffers from [`DATA_BASE`].
pub fn test_memory() -> GuestMemoryMmap {
    memory_of(&[
        (0, REGION_SPLIT as usize),
        (REGION_SPLIT, (HOLE_START - REGION_SPLIT) as usize),
        (HIGH_REGION, 0x10_0000),
    ])
}

/// Guest memory of the given `(start, len)` ranges.
pub fn memory_of(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
    let r: Vec<_> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    GuestMemoryMmap::from_ranges(&r).expect("test guest memory")
}

/// A recognisable frame: `hdr_len` header bytes (`0xh0, 0xh1...` pattern with `seed`) followed by
/// `payload_len` payload bytes. The header's `gso_type` byte is 0 (no segmentation), as in an
/// ordinary frame.
pub fn pattern_frame(hdr_len: usize, payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..hdr_len + payload_len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    if hdr_len > 1 {
        f[1] = 0;
    }
    f
}

/// Writes `bytes` at `addr` (test setup; panics on unmapped memory).
pub fn write_guest(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(addr))
        .expect("write test guest memory");
}

/// Reads `len` bytes at `addr` (test checks; panics on unmapped memory).
pub fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr))
        .expect("read test guest memory");
    v
}

/// A ready `Queue` with arbitrary ring addresses, not validated (for rings outside memory).
pub fn raw_queue(size: u16, desc_table: u64, avail: u64, used: u64) -> virtio_queue::Queue {
    Layout {
        size,
        desc: desc_table,
        avail,
        used,
    }
    .queue()
}

/// Guest memory and a 256-entry queue whose avail ring runs off the end of memory after slot
/// 125, with `next_avail` = 200 and `avail.idx` = 201: the index announces a chain whose ring
/// entry cannot be read.
pub fn queue_with_unreadable_avail_entry() -> (GuestMemoryMmap, virtio_queue::Queue) {
    use virtio_queue::QueueT;
    let mem = memory_of(&[(0, 0x2000), (0x1_0000, 0x1_0000)]);
    let mut q = raw_queue(256, 0, 0x1f00, 0x1_0000);
    q.set_next_avail(200);
    mem.write_obj(201u16.to_le(), GuestAddress(0x1f02))
        .expect("avail idx");
    (mem, q)
}
