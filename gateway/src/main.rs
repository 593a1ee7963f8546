//! The `posgate` daemon; everything lives in the library so tests can run it.

fn main() -> std::process::ExitCode {
    posgate::cli::main()
}
