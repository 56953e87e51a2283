#![no_main]
//! `vnet_hdr`: see `macvhost::testkit::fuzz::vnet_hdr` for the input format and the oracles.

libfuzzer_sys::fuzz_target!(|data: &[u8]| macvhost::testkit::fuzz::vnet_hdr(data));
