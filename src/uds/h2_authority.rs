//! Lets HTTP/2 clients whose `:authority` hyper refuses reach the gRPC services anyway.
//!
//! gRPC C-core clients (Python grpcio, Envoy's `google_grpc`) dialling `unix:/run/x.sock` send
//! the percent-encoded socket path as `:authority` (grpcio 1.85: `run%2Fx.sock`). h2 turns the
//! `:authority` into an `http::uri::Authority`, which refuses `%`, and resets the stream with
//! PROTOCOL_ERROR before tonic sees the request (hyperium/h2#487). We cannot change h2, so this
//! adapter sits on the read side of each accepted connection and rewrites header blocks
//! before h2 parses them: an `:authority` that `Authority` would refuse becomes `localhost`.
//! Nothing in the bridge depends on the authority (DESIGN.md, "SDS behaviour").
//!
//! HPACK makes this stateful: a client indexes headers into its dynamic table and refers to
//! them in later blocks, and h2's decoder must keep the same table. So every header block is
//! decoded here against a mirror of the client's table. As long as no block needed a fix, the
//! client's bytes go to h2 unchanged and h2's table stays identical to ours. From the first
//! fix on, every block is re-encoded with literals that never touch the dynamic table, so h2's
//! table stays as it was and can never disagree with what the client meant.
//!
//! Anything we cannot follow (not HTTP/2, frames out of order, undecodable HPACK, oversized
//! blocks) is handed to h2 so that h2 reports the protocol error itself; once blocks have been
//! re-encoded, h2 first gets a block it must reject, because its table no longer matches the
//! client's and passing the client's bytes on could make it misread them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD_LEN: usize = 9;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_PUSH_PROMISE: u8 = 0x5;
const TYPE_CONTINUATION: u8 = 0x9;

const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
const PRIORITY_LEN: usize = 5;

/// Frames we emit: the smallest SETTINGS_MAX_FRAME_SIZE a server may advertise, so h2 accepts
/// them whatever the builder configured (tonic/hyper advertise exactly this by default).
const MAX_EMITTED_FRAME: usize = 16_384;

/// The client's HPACK encoder is bound by our SETTINGS_HEADER_TABLE_SIZE, which hyper leaves at
/// the protocol default and tonic offers no knob for.
const HEADER_TABLE_SIZE: usize = 4_096;

/// Encoded bytes of one header block we hold before giving up on it. With hyper's defaults
/// (16 KiB header lists, 16 KiB frames, at most 5 CONTINUATIONs) h2 refuses any block past
/// ~112 KiB, so a legitimate block never gets near this.
const MAX_BLOCK: usize = 256 * 1024;

/// Decoded header list size (RFC 7540 §6.5.2 accounting) we re-encode before giving up: a
/// few bytes of indexed references can stand for megabytes. h2 itself sends GOAWAY past four
/// times its SETTINGS_MAX_HEADER_LIST_SIZE (64 KiB with hyper's defaults).
const MAX_DECODED: usize = 1024 * 1024;

const READ_CHUNK: usize = 16 * 1024;

/// An `out` buffer grown past this by a large block is given back once drained.
const OUT_KEEP_CAPACITY: usize = 64 * 1024;

const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// Index 0 is reserved (RFC 7541 §6.1): h2 fails the connection on it.
const UNDECODABLE_BLOCK: [u8; 1] = [0x80];

/// Would h2 reset a request carrying this `:authority`?
fn authority_needs_fix(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_err()
}

/// A client connection whose header blocks are fixed up on their way to h2; see the module
/// docs. Writes go to the inner stream untouched.
pub struct AuthorityFixingStream<S> {
    inner: S,
    transcoder: Transcoder,
    input: Box<[u8]>,
    input_start: usize,
    input_end: usize,
    eof: bool,
}

impl<S> AuthorityFixingStream<S> {
    pub fn new(inner: S) -> Self {
        Self::with_check(inner, authority_needs_fix)
    }

