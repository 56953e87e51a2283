//! Seed inputs for every target, built with the same encoding the targets decode.
//!
//! `tests/fuzz_corpus.rs` writes them to `fuzz/corpus/<target>/seed-<name>` when
//! `MACVHOST_WRITE_SEEDS=1`, and otherwise checks that each seed is in the corpus.

use super::cursor::Enc;

/// Every seed as `(target, name, bytes)`.
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut v = Vec::new();
    for (n, b) in tx() {
        v.push(("tx_chain", n.to_string(), b));
    }
    for (n, b) in rx() {
        v.push(("rx_fill", n.to_string(), b));
    }
    for (n, b) in vnet() {
        v.push(("vnet_hdr", n.to_string(), b));
    }
    for (n, b) in vhost_user() {
        v.push(("vhost_user_msgs", n.to_string(), b));
    }
    for (n, b) in mcast() {
        v.push(("mcast_report", n.to_string(), b));
    }
    v
}

/// `mcast_report` seeds: every report kind of the parser's positive tests, as raw frames and as
/// built reports, plus churn at the cap with expiry and a clear.
fn mcast() -> Vec<(&'static str, Vec<u8>)> {
    use crate::datapath::mcast::frames::{self, Record};
    let (g4, g6) = (frames::v4(239, 1, 2, 3), frames::v6("ff02::1:ff12:3456"));
    // Op 0: a raw frame, whole, checksums as built.
    let raw = |e: &mut Enc, dt: u16, f: &[u8]| {
        e.u8(0)
            .u16(dt)
            .u16(f.len() as u16)
            .u16(0xffff)
            .u8(0)
            .bytes(f);
    };
    // Op 1: a built report (kind, vlan, records (type, group, sources)), no patch.
    let built = |e: &mut Enc, dt: u16, kind: u8, vlan: u8, recs: &[(u8, u8, u8)]| {
        e.u8(1).u16(dt).u8(kind).u8(vlan).u8(recs.len() as u8);
        for &(t, g, s) in recs {
            e.u8(t).u8(g).u8(s);
        }
        e.u16(0xffff).u8(0).u8(0);
    };
    let head = |cap: u8, age: u8, hold: u8| {
        let mut e = Enc::new();
        e.u8(cap).u8(age).u8(hold);
        e
    };
    let mut out = Vec::new();

    let mut e = head(8, 60, 30);
    raw(&mut e, 0, &frames::igmp_v2(0x12, g4, None));
    raw(&mut e, 10, &frames::igmp_v2(0x16, g4, Some(10)));
    raw(&mut e, 10, &frames::igmp_v2(0x17, g4, None));
    out.push(("raw-igmp-v1-v2", e.finish()));

    let mut e = head(8, 60, 30);
    let recs: Vec<Record> = (1..=6)
        .map(|t| Record::new(t, frames::v4(239, 0, 0, t), u16::from(t % 2)))
        .collect();
    raw(&mut e, 0, &frames::igmpv3_report(&recs, None));
    out.push(("raw-igmpv3-every-record-type", e.finish()));

    let mut e = head(8, 60, 30);
    raw(&mut e, 0, &frames::mld_v1(131, g6, None));
    raw(&mut e, 10, &frames::mld_v1(132, g6, None));
    let recs = [
        Record::new(4, g6, 0),
        Record::new(1, frames::v6("ff05::1:3"), 1),
        Record::new(3, frames::v6("ff0e::123"), 0),
    ];
    raw(&mut e, 10, &frames::mldv2_report(&recs, true, None));
    raw(&mut e, 10, &frames::mldv2_report(&recs, false, Some(5)));
    out.push(("raw-mld-v1-v2", e.finish()));

    let mut e = head(8, 60, 30);
    raw(
        &mut e,
        0,
        &crate::datapath::mcast::igmpv3_general_query(
            [2, 0, 0, 0, 0, 1],
            [0; 4],
            crate::datapath::mcast::QueryRound::Periodic,
        ),
    );
    raw(
        &mut e,
        0,
        &crate::datapath::mcast::mldv2_general_query(
            [2, 0, 0, 0, 0, 1],
            crate::datapath::mcast::QueryRound::Periodic,
        ),
    );
    raw(&mut e, 0, &frames::unicast_udp(64));
    out.push(("raw-queries-and-unicast", e.finish()));

    // A report longer than the prefix: Incomplete, then the whole of it.
    let mut e = head(8, 60, 30);
    let recs: Vec<Record> = (0..100u16)
        .map(|i| Record::new(2, frames::v6(&format!("ff05::{i:x}")), 0))
        .collect();
    let long = frames::mldv2_report(&recs, true, None);
    e.u8(0)
        .u16(0)
        .u16(long.len() as u16)
        .u16(1500)
        .u8(0)
        .bytes(&long);
    out.push(("raw-mldv2-longer-than-prefix", e.finish()));

    // Built reports: joins past a cap of 3, shared MACs, leaves, expiry, clear.
    let mut e = head(3, 20, 5);
    built(
        &mut e,
        0,
        2,
        0,
        &[(4, 0, 0), (4, 8, 0), (2, 1, 1), (4, 2, 0)],
    );
    built(&mut e, 100, 5, 7, &[(4, 3, 0), (1, 4, 2)]);
    built(&mut e, 100, 1, 0, &[(0, 8, 0)]);
    e.u8(2).u16(1000);
    built(&mut e, 100, 3, 0, &[(0, 5, 0)]);
    e.u8(2).u16(3000);
    built(
        &mut e,
        100,
        6,
        0,
        &[(3, 5, 0), (5, 6, 1), (6, 7, 1), (7, 9, 0)],
    );
    e.u8(3).u16(10);
    out.push(("built-cap-churn-expiry-clear", e.finish()));

    // Built reports with one byte patched and checksums recomputed: malformed classes.
    let mut e = head(4, 60, 30);
    for (kind, at, value) in [
        (2u8, 47u16, 0xffu8),
        (5, 62, 0x20),
        (0, 14, 0x4f),
        (6, 20, 0),
    ] {
        e.u8(1).u16(1).u8(kind).u8(0).u8(1).u8(4).u8(1).u8(1);
        e.u16(at).u8(value).u8(1);
    }
    out.push(("built-patched-headers", e.finish()));
    out
}

