//! The virtio-net header and offload mapping. (Being written: see the datapath contract.)
