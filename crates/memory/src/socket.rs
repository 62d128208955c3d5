//! [`Socket`]: a TCP connection for tokio whose reads and writes are system calls made
//! directly, with tokio's readiness (edge-triggered epoll, through [`AsyncFd`]).
//!
//! glibc's `recv`, `send` and `sendmsg` are thread cancellation points: once a process has a
//! second thread (the proxy has its audit writer), each call turns asynchronous cancellation
//! on before the system call and off after it, a locked compare-and-exchange on the thread's
//! cancellation word each time, the second one right after the kernel returns. A proxied
//! request makes four to six such calls: a profile at 1,000 policies put the pair at 0.16 µs
//! a request (`__pthread_disable_asynccancel` 0.105 µs, `__pthread_enable_asynccancel`
//! 0.059), which a single-threaded server (an nginx worker) never pays. Nothing in Portcullis
//! cancels a thread, so [`Socket`] makes the system calls through `syscall(2)`, which glibc
//! does not wrap. Elsewhere than Linux with glibc it makes the standard library's calls.

use std::io::{self, IoSlice};
use std::net::{Shutdown, TcpStream};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// At most this many slices go to one vectored write (Linux's `UIO_MAXIOV`); the rest are left
/// for the next call, as a short write.
const MAX_SLICES: usize = 1024;

/// A connected, non-blocking TCP stream registered with the runtime's reactor.
#[derive(Debug)]
pub struct Socket {
    io: AsyncFd<TcpStream>,
}

impl Socket {
    /// Takes over a tokio stream: its registration with the reactor is replaced by this one's.
    /// Call it within a tokio runtime with I/O enabled (outside one it panics, as tokio's own
    /// registration does).
    ///
    /// # Errors
    /// The reactor's (`epoll_ctl`), should it refuse the descriptor.
    pub fn new(tcp: tokio::net::TcpStream) -> io::Result<Self> {
        // `into_std` leaves the descriptor non-blocking.
        let tcp = tcp.into_std()?;
        let interest = Interest::READABLE | Interest::WRITABLE;
        #[allow(unsafe_code)]
        // SAFETY: the registration needs the descriptor to stay open and the same until it is
        // dropped: the stream owns it and is owned by the `AsyncFd`, which this type keeps
        // private and never hands out mutably (no one can swap the stream inside).
        let io =
            unsafe { AsyncFd::register_with_interest(tcp, interest) }.map_err(io::Error::from)?;
        Ok(Self { io })
    }

    /// The stream, for socket options and addresses.
    pub fn tcp(&self) -> &TcpStream {
        self.io.get_ref()
    }

