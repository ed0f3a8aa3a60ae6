//! Client connections (plaintext) whose writes reach the socket once per
//! flush, so that a small unary response (headers, message and trailers) is
//! one `write` instead of two `writev`s.
//!
//! Why: h2 copies a DATA frame's payload into its write buffer only below a
//! threshold (256 bytes on a socket that supports vectored writes, 1,024
//! bytes otherwise). A larger payload is queued beside the buffer, and h2
//! flushes the socket before it buffers the next frame, so the trailers of a
//! Resolve answer (about 350 bytes) went out in a second `writev`, a second
//! TCP segment and a second wake-up of the caller (docs/performance.md).
//! Reporting writes as not vectored raises the threshold to 1,024 bytes;
//! the [`BufWriter`] beneath joins what h2 then writes piecewise (the frame
//! head and a larger payload) into one write per flush. Every write h2 makes
//! is followed by a flush, so nothing waits in the buffer.
//!
//! TLS connections are not wrapped: h2 writes to the TLS stream there, so
//! this would not change what it does.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf},
    net::TcpStream,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Write buffer of one connection: a frame head and h2's largest DATA
/// payload (16 KiB, the default frame size) fit, so they leave in one write.
/// Only the pages a connection writes through become resident.
const WRITE_BUFFER_BYTES: usize = 32 * 1024;

/// A plaintext client connection; see the module documentation.
#[derive(Debug)]
pub(crate) struct CoalescedIo(BufWriter<TcpStream>);

impl CoalescedIo {
    pub(crate) fn new(stream: TcpStream) -> Self {
        CoalescedIo(BufWriter::with_capacity(WRITE_BUFFER_BYTES, stream))
    }
}

impl Connected for CoalescedIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().connect_info()
    }
}

impl AsyncRead for CoalescedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for CoalescedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    /// Not vectored, on purpose: h2 then copies payloads of up to 1,024
    /// bytes into its own buffer (see the module documentation).
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
