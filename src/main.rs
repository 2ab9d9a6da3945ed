//! The `backflow` command line: argument parsing, output and exit codes over
//! the engine.

/// `println!` for command output. When the reader closed stdout
/// (`backflow … | head`) the rest of the output is dropped quietly instead
/// of panicking; the command's work is done by the time it prints.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("warning: cannot write the output: {e}");
            }
        }
    }};
}

mod listen;
mod output;

use anyhow::Context;
use backflow_core::env::Env;
use backflow_engine::{Engine, EngineError};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// mimalloc: the delivery loop allocates many short-lived strings.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code: everything delivered.
const OK: u8 = 0;
/// Exit code: some records rejected or left pending.
const INCOMPLETE: u8 = 1;
/// Exit code: configuration or fatal error.
const FATAL: u8 = 2;

#[derive(Parser)]
#[command(
    name = "backflow",
    version,
    about = "Reverse-ETL: sync warehouse rows to webhooks, sending only what changed."
)]
struct Cli {
    /// The project directory (holding backflow.yaml).
    #[arg(long, global = true, default_value = ".", env = "BACKFLOW_PROJECT")]
    project: PathBuf,
    /// Machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// More log output on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Log lines on stderr as text or as JSON objects (one per line).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check the project and every sync file (no network, no data).
    Validate,
    /// Show what a run would send; sends and commits nothing.
    Plan {
        /// The sync, or several: names, globs (`crm_*`) or `tag:NAME`.
        #[arg(required = true)]
        syncs: Vec<String>,
        /// Treat every current row as added (as `run --full` would).
        #[arg(long)]
        full: bool,
        /// Also show, for changed records, the fields that change (old →
        /// new), and for removals what goes away.
        #[arg(long)]
        diff: bool,
        /// Records shown by `--diff`.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Reach a sync's warehouse (its query, no rows read) and destination (a TCP connection; nothing sent).
    Check {
        /// The syncs (all when none): names, globs or `tag:NAME`.
        syncs: Vec<String>,
        /// Also send one real request built from the first row of the
        /// query (metadata marked `"test": true`), and print it and the
        /// answer. Nothing is committed.
        #[arg(long)]
        send_test: bool,
    },
    /// Run syncs once.
    Run {
        /// Syncs to run, in order: names, globs (`crm_*`) or `tag:NAME`.
        syncs: Vec<String>,
        /// Run every sync.
        #[arg(long, conflicts_with = "syncs")]
        all: bool,
        /// Send every current row as added; mirror mode sends no deletes.
        #[arg(long)]
        full: bool,
    },
    /// Forget what was delivered for a sync: the next run sends every row.
    Reset {
        /// The sync.
        sync: String,
    },
    /// Run scheduled syncs when they come due (side by side, up to
    /// `serve.max_concurrent_runs`), with a status page, /metrics, health
    /// checks and triggers on `serve.listen`, until SIGTERM or Ctrl-C.
    Serve {
        /// Address of the endpoint (over `serve.listen`), e.g. `127.0.0.1:9464`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Run every sync that is due once (side by side), then exit: for
        /// cron and Kubernetes CronJobs.
        #[arg(long)]
        once: bool,
        /// Serve only these syncs: names, globs (`crm_*`) or `tag:NAME`
        /// (repeat or separate with commas).
        #[arg(long, value_delimiter = ',')]
        select: Vec<String>,
    },
    /// Show recent runs.
    History {
        /// Syncs to show (all when none).
        syncs: Vec<String>,
        /// Runs per sync.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Also list the rejected records of each run shown.
        #[arg(long)]
        rejections: bool,
    },
    /// Show the last delivered payload and status of one key.
    Inspect {
        /// The sync.
        sync: String,
        /// The key: a value, `col=value,col=value`, or a JSON object.
        key: String,
    },
    /// A local receiver that prints every request and checks signatures.
    Listen {
        /// Port on 127.0.0.1.
        #[arg(long, default_value_t = 8787)]
        port: u16,
        /// Environment variable holding the shared secret for `X-Signature`.
        #[arg(long, value_name = "VAR")]
        secret_env: Option<String>,
        /// Status code to answer with (e.g. 500 to watch retries).
        #[arg(long, default_value_t = 200)]
        status: u16,
        /// Print nothing per request (for benchmarks).
        #[arg(long)]
        quiet: bool,
        /// Wait this long before answering each request (e.g. `50ms`: a
        /// real endpoint's latency, for benchmarks).
        #[arg(long, default_value = "0s")]
        delay: backflow_core::Duration,
    },
    /// Run every example sync against a local receiver and show what arrived.
    Demo,
    /// Print the JSON Schema (draft 2020-12) of backflow.yaml or of sync
    /// files, for editors (`# yaml-language-server: $schema=…`).
    Schema {
        /// Which file's schema.
        #[arg(value_enum)]
        file: SchemaFile,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SchemaFile {
    /// backflow.yaml
    Project,
    /// syncs/*.yaml
    Sync,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // sqlx logs each statement it runs, which may hold the expanded
    // values of `${VAR}` references in a query: it logs warnings only.
    // A service logs what it does; a command says it on stdout.
    let service = matches!(cli.command, Command::Serve { .. });
    let filter = match (cli.verbose, service) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info,sqlx=warn",
        _ => "debug,sqlx=warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKFLOW_LOG").unwrap_or_else(|_| filter.into());
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(FATAL);
        }
    };
    // One environment for the command: what it expands is redacted from
    // every error printed.
    let env = Env::process();
    match runtime.block_on(execute(&cli, &env)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let message = env.redact(&describe(&e));
            if cli.json {
                say!("{}", serde_json::json!({"error": message}));
            }
            eprintln!("error: {message}");
            ExitCode::from(FATAL)
        }
    }
}