    fn with_check(inner: S, needs_fix: fn(&[u8]) -> bool) -> Self {
        AuthorityFixingStream {
            inner,
            transcoder: Transcoder::new(needs_fix),
            input: vec![0; READ_CHUNK].into_boxed_slice(),
            input_start: 0,
            input_end: 0,
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for AuthorityFixingStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFixingStream").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl Connected for AuthorityFixingStream<UnixStream> {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFixingStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if buf.remaining() == 0 || this.transcoder.drain_into(buf) {
                return Poll::Ready(Ok(()));
            }
            if this.input_start < this.input_end {
                let pending = &this.input[this.input_start..this.input_end];
                let budget = this.transcoder.passthrough_budget();
                if budget > 0 {
                    let n = budget.min(pending.len()).min(buf.remaining());
                    buf.put_slice(&pending[..n]);
                    this.transcoder.passed_through(n);
                    this.input_start += n;
                    return Poll::Ready(Ok(()));
                }
                this.input_start += this.transcoder.feed(pending);
                continue;
            }
            if this.eof {
                this.transcoder.finish();
                if this.transcoder.drain_into(buf) {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Ok(()));
            }
            let budget = this.transcoder.passthrough_budget();
            if budget > 0 {
                // Frame payloads we don't touch (DATA above all) go straight into h2's buffer.
                let n = if budget >= buf.remaining() {
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    buf.filled().len() - before
                } else {
                    let mut limited = ReadBuf::new(buf.initialize_unfilled_to(budget));
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
                    let n = limited.filled().len();
                    buf.advance(n);
                    n
                };
                if n == 0 {
                    this.eof = true;
                    continue;
                }
                this.transcoder.passed_through(n);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = ReadBuf::new(&mut this.input);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
            let n = chunk.filled().len();
            this.input_start = 0;
            this.input_end = n;
            this.eof = n == 0;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFixingStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Checking the connection preface; `matched` bytes of it seen so far.
    Preface { matched: usize },
    /// Collecting the 9 bytes of a frame header into `head`.
    Head,
    /// Copying the payload of a frame we don't touch.
    Forward { remaining: usize },
    /// Collecting the payload of a HEADERS or CONTINUATION frame into `raw`.
    Collect { remaining: usize },
    /// Copying everything from here on.
    Passthrough,
}

/// Whether h2's HPACK table still equals the client's, i.e. the client's bytes may reach h2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Mirrored,
    Reencoding,
}

#[derive(Debug, Clone, Copy)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(b: &[u8; FRAME_HEAD_LEN]) -> Self {
        FrameHead {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// The header block being collected, from its HEADERS frame on.
#[derive(Debug, Clone, Copy)]
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
}

/// The byte-level state machine behind [`AuthorityFixingStream`], free of I/O.
///
/// Input is offered through [`Transcoder::feed`] while [`Transcoder::passthrough_budget`] is
/// 0; while it is not, that many input bytes are to be copied out unchanged by the caller.
/// Output other than those copies collects in `out`.
struct Transcoder {
    phase: Phase,
    compression: Compression,
    head: [u8; FRAME_HEAD_LEN],
    head_len: usize,
    frame: FrameHead,
    /// Where the current frame's payload starts in `raw`.
    frame_start: usize,
    /// The block's frames exactly as the client sent them.
    raw: Vec<u8>,
    /// The block's HPACK fragments, padding and priority fields removed.
    block: Vec<u8>,
    open: Option<OpenBlock>,
    decoder: Decoder<'static>,
    /// The current block re-encoded.
    encoded: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    needs_fix: fn(&[u8]) -> bool,
}

impl Transcoder {
    fn new(needs_fix: fn(&[u8]) -> bool) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Transcoder {
            phase: Phase::Preface { matched: 0 },
            compression: Compression::Mirrored,
            head: [0; FRAME_HEAD_LEN],
            head_len: 0,
            frame: FrameHead { len: 0, kind: 0, flags: 0, stream: 0 },
            frame_start: 0,
            raw: Vec::new(),
            block: Vec::new(),
            open: None,
            decoder,
            encoded: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            needs_fix,
        }
    }

    fn passthrough_budget(&self) -> usize {
        match self.phase {
            Phase::Forward { remaining } => remaining,
            Phase::Passthrough => usize::MAX,
            _ => 0,
        }
    }

    fn passed_through(&mut self, n: usize) {
        if let Phase::Forward { remaining } = self.phase {
            let remaining = remaining.saturating_sub(n);
            self.phase = if remaining == 0 { Phase::Head } else { Phase::Forward { remaining } };
        }
    }

