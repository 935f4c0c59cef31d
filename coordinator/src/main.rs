//! `shoal`: the command line of the coordinator.
//!
//! Subcommands print results on stdout and everything else (logs, progress) on stderr, so
//! `shoal run ... > out.txt` captures only the completion. Every error ends the process with
//! a non-zero status and one line saying what is wrong; nothing here panics on bad input.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "shoal", version, about = "Serve one large language model from a pool of machines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    security: SecurityArgs,
}

/// How this process talks to the rest of the cluster (every subcommand; see
/// `docs/security.md`).
#[derive(clap::Args, Debug)]
struct SecurityArgs {
    /// This node's cluster certificate directory from `shoal cert issue` (`ca.pem`,
    /// `node.pem`, `node.key`, `join-token`): all gRPC between cluster members uses mutual
    /// TLS against that CA and carries the join token.
    #[arg(long, global = true, env = "SHOAL_TLS_DIR", value_name = "DIR")]
    tls_dir: Option<std::path::PathBuf>,
    /// The cluster's join token (default: the `join-token` file of --tls-dir); requests
    /// without it are refused.
    #[arg(long, global = true, env = "SHOAL_JOIN_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    join_token: Option<String>,
    /// Allow plaintext gRPC beyond loopback addresses (anyone who can reach the port can
    /// then drive the worker).
    #[arg(long, global = true)]
    insecure: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a completion for one prompt in this process.
    Run(cli::run::RunArgs),
    /// Print a model file's architecture, size, quantization mix and tensors.
    Info(cli::info::InfoArgs),
    /// Measure prefill and decode tokens/s (the llama-bench pp/tg tests).
    Bench(cli::bench::BenchArgs),
    /// Coordinate a cluster and serve the OpenAI-compatible API.
    Serve(cli::serve::ServeArgs),
    /// Serve one shard of a model to a coordinator over gRPC.
    Worker(cli::worker::WorkerArgs),
    /// Print the cluster a coordinator runs: workers, layers, memory, ms per step, round trips.
    Status(cli::status::StatusArgs),
    /// Size and place a model on a cluster before loading it: memory per device, predicted
    /// speed, and what would make it fit.
    Plan(cli::plan::PlanArgs),
    /// List the batch jobs of a state directory with their progress.
    Jobs(cli::jobs::JobsArgs),
    /// Create a cluster CA and node certificates for mutual TLS.
    #[command(subcommand)]
    Cert(cli::cert::CertCommand),
    /// Relay TCP with a fixed delay each way (a test tool standing in for netem's delay).
    #[command(hide = true)]
    DelayProxy(cli::delay_proxy::DelayProxyArgs),
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let sec = shoal_proto::security::Security::load(
        cli.security.tls_dir.as_deref(),
        cli.security.join_token.clone(),
        cli.security.insecure,
    );
    match sec {
        Ok(s) => shoal_proto::security::install(s),
        Err(e) => {
            eprintln!("shoal: error: --tls-dir/--join-token: {e}");
            std::process::exit(1);
        }
    }
    let r = match cli.command {
        Command::Run(a) => cli::run::run(a),
        Command::Info(a) => cli::info::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Worker(a) => cli::worker::run(a),
        Command::Serve(a) => cli::serve::run(a),
        Command::Status(a) => cli::status::run(a),
        Command::Plan(a) => cli::plan::run(a),
        Command::Jobs(a) => cli::jobs::run(a),
        Command::Cert(c) => cli::cert::run(c),
        Command::DelayProxy(a) => cli::delay_proxy::run(a),
    };
    if let Err(e) = r {
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("shoal: error: {msg}");
        std::process::exit(1);
    }
}
