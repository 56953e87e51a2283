#![no_main]
//! `mcast_report`: see `macvhost::fuzzing::mcast_report` for the input format and the oracles.

libfuzzer_sys::fuzz_target!(|data: &[u8]| macvhost::fuzzing::mcast_report(data));
