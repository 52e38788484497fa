//! `weft`: the command line for weftd and for policy files.

use std::process::ExitCode;

use clap::Parser;
use weft_node::cli::{self, Cli};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    cli::exit_quietly_on_broken_pipe();
    match cli::run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weft: {e:#}");
            ExitCode::FAILURE
        }
    }
}
