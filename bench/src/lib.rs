//! Benchmark programs used by the scripts in `bench/` (see `bench/README.md`), and what they
//! share: a minimal RFB client ([`rfb`]) and the VNC stream throughput harness ([`throughput`]).

pub mod rfb;
pub mod throughput;
