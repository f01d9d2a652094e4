// Another global allocator than glibc's, to compare memory after a
// reconnect storm (docs/benchmarks.md, "Allocators"). Off by default.
#[cfg(all(feature = "mimalloc", feature = "jemalloc"))]
compile_error!("the `mimalloc` and `jemalloc` features each choose the allocator: enable one");

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    livecast::cli::main()
}
