//! Forwards: local (`direct-tcpip`: the host connects somewhere for the client) and remote
//! (`tcpip-forward`: the host listens, and each connection it accepts comes back to the client
//! on a `forwarded-tcpip` channel). Both are refused unless a rule allows them, whatever the
//! policy's default. An allowed forward is on record with its endpoints before the host acts
//! on it, and so is every connection through a remote forward before a byte of it crosses;
//! each connection's end is recorded with its byte counts and duration. The bytes themselves
//! are counted, not recorded.

use super::channel::{self, ClientInput, Input, Pumps, Recorder, SessionScope, INPUT_QUEUE};
use super::session::Conn;
use super::target::Pinned;
use crate::core::trace::Stmt;
use crate::policy::ssh::{connect_host, forward_host, SshAction, SshRequestKind};
use crate::policy::{gateway_block, Action};
use russh::{client, server, ChannelMsg, ChannelOpenFailure};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use vigil_proto::record::{
    Body, Kind, Outcome, PolicyRef, Request, Response, SshError, SshRequest, SshResponse,
};

/// How long a connection the host accepted may wait for the gateway to learn which port the
/// host allocated for a forward of port 0: the host's answer and its first connection can
/// arrive back to back, and the connection must not be refused for coming first.
const PENDING_WAIT: Duration = Duration::from_secs(5);

/// A forward as the client asked for it.
struct Ask {
    kind: SshRequestKind,
    request_type: &'static str,
    /// Where a local forward connects, where a remote forward listens: as decided
    /// ([`forward_host`]), or as the client wrote it when it cannot be decided.
    host: String,
    port: u32,
    /// Why the host cannot be decided (then the forward is refused).
    unreadable: Option<String>,
    channel: u32,
}

impl Ask {
    fn new(kind: SshRequestKind, request_type: &'static str, host: &str, port: u32) -> Self {
        let decided = match kind {
            SshRequestKind::Forward => connect_host(host),
            _ => forward_host(host),
        };
        let (host, unreadable) = match decided {
            Ok(decided) => (decided, None),
            Err(why) => (host.to_string(), Some(why)),
        };
        Self {
            kind,
            request_type,
            host,
            port,
            unreadable,
            channel: 0,
        }
    }

