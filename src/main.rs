//! `dinotrain`: parse the command line, run, map errors to exit codes.

mod cli;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let command = cli
        .command
        .unwrap_or_else(|| Command::Train(cli::train::TrainArgs::parse_from(["train"])));
    match command {
        Command::Golden {
            fixture,
            result,
            device,
        } => {
            cli::verify::golden(&fixture, &result, &device)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(args) => {
            cli::train::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Scan { dir, max_pixels } => cli::scan::scan(&dir, max_pixels),
        Command::Embed(args) => cli::embed::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Knn(args) => cli::knn::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Export(args) => cli::export::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => cli::bench::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Verify { dir, device } => {
            let ok = cli::verify::verify(&dir, &device)?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn main() -> ExitCode {
    // The library reports warnings and notices through `log`: print them on stderr.
    cli::logger::install();
    // Released weights are downloaded on first use: show how far.
    cli::progress::install_download_progress();
    // Keep activation pages mapped between steps (the CPU step allocates per step).
    dinotrain::backend::cpu::tune_allocator();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, each said once: the library's errors print their source in their
/// own message (`path: No such file or directory`), so a cause the text already ends with is
/// not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let message = cause.to_string();
        if text.ends_with(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}
