//! The `whittle` binary: parse the command line, fix the thread budget, set up tracing, dispatch.

use anyhow::Context;
use clap::Parser;
use whittle::config::{Cli, Command};

/// Training allocates and frees a buffer per tensor operation; glibc's allocator hands large
/// freed blocks back to the OS and page-faults them in again every step (30–60% of a step in
/// profiles). mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc purges freed memory after a few milliseconds; by default a purge decommits it,
/// so the next training step's buffers are fresh pages the kernel must clear on first touch
/// (a fifth of a MiniLM training step in profiles). Purging by reset instead (MADV_FREE: the
/// kernel reclaims the pages only under memory pressure) reuses them: +8% training steps.
fn retain_freed_pages() {
    // `mi_option_purge_decommits` in mimalloc v3's `mi_option_e` (libmimalloc-sys 0.1.49
    // builds v3; its Rust constants still follow v2's numbering). Only set when it reads as
    // the documented default (1), so a differently numbered build changes nothing.
    const PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;
    // SAFETY: mimalloc's option calls take plain integers and are thread-safe.
    unsafe {
        if libmimalloc_sys::mi_option_get(PURGE_DECOMMITS) == 1 {
            libmimalloc_sys::mi_option_set(PURGE_DECOMMITS, 0);
        }
    }
}

fn main() -> anyhow::Result<()> {
    retain_freed_pages();
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
