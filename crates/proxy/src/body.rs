//! Body wrappers: a body that fails when its sender stalls, and a response body that writes
//! the audit record when the response ends (or is abandoned).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::admission::InflightPermit;
use crate::audit::AuditGuard;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response the proxy sends.
pub(crate) type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
/// The body of a forwarded response before it is audited: the upstream's own, or one the
/// proxy rewrote (a filtered `tools/list`). Not boxed: the usual case, the upstream's body
/// passed through, then takes one allocation (the audited body's box), not two.
pub(crate) type Forwarded = http_body_util::Either<crate::forward::UpstreamBody, ResponseBody>;
/// The body type of every request the proxy forwards.
pub(crate) type RequestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Whose silence a [`StallTimeout`] ends: its error, which says so.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub(crate) enum Stall {
    /// The caller's request body (`limits.body_timeout`): the error aborts the upstream
    /// request.
    #[error("request body stalled for longer than the body timeout")]
    Request,
    /// The upstream's response body (`limits.response_body_timeout`): the error cuts the
    /// response off and is recorded in its audit record.
    #[error(
        "the upstream sent nothing of the response body for longer than limits.response_body_timeout"
    )]
    Response,
}

pin_project! {
    /// Fails the body when no frame arrives for `timeout` while it is being waited for: a
    /// slow-body caller cannot hold an upstream request open, nor a silent upstream a
    /// caller's connection, indefinitely. Only time spent waiting counts: the body is not
    /// polled while its reader is busy (an upstream applying backpressure, a caller reading
    /// slowly), and that is not the sender's stall. The timer is armed only when a poll finds
    /// nothing ready, so a body that arrives with its head, the usual small one, never takes
    /// one.
    pub struct StallTimeout<B> {
        #[pin]
        inner: B,
        sleep: Option<Pin<Box<Sleep>>>,
        waiting: bool,
        timeout: Duration,
        stall: Stall,
    }
}

impl<B> StallTimeout<B> {
    pub(crate) fn new(inner: B, timeout: Duration, stall: Stall) -> Self {
        Self {
            inner,
            sleep: None,
            waiting: false,
            timeout,
            stall,
        }
    }
}

impl<B> Body for StallTimeout<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let sleep = match this.sleep {
                    Some(sleep) if *this.waiting => sleep,
                    Some(sleep) => {
                        sleep.as_mut().reset(Instant::now() + *this.timeout);
                        sleep
                    }
                    None => this
                        .sleep
                        .insert(Box::pin(tokio::time::sleep(*this.timeout))),
                };
                *this.waiting = true;
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(*this.stall)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A response body that owns its request's audit record: the record is completed and
    /// written when the body ends, fails, or is dropped unfinished. It also holds the
    /// request's place among those in flight, given back at the same moment.
    pub struct Audited<B> {
        #[pin]
        inner: B,
        guard: Option<AuditGuard>,
        permit: Option<InflightPermit>,
    }
}

impl<B> Audited<B> {
    pub(crate) fn new(inner: B, mut guard: AuditGuard, permit: InflightPermit) -> Self
    where
        B: Body,
    {
        // An empty body (HEAD, 204, 304) may never be polled: it is complete already.
        guard.record.completed = inner.is_end_stream();
        Self {
            inner,
            guard: Some(guard),
            permit: Some(permit),
        }
    }
}

impl<B> Body for Audited<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        // hyper stops polling once `is_end_stream` is true, so the end may never be seen as
        // `Ready(None)`: check after every frame.
        let ended = matches!(polled, Poll::Ready(Some(Ok(_)))) && this.inner.is_end_stream();
        if ended || matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            // Done: the place in flight is free even if hyper keeps the body a while.
            this.permit.take();
        }
        match &polled {
            Poll::Ready(None) => {
                if let Some(mut guard) = this.guard.take() {
                    guard.record.completed = true;
                }
            }
            Poll::Ready(Some(Err(error))) => {
                if let Some(mut guard) = this.guard.take() {
                    guard
                        .record
                        .errors
                        .push(format!("response body failed mid-stream: {error}"));
                }
            }
            Poll::Ready(Some(Ok(_))) if ended => {
                if let Some(mut guard) = this.guard.take() {
                    guard.record.completed = true;
                }
            }
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A body that keeps `held` alive until the body is dropped: whatever must last exactly
    /// as long as a response (a connection's count of requests in progress).
    pub struct Holding<B, H> {
        #[pin]
        inner: B,
        held: H,
    }
}

impl<B, H> Holding<B, H> {
    pub(crate) fn new(inner: B, held: H) -> Self {
        Self { inner, held }
    }
}

impl<B: Body, H> Body for Holding<B, H> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
