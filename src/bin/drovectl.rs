// SPDX-License-Identifier: MIT OR Apache-2.0
//! drovectl: control running drove instances over D-Bus. Thin: parse the
//! command line, run the verb (drove::ctl), map its error to the exit code.

use std::process::ExitCode;

use clap::Parser;

use drove::ctl::{self, Cli};

fn main() -> ExitCode {
    drove::sys::exec::default_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version: clap prints them and exits 0.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // Usage errors keep clap's text and its exit code 2, with the
            // same "drovectl: " prefix as every other error.
            let text = e.render().to_string();
            eprint!(
                "drovectl: {}",
                text.strip_prefix("error: ").unwrap_or(&text)
            );
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("drovectl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(ctl::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = e.to_string();
            if !msg.is_empty() {
                eprintln!("drovectl: {msg}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
