//! The API server's answer on its way back to the client: streamed as it comes (a watch or
//! `logs -f` is never buffered), counted (bytes; a watch's events, a log's lines), its first
//! bytes kept for the record, and the `response` record written when the body ends or the
//! client goes away.

use super::redact::Holds;
use super::request_info::RequestInfo;
use super::KubeContext;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use vigil_proto::record::{
    Body as RecordBody, KubeError, KubeResponse, Outcome, Response as RecordResponse,
};

/// What a streamed answer counts besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// A JSON watch: one event per line.
    EventLines,
    /// A protobuf watch: each event a frame with a 4-byte big-endian length.
    EventFrames,
    /// A log's lines.
    LogLines,
}

/// Counts the events of a watch or the lines of a log as the answer goes by.
#[derive(Debug)]
pub struct Count {
    unit: Unit,
    n: u64,
    /// A frame length being read, and its bytes so far.
    head: [u8; 4],
    head_len: usize,
    /// Bytes of the current frame still to come.
    rest: u64,
}

impl Count {
    /// What the answer to this request counts: a watch its events, a log its lines.
    pub fn of(info: &RequestInfo, headers: &HeaderMap) -> Option<Self> {
        let unit = if info.verb == "watch" {
            let protobuf = headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.contains("protobuf"));
            if protobuf {
                Unit::EventFrames
            } else {
                Unit::EventLines
            }
        } else if info.subresource == "log" {
            Unit::LogLines
        } else {
            return None;
        };
        Some(Self {
            unit,
            n: 0,
            head: [0; 4],
            head_len: 0,
            rest: 0,
        })
    }

    fn push(&mut self, mut data: &[u8]) {
        if self.unit != Unit::EventFrames {
            self.n += data.iter().filter(|b| **b == b'\n').count() as u64;
            return;
        }
        while !data.is_empty() {
            if self.rest > 0 {
                let n = (self.rest.min(data.len() as u64)) as usize;
                self.rest -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (4 - self.head_len).min(data.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&data[..n]);
            self.head_len += n;
            data = &data[n..];
            if self.head_len == 4 {
                self.rest = u64::from(u32::from_be_bytes(self.head));
                self.head_len = 0;
                self.n += 1;
            }
        }
    }

    /// The record's counts: `(events, lines)`.
    fn counts(&self) -> (Option<u64>, Option<u64>) {
        match self.unit {
            Unit::LogLines => (None, Some(self.n)),
            _ => (Some(self.n), None),
        }
    }
}

/// The response record, written once the body has ended (or the client went away).
pub struct Done {
    pub ctx: Arc<KubeContext>,
    /// The session stays open until the answer's record is written.
    pub _open: super::Open,
    pub rec: RecordBody,
    pub status: StatusCode,
    /// What the body may hold that the record may not.
    pub holds: Holds,
    pub started: Instant,
    /// The request's trace span, ended with its record.
    pub span: tracing::Span,
}

/// The API server's body on its way to the client: counted, its first bytes kept for the
/// record.
pub struct Tap {
    inner: Incoming,
    /// When the answer is cut short, and why (see [`Tap::end_at`]).
    end: Option<(Pin<Box<tokio::time::Sleep>>, &'static str)>,
    seen: Vec<u8>,
    bytes: u64,
    limit: usize,
    count: Option<Count>,
    done: Option<Done>,
}

impl Tap {
    /// The answer `inner` on its way, keeping up to `limit` bytes for the record.
    pub fn new(inner: Incoming, limit: usize, count: Option<Count>, done: Done) -> Self {
        let mut tap = Self {
            inner,
            end: None,
            seen: Vec::new(),
            bytes: 0,
            limit,
            count,
            done: Some(done),
        };
        // An empty body (304, 204, HEAD) is never polled.
        if tap.inner.is_end_stream() {
            tap.finish(None);
        }
        tap
    }

    /// Ends the answer at `at` if it has not ended by then: the client gets the end of the
    /// body, the record `why` as its error.
    pub fn end_at(&mut self, at: tokio::time::Instant, why: &'static str) {
        self.end = Some((Box::pin(tokio::time::sleep_until(at)), why));
    }