/// An address selector of the virtqueue targets (`vq::addr`).
#[derive(Debug, Clone, Copy)]
pub enum A {
    /// Buffers in the first region (from 0x2000).
    Data(u16),
    /// Around the boundary of the two adjacent regions (from 0xf000).
    Split(u16),
    /// Running into the hole (from 0x1f000).
    Hole(u16),
    /// The third region.
    High(u16),
    /// Inside the rings.
    Ring(u16),
    /// Anything.
    Raw(u64),
}

/// Encoder for the `tx_chain` / `rx_fill` ops.
#[derive(Debug, Default)]
pub struct Vq(pub Enc);

impl Vq {
    fn addr(&mut self, a: A) {
        match a {
            A::Data(o) => self.0.u8(0).u16(o),
            A::Split(o) => self.0.u8(1).u16(o),
            A::Hole(o) => self.0.u8(2).u16(o),
            A::High(o) => self.0.u8(3).u16(o),
            A::Ring(o) => self.0.u8(4).u16(o),
            A::Raw(x) => self.0.u8(7).u16(0).u64(x),
        };
    }

    fn len(&mut self, l: u32) {
        self.0.u8(3).u32(l);
    }

    /// Op 0 `n` times: one-descriptor chains of `len` bytes with flag byte `flags`, from
    /// `A::Data(0)` every `stride` bytes.
    pub fn chains(&mut self, n: u16, stride: u16, len: u32, flags: u8) -> &mut Self {
        for i in 0..n {
            self.chain(&[(A::Data(i * stride), len, flags)]);
        }
        self
    }

