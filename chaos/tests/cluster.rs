//! The local cluster of `deploy/cluster.sh` (three coordinator members, three gateway nodes
//! with the Kafka sink, HAProxy in front; the dev PostgreSQL, OIDC provider and broker behind)
//! under faults. The script is what starts, restarts and stops everything here, so it is
//! tested along the way. Judged by invariants: the balancer's clients get back in within 3 s,
//! every statement PostgreSQL ran (its `log_statement=all` log) is in the audit topic, and the
//! topic verifies.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use vigil_chaos::partition::{CgroupRoot, Cut};
use vigil_chaos::*;
use vigil_coordinator::client::{Client, Credential};
use vigil_coordinator::tls::ClientTls;
use vigil_proto::coordinator as pb;
use vigil_proto::record::{Kind, Record, Request};

const NODES: usize = 3;

/// The first of `n` consecutive loopback ports that are all free now (cluster.sh numbers its
/// members' and nodes' ports from a base), away from the dev (25xxx) and CI (35xxx) servers.
fn free_ports(n: u16) -> u16 {
    // The tests of this file run side by side: each block is taken from a cursor, so that two
    // clusters never get overlapping blocks (a check that a port is free is not a claim on
    // it until the cluster's processes bind it).
    static NEXT: std::sync::Mutex<Option<u16>> = std::sync::Mutex::new(None);
    let mut next = NEXT.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let base = next.unwrap_or_else(|| 28_000 + rand::random::<u16>() % 2_000);
        let end = if base + n > 32_000 { 28_000 } else { base + n };
        *next = Some(end);
        if end == 28_000 {
            continue;
        }
        if (base..end).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
}

/// One `deploy/cluster.sh` cluster in its own state directory, ports and topic; `down` on
/// drop (stops every process it started, also when the test fails), then the directory goes.
struct LocalCluster {
    dir: TempDir,
    pg_port: u16,
    stats_port: u16,
    /// HAProxy's SSH and Kubernetes frontends.
    ssh_port: u16,
    kube_port: u16,
    coordinator_port: u16,
    node_pg_port: u16,
    node_admin_port: u16,
    node_ssh_port: u16,
    node_kube_port: u16,
    topic: String,
    db: String,
    drain_timeout_secs: u64,
    /// Each part in a cgroup of its own, for partitions.
    cgroups: Option<CgroupRoot>,
}

impl LocalCluster {
    /// Starts the cluster; with the psql command line `up` printed.
    async fn up() -> (Self, String) {
        Self::up_with(20, false).await
    }

    /// Starts the cluster with nodes that drain for `drain_timeout_secs` on SIGTERM; with
    /// `cgroups`, every part in a cgroup of its own (see [`vigil_chaos::partition`]).
    async fn up_with(drain_timeout_secs: u64, cgroups: bool) -> (Self, String) {
        // One block of free ports: HAProxy's four, three members, then three per kind of node
        // port (PostgreSQL, admin, SSH, Kubernetes).
        let n = NODES as u16;
        let base = free_ports(4 + 3 + 4 * n);
        let cluster = LocalCluster {
            dir: tempfile::tempdir().unwrap(),
            pg_port: base,
            stats_port: base + 1,
            ssh_port: base + 2,
            kube_port: base + 3,
            coordinator_port: base + 4,
            node_pg_port: base + 7,
            node_admin_port: base + 7 + n,
            node_ssh_port: base + 7 + 2 * n,
            node_kube_port: base + 7 + 3 * n,
            topic: format!("cluster-{}", random_suffix()),
            db: create_database().await,
            drain_timeout_secs,
            cgroups: cgroups.then(CgroupRoot::new),
        };
        eprintln!(
            "phase: cluster.sh up in {}, HAProxy on 127.0.0.1:{}, database {}, topic {}",
            cluster.dir.path().display(),
            cluster.pg_port,
            cluster.db,
            cluster.topic
        );
        let started = Instant::now();
        let out = cluster.run(&["up"]);
        assert!(
            out.status.success(),
            "deploy/cluster.sh up failed:\n{}",
            output_text(&out)
        );
        let psql = Self::printed_psql(&out);
        assert!(
            psql.contains(&format!(" port={} ", cluster.pg_port)),
            "{psql}"
        );
        eprintln!("phase: cluster up in {:?}", started.elapsed());
        (cluster, psql)
    }

