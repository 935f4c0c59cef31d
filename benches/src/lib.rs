//! shoal-benches: criterion benchmarks of shoal's kernels, one module per op under
//! `benches/`. Not a default workspace member, so a plain `cargo build` or `cargo test` does
//! not fetch criterion; run with `cargo bench -p shoal-benches`.
//!
//! Benchmarks are not tests: they assert nothing and only measure.
