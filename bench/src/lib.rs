//! baton-bench: criterion benchmarks live in benches/.
