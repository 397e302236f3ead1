//! A raw PostgreSQL v3 client for scenarios that need exact message sequences — pipelines,
//! errors in the middle of a batch, names reused across batches — that drivers do not send.

use bytes::{BufMut, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vigil_node::core::tls::BoxStream;

/// A StartupMessage for protocol 3.0.
pub fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_i32(196_608);
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = BytesMut::new();
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(&body);
    out.to_vec()
}

/// A typed message: tag, length, body.
pub fn typed(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    typed(b'Q', &b)
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    parse_typed(name, sql, &[])
}

/// A Parse declaring parameter types (OIDs).
pub fn parse_typed(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for t in types {
        b.extend_from_slice(&t.to_be_bytes());
    }
    typed(b'P', &b)
}

/// A Bind with text parameters (`None`: NULL) and text results.
pub fn bind(portal: &str, statement: &str, params: &[Option<&str>]) -> Vec<u8> {
    let params: Vec<Option<&[u8]>> = params.iter().map(|p| p.map(str::as_bytes)).collect();
    bind_formats(portal, statement, &params, false)
}

/// A Bind whose parameters are all text or all `binary`, with text results.
pub fn bind_formats(
    portal: &str,
    statement: &str,
    params: &[Option<&[u8]>],
    binary: bool,
) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    if binary {
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
    } else {
        b.extend_from_slice(&0i16.to_be_bytes());
    }
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v);
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    typed(b'B', &b)
}

/// A Bind with no parameters whose results are all binary.
pub fn bind_binary_results(portal: &str, statement: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&1i16.to_be_bytes());
    typed(b'B', &b)
}

pub fn execute(portal: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&0i32.to_be_bytes());
    typed(b'E', &b)
}

/// Describe (`kind` b'S' or b'P').
pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    typed(b'D', &b)
}

/// Close (`kind` b'S' or b'P').
pub fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    typed(b'C', &b)
}

pub fn sync() -> Vec<u8> {
    typed(b'S', &[])
}

/// One backend message.
#[derive(Clone, Debug)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// Reads one message: tag, length, body.
    pub async fn read_from(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Msg> {
        let tag = r.read_u8().await?;
        let len = r.read_i32().await?;
        let len = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_sub(4))
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "a length below 4")
            })?;
        let mut body = vec![0; len];
        r.read_exact(&mut body).await?;
        Ok(Msg { tag, body })
    }

    /// The message as it goes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        typed(self.tag, &self.body)
    }

    /// An ErrorResponse's SQLSTATE and message.
    pub fn error(&self) -> Option<(String, String)> {
        if self.tag != b'E' {
            return None;
        }
        let (mut code, mut message) = (String::new(), String::new());
        for field in self.body.split(|&b| b == 0) {
            match field.first() {
                Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into_owned(),
                Some(b'M') => message = String::from_utf8_lossy(&field[1..]).into_owned(),
                _ => {}
            }
        }
        Some((code, message))
    }

    /// A RowDescription's column names.
    pub fn columns(&self) -> Vec<String> {
        if self.tag != b'T' {
            return Vec::new();
        }
        let n = i16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let mut rest = &self.body[2..];
        let mut names = Vec::with_capacity(n);
        for _ in 0..n {
            let end = rest.iter().position(|&b| b == 0).expect("column name");
            names.push(String::from_utf8_lossy(&rest[..end]).into_owned());
            rest = &rest[end + 1 + 18..];
        }
        names
    }

    /// A DataRow's values as text (`None`: NULL).
    pub fn values(&self) -> Vec<Option<String>> {
        if self.tag != b'D' {
            return Vec::new();
        }
        let n = i16::from_be_bytes([self.body[0], self.body[1]]);
        let mut rest = &self.body[2..];
        (0..n)
            .map(|_| {
                let len = i32::from_be_bytes(rest[..4].try_into().expect("a value length"));
                rest = &rest[4..];
                let len = usize::try_from(len).ok()?;
                let (value, tail) = rest.split_at(len);
                rest = tail;
                Some(String::from_utf8_lossy(value).into_owned())
            })
            .collect()
    }
}

/// A session over cleartext (the node must allow a cleartext token), or over TLS.
pub struct Wire {
    stream: BoxStream,
}