    /// `host:port`, the forward's path for the rules and its record.
    fn to(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// How a refusal names the forward.
    fn what(&self) -> String {
        match self.kind {
            SshRequestKind::RemoteForward => format!("remote forwarding from {}", self.to()),
            _ => format!("forwarding to {}", self.to()),
        }
    }
}

/// Decides a forward and puts it on record (under the next `stmt`, which the forward's later
/// records share). It is refused unless a rule allows it (a `blocked` record says why, and
/// `None` is returned); allowed, its `request` record is written and waited for, and the host
/// connection comes back with the policy that allowed it and the forward's trace span.
async fn admit(
    conn: &mut Conn,
    ask: &Ask,
) -> Option<(Arc<client::Handle<Pinned>>, PolicyRef, tracing::Span)> {
    let login = conn.login.clone();
    let to = ask.to();
    let action = SshAction {
        kind: ask.kind,
        login: &login,
        command: None,
        line: None,
        path: Some(&to),
        operation: None,
    };
    let decision = match &ask.unreadable {
        Some(why) => gateway_block("forward-host", why.as_str()),
        None => channel::decide(conn, Ok(&[action]))
            .only_by_rule(|| format!("no rule allows {}", ask.what())),
    };
    conn.stmt += 1;
    let span = conn.statement_span(conn.stmt);
    let mut body = conn.body(Kind::Request);
    body.stmt = Some(conn.stmt);
    body.request = Some(forward_request(
        ask.channel,
        ask.request_type,
        &to,
        None,
        &login,
    ));
    let policy = conn.ctx.policy.reference(&decision);
    body.policy = Some(policy.clone());
    if decision.action != Action::Allow {
        body.kind = Kind::Blocked;
        body.outcome = Some(Outcome::Blocked);
        body.detail = Some(
            decision
                .reason
                .unwrap_or_else(|| format!("{} is not allowed", ask.what())),
        );
        crate::core::trace::from_record(&span, &body);
        conn.ctx.core.audit.record(body);
        return None;
    }
    let host = conn.host.clone()?;
    conn.ctx.core.audit.append(&body).await.ok()?;
    Some((host, policy, span))
}

fn forward_request(
    channel: u32,
    request_type: &str,
    to: &str,
    originator: Option<String>,
    login: &str,
) -> Request {
    Request::Ssh(SshRequest {
        channel,
        request_type: request_type.into(),
        login: Some(login.into()),
        forward: Some(to.into()),
        originator,
        ..SshRequest::default()
    })
}

/// A `response` record of this session for request `stmt`.
fn response_body(conn: &Conn, stmt: Option<u64>) -> Body {
    let mut body = conn.body(Kind::Response);
    body.stmt = stmt;
    body
}

/// `body` as the `response` record of a forward request that was answered: `error` says why
/// it was refused.
fn answered(
    mut body: Body,
    channel: u32,
    listen_port: Option<u32>,
    error: Option<SshError>,
    started: Instant,
) -> Body {
    body.kind = Kind::Response;
    body.outcome = Some(match error {
        None => Outcome::Success,
        Some(_) => Outcome::Error,
    });
    body.response = Some(Response::Ssh(SshResponse {
        channel,
        listen_port,
        error,
        ..SshResponse::default()
    }));
    body.duration_us = Some(started.elapsed().as_micros() as u64);
    body
}

/// Why the host refused a global request (or did not answer it).
fn host_refused(e: &russh::Error) -> SshError {
    let message = match e {
        russh::Error::RequestDenied => "the host refused the request".into(),
        e => format!("the host did not answer: {e}"),
    };
    SshError {
        reason_code: None,
        message,
    }
}

/// Why `who` did not open a channel: the reason to pass on (the other side learns what the
/// refusing side said) and the record's error, with RFC 4254's reason code.
fn open_refused(who: &str, e: &russh::Error) -> (ChannelOpenFailure, SshError) {
    let russh::Error::ChannelOpenFailure(reason) = e else {
        let error = SshError {
            reason_code: None,
            message: format!("{who} did not open the channel: {e}"),
        };
        return (ChannelOpenFailure::ConnectFailed, error);
    };
    let error = SshError {
        reason_code: Some(reason.code()),
        message: format!("{who} refused the channel: {}", reason.description()),
    };
    (reason.clone(), error)
}

/// `direct-tcpip` (a local forward): decided with `host:port` as its path; when allowed, the
/// host opens the connection (to the host as decided: see [`forward_host`]) and the channel
/// runs, its bytes counted.
pub async fn direct_tcpip(
    conn: &mut Conn,
    channel: russh::Channel<server::Msg>,
    host_name: &str,
    port: u32,
    reply: server::ChannelOpenHandle,
    session: &mut server::Session,
) {
    let id = channel.id();
    drop(channel);
    if channel::over_limit(conn, id, "direct-tcpip") {
        reply.reject(ChannelOpenFailure::ResourceShortage).await;
        return;
    }
    let ask = Ask {
        channel: id.number(),
        ..Ask::new(SshRequestKind::Forward, "direct-tcpip", host_name, port)
    };
    let Some((host, _, span)) = admit(conn, &ask).await else {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        return;
    };
    let started = Instant::now();
    let opened = host
        .channel_open_direct_tcpip(ask.host, port, "127.0.0.1", 0)
        .await;
    let host = match opened {
        Ok(host) => host,
        Err(e) => {
            let (reason, error) = open_refused("the host", &e);
            let body = response_body(conn, Some(conn.stmt));
            let record = answered(body, id.number(), None, Some(error), started);
            crate::core::trace::from_record(&span, &record);
            conn.ctx.core.audit.record(record);
            reply.reject(reason).await;
            return;
        }
    };
    reply.accept().await;
    let stmt = Stmt { n: conn.stmt, span };
    let rec = Recorder::of(SessionScope::of(conn), None, id, stmt);
    Pumps::new(rec, session.handle(), None).spawn(conn, id, host, started);
}

/// `tcpip-forward` (a remote forward, `ssh -R`): decided with `ADDRESS:PORT` as its path (the
/// address as [`forward_host`] spells it; port 0 asks the host to choose). When allowed, the
/// host is asked to listen on the address as the client sent it (the same address: the host
/// names it so in each connection it sends back, and the client knows its forward by it), its
/// answer is on record (with the port it listens on) and is the client's answer.
pub async fn tcpip_forward(conn: &mut Conn, address: &str, port: &mut u32) -> bool {
    let ask = Ask::new(
        SshRequestKind::RemoteForward,
        "tcpip-forward",
        address,
        *port,
    );
    let Some((host, policy, span)) = admit(conn, &ask).await else {
        return false;
    };
    let stmt = conn.stmt;
    let requested = *port;
    conn.forwards.listen(Listening {
        address: address.into(),
        port: (requested != 0).then_some(requested),
        stmt,
        policy,
    });
    let started = Instant::now();
    let answer = host.tcpip_forward(address, requested).await;
    // The host names the port only when it chose one.
    let bound = match &answer {
        Ok(chosen) if requested == 0 => Some(*chosen),
        Ok(_) => Some(requested),
        Err(_) => None,
    };
    conn.forwards.settle(stmt, bound);
    let error = answer.err().map(|e| host_refused(&e));
    let record = answered(response_body(conn, Some(stmt)), 0, bound, error, started);
    crate::core::trace::from_record(&span, &record);
    conn.ctx.core.audit.record(record);
    match bound {
        Some(p) => {
            *port = p;
            true
        }
        None => false,
    }
}

/// `cancel-tcpip-forward`: not decided (it only takes a permission away), on record before the
/// host gets it (under the `stmt` of the forward it cancels), and the host's answer is the
/// client's.
pub async fn cancel_tcpip_forward(conn: &mut Conn, address: &str, port: u32) -> bool {
    let to = format!("{address}:{port}");
    let Some(host) = conn.host.clone() else {
        return false;
    };
    let stmt = conn.forwards.stmt_of(address, port);
    let mut body = conn.body(Kind::Request);
    body.stmt = stmt;
    body.request = Some(forward_request(
        0,
        "cancel-tcpip-forward",
        &to,
        None,
        &conn.login,
    ));
    if conn.ctx.core.audit.append(&body).await.is_err() {
        return false;
    }
    let started = Instant::now();
    let answer = host.cancel_tcpip_forward(address, port).await;
    if answer.is_ok() {
        conn.forwards.cancel(address, port);
    }
    let ok = answer.is_ok();
    let error = answer.err().map(|e| host_refused(&e));
    let record = answered(response_body(conn, stmt), 0, None, error, started);
    conn.ctx.core.audit.record(record);
    ok
}

/// An address and port as SSH sends them.
pub struct Endpoint {
    pub address: String,
    pub port: u32,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.address, self.port)
    }
}

