//! The agent-facing listener: accept, mTLS handshake (identity), then HTTP/1.1 or HTTP/2.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use portcullis_identity::LiveIdentity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::Shared;
use crate::pipeline::{ConnectionIdentity, handle};

/// Accepts agent connections until `shutdown` turns true, then lets open connections finish
/// their in-flight requests.
pub(crate) async fn serve(
    listener: TcpListener,
    identity: watch::Receiver<Arc<LiveIdentity>>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let refusals = Arc::new(RefusalLog::default());
    let connections = Arc::new(Semaphore::new(shared.limits.max_connections));
    loop {
        // Holding a permit before accepting applies back-pressure in the kernel's accept
        // queue instead of accepting connections we would have to drop.
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
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
            _ = shutdown.changed() => return,
        };
        // The identity in force now: a rotated pair or bundle applies from this handshake on,
        // while connections accepted earlier keep the config they were accepted with.
        let acceptor = TlsAcceptor::from(identity.borrow().tls.clone());
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let refusals = refusals.clone();
        tokio::spawn(async move {
            shared.metrics.connections_active.inc();
            connection(tcp, peer, acceptor, shared.clone(), &refusals, shutdown).await;
            shared.metrics.connections_active.dec();
            drop(permit);
        });
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    refusals: &RefusalLog,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let limits = &shared.limits;
    let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
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
    let conn = Arc::new(ConnectionIdentity { agent, peer });

    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: tls,
        activity: activity.clone(),
    });
    let service_shared = shared.clone();
    let service = service_fn(move |request| handle(service_shared.clone(), conn.clone(), request));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_h2_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);

    let idle = limits.idle_timeout;
    let mut draining = false;
    loop {
        let idle_deadline = activity.last() + idle;
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(idle_deadline), if !draining => {
                if activity.last() + idle <= Instant::now() {
                    // No bytes either way for the idle timeout: close once in-flight
                    // requests (if any) complete.
                    connection.as_mut().graceful_shutdown();
                    draining = true;
                }
            }
            _ = shutdown.changed(), if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
        }
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

/// Last time bytes moved on a connection, for the idle timeout.
#[derive(Debug)]
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

pin_project! {
    /// An I/O stream that records when bytes last moved.
    struct Tracked<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
    }
}

impl<T: AsyncRead> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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
