//! The `posgate` daemon; everything lives in the library so tests can run it.

// jemalloc returns memory from reconnect churn to the system where glibc's allocator keeps it
// (docs/decisions/0001-broker.md: RSS growth over 20 reconnect cycles).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    posgate::cli::main()
}
