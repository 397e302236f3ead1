//! `vigil-node --config FILE`: the gateway process.

use anyhow::Context as _;
use clap::Parser;
use std::path::PathBuf;
use vigil_node::config::Config;

#[derive(Parser)]
#[command(version, about = "Vigil gateway node")]
struct Args {
    /// The node's TOML configuration file.
    #[arg(long, short)]
    config: PathBuf,
}

fn main() -> std::process::ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(vigil_node::core::session_threads::STACK)
        .build()
    {
        Ok(runtime) => runtime.block_on(node()),
        Err(e) => {
            eprintln!("vigil-node: no runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn node() -> std::process::ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vigil-node: {}", vigil_node::error_chain(&e));
            return std::process::ExitCode::from(2);
        }
    };
    if let Err(e) = vigil_node::init_node_tracing(&config) {
        eprintln!("vigil-node: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    let ran = run(config).await;
    // The last sessions' spans (with `[tracing]`); bounded, so a dead collector cannot hold
    // the exit.
    vigil_node::core::trace::finish(std::time::Duration::from_secs(5)).await;
    match ran {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut node = vigil_node::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    // The first signal drains, a second one ends the open sessions at once.
    for signal in 0u32.. {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = node.wait() => return Ok(()),
        }
        match signal {
            0 => tracing::info!(
                "draining: not ready, no new clients; a second signal ends open sessions now"
            ),
            _ => tracing::info!("ending open sessions now"),
        }
        node.stop();
    }
    Ok(())
}
