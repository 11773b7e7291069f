//! openraft's runtime conformance suite against `GlommioRuntime`.
//!
//! `Suite::test_all` builds its runtimes with `AsyncRuntime::new` (a fresh glommio
//! `LocalExecutor` on this thread) and runs every check inside `block_on`, i.e. inside
//! `LocalExecutor::run`; it also runs the deterministic-RNG suite over the same runtime.

use baton_core::raft::GlommioRuntime;
use openraft_rt::testing::Suite;

#[test]
fn glommio_runtime_passes_openraft_suite() {
    Suite::<GlommioRuntime>::test_all();
}
