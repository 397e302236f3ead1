//! `vigil`: the operator CLI.
//!
//! Every text that comes from a record, a client or the coordinator is printed through
//! [`crate::display`] (escaped; statement text keeps its lines behind a continuation
//! marker), so none of it can move the cursor, recolour or forge a line of the output.

mod kube;
mod login;
mod ssh;

use clap::{Parser, Subcommand};
use display::{escape as esc, escape_lines};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vigil_cli::{asciicast, display, recording, replay, terminal};
use vigil_coordinator::client::{Client, Credential};
use vigil_coordinator::service::MAX_GRANT_MINUTES;
use vigil_coordinator::tls::ClientTls;
use vigil_node::config::Config;
use vigil_proto::checkpoint::{Checkpoint, PinnedKeys};
use vigil_proto::coordinator as pb;
use vigil_proto::verify::{Trust, Verifier};

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
    /// Print a session: who, which model, when, each statement, its outcome and its rows; for
    /// SSH, each channel's requests, decisions, exit and terminal output (every recorded chunk
    /// verified first).
    Replay(ReplayArgs),
    /// Recorded terminal and exec streams.
    Recording {
        #[command(subcommand)]
        command: RecordingCommand,
    },
    /// Statements held for approval: list, show, approve, deny (with your OIDC token).
    Approvals {
        #[command(subcommand)]
        command: ApprovalCommand,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// Time-windowed grants: "this principal may use this access class on this target".
    Grants {
        #[command(subcommand)]
        command: GrantCommand,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// Coordinator cluster membership.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// Log in: as a person at the organisation's identity provider (a browser, or --device),
    /// or with an agent's token (--token). The token is kept in ~/.vigil (0600), and a
    /// short-lived SSH certificate is fetched for a key held there, valid no longer than it.
    Login(ssh::LoginArgs),
    /// Print the token of the last `vigil login` while it is valid (for example as the
    /// PostgreSQL password: PGPASSWORD=$(vigil token)).
    Token {
        /// Where `vigil login` kept it.
        #[arg(long, env = "VIGIL_HOME")]
        home: Option<PathBuf>,
    },
    /// OpenSSH `Host` blocks for the hosts the token's principal may use, and a known-hosts
    /// file that pins the gateway's host key: append them to ~/.ssh/config.
    SshConfig(ssh::SshConfigArgs),
    /// A kubeconfig entry (cluster, user and context `vigil-CLUSTER`) for a cluster behind the
    /// gateway's Kubernetes listener: printed as JSON, or merged into a JSON kubeconfig with
    /// --output. Its user runs `vigil kube-credential` (people, after `vigil login`), or
    /// carries the token itself with --static-token (agents).
    Kubeconfig(kube::KubeconfigArgs),
    /// The client-go exec credential plugin that `vigil kubeconfig` writes: prints an
    /// ExecCredential with the token of the last `vigil login` and its expiry; fails (run
    /// vigil login) when that token is missing or has expired.
    KubeCredential {
        /// Where `vigil login` kept the token.
        #[arg(long, env = "VIGIL_HOME")]
        home: Option<PathBuf>,
    },
    /// What the coordinator witnesses: the latest checkpoint of every audit stream, and every
    /// node's checkpoint key.
    Witness {
        #[command(subcommand)]
        command: WitnessCommand,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The session id (a unique prefix is enough).
    session: String,
    #[command(flatten)]
    log: LogArgs,
    /// SSH and Kubernetes: print the terminal output escaped, so that its control sequences are
    /// shown, not run (the default).
    #[arg(long, conflicts_with = "play")]
    dump: bool,
    /// SSH and Kubernetes: write the recorded output raw to this terminal, at the pace it was
    /// recorded.
    #[arg(long)]
    play: bool,
    /// With --play: this many times faster than recorded.
    #[arg(long, default_value_t = 1.0, requires = "play")]
    speed: f64,
    /// With --play: wait at most this many seconds between two chunks of output.
    #[arg(long, requires = "play")]
    max_idle: Option<f64>,
}

#[derive(Subcommand)]
enum RecordingCommand {
    /// One channel of an SSH session, or one exec or attach of a Kubernetes session, as an
    /// asciicast v2 file (asciinema), every recorded chunk verified first.
    Export {
        /// The session id (a unique prefix is enough).
        session: String,
        /// The channel number (SSH) or request number (Kubernetes), as `vigil replay` shows it.
        #[arg(long)]
        channel: String,
        /// Write the cast here instead of to stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        log: LogArgs,
    },
}

#[derive(Subcommand)]
enum WitnessCommand {
    /// The latest checkpoint of every stream: stream, seq, time, key fingerprint, hash.
    List,
    /// Every node's registered checkpoint key, in the form `vigil audit verify --keys` reads.
    Keys,
}

#[derive(clap::Args)]
struct CoordinatorArgs {
    /// Coordinator members, `host:port`, comma-separated (the embedded default listens on
    /// 127.0.0.1:7470).
    #[arg(
        long,
        env = "VIGIL_COORDINATOR",
        value_delimiter = ',',
        default_value = "127.0.0.1:7470",
        global = true
    )]
    coordinator: Vec<String>,
    /// Reach the members over TLS, verifying their certificates against this CA (PEM).
    #[arg(long, env = "VIGIL_COORDINATOR_CA", global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    #[command(flatten)]
    credential: CredentialArgs,
}

