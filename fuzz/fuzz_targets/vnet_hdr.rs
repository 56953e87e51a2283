#![no_main]
//! `vnet_hdr`: see `macvhost::fuzzing::vnet_hdr` for the input format and the oracles.

libfuzzer_sys::fuzz_target!(|data: &[u8]| macvhost::fuzzing::vnet_hdr(data));
