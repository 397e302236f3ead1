//! The local cluster of `deploy/cluster.sh` (three coordinator members, three gateway nodes
//! with the Kafka sink, HAProxy in front; the dev PostgreSQL, OIDC provider and broker behind)
//! under faults. The script is what starts, restarts and stops everything here, so it is
//! tested along the way. Judged by invariants: the balancer's clients get back in within 3 s,
//! every statement PostgreSQL ran (its `log_statement=all` log) is in the audit topic, and the
//! topic verifies.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use vigil_chaos::*;
use vigil_proto::record::{Kind, Record, Request};

const NODES: usize = 3;

/// The first of `n` consecutive loopback ports that are all free now (cluster.sh numbers its
/// members' and nodes' ports from a base), away from the dev (25xxx) and CI (35xxx) servers.
fn free_ports(n: u16) -> u16 {
    loop {
        let base = 28_000 + rand::random::<u16>() % 4_000;
        if (base..base + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
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
    coordinator_port: u16,
    node_pg_port: u16,
    node_admin_port: u16,
    topic: String,
    db: String,
}

impl LocalCluster {
    /// Starts the cluster; with the psql command line `up` printed.
    async fn up() -> (Self, String) {
        // One block of free ports: HAProxy's two, then three per kind of member and node port.
        let base = free_ports(2 + 3 + 2 * NODES as u16);
        let cluster = LocalCluster {
            dir: tempfile::tempdir().unwrap(),
            pg_port: base,
            stats_port: base + 1,
            coordinator_port: base + 2,
            node_pg_port: base + 5,
            node_admin_port: base + 5 + NODES as u16,
            topic: format!("cluster-{}", random_suffix()),
            db: create_database().await,
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
            .env("VIGIL_CLUSTER_TOPIC", &self.topic)
            .env("VIGIL_CLUSTER_DATABASE", &self.db)
            .env("VIGIL_BIN_DIR", bins)
            .stdin(Stdio::null())
            .output()
            .expect("run deploy/cluster.sh")
    }

    /// The PID cluster.sh recorded for node `i` (1-based).
    fn node_pid(&self, i: usize) -> String {
        let path = self.dir.path().join(format!("node-{i}/pid"));
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
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
                Err(_) => {
                    broken_since.get_or_insert_with(Instant::now);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    seen
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
    // An SSLRequest, as psql would send next.
    s.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await.unwrap();
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
    eprintln!("phase: {CLIENTS} clients through HAProxy");
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at = Arc::new(std::sync::Mutex::new(None));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|w| {
            let conn = format!(
                "host=127.0.0.1 port={} user=agent dbname=app password={token} application_name=cluster-w{w} connect_timeout=2",
                cluster.pg_port
            );
            tokio::spawn(client(w, conn, stop.clone(), killed_at.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The node with the most sessions, so that the kill breaks some and leaves others.
    let sessions = cluster.sessions().await;
    let (victim, on_victim) = *sessions.iter().max_by_key(|(_, n)| *n).unwrap();
    assert_eq!(sessions.len(), NODES, "{sessions:?}");
    assert!(
        on_victim > 0 && on_victim < CLIENTS as u64,
        "sessions spread over the nodes: {sessions:?}"
    );
    eprintln!("phase: kill -9 node-{victim} ({on_victim} sessions; all: {sessions:?})");
    *killed_at.lock().unwrap() = Some(Instant::now());
    let status = Command::new("kill")
        .args(["-9", &cluster.node_pid(victim)])
        .status()
        .unwrap();
    assert!(status.success());
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for w in workers {
        seen.push(w.await.unwrap());
    }

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
    let ran: BTreeSet<String> = pg_executed(&cluster.db, log_start)
        .into_iter()
        .map(|r| r.text)
        .collect();
    let answered: usize = seen.iter().map(|s| s.answered).sum();
    assert!(
        ran.len() >= answered,
        "PostgreSQL logged {} statements, the clients had {answered} answered",
        ran.len()
    );
    // Until the topic holds every statement PostgreSQL ran and every one the nodes' local logs
    // recorded (the restarted node ships what its spool kept), and each node's streams: one
    // per process, so two for the killed node.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let records: Vec<Record> = topic_messages(&cluster.topic)
            .iter()
            .filter(|m| !m.checkpoint)
            .map(|m| Record::parse(&m.value).expect("a record in the topic"))
            .collect();
        let in_topic = audited_statements(records.iter());
        let local: Vec<Record> = (1..=NODES)
            .flat_map(|i| read_records(&cluster.audit_dir(i)))
            .collect();
        let not_audited: Vec<&String> = ran.difference(&in_topic).collect();
        let local = audited_statements(local.iter());
        let not_shipped: Vec<&String> = local.difference(&in_topic).collect();
        let streams: BTreeSet<&str> = records.iter().map(|r| r.stream.as_str()).collect();
        let per_node: Vec<usize> = (1..=NODES)
            .map(|i| {
                let prefix = format!("gw-{i}:");
                streams.iter().filter(|s| s.starts_with(&prefix)).count()
            })
            .collect();
        let want: Vec<usize> = (1..=NODES)
            .map(|i| if i == victim { 2 } else { 1 })
            .collect();
        if not_audited.is_empty() && not_shipped.is_empty() && per_node == want {
            eprintln!(
                "  {} statements ran, all in the topic ({} records)",
                ran.len(),
                records.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 60 s: {} of {} statements PostgreSQL ran are not in the topic (e.g. {:?}); \
             {} recorded locally are not either (e.g. {:?}); streams per node {per_node:?}, \
             want {want:?}",
            not_audited.len(),
            ran.len(),
            &not_audited[..not_audited.len().min(5)],
            not_shipped.len(),
            &not_shipped[..not_shipped.len().min(5)],
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    eprintln!("phase: vigil audit verify over the topic and every node's local log");
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
    eprintln!("{report}");
    for i in 1..=NODES {
        let dir = cluster.audit_dir(i);
        let (code, report) =
            vigil_async(&["audit", "verify", "--log", dir.to_str().unwrap()]).await;
        assert_eq!(code, 0, "node-{i}: {report}");
    }
}