    /// The psql command line `up` prints (through HAProxy, with a token from the dev provider).
    fn printed_psql(out: &Output) -> String {
        let printed = String::from_utf8_lossy(&out.stdout);
        printed
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("psql \"host=127.0.0.1 "))
            .unwrap_or_else(|| panic!("up prints no psql command:\n{}", output_text(out)))
            .to_string()
    }

    fn run(&self, args: &[&str]) -> Output {
        let bins = bin("vigil-node")
            .parent()
            .expect("binaries live in a directory")
            .to_path_buf();
        Command::new(repo_root().join("deploy/cluster.sh"))
            .args(args)
            .env("VIGIL_CLUSTER_DIR", self.dir.path())
            .env("VIGIL_CLUSTER_PG_PORT", self.pg_port.to_string())
            .env("VIGIL_CLUSTER_STATS_PORT", self.stats_port.to_string())
            .env(
                "VIGIL_CLUSTER_COORDINATOR_PORT",
                self.coordinator_port.to_string(),
            )
            .env("VIGIL_CLUSTER_NODE_PG_PORT", self.node_pg_port.to_string())
            .env(
                "VIGIL_CLUSTER_NODE_ADMIN_PORT",
                self.node_admin_port.to_string(),
            )
            .env("VIGIL_CLUSTER_SSH_PORT", self.ssh_port.to_string())
            .env("VIGIL_CLUSTER_KUBE_PORT", self.kube_port.to_string())
            .env(
                "VIGIL_CLUSTER_NODE_SSH_PORT",
                self.node_ssh_port.to_string(),
            )
            .env(
                "VIGIL_CLUSTER_NODE_KUBE_PORT",
                self.node_kube_port.to_string(),
            )
            .env("VIGIL_CLUSTER_TOPIC", &self.topic)
            .env("VIGIL_CLUSTER_DATABASE", &self.db)
            .env(
                "VIGIL_CLUSTER_DRAIN_TIMEOUT_SECS",
                self.drain_timeout_secs.to_string(),
            )
            .env(
                "VIGIL_CLUSTER_CGROUP",
                self.cgroups
                    .as_ref()
                    .map(|c| c.dir())
                    .unwrap_or(Path::new("")),
            )
            .env("VIGIL_BIN_DIR", bins)
            .stdin(Stdio::null())
            .output()
            .expect("run deploy/cluster.sh")
    }

    /// The PID cluster.sh recorded for node `i` (1-based).
    fn node_pid(&self, i: usize) -> String {
        self.pid(&format!("node-{i}"))
    }

    /// The PID cluster.sh recorded for a part (`node-2`, `coordinator-1` …).
    fn pid(&self, part: &str) -> String {
        let path = self.dir.path().join(format!("{part}/pid"));
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    }

    /// Node `i`'s own PostgreSQL listener and admin endpoint (not through the balancer).
    fn node_pg(&self, i: usize) -> u16 {
        self.node_pg_port + i as u16 - 1
    }

    fn node_admin(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.node_admin_port + i as u16 - 1)
    }

    /// The last lines of the logs of the parts whose names start with `kind`.
    fn logs(&self, kind: &str) -> String {
        let mut out = String::new();
        for i in 1..=NODES {
            let path = self.dir.path().join(format!("{kind}-{i}/log"));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out += &format!("----- {}\n", path.display());
            out += &lines[lines.len().saturating_sub(40)..].join("\n");
            out += "\n";
        }
        out
    }

    /// Coordinator member `i`'s gRPC port.
    fn member_port(&self, i: usize) -> u16 {
        self.coordinator_port + i as u16 - 1
    }

    /// A client of the coordinator members `members` (over TLS, verified against the cluster's
    /// CA) with an operator's token, giving up after `retry`.
    fn operator(&self, token: &str, members: &[usize], retry: Duration) -> Client {
        let endpoints = members
            .iter()
            .map(|&i| format!("127.0.0.1:{}", self.member_port(i)))
            .collect();
        let ca = self.dir.path().join("tls/ca.pem");
        Client::new(endpoints, Credential::Bearer(token.to_string()))
            .unwrap()
            .retry_for(retry)
            .tls(ClientTls::verify_with(&ca).expect("the cluster's CA (cluster.sh makes it)"))
    }

    /// The members' leader, once every member in `among` names the same one.
    async fn leader(&self, among: &[usize]) -> usize {
        let alice = id_token("alice");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut seen = Vec::new();
            for &i in among {
                let client = self.operator(&alice, &[i], Duration::from_millis(200));
                if let Ok(s) = client.status(pb::StatusRequest {}).await {
                    seen.push(s.leader as usize);
                }
            }
            if seen.len() == among.len()
                && among.contains(&seen[0])
                && seen.iter().all(|&l| l == seen[0])
            {
                return seen[0];
            }
            assert!(
                Instant::now() < deadline,
                "members {among:?} name no common leader: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client session through the balancer.
    async fn session(&self, token: &str, app: &str) -> (tokio_postgres::Client, ConnTask) {
        let conn = format!(
            "host=127.0.0.1 port={} user=agent dbname=app password={token} application_name={app} connect_timeout=3",
            self.pg_port
        );
        connect_tls(&conn).await.expect("a session through HAProxy")
    }

    fn audit_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{i}/data/audit"))
    }

    /// Current sessions per node in HAProxy's statistics (CSV field 5, `scur`).
    async fn sessions(&self) -> Vec<(usize, u64)> {
        let csv = reqwest::get(format!("http://127.0.0.1:{}/;csv", self.stats_port))
            .await
            .expect("HAProxy's statistics")
            .text()
            .await
            .unwrap();
        csv.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                let i = f.get(1)?.strip_prefix("node-")?.parse().ok()?;
                (f[0] == "gateways-postgres").then(|| (i, f[4].parse().unwrap_or(0)))
            })
            .collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        eprintln!("phase: cluster.sh down");
        let out = self.run(&["down"]);
        if !out.status.success() {
            eprintln!("cluster.sh down failed:\n{}", output_text(&out));
        }
    }
}

/// What one client saw: statements answered, and for each time its session broke, how long
/// from `since` (the kill) until a statement was answered again through the balancer.
#[derive(Default)]
struct Seen {
    answered: usize,
    back_after: Vec<Duration>,
    /// How each failed statement failed: its SQLSTATE, or `closed` (the connection went).
    failures: Vec<String>,
}

/// How a statement failed: its SQLSTATE, or `closed` when the connection went.
fn failure(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None if e.is_closed() => "closed".into(),
        None => e.to_string(),
    }
}

