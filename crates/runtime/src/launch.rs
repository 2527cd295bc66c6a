//! What every `main.rs` does, once: parse the command line, load and check the configuration
//! (exit [`EXIT_CONFIG`], 78, naming the variable), set up logs, bind, run until
//! SIGTERM/SIGINT, and exit 0 when the service stopped within `SHUTDOWN_TIMEOUT` (1 when it
//! had to be cut short or failed). `healthcheck` asks the running service instead (exit 0, 1
//! or 2: [`crate::healthcheck`]).

/// The exit code of a configuration the service refuses: sysexits' `EX_CONFIG`, apart from
/// `healthcheck`'s 0/1/2 and the usage errors' 2; units name it in `RestartPreventExitStatus`
/// (restarting cannot mend a configuration).
pub const EXIT_CONFIG: u8 = 78;

use std::future::Future;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Env};
use crate::settings::BaseSettings;
#[cfg(feature = "stores")]
use crate::settings::StoreSettings;
use crate::RunError;

/// Why a rebuild stopped (a database error, the service has none).
pub type RebuildError = Box<dyn std::error::Error + Send + Sync>;

/// What `rebuild` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    /// Events replayed.
    pub events: u64,
    /// Events that failed to apply (logged, and the rebuild went on).
    pub failed: u64,
}

/// A checkplane binary.
pub trait Service: 'static {
    /// The binary's name.
    const NAME: &'static str;
    /// The variable naming where it listens, and its default (`HTTP_ADDR`, `0.0.0.0:8080`):
    /// `healthcheck` reads these alone, not the whole configuration (the gateway's GeoIP
    /// databases, TLS keys).
    const LISTEN: (&'static str, &'static str);
    /// The variable that turns TLS on for that listener, if the service has one.
    const TLS: Option<&'static str> = None;
    /// Its configuration.
    type Config: Send + 'static;

    /// Read the configuration from the environment snapshot.
    fn load(env: &mut Env) -> Result<Self::Config, ConfigError>;
    /// The shared settings inside the configuration.
    fn base(config: &Self::Config) -> &BaseSettings;
    /// The store settings, for services with a database (enables `migrate`).
    #[cfg(feature = "stores")]
    fn store(config: &Self::Config) -> Option<&StoreSettings> {
        let _ = config;
        None
    }
    /// Whether the binary offers `rebuild` (replay `events` into the projection tables).
    const REBUILD: bool = false;
    /// The `rebuild` of a binary with [`Service::REBUILD`], on a migrated database.
    #[cfg(feature = "stores")]
    fn rebuild(
        client: tokio_postgres::Client,
    ) -> impl Future<Output = Result<Rebuilt, RebuildError>> + Send {
        let _ = client;
        async { Err(format!("{} has no rebuild", Self::NAME).into()) }
    }
    /// Whether the binary has a database to migrate.
    const MIGRATES: bool = true;
    /// Commands of the binary's own, beside serve / migrate / rebuild (the gateway's `keys`).
    fn commands() -> Vec<clap::Command> {
        Vec::new()
    }
    /// Run one of [`Service::commands`] (logging is set up); the process's exit code.
    fn command(
        config: Self::Config,
        name: String,
        args: clap::ArgMatches,
    ) -> impl Future<Output = ExitCode> + Send {
        let _ = (config, args);
        async move {
            eprintln!("{}: no command {name}", Self::NAME);
            ExitCode::from(2)
        }
    }
    /// Run until `shutdown` fires.
    fn run(
        config: Self::Config,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> impl Future<Output = Result<(), RunError>> + Send;
}

#[derive(Debug, Parser)]
struct Cli {
    /// Apply pending migrations and exit (same as the `migrate` command).
    #[arg(long)]
    migrate_only: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Apply pending migrations and exit.
    Migrate,
    /// Truncate the projection tables and replay `events` into them, then exit.
    Rebuild,
    /// Ask the running service (where its configuration says it listens) how it is: one line,
    /// exit 0 OK, 1 DEGRADED, 2 DOWN.
    Healthcheck,
}

/// Load configuration from the process environment; check unknown variables too.
pub fn load_config<S: Service>(env: Env) -> Result<S::Config, ConfigError> {
    let mut env = env;
    let config = S::load(&mut env)?;
    env.finish()?;
    Ok(config)
}

