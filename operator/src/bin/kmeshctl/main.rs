//! `kmeshctl`: the kmesh-rs command line.
//!
//! `kmeshctl compile` is the operator's compiler, offline: it reads Kubernetes and Istio YAML (files
//! or directories) and prints what the node would get: a human summary, the full snapshot as JSON,
//! or the exact bytes the agent loads (`-o binary > s.bin; kmesh-agent --snapshot-file s.bin`). It
//! exits non-zero when an object was rejected; unenforced features are warnings.
//!
//! `version`, `dump` and `log-level` read or change a running agent through its admin listener
//! (`live.rs`, over `agent_client.rs`); they exit non-zero, with a message naming the address, when
//! the agent cannot be reached or refuses. `explain` says where a connection goes and whether it is
//! let in, from a live agent or offline from YAML (`explain.rs`). `completion` prints a shell
//! completion script.
mod agent_client;
mod explain;
mod live;

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use agent_client::ListenerAddr;
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use explain::{ExplainOutput, Origin};
use kmesh_operator::{
    Error, Result,
    compile::{CompileOptions, Compiled, compile},
    diagnostics::{Diagnostic, Severity},
    dir_source::load,
    render::{json, summary},
};
use kmesh_snapshot::{Snapshot, admin_contract::BPF_TABLES};
use live::DumpTarget;

/// The agent's default admin and metrics addresses (its `--admin-addr` and `--metrics-addr` ports).
const DEFAULT_AGENT: &str = "127.0.0.1:15200";
const DEFAULT_METRICS: &str = "127.0.0.1:15020";

/// How to reach an agent, for the help of the subcommands that do (a macro: `concat!` takes
/// literals only).
macro_rules! reaching_an_agent {
    () => {
        "Reaching an agent: its admin listener is on localhost:15200 of its node (--admin-addr). In a
cluster, forward it first, then use the default --agent 127.0.0.1:15200:
  kubectl -n kmesh-system port-forward pod/<agent pod> 15200
Its metrics are on its --metrics-addr (port 15020): forward 15020 too for `dump metrics`."
    };
}

/// A subcommand's after-help: its examples, then how to reach an agent.
macro_rules! agent_help {
    ($examples:literal) => {
        concat!("Examples:\n  ", $examples, "\n\n", reaching_an_agent!())
    };
}

#[derive(Parser)]
#[command(
    name = "kmeshctl",
    version,
    about = "kmesh-rs command line",
    after_help = reaching_an_agent!()
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile Kubernetes and Istio YAML into one node's snapshot, as the operator would.
    #[command(after_help = "\