/// A client of the balancer: statements one after the other on one session, a new session
/// (through HAProxy again) whenever it breaks, until `stop`.
async fn client(
    w: usize,
    conn: String,
    stop: Arc<AtomicBool>,
    killed_at: Arc<std::sync::Mutex<Option<Instant>>>,
) -> Seen {
    let mut seen = Seen::default();
    let mut broken_since: Option<Instant> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok((session, _task)) = connect_tls(&conn).await else {
            broken_since.get_or_insert_with(Instant::now);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            match session
                .simple_query(&format!("SELECT 'w{w}-{n}' AS tick"))
                .await
            {
                Ok(_) => {
                    seen.answered += 1;
                    if let Some(t) = broken_since.take() {
                        // From the kill, not from when this client noticed it.
                        let from = killed_at.lock().unwrap().unwrap_or(t);
                        seen.back_after.push(from.elapsed());
                    }
                }
                Err(e) => {
                    seen.failures.push(failure(&e));
                    broken_since.get_or_insert_with(Instant::now);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    seen
}

/// Clients of the balancer, each running statements until stopped ([`client`]).
struct Load {
    stop: Arc<AtomicBool>,
    /// When a fault broke sessions on purpose (the clients measure their way back from it).
    broken_at: Arc<std::sync::Mutex<Option<Instant>>>,
    workers: Vec<tokio::task::JoinHandle<Seen>>,
}

impl Load {
    fn start(cluster: &LocalCluster, token: &str, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let broken_at = Arc::new(std::sync::Mutex::new(None));
        let workers = (0..clients)
            .map(|w| {
                let conn = format!(
                    "host=127.0.0.1 port={} user=agent dbname=app password={token} application_name=cluster-w{w} connect_timeout=2",
                    cluster.pg_port
                );
                tokio::spawn(client(w, conn, stop.clone(), broken_at.clone()))
            })
            .collect();
        Load {
            stop,
            broken_at,
            workers,
        }
    }

    /// What each client saw.
    async fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        let mut seen = Vec::new();
        for w in self.workers {
            seen.push(w.await.unwrap());
        }
        seen
    }
}

/// The PostgreSQL statements of the audit records in a set of record values.
fn audited_statements<'a>(records: impl Iterator<Item = &'a Record>) -> BTreeSet<String> {
    records
        .filter(|r| r.body.kind == Kind::Request)
        .filter_map(|r| match &r.body.request {
            Some(Request::Postgres(pg)) => Some(pg.text.clone()),
            _ => None,
        })
        .collect()
}

/// A session over `stream` (a connection made by the test), TLS as `connect_tls`, as the dev
/// agent `agent-reporting` with `token`.
async fn session_over(stream: tokio::net::TcpStream, token: &str) -> tokio_postgres::Client {
    use tokio_postgres::tls::MakeTlsConnect;
    let config: tokio_postgres::Config =
        format!("user=agent dbname=app password={token} sslmode=require")
            .parse()
            .unwrap();
    let tls = MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(
        &mut tls_connector(),
        "127.0.0.1",
    )
    .unwrap();
    let (client, conn) = config.connect_raw(stream, tls).await.expect("connects");
    tokio::spawn(conn);
    client
}

/// Every node's records, once one of them is the request of `statement`; with that one.
async fn request_of(cluster: &LocalCluster, statement: &str) -> (Vec<Record>, Record) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<Record> = (1..=NODES)
            .flat_map(|i| read_records(&cluster.audit_dir(i)))
            .collect();
        let found = records.iter().find(|r| {
            r.body.kind == Kind::Request
                && matches!(&r.body.request, Some(Request::Postgres(pg)) if pg.text == statement)
        });
        if let Some(r) = found.cloned() {
            return (records, r);
        }
        assert!(
            Instant::now() < deadline,
            "{statement:?} is on no node's record"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// t11: HAProxy tells the nodes who each client is, and nobody else can. A client bound to
/// 127.0.0.3 reaches a node through HAProxy: its records name 127.0.0.3 and its port as the
/// client and HAProxy's 127.0.0.2 apart (the PROXY protocol v2, believed from 127.0.0.2 only).
/// A client connecting to a node directly from 127.0.0.1 that sends a header of its own is
/// refused with a clear error and a record, and the address it claimed is on no record; a
/// direct client without one is recorded with its own address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t11_haproxy_names_the_client_and_nobody_else_can() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (cluster, _psql) = LocalCluster::up().await;
    let token = agent_token().await;

    eprintln!("phase: a client from 127.0.0.3 through HAProxy");
    let haproxy = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.pg_port));
    let stream = balancer::connect_from([127, 0, 0, 3].into(), haproxy)
        .await
        .unwrap();
    let me = stream.local_addr().unwrap();
    let session = session_over(stream, &token).await;
    let statement = "SELECT 'through HAProxy' AS t11";
    session.simple_query(statement).await.unwrap();
    let (_, request) = request_of(&cluster, statement).await;
    let conn = request.body.connection.as_deref().expect("a connection");
    assert_eq!(conn.client_addr, me.to_string(), "the client, not HAProxy");
    assert!(
        conn.balancer_addr
            .as_deref()
            .is_some_and(|b| b.starts_with("127.0.0.2:")),
        "HAProxy apart: {:?}",
        conn.balancer_addr
    );
    drop(session);

    eprintln!("phase: a PROXY header sent to node 1 directly from 127.0.0.1");
    let node1 = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.node_pg_port));
    let mut s = tokio::net::TcpStream::connect(node1).await.unwrap();
    let me = s.local_addr().unwrap();
    let claimed = "192.0.2.66:4242".parse().unwrap();
    s.write_all(&balancer::v2_header(claimed, node1))
        .await
        .unwrap();
    // An SSLRequest, as psql would send next (the node may have refused and closed already).
    let _ = s.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("the node answers and closes")
        .ok();
    let said = format!(
        "refused: a PROXY protocol v2 header from {me}, which is not a configured load balancer (node.proxy_protocol_from)"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with('E') && answer.contains("C08P01") && answer.contains(&said),
        "an ErrorResponse says why: {answer:?}"
    );

    eprintln!("phase: a direct client without a header");
    let stream = tokio::net::TcpStream::connect(node1).await.unwrap();
    let direct = stream.local_addr().unwrap();
    let session = session_over(stream, &token).await;
    let statement = "SELECT 'directly' AS t11";
    session.simple_query(statement).await.unwrap();
    let (records, request) = request_of(&cluster, statement).await;
    let conn = request.body.connection.as_deref().expect("a connection");
    assert_eq!(
        (conn.client_addr.as_str(), conn.balancer_addr.as_deref()),
        (direct.to_string().as_str(), None)
    );

    eprintln!("phase: judge: the refusal is on node 1's record, the claimed address on none");
    let node1 = read_records(&cluster.audit_dir(1));
    let refused: Vec<&Record> = node1
        .iter()
        .filter(|r| r.body.detail.as_deref() == Some(said.as_str()))
        .collect();
    assert_eq!(refused.len(), 1, "one record of the refusal");
    assert_eq!(refused[0].body.kind, Kind::ProtocolError);
    let conn = refused[0].body.connection.as_deref().unwrap();
    assert_eq!(
        (conn.client_addr.as_str(), conn.balancer_addr.as_deref()),
        (me.to_string().as_str(), None)
    );
    assert!(
        records
            .iter()
            .filter_map(|r| r.body.connection.as_deref())
            .all(|c| !c.client_addr.starts_with("192.0.2.66")),
        "the claimed address is on no record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_a_node_killed_under_load_behind_haproxy_loses_no_statement() {
    let (cluster, psql) = LocalCluster::up().await;
    // pgbench's tables are made directly, before the log the test judges by.
    Pgbench::init(&cluster).await;
    let log_start = pg_log_len();

    eprintln!("phase: the psql command `up` printed, through HAProxy");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{psql} -X -At -c \"SELECT 'printed psql command'\""
        ))
        .env("VIGIL_DEV_DIR", env().get("VIGIL_DEV_DIR"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{psql}: {}", output_text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "printed psql command"
    );
    let token = agent_token().await;

    const CLIENTS: usize = 6;
    eprintln!("phase: {CLIENTS} clients and pgbench through HAProxy");
    let pgbench = Pgbench::start(&cluster, &token);
    let load = Load::start(&cluster, &token, CLIENTS);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The node with the most sessions, so that the kill breaks some and leaves others.
    let sessions = cluster.sessions().await;
    let (victim, on_victim) = *sessions.iter().max_by_key(|(_, n)| *n).unwrap();
    assert_eq!(sessions.len(), NODES, "{sessions:?}");
    assert!(
        on_victim > 0 && on_victim < (CLIENTS + PGBENCH_CLIENTS) as u64,
        "sessions spread over the nodes: {sessions:?}"
    );
    eprintln!("phase: kill -9 node-{victim} ({on_victim} sessions; all: {sessions:?})");
    *load.broken_at.lock().unwrap() = Some(Instant::now());
    let status = Command::new("kill")
        .args(["-9", &cluster.node_pid(victim)])
        .status()
        .unwrap();
    assert!(status.success());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let seen = load.stop().await;
    let pgbench = pgbench.finish().await;

    eprintln!("phase: the clients got back in through the balancer");
    let back: Vec<Duration> = seen.iter().flat_map(|s| s.back_after.clone()).collect();
    eprintln!(
        "  back after: {back:?}; statements answered per client: {:?}",
        seen.iter().map(|s| s.answered).collect::<Vec<_>>()
    );
    let broken = seen.iter().filter(|s| !s.back_after.is_empty()).count();
    assert!(
        (1..CLIENTS).contains(&broken),
        "the kill broke the sessions on node-{victim} only: {broken} of {CLIENTS} broke"
    );
    for d in &back {
        assert!(
            *d < Duration::from_secs(3),
            "a client was back only after {d:?}"
        );
    }

    eprintln!("phase: cluster.sh status names the dead node, cluster.sh up brings it back");
    let out = cluster.run(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    assert!(
        output_text(&out).contains(&format!("node-{victim}         stopped")),
        "{}",
        output_text(&out)
    );
    let out = cluster.run(&["up"]);
    assert!(
        out.status.success(),
        "cluster.sh up again:\n{}",
        output_text(&out)
    );
    let out = cluster.run(&["status"]);
    assert!(out.status.success(), "{}", output_text(&out));

    eprintln!("phase: every statement PostgreSQL ran is in the audit topic");
    // The restarted node ships what its spool kept; each process is a stream of its own, so
    // two for the killed node.
    let want: Vec<usize> = (1..=NODES)
        .map(|i| if i == victim { 2 } else { 1 })
        .collect();
    let (ran, records) = wait_for_topic(&cluster, log_start, &want).await;
    let answered: usize = seen.iter().map(|s| s.answered).sum();
    assert!(
        ran.len() >= answered,
        "PostgreSQL logged {} statements, the clients had {answered} answered",
        ran.len()
    );
    let by_pgbench = ran
        .iter()
        .filter(|t| t.starts_with("SELECT abalance FROM pgbench_accounts"))
        .count();
    assert!(
        by_pgbench > 0,
        "pgbench's statements ran and are among them ({pgbench} transactions)"
    );
    eprintln!(
        "  {} statements ran ({by_pgbench} distinct ones of pgbench's {pgbench} transactions), all in the topic ({} records)",
        ran.len(),
        records.len()
    );

    eprintln!("phase: vigil audit verify over the topic and every node's local log");
    verify_everything(&cluster).await;
}

/// pgbench (select-only, 4 clients, each on one connection) through HAProxy for 7 s, beside
/// the test's own clients: a client whose node is killed aborts (pgbench does not reconnect);
/// the others carry on.
struct Pgbench(tokio::process::Child);

const PGBENCH_CLIENTS: usize = 4;

impl Pgbench {
    /// Its tables, made directly (as the superuser), readable by the gateway's login.
    async fn init(cluster: &LocalCluster) {
        let e = env();
        let out = Command::new("pgbench")
            .args(["-i", "-s", "1", "-q", "-h", e.get("VIGIL_PG_HOST"), "-p"])
            .arg(e.get("VIGIL_PG_PORT"))
            .args(["-U", e.get("VIGIL_PG_SUPERUSER"), &cluster.db])
            .env("PGPASSWORD", e.get("VIGIL_PG_SUPERPASS"))
            .output()
            .unwrap();
        assert!(out.status.success(), "pgbench -i: {}", output_text(&out));
        let gw = e.get("VIGIL_PG_GATEWAY_USER");
        direct_superuser(&cluster.db)
            .await
            .batch_execute(&format!(
                "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {gw}"
            ))
            .await
            .unwrap();
    }

    fn start(cluster: &LocalCluster, token: &str) -> Self {
        let child = tokio::process::Command::new("pgbench")
            .args(["-n", "-S", "-T", "7", "-h", "127.0.0.1", "-p"])
            .arg(cluster.pg_port.to_string())
            .arg("-c")
            .arg(PGBENCH_CLIENTS.to_string())
            .args(["-U", "agent", "app"])
            .env("PGPASSWORD", token)
            .env("PGSSLMODE", "require")
            .env("PGAPPNAME", "pgbench")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self(child)
    }

    /// The transactions pgbench completed (it ran to its end: exit 0, or 2 when the kill
    /// aborted some of its clients).
    async fn finish(self) -> u64 {
        let out = self.0.wait_with_output().await.unwrap();
        let text = output_text(&out);
        assert!(matches!(out.status.code(), Some(0 | 2)), "pgbench: {text}");
        text.lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|n| n.split('/').next())
            .and_then(|n| n.trim().parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("pgbench processed nothing: {text}"))
    }
}

