//! `vigil`: the operator CLI.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vigil_node::config::Config;
use vigil_node::replay;

#[derive(Parser)]
#[command(version, about = "Vigil operator CLI")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// List the sessions in the audit log.
    Sessions(LogArgs),
    /// Print a session: who, which model, when, each statement, its outcome and its rows.
    Replay {
        /// The session id (a unique prefix is enough).
        session: String,
        #[command(flatten)]
        log: LogArgs,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the hash chains of a local audit log; exit 1 on any failure.
    Verify(LogArgs),
}

#[derive(clap::Args)]
struct LogArgs {
    /// A stream file or a directory of them.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Take the log directory from a node's config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl LogArgs {
    fn path(&self) -> Result<PathBuf, String> {
        match (&self.log, &self.config) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(c)) => Config::load(c)
                .map(|c| c.audit_dir())
                .map_err(|e| vigil_node::error_chain(&e)),
            (None, None) => Err("give --log PATH or --config FILE".into()),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vigil: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<ExitCode, String> {
    match args.command {
        Command::Audit {
            command: AuditCommand::Verify(log),
        } => {
            let path = log.path()?;
            let (report, files) =
                replay::verify_path(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            for (stream, s) in &report.streams {
                println!(
                    "stream {stream}: {} records verified, last seq {}, {}{}",
                    s.verified,
                    s.last_seq.map(|s| s.to_string()).unwrap_or("-".into()),
                    if s.ended {
                        "ended"
                    } else {
                        "open (no stream_end record)"
                    },
                    if s.identical_duplicates > 0 {
                        format!(", {} identical duplicates", s.identical_duplicates)
                    } else {
                        String::new()
                    }
                );
            }
            for f in &report.failures {
                println!("FAIL {f}");
            }
            if files == 0 {
                println!("no audit log files under {}", path.display());
                return Ok(ExitCode::FAILURE);
            }
            if report.ok() {
                println!(
                    "OK: {} records in {} streams verified",
                    report.verified(),
                    report.streams.len()
                );
                Ok(ExitCode::SUCCESS)
            } else {
                println!("FAILED: {} problem(s)", report.failures.len());
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Sessions(log) => {
            let path = log.path()?;
            print!(
                "{}",
                replay::list_sessions(&path).map_err(|e| format!("{}: {e}", path.display()))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay { session, log } => {
            let path = log.path()?;
            let records = replay::session_records(&path, &session)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let ids: std::collections::BTreeSet<_> = records
                .iter()
                .filter_map(|r| r.body.session.clone())
                .collect();
            match ids.len() {
                0 => Err(format!("no session {session:?} in {}", path.display())),
                1 => {
                    print!("{}", replay::render(&records));
                    Ok(ExitCode::SUCCESS)
                }
                n => Err(format!(
                    "{n} sessions start with {session:?}; give more of the id"
                )),
            }
        }
    }
}
