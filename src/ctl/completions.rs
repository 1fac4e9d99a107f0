//! `drovectl completions SHELL`: a completion script from the clap
//! definition, on stdout.

use clap::CommandFactory;

use super::{Cli, CtlError};

pub fn run(shell: clap_complete::Shell) -> Result<(), CtlError> {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "drovectl",
        &mut std::io::stdout(),
    );
    Ok(())
}
