//! Forwarding to the application in the pod, over kept-alive HTTP/1.1 connections.
//!
//! The pool is a stack of idle connections to the one upstream rather than hyper-util's
//! general client: with a single origin there is no pool key to hash and no absolute URI to
//! build, and a connection goes back to the stack when its response body ends, noticed by the
//! task already serving the caller, instead of by a task spawned for every response to wait
//! for the connection to become idle.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use portcullis_memory::clock::coarse_now;
use portcullis_memory::socket::Socket;
use portcullis_policy::Permit;
use tokio::net::TcpStream;

use crate::body::RequestBody;
use crate::error::Refusal;

/// How long an idle upstream connection is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many idle upstream connections are kept; more are closed once their response
/// ends (a burst's connections beyond it are not held for the quiet that follows).
const MAX_IDLE: usize = 512;

/// Sends authorized requests upstream. The only way in is [`Forwarder::forward`], which takes
/// a [`Permit`]: a request that skipped authorization cannot be forwarded.
#[derive(Debug)]
pub(crate) struct Forwarder {
    upstream: Authority,
    /// The `Host` a request without one is given (an HTTP/2 caller's may be absent).
    host: HeaderValue,
    connect_timeout: Duration,
    response_timeout: Duration,
    pool: Arc<Pool>,
}

/// Why forwarding failed, with detail for the audit record and log (never for the caller).
#[derive(Debug)]
pub(crate) struct ForwardError {
    pub refusal: Refusal,
    pub detail: String,
}

impl ForwardError {
    fn connect(detail: String) -> Self {
        Self {
            refusal: Refusal::UpstreamConnect,
            detail,
        }
    }

    /// A failed exchange: the upstream's fault, unless the request body it was sending
    /// stalled (`limits.body_timeout`), which is the caller's: 408, as for an inspected body
    /// that arrives too slowly.
    fn protocol(error: &hyper::Error) -> Self {
        let caller_stalled =
            std::iter::successors(std::error::Error::source(error), |e| e.source())
                .any(|e| matches!(e.downcast_ref(), Some(crate::body::Stall::Request)));
        Self {
            refusal: if caller_stalled {
                Refusal::BodyDeadline
            } else {
                Refusal::UpstreamProtocol
            },
            detail: error_chain(error),
        }
    }
}

/// What tokio's `timeout` takes for a deadline that cannot be represented: thirty years.
const NEVER: Duration = Duration::from_secs(86_400 * 365 * 30);

impl Forwarder {
    pub(crate) fn new(
        upstream: Authority,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Self {
        let host = HeaderValue::from_str(upstream.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            upstream,
            host,
            connect_timeout,
            response_timeout,
            pool: Arc::new(Pool::default()),
        }
    }

    /// Sends `request` (headers already sanitised) and waits for the response head.
    pub(crate) async fn forward(
        &self,
        mut request: Request<RequestBody>,
        _permit: Permit,
    ) -> Result<Response<UpstreamBody>, ForwardError> {
        // Origin-form always: whatever authority the caller named, the request goes to the
        // configured upstream, and an absolute URI is never passed on.
        if request.uri().scheme().is_some() || request.uri().authority().is_some() {
            let path = request
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *request.uri_mut() = Uri::from(path);
        }
        *request.version_mut() = Version::HTTP_11;
        request
            .headers_mut()
            .entry(header::HOST)
            .or_insert_with(|| self.host.clone());
        // A body still going out when the response has ended leaves the connection mid-
        // request: see `Pool::checkin`. Known for bodies only (most requests have none).
        let sent = (!request.body().is_end_stream()).then(|| {
            let sent = Arc::new(AtomicBool::new(false));
            let flag = sent.clone();
            let request_body = std::mem::replace(
                request.body_mut(),
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            );
            *request.body_mut() = SentFlag {
                inner: request_body,
                sent: flag,
            }
            .boxed_unsync();
            sent
        });
        // One clock read for the deadline and the pool's expiry check, from the coarse clock:
        // a tick either way on a timeout of seconds and an idle expiry of 60 s. A timeout
        // beyond thirty years (the config takes up to a century) is tokio's "never".
        let now = coarse_now();
        let deadline = tokio::time::Instant::from_std(now) + self.response_timeout.min(NEVER);
        let response = self.send(request, now, deadline, sent).await?;
        // No tunnels: the caller's Upgrade was stripped, so a 101 here is the upstream's error.
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return Err(ForwardError {
                refusal: Refusal::UpstreamProtocol,
                detail: "upstream answered 101 Switching Protocols".to_owned(),
            });
        }
        Ok(response)
    }

