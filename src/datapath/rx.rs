//! Host → guest: one `readv` per frame. (Being written: see the datapath contract.)
