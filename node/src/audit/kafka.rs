//! The Kafka sink: ships the local log to the audit topic. The local log is the spool.
//!
//! - One idempotent producer (`enable.idempotence`, `acks=all`), messages retried until the
//!   broker acknowledges them (`message.timeout.ms=0`); the key is the stream id, so one
//!   stream's records stay in order in one partition; the value is the record's exact bytes
//!   (the same bytes as the line in the local log, the bytes that were hashed).
//! - A record leaves the spool only when the broker acknowledged it: the shipper keeps, next to
//!   each stream file, a cursor (`<file>.acked`: byte offset and record count acknowledged).
//!   On start it sends every unacknowledged tail again, oldest stream first, in order; the
//!   broker may then hold a record twice, byte for byte the same (verifiers count those).
//! - No future per record: the producer (a `BaseProducer`, no thread of its own) is polled by
//!   the shipper, and its context ([`Acks`]) keeps how far the run of the stream's acknowledged
//!   records reaches (one stream, one partition, an idempotent producer: the reports come in
//!   order). A failed report, or one out of order, sends everything after the cursor again.
//!   While records are in flight the shipper works in rounds of `linger.ms` (hand over what was
//!   written meanwhile, take the acknowledgements, move the cursor), however many records that
//!   is; with nothing in flight it waits for the writer.
//! - While the broker is away the gateway keeps serving and the spool grows; past
//!   `spool_max_bytes` statements are refused before the target ([`crate::audit::Spool`]).
//! - Every checkpoint interval the shipper publishes a signed checkpoint of how far the broker
//!   has acknowledged (header `vigil-kind: checkpoint`, same key, value the checkpoint JSON).

use crate::audit::{log_files, stream_of, Spool};
use crate::config::{Compression, KafkaConfig};
use crate::core::metrics::Metrics;
use ed25519_dalek::SigningKey;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use vigil_proto::checkpoint::Checkpoint;

/// The largest message the producer sends (librdkafka's own ceiling is 1,000,000,000).
pub const MAX_RECORD_BYTES: usize = 128 * 1024 * 1024;

/// The header that marks a checkpoint message (records have none).
pub const KIND_HEADER: &str = "vigil-kind";

/// The producer, with Vigil's settings over the operator's overrides. It has no thread of its
/// own for its events: the shipper polls it ([`Acks`] takes the delivery reports).
pub fn producer(cfg: &KafkaConfig) -> Result<BaseProducer<Acks>, KafkaError> {
    let mut c = ClientConfig::new();
    for (k, v) in &cfg.overrides {
        c.set(k, v);
    }
    c.set("bootstrap.servers", cfg.brokers.join(","))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        // Deliver until acknowledged: the spool, not a timeout, bounds what waits.
        .set("message.timeout.ms", "0")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set(
            "compression.type",
            match cfg.compression {
                Compression::None => "none",
                Compression::Gzip => "gzip",
                Compression::Lz4 => "lz4",
                Compression::Zstd => "zstd",
            },
        )
        .set(
            "queue.buffering.max.messages",
            (cfg.max_in_flight_records + 1000).to_string(),
        )
        .set("queue.buffering.max.kbytes", "2097151")
        // A record is as large as its statement and recorded rows; the topic's
        // max.message.bytes must allow as much (docs/operations.md).
        .set("message.max.bytes", MAX_RECORD_BYTES.to_string());
    c.create_with_context(Acks::default())
}

/// The delivery opaque of a checkpoint message; a record's is its [`Acks::opaque`].
const CHECKPOINT_OPAQUE: usize = 1 << 63;
/// A record's opaque: the generation in bits 48..62, the record's number in its stream (its
/// cursor's `records` once acknowledged) below.
const SEQ_BITS: u32 = 48;

/// The producer's context: takes the delivery reports, which `BaseProducer::poll` hands over on
/// the shipper's own task, in the order of each partition. A stream's records go, in order, to
/// one partition of an idempotent producer, so their reports come in order too; the shipper
/// reads how far the acknowledged run reaches instead of waiting on one future per record.
#[derive(Default)]
pub struct Acks(Mutex<AckState>);