    /// Op 0: a chain of `(addr, len, flags)` (flags: bit 1 flips direction, bit 2 INDIRECT).
    pub fn chain(&mut self, descs: &[(A, u32, u8)]) -> &mut Self {
        self.0.u8(0).u8(descs.len() as u8 - 1);
        for &(a, l, f) in descs {
            self.addr(a);
            self.len(l);
            self.0.u8(f);
        }
        self
    }

    /// Op 1: a raw descriptor (`next` below 0x8000 is taken modulo the queue size, else raw).
    pub fn desc(&mut self, index: u16, a: A, l: u32, flags: u16, next: u16) -> &mut Self {
        self.0.u8(1).u16(index);
        self.addr(a);
        self.len(l);
        self.0.u8(0x80).u16(flags).u16(next);
        self
    }

    /// Op 2: publish `head` (below 0x8000: modulo the queue size; else raw).
    pub fn publish(&mut self, head: u16) -> &mut Self {
        self.0.u8(2).u16(head);
        self
    }

    /// Op 3: move `avail.idx` forward by `d` (< 128).
    pub fn avail_ahead(&mut self, d: u8) -> &mut Self {
        self.0.u8(3).u8(d & 0x7f);
        self
    }

    /// Op 4: an indirect chain: table at `table`, entries, `len_override` for the indirect
    /// descriptor's length.
    pub fn indirect(
        &mut self,
        table: A,
        descs: &[(A, u32, u8)],
        len_override: Option<u32>,
    ) -> &mut Self {
        self.0.u8(4);
        self.addr(table);
        self.0.u8(descs.len() as u8);
        for &(a, l, f) in descs {
            self.addr(a);
            self.len(l);
            self.0.u8(f);
        }
        match len_override {
            None => self.0.u8(0),
            Some(l) => {
                self.0.u8(1);
                self.len(l);
                &mut self.0
            }
        };
        self
    }

    /// Op 5: the next host call fails with errno number `i` of the table (EAGAIN, EINTR, EIO,
    /// EINVAL, ENOBUFS, EFAULT, EMSGSIZE, EBADFD).
    pub fn fault(&mut self, i: u8) -> &mut Self {
        self.0.u8(5).u8(i);
        self
    }

    /// Op 6: run the datapath once.
    pub fn run(&mut self) -> &mut Self {
        self.0.u8(6);
        self
    }

    /// Op 7: set `used_event`.
    pub fn used_event(&mut self, v: u16) -> &mut Self {
        self.0.u8(7).u16(v);
        self
    }

    /// Op 9 (RX): inject a host frame of `n` bytes (< 65536).
    pub fn inject(&mut self, n: u16) -> &mut Self {
        self.0.u8(9).u8(1).u16(n).u8(0);
        self
    }

    /// The encoded fuzz input.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.finish()
    }
}

/// A `tx_chain` input header: queue size `1 << log2`, placement, options, budget.
fn tx_head(log2: u8, place: u8, opt: u8, budget: u8) -> Vq {
    let mut v = Vq::default();
    v.0.u8(log2 | (place << 4)).u8(opt).u8(budget);
    v
}

/// A `rx_fill` input header.
fn rx_head(log2: u8, place: u8, opt: u8, mtu: u16, budget: u8) -> Vq {
    let mut v = Vq::default();
    v.0.u8(log2 | (place << 4)).u8(opt).u16(mtu).u8(budget);
    v
}

/// TX flag bytes: device-readable, device-writable.
const RO: u8 = 0;
const RW: u8 = 2;
/// RX flag bytes (the RX target flips WRITE, so 0 is device-writable there).
const RXW: u8 = 0;
const RXR: u8 = 2;