    /// Copies pending output into `buf`; false if there was none.
    fn drain_into(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let pending = &self.out[self.out_pos..];
        if pending.is_empty() {
            return false;
        }
        let n = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..n]);
        self.out_pos += n;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > OUT_KEEP_CAPACITY {
                self.out.shrink_to(READ_CHUNK);
            }
        }
        n > 0
    }

    /// Consumes input while no passthrough budget is open; returns how many bytes it took.
    fn feed(&mut self, input: &[u8]) -> usize {
        let mut used = 0;
        while used < input.len() && self.passthrough_budget() == 0 {
            let rest = &input[used..];
            let taken = match self.phase {
                Phase::Preface { matched } => self.check_preface(matched, rest),
                Phase::Head => {
                    let n = (FRAME_HEAD_LEN - self.head_len).min(rest.len());
                    self.head[self.head_len..self.head_len + n].copy_from_slice(&rest[..n]);
                    self.head_len += n;
                    if self.head_len == FRAME_HEAD_LEN {
                        self.head_len = 0;
                        self.on_frame_head();
                    }
                    n
                }
                Phase::Collect { remaining } => {
                    let n = remaining.min(rest.len());
                    self.raw.extend_from_slice(&rest[..n]);
                    if n == remaining {
                        self.on_frame_payload();
                    } else {
                        self.phase = Phase::Collect { remaining: remaining - n };
                    }
                    n
                }
                Phase::Forward { .. } | Phase::Passthrough => 0,
            };
            if taken == 0 && self.passthrough_budget() == 0 {
                // Unreachable by construction; without it a logic error would spin forever.
                self.give_up();
            }
            used += taken;
        }
        used
    }

    /// The connection ended: whatever was held back goes to h2, which sees the truncation.
    fn finish(&mut self) {
        if self.phase == Phase::Passthrough {
            return;
        }
        // Re-encoding, the client's bytes may not reach h2; an unfinished block does no good.
        if self.compression == Compression::Mirrored {
            self.out.extend_from_slice(&self.raw);
        }
        if self.phase == Phase::Head {
            self.out.extend_from_slice(&self.head[..self.head_len]);
        }
        self.raw.clear();
        self.block.clear();
        self.head_len = 0;
        self.phase = Phase::Passthrough;
    }

    fn check_preface(&mut self, matched: usize, input: &[u8]) -> usize {
        let expected = &PREFACE[matched..];
        let n = expected.len().min(input.len());
        match input[..n].iter().zip(expected).position(|(got, want)| got != want) {
            Some(mismatch) => {
                let mut received = PREFACE[..matched].to_vec();
                received.extend_from_slice(&input[..input.len().min(64)]);
                tracing::warn!(
                    received = %excerpt(&received),
                    "a client connected without speaking HTTP/2; gRPC needs HTTP/2 with prior \
                     knowledge (an Envoy cluster without http2_protocol_options sends HTTP/1.1)"
                );
                self.out.extend_from_slice(&input[..mismatch]);
                self.phase = Phase::Passthrough;
                mismatch
            }
            None => {
                self.out.extend_from_slice(&input[..n]);
                self.phase =
                    if matched + n == PREFACE.len() { Phase::Head } else { Phase::Preface { matched: matched + n } };
                n
            }
        }
    }

    fn on_frame_head(&mut self) {
        let frame = FrameHead::parse(&self.head);
        let starts_block = frame.kind == TYPE_HEADERS && self.open.is_none();
        let continues_block = frame.kind == TYPE_CONTINUATION && self.open.is_some_and(|b| b.stream == frame.stream);
        if !starts_block && !continues_block {
            if self.open.is_some() || frame.kind == TYPE_CONTINUATION || frame.kind == TYPE_PUSH_PROMISE {
                // h2 refuses each of these with a connection error.
                self.give_up();
                self.out.extend_from_slice(&self.head);
                return;
            }
            self.out.extend_from_slice(&self.head);
            self.phase = if frame.len == 0 { Phase::Head } else { Phase::Forward { remaining: frame.len } };
            return;
        }
        if self.raw.len() + FRAME_HEAD_LEN + frame.len > MAX_BLOCK {
            self.give_up();
            self.out.extend_from_slice(&self.head);
            return;
        }
        if starts_block {
            self.open = Some(OpenBlock {
                stream: frame.stream,
                end_stream: frame.flags & FLAG_END_STREAM != 0,
                priority: None,
            });
        }
        self.frame = frame;
        self.raw.extend_from_slice(&self.head);
        self.frame_start = self.raw.len();
        if frame.len == 0 {
            self.on_frame_payload();
        } else {
            self.phase = Phase::Collect { remaining: frame.len };
        }
    }

    fn on_frame_payload(&mut self) {
        self.phase = Phase::Head;
        let payload = &self.raw[self.frame_start..];
        let fragment = if self.frame.kind == TYPE_HEADERS {
            let Some((priority, fragment)) = split_headers_payload(payload, self.frame.flags) else {
                self.give_up();
                return;
            };
            if let Some(open) = self.open.as_mut() {
                open.priority = priority;
            }
            fragment
        } else {
            payload
        };
        self.block.extend_from_slice(fragment);
        if self.frame.flags & FLAG_END_HEADERS != 0 {
            self.on_block();
        }
    }

    fn on_block(&mut self) {
        let Some(open) = self.open.take() else {
            self.give_up();
            return;
        };
        self.encoded.clear();
        let fixed = match reencode(&mut self.decoder, &self.block, self.needs_fix, &mut self.encoded) {
            Ok(fixed) => fixed,
            Err(reason) => {
                tracing::debug!(reason, "cannot follow a client's header block; h2 will judge it");
                self.open = Some(open);
                self.give_up();
                return;
            }
        };
        if let Some(original) = fixed
            && self.compression == Compression::Mirrored
        {
            tracing::debug!(
                authority = %excerpt(&original),
                "client sent an :authority hyper refuses (a gRPC C-core client names the socket \
                 path); serving it as localhost"
            );
            self.compression = Compression::Reencoding;
        }
        match self.compression {
            Compression::Mirrored => self.out.extend_from_slice(&self.raw),
            Compression::Reencoding => emit_block(&mut self.out, open, &self.encoded),
        }
        self.raw.clear();
        self.block.clear();
    }

    /// Stops following the connection and copies the rest of it through.
    fn give_up(&mut self) {
        match self.compression {
            Compression::Mirrored => self.out.extend_from_slice(&self.raw),
            Compression::Reencoding => {
                let stream = self.open.map_or(self.frame.stream, |b| b.stream);
                write_frame_head(&mut self.out, UNDECODABLE_BLOCK.len(), TYPE_HEADERS, FLAG_END_HEADERS, stream);
                self.out.extend_from_slice(&UNDECODABLE_BLOCK);
            }
        }
        self.raw.clear();
        self.block.clear();
        self.open = None;
        self.phase = Phase::Passthrough;
    }
}

