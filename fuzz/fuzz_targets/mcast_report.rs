#![no_main]
//! `mcast_report`: see `macvhost::testkit::fuzz::mcast_report` for the input format and the oracles.

libfuzzer_sys::fuzz_target!(|data: &[u8]| macvhost::testkit::fuzz::mcast_report(data));