fn tx() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mut v = tx_head(4, 0, 0, 64);
    v.chain(&[(A::Data(0), 72, RO)]).run();
    out.push(("one-frame", v.bytes()));

    let mut v = tx_head(4, 1, 1, 64);
    v.chain(&[
        (A::Data(0x100), 12, RO),
        (A::Split(0xf00), 0x200, RO),
        (A::High(0), 100, RO),
    ])
    .chain(&[(A::Data(0x2000), 0, RO), (A::Data(0x3000), 60, RO)])
    .used_event(0)
    .run()
    .chain(&[(A::Data(0x4000), 1514, RO)])
    .run();
    out.push(("multi-desc-event-idx-split-region", v.bytes()));

    let mut v = tx_head(3, 2, 0, 64);
    v.chain(&[(A::Data(0), 72, RW)])
        .chain(&[(A::Data(0), 8, RO)])
        .chain(&[(A::Data(0), 65563, RO)])
        .chain(&[(A::Hole(0xf00), 0x400, RO)])
        .chain(&[(A::Raw(0xdead_0000_0000), 64, RO)])
        .publish(0x8064)
        .run();
    out.push(("bad-chains", v.bytes()));

    let mut v = tx_head(3, 0, 0, 64);
    // A loop (0 → 1 → 0) and a next out of range.
    v.desc(0, A::Data(0), 40, 1, 1)
        .desc(1, A::Data(0x100), 40, 1, 0)
        .publish(0)
        .desc(2, A::Data(0x200), 40, 1, 0x8063)
        .publish(2)
        .run();
    out.push(("loop-and-next-out-of-range", v.bytes()));

    let mut v = tx_head(4, 0, 0, 64);
    v.indirect(
        A::High(0x100),
        &[(A::Data(0), 12, RO), (A::Data(0x400), 100, RO)],
        None,
    )
    .indirect(A::High(0x800), &[(A::Data(0), 72, RO)], Some(17))
    .indirect(A::Hole(0x1000), &[], Some(64))
    .run();
    out.push(("indirect", v.bytes()));

    let mut v = tx_head(4, 0, 0, 64);
    v.fault(0)
        .chain(&[(A::Data(0), 72, RO)])
        .chain(&[(A::Data(0x100), 72, RO)])
        .run()
        .run()
        .fault(2)
        .fault(1)
        .chain(&[(A::Data(0x200), 72, RO)])
        .chain(&[(A::Data(0x300), 72, RO)])
        .run()
        .fault(3)
        .fault(7)
        .run();
    out.push(("host-faults", v.bytes()));

    let mut v = tx_head(4, 0, 1, 64);
    v.chain(&[(A::Data(0), 72, RO)]).avail_ahead(40).run();
    out.push(("avail-index-too-far", v.bytes()));

    for (name, place) in [("used-ring-in-hole", 3u8), ("avail-ring-in-hole", 4)] {
        let mut v = tx_head(4, place, 0, 64);
        v.chains(12, 0x100, 72, RO);
        v.run();
        out.push((name, v.bytes()));
    }

    let mut v = tx_head(1, 0, 1, 1);
    for i in 0..6u16 {
        v.chain(&[(A::Data(i * 0x80), 60, RO)]).run();
    }
    v.run().run();
    out.push(("budget-1-size-2-wrap", v.bytes()));

    let mut v = tx_head(4, 0, 2, 64);
    v.chain(&[(A::Data(0), 10, RO), (A::Data(0x40), 50, RO)])
        .run();
    out.push(("legacy-header", v.bytes()));

    let mut v = tx_head(4, 0, 0, 64);
    v.chain(&[(A::Ring(0), 72, RO)])
        .chain(&[(A::Ring(0x200), 64, RO)])
        .run();
    out.push(("buffer-in-rings", v.bytes()));
    out
}