/// The remote forwards the host listens on for one client connection. The connection's
/// handler adds one for each allowed `tcpip-forward` and takes it away when the client cancels
/// it; the host connection's handler hands every `forwarded-tcpip` channel the host opens to
/// [`RemoteForwards::opened`], which relays it to the client only if an allowed forward listens
/// on its address and port.
#[derive(Default)]
pub struct RemoteForwards {
    /// The client's side, known once the client is in.
    client: OnceLock<ClientSide>,
    listening: Mutex<Vec<Listening>>,
    /// Wakes connections waiting for a port the host has not named yet.
    changed: Notify,
}

/// What a relayed connection needs of the client's session.
struct ClientSide {
    scope: SessionScope,
    handle: server::Handle,
    login: String,
}

/// A remote forward the host was asked to listen on.
#[derive(Clone, Debug, PartialEq)]
struct Listening {
    /// As the client sent it (the host names it so in each `forwarded-tcpip` channel).
    address: String,
    /// `None` while the host has not answered a request for port 0.
    port: Option<u32>,
    /// The `tcpip-forward` request's: the forward's connections are recorded under it.
    stmt: u64,
    /// What allowed it: the record of each of its connections names it.
    policy: PolicyRef,
}

#[derive(Debug, PartialEq)]
enum Lookup {
    Listening(Listening),
    /// No forward listens there, but one of that address still waits for its port.
    Pending,
    Absent,
}

