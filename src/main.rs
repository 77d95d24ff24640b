//! The `whittle` binary: parse the command line, fix the thread budget, set up tracing, dispatch.

use anyhow::Context;
use clap::Parser;
use whittle::config::{Cli, Command};

/// Training allocates and frees a buffer per tensor operation; glibc's allocator hands large
/// freed blocks back to the OS and page-faults them in again every step (30–60% of a step in
/// profiles). mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(client) = client_command(&cli.command, cli.client.api_key.is_some()) {
        // A client: no server state, no tracing; the exit code says how it went.
        let code = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(whittle::client::run(client, cli.client));
        std::process::exit(code);
    }
    // Before any other thread exists: it may size candle's pool through the environment.
    whittle::compress::parallel::configure(cli.common.threads);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(cli))
}

fn client_command(cmd: &Option<Command>, has_key: bool) -> Option<whittle::client::ClientCommand> {
    use whittle::client::ClientCommand;
    Some(match cmd.clone()? {
        Command::Models(m) => ClientCommand::Models(m),
        Command::Datasets(d) => ClientCommand::Datasets(d),
        Command::Jobs(j) => ClientCommand::Jobs(j),
        Command::Artifacts(a) => ClientCommand::Artifacts(a),
        Command::Healthcheck => ClientCommand::Healthcheck,
        // Without a key, `keys` works on the local database (the bootstrap path).
        Command::Keys(k) if has_key => ClientCommand::Keys(k),
        _ => return None,
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    whittle::telemetry::init_tracing(&cli.common.log_format);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => whittle::app::serve(cli.common).await,
        Command::Worker => whittle::app::worker(cli.common).await,
        Command::Migrate => whittle::app::migrate(cli.common).await,
        Command::Keys(k) => {
            let output = cli
                .client
                .output
                .unwrap_or(whittle::client::OutputFormat::Table);
            whittle::app::keys(cli.common, k, output).await
        }
        Command::Openapi => {
            print!("{}", whittle::http::OPENAPI_YAML);
            Ok(())
        }
        Command::Models(_)
        | Command::Datasets(_)
        | Command::Jobs(_)
        | Command::Artifacts(_)
        | Command::Healthcheck => {
            unreachable!("client commands are dispatched in main")
        }
    }
}