/// How `vigil` authenticates to the coordinator.
#[derive(clap::Args)]
struct CredentialArgs {
    /// Your OIDC token (ID token or access token).
    #[arg(long, env = "VIGIL_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Read your OIDC token from this file.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Authenticate with the cluster token held in this environment variable instead (for
    /// automation such as `cluster init`; it cannot decide approvals).
    #[arg(long, global = true)]
    cluster_token_env: Option<String>,
}

#[derive(Subcommand)]
enum ApprovalCommand {
    /// Requests, newest first, a page at a time.
    List {
        /// Only this state: pending, approved, denied, consumed, expired.
        #[arg(long)]
        state: Option<String>,
        /// At most this many (the coordinator caps a page at 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after this page token (printed under a page that has more after it).
        #[arg(long, value_name = "TOKEN")]
        after: Option<String>,
        /// Every page, not one.
        #[arg(long, conflicts_with = "limit")]
        all: bool,
    },
    /// One request in full.
    Show { id: String },
    /// Approve a request (recorded under your token's identity): prints it in full and asks
    /// you to type yes first, unless --yes.
    Approve(Decision),
    /// Deny a request: prints it in full and asks you to type yes first, unless --yes.
    Deny(Decision),
}

#[derive(clap::Args)]
struct Decision {
    id: String,
    #[arg(long)]
    comment: Option<String>,
    /// Decide without printing the request and asking first (for scripts that showed it to
    /// the approver already). Without it a decision needs a terminal to ask at.
    #[arg(long)]
    yes: bool,
}

#[derive(Subcommand)]
enum GrantCommand {
    /// Let SUBJECT use CLASS on TARGET (of PROTOCOL) for a while.
    Create {
        #[arg(long)]
        subject: String,
        /// The identity provider SUBJECT is from: its tokens' `iss` (for SAML, the IdP's
        /// entity id). The same subject from another provider is someone else.
        #[arg(long)]
        issuer: String,
        /// The protocol of the target: postgres, ssh or kubernetes.
        #[arg(long, default_value = "postgres")]
        protocol: String,
        /// The target's configured name (for PostgreSQL, the connection name).
        #[arg(long, alias = "connection")]
        target: String,
        /// The access class a rule's `grant_class` names (e.g. `write`).
        #[arg(long = "class")]
        access_class: String,
        /// How long, in minutes, from now: 1 to 10080 (7 days, the coordinator's limit).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_GRANT_MINUTES))]
        minutes: u64,
        #[arg(long)]
        reason: Option<String>,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Make the member at the first --coordinator address a cluster of one.
    Init,
    /// Add a member (it catches up as a learner, then votes).
    Add {
        id: u64,
        /// Its `host:port`.
        address: String,
    },
    /// Remove a voting member.
    Remove { id: u64 },
    /// Leader, term, log position and members, as the member asked sees them.
    Status,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify audit streams: a local log (--log/--config) or a Kafka topic (--kafka, --topic);
    /// with --witness, against the checkpoints the coordinator holds. Exit 1 on any failure.
    Verify(VerifyArgs),
}

#[derive(clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    log: LogArgs,
    /// Read the audit topic from these bootstrap brokers (`host:port,…`) instead of a log.
    #[arg(long, requires = "topic")]
    kafka: Option<String>,
    #[arg(long, requires = "kafka")]
    topic: Option<String>,
    /// A librdkafka consumer setting for --kafka, `NAME=VALUE` (repeatable): TLS and SASL for
    /// a broker that requires them, e.g. `--kafka-option security.protocol=ssl
    /// --kafka-option ssl.ca.location=ca.pem`.
    #[arg(long = "kafka-option", value_name = "NAME=VALUE", requires = "kafka", value_parser = kafka_option)]
    kafka_options: Vec<(String, String)>,
    /// Coordinator members (`host:port,…`) whose witnessed checkpoints anchor their streams:
    /// every stream the witness holds must be in the log or topic.
    #[arg(long, value_delimiter = ',')]
    witness: Vec<String>,
    /// Reach the --witness members over TLS, verifying them against this CA (PEM).
    #[arg(long, value_name = "FILE")]
    witness_ca: Option<PathBuf>,
    /// With --witness: expect only the streams of these node ids (`id,…`) in the source; the
    /// witness's streams of other nodes are not expected (those the source holds are still
    /// checked against it).
    #[arg(long, value_delimiter = ',', requires = "witness")]
    nodes: Vec<String>,
    /// Report streams that a checkpoint names (the witness's or the topic's) but of which the
    /// source holds no record, without failing them (a deleted stream file then passes;
    /// prefer --nodes).
    #[arg(long)]
    allow_missing_streams: bool,
    /// With --witness: report streams with records of which the witness holds no checkpoint
    /// without failing them (streams written before the witness's store was replaced).
    #[arg(long, requires = "witness")]
    allow_unwitnessed: bool,
    /// Trust only these checkpoint keys: a file of `<node id> <public key>` lines, as
    /// `vigil witness keys` prints. A checkpoint signed by any other key fails.
    #[arg(long)]
    keys: Option<PathBuf>,
    #[command(flatten)]
    credential: CredentialArgs,
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
            // Errors carry the coordinator's and the broker's messages: escaped once, here.
            eprintln!("vigil: {}", esc(&e));
            ExitCode::from(2)
        }
    }
}

