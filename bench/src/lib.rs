//! Benchmark programs used by the scripts in `bench/` (see `bench/README.md`).
