//! The `gatehouse` command: parse the command line, run it, turn an error into an exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    gatehouse::cli::main()
}