impl CredentialArgs {
    /// The credential for the coordinator: the cluster token from a variable, else an OIDC
    /// token given in a file or inline.
    fn credential(&self) -> Result<Credential, String> {
        if let Some(var) = &self.cluster_token_env {
            let token = std::env::var(var).map_err(|_| format!("{var} is not set"))?;
            Ok(Credential::Cluster(token.into()))
        } else if let Some(f) = &self.token_file {
            let t = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            Ok(Credential::Bearer(t.trim().to_string()))
        } else if let Some(t) = &self.token {
            Ok(Credential::Bearer(t.trim().to_string()))
        } else {
            Err("give your OIDC token with --token, VIGIL_TOKEN or --token-file".into())
        }
    }

    fn client(&self, endpoints: Vec<String>, ca: Option<&Path>) -> Result<Client, String> {
        let client =
            Client::new(endpoints, self.credential()?).map_err(|s| s.message().to_string())?;
        match ca {
            None => Ok(client),
            Some(ca) => Ok(client.tls(
                ClientTls::verify_with(ca)
                    .map_err(|e| format!("--ca: {}", vigil_node::error_chain(&e)))?,
            )),
        }
    }
}

impl CoordinatorArgs {
    fn client(&self) -> Result<Client, String> {
        self.credential
            .client(self.coordinator.clone(), self.ca.as_deref())
    }
}

/// The witness's checkpoints, one per stream (of the `--nodes` only, when given).
/// `NAME=VALUE` of `--kafka-option`.
fn kafka_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