Examples:
  kmeshctl compile -f cluster/ --node node-1
  kmeshctl compile -f cluster.yaml -f policies.yaml --node node-1 -o json
  kmeshctl compile -f cluster/ --node node-1 -o binary > s.bin   # for kmesh-agent --snapshot-file")]
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
    /// Print kmeshctl's version, and with --agent the agent's (and the layout of its maps).
    #[command(after_help = agent_help!(
        "kmeshctl version\n  kmeshctl version --agent 127.0.0.1:15200"
    ))]
    Version {
        /// The agent's admin address (HOST:PORT).
        #[arg(long, value_name = "ADDR")]
        agent: Option<ListenerAddr>,
    },
    /// Print what a running agent holds: its status and live snapshot, its authorization
    /// counters, its metrics, its live snapshot decoded, or a map as the kernel holds it.
    #[command(after_help = agent_help!(
        "kmeshctl dump snapshot\n  \
         kmeshctl dump authz --agent 127.0.0.1:15200\n  \
         kmeshctl dump metrics --metrics 127.0.0.1:15020\n  \
         kmeshctl dump config                        # the live snapshot, every table\n  \
         kmeshctl dump bpf --table routes            # the routes map's active slot"
    ))]
    Dump {
        #[arg(value_enum)]
        what: DumpTarget,
        /// For `dump bpf`: which map.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(BPF_TABLES),
              required_if_eq("what", "bpf"))]
        table: Option<String>,
        /// The agent's admin address (HOST:PORT; its --admin-addr).
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_AGENT)]
        agent: ListenerAddr,
        /// The agent's metrics address, for `dump metrics` (HOST:PORT; its --metrics-addr).
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_METRICS)]
        metrics: ListenerAddr,
    },
    /// Show where a connection from a pod goes (service, route, weights, endpoints) and the
    /// authorization verdict it gets, from a live agent or offline from YAML.
    #[command(after_help = agent_help!(
        "kmeshctl explain --from 10.244.1.20 --to 10.96.0.10:9080              # the local agent\n  \
         kmeshctl explain --from 10.244.1.20 --to 10.96.0.10:9080 -o json\n  \
         kmeshctl explain -f cluster/ --from default/productpage-v1-5d9 --to reviews:9080\n\n\
Live, the client must be a pod of the agent's node, and a destination on another node gets\n\
\"decided on the destination's node\". Offline (-f), the YAML is compiled for every node."
    ))]
    Explain {
        /// The client: a pod IP, or namespace/pod (offline only).
        #[arg(long, value_name = "POD")]
        from: String,
        /// The destination: IP:PORT, or HOST:PORT of a service (offline only).
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// Explain offline from this YAML (file or directory; repeatable) instead of an agent.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// The agent's admin address (HOST:PORT; its --admin-addr), when live.
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_AGENT, conflicts_with = "files")]
        agent: ListenerAddr,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = ExplainOutput::Text)]
        output: ExplainOutput,
        /// Offline: namespace of objects that name none.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Offline: Istio's root namespace.
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
    },
    /// Show a running agent's log filter, or change it until the next change of the
    /// KmeshConfig's logLevel (or a restart).
    #[command(after_help = agent_help!(
        "kmeshctl log-level                          # show it\n  \
         kmeshctl log-level debug                    # everything at debug\n  \
         kmeshctl log-level 'kmesh_agent=debug,info' # EnvFilter directives"
    ))]
    LogLevel {
        /// A level (off, error, warn, info, debug, trace) or EnvFilter directives; none: show it.
        level: Option<String>,
        /// The agent's admin address (HOST:PORT; its --admin-addr).
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_AGENT)]
        agent: ListenerAddr,
    },
    /// Print a shell completion script.
    #[command(after_help = "\
Examples:
  kmeshctl completion bash > /etc/bash_completion.d/kmeshctl
  kmeshctl completion zsh > \"${fpath[1]}/_kmeshctl\"
  kmeshctl completion fish > ~/.config/fish/completions/kmeshctl.fish")]
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Summary,
    Json,
    Binary,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Compile {
            files,
            node,
            output,
            generation,
            namespace,
            root_namespace,
        } => run_compile(&files, node, output, generation, &namespace, root_namespace),
        Command::Version { agent } => version(agent.as_ref()),
        Command::Dump {
            what,
            table,
            agent,
            metrics,
        } => print(live::dump(what, table.as_deref(), &agent, &metrics)),
        Command::Explain {
            from,
            to,
            files,
            agent,
            output,
            namespace,
            root_namespace,
        } => {
            let origin = if files.is_empty() {
                Origin::Live(&agent)
            } else {
                Origin::Offline {
                    files: &files,
                    namespace: &namespace,
                    root_namespace,
                }
            };
            print(explain::run(origin, &from, &to, output))
        }
        Command::LogLevel { level, agent } => print(live::log_level(&agent, level.as_deref())),
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "kmeshctl", &mut script);
            print(Ok::<_, live::LiveError>(script))
        }
    }
}

/// kmeshctl's version, then the agent's when asked.
fn version(agent: Option<&ListenerAddr>) -> ExitCode {
    let mine = format!("kmeshctl {}\n", env!("CARGO_PKG_VERSION")).into_bytes();
    if let Err(code) = emit(Ok::<_, live::LiveError>(mine)) {
        return code;
    }
    agent.map_or(ExitCode::SUCCESS, |agent| print(live::agent_version(agent)))
}

/// Prints a subcommand's output, or its error (exit code 1; 2 when standard output fails).
fn print<E: std::fmt::Display>(result: std::result::Result<Vec<u8>, E>) -> ExitCode {
    emit(result).err().unwrap_or(ExitCode::SUCCESS)
}

