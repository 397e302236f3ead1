//! The Compose stack of deploy/compose, for real: images built from this build's binaries
//! (deploy/docker/build.sh), PostgreSQL, the development OIDC provider, the Kafka-protocol
//! broker, three coordinator members formed into a cluster by the stack's init step, two
//! gateway nodes shipping to the broker, HAProxy in front. One session through HAProxy with a
//! token from the stack's provider, a write held for approval and approved with the `vigil`
//! CLI against the stack's coordinator, then the stack is taken down.
//!
//! Ground truth: the target's own log (`log_statement=all`: the write ran exactly once), the
//! table, the gateway's local log (the approval steps recorded) and the audit topic (it
//! verifies against the witness and holds every record of every node's stream).
//!
//! Needs a Docker engine with docker-compose (deploy/compose/engine.sh start; deploy/dev/test.sh
//! starts one): without it the test fails, it never skips.

use std::collections::HashMap;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use vigil_chaos::{bin, free_port, output_text, random_suffix, repo_root};
use vigil_proto::record::{Kind, Record};

const MEMBERS: &str = "coordinator-1:7470,coordinator-2:7470,coordinator-3:7470";
const UPDATE: &str = "update customers set tier = 'gold' where id = 2";

/// One stack under its own project name, host ports and subnet, taken down (volumes too) on
/// drop.
struct Stack {
    project: String,
    pg_port: u16,
    ssh_port: u16,
    stats_port: u16,
    /// The first three numbers of the stack's /24 (`VIGIL_COMPOSE_NET`): HAProxy is `NET.10`.
    net: String,
}

