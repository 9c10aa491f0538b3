//! `kmeshctl`: the operator's compiler, offline. `kmeshctl compile` reads Kubernetes and Istio YAML
//! (files or directories) and prints what the node would get: a human summary, the full snapshot as
//! JSON, or the exact bytes the agent loads (`-o binary > s.bin; kmesh-agent --snapshot-file s.bin`).
//! Exits non-zero when an object was rejected; unenforced features are warnings.
use std::{io::Write as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use kmesh_operator::{
    Error, Result,
    compile::{CompileOptions, Compiled, compile},
    diagnostics::{Diagnostic, Severity},
    dir_source::load,
    render::{json, summary},
};
use kmesh_snapshot::Snapshot;

#[derive(Parser)]
#[command(name = "kmeshctl", version, about = "kmesh-rs command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile Kubernetes and Istio YAML into one node's snapshot, as the operator would.
    Compile {
        /// A YAML file or a directory of them (read recursively); repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// The node whose snapshot to produce.
        #[arg(long)]
        node: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Summary)]
        output: Output,
        /// The generation stamped on the snapshot.
        #[arg(long, default_value_t = 1)]
        generation: u64,
        /// Namespace of objects that name none (as kubectl apply).
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Istio's root namespace.
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Summary,
    Json,
    Binary,
}

fn main() -> ExitCode {
    let Command::Compile {
        files,
        node,
        output,
        generation,
        namespace,
        root_namespace,
    } = Cli::parse().command;
    let (inputs, diagnostics) = match load(&files, &namespace) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("kmeshctl: {e}");
            return ExitCode::from(2);
        }
    };
    let options = CompileOptions {
        root_namespace,
        ..Default::default()
    };
    let mut compiled = compile(&inputs, std::slice::from_ref(&node), generation, &options);
    compiled.diagnostics.extend(diagnostics);
    compiled.diagnostics.sort();
    let Some(snapshot) = compiled.snapshots.get(&node) else {
        // Only a snapshot over the configured capacity is withheld; the diagnostics say why.
        print_diagnostics(&compiled.diagnostics);
        eprintln!("kmeshctl: no snapshot for node {node}");
        return ExitCode::FAILURE;
    };
    if let Err(e) = write(output, snapshot, &compiled) {
        eprintln!("kmeshctl: {e}");
        return ExitCode::from(2);
    }
    let rejected = compiled
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Rejected)
        .count();
    if rejected > 0 {
        eprintln!("kmeshctl: {rejected} object(s) or field(s) rejected; see above");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Writes the snapshot to standard output as `output` asks; the diagnostics go to standard error
/// (the summary holds them).
fn write(output: Output, snapshot: &Snapshot, compiled: &Compiled) -> Result<()> {
    let text = match output {
        Output::Summary => summary(snapshot, compiled).into_bytes(),
        Output::Json => {
            print_diagnostics(&compiled.diagnostics);
            let mut text = serde_json::to_string_pretty(&json(snapshot, compiled))?;
            text.push('\n');
            text.into_bytes()
        }
        Output::Binary => {
            print_diagnostics(&compiled.diagnostics);
            snapshot.encode()?
        }
    };
    std::io::stdout().write_all(&text).map_err(Error::Output)
}

fn print_diagnostics(diagnostics: &[Diagnostic]) {
    for d in diagnostics {
        eprintln!("{d}");
    }
}
