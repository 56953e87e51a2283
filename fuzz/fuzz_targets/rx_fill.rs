#![no_main]
//! `rx_fill`: see `macvhost::testkit::fuzz::rx_fill` for the input format and the oracles.

libfuzzer_sys::fuzz_target!(|data: &[u8]| macvhost::testkit::fuzz::rx_fill(data));
