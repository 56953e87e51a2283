#![no_main]
//! `vhost_user_msgs`: see `macvhost::testkit::fuzz::vhost_user_msgs` for the input format and the oracles.

libfuzzer_sys::fuzz_target!(|data: &[u8]| macvhost::testkit::fuzz::vhost_user_msgs(data));