fn emit<E: std::fmt::Display>(
    result: std::result::Result<Vec<u8>, E>,
) -> std::result::Result<(), ExitCode> {
    let bytes = result.map_err(|e| {
        eprintln!("kmeshctl: {e}");
        ExitCode::FAILURE
    })?;
    std::io::stdout().write_all(&bytes).map_err(|e| {
        eprintln!("kmeshctl: {}", Error::Output(e));
        ExitCode::from(2)
    })
}

/// `kmeshctl compile`: exits 2 when the input cannot be read or the output written, 1 when an
/// object was rejected or no snapshot was produced.
fn run_compile(
    files: &[PathBuf],
    node: String,
    output: Output,
    generation: u64,
    namespace: &str,
    root_namespace: String,
) -> ExitCode {
    let (inputs, diagnostics) = match load(files, namespace) {
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
    let Some(snapshot) = compiled.snapshot(&node) else {
        // Only a snapshot over the configured capacity is withheld; the diagnostics say why.
        print_diagnostics(&compiled.diagnostics);
        eprintln!("kmeshctl: no snapshot for node {node}");
        return ExitCode::FAILURE;
    };
    if let Err(e) = write(output, &snapshot, &compiled) {
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _, error::ErrorKind};

    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("kmeshctl").chain(args.iter().copied()))
            .map(|cli| cli.command)
    }

    fn addr(text: &str) -> ListenerAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn dump_reads_the_default_addresses_unless_given() {
        let Ok(Command::Dump {
            what,
            agent,
            metrics,
            ..
        }) = parse(&["dump", "snapshot"])
        else {
            panic!("dump snapshot did not parse");
        };
        assert_eq!(what, DumpTarget::Snapshot);
        assert_eq!(
            (agent, metrics),
            (addr(DEFAULT_AGENT), addr(DEFAULT_METRICS))
        );
        let Ok(Command::Dump {
            what,
            agent,
            metrics,
            ..
        }) = parse(&[
            "dump",
            "metrics",
            "--agent",
            "10.0.0.1:1",
            "--metrics",
            "[::1]:2",
        ])
        else {
            panic!("dump metrics did not parse");
        };
        assert_eq!(what, DumpTarget::Metrics);
        assert_eq!((agent, metrics), (addr("10.0.0.1:1"), addr("[::1]:2")));
        assert!(matches!(
            parse(&["dump", "authz"]),
            Ok(Command::Dump {
                what: DumpTarget::Authz,
                ..
            })
        ));
    }

    #[test]
    fn bad_dump_arguments_are_usage_errors() {
        let missing = parse(&["dump"]).err().expect("dump needs what");
        assert_eq!(missing.kind(), ErrorKind::MissingRequiredArgument);
        let unknown = parse(&["dump", "maps"]).err().expect("no such dump");
        assert_eq!(unknown.kind(), ErrorKind::InvalidValue);
        let bad_addr = parse(&["dump", "snapshot", "--agent", "15200"])
            .err()
            .expect("a port alone is no address");
        assert_eq!(bad_addr.kind(), ErrorKind::ValueValidation);
        assert!(
            bad_addr.to_string().contains("expected HOST:PORT"),
            "{bad_addr}"
        );
    }

    #[test]
    fn log_level_shows_without_a_level_and_sets_with_one() {
        let Ok(Command::LogLevel { level, agent }) = parse(&["log-level"]) else {
            panic!("log-level did not parse");
        };
        assert_eq!((level, agent), (None, addr(DEFAULT_AGENT)));
        let Ok(Command::LogLevel { level, agent }) = parse(&[
            "log-level",
            "kmesh_agent=debug,info",
            "--agent",
            "localhost:9",
        ]) else {
            panic!("log-level LEVEL did not parse");
        };
        assert_eq!(level.as_deref(), Some("kmesh_agent=debug,info"));
        assert_eq!(agent, addr("localhost:9"));
    }

    #[test]
    fn dump_bpf_needs_a_known_table() {
        let Ok(Command::Dump { what, table, .. }) = parse(&["dump", "bpf", "--table", "routes"])
        else {
            panic!("dump bpf --table routes did not parse");
        };
        assert_eq!((what, table.as_deref()), (DumpTarget::Bpf, Some("routes")));
        let missing = parse(&["dump", "bpf"]).err().expect("bpf needs --table");
        assert_eq!(missing.kind(), ErrorKind::MissingRequiredArgument);
        let unknown = parse(&["dump", "bpf", "--table", "nat"])
            .err()
            .expect("no nat");
        assert_eq!(unknown.kind(), ErrorKind::InvalidValue);
    }

    #[test]
    fn explain_is_live_unless_given_yaml() {
        let Ok(Command::Explain {
            from,
            to,
            files,
            agent,
            output,
            ..
        }) = parse(&["explain", "--from", "10.244.1.5", "--to", "10.96.0.10:80"])
        else {
            panic!("explain did not parse");
        };
        assert_eq!(
            (from.as_str(), to.as_str()),
            ("10.244.1.5", "10.96.0.10:80")
        );
        assert!(files.is_empty());
        assert_eq!((agent, output), (addr(DEFAULT_AGENT), ExplainOutput::Text));
        let Ok(Command::Explain { files, output, .. }) = parse(&[
            "explain",
            "-f",
            "dir",
            "--from",
            "ns/pod",
            "--to",
            "reviews:9080",
            "-o",
            "json",
        ]) else {
            panic!("explain -f did not parse");
        };
        assert_eq!(
            (files, output),
            (vec![PathBuf::from("dir")], ExplainOutput::Json)
        );
        let both = parse(&[
            "explain",
            "-f",
            "dir",
            "--agent",
            "127.0.0.1:1",
            "--from",
            "a/b",
            "--to",
            "c:1",
        ]);
        assert_eq!(both.err().unwrap().kind(), ErrorKind::ArgumentConflict);
        let missing = parse(&["explain", "--from", "a/b"]).err().unwrap();
        assert_eq!(missing.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn version_asks_an_agent_only_when_given_one() {
        assert!(matches!(
            parse(&["version"]),
            Ok(Command::Version { agent: None })
        ));
        let Ok(Command::Version { agent }) = parse(&["version", "--agent", "127.0.0.1:15200"])
        else {
            panic!("version --agent did not parse");
        };
        assert_eq!(agent, Some(addr("127.0.0.1:15200")));
    }

    #[test]
    fn completion_takes_a_known_shell() {
        assert!(matches!(
            parse(&["completion", "zsh"]),
            Ok(Command::Completion {
                shell: clap_complete::Shell::Zsh
            })
        ));
        let unknown = parse(&["completion", "tcsh"]).err().expect("no tcsh");
        assert_eq!(unknown.kind(), ErrorKind::InvalidValue);
    }

    #[test]
    fn compile_keeps_its_arguments() {
        let Ok(Command::Compile {
            files,
            node,
            output,
            generation,
            namespace,
            root_namespace,
        }) = parse(&[
            "compile", "-f", "a.yaml", "-f", "dir", "--node", "n1", "-o", "json",
        ])
        else {
            panic!("compile did not parse");
        };
        assert_eq!(files, [PathBuf::from("a.yaml"), PathBuf::from("dir")]);
        assert_eq!((node.as_str(), generation), ("n1", 1));
        assert!(matches!(output, Output::Json));
        assert_eq!(
            (namespace.as_str(), root_namespace.as_str()),
            ("default", "istio-system")
        );
    }

    /// Every subcommand's help shows examples, and those that reach an agent say how.
    #[test]
    fn help_has_examples_and_the_port_forward() {
        let mut cli = Cli::command();
        for sub in [
            "compile",
            "version",
            "dump",
            "explain",
            "log-level",
            "completion",
        ] {
            let help = cli
                .find_subcommand_mut(sub)
                .unwrap()
                .render_long_help()
                .to_string();
            assert!(help.contains(&format!("kmeshctl {sub}")), "{sub}: {help}");
            let reaches_an_agent = matches!(sub, "version" | "dump" | "explain" | "log-level");
            assert_eq!(
                help.contains("kubectl -n kmesh-system port-forward pod/<agent pod> 15200"),
                reaches_an_agent,
                "{sub}: {help}"
            );
        }
    }
}
