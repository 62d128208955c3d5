//! The agent-facing listener: accept, mTLS handshake (identity), then HTTP/1.1 or HTTP/2.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use portcullis_identity::LiveIdentity;
use portcullis_memory::clock::coarse_now;
use portcullis_memory::socket::Socket;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::time::Instant;
use tokio_rustls::LazyConfigAcceptor;

use crate::Shared;
use crate::body::Holding;
use crate::pipeline::{ConnectionIdentity, handle};

/// Accepts agent connections until `shutdown` turns true, then returns once every open
/// connection has finished its in-flight requests and closed (the caller bounds the wait).
pub(crate) async fn serve(
    listener: TcpListener,
    identity: watch::Receiver<Arc<LiveIdentity>>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let refusals = Arc::new(RefusalLog::default());
    let connections = Arc::new(Semaphore::new(shared.limits.max_connections));
    // Connections still in their handshake have shown no identity: anyone who can reach the
    // port can open them, each held up to `handshake_timeout`. Bounded apart from the rest, so
    // a flood of them neither fills `max_connections` nor takes the descriptors the upstream
    // connections need; past it a new one is closed at once (established ones go on).
    let handshakes = Arc::new(Semaphore::new(shared.limits.max_pending_handshakes));
    loop {
        // Holding a permit before accepting applies back-pressure in the kernel's accept
        // queue instead of accepting connections we would have to drop.
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = shutdown.changed() => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(pending) = handshakes.clone().try_acquire_owned() else {
            shared
                .metrics
                .tls_handshake_failures
                .with_label_values(&["pending_handshakes"])
                .inc();
            if let Some(suppressed) = refusals.admit(peer.ip(), Instant::now()) {
                tracing::warn!(
                    %peer,
                    limit = shared.limits.max_pending_handshakes,
                    suppressed,
                    "connection closed: limits.max_pending_handshakes are in progress"
                );
            }
            continue;
        };
        // Not the identity in force now: the handshake takes it when the ClientHello arrives.
        let identity = identity.clone();
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let refusals = refusals.clone();
        tokio::spawn(async move {
            shared.metrics.connections_active.inc();
            connection(
                tcp,
                peer,
                &identity,
                shared.clone(),
                &refusals,
                shutdown,
                pending,
            )
            .await;
            shared.metrics.connections_active.dec();
            drop(permit);
        });
    }
    // Closing the listener makes new connections fail fast (and load balancers move on)
    // instead of waiting in the accept queue of a process that is going away.
    drop(listener);
    // Every connection task holds a permit until it ends: having them all back means the
    // drain is complete.
    let all = u32::try_from(shared.limits.max_connections).unwrap_or(u32::MAX);
    let _ = connections.acquire_many(all).await;
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    identity: &watch::Receiver<Arc<LiveIdentity>>,
    shared: Arc<Shared>,
    refusals: &RefusalLog,
    mut shutdown: watch::Receiver<bool>,
    pending: OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let tcp = match Socket::new(tcp) {
        Ok(tcp) => tcp,
        Err(error) => {
            // epoll refused it (`max_user_watches`, memory): the host is out of a resource.
            tracing::warn!(%peer, %error, "connection dropped: not registered with the reactor");
            return;
        }
    };
    let limits = &shared.limits;
    // The identity in force when the ClientHello arrives, not at the TCP accept: a client may
    // sit up to `handshake_timeout` between the two, and a root removed meanwhile must not
    // verify it ("a removed root stops new handshakes at once"); a rotated pair likewise
    // serves from the next ClientHello. A connection past its handshake keeps its config.
    // One deadline covers both halves of the handshake.
    let handshake = tokio::time::timeout(limits.handshake_timeout, async {
        let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        let config = identity.borrow().tls.clone();
        hello.into_stream(config).await
    });
    let (handshake, claim) = portcullis_identity::claim::with_claim(handshake).await;
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            let reason = handshake_reason(&error);
            shared
                .metrics
                .tls_handshake_failures
                .with_label_values(&[reason])
                .inc();
            refusals.record(peer, reason, claim.as_deref(), &error);
            return;
        }
        Err(_) => {
            shared
                .metrics
                .tls_handshake_failures
                .with_label_values(&["timeout"])
                .inc();
            return;
        }
    };
    // Past its handshake, the connection counts among `max_connections` only.
    drop(pending);
    acknowledge_handshake(tls.get_ref().0);
    // The verifier accepted the chain, so the leaf is present and carries a valid workload
    // ID; parsing it again here keeps rustls types out of the identity we hand on.
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| portcullis_identity::caller_spiffe_id(leaf));
    let Some(Ok(agent)) = identity else {
        shared
            .metrics
            .tls_handshake_failures
            .with_label_values(&["no_identity"])
            .inc();
        return;
    };
    let conn = Arc::new(ConnectionIdentity::new(agent, peer, &shared));
    // One agent may not take every place of `max_connections` (idle connections cost it
    // nothing and hold a place each until their idle timeout).
    let Some(_place) = conn.connection_place() else {
        shared
            .metrics
            .tls_handshake_failures
            .with_label_values(&["agent_connections"])
            .inc();
        if let Some(suppressed) = refusals.admit(peer.ip(), Instant::now()) {
            tracing::warn!(
                %peer,
                agent = %conn.agent,
                limit = limits.max_connections_per_agent,
                suppressed,
                "connection closed: the agent has limits.max_connections_per_agent open"
            );
        }
        return;
    };
    // ALPN tells HTTP/2 from the first byte; without it the first request does.
    let alpn = tls.get_ref().1.alpn_protocol();
    let http2 = alpn == Some(b"h2");
    // A protocol agreed in the handshake is served as such, without reading the connection's
    // first bytes to tell which it is.
    let builder = match alpn {
        Some(b"h2") => builder(limits).http2_only(),
        Some(b"http/1.1") => builder(limits).http1_only(),
        _ => builder(limits),
    };
    let state = Arc::new(ConnState::new(http2));
    let (give_back, returned) = oneshot::channel();
    let io = TokioIo::new(Tracked {
        inner: Some(tls),
        state: state.clone(),
        give_back: Some(give_back),
    });
    let service = service_fn({
        let (shared, state) = (shared.clone(), state.clone());
        move |request: hyper::Request<hyper::body::Incoming>| {
            let in_progress = state.begin(request.version());
            // Boxed at once: the pipeline's future is large (4.8 KiB in a dist build: every
            // stage's state), and hyper moves the service future it is given; a box moves as a
            // pointer and keeps the connection's own state small while it is idle. Unboxed
            // (30e719e: held in hyper's per-connection box instead), 512 open connections took
            // 35.1 MiB instead of 29.2, for no CPU: that commit, profile regenerated, read
            // 13.56 against 13.59 µs per request (8 alternating rounds). The box is allocated
            // before the future is made, so that the future is made in it: `Box::pin(handle(..))`
            // evaluates its argument first, on the stack, and copied all 4.8 KiB into the box
            // (only the arguments, ~300 bytes, are set before the first poll).
            let response = Box::into_pin(Box::write(
                Box::new_uninit(),
                handle(shared.clone(), conn.clone(), request),
            ));
            async move {
                let response = response.await?;
                Ok::<_, Infallible>(response.map(|body| Holding::new(body, in_progress)))
            }
        }
    });
    let connection = Box::pin(builder.serve_connection(io, service));
    let ended_in_error = drive(connection, &state, limits, &mut shutdown, peer).await;
    // The connection (and the I/O it owned) is dropped by now. An HTTP/1 connection that
    // hyper closed on a malformed or oversized head (a head had started, none completed)
    // gets a lingering close, so the client reads the 400/431 hyper wrote instead of a
    // reset caused by its own unread bytes.
    if ended_in_error
        && !state.http2.load(Ordering::Acquire)
        && state.head_started().is_some()
        && let Ok(io) = returned.await
    {
        // Boxed: its buffer would otherwise be part of every connection's state.
        Box::pin(linger(io, LINGER)).await;
    }
}