fn witnessed(args: &VerifyArgs) -> Result<Vec<Checkpoint>, String> {
    let client = args
        .credential
        .client(args.witness.clone(), args.witness_ca.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let list = runtime
        .block_on(client.list_checkpoints(pb::ListCheckpointsRequest {}))
        .map_err(|s| format!("the witness: {:?}: {}", s.code(), s.message()))?;
    Ok(list.checkpoints.into_iter().map(Checkpoint::from).collect())
}

fn verify(args: &VerifyArgs) -> Result<ExitCode, String> {
    let started = std::time::Instant::now();
    let pinned = match &args.keys {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| e.to_string())
                .and_then(|text| PinnedKeys::parse(&text))
                .map_err(|e| format!("{}: {e}", f.display()))?,
        ),
        None => None,
    };
    // The witness first: whatever it vouches for was written before the source is read, so a
    // stream that is still being written is not reported truncated.
    let witness = if args.witness.is_empty() {
        None
    } else {
        Some(witnessed(args)?)
    };
    let mut checkpoints = 0usize;
    let (mut verifier, source, sources) = match (&args.kafka, &args.topic) {
        (Some(brokers), Some(topic)) => {
            let mut verifier = Verifier::new();
            let mut chunks = recording::ChunkReader::new(None);
            let n = vigil_node::audit::kafka::read_topic(
                brokers,
                &args.kafka_options,
                topic,
                std::time::Duration::from_secs(10),
                |m| {
                    if m.checkpoint {
                        checkpoints += 1;
                        verifier.push_checkpoint(&m.location, &m.value, m.key.as_deref());
                    } else {
                        verifier.push(&m.location, &m.value, m.key.as_deref());
                        chunks.check_line(&mut verifier, &m.location, &m.value);
                    }
                },
            )
            .map_err(|e| format!("reading {topic} from {brokers}: {e}"))?;
            (verifier, format!("topic {topic}"), n as usize)
        }
        _ => {
            let path = args.log.path()?;
            let (verifier, files) =
                replay::verify_path(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            if files == 0 {
                println!("no audit log files under {}", path.display());
                return Ok(ExitCode::FAILURE);
            }
            (verifier, path.display().to_string(), files)
        }
    };
    // `--nodes` says which nodes' streams the source must hold; the witness's checkpoints of
    // the streams it does hold anchor them whatever their node.
    let witness = witness.map(|w| {
        w.into_iter()
            .filter(|c| {
                args.nodes.is_empty()
                    || verifier.holds(&c.stream)
                    || vigil_proto::chain::node_of(&c.stream)
                        .is_some_and(|n| args.nodes.iter().any(|w| w == n))
            })
            .collect::<Vec<_>>()
    });
    checkpoints += witness.as_ref().map_or(0, Vec::len);
    verifier.check_checkpoints(&Trust {
        witness: witness.as_deref(),
        pinned: pinned.as_ref(),
        allow_missing_streams: args.allow_missing_streams,
        allow_unwitnessed: args.allow_unwitnessed,
    });
    let report = verifier.report();
    for (stream, s) in &report.streams {
        let stream = esc(stream);
        let Some(last) = s.last_seq else {
            println!(
                "stream {stream}: missing from the source (no record read){}{}",
                match s.anchored_seq {
                    Some(a) => format!(", a checkpoint vouches for seq 0 to {a}"),
                    None => String::new(),
                },
                match &s.torn_tail {
                    Some(t) => format!(", torn tail of {} bytes at {}", t.bytes, esc(&t.location)),
                    None => String::new(),
                }
            );
            continue;
        };
        println!(
            "stream {stream}: {} records verified, last seq {last}, {}, {}{}{}",
            s.verified,
            if s.ended {
                "ended"
            } else {
                "open (no stream_end record)"
            },
            match s.anchored_seq {
                Some(a) => format!("anchored at seq {a}, {} unanchored", s.unanchored),
                None => format!("no checkpoint, {} unanchored", s.unanchored),
            },
            if s.identical_duplicates > 0 {
                format!(", {} identical duplicates", s.identical_duplicates)
            } else {
                String::new()
            },
            match &s.torn_tail {
                Some(t) => format!(", torn tail of {} bytes at {}", t.bytes, esc(&t.location)),
                None => String::new(),
            }
        );
    }
    for f in &report.failures {
        println!("FAIL {}", esc(&f.to_string()));
    }
    if let Some(line) = chunks_line(&report.chunks) {
        println!("{line}");
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = report.verified() as f64 / secs.max(1e-9);
    if report.ok() {
        println!(
            "OK: {} records in {} streams verified from {} ({sources} sources), {checkpoints} checkpoints, {} torn tails, {:.0} records/s",
            report.verified(),
            report.streams.len(),
            esc(&source),
            report.torn_tails(),
            rate
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("FAILED: {} problem(s)", report.failures.len());
        Ok(ExitCode::FAILURE)
    }
}

/// How many recorded chunks were checked against their stores: `None` when no record names one.
fn chunks_line(c: &vigil_proto::verify::ChunkCounts) -> Option<String> {
    if c.verified + c.unchecked + c.failed == 0 {
        return None;
    }
    let mut line = format!("recorded chunks: {} verified", c.verified);
    if c.failed > 0 {
        line += &format!(", {} failed", c.failed);
    }
    if c.unchecked > 0 {
        line += &format!(", {} not checked (bytes stay on the node)", c.unchecked);
    }
    Some(line)
}

/// The records of the one session whose id starts with `prefix`.
fn one_session(
    path: &std::path::Path,
    prefix: &str,
) -> Result<Vec<vigil_proto::record::Record>, String> {
    let records =
        replay::session_records(path, prefix).map_err(|e| format!("{}: {e}", path.display()))?;
    let ids: std::collections::BTreeSet<_> = records
        .iter()
        .filter_map(|r| r.body.session.as_deref())
        .collect();
    match ids.len() {
        0 => return Err(format!("no session {prefix:?} in {}", path.display())),
        1 => {}
        n => {
            return Err(format!(
                "{n} sessions start with {prefix:?}; give more of the id"
            ))
        }
    }
    // A session is written in one stream, by its node: records naming it in another were
    // written by someone else (a stream needs no key to be made), and which are the real ones
    // cannot be told here.
    let streams: std::collections::BTreeSet<_> =
        records.iter().map(|r| r.stream.as_str()).collect();
    if streams.len() > 1 {
        let listed: Vec<_> = streams.iter().map(|s| esc(s).into_owned()).collect();
        return Err(format!(
            "the session's records are in {} streams ({}): a session is written in one, so records in the others were written by someone else; run vigil audit verify --witness",
            streams.len(),
            listed.join(", ")
        ));
    }
    Ok(records)
}

/// A chunk that does not verify: the replay or export is refused (exit 1), with which chunk.
fn refused(what: &str, session: &str, why: &str) -> ExitCode {
    eprintln!(
        "vigil: refusing to {what} session {}: {}",
        esc(session),
        esc(why)
    );
    ExitCode::FAILURE
}

/// `vigil replay`: an SSH session channel by channel, a Kubernetes session request by request
/// with its exec and attach streams (dumped escaped, or played raw when asked), any other
/// session as a transcript.
fn replay_session(args: &ReplayArgs) -> Result<ExitCode, String> {
    if !(args.speed.is_finite() && args.speed > 0.0) {
        return Err("--speed must be a positive number".into());
    }
    if args.max_idle.is_some_and(|m| m.is_nan() || m < 0.0) {
        return Err("--max-idle must be a number of seconds, 0 or more".into());
    }
    let path = args.log.path()?;
    let records = one_session(&path, &args.session)?;
    let Some(protocol) = terminal::protocol(&records) else {
        if args.play || args.dump {
            return Err("--play and --dump are for SSH and Kubernetes sessions".into());
        }
        print!("{}", replay::render(&records));
        return Ok(ExitCode::SUCCESS);
    };
    let mut chunks = recording::ChunkReader::new(Some(replay::log_dir(&path)));
    let session = match terminal::read(protocol, &records, &mut chunks) {
        Ok(s) => s,
        Err(why) => return Ok(refused("replay", &args.session, &why)),
    };
    if !args.play {
        print!("{}", terminal::dump(&session));
        return Ok(ExitCode::SUCCESS);
    }
    let pace = terminal::Pace {
        speed: args.speed,
        max_idle: args.max_idle,
    };
    terminal::play(&session, &pace, &mut std::io::stdout().lock()).map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// `vigil recording export`: channel `channel` of an SSH session, or request `channel` of a
/// Kubernetes session, as an asciicast v2 file.
fn export(
    session: &str,
    channel: &str,
    output: Option<&std::path::Path>,
    log: &LogArgs,
) -> Result<ExitCode, String> {
    let path = log.path()?;
    let records = one_session(&path, session)?;
    let Some(protocol) = terminal::protocol(&records) else {
        return Err(format!(
            "session {session:?} is neither an SSH nor a Kubernetes session: it has no recording"
        ));
    };
    let mut chunks = recording::ChunkReader::new(Some(replay::log_dir(&path)));
    let s = match terminal::read(protocol, &records, &mut chunks) {
        Ok(s) => s,
        Err(why) => return Ok(refused("export", session, &why)),
    };
    let Some(c) = s.channel(channel) else {
        let numbers: Vec<&str> = s.channels.iter().map(|c| c.number.as_str()).collect();
        let noun = s.protocol.noun();
        return Err(format!(
            "session {} has no {noun} {channel:?} (its {noun}s: {})",
            s.id,
            numbers.join(", ")
        ));
    };
    let cast = asciicast::cast(&s, c);
    match output {
        Some(file) => std::fs::write(file, cast).map_err(|e| format!("{}: {e}", file.display()))?,
        None => print!("{cast}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn time(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// The first `max` characters of `s` escaped ([`esc`]: a carriage return, a newline, a
/// bidirectional control shows as its escape, so a cut line cannot read as something else),
/// followed by `…` when there is more to it: more escaped text, or more that the coordinator
/// left out of a list (`summarized`). `vigil approvals show ID` prints it whole.
fn beginning(s: &str, max: usize, summarized: bool) -> String {
    let escaped = esc(s);
    let mut out: String = escaped.chars().take(max).collect();
    if summarized || out.len() < escaped.len() {
        out.push('…');
    }
    out
}

/// `protocol/target`, printable.
fn scope(s: Option<&pb::Scope>) -> String {
    let s = s.cloned().unwrap_or_default();
    format!("{}/{}", esc(&s.protocol), esc(&s.target))
}

/// An approval request as `vigil approvals show` prints it: [`approval_text`], cut into rows
/// that fit the terminal when standard output is one ([`display::fit_rows`]), so that no text
/// of the request can start a row of its own where the terminal would wrap it.
fn show_approval(a: &pb::Approval) -> String {
    let text = approval_text(a);
    let stdout = std::io::stdout();
    if !std::io::IsTerminal::is_terminal(&stdout) {
        return text;
    }
    match rustix::termios::tcgetwinsize(&stdout) {
        Ok(size) if size.ws_col > 0 => display::fit_rows(&text, usize::from(size.ws_col)),
        _ => text,
    }
}

fn approval_text(a: &pb::Approval) -> String {
    let requester = a.requester.clone().unwrap_or_default();
    let key = a.key.clone().unwrap_or_default();
    // PostgreSQL users read "statement"; other protocols' actions are commands or requests.
    let what = match a.shown.as_ref().and_then(|s| s.protocol.as_ref()) {
        Some(pb::shown_action::Protocol::Postgres(_)) => "statement",
        Some(pb::shown_action::Protocol::Ssh(_)) => "command  ",
        Some(pb::shown_action::Protocol::Kubernetes(_)) => "request  ",
        None => "action   ",
    };
    let mut out = format!(
        "id          {}\nstate       {}\nrequester   {}\ntarget      {}\nrule        {}\nnode        {}\n{what}   {}\nhash        {}\n",
        esc(&a.id),
        esc(&a.state),
        esc(&requester.subject),
        scope(key.scope.as_ref()),
        esc(&a.rule),
        esc(&a.node),
        escape_lines(&a.action, ""),
        esc(&key.hash)
    );
    match a.shown.as_ref().and_then(|s| s.protocol.as_ref()) {
        Some(pb::shown_action::Protocol::Postgres(b)) => out += &show_binding(b),
        Some(pb::shown_action::Protocol::Ssh(c)) => {
            out += &format!(
                "login       {}
request     {}
",
                esc(&c.login),
                esc(&c.request_type)
            )
        }
        Some(pb::shown_action::Protocol::Kubernetes(r)) => {
            out += &format!(
                "method      {}\npath        {}\nbody        {}\nbody sha256 {}\n",
                esc(&r.method),
                esc(&r.path),
                escape_lines(&r.body, ""),
                esc(&r.body_sha256)
            )
        }
        None => {}
    }
    if !a.reason.is_empty() {
        out += &format!("reason      {}\n", esc(&a.reason));
    }
    let approvals = a.votes.iter().filter(|v| v.approve).count();
    out += &format!(
        "created     {}\nexpires     {}\napprovals   {approvals} of {} (group {})\n",
        time(a.created_at_ms),
        time(a.expires_at_ms),
        a.approvals_required,
        esc(&a.approver_group)
    );
    for v in &a.votes {
        out += &format!(
            "vote        {} {} at {}{}\n",
            esc(&v.approver),
            if v.approve { "approved" } else { "denied" },
            time(v.at_ms),
            if v.comment.is_empty() {
                String::new()
            } else {
                format!(": {}", esc(&v.comment))
            }
        );
    }
    if a.consumed_at_ms != 0 {
        out += &format!("consumed    {}\n", time(a.consumed_at_ms));
    }
    out
}

/// Everything an approval binds besides the statement text: what runs by name, each
/// parameter (value, format, declared type), and the session's settings.
fn show_binding(b: &pb::StatementBinding) -> String {
    let mut out = format!("mode        {}\n", esc(&b.mode));
    for r in &b.runs {
        out += &format!(
            "runs        {} = {}\n",
            esc(&r.name),
            escape_lines(&r.text, "")
        );
    }
    for (i, p) in b.params.iter().enumerate() {
        let value = if p.null {
            "NULL".to_string()
        } else {
            format!("'{}'", escape_lines(&p.value, ""))
        };
        out += &format!(
            "param ${}    {value} ({})\n",
            i + 1,
            display::param_format(p.binary, p.type_oid)
        );
    }
    out += &format!(
        "database    {}\nrole        {}\nsearch_path {}\n",
        esc(&b.database),
        esc(&b.role),
        esc(&b.search_path)
    );
    if !b.settings.is_empty() {
        out += &format!("settings    {}\n", esc(&b.settings));
    }
    out
}

fn show_grant(g: &pb::Grant) -> String {
    format!(
        "{}  {} ({})  {}  {}  {} .. {}  by {}{}{}",
        esc(&g.id),
        esc(&g.subject),
        esc(&g.issuer),
        scope(g.scope.as_ref()),
        esc(&g.access_class),
        time(g.not_before_ms),
        time(g.not_after_ms),
        esc(&g.granted_by),
        if g.revoked_at_ms != 0 {
            format!("  revoked {}", time(g.revoked_at_ms))
        } else {
            String::new()
        },
        if g.reason.is_empty() {
            String::new()
        } else {
            format!("  ({})", esc(&g.reason))
        }
    )
}

fn show_status(s: &pb::ClusterStatus) -> String {
    let members = |m: &[pb::Member]| {
        m.iter()
            .map(|m| format!("{}={}", m.id, esc(&m.address)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "member      {} ({})\nleader      {} {}\nterm        {}\nlog         last {} applied {}\nvoters      {}\nlearners    {}\n",
        s.id,
        esc(&s.role),
        s.leader,
        esc(&s.leader_address),
        s.term,
        s.last_log_index,
        s.last_applied,
        members(&s.voters),
        members(&s.learners)
    )
}

/// What `vigil` asks the coordinator.
enum CoordinatorCommand {
    Approvals(ApprovalCommand),
    Grants(GrantCommand),
    Cluster(ClusterCommand),
    Witness(WitnessCommand),
}

fn show_checkpoint(c: &pb::Checkpoint) -> String {
    format!(
        "{}  seq {}  {}  {}  {}\n",
        esc(&c.stream),
        c.seq,
        time(c.time_ms),
        vigil_proto::checkpoint::fingerprint(&c.public_key).unwrap_or_else(|| "?".into()),
        esc(&c.hash)
    )
}

async fn decide(client: &Client, d: Decision, approve: bool) -> Result<String, tonic::Status> {
    let decided = client
        .decide_approval(pb::DecideApprovalRequest {
            id: d.id,
            approve,
            comment: d.comment.unwrap_or_default(),
        })
        .await?;
    Ok(show_approval(&decided))
}

/// Before a decision without `--yes`: the request in full, as `show` prints it, then the
/// approver types `yes` at the terminal. Without a terminal to ask at, nothing is decided:
/// an approval is given to a request someone read. `Ok(false)`: not confirmed.
fn confirmed(
    client: &Client,
    runtime: &tokio::runtime::Runtime,
    d: &Decision,
    verb: &str,
) -> Result<bool, String> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    if d.yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "nothing was decided: `vigil approvals {verb}` prints the request and asks at a terminal; \
             without one, read it with `vigil approvals show {}` and add --yes",
            d.id
        ));
    }
    let a = runtime
        .block_on(client.get_approval(pb::ApprovalId { id: d.id.clone() }))
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    print!(
        "{}\n{verb} this request, as shown above? Type yes to {verb} it: ",
        show_approval(&a)
    );
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| e.to_string())?;
    Ok(answer.trim() == "yes")
}

async fn coordinator_command(
    client: Client,
    command: CoordinatorCommand,
) -> Result<String, tonic::Status> {
    Ok(match command {
        CoordinatorCommand::Approvals(command) => match command {
            ApprovalCommand::List {
                state,
                limit,
                after,
                all,
            } => {
                let mut approvals = Vec::new();
                let mut page_token = after.unwrap_or_default();
                loop {
                    let page = client
                        .list_approvals(pb::ListApprovalsRequest {
                            state: state.clone().unwrap_or_default(),
                            limit: if all { 0 } else { limit },
                            page_token,
                        })
                        .await?;
                    approvals.extend(page.approvals);
                    page_token = page.next_page_token;
                    if !all || page_token.is_empty() {
                        break;
                    }
                }
                let mut out = String::new();
                for a in &approvals {
                    out += &format!(
                        "{}  {:<8}  {}  {}  {}  {}  {}\n",
                        esc(&a.id),
                        esc(&a.state),
                        esc(&a.requester.clone().unwrap_or_default().subject),
                        scope(a.key.as_ref().and_then(|k| k.scope.as_ref())),
                        esc(&a.rule),
                        time(a.created_at_ms),
                        beginning(&a.action, 60, a.summarized)
                    );
                }
                if approvals.is_empty() {
                    out = "no approval requests\n".into();
                }
                if !page_token.is_empty() {
                    out += &format!("more: --after {}\n", esc(&page_token));
                }
                out
            }
            ApprovalCommand::Show { id } => {
                show_approval(&client.get_approval(pb::ApprovalId { id }).await?)
            }
            ApprovalCommand::Approve(d) => decide(&client, d, true).await?,
            ApprovalCommand::Deny(d) => decide(&client, d, false).await?,
        },
        CoordinatorCommand::Grants(command) => match command {
            GrantCommand::Create {
                subject,
                issuer,
                protocol,
                target,
                access_class,
                minutes,
                reason,
            } => {
                let g = client
                    .create_grant(pb::CreateGrantRequest {
                        subject,
                        issuer,
                        scope: Some(pb::Scope { protocol, target }),
                        access_class,
                        duration_ms: minutes.saturating_mul(60_000),
                        reason: reason.unwrap_or_default(),
                        ..Default::default()
                    })
                    .await?;
                format!("{}\n", show_grant(&g))
            }
            GrantCommand::List => {
                let list = client.list_grants(pb::ListGrantsRequest {}).await?;
                list.grants
                    .iter()
                    .map(|g| format!("{}\n", show_grant(g)))
                    .collect()
            }
            GrantCommand::Revoke { id } => {
                format!(
                    "{}\n",
                    show_grant(&client.revoke_grant(pb::GrantId { id }).await?)
                )
            }
        },
        CoordinatorCommand::Witness(WitnessCommand::List) => {
            let list = client
                .list_checkpoints(pb::ListCheckpointsRequest {})
                .await?;
            if list.checkpoints.is_empty() {
                "no checkpoints\n".into()
            } else {
                list.checkpoints.iter().map(show_checkpoint).collect()
            }
        }
        CoordinatorCommand::Witness(WitnessCommand::Keys) => {
            let list = client.list_node_keys(pb::ListNodeKeysRequest {}).await?;
            let mut out = String::from("# node id, public key (as registered by the witness)\n");
            for k in &list.keys {
                out += &format!(
                    "# {}: {}, registered {} by stream {}\n{} {}\n",
                    esc(&k.node),
                    esc(&k.fingerprint),
                    time(k.registered_at_ms),
                    esc(&k.first_stream),
                    esc(&k.node),
                    esc(&k.public_key)
                );
            }
            out
        }
        CoordinatorCommand::Cluster(command) => show_status(&match command {
            ClusterCommand::Init => client.init(pb::InitRequest {}).await?,
            ClusterCommand::Add { id, address } => {
                client.add_member(pb::Member { id, address }).await?
            }
            ClusterCommand::Remove { id } => client.remove_member(pb::MemberId { id }).await?,
            ClusterCommand::Status => client.status(pb::StatusRequest {}).await?,
        }),
    })
}

fn run_coordinator(
    args: &CoordinatorArgs,
    command: CoordinatorCommand,
) -> Result<ExitCode, String> {
    let client = args.client()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let asked = match &command {
        CoordinatorCommand::Approvals(ApprovalCommand::Approve(d)) => {
            confirmed(&client, &runtime, d, "approve")?
        }
        CoordinatorCommand::Approvals(ApprovalCommand::Deny(d)) => {
            confirmed(&client, &runtime, d, "deny")?
        }
        _ => true,
    };
    if !asked {
        println!("Nothing was decided.");
        return Ok(ExitCode::FAILURE);
    }
    match runtime.block_on(coordinator_command(client, command)) {
        Ok(out) => {
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => {
            eprintln!("vigil: {:?}: {}", status.code(), esc(status.message()));
            Ok(ExitCode::FAILURE)
        }
    }
}

fn run(args: Args) -> Result<ExitCode, String> {
    match args.command {
        Command::Login(a) => ssh::login(&a).map(|out| {
            print!("{out}");
            ExitCode::SUCCESS
        }),
        Command::Token { home } => ssh::cached_token(&ssh::vigil_home(home.as_deref())?).map(|t| {
            println!("{t}");
            ExitCode::SUCCESS
        }),
        Command::SshConfig(a) => ssh::ssh_config(&a).map(|out| {
            print!("{out}");
            ExitCode::SUCCESS
        }),
        Command::Kubeconfig(a) => kube::run_kubeconfig(&a)
            .map(|out| {
                print!("{out}");
                ExitCode::SUCCESS
            })
            .map_err(|e| e.to_string()),
        Command::KubeCredential { home } => kube::run_kube_credential(home.as_deref())
            .map(|out| {
                print!("{out}");
                ExitCode::SUCCESS
            })
            .map_err(|e| e.to_string()),
        Command::Approvals {
            command,
            coordinator,
        } => run_coordinator(&coordinator, CoordinatorCommand::Approvals(command)),
        Command::Grants {
            command,
            coordinator,
        } => run_coordinator(&coordinator, CoordinatorCommand::Grants(command)),
        Command::Cluster {
            command,
            coordinator,
        } => run_coordinator(&coordinator, CoordinatorCommand::Cluster(command)),
        Command::Witness {
            command,
            coordinator,
        } => run_coordinator(&coordinator, CoordinatorCommand::Witness(command)),
        Command::Audit {
            command: AuditCommand::Verify(args),
        } => verify(&args),
        Command::Sessions(log) => {
            let path = log.path()?;
            print!(
                "{}",
                replay::list_sessions(&path).map_err(|e| format!("{}: {e}", path.display()))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay(args) => replay_session(&args),
        Command::Recording {
            command:
                RecordingCommand::Export {
                    session,
                    channel,
                    output,
                    log,
                },
        } => export(&session, &channel, output.as_deref(), &log),
    }
}