fn rx() -> Vec<(&'static str, Vec<u8>)> {
    // opt: bit 0 EVENT_IDX, bit 1 MRG_RXBUF, bit 2 VERSION_1, bit 3 GSO.
    let mut out = Vec::new();
    let mut v = rx_head(4, 0, 4, 1500, 64);
    v.chains(4, 0x800, 2048, RXW);
    v.inject(60).inject(1526).inject(12).run();
    out.push(("no-mrg", v.bytes()));

    let mut v = rx_head(5, 0, 6, 1500, 64);
    v.chains(8, 0x200, 512, RXW);
    v.inject(1526).inject(60).run().run();
    out.push(("mrg-small-buffers", v.bytes()));

    let mut v = rx_head(5, 0, 14, 1500, 64);
    v.chains(16, 0x1000, 4096, RXW);
    v.inject(65535).run();
    v.chain(&[(A::High(0), 4096, RXW)]).run();
    out.push(("mrg-gso-waits-for-capacity", v.bytes()));

    let mut v = rx_head(4, 0, 7, 1500, 64);
    v.inject(100).run().used_event(0);
    v.chain(&[(A::Data(0), 2048, RXW)]).run().run();
    out.push(("event-idx-no-buffers", v.bytes()));

    let mut v = rx_head(4, 0, 6, 1500, 64);
    v.chain(&[(A::Data(0), 2048, RXR)])
        .chain(&[(A::Data(0x1000), 8, RXW)])
        .chain(&[(A::Hole(0xf00), 0x400, RXW)])
        .chain(&[(A::Data(0x2000), 1024, RXW), (A::Data(0x3000), 1024, RXW)])
        .chain(&[(A::Data(0x4000), 2048, RXW)])
        .publish(0x80c8)
        .inject(1000)
        .inject(1500)
        .run();
    out.push(("dead-chains-mixed", v.bytes()));

    let mut v = rx_head(4, 0, 6, 1500, 64);
    v.chains(4, 0x800, 2048, RXW);
    v.inject(200)
        .inject(200)
        .fault(5)
        .run()
        .fault(2)
        .run()
        .fault(1)
        .run()
        .fault(0)
        .run()
        .run();
    out.push(("host-faults", v.bytes()));

    let mut v = rx_head(4, 0, 0, 1500, 64);
    v.chain(&[(A::Data(0), 10, RXW), (A::Data(0x100), 200, RXW)])
        .inject(100)
        .inject(9)
        .run();
    out.push(("legacy-header-split", v.bytes()));

    let mut v = rx_head(4, 0, 4, 9000, 64);
    v.chain(&[(A::Data(0), 2048, RXW)])
        .inject(9000)
        .inject(60)
        .run()
        .run();
    out.push(("frame-bigger-than-buffer", v.bytes()));

    for (name, place) in [
        ("rings-split-region", 1u8),
        ("used-ring-in-hole", 3),
        ("avail-ring-in-hole", 4),
    ] {
        let mut v = rx_head(4, place, 6, 1500, 64);
        v.chains(10, 0x100, 256, RXW);
        v.inject(300).inject(600).run();
        out.push((name, v.bytes()));
    }

    let mut v = rx_head(3, 0, 6, 1500, 64);
    v.chain(&[(A::Data(0), 2048, RXW)]);
    v.publish(0).inject(100).inject(100).run();
    out.push(("duplicate-head", v.bytes()));

    let mut v = rx_head(4, 0, 6, 1500, 64);
    v.indirect(
        A::High(0),
        &[(A::Data(0), 12, RXW), (A::Data(0x100), 2000, RXW)],
        None,
    )
    .inject(1000)
    .run();
    out.push(("indirect", v.bytes()));

    let mut v = rx_head(2, 0, 6, 1500, 64);
    v.chains(4, 0x100, 256, RXW);
    // The whole ring is posted but holds less than max_frame_len: read into what there is.
    v.inject(500).run();
    out.push(("whole-ring-smaller-than-max-frame", v.bytes()));

    let mut v = rx_head(4, 0, 6, 1500, 1);
    v.chains(6, 0x800, 2048, RXW);
    v.inject(100).inject(100).inject(100).run().run().run();
    out.push(("budget-1", v.bytes()));
    out
}

