//! The `svid-bridge` command line: `run`, `healthcheck`, `inspect`, `version`.
#![expect(
    clippy::print_stdout,
    reason = "printing is what `version` and `inspect` are for"
)]

// jemalloc: measured against glibc's malloc with 1,000 SDS streams
// it spends about a third less CPU per pushed response at the same memory (BENCHMARKS.md §4.3).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use svid_bridge::config::{self, LogArgs, ProcessEnv, RunArgs};
use svid_bridge::inspect::WorkloadFilter;

#[derive(Debug, Parser)]
#[command(name = "svid-bridge", version = svid_bridge::VERSION, about = "Envoy SDS server and \
    Kubernetes CSI node plugin backed by a SPIRE agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once at start-up")]
enum Command {
    /// Serve SDS and the CSI node plugin (both by default).
    // A flag given twice takes the last value, as most tools do (and wrappers rely on).
    #[command(args_override_self = true)]
    Run(RunArgs),
    /// Exit 0 when the running bridge is ready (or, with --live, merely alive); else print
    /// why and exit 1.
    Healthcheck {
        #[command(flatten)]
        health: HealthAddr,
        /// Check liveness (/healthz) instead of readiness (/readyz).
        #[arg(long)]
        live: bool,
    },
    /// Ask for secrets as Envoy would and print SPIFFE IDs, trust domains, serials, expiry;
    /// or, with --pod or --pid, what the running bridge serves that workload.
    Inspect {
        /// The SDS socket to ask.
        #[arg(long, default_value = config::DEFAULT_SDS_SOCKET, env = "SVID_BRIDGE_SDS_SOCKET")]
        sds_socket: std::path::PathBuf,
        /// How long to wait for each secret.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
        /// Secret names (default, ROOTCA, ALL, a SPIFFE ID, spiffe://<td>); none asks for
        /// everything.
        #[arg(conflicts_with_all = ["pod", "pid"])]
        names: Vec<String>,
        /// Instead: what the running bridge serves the pod NAMESPACE/NAME (SVIDs, streams,
        /// waits, last NACK), read from its health address.
        #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with = "pid")]
        pod: Option<String>,
        /// Instead: what the running bridge serves the process PID.
        #[arg(long)]
        pid: Option<i32>,
        #[command(flatten)]
        health: HealthAddr,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Print the version.
    Version,
}

/// Where `healthcheck` and `inspect --pod/--pid` reach the running bridge.
#[derive(Debug, Args)]
struct HealthAddr {
    /// The bridge's health endpoint (/readyz, /healthz; --pod and --pid read its
    /// /debug/workloads report).
    #[arg(
        long,
        default_value = "127.0.0.1:9989",
        env = "SVID_BRIDGE_HEALTH_ADDR"
    )]
    health_addr: String,
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    let (number, unit) = value.split_at(
        value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {value:?} (e.g. 10s, 500ms, 2m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration unit in {value:?} (ms, s or m)")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(config::normalize_args(std::env::args()));
    match cli.command {
        Command::Version => {
            println!("svid-bridge {}", svid_bridge::VERSION);
            ExitCode::SUCCESS
        }
        Command::Run(args) => report(run(args)),
        Command::Inspect {
            pod: Some(pod),
            health,
            ..
        } => report(inspect_workload(
            &health.health_addr,
            WorkloadFilter::pod(&pod),
        )),
        Command::Inspect {
            pid: Some(pid),
            health,
            ..
        } => report(inspect_workload(
            &health.health_addr,
            Ok(WorkloadFilter::Pid(pid)),
        )),
        Command::Inspect {
            sds_socket,
            timeout,
            names,
            log,
            ..
        } => report(inspect(sds_socket, timeout, names, log)),
        Command::Healthcheck { health, live } => {
            match svid_bridge::telemetry::health::healthcheck(&health.health_addr, live) {
                Ok(body) => {
                    println!("{body}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("svid-bridge healthcheck: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("svid-bridge: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    svid_bridge::telemetry::init_logging(args.log.log_format, &args.log.log_level)?;
    let config = args
        .validate(&ProcessEnv)
        .context("invalid configuration")?;
    runtime()?.block_on(svid_bridge::bridge::run(config))?;
    Ok(())
}

fn inspect_workload(
    health_addr: &str,
    filter: Result<WorkloadFilter, svid_bridge::inspect::InspectError>,
) -> anyhow::Result<()> {
    print!(
        "{}",
        svid_bridge::inspect::inspect_workload(health_addr, &filter?)?
    );
    Ok(())
}

fn inspect(
    socket: std::path::PathBuf,
    timeout: Duration,
    names: Vec<String>,
    log: LogArgs,
) -> anyhow::Result<()> {
    let _ = svid_bridge::telemetry::init_logging(log.log_format, "warn");
    let report = runtime()?.block_on(svid_bridge::inspect::inspect(socket, &names, timeout))?;
    print!("{}", report.text);
    match report.not_served {
        0 => Ok(()),
        n => anyhow::bail!("{n} of the names asked for were not served (see above)"),
    }
}
