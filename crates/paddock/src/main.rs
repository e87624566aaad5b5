//! The `paddock` command line. `main` only parses arguments and hands over to [`cli`].

mod cli;

fn main() -> std::process::ExitCode {
    cli::run()
}