fn vnet() -> Vec<(&'static str, Vec<u8>)> {
    let feat = |bits: &[u32]| bits.iter().fold(0u64, |a, b| a | (1u64 << b));
    type Case<'a> = (&'a str, u64, u16, u8, u16, &'a [u8]);
    let cases: [Case<'_>; 6] = [
        ("none", 0, 1500, 0, 1, &[10, 2]),
        (
            "v1-mrg-csum-tso",
            feat(&[32, 15, 1, 7, 8, 9]),
            1500,
            0x0f,
            2,
            &[5, 5, 2],
        ),
        ("tso-without-csum", feat(&[7, 8, 10]), 9000, 0x1f, 4, &[12]),
        (
            "all",
            u64::MAX,
            1500,
            0x7f,
            256,
            &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        ),
        ("legacy-jumbo", feat(&[1]), 9000, 0x01, 1, &[3, 0, 9]),
        ("uso", feat(&[32, 1, 54, 55]), 1500, 0x61, 1, &[11, 1]),
    ];
    cases
        .iter()
        .map(|&(name, f, mtu, tun, pairs, segs)| {
            let mut e = Enc::new();
            e.u64(f).u16(mtu).u8(tun).u16(pairs);
            e.bytes(&[
                0x01, 0x04, 0x36, 0x00, 0xa8, 0x05, 0x22, 0x00, 0x10, 0x00, 0x01, 0x00,
            ]);
            e.u8(segs.len() as u8);
            for &s in segs {
                e.u8(s);
            }
            e.u8(10).u8(2).u8(11);
            (name, e.finish())
        })
        .collect()
}

/// Encoder for `vhost_user_msgs` ops.
#[derive(Debug, Default)]
pub struct Vu(pub Enc);

impl Vu {
    fn op(&mut self, op: u8) -> &mut Enc {
        self.0.u8(op)
    }

    /// SET_OWNER, GET_FEATURES, SET_FEATURES(all offered), GET/SET_PROTOCOL_FEATURES,
    /// SET_MEM_TABLE (one region over the whole memfd), then every vring of `nq`: NUM 256,
    /// ADDR, BASE 0, KICK, CALL, ENABLE.
    pub fn handshake(&mut self, nq: u8) -> &mut Self {
        self.op(5);
        self.op(1);
        self.op(2).u8(0);
        self.op(3);
        self.op(4).u8(0);
        self.op(7).u8(0).u8(0).u8(1);
        for i in 0..nq {
            self.op(10).u8(i).u8(8);
            self.op(11).u8(i).u8(0);
            self.op(12).u8(i).u16(0);
            self.op(14).u8(0).u8(i).u8(0);
            self.op(14).u8(1).u8(i).u8(0);
            self.op(17).u8(i).u8(0);
        }
        self
    }

    /// Posts a one-descriptor chain in vring `q`: buffer `slot` (4 KiB each), `len`, flags.
    pub fn post(&mut self, q: u8, slot: u8, len: u16, write: bool) -> &mut Self {
        self.op(20)
            .u8(q)
            .u8(0)
            .u8(1)
            .u8(slot)
            .u8(1)
            .u16(len)
            .u8(if write { 2 } else { 0 });
        self
    }

    /// Op 22: signal vring `q`'s kick eventfd.
    pub fn kick(&mut self, q: u8) -> &mut Self {
        self.op(22).u8(q);
        self
    }

    /// Op 23: inject a host frame of `len` bytes into queue pair `pair`'s fake host queue.
    pub fn inject(&mut self, pair: u8, len: u16) -> &mut Self {
        self.op(23).u8(pair).u8(1).u16(len);
        self
    }

