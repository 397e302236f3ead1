//! `vigil-coordinator --config FILE`: one member of the coordinator cluster (Raft group holding
//! approvals, grants and audit checkpoints). See docs/operations.md for forming a cluster.

use anyhow::Context as _;
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use vigil_coordinator::server::Member;
use vigil_coordinator::service::OperatorAuth;
use vigil_node::config::CoordinatorFile;
use vigil_node::core::approvals::OidcOperators;
use vigil_node::core::identity::TokenVerifier;

#[derive(Parser)]
#[command(version, about = "Vigil coordinator member")]
struct Args {
    /// The member's TOML configuration file.
    #[arg(long, short)]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let file = match CoordinatorFile::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vigil-coordinator: {}", vigil_node::error_chain(&e));
            return std::process::ExitCode::from(2);
        }
    };
    vigil_node::init_tracing(&file.log.level, file.log.format);
    let member = match file.member_config() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("vigil-coordinator: {}", vigil_node::error_chain(&e));
            return std::process::ExitCode::from(2);
        }
    };
    match run(file, member).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil-coordinator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(
    file: CoordinatorFile,
    member: vigil_coordinator::server::MemberConfig,
) -> anyhow::Result<()> {
    let operators: Option<Arc<dyn OperatorAuth>> = match file.identity {
        Some(id) => {
            let metrics = Arc::new(vigil_node::core::metrics::Metrics::default());
            let verifier = TokenVerifier::new(id, metrics).context("identity.tokens")?;
            Some(Arc::new(OidcOperators::new(verifier)) as Arc<dyn OperatorAuth>)
        }
        None => None,
    };
    let member = Member::start(member, operators).await?;
    println!("vigil-coordinator: member listening on {}", member.addr);
    if let Some(m) = member.metrics_addr {
        println!("vigil-coordinator: metrics on http://{m}/metrics");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    member.shutdown().await;
    Ok(())
}