#[derive(Default)]
struct AckState {
    /// Records handed over before the last `restart` carry another generation: ignored.
    generation: u16,
    /// The stream's records acknowledged without a gap: the number of the last one.
    records: u64,
    /// The first delivery that failed (or came out of order) since the last `restart`.
    failed: Option<KafkaError>,
    /// Checkpoints handed to the producer, and those whose delivery was reported (acknowledged
    /// or failed).
    checkpoints_sent: u64,
    checkpoints_reported: u64,
}

impl Acks {
    fn state(&self) -> std::sync::MutexGuard<'_, AckState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, reports of what was handed over before are ignored; the acknowledged run
    /// starts after record number `records` (the cursor's). Returns the new generation.
    fn restart(&self, records: u64) -> u16 {
        let mut s = self.state();
        s.generation = (s.generation + 1) & 0x7fff;
        s.records = records;
        s.failed = None;
        s.generation
    }

    fn opaque(generation: u16, record: u64) -> usize {
        ((generation as usize) << SEQ_BITS) | (record as usize & ((1 << SEQ_BITS) - 1))
    }

    /// The number of the last record of the acknowledged run, and the first failure.
    fn take(&self) -> (u64, Option<KafkaError>) {
        let mut s = self.state();
        (s.records, s.failed.take())
    }

    /// Whether every checkpoint handed over has had its delivery reported.
    fn checkpoints_reported(&self) -> bool {
        let s = self.state();
        s.checkpoints_reported >= s.checkpoints_sent
    }
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let result = result.as_ref().map(|_| ()).map_err(|(e, _)| e);
        self.state().report(opaque, result);
    }
}

impl AckState {
    /// One delivery report: a checkpoint's, or a record's (`opaque` from [`Acks::opaque`]).
    fn report(&mut self, opaque: usize, result: Result<(), &KafkaError>) {
        if opaque == CHECKPOINT_OPAQUE {
            self.checkpoints_reported += 1;
            if let Err(e) = result {
                tracing::warn!(error = %e, "a checkpoint was not delivered");
            }
            return;
        }
        if (opaque >> SEQ_BITS) as u16 != self.generation || self.failed.is_some() {
            return;
        }
        let record = (opaque & ((1 << SEQ_BITS) - 1)) as u64;
        match result {
            Ok(()) if record == self.records + 1 => self.records = record,
            // Never expected (one partition, in order); sent again from the cursor.
            Ok(()) => {
                tracing::warn!(
                    record,
                    after = self.records,
                    "a delivery report out of order"
                );
                self.failed = Some(KafkaError::MessageProduction(RDKafkaErrorCode::Fail));
            }
            Err(e) => self.failed = Some(e.clone()),
        }
    }
}

/// `<file>.acked`: how far the broker has acknowledged a stream file.
fn cursor_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".acked");
    PathBuf::from(name)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Cursor {
    offset: u64,
    records: u64,
}

fn read_cursor(file: &Path) -> Cursor {
    let text = std::fs::read_to_string(cursor_path(file)).unwrap_or_default();
    let mut parts = text.split_whitespace().map(|p| p.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(offset), Some(records)) => Cursor { offset, records },
        _ => Cursor::default(),
    }
}

/// Written to a temporary file and renamed, so a crash leaves the old cursor or the new one.
fn write_cursor(file: &Path, c: Cursor) -> std::io::Result<()> {
    let path = cursor_path(file);
    let tmp = path.with_extension("acked.tmp");
    std::fs::write(&tmp, format!("{} {}\n", c.offset, c.records))?;
    std::fs::rename(tmp, path)
}

/// The stream files in `dir` with a tail the broker has not acknowledged, oldest first, and how
/// many bytes each has. Call before this process opens its own stream file.
pub fn unacknowledged_tails(dir: &Path) -> Vec<(PathBuf, u64)> {
    log_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let len = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
            let unacked = len.saturating_sub(read_cursor(&f).offset);
            (f, unacked)
        })
        .filter(|(_, unacked)| *unacked > 0)
        .collect()
}