/// An error with its causes, each said once: a cause whose text its
/// error already carries is not repeated.
fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// A sync's error as printed: naming the sync, with expanded `${VAR}`
/// values written back as references.
fn sync_error(engine: &Engine, name: &str, e: &EngineError) -> String {
    let message = engine.env.redact(&e.to_string());
    if message.contains(&format!("`{name}`")) { message } else { format!("sync `{name}`: {message}") }
}

fn load(cli: &Cli, env: Env) -> Result<Engine, EngineError> {
    Engine::load(&cli.project, env)
}

async fn execute(cli: &Cli, env: &Env) -> anyhow::Result<u8> {
    let out = output::Output { json: cli.json };
    match &cli.command {
        Command::Validate => {
            let engine = load(cli, env.clone())?;
            out.validated(&engine);
            Ok(OK)
        }
        Command::Plan { syncs, full, diff, limit } => {
            let engine = load(cli, env.clone())?;
            let progress = output::TerminalProgress::new(cli.json);
            let names = selected(&engine, syncs, false)?;
            let mut plans = Vec::new();
            for name in &names {
                plans.push(engine.plan_with_diff(name, *full, if *diff { (*limit).max(1) } else { 0 }, &progress)?);
            }
            out.plans(&plans);
            Ok(OK)
        }
        Command::Check { syncs, send_test } => {
            let engine = load(cli, env.clone())?;
            if *send_test && syncs.is_empty() {
                anyhow::bail!("--send-test sends a real request: name the sync(s) to test");
            }
            let names =
                if syncs.is_empty() { selected(&engine, syncs, true)? } else { selected(&engine, syncs, false)? };
            let mut code = OK;
            for name in names {
                let report = engine.check(&name).await?;
                if !report.ok() {
                    code = FATAL;
                }
                out.check(&report);
                if *send_test && report.ok() {
                    let sent = engine.send_test(&name).await?;
                    if !sent.delivered {
                        code = FATAL;
                    }
                    out.test_send(&sent);
                }
            }
            Ok(code)
        }
        Command::Run { syncs, all, full } => {
            let engine = load(cli, env.clone())?;
            let names = selected(&engine, syncs, *all)?;
            // Ctrl-C (or SIGTERM) drains: requests in flight end and are
            // committed, the rest stays pending; a second one quits at once
            // (still at least once: unconfirmed records are sent again).
            let stop = async {
                stop_signal().await;
                engine.stop();
                eprintln!("stopping: finishing the requests in flight (again to quit at once)");
                stop_signal().await;
                std::process::exit(130);
            };
            tokio::select! {
                code = run(&engine, &names, *full, &out) => code,
                _ = stop => unreachable!("exits"),
            }
        }
        Command::Serve { listen, once, select } => {
            let options = backflow_engine::ServeOptions { listen: *listen, once: *once, select: select.clone() };
            let service = backflow_engine::Service::start(&cli.project, env.clone(), options).await?;
            let redact = env.clone();
            let mut report = |name: &str, result: Result<&backflow_engine::RunReport, &EngineError>| match result {
                Ok(r) => {
                    out.run(r);
                    if out.json {
                        say!("{}", serde_json::to_string(r).unwrap_or_default());
                    }
                }
                Err(e) => {
                    let message = redact.redact(&e.to_string());
                    if out.json {
                        say!("{}", serde_json::json!({"sync": name, "error": message}));
                    }
                }
            };
            if let Some(address) = service.address() {
                tracing::info!("status page, /metrics, /healthz and /readyz on http://{address}");
            }
            // SIGHUP re-reads the project; the first SIGTERM/Ctrl-C drains,
            // a second quits at once.
            let signals = {
                let service = service.clone();
                async move {
                    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
                    let reloads = async {
                        while let Some(h) = hangup.as_mut() {
                            if h.recv().await.is_none() {
                                break;
                            }
                            let _ = service.reload();
                        }
                        std::future::pending::<()>().await
                    };
                    let stops = async {
                        stop_signal().await;
                        tracing::info!("stopping: no new runs; the runs in flight drain (again to quit at once)");
                        service.shutdown();
                        stop_signal().await;
                        std::process::exit(130);
                    };
                    tokio::join!(reloads, stops);
                }
            };
            let served = tokio::select! {
                served = service.serve(&mut report) => served?,
                _ = signals => unreachable!("exits"),
            };
            Ok(if !*once {
                OK
            } else if served.failed {
                FATAL
            } else if served.partial {
                INCOMPLETE
            } else {
                OK
            })
        }
        Command::Reset { sync } => {
            let engine = load(cli, env.clone())?;
            let n = engine.reset(sync)?;
            out.reset(sync, n);
            Ok(OK)
        }
        Command::History { syncs, limit, rejections } => {
            let engine = load(cli, env.clone())?;
            let history = engine.history(syncs, *limit)?;
            out.history(&engine, &history, *rejections)?;
            Ok(OK)
        }
        Command::Inspect { sync, key } => {
            let engine = load(cli, env.clone())?;
            let record = engine.inspect(sync, key)?;
            out.inspect(sync, &record);
            Ok(OK)
        }
        Command::Listen { port, secret_env, status, quiet, delay } => {
            let secret = match secret_env {
                Some(var) => Some(
                    env.get(var).with_context(|| format!("--secret-env {var}: the variable is not set"))?.into_bytes(),
                ),
                None => None,
            };
            let status = axum::http::StatusCode::from_u16(*status).context("--status: not an HTTP status")?;
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", *port))
                .await
                .with_context(|| format!("cannot listen on 127.0.0.1:{port} (is it in use? pass --port)"))?;
            eprintln!("listening on http://127.0.0.1:{port} (Ctrl-C to stop)");
            let receiver = Arc::new(listen::Receiver {
                secret,
                compact: false,
                quiet: *quiet,
                status,
                delay: delay.get(),
                count: Default::default(),
            });
            listen::serve(listener, receiver).await?;
            Ok(OK)
        }
        Command::Demo => demo(cli, env, &out).await,
        Command::Schema { file } => {
            let schema = match file {
                SchemaFile::Project => backflow_engine::config::project_schema(),
                SchemaFile::Sync => backflow_engine::config::sync_schema(),
            };
            say!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(OK)
        }
    }
}

