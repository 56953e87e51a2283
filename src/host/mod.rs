//! The host side: tap and macvtap queue fds. (Being written: see the host contract.)