    /// A raw message.
    pub fn raw(
        &mut self,
        request: u8,
        flags_mode: u8,
        payload: &[u8],
        size_lies: Option<u16>,
        nfds: u8,
    ) -> &mut Self {
        let e = self.op(0);
        e.u8(request)
            .u8(flags_mode)
            .u8(payload.len() as u8)
            .bytes(payload);
        match size_lies {
            None => e.u8(0),
            Some(s) => e.u8(1).u16(s),
        };
        e.u8(nfds);
        self
    }

    /// The encoded fuzz input.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.finish()
    }
}

fn vu_head(cfg: u8, offloads: u8, mtu: u16) -> Vu {
    let mut v = Vu::default();
    v.0.u8(cfg).u8(offloads).u16(mtu);
    v
}

fn vhost_user() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mut v = vu_head(8, 0x1f, 1500);
    v.handshake(2);
    out.push(("handshake", v.bytes()));

    let mut v = vu_head(8, 0x1f, 1500);
    v.handshake(2)
        .post(1, 0, 100, false)
        .post(1, 1, 1526, false)
        .kick(1);
    out.push(("handshake-tx", v.bytes()));

    let mut v = vu_head(8, 0x01, 1500);
    v.handshake(2)
        .inject(0, 200)
        .post(0, 2, 2048, true)
        .post(0, 3, 2048, true)
        .kick(0)
        .inject(0, 1526);
    out.push(("handshake-rx", v.bytes()));

    let mut v = vu_head(9, 0x1f, 9000);
    v.handshake(4)
        .post(3, 0, 100, false)
        .kick(3)
        .inject(1, 100)
        .post(2, 1, 4096, true)
        .kick(2);
    out.push(("two-pairs", v.bytes()));

    let mut v = vu_head(8, 0, 1500);
    v.raw(5, 0, &[], None, 0)
        .raw(1, 1, &[], None, 0)
        .raw(2, 1, &[0xff; 8], None, 1)
        .raw(9, 1, &[0; 10], None, 0)
        .raw(47, 3, &[1, 2, 3], Some(4000), 0)
        .raw(5, 1, &[0; 40], None, 0);
    out.push(("raw-garbage", v.bytes()));

    let mut v = vu_head(8, 0, 1500);
    // Kick and addresses before any memory table, then a table with the wrong fd count.
    v.op(5);
    v.op(14).u8(0).u8(0).u8(0);
    v.op(11).u8(0).u8(0);
    v.op(7).u8(1).u8(0).u8(0).u8(0);
    v.op(7).u8(0).u8(0).u8(3);
    v.op(10).u8(0).u8(0);
    v.op(10).u8(1).u8(11);
    v.op(10).u8(0x80).u32(7).u8(0x80).u32(3);
    out.push(("out-of-order-and-bad-values", v.bytes()));

    let mut v = vu_head(8, 0x1f, 1500);
    v.handshake(2);
    // Memory churn: ADD_MEM_REG / REM_MEM_REG / a new table, with traffic.
    v.post(1, 0, 100, false).kick(1);
    v.op(8).u8(1).u8(1);
    v.op(9).u8(1).u8(1);
    v.op(7).u8(1).u8(1).u8(0).u8(1).u8(1).u8(1);
    v.post(1, 1, 100, false).kick(1);
    v.op(24).u8(1);
    v.op(13).u8(0);
    v.op(13).u8(1);
    out.push(("memory-churn-and-reset", v.bytes()));

    let mut v = vu_head(8, 0x1f, 1500);
    v.handshake(2);
    v.op(18).u8(0).u8(0).u8(12).u8(0).bytes(&[0; 12]);
    v.op(19).u8(1).u8(0).u8(6).u8(0).bytes(&[1, 2, 3, 4, 5, 6]);
    v.op(24).u8(3).u8(0x0f);
    v.op(24).u8(4);
    v.op(25);
    v.op(24).u8(5).u64(0x1000).u64(0);
    v.op(24).u8(6);
    out.push(("config-status-backend-req-log-inflight", v.bytes()));
    out
}
