//! baton-perf: end-to-end load generator. Placeholder binary until the perf issue lands.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    eprintln!("baton-perf: the load generator is not built yet (see the perf issue)");
    std::process::exit(2);
}
