//! `vigilctl`: a thin command-line client of Vigil's admin REST API.
//!
//! Exit codes: 0 on success, 1 when a request or its input fails, 2 for usage errors.

mod apply;
mod cli;
mod client;
mod commands;
mod config;
mod kinds;
mod output;

use std::io::Write as _;
use std::process::ExitCode;

fn main() -> ExitCode {
    // clap prints help and usage errors itself, exiting 0 or 2.
    let parsed = cli::parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let env = config::Env::from_process();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(parsed, &env)) {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            // A closed pipe (`vigilctl ... | head`) is not a failure of the command.
            let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
