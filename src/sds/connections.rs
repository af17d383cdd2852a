//! `--max-connections`: connections beyond the limit are closed as soon as they are
//! accepted, so a runaway client cannot exhaust the bridge's file descriptors.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use crate::telemetry::metrics::Metrics;

/// Logs about refused connections at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

pub fn limit<S, IO>(
    incoming: S,
    max: usize,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = io::Result<Counted<IO>>>
where
    S: Stream<Item = io::Result<IO>>,
{
    let open = Arc::new(AtomicUsize::new(0));
    let mut last_warning: Option<Instant> = None;
    incoming.filter_map(move |accepted| {
        let result = match accepted {
            Err(err) => Some(Err(err)),
            Ok(io) if open.fetch_add(1, Ordering::AcqRel) >= max => {
                open.fetch_sub(1, Ordering::AcqRel);
                metrics.sds.connections_refused.inc();
                if last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(
                        limit = max,
                        "refusing SDS connections: --max-connections reached"
                    );
                }
                drop(io);
                None
            }
            Ok(io) => {
                metrics.sds.connections.inc();
                Some(Ok(Counted {
                    io,
                    _slot: Slot {
                        open: Arc::clone(&open),
                        metrics: Arc::clone(&metrics),
                    },
                }))
            }
        };
        std::future::ready(result)
    })
}

struct Slot {
    open: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.sds.connections.dec();
    }
}

/// A connection that frees its slot when it closes.
pub struct Counted<IO> {
    io: IO,
    _slot: Slot,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
