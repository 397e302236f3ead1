//! Authentication on a request's headers, before its body is read.
//!
//! tonic reads a whole message (and reserves the length its 5-byte gRPC header announces)
//! before an RPC method runs, so a check made inside the method lets anyone who reaches the
//! port make the member hold up to the service's message limit on every stream. The [`Gate`]
//! in front of each service authenticates the caller from the request's headers
//! ([`Shared::authenticate`]) and refuses one without valid credentials with `UNAUTHENTICATED`
//! without polling the body; the dropped body resets the stream and gives its flow-control
//! window back, so what an unauthenticated peer makes the member hold is bounded by the
//! HTTP/2 windows, not by the message limits.
//!
//! A tower service rather than a tonic interceptor: an operator's bearer token is verified
//! asynchronously (the verifier may fetch the identity provider's keys), which an interceptor,
//! a synchronous function of the headers, cannot do. The caller it establishes travels in the
//! request's extensions, where the methods find it to decide what it may do
//! ([`crate::service`]) without authenticating it again.
//!
//! What it does not bound: a caller with valid credentials (a node, a member, or an operator)
//! may still send messages up to the service's limit (see `server.rs`).

use crate::metrics::KindLabel;
use crate::service::{Caller, Shared};
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::http::{Extensions, HeaderMap, Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

/// Who the gate lets through to its service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Any authenticated caller: a cluster token or a verified operator token (the methods
    /// decide the rest).
    Authenticated,
    /// Holders of the cluster token only (`Raft`, whose messages are the largest), and with
    /// TLS only over a connection that presented a member's certificate: an operator is
    /// refused with `PERMISSION_DENIED`, a caller without a certificate with
    /// `UNAUTHENTICATED`, before the body is read.
    Members,
}

/// A service behind the gate.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    shared: Arc<Shared>,
    admit: Admit,
    /// The service's short name (`Raft`), what refusals are counted and logged under.
    service: &'static str,
}

impl<S: NamedService> Gate<S> {
    pub fn new(inner: S, shared: Arc<Shared>, admit: Admit) -> Self {
        Self {
            inner,
            shared,
            admit,
            service: S::NAME.rsplit('.').next().unwrap_or(S::NAME),
        }
    }
}

/// The caller a call's headers (and, for `Raft` with TLS, its connection, in `extensions`)
/// prove, if `admit` lets it through. Takes the parts, not the request: its body is not
/// `Sync`, so a borrow of it cannot be held across the verification.
async fn admit_call(
    shared: &Shared,
    admit: Admit,
    headers: &HeaderMap,
    extensions: &Extensions,
) -> Result<Caller, Status> {
    let caller = shared.authenticate(headers).await?;
    if admit == Admit::Members {
        crate::tls::require_member_certificate(shared.tls, extensions)?;
        caller.member()?;
    }
    Ok(caller)
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Gate<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // The instance that was made ready serves this call; its clone waits for the next.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let shared = self.shared.clone();
        let (admit, service) = (self.admit, self.service);
        Box::pin(async move {
            let admitted = admit_call(&shared, admit, req.headers(), req.extensions()).await;
            match admitted {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                // The request, its body unread, is dropped with this answer.
                Err(status) => {
                    shared
                        .metrics
                        .refused_calls
                        .get_or_create(&KindLabel { kind: service })
                        .inc();
                    tracing::debug!(service, path = %req.uri().path(), code = ?status.code(),
                        reason = status.message(), "call refused before its body was read");
                    Ok(status.into_http())
                }
            }
        })
    }
}
