//! `kube-load`: the load generator of loadtest/kube.sh. A kube-rs client, configured from a
//! kubeconfig as any kube-rs program is, runs a request loop against a Kubernetes API server:
//! directly, or through Vigil's gateway (the script gives it one kubeconfig for each).
//!
//! - `seed`: creates a namespace and N Pods in it (no scheduler places them in the dev cluster:
//!   the objects are what a LIST reads).
//! - `run`: CONCURRENCY callers share one client (as the tasks of one program do; hyper opens
//!   a connection per caller in flight) and repeat one call — GET of one Pod, or LIST of the
//!   namespace's Pods — for WARMUP seconds, then SECONDS measured. It prints one JSON line:
//!   calls completed inside the measured window, errors, calls per second, p50/p99 latency,
//!   and the CPU (utime+stime, clock ticks, from /proc/PID/stat) that each `--pid NAME=PID`
//!   process used over exactly that window (and its own, as `kube-load`). With `--samples FILE` it also writes each
//!   measured latency (µs, one per line) for percentiles over several runs.

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "kube-rs load generator for loadtest/kube.sh")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the namespace and its Pods (those that exist are kept).
    Seed {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long)]
        namespace: String,
        #[arg(long, default_value_t = 100)]
        pods: usize,
    },
    /// Run the request loop and print its figures as one JSON line.
    Run {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long)]
        namespace: String,
        #[arg(long, value_enum)]
        op: Op,
        /// The Pod of `--op get`.
        #[arg(long, default_value = "pod-000")]
        pod: String,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Write every measured latency (µs) here, one per line.
        #[arg(long)]
        samples: Option<PathBuf>,
        /// NAME=PID: report this process's CPU over the measured window (repeatable).
        #[arg(long = "pid", value_parser = named_pid)]
        pids: Vec<(String, u32)>,
        /// Print a tab-separated line instead of JSON: calls, errors, seconds, calls per
        /// second, p50 µs, p99 µs, then the CPU ticks of each `--pid` in order, then its own.
        #[arg(long)]
        tsv: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Op {
    /// GET of one Pod.
    Get,
    /// LIST of every Pod of the namespace.
    List,
}

fn named_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("expected NAME=PID")?;
    let pid = pid.parse().map_err(|e| format!("{pid:?}: {e}"))?;
    Ok((name.to_string(), pid))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Seed {
            kubeconfig,
            namespace,
            pods,
        } => seed(&client(&kubeconfig).await?, &namespace, pods).await,
        Command::Run {
            kubeconfig,
            namespace,
            op,
            pod,
            concurrency,
            seconds,
            warmup,
            samples,
            pids,
            tsv,
        } => {
            if concurrency == 0
                || seconds.is_nan()
                || seconds <= 0.0
                || warmup.is_nan()
                || warmup < 0.0
            {
                bail!("--concurrency and --seconds must be > 0, --warmup >= 0");
            }
            let pods: Api<Pod> = Api::namespaced(client(&kubeconfig).await?, &namespace);
            let window = Window::new(warmup, seconds);
            let report = run(pods, op, &pod, concurrency, window, &pids).await?;
            if let Some(path) = samples {
                let lines: String = report
                    .latencies_us
                    .iter()
                    .map(|l| format!("{l}\n"))
                    .collect();
                std::fs::write(&path, lines).with_context(|| format!("write {path:?}"))?;
            }
            if let Some(e) = &report.first_error {
                eprintln!("kube-load: {} errors; the first: {e}", report.errors);
            }
            if tsv {
                println!("{}", report.tsv());
            } else {
                println!("{}", report.json(op, concurrency));
            }
            Ok(())
        }
    }
}

async fn client(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let file = Kubeconfig::read_from(kubeconfig).with_context(|| format!("{kubeconfig:?}"))?;
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("{kubeconfig:?}"))?;
    Ok(kube::Client::try_from(config)?)
}

