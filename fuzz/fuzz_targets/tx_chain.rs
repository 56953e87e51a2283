#![no_main]
//! `tx_chain`: see `macvhost::testkit::fuzz::tx_chain` for the input format and the oracles.

libfuzzer_sys::fuzz_target!(|data: &[u8]| macvhost::testkit::fuzz::tx_chain(data));