impl Stack {
    fn up() -> Self {
        let stack = Stack {
            project: format!("vigil-test-{}", random_suffix()),
            pg_port: free_port(),
            ssh_port: free_port(),
            stats_port: free_port(),
            net: format!("172.30.{}", 100 + rand::random::<u8>() % 150),
        };
        let bins = bin("vigil-node")
            .parent()
            .expect("binaries live in a directory")
            .to_path_buf();
        eprintln!(
            "phase: stack.sh up, project {}, HAProxy on 127.0.0.1:{}",
            stack.project, stack.pg_port
        );
        let started = Instant::now();
        let out = stack.run(&["up", "--bins", bins.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "deploy/compose/stack.sh up failed (is a Docker engine running? deploy/compose/engine.sh start):\n{}",
            output_text(&out)
        );
        eprintln!("phase: stack up in {:?}", started.elapsed());
        stack
    }

    /// The vigil image of this run (built from this build's binaries, removed on drop).
    fn image(&self) -> String {
        format!("{}:latest", self.project)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(repo_root().join("deploy/compose/stack.sh"));
        cmd.args(args)
            .env("VIGIL_COMPOSE_PROJECT", &self.project)
            .env("VIGIL_COMPOSE_PG_PORT", self.pg_port.to_string())
            .env("VIGIL_COMPOSE_STATS_PORT", self.stats_port.to_string())
            .env("VIGIL_COMPOSE_SSH_PORT", self.ssh_port.to_string())
            .env("VIGIL_COMPOSE_BIND", "127.0.0.1")
            .env("VIGIL_COMPOSE_NET", &self.net)
            .env("VIGIL_IMAGE", self.image())
            .env_remove("VIGIL_TOKEN")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .expect("run deploy/compose/stack.sh")
    }

    /// stdout of a command that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "stack.sh {args:?} failed:\n{}",
            output_text(&out)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    fn token(&self, client: &str) -> String {
        let token = self.ok(&["token", client]).trim().to_string();
        assert!(token.split('.').count() == 3, "not a JWT: {token:?}");
        token
    }

    fn psql(&self, token: &str, sql: &str) -> Command {
        let mut cmd = Command::new("psql");
        cmd.arg(format!(
            "host=127.0.0.1 port={} dbname=app user=agent sslmode=require application_name=compose-test password={token}",
            self.pg_port
        ))
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-tA", "-c", sql])
        .stdin(Stdio::null());
        cmd
    }

    /// A query as the target's superuser, inside the PostgreSQL container (ground truth).
    fn target(&self, sql: &str) -> String {
        self.ok(&[
            "compose", "exec", "-T", "-u", "postgres", "postgres", "psql", "-X", "-tA", "-d",
            "app", "-c", sql,
        ])
        .trim()
        .to_string()
    }

    /// Every record of every stream file in one node's audit directory.
    fn local_records(&self, node: &str) -> Vec<Record> {
        let out = self.ok(&[
            "compose",
            "exec",
            "-T",
            node,
            "sh",
            "-c",
            "cat /var/lib/vigil/audit/*.jsonl",
        ]);
        out.lines()
            .map(|l| Record::parse(l.as_bytes()).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        eprintln!("phase: stack.sh down, project {}", self.project);
        let out = self.run(&["down"]);
        if !out.status.success() {
            eprintln!("stack.sh down failed:\n{}", output_text(&out));
        }
        let _ = Command::new("docker").args(["rmi", &self.image()]).output();
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn finished(child: &mut Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("poll psql").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("psql did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = Vec::new();
    let mut err = Vec::new();
    use std::io::Read;
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_end(&mut err).unwrap();
    Output {
        status: child.try_wait().unwrap().unwrap(),
        stdout: out,
        stderr: err,
    }
}

/// Streams and record counts from `vigil audit verify` output lines
/// (`stream gw-1:…: N records verified, …`).
fn verified_streams(report: &str) -> HashMap<String, u64> {
    report
        .lines()
        .filter_map(|l| l.strip_prefix("stream "))
        .filter_map(|l| {
            let (stream, rest) = l.split_once(": ")?;
            let n = rest.split_whitespace().next()?.parse().ok()?;
            Some((stream.to_string(), n))
        })
        .collect()
}

#[test]
fn t10_compose_stack_psql_through_haproxy_with_an_approval() {
    let stack = Stack::up();

    eprintln!("phase: a read through HAProxy with the stack provider's token");
    let agent = stack.token("agent-reporting");
    let out = stack
        .psql(&agent, "select count(*) from customers")
        .output()
        .unwrap();
    assert!(out.status.success(), "psql failed: {}", output_text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");

    eprintln!("phase: ssh through HAProxy to host web (the stack's sshd) with a token");
    let ops = stack.token("agent-ops");
    let marker = format!("compose-ssh-{}", random_suffix());
    let command = format!("echo {marker}");
    let (stdout, status) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let session = vigil_chaos::ssh::token_login(stack.ssh_port, "vigil-ops+web", &ops)
            .await
            .expect("agent-ops logs in through HAProxy");
        let (out, _, status) = vigil_chaos::ssh::exec(&session, &command).await;
        (out, status)
    });
    assert_eq!(status, Some(0));
    assert_eq!(String::from_utf8_lossy(&stdout).trim(), marker);

    eprintln!("phase: a write held for approval");
    let mut held = stack
        .psql(&agent, UPDATE)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = wait_for(
        "the held write shows in `vigil approvals list --state pending`",
        Duration::from_secs(60),
        || {
            let list = stack.ok(&["vigil", "approvals", "list", "--state", "pending"]);
            list.lines()
                .find(|l| l.contains(UPDATE) && l.contains("agent-reporting"))
                .map(|l| l.split_whitespace().next().unwrap().to_string())
        },
    );
    assert!(id.starts_with("apr-"), "{id}");
    assert!(
        held.try_wait().unwrap().is_none(),
        "psql must still wait for the decision"
    );
    assert_eq!(
        stack.target("select tier from customers where id = 2"),
        "basic",
        "nothing ran before the approval"
    );

    eprintln!("phase: approved with the vigil CLI against the stack's coordinator ({id})");
    let shown = stack.ok(&[
        "vigil",
        "approvals",
        "approve",
        "--yes",
        &id,
        "--comment",
        "compose test",
    ]);
    assert!(shown.contains("state       approved"), "{shown}");
    assert!(shown.contains("vote        alice approved"), "{shown}");
    let node = shown
        .lines()
        .find_map(|l| l.strip_prefix("node        "))
        .expect("approvals show names the node")
        .trim()
        .to_string();
    let out = finished(&mut held, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "the held write failed: {}",
        output_text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("UPDATE 1"),
        "{}",
        output_text(&out)
    );

    eprintln!("phase: ground truth in the target");
    assert_eq!(
        stack.target("select tier from customers where id = 2"),
        "gold"
    );
    let pg_log = output_text(&stack.run(&["compose", "logs", "--no-color", "postgres"]));
    let ran = pg_log
        .lines()
        .filter(|l| l.contains(&format!("statement: {UPDATE}")))
        .count();
    assert_eq!(ran, 1, "the approved write ran exactly once:\n{pg_log}");

    eprintln!("phase: the approval's steps in {node}'s local log");
    let service = match node.as_str() {
        "gw-1" => "node-1",
        "gw-2" => "node-2",
        other => panic!("unknown node {other}"),
    };
    let records = stack.local_records(service);
    let steps: Vec<(Kind, &str)> = records
        .iter()
        .filter(|r| r.body.approval.as_ref().is_some_and(|a| a.id == id))
        .map(|r| {
            (
                r.body.kind,
                r.body.approval.as_ref().unwrap().state.as_str(),
            )
        })
        .collect();
    assert!(
        steps.contains(&(Kind::ApprovalRequested, "pending")),
        "{steps:?}"
    );
    assert!(
        steps.contains(&(Kind::ApprovalDecided, "approved")),
        "{steps:?}"
    );
    // HAProxy named the client in a PROXY protocol header: the records carry both.
    let haproxy = format!("{}.10:", stack.net);
    let updates: Vec<&Record> = records
        .iter()
        .filter(|r| {
            r.body.kind == Kind::Request
                && r.body
                    .request
                    .as_ref()
                    .and_then(|q| q.postgres())
                    .is_some_and(|q| q.text == UPDATE)
        })
        .collect();
    assert!(!updates.is_empty(), "the update's request record");
    for r in updates {
        let conn = r.body.connection.as_deref().expect("a connection");
        assert!(
            conn.balancer_addr
                .as_deref()
                .is_some_and(|b| b.starts_with(&haproxy))
                && !conn.client_addr.starts_with(&haproxy),
            "the client apart from HAProxy ({haproxy}…): {conn:?}"
        );
    }

    // The SSH command, on one node's record, with HAProxy apart too.
    let ssh_runs: Vec<Record> = ["node-1", "node-2"]
        .iter()
        .flat_map(|n| stack.local_records(n))
        .filter(|r| {
            r.body.kind == Kind::Request
                && matches!(&r.body.request, Some(vigil_proto::record::Request::Ssh(q)) if q.command.as_deref() == Some(command.as_str()))
        })
        .collect();
    assert_eq!(ssh_runs.len(), 1, "the ssh command's request record");
    let conn = ssh_runs[0]
        .body
        .connection
        .as_deref()
        .expect("a connection");
    assert!(
        conn.balancer_addr
            .as_deref()
            .is_some_and(|b| b.starts_with(&haproxy)),
        "{conn:?}"
    );

    eprintln!("phase: every node's stream in the audit topic, verified against the witness");
    let streams = wait_for(
        "the topic holds every record of both nodes' local logs",
        Duration::from_secs(60),
        || {
            let out = stack.run(&[
                "compose",
                "exec",
                "-T",
                "node-1",
                "vigil",
                "audit",
                "verify",
                "--kafka",
                "kafka:9092",
                "--topic",
                "vigil-audit",
                "--witness",
                MEMBERS,
                "--cluster-token-env",
                "VIGIL_CLUSTER_TOKEN",
            ]);
            if !out.status.success() {
                eprintln!("verify: {}", output_text(&out));
                return None;
            }
            let topic = verified_streams(&String::from_utf8_lossy(&out.stdout));
            let mut local: HashMap<String, u64> = HashMap::new();
            for service in ["node-1", "node-2"] {
                for r in stack.local_records(service) {
                    *local.entry(r.stream.clone()).or_default() += 1;
                }
            }
            (local.len() == 2 && topic == local).then_some(topic)
        },
    );
    assert!(
        streams.keys().any(|s| s.starts_with("gw-1:"))
            && streams.keys().any(|s| s.starts_with("gw-2:")),
        "{streams:?}"
    );
}
