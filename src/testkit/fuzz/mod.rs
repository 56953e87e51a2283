//! Fuzz target bodies (feature `test-utils`), shared by `fuzz/` (cargo-fuzz, nightly) and the
//! corpus replay test `tests/fuzz_corpus.rs` (stable).
//!
//! Each target takes raw bytes, decodes them with a [`Cursor`] into a structured scenario (the
//! decoding never fails: missing bytes read as zero) and checks *oracles*, not just "no panic".
//! An oracle that fails panics with a message saying which one.
//!
//! - [`tx_chain`]: guest descriptor tables, chain heads, avail indices, ring placement over a
//!   two-region-plus-hole memory map, host faults → `process_tx` over a `FakeHostQueue`.
//! - [`rx_fill`]: the same for `process_rx` (MRG_RXBUF on and off), plus frames injected on the
//!   fake host queue.
//! - [`vnet_hdr`]: header length, offload mapping and frame-size helpers for any feature set.
//! - [`vhost_user_msgs`]: raw vhost-user message sequences (with memfd/eventfd attachments) into
//!   a real `VhostUserDaemon` serving `NetBackend<FakeHostQueue>`.
//! - [`mcast_report`]: guest IGMP/MLD reports (raw and built) into the report parser and the
//!   multicast membership table, against a model.
//! - [`hostile`]: a hostile frontend through the real socket path and the health probe after
//!   each connection (not a libFuzzer target: a seeded run, `tests/vu_hostile_fuzz.rs`).
//!
//! [`seeds`] builds the small seed corpora committed under `fuzz/corpus/`.

/// The guest memory both vhost-user frontends here ([`vhost_user_msgs`], [`hostile`]) hand the
/// daemon.
mod layout {
    /// One memfd of this size at guest address 0.
    pub(super) const MEM_SIZE: u64 = 1 << 20;
    /// Where the frontend pretends guest memory is in its own address space.
    pub(super) const VMM_BASE: u64 = 0x7f00_0000_0000;
    /// The rings of vring `q` start at `RINGS + q * RING_STRIDE` (guest physical; size 256 fits).
    pub(super) const RINGS: u64 = 0x1_0000;
    pub(super) const RING_STRIDE: u64 = 0x2000;
}

mod cursor;
pub mod hostile;
mod mcast;
mod rx;
pub mod seeds;
mod tx;
#[allow(unsafe_code)] // ignores SIGPIPE for the fuzzed frontend
mod vhost_user;
mod vnet;
mod vq;

pub use cursor::Cursor;
pub use mcast::mcast_report;
pub use rx::rx_fill;
pub use tx::tx_chain;
pub use vhost_user::vhost_user_msgs;
pub use vnet::vnet_hdr;
pub use vq::LEN_EDGES;

/// The fuzz target names, as used for `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/`.
pub const TARGETS: [&str; 5] = [
    "tx_chain",
    "rx_fill",
    "vnet_hdr",
    "vhost_user_msgs",
    "mcast_report",
];

/// True when `MACVHOST_FUZZ_TRACE` is set: the targets then print each datapath call's
/// pre-state and outcome to stderr (for minimising and explaining a crash).
pub fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MACVHOST_FUZZ_TRACE").is_some())
}

/// Runs the target called `name` on `data` (for the corpus replay). Panics on an unknown name.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "tx_chain" => tx_chain(data),
        "rx_fill" => rx_fill(data),
        "vnet_hdr" => vnet_hdr(data),
        "vhost_user_msgs" => vhost_user_msgs(data),
        "mcast_report" => mcast_report(data),
        other => panic!("no fuzz target called {other}"),
    }
}