pub struct Shipper {
    cfg: KafkaConfig,
    producer: BaseProducer<Acks>,
    metrics: Arc<Metrics>,
    spool: Arc<Spool>,
    key: Arc<SigningKey>,
    checkpoint_every: Duration,
    /// Earlier streams' unacknowledged tails ([`unacknowledged_tails`]), sent first.
    earlier: Vec<(PathBuf, u64)>,
}

/// How far one stream file is shipped: acknowledged, persisted, checkpointed.
struct Tail {
    acked: Cursor,
    /// The cursor last written to disk, and when.
    persisted: (Cursor, Instant),
    /// Where the last acknowledged record starts (its hash is computed only when a checkpoint
    /// needs it).
    last_start: Option<u64>,
    checkpointed: Option<u64>,
    next_checkpoint: Instant,
}

impl Tail {
    fn new(acked: Cursor, checkpoint_every: Duration) -> Self {
        Self {
            acked,
            persisted: (acked, Instant::now()),
            last_start: None,
            checkpointed: None,
            next_checkpoint: Instant::now() + checkpoint_every,
        }
    }
}

/// The most the shipper reads of a stream file at once.
const CHUNK: usize = 256 * 1024;

/// One read of a stream file from the acknowledged cursor: what was read, and what is handed
/// to the producer and not yet acknowledged.
struct Reading {
    f: Arc<std::fs::File>,
    /// The live stream's file, just written and in the page cache, is read on the shipper's
    /// own task; an earlier stream's, which may have to come from the disk, on a blocking
    /// thread.
    live: bool,
    /// The end of the last record handed over.
    read_to: Cursor,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed to the producer (dropped once per round).
    used: usize,
    chunk: Vec<u8>,
    /// The delivery reports of this reading's records carry this generation ([`Acks`]).
    generation: u16,
    /// (start offset, end cursor, when handed over), in order
    inflight: VecDeque<(u64, Cursor, Instant)>,
}

impl Reading {
    fn open(file: &Path, at: Cursor, live: bool, acks: &Acks) -> Option<Self> {
        let f = std::fs::File::open(file)
            .map_err(|e| tracing::error!(file = %file.display(), error = %e, "cannot open the spool file"))
            .ok()?;
        Some(Self {
            f: Arc::new(f),
            live,
            read_to: at,
            buf: Vec::with_capacity(CHUNK),
            used: 0,
            chunk: vec![0u8; CHUNK],
            generation: acks.restart(at.records),
            inflight: VecDeque::new(),
        })
    }

    /// Reads up to `len` bytes at `at` into `chunk`.
    async fn read(&mut self, at: u64, len: usize) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        if self.live {
            return self.f.read_at(&mut self.chunk[..len], at);
        }
        let f = self.f.clone();
        let mut chunk = std::mem::take(&mut self.chunk);
        let joined = tokio::task::spawn_blocking(move || {
            let n = f.read_at(&mut chunk[..len], at);
            (chunk, n)
        })
        .await;
        match joined {
            Ok((chunk, n)) => {
                self.chunk = chunk;
                n
            }
            Err(e) => {
                self.chunk = vec![0u8; CHUNK];
                Err(std::io::Error::other(e))
            }
        }
    }

    /// How far the file has been read.
    fn file_pos(&self) -> u64 {
        self.read_to.offset + (self.buf.len() - self.used) as u64
    }
}

impl super::sink::AuditSink for Shipper {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn run(
        self: Box<Self>,
        current: PathBuf,
        stop: watch::Receiver<bool>,
        drain: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin((*self).run(current, stop, drain))
    }
}

impl Shipper {
    /// The spool accounting and its gauge count `earlier` from here on, before the first
    /// statement (so a restarted node neither shows an empty spool nor accepts more than
    /// `spool_max_bytes` while it resends a tail).
    pub fn new(
        cfg: KafkaConfig,
        metrics: Arc<Metrics>,
        spool: Arc<Spool>,
        key: Arc<SigningKey>,
        checkpoint_every: Duration,
        earlier: Vec<(PathBuf, u64)>,
    ) -> Result<Self, KafkaError> {
        let waiting: u64 = earlier.iter().map(|(_, u)| u).sum();
        spool.earlier.store(waiting, Ordering::Relaxed);
        metrics.spool_bytes.set(waiting as i64);
        Ok(Self {
            producer: producer(&cfg)?,
            cfg,
            metrics,
            spool,
            key,
            checkpoint_every,
            earlier,
        })
    }