    fn finish(&mut self, error: Option<String>) {
        let Some(mut d) = self.done.take() else {
            return;
        };
        let seen = std::mem::take(&mut self.seen);
        let error = error
            .map(|m| KubeError {
                reason: "StreamError".into(),
                message: m,
            })
            .or_else(|| (d.status.as_u16() >= 400).then(|| status_error(&seen, d.status, d.holds)));
        // The first bytes of a longer body are never JSON whole: not worth parsing.
        let text = if self.bytes > seen.len() as u64 {
            super::redact::audit_copy_of_start(seen, d.holds, self.limit)
        } else {
            super::redact::audit_copy(&seen, d.holds, self.limit)
        };
        let mut counts = crate::policy::masking::Counts::new();
        let body = text.map(|t| d.ctx.core.masker.mask_owned(t, Some(&mut counts)));
        // The API server's message may quote what the request or the object held.
        let error = error.map(|e| KubeError {
            message: d.ctx.core.masker.mask_owned(e.message, Some(&mut counts)),
            ..e
        });
        d.rec.masked = counts;
        d.rec.outcome = Some(if d.status.is_success() && error.is_none() {
            Outcome::Success
        } else {
            Outcome::Error
        });
        d.rec.duration_us = Some(d.started.elapsed().as_micros() as u64);
        let (events, lines) = self.count.as_ref().map(Count::counts).unwrap_or_default();
        d.rec.response = Some(RecordResponse::Kubernetes(KubeResponse {
            status: d.status.as_u16(),
            bytes: self.bytes,
            events,
            lines,
            error,
            body,
        }));
        crate::core::trace::from_record(&d.span, &d.rec);
        d.ctx.core.audit.record(d.rec);
    }
}

/// The reason and message of a `Status` body (else the HTTP reason). For a resource whose
/// objects are redacted the message is not kept: the API server's message about a failed
/// patch of a Secret quotes the whole patched object, stored values included, and one about a
/// body it could not decode quotes the body around the fault (a token, a value).
fn status_error(body: &[u8], code: StatusCode, holds: Holds) -> KubeError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let message = v["message"].as_str().unwrap_or_default();
    KubeError {
        reason: v["reason"]
            .as_str()
            .unwrap_or(code.canonical_reason().unwrap_or(""))
            .to_string(),
        message: match holds {
            Holds::Nothing => message.to_string(),
            _ if message.is_empty() => String::new(),
            _ => super::redact::REDACTED.to_string(),
        },
    }
}

impl Body for Tap {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some((at, why)) = &mut this.end {
            if at.as_mut().poll(cx).is_ready() {
                let why = why.to_string();
                this.end = None;
                this.finish(Some(why));
                return Poll::Ready(None);
            }
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                    if let Some(c) = &mut this.count {
                        c.push(data);
                    }
                    let room = (this.limit + 1).saturating_sub(this.seen.len());
                    let keep = &data[..data.len().min(room)];
                    // Grown as a `Vec` grows, but never past what is kept: doubling past it
                    // would allocate twice the limit for every long answer (128 KiB with the
                    // default, which glibc maps and the kernel faults in page by page).
                    let want = this.seen.len() + keep.len();
                    if want > this.seen.capacity() {
                        let grown = want.max(2 * this.seen.capacity()).min(this.limit + 1);
                        this.seen.reserve_exact(grown - this.seen.len());
                    }
                    this.seen.extend_from_slice(keep);
                }
                // A body of known length is not polled past its last frame.
                if this.inner.is_end_stream() {
                    this.finish(None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(Some(e.to_string()));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish(None);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tap {
    /// The client went away before the end (a watch closed by the client): still recorded.
    fn drop(&mut self) {
        if self.done.is_some() {
            self.finish(Some("the client closed the stream before its end".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(verb: &str, subresource: &str, content_type: &str) -> Count {
        let info = RequestInfo {
            verb: verb.into(),
            subresource: subresource.into(),
            ..RequestInfo::default()
        };
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, content_type.parse().unwrap());
        Count::of(&info, &headers).expect("counted")
    }

    #[test]
    fn watch_events_and_log_lines_are_counted_across_any_chunks() {
        let json = b"{\"type\":\"ADDED\"}\n{\"type\":\"MODIFIED\"}\n{\"type\":\"DEL";
        let mut frames = Vec::new();
        for event in [&b"first"[..], &[0u8; 300][..], b""] {
            frames.extend_from_slice(&(event.len() as u32).to_be_bytes());
            frames.extend_from_slice(event);
        }
        for size in [1, 2, 3, 5, 7, 64, 1000] {
            let mut c = count("watch", "", "application/json");
            json.chunks(size).for_each(|p| c.push(p));
            assert_eq!(c.counts(), (Some(2), None));
            let mut c = count(
                "watch",
                "",
                "application/vnd.kubernetes.protobuf;stream=watch",
            );
            frames.chunks(size).for_each(|p| c.push(p));
            assert_eq!(c.counts(), (Some(3), None), "chunks of {size}");
            let mut c = count("get", "log", "text/plain");
            b"one\ntwo\nthree".chunks(size).for_each(|p| c.push(p));
            assert_eq!(c.counts(), (None, Some(2)));
        }
        let info = RequestInfo {
            verb: "get".into(),
            ..RequestInfo::default()
        };
        assert!(Count::of(&info, &HeaderMap::new()).is_none());
    }
}