/// Every statement PostgreSQL ran since `log_start` is in the cluster's topic, and the topic
/// holds `streams[i-1]` streams of node i; waits (up to 60 s) for the nodes to ship.
async fn wait_for_topic(
    cluster: &LocalCluster,
    log_start: u64,
    streams: &[usize],
) -> (BTreeSet<String>, Vec<Record>) {
    let ran: BTreeSet<String> = pg_executed(&cluster.db, log_start)
        .into_iter()
        .map(|r| r.text)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let records: Vec<Record> = topic_messages(&cluster.topic)
            .iter()
            .filter(|m| !m.checkpoint)
            .map(|m| Record::parse(&m.value).expect("a record in the topic"))
            .collect();
        let in_topic = audited_statements(records.iter());
        let not_audited: Vec<&String> = ran.difference(&in_topic).collect();
        // What the nodes' local logs recorded is shipped too.
        let local: Vec<Record> = (1..=NODES)
            .flat_map(|i| read_records(&cluster.audit_dir(i)))
            .collect();
        let local = audited_statements(local.iter());
        let not_shipped: Vec<&String> = local.difference(&in_topic).collect();
        let ids: BTreeSet<&str> = records.iter().map(|r| r.stream.as_str()).collect();
        let per_node: Vec<usize> = (1..=NODES)
            .map(|i| {
                let prefix = format!("gw-{i}:");
                ids.iter().filter(|s| s.starts_with(&prefix)).count()
            })
            .collect();
        if not_audited.is_empty() && not_shipped.is_empty() && per_node == streams {
            return (ran, records);
        }
        assert!(
            Instant::now() < deadline,
            "after 60 s: {} of {} statements PostgreSQL ran are not in the topic (e.g. {:?}); \
             {} recorded locally are not either (e.g. {:?}); streams per node {per_node:?}, \
             want {streams:?}",
            not_audited.len(),
            ran.len(),
            &not_audited[..not_audited.len().min(5)],
            not_shipped.len(),
            &not_shipped[..not_shipped.len().min(5)],
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `vigil audit verify` passes over the topic and over every node's local log.
async fn verify_everything(cluster: &LocalCluster) {
    let brokers = env().get("VIGIL_KAFKA_BROKERS");
    let (code, report) = vigil_async(&[
        "audit",
        "verify",
        "--kafka",
        brokers,
        "--topic",
        &cluster.topic,
    ])
    .await;
    assert_eq!(code, 0, "{report}");
    for i in 1..=NODES {
        let dir = cluster.audit_dir(i);
        let (code, report) =
            vigil_async(&["audit", "verify", "--log", dir.to_str().unwrap()]).await;
        assert_eq!(code, 0, "node-{i}: {report}");
    }
}

/// The Cancel records in node `i`'s local log.
fn cancels(cluster: &LocalCluster, i: usize) -> Vec<Record> {
    read_records(&cluster.audit_dir(i))
        .into_iter()
        .filter(|r| r.body.kind == Kind::Cancel)
        .collect()
}

/// Node `i`'s Cancel records, once there are `n` (records of answers are written in the
/// background: within 10 s).
async fn wait_cancels(cluster: &LocalCluster, i: usize, n: usize) -> Vec<Record> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = cancels(cluster, i);
        if found.len() >= n {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "gw-{i} recorded {} cancels, not {n}: {found:?}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn direct(cluster: &LocalCluster, i: usize, token: &str, app: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=agent dbname=app password={token} application_name={app} connect_timeout=3",
        cluster.node_pg(i)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t51_a_cancel_the_balancer_hands_to_another_node_cancels_on_the_session_s_node() {
    let (cluster, _psql) = LocalCluster::up().await;
    let token = agent_token().await;

    eprintln!("phase: a long statement on gw-1; its cancel key sent to gw-2's listener");
    let (client, _task) = connect_tls(&direct(&cluster, 1, &token, "cancel-test"))
        .await
        .expect("a session on gw-1");
    let cancel = client.cancel_token();
    let started = Instant::now();
    let running = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(60)").await;
        (result.map(|_| ()).map_err(|e| failure(&e)), client)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let to_gw2 = tokio::net::TcpStream::connect(("127.0.0.1", cluster.node_pg(2)))
        .await
        .unwrap();
    cancel
        .cancel_query_raw(to_gw2, {
            use tokio_postgres::tls::MakeTlsConnect;
            MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(
                &mut tls_connector(),
                "localhost",
            )
            .unwrap()
        })
        .await
        .expect("the cancel is accepted (PostgreSQL answers it with nothing)");
    let (result, client) = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the statement ended within 10 s of the cancel")
        .unwrap();
    let err = result.expect_err("pg_sleep(60) was cancelled");
    assert!(err.starts_with("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // The session goes on.
    let rows = client.simple_query("SELECT 'still here'").await.unwrap();
    assert!(!rows.is_empty());

    eprintln!("phase: on record on both nodes: passed on by gw-2, forwarded by gw-1");
    let session = read_records(&cluster.audit_dir(1))
        .into_iter()
        .find(|r| {
            r.body.kind == Kind::SessionStart
                && r.body.outcome == Some(vigil_proto::record::Outcome::Success)
        })
        .and_then(|r| r.body.session.clone())
        .expect("gw-1 recorded the session");
    let passed = wait_cancels(&cluster, 2, 1).await;
    assert_eq!(passed.len(), 1, "{passed:?}");
    let detail = passed[0].body.detail.clone().unwrap_or_default();
    assert!(
        detail.contains("passed to node gw-1, which holds the session"),
        "{detail}"
    );
    let forwarded = wait_cancels(&cluster, 1, 1).await;
    assert_eq!(forwarded.len(), 1, "{forwarded:?}");
    assert_eq!(forwarded[0].body.session.as_deref(), Some(session.as_str()));
    let detail = forwarded[0].body.detail.clone().unwrap_or_default();
    assert!(
        detail.contains("forwarded to the target (passed on by node gw-2)"),
        "{detail}"
    );
    // Both name the client's address, not a node's.
    for r in [&passed[0], &forwarded[0]] {
        let conn = r.body.connection.as_ref().expect("the client's connection");
        assert!(conn.client_addr.starts_with("127.0.0.1:"), "{conn:?}");
    }

    eprintln!("phase: a key of gw-1's making that no session holds: nothing happens, on record");
    let forged = tokio::net::TcpStream::connect(("127.0.0.1", cluster.node_pg(3)))
        .await
        .unwrap();
    let mut packet = Vec::new();
    packet.extend_from_slice(&16i32.to_be_bytes());
    packet.extend_from_slice(&80877102i32.to_be_bytes());
    let gw1_pid = (i32::from(vigil_node::core::peers::tag_of("gw-1")) << 15) | 0x1234;
    packet.extend_from_slice(&gw1_pid.to_be_bytes());
    packet.extend_from_slice(&0x0bad_cafei32.to_be_bytes());
    send_and_close(forged, &packet).await;
    let refused = wait_cancels(&cluster, 3, 1).await.remove(0);
    let detail = refused.body.detail.clone().unwrap_or_default();
    assert!(
        detail.contains("passed to node gw-1: no session there holds this cancel key"),
        "{detail}"
    );
    assert_eq!(
        cancels(&cluster, 1).len(),
        1,
        "gw-1 recorded the unknown key"
    );
    let rows = client.simple_query("SELECT 'unharmed'").await.unwrap();
    assert!(!rows.is_empty());

    eprintln!("phase: a peer call not signed with the cluster's secret is refused");
    let call = serde_json::json!({
        "from": "gw-2", "pid": 1, "secret": 2, "issued_ms": 0,
        "connection": {"protocol": "postgres", "client_addr": "192.0.2.1:1", "client_tls": false},
    });
    let http = reqwest::Client::new();
    for signature in [None, Some("00".repeat(32))] {
        let mut req = http
            .post(format!(
                "{}{}",
                cluster.node_admin(1),
                vigil_node::core::peers::PG_CANCEL_PATH
            ))
            .body(call.to_string());
        if let Some(s) = &signature {
            req = req.header(vigil_node::core::peers::SIGNATURE_HEADER, s);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{signature:?}");
    }
    assert_eq!(cancels(&cluster, 1).len(), 1);
    verify_everything(&cluster).await;
}

async fn send_and_close(mut stream: tokio::net::TcpStream, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt;
    stream.write_all(bytes).await.unwrap();
    let _ = stream.shutdown().await;
}

/// Whether the process `pid` still runs.
fn running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && (l.contains("Z") || l.contains("X")))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t52_a_rolling_restart_under_load_loses_no_statement_and_no_record() {
    const DRAIN: u64 = 4;
    let (cluster, _psql) = LocalCluster::up_with(DRAIN, false).await;
    let log_start = pg_log_len();
    let token = agent_token().await;

    const CLIENTS: usize = 6;
    eprintln!("phase: {CLIENTS} clients through HAProxy");
    let load = Load::start(&cluster, &token, CLIENTS);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let http = reqwest::Client::new();
    for i in 1..=NODES {
        eprintln!("phase: node-{i}: a session of its own, then SIGTERM");
        let (held, _task) = connect_tls(&direct(&cluster, i, &token, "drain-test"))
            .await
            .expect("a session on the node");
        let pid = cluster.node_pid(i);
        let termed = Instant::now();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        // Draining: not ready, no new clients, the open session goes on.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let resp = http
                .get(format!("{}/readyz", cluster.node_admin(i)))
                .send()
                .await
                .unwrap();
            if resp.status() == 503 {
                let why = resp.text().await.unwrap();
                assert!(why.contains("draining"), "{why}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node-{i} still ready 2 s after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let refused = connect_tls(&direct(&cluster, i, &token, "too-late")).await;
        assert!(
            refused.is_err(),
            "node-{i} took a new client while draining"
        );
        let rows = held.simple_query("SELECT 'during the drain'").await;
        assert!(rows.is_ok(), "node-{i}: {:?}", rows.err());
        // At the drain deadline the node ends the session, saying why.
        let ended = tokio::time::timeout(Duration::from_secs(DRAIN + 10), async {
            loop {
                if let Err(e) = held.simple_query("SELECT 'waiting for the end'").await {
                    break failure(&e);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .expect("the session was ended at the drain deadline");
        assert!(
            ended.starts_with("57P01") && ended.contains("shutting down") || ended == "closed",
            "node-{i}: {ended}"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while running(&pid) {
            assert!(
                Instant::now() < deadline,
                "node-{i} did not exit 30 s after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = termed.elapsed();
        assert!(
            took >= Duration::from_secs(DRAIN),
            "node-{i} exited after {took:?}, before its drain deadline"
        );
        eprintln!("  node-{i} drained and exited in {took:?}; cluster.sh up starts it again");
        let out = cluster.run(&["up"]);
        assert!(
            out.status.success(),
            "cluster.sh up:\n{}",
            output_text(&out)
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = load.stop().await;

    eprintln!("phase: no statement failed other than by a clean disconnect");
    let failures: Vec<&String> = seen.iter().flat_map(|s| &s.failures).collect();
    eprintln!(
        "  statements answered per client: {:?}; failures: {failures:?}",
        seen.iter().map(|s| s.answered).collect::<Vec<_>>()
    );
    for f in &failures {
        assert!(
            f.starts_with("57P01") || *f == "closed",
            "a statement failed otherwise: {f}"
        );
    }
    assert!(seen.iter().all(|s| s.answered > 0));

    eprintln!("phase: every node's first stream ended cleanly, every statement is in the topic");
    for i in 1..=NODES {
        let records = read_records(&cluster.audit_dir(i));
        let ends = records
            .iter()
            .filter(|r| r.body.kind == Kind::StreamEnd)
            .count();
        assert_eq!(ends, 1, "node-{i}: the drained process wrote stream_end");
        let ended: Vec<&Record> = records
            .iter()
            .filter(|r| {
                r.body.kind == Kind::SessionEnd
                    && r.body
                        .detail
                        .as_deref()
                        .is_some_and(|d| d.contains("shut down"))
            })
            .collect();
        assert!(
            !ended.is_empty(),
            "node-{i}: no session_end says the node shut down"
        );
    }
    let (ran, records) = wait_for_topic(&cluster, log_start, &[2, 2, 2]).await;
    eprintln!(
        "  {} statements ran, all in the topic ({} records)",
        ran.len(),
        records.len()
    );
    verify_everything(&cluster).await;
}

/// The requests waiting for a decision, once there are at least `n` (within 20 s).
async fn wait_pending(operator: &Client, n: usize) -> Vec<pb::Approval> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = operator
            .list_approvals(pb::ListApprovalsRequest {
                state: "pending".into(),
                ..Default::default()
            })
            .await;
        let seen = match list {
            Ok(list) if list.approvals.len() >= n => return list.approvals,
            Ok(list) => format!("{} pending", list.approvals.len()),
            Err(e) => format!("{e:?}"),
        };
        assert!(
            Instant::now() < deadline,
            "fewer than {n} requests pending after 20 s: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn approve(id: &str) -> pb::DecideApprovalRequest {
    pb::DecideApprovalRequest {
        id: id.into(),
        approve: true,
        comment: "chaos".into(),
    }
}

/// How many times PostgreSQL logged `stmt` since `log_start`.
fn times_ran(db: &str, log_start: u64, stmt: &str) -> usize {
    pg_executed(db, log_start)
        .iter()
        .filter(|r| r.text == stmt)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t53_a_statement_held_on_a_killed_node_runs_once_through_another() {
    let (cluster, _psql) = LocalCluster::up().await;
    let log_start = pg_log_len();
    let agent = token_for("agent-ops", "agent-ops-secret").await;
    let operator = cluster.operator(&id_token("alice"), &[1, 2, 3], Duration::from_secs(10));
    let stmt = "DELETE FROM customers WHERE id = 7";

    eprintln!("phase: a write to customers, held for approval on the node the balancer chose");
    let (client, _task) = cluster.session(&agent, "held").await;
    let waiting =
        tokio::spawn(async move { client.simple_query(stmt).await.map_err(|e| failure(&e)) });
    let request = wait_pending(&operator, 1).await.remove(0);
    let victim: usize = request
        .node
        .strip_prefix("gw-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the request names its node: {request:?}"));
    eprintln!("phase: kill -9 node-{victim}, which holds {}", request.id);
    assert!(Command::new("kill")
        .args(["-9", &cluster.node_pid(victim)])
        .status()
        .unwrap()
        .success());
    let broken = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the held client notices its node died")
        .unwrap();
    assert_eq!(broken.err().as_deref(), Some("closed"));

    eprintln!(
        "phase: approved meanwhile; the client reconnects through the balancer and sends it again"
    );
    let decided = operator
        .decide_approval(approve(&request.id))
        .await
        .unwrap();
    assert_eq!(decided.state, "approved");
    let reconnected = Instant::now();
    let (client, _task) = cluster.session(&agent, "held-again").await;
    assert!(
        reconnected.elapsed() < Duration::from_secs(3),
        "back in after {:?}",
        reconnected.elapsed()
    );
    let rows = client
        .simple_query(stmt)
        .await
        .expect("runs with the approval");
    assert!(rows
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(1))));
    drop(client);
    let shown = operator
        .get_approval(pb::ApprovalId {
            id: request.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(shown.state, "consumed");
    assert_eq!(
        times_ran(&cluster.db, log_start, stmt),
        1,
        "the approved statement ran once"
    );

    eprintln!(
        "phase: node-{victim} back; the topic has the run, on another node, with its approval"
    );
    let out = cluster.run(&["up"]);
    assert!(
        out.status.success(),
        "cluster.sh up:\n{}",
        output_text(&out)
    );
    let want: Vec<usize> = (1..=NODES)
        .map(|i| if i == victim { 2 } else { 1 })
        .collect();
    let (_, records) = wait_for_topic(&cluster, log_start, &want).await;
    let runs: Vec<&Record> = records
        .iter()
        .filter(|r| {
            r.body.kind == Kind::Request && r.body.pg_request().is_some_and(|q| q.text == stmt)
        })
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_ne!(runs[0].body.node, format!("gw-{victim}"));
    let approval = runs[0]
        .body
        .approval
        .as_ref()
        .expect("the run names its approval");
    assert_eq!(
        (approval.id.as_str(), approval.state.as_str()),
        (request.id.as_str(), "consumed")
    );
    verify_everything(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t54_a_node_cut_off_from_the_coordinator_fails_closed_and_serves_the_rest() {
    let (cluster, _psql) = LocalCluster::up_with(20, true).await;
    let cgroups = cluster.cgroups.as_ref().unwrap();
    let log_start = pg_log_len();
    let agent = token_for("agent-ops", "agent-ops-secret").await;
    let operator = cluster.operator(&id_token("alice"), &[1, 2, 3], Duration::from_secs(10));
    let http = reqwest::Client::new();
    let readyz = |i: usize| {
        let http = http.clone();
        let url = format!("{}/readyz", cluster.node_admin(i));
        async move {
            let r = http.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (code, body) = readyz(3).await;
    assert_eq!(code, 200, "{body}");

    eprintln!("phase: node-3 cut off from every coordinator member (its packets to them dropped)");
    let members: Vec<u16> = (1..=3).map(|i| cluster.member_port(i)).collect();
    let mut cut = Cut::default();
    cut.drop_from(cgroups, "node-3", &members);
    let (on3, _task) = connect_tls(&direct(&cluster, 3, &agent, "cut-off"))
        .await
        .unwrap();
    let held = "DELETE FROM customers WHERE id = 11";
    let started = Instant::now();
    let err = on3
        .simple_query(held)
        .await
        .expect_err("a held statement cannot be held");
    let err = failure(&err);
    assert!(err.starts_with("58000"), "{err}");
    eprintln!("  refused after {:?}: {err}", started.elapsed());
    // Everything else on node-3 flows, and is recorded.
    let rows = on3.simple_query("SELECT 'still served'").await.unwrap();
    assert!(!rows.is_empty());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = readyz(3).await;
        assert_eq!(
            code, 200,
            "the coordinator does not decide readiness: {body}"
        );
        if body.contains("coordinator: unreachable") {
            break;
        }
        assert!(Instant::now() < deadline, "node-3 still says: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = http
        .get(format!("{}/metrics", cluster.node_admin(3)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("vigil_coordinator_reachable 0"),
        "{metrics}"
    );

    eprintln!("phase: the other nodes hold and release as before");
    let (on1, _task1) = connect_tls(&direct(&cluster, 1, &agent, "not-cut"))
        .await
        .unwrap();
    let other = "DELETE FROM customers WHERE id = 12";
    let waiting =
        tokio::spawn(async move { on1.simple_query(other).await.map_err(|e| failure(&e)) });
    let request = wait_pending(&operator, 1).await.remove(0);
    assert_eq!(request.node, "gw-1");
    operator
        .decide_approval(approve(&request.id))
        .await
        .unwrap();
    waiting.await.unwrap().expect("runs on gw-1 once approved");

    eprintln!("phase: healed: node-3 reaches the coordinator again and holds statements");
    cut.heal();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = readyz(3).await;
        if body.contains("coordinator: reachable") {
            break;
        }
        assert!(Instant::now() < deadline, "node-3 still says: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let waiting =
        tokio::spawn(async move { on3.simple_query(held).await.map_err(|e| failure(&e)) });
    let request = wait_pending(&operator, 1).await.remove(0);
    assert_eq!(request.node, "gw-3");
    operator
        .decide_approval(approve(&request.id))
        .await
        .unwrap();
    waiting.await.unwrap().expect("runs on gw-3 once approved");
    assert_eq!(times_ran(&cluster.db, log_start, held), 1);
    assert_eq!(times_ran(&cluster.db, log_start, other), 1);
    wait_for_topic(&cluster, log_start, &[1, 1, 1]).await;
    verify_everything(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t55_approvals_survive_a_leader_kill_and_a_cut_off_member_decides_nothing() {
    let (cluster, _psql) = LocalCluster::up_with(20, true).await;
    let cgroups = cluster.cgroups.as_ref().unwrap();
    let log_start = pg_log_len();
    let agent = token_for("agent-ops", "agent-ops-secret").await;
    let alice = id_token("alice");

    eprintln!("phase: a stream of held statements through HAProxy, each approved as it comes");
    const WRITERS: usize = 3;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (stop, agent) = (stop.clone(), agent.clone());
            let cluster_port = cluster.pg_port;
            tokio::spawn(async move {
                let conn = format!(
                    "host=127.0.0.1 port={cluster_port} user=agent dbname=app password={agent} application_name=writer-{w} connect_timeout=3"
                );
                let mut ran = Vec::new();
                let (client, _task) = connect_tls(&conn).await.unwrap();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let stmt = format!("UPDATE customers SET name = 'w{w}-{n}' WHERE id = {}", 20 + w);
                    match client.simple_query(&stmt).await {
                        Ok(_) => ran.push(stmt),
                        Err(e) => return Err(format!("writer {w}: {stmt}: {}", failure(&e))),
                    }
                }
                Ok(ran)
            })
        })
        .collect();
    // (asked, answered) of every approval given.
    let decided_at = Arc::new(std::sync::Mutex::new(Vec::<(Instant, Instant)>::new()));
    // The approver goes on until every writer is done: the writers' last statements are held.
    let approving = Arc::new(AtomicBool::new(true));
    let approver = {
        let (stop, decided_at) = (approving.clone(), decided_at.clone());
        let operator = cluster.operator(&alice, &[1, 2, 3], Duration::from_secs(10));
        tokio::spawn(async move {
            while stop.load(Ordering::Relaxed) {
                let list = operator
                    .list_approvals(pb::ListApprovalsRequest {
                        state: "pending".into(),
                        ..Default::default()
                    })
                    .await;
                for a in list.map(|l| l.approvals).unwrap_or_default() {
                    let asked = Instant::now();
                    if operator.decide_approval(approve(&a.id)).await.is_ok() {
                        decided_at.lock().unwrap().push((asked, Instant::now()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let before = decided_at.lock().unwrap().len();
    assert!(before > 0, "no approval in 3 s");
    eprintln!("phase: kill -9 the leader, coordinator-{leader}, after {before} approvals");
    let killed = Instant::now();
    assert!(Command::new("kill")
        .args(["-9", &cluster.pid(&format!("coordinator-{leader}"))])
        .status()
        .unwrap()
        .success());
    let rest: Vec<usize> = (1..=3).filter(|&i| i != leader).collect();
    let elected = cluster.leader(&rest).await;
    eprintln!(
        "  coordinator-{elected} leads {:?} after the kill",
        killed.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let first_after = decided_at
        .lock()
        .unwrap()
        .iter()
        .find(|(asked, _)| *asked > killed)
        .map(|(_, answered)| *answered - killed);
    eprintln!("  the first approval asked for after the kill was given {first_after:?} after it");
    let gap = first_after.expect("approvals came back after the leader kill");
    // An election takes about two election timeouts (1 s with the defaults), more when the
    // machine is loaded; the bound is below the 5 s commit timeout, so approvals came back
    // by the new leader taking over, not by a timed-out call being retried.
    assert!(
        gap < Duration::from_secs(4),
        "approvals were back only after {gap:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let mut ran = Vec::new();
    for w in writers {
        match w.await.unwrap() {
            Ok(stmts) => ran.extend(stmts),
            Err(e) => panic!("{e}\nthe nodes' logs:\n{}", cluster.logs("node")),
        }
    }
    approving.store(false, Ordering::Relaxed);
    approver.await.unwrap();
    eprintln!("  {} held statements approved and run", ran.len());
    for stmt in &ran {
        assert_eq!(times_ran(&cluster.db, log_start, stmt), 1, "{stmt}");
    }
    let out = cluster.run(&["up"]);
    assert!(
        out.status.success(),
        "cluster.sh up:\n{}",
        output_text(&out)
    );

    eprintln!("phase: the leader cut off from the other members decides nothing; they go on");
    let leader = cluster.leader(&[1, 2, 3]).await;
    let rest: Vec<usize> = (1..=3).filter(|&i| i != leader).collect();
    let mut cut = Cut::default();
    cut.between(
        cgroups,
        (
            &[&format!("coordinator-{leader}")],
            &[cluster.member_port(leader)],
        ),
        (
            &[
                &format!("coordinator-{}", rest[0]),
                &format!("coordinator-{}", rest[1]),
            ],
            &[cluster.member_port(rest[0]), cluster.member_port(rest[1])],
        ),
    );
    let (client, _task) = cluster.session(&agent, "minority").await;
    let stmt = "DELETE FROM customers WHERE id = 30";
    let waiting =
        tokio::spawn(async move { client.simple_query(stmt).await.map_err(|e| failure(&e)) });
    let request = wait_pending(&cluster.operator(&alice, &rest, Duration::from_secs(10)), 1)
        .await
        .remove(0);
    let alone = cluster.operator(&alice, &[leader], Duration::from_secs(3));
    let refused = alone.decide_approval(approve(&request.id)).await;
    assert!(refused.is_err(), "the cut-off member decided: {refused:?}");
    assert_eq!(times_ran(&cluster.db, log_start, stmt), 0);
    let majority = cluster.operator(&alice, &rest, Duration::from_secs(10));
    let decided = majority
        .decide_approval(approve(&request.id))
        .await
        .unwrap();
    assert_eq!(decided.state, "approved");
    waiting
        .await
        .unwrap()
        .expect("runs once the majority approved");
    cut.heal();
    assert_eq!(times_ran(&cluster.db, log_start, stmt), 1);
    verify_everything(&cluster).await;
}

/// The records of every node's local log.
fn all_records(cluster: &LocalCluster) -> Vec<Record> {
    (1..=NODES)
        .flat_map(|i| read_records(&cluster.audit_dir(i)))
        .collect()
}

/// SSH and kubectl through HAProxy, as `cluster.sh up` prints them: each reaches its target
/// (the sshd's login shell ran the command; the API server answered as the agent), and each is
/// on record with the client's own address and HAProxy's apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t56_ssh_and_kubectl_through_haproxy_reach_their_targets_on_record() {
    let (cluster, _psql) = LocalCluster::up().await;
    let out = cluster.run(&["up"]);
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        printed.contains(&format!("ssh -p {} ", cluster.ssh_port)),
        "{printed}"
    );
    assert!(printed.contains("kubectl --kubeconfig "), "{printed}");
    let agent = token_for("agent-ops", "agent-ops-secret").await;

    eprintln!("phase: ssh through HAProxy runs a command on host web");
    let commands_before = std::fs::read_to_string(env().get("VIGIL_DEV_SSH_COMMAND_LOG"))
        .unwrap_or_default()
        .lines()
        .count();
    let user = format!("{}+web", env().get("VIGIL_DEV_SSH_LOGIN"));
    let marker = format!("echo through-haproxy-{}", random_suffix());
    let session = vigil_chaos::ssh::token_login(cluster.ssh_port, &user, &agent)
        .await
        .expect("the token logs in through HAProxy");
    let (stdout, _, status) = vigil_chaos::ssh::exec(&session, &marker).await;
    assert_eq!(status, Some(0));
    assert!(String::from_utf8_lossy(&stdout).starts_with("through-haproxy-"));
    let ran = std::fs::read_to_string(env().get("VIGIL_DEV_SSH_COMMAND_LOG")).unwrap();
    assert!(
        ran.lines()
            .skip(commands_before)
            .any(|l| l.ends_with(&format!("\texec\t{marker}"))),
        "the host's login shell did not run {marker:?}"
    );

    eprintln!("phase: kubectl through HAProxy, with the printed kubeconfig");
    // agent-ops is impersonated with its groups prefixed vigil:, and vigil:dba may act.
    vigil_chaos::kube::grant_dba().await;
    let kube_before = vigil_chaos::kube::audit_len();
    let kubeconfig = cluster.dir.path().join("kubeconfig");
    let out = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--token", &agent, "--request-timeout", "30s"])
        .args(["get", "namespaces", "-o", "name"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("namespace/default"));
    let seen = vigil_chaos::kube::audit_events(kube_before);
    assert!(
        seen.iter()
            .any(|e| e["impersonatedUser"]["username"] == "agent-ops"
                && e["objectRef"]["resource"] == "namespaces"),
        "the API server saw no namespaces request as agent-ops"
    );

    eprintln!("phase: both on record with the client's address, HAProxy's apart");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = all_records(&cluster);
        let by_protocol = |protocol: &str| {
            records
                .iter()
                .filter(|r| r.body.kind == Kind::Request)
                .filter_map(|r| r.body.connection.as_deref())
                .find(|c| c.protocol == protocol)
                .cloned()
        };
        if let (Some(ssh), Some(kube)) = (by_protocol("ssh"), by_protocol("kubernetes")) {
            for conn in [ssh, kube] {
                assert!(conn.client_addr.starts_with("127.0.0.1:"), "{conn:?}");
                assert!(
                    conn.balancer_addr
                        .as_deref()
                        .is_some_and(|b| b.starts_with("127.0.0.2:")),
                    "{conn:?}"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ssh and kubernetes requests on record"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    verify_everything(&cluster).await;
}