    /// Ships the earlier streams' tails until their end, then `current` until `stop` turns
    /// true and everything written has been acknowledged (or `drain` has passed after the
    /// stop).
    pub async fn run(self, current: PathBuf, stop: watch::Receiver<bool>, drain: Duration) {
        let mut rest: u64 = self.earlier.iter().map(|(_, u)| u).sum();
        for (file, unacked) in &self.earlier {
            rest -= unacked;
            tracing::info!(file = %file.display(), "sending the unacknowledged tail of an earlier stream");
            self.ship(file, Some(rest), stop.clone(), drain).await;
        }
        self.spool.earlier.store(0, Ordering::Relaxed);
        self.ship(&current, None, stop, drain).await;
        let _ = self.producer.flush(Duration::from_secs(5));
    }

    fn send(&self, stream: &str, line: &[u8], opaque: usize) -> Result<(), KafkaError> {
        let record = BaseRecord::with_opaque_to(&self.cfg.topic, opaque)
            .key(stream)
            .payload(line);
        self.producer.send(record).map_err(|(e, _)| e)
    }

    /// Hands a checkpoint to the producer; `false` if it could not.
    fn publish_checkpoint(&self, stream: &str, seq: u64, hash: &str) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let cp = Checkpoint::sign(&self.key, stream, seq, hash, now);
        let Ok(value) = serde_json::to_vec(&cp) else {
            return false;
        };
        let headers = OwnedHeaders::new().insert(Header {
            key: KIND_HEADER,
            value: Some("checkpoint"),
        });
        let record = BaseRecord::with_opaque_to(&self.cfg.topic, CHECKPOINT_OPAQUE)
            .key(stream)
            .payload(&value)
            .headers(headers);
        let sent = self.producer.send(record).is_ok();
        if sent {
            self.producer.context().state().checkpoints_sent += 1;
        }
        sent
    }

    /// How often the shipper looks for acknowledgements and new records while some are in
    /// flight: the producer's own linger, so a round hands over about one batch.
    fn tick(&self) -> Duration {
        Duration::from_millis(self.cfg.linger_ms.clamp(1, 50))
    }

    /// Ships one stream file. `earlier`: `None` for this process's own (live) stream, which is
    /// tailed; for an earlier stream, the unacknowledged bytes of the earlier streams still
    /// after it (for the spool accounting).
    async fn ship(
        &self,
        file: &Path,
        earlier: Option<u64>,
        mut stop: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let live = earlier.is_none();
        // How far the file holds whole records: the writer says so for the live stream; an
        // earlier stream's file no longer changes.
        let fixed_len = (!live).then(|| std::fs::metadata(file).map(|m| m.len()).unwrap_or(0));
        let written =
            || fixed_len.unwrap_or_else(|| self.spool.written_bytes.load(Ordering::Relaxed));
        let Some(stream) = stream_of(file) else {
            tracing::warn!(file = %file.display(), "not a stream file; not shipped");
            return;
        };
        let mut tail = Tail::new(read_cursor(file), self.checkpoint_every);
        let mut stopping_since: Option<Instant> = None;
        'reopen: loop {
            let Some(mut r) = Reading::open(file, tail.acked, live, self.producer.context()) else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            loop {
                let eof = self.hand_over(&stream, &mut r, written()).await;
                let failed = self.collect(&mut r, &mut tail);
                self.account(
                    file,
                    earlier,
                    written(),
                    &mut tail,
                    r.inflight.front().map(|i| i.2),
                );
                if tail.last_start.is_some() && Instant::now() >= tail.next_checkpoint {
                    if self.checkpoint(file, &stream, &mut tail).is_none() {
                        self.metrics.checkpoint_errors.inc();
                    }
                    tail.next_checkpoint = Instant::now() + self.checkpoint_every;
                }
                if failed {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue 'reopen;
                }
                let idle = eof && r.inflight.is_empty();
                if idle && !live {
                    if r.buf.len() > r.used {
                        // A torn record (see `audit::check_earlier_streams`): never a record,
                        // not sent; everything before it is.
                        tracing::warn!(file = %file.display(), bytes = r.buf.len() - r.used, "not sending the torn last line of an earlier stream");
                    }
                    break 'reopen;
                }
                if *stop.borrow() {
                    let since = *stopping_since.get_or_insert_with(Instant::now);
                    let drained = idle && r.buf.len() == r.used;
                    if (drained && tail.acked.offset >= written()) || since.elapsed() > drain {
                        break 'reopen;
                    }
                }
                // Nothing in flight: wait for the writer. Otherwise a round per tick hands over
                // what was written meanwhile and takes the acknowledgements, however many
                // records that is (no wake-up per record).
                if idle {
                    tokio::select! {
                        _ = self.spool.notify.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = stop.changed() => {}
                    }
                } else {
                    tokio::select! {
                        _ = tokio::time::sleep(self.tick()) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
        // The last checkpoint of this stream, for what the broker holds.
        if let Some(true) = self.checkpoint(file, &stream, &mut tail) {
            let deadline = Instant::now() + Duration::from_secs(5);
            self.poll();
            while !self.producer.context().checkpoints_reported() && Instant::now() < deadline {
                tokio::time::sleep(self.tick()).await;
                self.poll();
            }
        }
        tail.persisted.1 = Instant::now() - Duration::from_secs(1);
        self.account(file, earlier, written(), &mut tail, None);
    }

    /// Hands complete lines to the producer while there is room, reading more of the file (up
    /// to `written`, what holds whole records) as needed. Returns whether everything written
    /// was handed over.
    async fn hand_over(&self, stream: &str, r: &mut Reading, written: u64) -> bool {
        let mut now = None;
        while r.inflight.len() < self.cfg.max_in_flight_records {
            if let Some(pos) = memchr::memchr(b'\n', &r.buf[r.used..]) {
                let opaque = Acks::opaque(r.generation, r.read_to.records + 1);
                match self.send(stream, &r.buf[r.used..r.used + pos], opaque) {
                    Ok(()) => {
                        let start = r.read_to.offset;
                        r.read_to.offset += pos as u64 + 1;
                        r.read_to.records += 1;
                        let at = *now.get_or_insert_with(Instant::now);
                        r.inflight.push_back((start, r.read_to, at));
                        r.used += pos + 1;
                    }
                    Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                        return false
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot hand a record to the producer");
                        self.metrics.kafka_delivery_errors.inc();
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        return false;
                    }
                }
                continue;
            }
            let pos = r.file_pos();
            if pos >= written {
                return true;
            }
            r.buf.drain(..r.used);
            r.used = 0;
            let want = r.chunk.len().min((written - pos) as usize);
            match r.read(pos, want).await {
                Ok(0) => return true,
                Ok(n) => r.buf.extend_from_slice(&r.chunk[..n]),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the spool file");
                    return true;
                }
            }
        }
        false
    }

    /// Serves the producer's events: delivery reports go to [`Acks`].
    fn poll(&self) {
        // One event (a batch's reports) per call; stop when a call served none.
        for _ in 0..1000 {
            let before = self.producer.in_flight_count();
            self.producer.poll(Duration::ZERO);
            if self.producer.in_flight_count() == before {
                break;
            }
        }
    }

    /// Takes the acknowledgements, in order. Returns whether a delivery failed (everything
    /// from the acknowledged cursor is sent again).
    fn collect(&self, r: &mut Reading, tail: &mut Tail) -> bool {
        self.poll();
        let (acked, failed) = self.producer.context().take();
        let mut n = 0;
        while let Some(&(start, end, _)) = r.inflight.front() {
            if end.records > acked {
                break;
            }
            tail.acked = end;
            tail.last_start = Some(start);
            r.inflight.pop_front();
            n += 1;
        }
        self.metrics.kafka_acked_records.inc_by(n);
        match failed {
            Some(e) => {
                tracing::warn!(error = %e, "delivery failed; sending again from the spool");
                self.metrics.kafka_delivery_errors.inc();
                true
            }
            None => false,
        }
    }

    /// Publishes a checkpoint of the last acknowledged record, unless it has one already.
    /// `None`: it could not be published; `Some(false)`: nothing new to checkpoint.
    fn checkpoint(&self, file: &Path, stream: &str, tail: &mut Tail) -> Option<bool> {
        let (Some(start), true) = (tail.last_start, tail.acked.records > 0) else {
            return Some(false);
        };
        let seq = tail.acked.records - 1;
        if tail.checkpointed == Some(seq) {
            return Some(false);
        }
        let hash = line_hash(file, start, tail.acked.offset)?;
        if !self.publish_checkpoint(stream, seq, &hash) {
            return None;
        }
        tail.checkpointed = Some(seq);
        Some(true)
    }

    /// Moves the cursor on disk and updates the spool accounting and metrics.
    fn account(
        &self,
        file: &Path,
        earlier: Option<u64>,
        written: u64,
        tail: &mut Tail,
        oldest: Option<Instant>,
    ) {
        let acked = tail.acked;
        // At most every 100 ms: a crash then resends at most that much (identical duplicates).
        if acked != tail.persisted.0 && tail.persisted.1.elapsed() >= Duration::from_millis(100) {
            match write_cursor(file, acked) {
                Ok(()) => tail.persisted = (acked, Instant::now()),
                Err(e) => tracing::warn!(error = %e, "cannot write the spool cursor"),
            }
        }
        let unacked = written.saturating_sub(acked.offset);
        match earlier {
            None => {
                self.spool.acked.store(acked.offset, Ordering::Relaxed);
                self.metrics.spool_records.set(
                    self.spool
                        .written_records
                        .load(Ordering::Relaxed)
                        .saturating_sub(acked.records) as i64,
                );
            }
            Some(rest) => self.spool.earlier.store(unacked + rest, Ordering::Relaxed),
        }
        let own = if earlier.is_none() { unacked } else { 0 };
        self.metrics
            .spool_bytes
            .set((own + self.spool.earlier.load(Ordering::Relaxed)) as i64);
        let age = oldest.map_or(0, |t| t.elapsed().as_secs_f64().ceil() as i64);
        self.metrics.spool_age_seconds.set(age);
    }
}