impl RemoteForwards {
    /// The client is in: connections can be relayed to it and recorded in its session.
    pub(super) fn begin(&self, scope: SessionScope, handle: server::Handle, login: String) {
        let _ = self.client.set(ClientSide {
            scope,
            handle,
            login,
        });
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Listening>> {
        self.listening.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn listen(&self, forward: Listening) {
        self.lock().push(forward);
        self.changed.notify_waiters();
    }

    /// The host answered forward `stmt`: it listens on `bound`, or (`None`) it refused.
    fn settle(&self, stmt: u64, bound: Option<u32>) {
        {
            let mut listening = self.lock();
            match bound {
                Some(port) => listening
                    .iter_mut()
                    .filter(|l| l.stmt == stmt)
                    .for_each(|l| l.port = Some(port)),
                None => listening.retain(|l| l.stmt != stmt),
            }
        }
        self.changed.notify_waiters();
    }

    fn cancel(&self, address: &str, port: u32) {
        self.lock()
            .retain(|l| !(l.address == address && l.port == Some(port)));
        self.changed.notify_waiters();
    }

    fn stmt_of(&self, address: &str, port: u32) -> Option<u64> {
        self.lock()
            .iter()
            .find(|l| l.address == address && l.port == Some(port))
            .map(|l| l.stmt)
    }

    fn lookup(&self, address: &str, port: u32) -> Lookup {
        let listening = self.lock();
        let same = |l: &&Listening| l.address == address;
        if let Some(l) = listening.iter().filter(same).find(|l| l.port == Some(port)) {
            return Lookup::Listening(l.clone());
        }
        match listening.iter().filter(same).any(|l| l.port.is_none()) {
            true => Lookup::Pending,
            false => Lookup::Absent,
        }
    }

    /// The forward listening on `address:port`, waiting (up to [`PENDING_WAIT`]) while one of
    /// that address has not learnt its port yet.
    async fn find(&self, address: &str, port: u32) -> Option<Listening> {
        let deadline = tokio::time::Instant::now() + PENDING_WAIT;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.lookup(address, port) {
                Lookup::Listening(l) => return Some(l),
                Lookup::Absent => return None,
                Lookup::Pending => {}
            }
            tokio::time::timeout_at(deadline, changed).await.ok()?;
        }
    }

    /// A connection the host accepted on a remote forward (its `forwarded-tcpip` channel):
    /// relayed to the client on a channel of its own, or refused.
    pub fn opened(
        self: &Arc<Self>,
        host: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        connected: Endpoint,
        originator: Endpoint,
    ) {
        tokio::spawn(self.clone().relay(host, reply, connected, originator));
    }

    async fn relay(
        self: Arc<Self>,
        host: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        connected: Endpoint,
        originator: Endpoint,
    ) {
        let Some(client) = self.client.get() else {
            tracing::warn!(forward = %connected, "the host opened a forwarded-tcpip channel before the client was in; refused");
            return;
        };
        let audit = &client.scope.core.audit;
        let to = connected.to_string();
        let request = |channel: u32| {
            let from = Some(originator.to_string());
            forward_request(channel, "forwarded-tcpip", &to, from, &client.login)
        };
        let Some(forward) = self.find(&connected.address, connected.port).await else {
            tracing::warn!(forward = %to, "the host opened a forwarded-tcpip channel no allowed forward listens for; refused");
            let mut body = client.scope.body(Kind::Blocked);
            body.request = Some(request(0));
            body.outcome = Some(Outcome::Blocked);
            body.detail = Some(format!(
                "the host opened a forwarded-tcpip channel for {to}, where no allowed remote forward of this session listens"
            ));
            audit.record(body);
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return;
        };
        let mut body = client.scope.body(Kind::Request);
        body.stmt = Some(forward.stmt);
        // Each connection the forward carries is a span of the forward's request.
        let span = client.scope.statement_span(forward.stmt);
        let started = Instant::now();
        let opened = client
            .handle
            .channel_open_forwarded_tcpip(
                connected.address.as_str(),
                connected.port,
                originator.address.as_str(),
                originator.port,
            )
            .await;
        let channel = match opened {
            Ok(channel) => channel,
            Err(e) => {
                // No channel: the record names the connection it would have carried.
                let (reason, error) = open_refused("the client", &e);
                body.request = Some(request(0));
                let record = answered(body, 0, None, Some(error), started);
                crate::core::trace::from_record(&span, &record);
                audit.record(record);
                reply.reject(reason).await;
                return;
            }
        };
        let id = channel.id();
        body.request = Some(request(id.number()));
        body.policy = Some(forward.policy);
        // On record before a byte crosses: the host's side waits for its channel to be
        // accepted, and what the client sends meanwhile waits in the channel.
        if audit.append(&body).await.is_err() {
            let _ = channel.close().await;
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return;
        }
        reply.accept().await;
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        tokio::spawn(client_input(channel, tx));
        let stmt = Stmt {
            n: forward.stmt,
            span,
        };
        let rec = Recorder::of(client.scope.clone(), None, id, stmt);
        Pumps::new(rec, client.handle.clone(), None).run(ClientInput::new(rx), host, started);
    }
}

/// What the client sends on a channel the gateway opened, as input for the channel's input
/// task (russh hands it to the channel, not to the connection's handler), until the client
/// closes it or the input task ends (russh drops the client's close when the gateway closed
/// first).
async fn client_input(mut channel: russh::Channel<server::Msg>, tx: mpsc::Sender<Input>) {
    loop {
        let msg = tokio::select! {
            msg = channel.wait() => msg,
            () = tx.closed() => return,
        };
        let Some(msg) = msg else { break };
        let input = match msg {
            ChannelMsg::Data { data } => Input::Data(data.to_vec()),
            ChannelMsg::Eof => Input::Eof,
            ChannelMsg::Close => break,
            _ => continue,
        };
        if tx.send(input).await.is_err() {
            return;
        }
    }
    let _ = tx.send(Input::Close).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(address: &str, port: Option<u32>, stmt: u64) -> Listening {
        Listening {
            address: address.into(),
            port,
            stmt,
            policy: PolicyRef::default(),
        }
    }

    #[test]
    fn only_connections_on_an_allowed_forward_are_relayed() {
        let f = RemoteForwards::default();
        assert_eq!(f.lookup("localhost", 8080), Lookup::Absent, "nothing asked");
        f.listen(forward("localhost", Some(8080), 1));
        assert_eq!(
            f.lookup("localhost", 8080),
            Lookup::Listening(forward("localhost", Some(8080), 1))
        );
        assert_eq!(f.lookup("localhost", 8081), Lookup::Absent, "another port");
        assert_eq!(f.lookup("0.0.0.0", 8080), Lookup::Absent, "another address");
        assert_eq!(f.stmt_of("localhost", 8080), Some(1));
        f.cancel("localhost", 8080);
        assert_eq!(f.lookup("localhost", 8080), Lookup::Absent, "cancelled");
        f.listen(forward("localhost", Some(9090), 2));
        f.settle(2, None);
        assert_eq!(
            f.lookup("localhost", 9090),
            Lookup::Absent,
            "the host refused"
        );
    }

    #[tokio::test]
    async fn a_connection_waits_for_the_port_the_host_chose() {
        let f = Arc::new(RemoteForwards::default());
        f.listen(forward("localhost", None, 3));
        assert_eq!(f.lookup("localhost", 41000), Lookup::Pending);
        let waiting = tokio::spawn({
            let f = f.clone();
            async move { f.find("localhost", 41000).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        f.settle(3, Some(41000));
        let found = waiting.await.unwrap();
        assert_eq!(found, Some(forward("localhost", Some(41000), 3)));
        // Another port of that address, once no forward of it is pending: refused at once.
        assert_eq!(f.find("localhost", 41001).await, None);
    }
}