/// `healthcheck`: where the service listens (and over what) from its environment alone, then
/// ask it. Prints its one line and nothing else (no logs, never LOG_FILE).
fn healthcheck<S: Service>() -> ExitCode {
    let mut env = Env::from_process();
    let (var, default) = S::LISTEN;
    let base = match BaseSettings::from_env(&mut env, S::NAME, var, default) {
        Ok(base) => base,
        Err(error) => {
            eprintln!("{}: configuration error: {error}", S::NAME);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let tls = S::TLS.is_some_and(|var| env.opt_string(var).is_some());
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(crate::healthcheck::run(&base, tls)),
        Err(error) => {
            eprintln!("{}: cannot start the async runtime: {error}", S::NAME);
            ExitCode::from(crate::healthcheck::DOWN)
        }
    }
}

/// The whole of a service's `main`.
pub fn main<S: Service>() -> ExitCode {
    // Offer only the commands this binary has.
    let matches = Cli::command()
        .subcommands(S::commands())
        .name(S::NAME)
        .version(env!("CARGO_PKG_VERSION"))
        .mut_subcommand("rebuild", |c| c.hide(!S::REBUILD))
        .mut_subcommand("migrate", |c| c.hide(!S::MIGRATES))
        .mut_arg("migrate_only", |a| a.hide(!S::MIGRATES))
        .get_matches();
    let own = matches
        .subcommand()
        .filter(|(name, _)| S::commands().iter().any(|c| c.get_name() == *name))
        .map(|(name, args)| (name.to_owned(), args.clone()));
    let cli = match own {
        Some(_) => Cli {
            migrate_only: false,
            command: None,
        },
        None => match Cli::from_arg_matches(&matches) {
            Ok(cli) => cli,
            Err(e) => e.exit(),
        },
    };
    if matches!(cli.command, Some(Command::Healthcheck)) {
        return healthcheck::<S>();
    }
    let config = match load_config::<S>(Env::from_process()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{}: configuration error: {error}", S::NAME);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let base = S::base(&config).clone();
    if let Err(error) = crate::telemetry::init_logging(&base) {
        eprintln!("{}: configuration error: LOG_FILE: {error}", S::NAME);
        return ExitCode::from(EXIT_CONFIG);
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{}: cannot start the async runtime: {error}", S::NAME);
            return ExitCode::FAILURE;
        }
    };
    let migrate = cli.migrate_only || matches!(cli.command, Some(Command::Migrate));
    let code = if let Some((name, args)) = own {
        runtime.block_on(S::command(config, name, args))
    } else if migrate {
        runtime.block_on(migrate_once::<S>(&config))
    } else if matches!(cli.command, Some(Command::Rebuild)) {
        runtime.block_on(rebuild::<S>(&config))
    } else {
        runtime.block_on(serve::<S>(config, &base))
    };
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}

#[cfg(not(feature = "stores"))]
async fn migrate_once<S: Service>(_config: &S::Config) -> ExitCode {
    eprintln!("{}: has no database to migrate", S::NAME);
    ExitCode::from(2)
}

#[cfg(not(feature = "stores"))]
async fn rebuild<S: Service>(_config: &S::Config) -> ExitCode {
    eprintln!("{}: has no rebuild command", S::NAME);
    ExitCode::from(2)
}

#[cfg(feature = "stores")]
async fn migrate_once<S: Service>(config: &S::Config) -> ExitCode {
    let Some(store) = S::store(config) else {
        eprintln!("{}: has no database to migrate", S::NAME);
        return ExitCode::from(2);
    };
    match crate::db::migrate(&store.database).await {
        Ok(report) => {
            tracing::info!(applied = ?report.applied, "migrations are up to date");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(error = %crate::error_chain(&error), "migration failed");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "stores")]
async fn rebuild<S: Service>(config: &S::Config) -> ExitCode {
    let (true, Some(store)) = (S::REBUILD, S::store(config)) else {
        eprintln!("{}: has no rebuild command", S::NAME);
        return ExitCode::from(2);
    };
    let outcome = async {
        crate::db::migrate(&store.database).await?;
        let client = crate::db::connect(&store.database).await?;
        S::rebuild(client)
            .await
            .map_err(|e| RunError::Startup(crate::error_chain(&*e)))
    }
    .await;
    match outcome {
        Ok(report) => {
            tracing::info!(
                events = report.events,
                failed = report.failed,
                "rebuild finished"
            );
            if report.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            tracing::error!(error = %crate::error_chain(&error), "rebuild failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve<S: Service>(config: S::Config, base: &BaseSettings) -> ExitCode {
    let listener = match TcpListener::bind(base.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(addr = %base.listen, %error, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        service = S::NAME,
        version = env!("CARGO_PKG_VERSION"),
        addr = %base.listen,
        "starting"
    );
    let shutdown = CancellationToken::new();
    // detached: waits for SIGTERM or SIGINT for as long as the process lives.
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    // detached: reopens LOG_FILE on each SIGHUP for as long as the process lives.
    tokio::spawn(crate::telemetry::reopen_on_hangup());

    let run = S::run(config, listener, shutdown.clone());
    tokio::pin!(run);
    let grace = base.shutdown_timeout;
    let outcome = tokio::select! {
        outcome = &mut run => Some(outcome),
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => None,
    };
    match outcome {
        Some(Ok(())) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Some(Err(error)) => {
            tracing::error!(error = %crate::error_chain(&error), "stopped on error");
            ExitCode::FAILURE
        }
        None => {
            tracing::error!(timeout = ?grace, "shutdown did not finish in time; exiting anyway");
            ExitCode::FAILURE
        }
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the process with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = shutdown.cancelled() => return,
    };
    tracing::info!(signal = name, "shutting down");
    shutdown.cancel();
}