    /// On an idle connection if one takes the request, else on a new one, the response head
    /// by `deadline`. A request an idle connection could not take (the upstream closed it as
    /// it was handed over) was never sent, so it goes on the next connection; one that was
    /// sent is never sent twice.
    ///
    /// The deadline is kept by each exchange rather than around this whole future: a
    /// `timeout_at` around it moved all of its 856 bytes twice a request (into the `Timeout`,
    /// and that into the caller's state), where the exchange on an idle connection is
    /// hyper's small future.
    async fn send(
        &self,
        mut request: Request<RequestBody>,
        now: Instant,
        deadline: tokio::time::Instant,
        sent: Option<Arc<AtomicBool>>,
    ) -> Result<Response<UpstreamBody>, ForwardError> {
        while let Some(mut sender) = self.pool.checkout(now) {
            let exchange = tokio::time::timeout_at(deadline, sender.try_send_request(request));
            match exchange.await.map_err(|_| self.timed_out())? {
                Ok(response) => return Ok(self.pool.lend(response, sender, sent)),
                Err(mut error) => match error.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(ForwardError::protocol(error.error())),
                },
            }
        }
        let exchange = async {
            let mut sender = self.connect().await?;
            match sender.send_request(request).await {
                Ok(response) => Ok(self.pool.lend(response, sender, sent)),
                Err(error) => Err(ForwardError::protocol(&error)),
            }
        };
        tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| self.timed_out())?
    }

    fn timed_out(&self) -> ForwardError {
        ForwardError {
            refusal: Refusal::UpstreamTimeout,
            detail: format!("no response within {:?}", self.response_timeout),
        }
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, ForwardError> {
        let host = self.upstream.host();
        // An IPv6 literal is bracketed in an authority, not in an address.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = self.upstream.port_u16().unwrap_or(80);
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((host, port)),
        )
        .await
        {
            Err(_) => {
                return Err(ForwardError::connect(format!(
                    "connect to {} timed out after {:?}",
                    self.upstream, self.connect_timeout
                )));
            }
            Ok(Err(error)) => {
                return Err(ForwardError::connect(format!(
                    "connect to {}: {error}",
                    self.upstream
                )));
            }
            Ok(Ok(stream)) => stream,
        };
        // Requests and response heads are small and latency-bound.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set on the upstream connection");
        }
        let stream = Socket::new(stream).map_err(|error| {
            ForwardError::connect(format!("connect to {}: {error}", self.upstream))
        })?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ForwardError::protocol(&e))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error_chain(&error), "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// Idle connections, most recently used last: reuse takes the warmest, expiry the oldest.
#[derive(Debug, Default)]
struct Pool {
    idle: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn checkout(&self, now: Instant) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.lock();
        while let Some(entry) = idle.pop() {
            if now.duration_since(entry.since) > IDLE_TIMEOUT {
                // The newest has expired, so all have.
                idle.clear();
                return None;
            }
            // Only a connection ready for a request: one still busy (its request body still
            // going out after the response ended, say) must not hold this request up.
            if entry.sender.is_ready() {
                return Some(entry.sender);
            }
        }
        None
    }

    /// Back to the stack once it can take a request: at once when it can (the usual case), else
    /// when it becomes ready, by a task of its own; a connection that closes is dropped. So is
    /// one whose request body had not all gone out when the response ended (`sent` unset):
    /// the upstream answered early and may not read the rest as that request's, and bytes it
    /// reads as a request of their own would be one Portcullis never decided (with identity
    /// headers the caller wrote), its response handed to whoever sends next (nginx does not
    /// keep such a connection either).
    fn checkin(self: &Arc<Self>, mut sender: SendRequest<RequestBody>, sent: Option<&AtomicBool>) {
        if sender.is_closed() || sent.is_some_and(|sent| !sent.load(Ordering::Acquire)) {
            return;
        }
        if !sender.is_ready() {
            let pool = self.clone();
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.keep(sender);
                }
            });
            return;
        }
        self.keep(sender);
    }

    fn keep(&self, sender: SendRequest<RequestBody>) {
        // An age checked against a minute: the coarse clock, a tick off at most (~5 ns a read
        // instead of ~30, once a request).
        let now = coarse_now();
        let mut idle = self.lock();
        let expired = idle
            .iter()
            .take_while(|entry| now.duration_since(entry.since) > IDLE_TIMEOUT)
            .count();
        idle.drain(..expired);
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since: now });
        }
    }

    /// The response, holding its connection until the body ends (at once if it has none).
    fn lend(
        self: &Arc<Self>,
        response: Response<Incoming>,
        sender: SendRequest<RequestBody>,
        sent: Option<Arc<AtomicBool>>,
    ) -> Response<UpstreamBody> {
        response.map(|inner| {
            let giveback = if inner.is_end_stream() {
                self.checkin(sender, sent.as_deref());
                None
            } else {
                Some((sender, self.clone(), sent))
            };
            UpstreamBody { inner, giveback }
        })
    }
}

/// An upstream response body. When it has been read to the end its connection is idle again
/// and goes back to the pool; dropped or failed before that, the connection is closed (HTTP/1.1
/// cannot abandon a response and keep the connection).
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    inner: Incoming,
    giveback: Option<Giveback>,
}

/// What goes back to the pool when a response body ends: the connection, its pool, and
/// whether its request body had all gone out (`None`: it had none).
type Giveback = (SendRequest<RequestBody>, Arc<Pool>, Option<Arc<AtomicBool>>);

impl UpstreamBody {
    fn give_back(&mut self) {
        if let Some((sender, pool, sent)) = self.giveback.take() {
            pool.checkin(sender, sent.as_deref());
        }
    }
}

/// A request body that says when it has all been read (by the connection sending it).
struct SentFlag {
    inner: RequestBody,
    sent: Arc<AtomicBool>,
}

impl Body for SentFlag {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if frame.is_none() || self.inner.is_end_stream() {
            self.sent.store(true, Ordering::Release);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.give_back(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.give_back(),
            Some(Ok(_)) => {}
            Some(Err(_)) => self.giveback = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
