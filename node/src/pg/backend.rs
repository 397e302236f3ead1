//! The gateway's own connection to a target PostgreSQL: TCP, optional TLS, startup and
//! authentication with the gateway's credentials (SCRAM-SHA-256, md5 or cleartext). The client
//! never sees these credentials.

use super::codec::{split_frame, Frame, FrameError};
use super::config::{PgTarget, TargetTls};
use super::messages::{self, Reader};
use crate::core::tls::{send_all, BoxStream};
use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Largest message accepted from a target in the gateway's own exchanges with it (startup,
/// catalog lookups); a session's answers are limited by `postgres.max_target_message_bytes`.
pub const MAX_BACKEND_FRAME: usize = super::budget::LARGE_MESSAGE;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to the target")]
    Connect(#[source] std::io::Error),
    #[error("timed out connecting to the target")]
    Timeout,
    #[error("the target did not answer the gateway's catalog lookup within {0} s")]
    LookupTimeout(u64),
    #[error("the target does not offer TLS")]
    TlsRefused,
    #[error("the target closed the connection during startup")]
    Closed,
    #[error("the target refused the gateway's login: {code} {message}")]
    Refused { code: String, message: String },
    #[error("the target asks for an authentication method the gateway does not support ({0})")]
    UnsupportedAuth(String),
    #[error("the target needs a password and none is configured")]
    NoPassword,
    #[error("protocol error from the target: {0}")]
    Protocol(String),
}

impl From<FrameError> for BackendError {
    fn from(e: FrameError) -> Self {
        BackendError::Protocol(e.to_string())
    }
}

impl From<messages::Malformed> for BackendError {
    fn from(e: messages::Malformed) -> Self {
        BackendError::Protocol(e.to_string())
    }
}

/// A target with what is needed to reach it, prepared at start.
pub struct Target {
    pub config: PgTarget,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// `host:port/database`, for audit records.
    pub display: String,
}

impl Target {
    pub fn new(config: PgTarget) -> Result<Self, crate::core::tls::TlsError> {
        let c = &config.config;
        let tls = match c.tls {
            TargetTls::Disable => None,
            TargetTls::Require | TargetTls::VerifyFull => {
                let client = if c.tls == TargetTls::Require {
                    crate::core::tls::unverified_client_config()
                } else {
                    crate::core::tls::verifying_client_config(c.ca_file.as_deref())?
                };
                let name = ServerName::try_from(c.host.clone()).map_err(|_| {
                    crate::core::tls::TlsError::Rustls(rustls::Error::General(format!(
                        "invalid server name {}",
                        c.host
                    )))
                })?;
                Some((TlsConnector::from(client), name))
            }
        };
        let display = format!("{}:{}/{}", c.host, c.port, c.database);
        Ok(Self {
            config,
            tls,
            display,
        })
    }

    fn addr(&self) -> (String, u16) {
        (self.config.config.host.clone(), self.config.config.port)
    }