    /// Writes with `send` once the socket is writable. As tokio's streams do, a short write
    /// (the send buffer filled) or `WouldBlock` clears the readiness, so the next write waits
    /// for epoll to report room instead of trying again.
    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        len: usize,
        send: impl Fn(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut ready = ready!(self.io.poll_write_ready(cx))?;
            match send(self.io.get_ref()) {
                Ok(n) => {
                    if 0 < n && n < len {
                        ready.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.io.poll_read_ready(cx))?;
            let room = buf.remaining();
            match sys::recv(self.io.get_ref(), buf) {
                Ok(n) => {
                    // With edge-triggered epoll, a read that did not fill the buffer drained
                    // the socket: the next read waits for readiness rather than making a call
                    // that would block (tokio's own streams do the same).
                    if 0 < n && n < room {
                        ready.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, buf.len(), |tcp| sys::send(tcp, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let sent = bufs.iter().take(MAX_SLICES).map(|buf| buf.len()).sum();
        self.poll_send(cx, sent, |tcp| {
            sys::send_vectored(tcp, &bufs[..bufs.len().min(MAX_SLICES)])
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Nothing is buffered here.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends FIN (the read side stays open), as tokio's `TcpStream` does.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.tcp().shutdown(Shutdown::Write))
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod sys {
    use std::io::{self, IoSlice};
    use std::net::TcpStream;
    use std::os::fd::AsRawFd;

    use tokio::io::ReadBuf;

    /// `syscall` returns -1 with `errno` set, as glibc's wrappers do.
    fn result(returned: libc::c_long) -> io::Result<usize> {
        usize::try_from(returned).map_err(|_| io::Error::last_os_error())
    }

    /// Fills from the start of the unfilled part and marks what arrived filled.
    pub(super) fn recv(tcp: &TcpStream, buf: &mut ReadBuf<'_>) -> io::Result<usize> {
        #[allow(unsafe_code)]
        // SAFETY: `unfilled_mut` hands out memory that may be uninitialised; `recvfrom` only
        // writes into it, at most its length, and nothing reads it before the kernel has.
        let unfilled = unsafe { buf.unfilled_mut() };
        #[allow(unsafe_code)]
        // SAFETY: the pointer and length describe that live, writable memory, which outlives
        // the call; the null address and length ask for no source address back.
        let received = result(unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                tcp.as_raw_fd(),
                unfilled.as_mut_ptr(),
                unfilled.len(),
                0,
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
            )
        })?;
        #[allow(unsafe_code)]
        // SAFETY: the kernel wrote `received` bytes (no more than the length it was given)
        // from the start of the unfilled part.
        unsafe {
            buf.assume_init(received);
        }
        buf.advance(received);
        Ok(received)
    }

    pub(super) fn send(tcp: &TcpStream, buf: &[u8]) -> io::Result<usize> {
        #[allow(unsafe_code)]
        // SAFETY: the pointer and length describe a live buffer the kernel only reads; the
        // null address and length 0 name no destination (the socket is connected).
        result(unsafe {
            libc::syscall(
                libc::SYS_sendto,
                tcp.as_raw_fd(),
                buf.as_ptr(),
                buf.len(),
                libc::MSG_NOSIGNAL,
                std::ptr::null::<libc::sockaddr>(),
                0,
            )
        })
    }

    pub(super) fn send_vectored(tcp: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // `IoSlice` is ABI-compatible with `iovec` on Unix (its documented guarantee).
        let iov = bufs.as_ptr().cast::<libc::iovec>().cast_mut();
        #[allow(unsafe_code)]
        // SAFETY: all-zero is a valid `msghdr`: no address, no control data, no slices yet.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_iov = iov;
        message.msg_iovlen = bufs.len();
        #[allow(unsafe_code)]
        // SAFETY: `message` and the slices it points to are live for the call, and `sendmsg`
        // only reads through its pointers.
        result(unsafe {
            libc::syscall(
                libc::SYS_sendmsg,
                tcp.as_raw_fd(),
                &raw const message,
                libc::MSG_NOSIGNAL,
            )
        })
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod sys {
    use std::io::{self, IoSlice, Read, Write};
    use std::net::TcpStream;

    use tokio::io::ReadBuf;

    pub(super) fn recv(mut tcp: &TcpStream, buf: &mut ReadBuf<'_>) -> io::Result<usize> {
        let received = tcp.read(buf.initialize_unfilled())?;
        buf.advance(received);
        Ok(received)
    }

    pub(super) fn send(mut tcp: &TcpStream, buf: &[u8]) -> io::Result<usize> {
        tcp.write(buf)
    }

    pub(super) fn send_vectored(mut tcp: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tcp.write_vectored(bufs)
    }
}

#[cfg(test)]
mod tests {
    use std::io::IoSlice;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::Socket;

    async fn pair() -> (TcpStream, Socket) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), Socket::new(accepted.unwrap().0).unwrap())
    }

    /// Bytes arrive as sent, 256 KiB of them in reads that wait on the reactor when the socket
    /// is drained; a peer's FIN is the end of the stream.
    #[tokio::test(flavor = "current_thread")]
    async fn reads_wait_for_bytes_and_end_at_the_peers_fin() {
        let (mut client, mut socket) = pair().await;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            socket.read_to_end(&mut got).await.unwrap();
            got
        });
        // The reader runs first and finds nothing to read.
        tokio::task::yield_now().await;
        let big: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        client.write_all(&big).await.unwrap();
        client.shutdown().await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(&got[..16], b"GET / HTTP/1.1\r\n");
        assert!(got[16..] == big[..], "{} bytes differ", got.len());
    }

    /// Writes go out in order, slices included, and wait for room when the peer reads slowly
    /// (more than the socket buffers hold); `shutdown` sends FIN and a peer gone is an error
    /// (EPIPE or a reset), not a signal.
    #[tokio::test(flavor = "current_thread")]
    async fn writes_wait_for_room_and_a_closed_peer_is_an_error() {
        let (mut client, mut socket) = pair().await;
        let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 253) as u8).collect();
        let expected = [&b"HTTP/1.1 200 OK\r\na: 1\r\n\r\n"[..], &big].concat();
        let writer = tokio::spawn(async move {
            let slices = [
                IoSlice::new(b"HTTP/1.1 200 OK\r\n"),
                IoSlice::new(b""),
                IoSlice::new(b"a: 1\r\n\r\n"),
            ];
            assert_eq!(socket.write_vectored(&slices).await.unwrap(), 25);
            socket.write_all(&big).await.unwrap();
            socket.shutdown().await.unwrap();
            socket
        });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got == expected, "{} bytes of {}", got.len(), expected.len());
        let mut socket = writer.await.unwrap();
        drop(client);
        let mut error = None;
        for _ in 0..100 {
            if let Err(e) = socket.write_all(&[0; 4096]).await {
                error = Some(e);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let error = error.expect("writes to a closed peer kept succeeding");
        assert!(
            matches!(
                error.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{error}"
        );
    }
}
