//! The real `posgate` command line, built inside this package so that black-box tests can start it
//! as a separate process (`env!("CARGO_BIN_EXE_posgate-under-test")`) and kill it hard.

fn main() -> std::process::ExitCode {
    posgate::cli::main()
}
