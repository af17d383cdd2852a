//! The `:authority`-fixing reader every accepted connection goes through: arbitrary client
//! bytes, delivered in read sizes taken from the input. Never a panic; output bounded.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    next: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let size = self
            .sizes
            .get(self.next % self.sizes.len().max(1))
            .map_or(16_384, |s| usize::from(*s) * 64 + 1);
        self.next += 1;
        let take = size.min(buf.remaining()).min(self.data.len());
        buf.put_slice(&self.data[..take]);
        self.data = &self.data[take..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunked<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (sizes, body) = rest.split_at(usize::from(n % 8).min(rest.len()));
    // Most inputs start with the preface, so the frame parser is reached.
    let input: Vec<u8> = if n & 0x80 == 0 {
        [PREFACE, body].concat()
    } else {
        body.to_vec()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut reader = Chunked {
        data: &input,
        sizes,
        next: 0,
    };
    let mut fixed = svid_bridge::uds::AuthorityFixingStream::new(&mut reader);
    let mut out = Vec::new();
    if runtime.block_on(fixed.read_to_end(&mut out)).is_ok() {
        assert!(
            out.len() <= input.len() * 4 + 64 * 1024,
            "{} bytes out of {}",
            out.len(),
            input.len()
        );
    }
});