/// Splits a HEADERS payload into its priority fields and header block fragment; `None` if the
/// padding or priority fields don't fit (h2 fails the connection on such a frame).
fn split_headers_payload(payload: &[u8], flags: u8) -> Option<(Option<[u8; PRIORITY_LEN]>, &[u8])> {
    let mut rest = payload;
    let mut pad = 0;
    if flags & FLAG_PADDED != 0 {
        let (&len, after) = rest.split_first()?;
        pad = usize::from(len);
        rest = after;
    }
    let mut priority = None;
    if flags & FLAG_PRIORITY != 0 {
        let (fields, after) = rest.split_first_chunk::<PRIORITY_LEN>()?;
        priority = Some(*fields);
        rest = after;
    }
    let end = rest.len().checked_sub(pad)?;
    Some((priority, &rest[..end]))
}

/// Decodes `block` against the client's table and re-encodes it into `dst` as literals that
/// leave the receiver's dynamic table alone. Returns the first `:authority` it replaced.
fn reencode(
    decoder: &mut Decoder<'static>,
    block: &[u8],
    needs_fix: fn(&[u8]) -> bool,
    dst: &mut Vec<u8>,
) -> Result<Option<Vec<u8>>, &'static str> {
    // loona-hpack refuses a block that ends in a size update, though a block made only of
    // size updates is valid; they may only lead a block (RFC 7541 §4.2), so take them here.
    let mut rest = block;
    while let Some(&first) = rest.first() {
        if first & 0xe0 != 0x20 {
            break;
        }
        let (size, used) = decode_prefix_int(rest, 5).ok_or("malformed dynamic table size update")?;
        if size > HEADER_TABLE_SIZE {
            return Err("dynamic table size update above SETTINGS_HEADER_TABLE_SIZE");
        }
        decoder.set_max_table_size(size);
        rest = &rest[used..];
    }

    let mut replaced = None;
    let mut list_size = 0usize;
    decoder
        .decode_with_cb(rest, |name, value| {
            list_size = list_size.saturating_add(name.len() + value.len() + 32);
            if list_size > MAX_DECODED {
                return;
            }
            let mut value: &[u8] = &value;
            if name.as_ref() == b":authority" && needs_fix(value) {
                if replaced.is_none() {
                    replaced = Some(value.to_vec());
                }
                value = REPLACEMENT_AUTHORITY;
            }
            encode_literal(dst, &name, value);
        })
        .map_err(|_| "undecodable HPACK block")?;
    if list_size > MAX_DECODED {
        return Err("decoded header list too large");
    }
    Ok(replaced)
}