/// How long a closing HTTP/1 connection is read and discarded (nginx `lingering_time` idea).
const LINGER: Duration = Duration::from_secs(2);
/// How long an idle connection told to close (GOAWAY) may take before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The HTTP/1.1 and HTTP/2 settings. hyper's own `header_read_timeout` is off: it also runs
/// while a keep-alive connection waits for its next request (no head started), which would
/// close pooled connections long before `idle_timeout`; [`drive`] times heads instead.
fn builder(limits: &crate::Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_h2_streams)
        // Twice the limit: h2 refuses a larger header list itself, with a reset curl and
        // most clients report as a connection failure; up to twice it, the pipeline answers
        // with a 431 the client reads (`Refusal::HeadTooLarge`), as ASP.NET Core does.
        .max_header_list_size(
            u32::try_from(limits.max_header_bytes.saturating_mul(2)).unwrap_or(u32::MAX),
        )
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// Runs one connection to its end under the connection deadlines: idle (no request in
/// progress for `idle_timeout`; HTTP/2 pings are not requests), head (an HTTP/1 head that
/// started arriving must be complete within `header_read_timeout`), and shutdown (finish
/// what is in progress, take nothing new). Returns whether hyper ended it with an error.
async fn drive<C>(
    mut connection: Pin<Box<C>>,
    state: &ConnState,
    limits: &crate::Limits,
    shutdown: &mut watch::Receiver<bool>,
    peer: std::net::SocketAddr,
) -> bool
where
    C: std::future::Future<Output = Result<(), BoxError>> + GracefulConnection,
{
    // Set once the connection was told to close; `hard_stop` bounds an idle close (a peer
    // that never finishes the GOAWAY exchange). A shutdown close has no bound of its own:
    // the drain deadline (`shutdown_grace`) bounds it.
    let mut closing = false;
    let mut hard_stop: Option<Instant> = None;
    // The timer and the shutdown signal live across iterations: registering a new timer and
    // watch waiter each turn, then dropping them, cost more than the rest of this loop.
    //
    // Requests do not wake this loop. The timer is armed no later than the earliest deadline
    // any change since the arming could bring: a head or an idle spell starting at the
    // arming, `min(header_read_timeout, idle_timeout)` on; and no later than the deadline
    // known then. When it fires the deadlines are read afresh: one that moved later (a request
    // came, the head completed) re-arms it. So the timer fires at most once per that bound on
    // a busy connection, and a request costs the loop nothing (it used to turn three times
    // per request, re-arming the timer twice, when a head started, a request began and its
    // response ended).
    let horizon = limits.idle_timeout.min(limits.header_read_timeout);
    let timer = tokio::time::sleep_until(Instant::now() + horizon);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    let shutdown_signal = shutdown.changed();
    tokio::pin!(shutdown_signal);
    loop {
        let wake = if closing {
            hard_stop
        } else {
            let horizon = Instant::now() + horizon;
            let deadline = state.deadline(limits.idle_timeout, limits.header_read_timeout);
            Some(deadline.map_or(horizon, |at| at.min(horizon)))
        };
        match wake {
            // Armed no later than needed: keep it (it fires early at worst, and re-arms).
            Some(at) if armed.is_some_and(|armed| armed <= at) => {}
            Some(at) => {
                timer.as_mut().reset(at);
                armed = Some(at);
            }
            None => armed = None,
        }
        tokio::select! {
            result = connection.as_mut() => {
                return match result {
                    Ok(()) => false,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                        true
                    }
                };
            }
            () = &mut timer, if armed.is_some() => {
                // Fired: the next turn re-arms it, whatever the deadline is then.
                armed = None;
                let now = Instant::now();
                if hard_stop.is_some_and(|at| at <= now) {
                    return false;
                }
                if state.head_started().is_some_and(|at| at + limits.header_read_timeout <= now) {
                    // A head started and did not complete: slowloris. Nothing was
                    // requested yet, so there is nothing to finish: close now.
                    tracing::debug!(%peer, "request head not completed in time; closing");
                    return false;
                }
                if !closing && state.idle_since().is_some_and(|at| at + limits.idle_timeout <= now) {
                    connection.as_mut().graceful();
                    closing = true;
                    hard_stop = Some(now + CLOSE_GRACE);
                }
            }
            _ = &mut shutdown_signal, if !closing => {
                // In-flight requests finish; idle connections close at once.
                connection.as_mut().graceful();
                closing = true;
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `graceful_shutdown` of hyper-util's auto connection, behind a trait so [`drive`] does not
/// spell out the connection's full type.
trait GracefulConnection {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S, B> GracefulConnection for auto::Connection<'_, I, S, TokioExecutor>
where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        >,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Reads and discards what the client still sends, after our side said goodbye, until it
/// closes or `max` passes. Closing a socket with unread input makes the kernel send a
/// reset, which can destroy the response the client has not read yet (RFC 9112 §9.6).
async fn linger<T: AsyncRead + AsyncWrite + Unpin>(mut io: T, max: Duration) {
    let _ = tokio::time::timeout(max, async {
        let _ = io.shutdown().await;
        let mut sink = [0u8; 8192];
        while let Ok(n) = io.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Acknowledges the client's last handshake flight now instead of after the kernel's delayed
/// ACK (~40 ms on Linux). TLS 1.3 leaves the server nothing to send after the handshake
/// (session tickets are off, so resumption cannot outlive a bundle change); a client that
/// leaves Nagle's algorithm on holds its first request until its `Finished` is acknowledged.
/// `TCP_QUICKACK` (tcp(7)) sends the pending ACK at once: the stall is gone without a ticket.
fn acknowledge_handshake(socket: &Socket) {
    #[cfg(target_os = "linux")]
    if let Err(error) = socket2::SockRef::from(socket.tcp()).set_tcp_quickack(true) {
        tracing::debug!(%error, "TCP_QUICKACK not set");
    }
}

fn handshake_reason(error: &io::Error) -> &'static str {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => portcullis_identity::handshake_failure_reason(tls),
        None => match error.kind() {
            io::ErrorKind::UnexpectedEof => "eof",
            _ => "io",
        },
    }
}

/// Refused handshakes at INFO, at most one line per peer address per [`REFUSAL_LOG_PERIOD`]
/// (with the count of refusals not logged in between), so an SRE sees who is knocking
/// without debug logs, and a scanner cannot flood the log.
#[derive(Debug, Default)]
struct RefusalLog {
    peers: std::sync::Mutex<HashMap<IpAddr, (Instant, u64)>>,
}

const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);
/// Peers remembered for rate limiting; beyond it, refusals from new peers go unlogged (they
/// are still counted in `portcullis_tls_handshake_failures_total`).
const REFUSAL_LOG_PEERS: usize = 4096;

impl RefusalLog {
    fn record(&self, peer: SocketAddr, reason: &str, claim: Option<&str>, error: &io::Error) {
        // A connection closed before or during the handshake (a TCP probe, a port scan) is
        // not a refusal of anyone's identity.
        if matches!(reason, "eof" | "io") {
            tracing::debug!(%peer, reason, %error, "tls handshake failed");
            return;
        }
        let Some(suppressed) = self.admit(peer.ip(), Instant::now()) else {
            tracing::debug!(%peer, reason, %error, "tls handshake refused");
            return;
        };
        tracing::info!(
            %peer,
            reason,
            claimed_spiffe_id = claim.unwrap_or("none"),
            suppressed,
            %error,
            "tls handshake refused"
        );
    }

    /// `Some(refusals not logged since the last line)` when `ip` may be logged now.
    fn admit(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let mut peers = self.peers.lock().ok()?;
        if peers.len() >= REFUSAL_LOG_PEERS && !peers.contains_key(&ip) {
            peers.retain(|_, (last, _)| now.duration_since(*last) < REFUSAL_LOG_PERIOD);
        }
        let full = peers.len() >= REFUSAL_LOG_PEERS;
        match peers.get_mut(&ip) {
            Some((last, suppressed)) if now.duration_since(*last) < REFUSAL_LOG_PERIOD => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now;
                Some(std::mem::take(suppressed))
            }
            None if full => None,
            None => {
                peers.insert(ip, (now, 0));
                Some(0)
            }
        }
    }
}

/// What the connection deadlines are computed from, shared by the I/O wrapper (a head
/// starts with its first byte), the service (a request begins; its response ends) and
/// [`drive`].
///
/// Its stamps are milliseconds on the coarse clock ([`coarse_now`]: ~5 ns a read against
/// ~30, two reads a request): they start deadlines of seconds (`header_read_timeout`,
/// `idle_timeout`), which [`drive`] checks against the precise clock, so a deadline can be
/// met up to a kernel tick (4 ms at `HZ=250`) early or late.
#[derive(Debug)]
struct ConnState {
    origin: Instant,
    /// Requests whose response has not finished.
    in_progress: AtomicUsize,
    /// When `in_progress` last fell to zero (ms since `origin`).
    idle_since_ms: AtomicU64,
    /// When the first byte of a not yet complete HTTP/1 head arrived; `NONE` when none is.
    head_started_ms: AtomicU64,
    http2: AtomicBool,
}

const NONE: u64 = u64::MAX;

impl ConnState {
    fn new(http2: bool) -> Self {
        Self {
            origin: Instant::from_std(coarse_now()),
            in_progress: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(NONE),
            http2: AtomicBool::new(http2),
        }
    }

    fn now_ms(&self) -> u64 {
        let elapsed = Instant::from_std(coarse_now()).saturating_duration_since(self.origin);
        u64::try_from(elapsed.as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, ms: u64) -> Option<Instant> {
        (ms != NONE).then(|| self.origin + Duration::from_millis(ms))
    }

    /// Bytes arrived. With no request in progress on HTTP/1 they start a head.
    fn bytes_read(&self) {
        if self.http2.load(Ordering::Relaxed)
            || self.in_progress.load(Ordering::Acquire) != 0
            || self.head_started_ms.load(Ordering::Relaxed) != NONE
        {
            return;
        }
        self.head_started_ms.store(self.now_ms(), Ordering::Release);
    }

    /// hyper parsed a complete head and called the service.
    fn begin(self: &Arc<Self>, version: http::Version) -> InProgress {
        if version == http::Version::HTTP_2 {
            self.http2.store(true, Ordering::Release);
        }
        self.in_progress.fetch_add(1, Ordering::AcqRel);
        self.head_started_ms.store(NONE, Ordering::Release);
        InProgress(self.clone())
    }

    fn head_started(&self) -> Option<Instant> {
        self.at(self.head_started_ms.load(Ordering::Acquire))
    }

    fn idle_since(&self) -> Option<Instant> {
        if self.in_progress.load(Ordering::Acquire) != 0 {
            return None;
        }
        self.at(self.idle_since_ms.load(Ordering::Acquire))
    }

    /// The next moment something may have to close: the idle or the head deadline.
    fn deadline(&self, idle: Duration, head: Duration) -> Option<Instant> {
        let idle = self.idle_since().map(|at| at + idle);
        let head = self.head_started().map(|at| at + head);
        match (idle, head) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// One request in progress on a connection; dropped with its response body.
#[derive(Debug)]
struct InProgress(Arc<ConnState>);

impl Drop for InProgress {
    fn drop(&mut self) {
        let state = &self.0;
        if state.in_progress.fetch_sub(1, Ordering::AcqRel) == 1 {
            state.idle_since_ms.store(state.now_ms(), Ordering::Release);
        }
    }
}

/// An I/O stream that reports arriving bytes to the connection state, and hands the stream
/// back when hyper drops it (for a lingering close).
struct Tracked<T> {
    inner: Option<T>,
    state: Arc<ConnState>,
    give_back: Option<oneshot::Sender<T>>,
}

impl<T> Tracked<T> {
    fn inner(&mut self) -> io::Result<Pin<&mut T>>
    where
        T: Unpin,
    {
        self.inner
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl<T> Drop for Tracked<T> {
    fn drop(&mut self) {
        if let (Some(inner), Some(give_back)) = (self.inner.take(), self.give_back.take()) {
            let _ = give_back.send(inner);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.inner()?.poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.bytes_read();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner()?.poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner()?.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner()?.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.inner()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(T::is_write_vectored)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::{REFUSAL_LOG_PERIOD, RefusalLog};
    use tokio::time::Instant;

    #[test]
    fn refusals_are_logged_once_per_peer_per_period() {
        let log = RefusalLog::default();
        let start = Instant::now();
        let a = IpAddr::from([10, 0, 0, 1]);
        let b = IpAddr::from([10, 0, 0, 2]);
        assert_eq!(log.admit(a, start), Some(0));
        assert_eq!(log.admit(a, start), None);
        assert_eq!(log.admit(a, start), None);
        assert_eq!(log.admit(b, start), Some(0));
        assert_eq!(log.admit(a, start + REFUSAL_LOG_PERIOD), Some(2));
    }
}
