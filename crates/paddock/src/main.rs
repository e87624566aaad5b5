//! The `paddock` command line. `main` only parses arguments and hands over to [`cli`].

mod backup;
mod chart;
mod cli;
mod disk_input;
mod move_vm;
mod operator;
mod package;
mod progress;
mod registry_flags;
mod serve;
mod upload;
mod vm;

fn main() -> std::process::ExitCode {
    cli::run()
}