/// An HPACK integer with an N-bit prefix (RFC 7541 §5.1), at most 5 bytes; value and length.
fn decode_prefix_int(buf: &[u8], prefix_bits: u32) -> Option<(usize, usize)> {
    let mask = (1usize << prefix_bits) - 1;
    let (&first, rest) = buf.split_first()?;
    let mut value = usize::from(first) & mask;
    if value < mask {
        return Some((value, 1));
    }
    for (i, &b) in rest.iter().take(4).enumerate() {
        value += usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 2));
        }
    }
    None
}

fn encode_prefix_int(dst: &mut Vec<u8>, mut value: usize, prefix_bits: u32, high_bits: u8) {
    let mask = (1usize << prefix_bits) - 1;
    if value < mask {
        dst.push(high_bits | value as u8);
        return;
    }
    dst.push(high_bits | mask as u8);
    value -= mask;
    while value >= 0x80 {
        dst.push(0x80 | (value & 0x7f) as u8);
        value >>= 7;
    }
    dst.push(value as u8);
}

/// "Literal Header Field without Indexing — New Name" (RFC 7541 §6.2.2), no Huffman coding.
fn encode_literal(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.push(0x00);
    encode_prefix_int(dst, name.len(), 7, 0);
    dst.extend_from_slice(name);
    encode_prefix_int(dst, value.len(), 7, 0);
    dst.extend_from_slice(value);
}

fn write_frame_head(dst: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = (len as u32).to_be_bytes();
    dst.extend_from_slice(&len[1..]);
    dst.push(kind);
    dst.push(flags);
    dst.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

/// Frames a re-encoded block as HEADERS + CONTINUATIONs, none above `MAX_EMITTED_FRAME`.
fn emit_block(out: &mut Vec<u8>, open: OpenBlock, block: &[u8]) {
    let priority_len = if open.priority.is_some() { PRIORITY_LEN } else { 0 };
    let (first, mut rest) = block.split_at(block.len().min(MAX_EMITTED_FRAME - priority_len));
    let mut flags = 0;
    if open.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if open.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    out.reserve(block.len() + FRAME_HEAD_LEN * (1 + block.len() / MAX_EMITTED_FRAME) + priority_len);
    write_frame_head(out, first.len() + priority_len, TYPE_HEADERS, flags, open.stream);
    if let Some(priority) = open.priority {
        out.extend_from_slice(&priority);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(rest.len().min(MAX_EMITTED_FRAME));
        let flags = if after.is_empty() { FLAG_END_HEADERS } else { 0 };
        write_frame_head(out, chunk.len(), TYPE_CONTINUATION, flags, open.stream);
        out.extend_from_slice(chunk);
        rest = after;
    }
}

/// A short, printable prefix of untrusted bytes for a log line.
fn excerpt(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(64)];
    let mut s: String = String::from_utf8_lossy(shown).escape_debug().collect();
    if bytes.len() > shown.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {}