fn selected(engine: &Engine, syncs: &[String], all: bool) -> anyhow::Result<Vec<String>> {
    if all {
        return Ok(engine.project.syncs.iter().map(|s| s.name.clone()).collect());
    }
    if syncs.is_empty() {
        anyhow::bail!("name the syncs to run (names, globs such as `crm_*`, or `tag:NAME`), or pass --all");
    }
    Ok(engine.project.select(syncs)?)
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async {
        match term.as_mut() {
            Some(term) => {
                term.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminated => {}
    }
}

/// Runs syncs in order; the exit code is the worst of them.
async fn run(engine: &Engine, names: &[String], full: bool, out: &output::Output) -> anyhow::Result<u8> {
    let mut code = OK;
    let mut reports = Vec::new();
    for name in names {
        if engine.is_stopping() {
            code = code.max(INCOMPLETE);
            eprintln!("{name}: not run (stopping)");
            continue;
        }
        let progress = output::TerminalProgress::new(out.json);
        match engine.run(name, full, &progress).await {
            Ok(report) => {
                if !report.complete() {
                    code = code.max(INCOMPLETE);
                }
                out.run(&report);
                reports.push(serde_json::to_value(&report)?);
            }
            Err(e) => {
                code = FATAL;
                let message = sync_error(engine, name, &e);
                eprintln!("error: {message}");
                reports.push(serde_json::json!({"sync": name, "error": message}));
            }
        }
    }
    if out.json {
        say!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(code)
}

/// `backflow demo`: a receiver on a free local port, every sync run against
/// it (the example syncs read `${BACKFLOW_DEMO_URL}`), what arrived printed.
async fn demo(cli: &Cli, env: &Env, out: &output::Output) -> anyhow::Result<u8> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let secret = "demo-secret";
    let receiver = Arc::new(listen::Receiver {
        secret: Some(secret.as_bytes().to_vec()),
        compact: true,
        quiet: false,
        status: axum::http::StatusCode::OK,
        delay: std::time::Duration::ZERO,
        count: Default::default(),
    });
    tokio::spawn(listen::serve(listener, receiver.clone()));
    let env = env.clone().with("BACKFLOW_DEMO_URL", &url).with("BACKFLOW_DEMO_SECRET", secret);
    let engine = load(cli, env)?;
    let (embedded, servers): (Vec<_>, Vec<_>) =
        engine.project.syncs.iter().partition(|s| engine.project.is_embedded(s));
    let names: Vec<String> = embedded.iter().map(|s| s.name.clone()).collect();
    eprintln!("demo receiver on {url}; running {} sync(s): {}", names.len(), names.join(", "));
    if !servers.is_empty() {
        let skipped: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
        eprintln!("not run by the demo (they read a warehouse server; see the README): {}", skipped.join(", "));
    }
    let code = run(&engine, &names, false, out).await?;
    let n = receiver.count.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "\nthe receiver got {n} request(s). Run `backflow demo` again: only what changed is sent \
         (edit syncs/data/*.csv to see changes, `backflow reset SYNC` to start over)."
    );
    Ok(code)
}
