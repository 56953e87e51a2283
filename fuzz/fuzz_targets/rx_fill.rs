#![no_main]
//! `rx_fill`: see `macvhost::fuzzing::rx_fill` for the input format and the oracles.

libfuzzer_sys::fuzz_target!(|data: &[u8]| macvhost::fuzzing::rx_fill(data));