impl Wire {
    /// Starts a session with `params` (user, database …) and the token as the password; returns
    /// it after the first ReadyForQuery, or the refusal.
    pub async fn connect(port: u16, params: &[(&str, &str)], token: &str) -> Result<Self, Msg> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        Self::start(Box::new(stream), params, token).await
    }

    /// As `connect`, over TLS (SSLRequest first; the gateway's certificate is not checked).
    /// `receive_buffer` sets the socket's SO_RCVBUF before it connects: a small one keeps the
    /// TCP window, and so the room the gateway finds in its socket, small.
    pub async fn connect_tls(
        port: u16,
        params: &[(&str, &str)],
        token: &str,
        receive_buffer: Option<u32>,
    ) -> Result<Self, Msg> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = receive_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let mut tcp = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let mut request = BytesMut::new();
        request.put_i32(8);
        request.put_i32(80_877_103);
        tcp.write_all(&request).await.unwrap();
        assert_eq!(tcp.read_u8().await.unwrap(), b'S', "the gateway offers TLS");
        let connector =
            tokio_rustls::TlsConnector::from(vigil_node::core::tls::unverified_client_config());
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        Self::start(Box::new(tls), params, token).await
    }

    async fn start(stream: BoxStream, params: &[(&str, &str)], token: &str) -> Result<Self, Msg> {
        let mut w = Wire { stream };
        w.send(&startup(params)).await;
        let first = w.read().await;
        if first.tag != b'R' {
            return Err(first);
        }
        let mut pw = Vec::new();
        cstr(&mut pw, token);
        w.send(&typed(b'p', &pw)).await;
        let msgs = w.until_ready().await;
        match msgs.iter().find(|m| m.tag == b'E') {
            Some(e) => Err(e.clone()),
            None => Ok(w),
        }
    }

    /// A session as `agent` on the gateway's `app` connection; panics when refused.
    pub async fn app_session(port: u16, token: &str) -> Wire {
        Wire::connect(port, &[("user", "agent"), ("database", "app")], token)
            .await
            .unwrap_or_else(|e| panic!("session refused: {:?}", e.error()))
    }

    /// Sends messages and reads the answers up to ReadyForQuery.
    pub async fn batch(&mut self, msgs: &[Vec<u8>]) -> Vec<Msg> {
        self.send(&msgs.concat()).await;
        self.until_ready().await
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// Reads one message; panics after 30 s of silence or when the server closes.
    pub async fn read(&mut self) -> Msg {
        self.try_read()
            .await
            .expect("the gateway keeps the session open")
    }

    /// Reads one message, or the error that ended the session; panics after 30 s of silence.
    pub async fn try_read(&mut self) -> std::io::Result<Msg> {
        tokio::time::timeout(Duration::from_secs(30), Msg::read_from(&mut self.stream))
            .await
            .expect("the gateway answers within 30 s")
    }

    /// Reads the bytes of messages up to and including the next ReadyForQuery, at most `chunk`
    /// bytes at a time with a `pause` after each read (even `Duration::ZERO` waits for the
    /// timer's next tick): a client slower than the gateway. Returns the number of bytes, or
    /// None when nothing came for `silence`.
    pub async fn slowly_until_ready(
        &mut self,
        chunk: usize,
        pause: Duration,
        silence: Duration,
    ) -> Option<usize> {
        let mut buf = vec![0; chunk];
        let mut held: Vec<u8> = Vec::new();
        let mut total = 0;
        loop {
            let n = tokio::time::timeout(silence, self.stream.read(&mut buf))
                .await
                .ok()?
                .expect("the gateway keeps the session open");
            assert!(n > 0, "the gateway closed the session");
            total += n;
            held.extend_from_slice(&buf[..n]);
            // Whole messages off the front; the last one is ReadyForQuery.
            while held.len() >= 5 {
                let len = u32::from_be_bytes(held[1..5].try_into().unwrap()) as usize;
                if held.len() < 1 + len {
                    break;
                }
                let tag = held[0];
                held.drain(..1 + len);
                if tag == b'Z' {
                    assert!(held.is_empty(), "nothing after ReadyForQuery");
                    return Some(total);
                }
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Reads messages up to and including the next ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        self.try_until_ready()
            .await
            .expect("the gateway keeps the session open")
    }

    /// Reads messages up to and including the next ReadyForQuery, or the error that ended the
    /// session.
    pub async fn try_until_ready(&mut self) -> std::io::Result<Vec<Msg>> {
        let mut out = Vec::new();
        loop {
            let m = self.try_read().await?;
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return Ok(out);
            }
        }
    }

    /// Reads until the server closes the connection; returns what came before.
    pub async fn until_closed(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), self.stream.read_to_end(&mut out))
            .await
            .expect("the gateway closes within 30 s")
            .ok();
        out
    }
}
