//! The real `posgate-sim` command line, built inside this package so that black-box tests can run
//! it as a process (`env!("CARGO_BIN_EXE_posgate-sim-under-test")`) and check its exit code.

fn main() -> std::process::ExitCode {
    posgate_sim::cli::main()
}