/// An answer "already exists" is as good as created.
fn created<T>(result: kube::Result<T>) -> kube::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn seed(client: &kube::Client, namespace: &str, count: usize) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(namespace.to_string()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    // A namespace deleted by the previous run may still be terminating: it takes no new Pods,
    // and is gone a moment later.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match namespaces.get_opt(namespace).await? {
            Some(n) if n.metadata.deletion_timestamp.is_none() => break,
            Some(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Some(_) => bail!("namespace {namespace} is still being deleted"),
            None => created(namespaces.create(&PostParams::default(), &ns).await)
                .with_context(|| format!("create namespace {namespace}"))?,
        }
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for i in 0..count {
        let pod = pod(&format!("pod-{i:03}"));
        // A new namespace gets its `default` ServiceAccount from the controller manager a
        // moment later; until then the API server's admission refuses Pods.
        let mut tries = 0;
        loop {
            match created(pods.create(&PostParams::default(), &pod).await) {
                Ok(()) => break,
                Err(e) if tries < 100 => {
                    tries += 1;
                    if tries == 1 {
                        eprintln!("kube-load: waiting to create Pods in {namespace}: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e).context("create a Pod"),
            }
        }
    }
    let n = pods.list(&ListParams::default()).await?.items.len();
    if n < count {
        bail!("{namespace} holds {n} Pods, fewer than {count}");
    }
    eprintln!("kube-load: {namespace} holds {n} Pods");
    Ok(())
}

/// A Pod as a small Deployment's would be: labels, one container with resources.
fn pod(name: &str) -> Pod {
    let labels = BTreeMap::from([
        ("app".to_string(), "load".to_string()),
        ("tier".to_string(), "web".to_string()),
    ]);
    let resources = BTreeMap::from([
        (
            "cpu".to_string(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("50m".into()),
        ),
        (
            "memory".to_string(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("64Mi".into()),
        ),
    ]);
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "web".into(),
                image: Some("vigil/none:1".into()),
                args: Some(vec!["--port=8080".into()]),
                resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
                    requests: Some(resources),
                    ..Default::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// The measured window: calls that start at or after `from` and end by `to` count.
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    to: Instant,
}

impl Window {
    fn new(warmup: f64, seconds: f64) -> Self {
        let from = Instant::now() + Duration::from_secs_f64(warmup);
        Self {
            from,
            to: from + Duration::from_secs_f64(seconds),
        }
    }
}

struct Report {
    calls: usize,
    errors: usize,
    first_error: Option<String>,
    seconds: f64,
    latencies_us: Vec<u64>,
    /// (name, clock ticks over the window)
    cpu: Vec<(String, u64)>,
}

impl Report {
    /// The p50 and p99 latency (µs, nearest rank).
    fn percentiles(&self) -> (u64, u64) {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let pct = |p: f64| {
            let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len().max(1));
            sorted.get(rank - 1).copied().unwrap_or(0)
        };
        (pct(0.50), pct(0.99))
    }

    fn tsv(&self) -> String {
        let (p50, p99) = self.percentiles();
        let mut fields = vec![
            self.calls.to_string(),
            self.errors.to_string(),
            format!("{:.3}", self.seconds),
            format!("{:.1}", self.calls as f64 / self.seconds),
            p50.to_string(),
            p99.to_string(),
        ];
        fields.extend(self.cpu.iter().map(|(_, ticks)| ticks.to_string()));
        fields.join("\t")
    }

    fn json(&self, op: Op, concurrency: usize) -> serde_json::Value {
        let (p50, p99) = self.percentiles();
        serde_json::json!({
            "op": match op { Op::Get => "get", Op::List => "list" },
            "concurrency": concurrency,
            "calls": self.calls,
            "errors": self.errors,
            "first_error": self.first_error,
            "seconds": self.seconds,
            "per_second": self.calls as f64 / self.seconds,
            "p50_us": p50,
            "p99_us": p99,
            "cpu_ticks": self.cpu.iter().cloned().collect::<BTreeMap<_, _>>(),
        })
    }
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid}"))?;
    // The command name is in parentheses and may hold spaces: the fields after it, from the
    // state (field 3) on; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').context("a /proc stat line")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i - 3).context("a short stat line")?.parse()?)
    };
    Ok(field(14)? + field(15)?)
}

fn sample(pids: &[(String, u32)]) -> anyhow::Result<Vec<u64>> {
    pids.iter().map(|(_, pid)| cpu_ticks(*pid)).collect()
}

/// One caller: repeats the call until the window ends; the latencies of the calls inside it.
async fn caller(
    pods: Api<Pod>,
    op: Op,
    pod: Arc<str>,
    window: Window,
) -> (Vec<u64>, usize, Option<String>) {
    let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0, None);
    let list = ListParams::default();
    loop {
        let start = Instant::now();
        if start >= window.to {
            break;
        }
        let result = match op {
            Op::Get => pods.get(&pod).await.map(|_| ()),
            Op::List => pods.list(&list).await.map(|_| ()),
        };
        let end = Instant::now();
        match result {
            Ok(()) if start >= window.from && end <= window.to => {
                latencies.push((end - start).as_micros() as u64)
            }
            Ok(()) => {}
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    (latencies, errors, first_error)
}

async fn run(
    pods: Api<Pod>,
    op: Op,
    pod: &str,
    concurrency: usize,
    window: Window,
    pids: &[(String, u32)],
) -> anyhow::Result<Report> {
    let pod: Arc<str> = pod.into();
    // The generator's own CPU too: it shares the machine with what it measures.
    let mut pids = pids.to_vec();
    pids.push(("kube-load".into(), std::process::id()));
    let pids = &pids[..];
    let callers: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(caller(pods.clone(), op, pod.clone(), window)))
        .collect();
    tokio::time::sleep_until(window.from.into()).await;
    let before = sample(pids)?;
    tokio::time::sleep_until(window.to.into()).await;
    let after = sample(pids)?;
    let mut report = Report {
        calls: 0,
        errors: 0,
        first_error: None,
        seconds: (window.to - window.from).as_secs_f64(),
        latencies_us: Vec::new(),
        cpu: pids
            .iter()
            .zip(before.iter().zip(&after))
            .map(|((name, _), (b, a))| (name.clone(), a.saturating_sub(*b)))
            .collect(),
    };
    for c in callers {
        let (latencies, errors, first_error) = c.await?;
        report.calls += latencies.len();
        report.latencies_us.extend(latencies);
        report.errors += errors;
        if report.first_error.is_none() {
            report.first_error = first_error;
        }
    }
    Ok(report)
}