    async fn open(&self) -> Result<BoxStream, BackendError> {
        let mut tcp = TcpStream::connect(self.addr())
            .await
            .map_err(BackendError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let Some((connector, name)) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        tcp.write_all(&messages::ssl_request())
            .await
            .map_err(BackendError::Connect)?;
        let answer = tcp.read_u8().await.map_err(BackendError::Connect)?;
        if answer != b'S' {
            return Err(BackendError::TlsRefused);
        }
        let tls = connector
            .connect(name.clone(), tcp)
            .await
            .map_err(BackendError::Connect)?;
        Ok(Box::new(tls))
    }

    /// Connects and logs in. `params` are extra startup parameters passed through from the
    /// client (application_name, client_encoding …).
    pub async fn connect(&self, params: &[(&str, &str)]) -> Result<Backend, BackendError> {
        let timeout = Duration::from_secs(self.config.config.connect_timeout_secs);
        tokio::time::timeout(timeout, self.connect_inner(params))
            .await
            .map_err(|_| BackendError::Timeout)?
    }

    async fn connect_inner(&self, params: &[(&str, &str)]) -> Result<Backend, BackendError> {
        let c = &self.config.config;
        let mut stream = self.open().await?;
        let mut startup = vec![("user", c.user.as_str()), ("database", c.database.as_str())];
        startup.extend_from_slice(params);
        send_all(&mut stream, &messages::startup_message(&startup))
            .await
            .map_err(BackendError::Connect)?;
        let mut buf = BytesMut::with_capacity(8192);
        self.authenticate(&mut stream, &mut buf).await?;
        let (parameters, key) = welcome(&mut stream, &mut buf).await?;
        Ok(Backend {
            stream,
            parameters,
            key,
            leftover: buf,
        })
    }

    /// Answers the target's authentication requests with the gateway's own login until the
    /// target accepts it.
    async fn authenticate(
        &self,
        stream: &mut BoxStream,
        buf: &mut BytesMut,
    ) -> Result<(), BackendError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = read_frame(stream, buf).await?;
            match frame.tag {
                b'R' => {
                    let body = frame.body();
                    let code = Reader::new(&body, "Authentication").i32()?;
                    match self.auth_reply(code, &body[4..], &mut scram)? {
                        AuthStep::Done => return Ok(()),
                        AuthStep::Reply(reply) => send_all(stream, &reply)
                            .await
                            .map_err(BackendError::Connect)?,
                        AuthStep::Wait => {}
                    }
                }
                b'E' => {
                    let (code, message) = messages::parse_error_fields(&frame.body());
                    return Err(BackendError::Refused { code, message });
                }
                b'N' => {}
                other => {
                    return Err(BackendError::Protocol(format!(
                        "unexpected message {:?} during authentication",
                        other as char
                    )))
                }
            }
        }
    }

    /// What to answer an Authentication request (`code`, the rest of its body `rest`):
    /// cleartext, MD5 or SCRAM-SHA-256 with the gateway's own password.
    fn auth_reply(
        &self,
        code: i32,
        rest: &[u8],
        scram: &mut Option<ScramSha256>,
    ) -> Result<AuthStep, BackendError> {
        let password = || {
            self.config
                .password
                .as_ref()
                .map(|p| p.expose().as_bytes())
                .ok_or(BackendError::NoPassword)
        };
        Ok(match code {
            0 => AuthStep::Done,
            3 => AuthStep::Reply(messages::password_message(password()?)),
            5 => {
                let salt: [u8; 4] = rest
                    .try_into()
                    .map_err(|_| BackendError::Protocol("bad md5 salt".into()))?;
                let hash = postgres_protocol::authentication::md5_hash(
                    self.config.config.user.as_bytes(),
                    password()?,
                    salt,
                );
                AuthStep::Reply(messages::password_message(hash.as_bytes()))
            }
            10 => {
                let offers_scram = rest
                    .split(|&b| b == 0)
                    .any(|m| m == SCRAM_SHA_256.as_bytes());
                if !offers_scram {
                    return Err(BackendError::UnsupportedAuth(
                        String::from_utf8_lossy(rest).replace('\0', " "),
                    ));
                }
                let s = ScramSha256::new(password()?, ChannelBinding::unsupported());
                let msg = messages::sasl_initial_response(SCRAM_SHA_256, s.message());
                *scram = Some(s);
                AuthStep::Reply(msg)
            }
            11 => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| BackendError::Protocol("SASL continue without SASL".into()))?;
                s.update(rest)
                    .map_err(|e| BackendError::Protocol(e.to_string()))?;
                AuthStep::Reply(messages::sasl_response(s.message()))
            }
            12 => {
                let mut s = scram
                    .take()
                    .ok_or_else(|| BackendError::Protocol("SASL final without SASL".into()))?;
                s.finish(rest)
                    .map_err(|e| BackendError::Protocol(e.to_string()))?;
                AuthStep::Wait
            }
            other => return Err(BackendError::UnsupportedAuth(format!("code {other}"))),
        })
    }

    /// Sends a CancelRequest for a backend of this target.
    pub async fn cancel(&self, pid: i32, secret: i32) -> Result<(), BackendError> {
        let mut tcp = TcpStream::connect(self.addr())
            .await
            .map_err(BackendError::Connect)?;
        tcp.write_all(&messages::cancel_request(pid, secret))
            .await
            .map_err(BackendError::Connect)?;
        // The server closes the connection without answering.
        let mut sink = [0u8; 16];
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut sink)).await;
        Ok(())
    }
}

/// A logged-in target connection, ready for queries.
pub struct Backend {
    pub stream: BoxStream,
    /// ParameterStatus messages as received, to replay to the client.
    pub parameters: Vec<Bytes>,
    /// The target's BackendKeyData (pid, secret), used to route cancels.
    pub key: Option<(i32, i32)>,
    /// Bytes read past the first ReadyForQuery.
    pub leftover: BytesMut,
}

/// The next step of the target login.
enum AuthStep {
    /// Authenticated (AuthenticationOk).
    Done,
    /// Send this and wait for the next request.
    Reply(Bytes),
    /// Nothing to send; the next message follows.
    Wait,
}

/// Parameters and key data the target sends after login, up to its first ReadyForQuery.
async fn welcome(
    stream: &mut BoxStream,
    buf: &mut BytesMut,
) -> Result<(Vec<Bytes>, Option<(i32, i32)>), BackendError> {
    let mut parameters = Vec::new();
    let mut key = None;
    loop {
        let frame = read_frame(stream, buf).await?;
        match frame.tag {
            b'S' => parameters.push(frame.raw),
            b'K' => {
                let body = frame.body();
                let mut r = Reader::new(&body, "BackendKeyData");
                key = Some((r.i32()?, r.i32()?));
            }
            b'Z' => return Ok((parameters, key)),
            b'N' => {}
            b'E' => {
                let (code, message) = messages::parse_error_fields(&frame.body());
                return Err(BackendError::Refused { code, message });
            }
            other => {
                return Err(BackendError::Protocol(format!(
                    "unexpected message {:?} during startup",
                    other as char
                )))
            }
        }
    }
}

async fn read_frame(stream: &mut BoxStream, buf: &mut BytesMut) -> Result<Frame, BackendError> {
    loop {
        if let Some(frame) = split_frame(buf, MAX_BACKEND_FRAME)? {
            return Ok(frame);
        }
        if stream.read_buf(buf).await.map_err(BackendError::Connect)? == 0 {
            return Err(BackendError::Closed);
        }
    }
}

/// Targets by the name clients use.
pub type Targets = Arc<std::collections::HashMap<String, Arc<Target>>>;