/// One message of the audit topic.
pub struct TopicMessage {
    /// `topic/partition/offset`.
    pub location: String,
    pub key: Option<String>,
    /// A checkpoint (header `vigil-kind: checkpoint`) rather than a record.
    pub checkpoint: bool,
    pub value: Vec<u8>,
}

/// Reads every partition of `topic` from its beginning to its end as of now (no consumer
/// group, nothing committed) and hands each message to `each`, in offset order within each
/// partition. `options` are librdkafka consumer settings, applied last (TLS, SASL: the
/// `security.protocol` and `ssl.*` of a broker that requires them). Returns the number of
/// messages read.
pub fn read_topic(
    brokers: &str,
    options: &[(String, String)],
    topic: &str,
    timeout: Duration,
    mut each: impl FnMut(TopicMessage),
) -> Result<u64, KafkaError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{Offset, TopicPartitionList};
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", "vigil-audit-verify")
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "52428800");
    for (name, value) in options {
        config.set(name, value);
    }
    let consumer: BaseConsumer = config.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(KafkaError::MetadataFetch(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
    }
    let mut ends = std::collections::HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            assignment.add_partition_offset(topic, p, Offset::Offset(low))?;
            ends.insert(p, high);
        }
    }
    consumer.assign(&assignment)?;
    let mut n = 0;
    // Some brokers (Tansu 0.6) report the high watermark as the last batch's base offset + 1;
    // so past the watermark, keep reading until the partitions stay quiet for a moment.
    let quiet = Duration::from_millis(500);
    let mut past_watermarks: Option<Instant> = None;
    loop {
        if ends.is_empty() {
            // …but not forever on a topic that is being written to.
            let since = *past_watermarks.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        let wait = if ends.is_empty() { quiet } else { timeout };
        let m = match consumer.poll(wait) {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(e),
            None if ends.is_empty() => break,
            None => {
                return Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::OperationTimedOut,
                ))
            }
        };
        let checkpoint = m.headers().is_some_and(|h| {
            h.iter()
                .any(|h| h.key == KIND_HEADER && h.value == Some(b"checkpoint".as_slice()))
        });
        each(TopicMessage {
            location: format!("{topic}/{}/{}", m.partition(), m.offset()),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            checkpoint,
            value: m.payload().unwrap_or_default().to_vec(),
        });
        n += 1;
        if ends
            .get(&m.partition())
            .is_some_and(|&end| m.offset() + 1 >= end)
        {
            ends.remove(&m.partition());
        }
    }
    Ok(n)
}

