//! Guest → host: one `writev` per frame. (Being written: see the datapath contract.)
