//! `posgate-sim`: the provider simulator, terminals, the demo and the benchmarks.

fn main() -> std::process::ExitCode {
    posgate_sim::cli::main()
}