/// Hex SHA-256 of the record at `start..end` of `file` (`end` past its newline).
fn line_hash(file: &Path, start: u64, end: u64) -> Option<String> {
    use std::io::{Read, Seek};
    let mut f = std::fs::File::open(file).ok()?;
    f.seek(std::io::SeekFrom::Start(start)).ok()?;
    let mut line = vec![0u8; end.checked_sub(start + 1)? as usize];
    f.read_exact(&mut line).ok()?;
    Some(hex::encode(Sha256::digest(&line)))
}

/// The node's checkpoint signing key: `<data_dir>/node.key` (hex seed, created once).
pub fn node_key(data_dir: &Path) -> anyhow::Result<SigningKey> {
    use anyhow::Context as _;
    let path = data_dir.join("node.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let seed: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .with_context(|| format!("{} is not a hex Ed25519 seed", path.display()))?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed = rand::random::<[u8; 32]>();
            crate::core::secret::write_private_file(&path, hex::encode(seed).as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acknowledged_run_moves_only_over_records_acknowledged_in_order() {
        let acks = Acks::default();
        let g = acks.restart(10);
        let ok = |acks: &Acks, record: u64| acks.state().report(Acks::opaque(g, record), Ok(()));
        ok(&acks, 11);
        ok(&acks, 12);
        assert_eq!(acks.take().0, 12);
        // A gap: 14 before 13 is never counted, and everything after the cursor is sent again.
        ok(&acks, 14);
        let (records, failed) = acks.take();
        assert_eq!(records, 12);
        assert!(failed.is_some());
        // A failed delivery stops the run there, whatever is acknowledged after it.
        let g = acks.restart(12);
        let err = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        acks.state().report(Acks::opaque(g, 13), Err(&err));
        acks.state().report(Acks::opaque(g, 14), Ok(()));
        let (records, failed) = acks.take();
        assert_eq!(records, 12);
        assert!(failed.is_some());
        // Reports of what was handed over before the restart are ignored.
        let old = g;
        let g = acks.restart(12);
        acks.state().report(Acks::opaque(old, 13), Ok(()));
        let (records, failed) = acks.take();
        assert_eq!(records, 12);
        assert!(failed.is_none());
        acks.state().report(Acks::opaque(g, 13), Ok(()));
        assert_eq!(acks.take().0, 13);
        // Checkpoints are counted apart.
        acks.state().checkpoints_sent += 1;
        assert!(!acks.checkpoints_reported());
        acks.state().report(CHECKPOINT_OPAQUE, Ok(()));
        assert!(acks.checkpoints_reported());
        assert_eq!(acks.take().0, 13);
    }

    #[test]
    fn generations_wrap_without_touching_the_checkpoint_bit() {
        let acks = Acks::default();
        for _ in 0..0x1_0005 {
            let g = acks.restart(0);
            let o = Acks::opaque(g, (1 << SEQ_BITS) - 1);
            assert_ne!(o & CHECKPOINT_OPAQUE, CHECKPOINT_OPAQUE);
            assert_eq!((o >> SEQ_BITS) as u16, g);
        }
    }

    #[test]
    fn cursors_survive_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("n-1.jsonl");
        assert_eq!(read_cursor(&file), Cursor::default());
        let c = Cursor {
            offset: 1234,
            records: 7,
        };
        write_cursor(&file, c).unwrap();
        assert_eq!(read_cursor(&file), c);
    }
}
