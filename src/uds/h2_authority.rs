//! Lets HTTP/2 clients whose `:authority` hyper refuses reach the gRPC services anyway.
//!
//! gRPC C-core clients (Python grpcio, Envoy's `google_grpc`) dialling `unix:/run/x.sock` send
//! the percent-encoded socket path as `:authority` (grpcio 1.85: `run%2Fx.sock`). h2 turns the
//! `:authority` into an `http::uri::Authority`, which refuses `%`, and resets the stream with
//! PROTOCOL_ERROR before tonic sees the request (hyperium/h2#487). We cannot change h2, so this
//! adapter sits on the read side of each accepted connection and rewrites header blocks
//! before h2 parses them: an `:authority` that `Authority` would refuse becomes `localhost`.
//! Nothing in the bridge depends on the authority (docs/behaviours.md, "gRPC C-core clients and :authority").
//!
//! HPACK makes this stateful: a client indexes headers into its dynamic table and refers to
//! them in later blocks, and h2's decoder must keep the same table. So every header block is
//! decoded here against a mirror of the client's table. As long as no block needed a fix, the
//! client's bytes go to h2 unchanged and h2's table stays identical to ours. From the first
//! fix on, every block is re-encoded with literals that never touch the dynamic table, so h2's
//! table stays as it was and can never disagree with what the client meant.
//!
//! Anything we cannot follow (not HTTP/2, frames out of order, undecodable HPACK, oversized or
//! too costly blocks) is handed to h2 so that h2 reports the protocol error itself; once blocks have been
//! re-encoded, h2 first gets a block it must reject, because its table no longer matches the
//! client's and passing the client's bytes on could make it misread them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

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

/// Huffman-coded strings decoded per connection before we stop following it. loona-hpack
/// builds its Huffman tables anew for every such string (~12 µs each), so without a bound a
/// client could make us spend far more CPU than h2 spends on the same bytes. Real clients send
/// a dozen in their first block and index them afterwards (gRPC C-core sends none).
const HUFFMAN_BUDGET: usize = 1024;

/// Per-connection input buffer. SDS and CSI requests are a few hundred bytes; at 16 KiB this
/// buffer cost 8 KiB of RSS per idle sidecar connection (BENCHMARKS.md, heap profile).
const READ_CHUNK: usize = 2 * 1024;

/// A buffer grown past this by a large block is given back once emptied.
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
}

impl<S: std::fmt::Debug> std::fmt::Debug for AuthorityFixingStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFixingStream")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Handlers still see who connected: for a `UnixStream`, its `UdsConnectInfo` (SO_PEERCRED).
impl<S: Connected> Connected for AuthorityFixingStream<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFixingStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
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
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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
    huffman_budget: usize,
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
            frame: FrameHead {
                len: 0,
                kind: 0,
                flags: 0,
                stream: 0,
            },
            frame_start: 0,
            raw: Vec::new(),
            block: Vec::new(),
            open: None,
            decoder,
            encoded: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            huffman_budget: HUFFMAN_BUDGET,
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
            self.phase = if remaining == 0 {
                Phase::Head
            } else {
                Phase::Forward { remaining }
            };
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
                        self.phase = Phase::Collect {
                            remaining: remaining - n,
                        };
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
        match input[..n]
            .iter()
            .zip(expected)
            .position(|(got, want)| got != want)
        {
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
                self.phase = if matched + n == PREFACE.len() {
                    Phase::Head
                } else {
                    Phase::Preface {
                        matched: matched + n,
                    }
                };
                n
            }
        }
    }

    fn on_frame_head(&mut self) {
        let frame = FrameHead::parse(&self.head);
        let starts_block = frame.kind == TYPE_HEADERS && self.open.is_none();
        let continues_block =
            frame.kind == TYPE_CONTINUATION && self.open.is_some_and(|b| b.stream == frame.stream);
        if !starts_block && !continues_block {
            if self.open.is_some()
                || frame.kind == TYPE_CONTINUATION
                || frame.kind == TYPE_PUSH_PROMISE
            {
                // h2 refuses each of these with a connection error.
                self.give_up();
                self.out.extend_from_slice(&self.head);
                return;
            }
            self.out.extend_from_slice(&self.head);
            self.phase = if frame.len == 0 {
                Phase::Head
            } else {
                Phase::Forward {
                    remaining: frame.len,
                }
            };
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
            self.phase = Phase::Collect {
                remaining: frame.len,
            };
        }
    }

    fn on_frame_payload(&mut self) {
        self.phase = Phase::Head;
        let payload = &self.raw[self.frame_start..];
        let fragment = if self.frame.kind == TYPE_HEADERS {
            let Some((priority, fragment)) = split_headers_payload(payload, self.frame.flags)
            else {
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
        let Some(huffman) =
            count_huffman_strings(&self.block).filter(|&n| n <= self.huffman_budget)
        else {
            tracing::debug!(
                "stopped following a client's header compression (malformed, or too costly)"
            );
            self.open = Some(open);
            self.give_up();
            return;
        };
        self.huffman_budget -= huffman;
        self.encoded.clear();
        let fixed = match reencode(
            &mut self.decoder,
            &self.block,
            self.needs_fix,
            &mut self.encoded,
        ) {
            Ok(fixed) => fixed,
            Err(reason) => {
                tracing::debug!(
                    reason,
                    "cannot follow a client's header block; h2 will judge it"
                );
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
        for buf in [&mut self.raw, &mut self.block, &mut self.encoded] {
            buf.clear();
            if buf.capacity() > OUT_KEEP_CAPACITY {
                buf.shrink_to(0);
            }
        }
    }

    /// Stops following the connection and copies the rest of it through.
    fn give_up(&mut self) {
        match self.compression {
            Compression::Mirrored => self.out.extend_from_slice(&self.raw),
            Compression::Reencoding => {
                let stream = self.open.map_or(self.frame.stream, |b| b.stream);
                write_frame_head(
                    &mut self.out,
                    UNDECODABLE_BLOCK.len(),
                    TYPE_HEADERS,
                    FLAG_END_HEADERS,
                    stream,
                );
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

/// How many Huffman-coded strings `block` holds, walking only its structure (RFC 7541 §6);
/// `None` if it is malformed.
fn count_huffman_strings(block: &[u8]) -> Option<usize> {
    let mut rest = block;
    let mut count = 0;
    while let Some(&first) = rest.first() {
        let (prefix_bits, literal) = match first {
            0x80.. => (7, false),
            0x40.. => (6, true),
            0x20.. => (5, false),
            _ => (4, true),
        };
        let (name_index, used) = decode_prefix_int(rest, prefix_bits)?;
        rest = &rest[used..];
        if !literal {
            continue;
        }
        let strings = if name_index == 0 { 2 } else { 1 };
        for _ in 0..strings {
            let &flags = rest.first()?;
            let (len, used) = decode_prefix_int(rest, 7)?;
            rest = rest.get(used + len..)?;
            count += usize::from(flags & 0x80 != 0);
        }
    }
    Some(count)
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
        let (size, used) =
            decode_prefix_int(rest, 5).ok_or("malformed dynamic table size update")?;
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
    let priority_len = if open.priority.is_some() {
        PRIORITY_LEN
    } else {
        0
    };
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
    out.reserve(
        block.len() + FRAME_HEAD_LEN * (1 + block.len() / MAX_EMITTED_FRAME) + priority_len,
    );
    write_frame_head(
        out,
        first.len() + priority_len,
        TYPE_HEADERS,
        flags,
        open.stream,
    );
    if let Some(priority) = open.priority {
        out.extend_from_slice(&priority);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(rest.len().min(MAX_EMITTED_FRAME));
        let flags = if after.is_empty() {
            FLAG_END_HEADERS
        } else {
            0
        };
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
mod tests {
    use std::sync::{Arc, Mutex};

    use futures::FutureExt as _;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
    use tokio::net::UnixStream;

    use super::*;

    /// grpcio 1.85.1's first request on a channel to `unix:/tmp/sn/y.sock` (captured): every
    /// field a literal with incremental indexing, `:authority` = `tmp%2Fsn%2Fy.sock`.
    const GRPCIO_FIRST: &str = "40053a70617468062f612e422f43400a3a617574686f7269747911746d70253246736e253246792e736f636b8386400c636f6e74656e742d74797065106170706c69636174696f6e2f677270634002746508747261696c6572734014677270632d6163636570742d656e636f64696e67176964656e746974792c206465666c6174652c20677a6970400c677270632d74696d656f757405313031306d400a757365722d6167656e7430677270632d707974686f6e2f312e38352e3120677270632d632f35382e302e3020286c696e75783b2063687474703229";
    /// Its second request on the same connection: nothing but references to the first.
    const GRPCIO_SECOND: &str = "c4c38386c2c1c0bfbe";
    /// `:authority: run%2Fsvid%2Fsds.sock` Huffman-coded (Python hpack 4.2, huffman=True).
    const HUFFMAN_AUTHORITY: &str =
        "83864485606bdd62f74190b2da95161477348a8b0a2442e8393aff4082497f864d833505b11f";

    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const DATA: u8 = 0x0;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame_head(&mut v, payload.len(), kind, flags, stream);
        v.extend_from_slice(payload);
        v
    }

    fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        v.extend(frame(SETTINGS, 0, 0, &[]));
        frames.iter().for_each(|f| v.extend_from_slice(f));
        v
    }

    fn literal_with_indexing(name_index: u8, value: &[u8]) -> Vec<u8> {
        let mut v = vec![0x40 | name_index];
        encode_prefix_int(&mut v, value.len(), 7, 0);
        v.extend_from_slice(value);
        v
    }

    fn headers(stream: u32, block: &[u8]) -> Vec<u8> {
        frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, block)
    }

    /// Reads from `inner` in pieces of the given sizes, in turn.
    struct Chunked<S> {
        inner: S,
        sizes: Vec<usize>,
        next: usize,
    }

    impl<S> Chunked<S> {
        fn new(inner: S, sizes: &[usize]) -> Self {
            Chunked {
                inner,
                sizes: if sizes.is_empty() {
                    vec![usize::MAX]
                } else {
                    sizes.to_vec()
                },
                next: 0,
            }
        }
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Chunked<S> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let size = this.sizes[this.next % this.sizes.len()].clamp(1, buf.remaining().max(1));
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(size.min(buf.remaining())));
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
            let n = limited.filled().len();
            buf.advance(n);
            this.next += 1;
            Poll::Ready(Ok(()))
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Chunked<S> {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    /// What h2 would read from the adapter, read in pieces of `reads` bytes.
    async fn pump(input: &[u8], chunks: &[usize], reads: &[usize]) -> Vec<u8> {
        let mut adapter = AuthorityFixingStream::new(Chunked::new(input, chunks));
        let mut out = Vec::new();
        let mut buf = vec![0; 1 << 16];
        for i in 0.. {
            let size = reads
                .get(i % reads.len().max(1))
                .copied()
                .unwrap_or(16_384)
                .clamp(1, buf.len());
            let n = adapter.read(&mut buf[..size]).await.unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
        unreachable!()
    }

    fn transcode(input: &[u8]) -> Vec<u8> {
        futures::executor::block_on(pump(input, &[], &[]))
    }

    /// The frames after the preface.
    fn parse_frames(mut bytes: &[u8]) -> Vec<(FrameHead, Vec<u8>)> {
        assert!(bytes.starts_with(PREFACE));
        bytes = &bytes[PREFACE.len()..];
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let head = FrameHead::parse(bytes[..FRAME_HEAD_LEN].try_into().unwrap());
            frames.push((
                head,
                bytes[FRAME_HEAD_LEN..FRAME_HEAD_LEN + head.len].to_vec(),
            ));
            bytes = &bytes[FRAME_HEAD_LEN + head.len..];
        }
        frames
    }

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn field(name: &str, value: &str) -> (Vec<u8>, Vec<u8>) {
        (name.as_bytes().to_vec(), value.as_bytes().to_vec())
    }

    fn grpcio_fields(authority: &str) -> Fields {
        vec![
            field(":path", "/a.B/C"),
            field(":authority", authority),
            field(":method", "POST"),
            field(":scheme", "http"),
            field("content-type", "application/grpc"),
            field("te", "trailers"),
            field("grpc-accept-encoding", "identity, deflate, gzip"),
            field("grpc-timeout", "1010m"),
            field(
                "user-agent",
                "grpc-python/1.85.1 grpc-c/58.0.0 (linux; chttp2)",
            ),
        ]
    }

    /// Each header block in `frames`, decoded, checking the framing h2 requires on the way.
    fn decode_blocks(frames: &[(FrameHead, Vec<u8>)]) -> Vec<Fields> {
        let mut decoder = Decoder::new();
        let mut blocks = Vec::new();
        let mut block: Option<Vec<u8>> = None;
        for (head, payload) in frames {
            assert!(head.len <= MAX_EMITTED_FRAME, "{head:?}");
            match head.kind {
                TYPE_HEADERS => {
                    assert!(block.is_none(), "HEADERS inside a block");
                    let (_, fragment) = split_headers_payload(payload, head.flags).unwrap();
                    block = Some(fragment.to_vec());
                }
                TYPE_CONTINUATION => block
                    .as_mut()
                    .expect("CONTINUATION outside a block")
                    .extend(payload),
                _ => assert!(block.is_none(), "{head:?} inside a block"),
            }
            if matches!(head.kind, TYPE_HEADERS | TYPE_CONTINUATION)
                && head.flags & FLAG_END_HEADERS != 0
            {
                blocks.push(decoder.decode(&block.take().unwrap()).unwrap());
            }
        }
        assert!(block.is_none(), "unterminated block");
        blocks
    }

    #[derive(Debug)]
    struct H2Outcome {
        requests: Vec<http::request::Parts>,
        error: Option<h2::Error>,
    }

    /// Feeds `input` (a client's side of a connection) to a real h2 server, with or without the
    /// adapter, and returns what the server made of it once it has processed every byte: a
    /// PING goes last and its ACK tells when.
    async fn serve_h2(input: &[u8], chunks: &[usize], adapt: bool) -> H2Outcome {
        let (mut client, server) = tokio::io::duplex(1 << 22);
        client.write_all(input).await.unwrap();
        client
            .write_all(&frame(PING, 0, 0, b"lastping"))
            .await
            .unwrap();
        let server = Chunked::new(server, chunks);
        if adapt {
            accept_all(AuthorityFixingStream::new(server), client).await
        } else {
            accept_all(server, client).await
        }
    }

    async fn accept_all<T: AsyncRead + AsyncWrite + Unpin>(
        io: T,
        mut client: DuplexStream,
    ) -> H2Outcome {
        let mut requests = Vec::new();
        let mut conn = match h2::server::handshake(io).await {
            Ok(conn) => conn,
            Err(err) => {
                return H2Outcome {
                    requests,
                    error: Some(err),
                };
            }
        };
        let ack = wait_for_ping_ack(&mut client);
        tokio::pin!(ack);
        loop {
            tokio::select! {
                biased;
                next = conn.accept() => match next {
                    Some(Ok((request, _respond))) => requests.push(request.into_parts().0),
                    Some(Err(err)) => return H2Outcome { requests, error: Some(err) },
                    None => break,
                },
                () = &mut ack => {
                    while let Some(Some(next)) = conn.accept().now_or_never() {
                        match next {
                            Ok((request, _respond)) => requests.push(request.into_parts().0),
                            Err(err) => return H2Outcome { requests, error: Some(err) },
                        }
                    }
                    break;
                }
            }
        }
        H2Outcome {
            requests,
            error: None,
        }
    }

    async fn wait_for_ping_ack(client: &mut DuplexStream) {
        let mut seen = Vec::new();
        let mut buf = [0; 4096];
        loop {
            let n = client.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            seen.extend_from_slice(&buf[..n]);
            let mut rest = &seen[..];
            while rest.len() >= FRAME_HEAD_LEN {
                let head = FrameHead::parse(rest[..FRAME_HEAD_LEN].try_into().unwrap());
                if rest.len() < FRAME_HEAD_LEN + head.len {
                    break;
                }
                if head.kind == PING && head.flags & 0x1 != 0 {
                    return;
                }
                rest = &rest[FRAME_HEAD_LEN + head.len..];
            }
        }
    }

    fn header_str<'a>(parts: &'a http::request::Parts, name: &str) -> &'a str {
        parts.headers.get(name).unwrap().to_str().unwrap()
    }

    #[tokio::test]
    async fn without_the_adapter_h2_drops_grpcio_requests() {
        let input = connection(&[headers(1, &unhex(GRPCIO_FIRST))]);
        let outcome = serve_h2(&input, &[], false).await;
        assert!(outcome.requests.is_empty(), "{outcome:?}");
        assert!(outcome.error.is_none(), "{outcome:?}");
    }

    #[tokio::test]
    async fn grpcio_requests_reach_h2_as_localhost_across_the_dynamic_table() {
        let input = connection(&[
            headers(1, &unhex(GRPCIO_FIRST)),
            headers(3, &unhex(GRPCIO_SECOND)),
        ]);
        let outcome = serve_h2(&input, &[], true).await;
        assert!(outcome.error.is_none(), "{outcome:?}");
        assert_eq!(outcome.requests.len(), 2, "{outcome:?}");
        for request in &outcome.requests {
            assert_eq!(request.uri.to_string(), "http://localhost/a.B/C");
            assert_eq!(request.method, http::Method::POST);
            assert_eq!(
                header_str(request, "user-agent"),
                "grpc-python/1.85.1 grpc-c/58.0.0 (linux; chttp2)"
            );
            assert_eq!(header_str(request, "grpc-timeout"), "1010m");
            assert_eq!(header_str(request, "te"), "trailers");
        }

        let blocks = decode_blocks(&parse_frames(&transcode(&input)));
        assert_eq!(
            blocks,
            vec![grpcio_fields("localhost"), grpcio_fields("localhost")]
        );
    }

    #[test]
    fn reencoded_blocks_leave_the_dynamic_table_alone() {
        let input = connection(&[
            headers(1, &unhex(GRPCIO_FIRST)),
            headers(3, &unhex(GRPCIO_SECOND)),
        ]);
        for (head, payload) in parse_frames(&transcode(&input))
            .iter()
            .filter(|(h, _)| h.kind == TYPE_HEADERS)
        {
            // Every field "literal without indexing, new name": 0x00, then name and value.
            let mut rest = &payload[..];
            while !rest.is_empty() {
                assert_eq!(rest[0], 0x00, "{head:?}");
                let (name_len, used) = decode_prefix_int(&rest[1..], 7).unwrap();
                rest = &rest[1 + used + name_len..];
                let (value_len, used) = decode_prefix_int(rest, 7).unwrap();
                rest = &rest[used + value_len..];
            }
        }
    }

    #[tokio::test]
    async fn valid_authorities_pass_byte_for_byte() {
        // Envoy's envoy_grpc: :authority is the cluster name, indexed, then referenced.
        let mut first = vec![0x83, 0x86];
        first.extend(literal_with_indexing(1, b"sds-grpc"));
        first.extend(literal_with_indexing(4, b"/a.B/C"));
        first.extend(literal_with_indexing(31, b"application/grpc"));
        encode_literal(&mut first, b"te", b"trailers");
        // Table now: 62 content-type, 63 :path, 64 :authority.
        let mut second = vec![0x83, 0x86, 0xbf, 0xc0, 0xbe];
        encode_literal(&mut second, b"te", b"trailers");
        let input = connection(&[
            headers(1, &first),
            frame(DATA, 0x1, 1, b"\0\0\0\0\0"),
            headers(3, &second),
        ]);
        assert_eq!(transcode(&input), input);
        let outcome = serve_h2(&input, &[3, 1, 7], true).await;
        assert!(outcome.error.is_none(), "{outcome:?}");
        let authorities: Vec<_> = outcome
            .requests
            .iter()
            .map(|r| r.uri.authority().unwrap().as_str())
            .collect();
        assert_eq!(authorities, ["sds-grpc", "sds-grpc"]);
    }

    #[tokio::test]
    async fn huffman_coded_authority_is_fixed() {
        let block = unhex(HUFFMAN_AUTHORITY);
        assert_eq!(block[9], 0x41, "literal with indexing, name :authority");
        assert_eq!(block[10] & 0x80, 0x80, "Huffman-coded value");
        let original = Decoder::new().decode(&block).unwrap();
        assert_eq!(original[3], field(":authority", "run%2Fsvid%2Fsds.sock"));

        let input = connection(&[headers(1, &block), headers(3, &[0x83, 0x86, 0x84, 0xbf])]);
        let outcome = serve_h2(&input, &[], true).await;
        assert!(outcome.error.is_none(), "{outcome:?}");
        let uris: Vec<_> = outcome.requests.iter().map(|r| r.uri.to_string()).collect();
        assert_eq!(uris, ["http://localhost/a.B/C", "http://localhost/"]);
    }

    #[tokio::test]
    async fn padding_is_dropped_and_priority_kept() {
        let block = unhex(GRPCIO_FIRST);
        let priority = [0x80, 0, 0, 0, 15]; // exclusive, depends on stream 0, weight 16
        let mut payload = vec![7];
        payload.extend(priority);
        payload.extend(&block);
        payload.extend([0; 7]);
        let flags = FLAG_END_HEADERS | FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM;
        let input = connection(&[frame(TYPE_HEADERS, flags, 1, &payload)]);

        let frames = parse_frames(&transcode(&input));
        let (head, payload) = &frames[1];
        assert_eq!(head.kind, TYPE_HEADERS);
        assert_eq!(
            head.flags,
            FLAG_END_HEADERS | FLAG_PRIORITY | FLAG_END_STREAM
        );
        assert_eq!(payload[..PRIORITY_LEN], priority);
        assert_eq!(decode_blocks(&frames), vec![grpcio_fields("localhost")]);

        let outcome = serve_h2(&input, &[], true).await;
        assert!(outcome.error.is_none(), "{outcome:?}");
        assert_eq!(
            outcome.requests[0].uri.to_string(),
            "http://localhost/a.B/C"
        );
    }

    #[tokio::test]
    async fn continuations_are_joined_and_large_blocks_split() {
        let mut block = unhex(GRPCIO_FIRST);
        let big = "b".repeat(40_000);
        encode_literal(&mut block, b"x-big", big.as_bytes());
        // The client's frame boundaries fall inside fields.
        let cuts = [0, 100, 16_100, 32_100, block.len()];
        let mut frames = Vec::new();
        for (i, w) in cuts.windows(2).enumerate() {
            let last = w[1] == block.len();
            let flags = if last { FLAG_END_HEADERS } else { 0 };
            let kind = if i == 0 {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            frames.push(frame(kind, flags, 1, &block[w[0]..w[1]]));
        }
        let input = connection(&frames);

        let out = parse_frames(&transcode(&input));
        let kinds: Vec<_> = out.iter().map(|(h, _)| (h.kind, h.flags, h.len)).collect();
        assert_eq!(kinds[1].0, TYPE_HEADERS);
        assert!(
            kinds[2..].iter().all(|k| k.0 == TYPE_CONTINUATION),
            "{kinds:?}"
        );
        assert!(
            kinds[1..kinds.len() - 1]
                .iter()
                .all(|k| k.1 & FLAG_END_HEADERS == 0 && k.2 == MAX_EMITTED_FRAME)
        );
        assert_eq!(kinds[kinds.len() - 1].1, FLAG_END_HEADERS);
        let mut expected = grpcio_fields("localhost");
        expected.push(field("x-big", &big));
        assert_eq!(decode_blocks(&out), vec![expected]);

        let outcome = serve_h2(&input, &[5000], true).await;
        assert!(outcome.error.is_none(), "{outcome:?}");
        assert_eq!(header_str(&outcome.requests[0], "x-big"), big);
    }

    #[tokio::test]
    async fn table_size_updates_are_followed() {
        // Shrinking to 0 empties the client's table: a later reference to it is an error.
        let mut resized = unhex("203fe11f"); // size 0, then 4096
        resized.extend(unhex(GRPCIO_FIRST));
        let input = connection(&[headers(1, &resized), headers(3, &unhex(GRPCIO_SECOND))]);
        let outcome = serve_h2(&input, &[], true).await;
        assert!(outcome.error.is_none(), "{outcome:?}");
        assert_eq!(outcome.requests.len(), 2);

        let input = connection(&[
            headers(1, &unhex(GRPCIO_FIRST)),
            headers(3, &[0x20]),
            headers(5, &unhex(GRPCIO_SECOND)),
        ]);
        let outcome = serve_h2(&input, &[], true).await;
        assert!(
            outcome.error.as_ref().is_some_and(h2::Error::is_go_away),
            "{outcome:?}"
        );
        let frames = parse_frames(&transcode(&input));
        assert_eq!(frames.last().unwrap().1, UNDECODABLE_BLOCK);
    }

    #[tokio::test]
    async fn an_undecodable_block_after_a_fix_fails_the_connection() {
        // The client refers to an entry that was never indexed.
        let input = connection(&[
            headers(1, &unhex(GRPCIO_FIRST)),
            headers(3, &[0x83, 0x86, 0xff, 0x10]),
        ]);
        let outcome = serve_h2(&input, &[], true).await;
        assert!(
            outcome.error.as_ref().is_some_and(h2::Error::is_go_away),
            "{outcome:?}"
        );
        let frames = parse_frames(&transcode(&input));
        assert_eq!(
            decode_blocks(&frames[..2]),
            vec![grpcio_fields("localhost")]
        );
        assert_eq!(frames.last().unwrap().1, UNDECODABLE_BLOCK);
    }

    #[tokio::test]
    async fn frames_out_of_order_reach_h2_as_sent() {
        // HEADERS without END_HEADERS, then DATA: h2 must see it and refuse the connection.
        let mut block = vec![0x83, 0x86, 0x84];
        block.extend(literal_with_indexing(1, b"sds-grpc"));
        let input = connection(&[frame(TYPE_HEADERS, 0, 1, &block), frame(DATA, 0x1, 1, b"x")]);
        assert_eq!(transcode(&input), input);
        let outcome = serve_h2(&input, &[], true).await;
        assert!(
            outcome.error.as_ref().is_some_and(h2::Error::is_go_away),
            "{outcome:?}"
        );

        let stray = connection(&[frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block)]);
        assert_eq!(transcode(&stray), stray);
    }

    #[test]
    fn oversized_blocks_are_not_buffered() {
        let mut input = connection(&[]);
        write_frame_head(&mut input, MAX_BLOCK, TYPE_HEADERS, 0, 1);
        input.extend(vec![0x82; MAX_BLOCK]);
        assert_eq!(transcode(&input), input);
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn http1_clients_pass_through_and_are_reported() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let input = b"POST /envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets HTTP/1.1\r\nHost: sds-grpc\r\n\r\n";
        let out = tracing::subscriber::with_default(subscriber, || transcode(input));
        assert_eq!(out, input);
        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(logs.matches("WARN").count(), 1, "{logs}");
        assert!(logs.contains("without speaking HTTP/2"), "{logs}");
        assert!(logs.contains("POST /envoy.service.secret"), "{logs}");
    }

    #[tokio::test]
    async fn connect_info_is_the_unix_peer() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let info = AuthorityFixingStream::new(ours).connect_info();
        assert_eq!(
            info.peer_cred.unwrap().pid(),
            Some(std::process::id() as i32)
        );
    }

    #[test]
    fn huffman_work_is_bounded_per_connection() {
        assert_eq!(count_huffman_strings(&unhex(GRPCIO_FIRST)), Some(0));
        assert_eq!(count_huffman_strings(&unhex(GRPCIO_SECOND)), Some(0));
        assert_eq!(count_huffman_strings(&unhex(HUFFMAN_AUTHORITY)), Some(4));
        assert_eq!(count_huffman_strings(&[0x40, 0x85, b'a']), None);

        let mut frames = vec![headers(1, &unhex(GRPCIO_FIRST))];
        let blocks = HUFFMAN_BUDGET / 4 + 1;
        for i in 0..blocks as u32 {
            frames.push(headers(3 + 2 * i, &unhex(HUFFMAN_AUTHORITY)));
        }
        let out = parse_frames(&transcode(&connection(&frames)));
        // Every block within the budget was re-encoded; then h2 is made to end the connection.
        assert_eq!(
            out.len(),
            1 + blocks + 1,
            "SETTINGS, the blocks, the undecodable block"
        );
        assert_eq!(out.last().unwrap().1, UNDECODABLE_BLOCK);
        assert_eq!(decode_blocks(&out[..out.len() - 1]).len(), blocks);
    }

    #[test]
    fn prefix_integers_round_trip() {
        for value in [0, 1, 30, 31, 126, 127, 128, 1337, 4096, 1 << 20] {
            for prefix in [5, 7] {
                let mut buf = Vec::new();
                encode_prefix_int(&mut buf, value, prefix, 0);
                assert_eq!(
                    decode_prefix_int(&buf, prefix),
                    Some((value, buf.len())),
                    "{value} {prefix}"
                );
            }
        }
        assert_eq!(
            decode_prefix_int(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0x01], 5),
            None
        );
        assert_eq!(decode_prefix_int(&[0x1f, 0xff], 5), None);
    }

    fn any_frame() -> impl Strategy<Value = Vec<u8>> {
        let kind = prop_oneof![
            Just(TYPE_HEADERS),
            Just(TYPE_CONTINUATION),
            Just(DATA),
            Just(PING),
            any::<u8>()
        ];
        let payload = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            Just(unhex(GRPCIO_FIRST)),
            Just(unhex(GRPCIO_SECOND)),
            Just(unhex(HUFFMAN_AUTHORITY)),
        ];
        (kind, any::<u8>(), 0u32..4, payload, any::<bool>()).prop_map(
            |(kind, flags, stream, payload, lie)| {
                let mut f = frame(kind, flags, stream, &payload);
                if lie {
                    f[2] ^= 0x10; // a length that doesn't match the payload
                }
                f
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn garbage_never_panics_or_hangs(
            preface in any::<bool>(),
            bytes in prop::collection::vec(any::<u8>(), 0..2048),
            frames in prop::collection::vec(any_frame(), 0..12),
            chunks in prop::collection::vec(1usize..64, 1..6),
            reads in prop::collection::vec(1usize..64, 1..6),
        ) {
            let mut input = if preface { PREFACE.to_vec() } else { Vec::new() };
            frames.iter().for_each(|f| input.extend_from_slice(f));
            input.extend_from_slice(&bytes);
            let out = futures::executor::block_on(pump(&input, &chunks, &reads));
            if !input.starts_with(&PREFACE[..1]) {
                prop_assert_eq!(out, input);
            }
        }
    }

    #[derive(Debug, Clone)]
    struct Req {
        authority: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    /// Test-only rule: also "fix" authorities starting with `fix-`, which the h2 client can
    /// send (it refuses to send one hyper would reject), so the rewrite path is exercised with
    /// the h2 client's HPACK encoder: Huffman coding, indexing, CONTINUATIONs.
    fn fix_marked(value: &[u8]) -> bool {
        value.starts_with(b"fix-") || authority_needs_fix(value)
    }

    fn any_request() -> impl Strategy<Value = Req> {
        let authority = (
            "(fix-)?[a-z]{1,10}(\\.[a-z]{1,6})?",
            prop::option::of(1u16..65535),
        )
            .prop_map(|(h, p)| match p {
                Some(p) => format!("{h}:{p}"),
                None => h,
            });
        let value = prop_oneof![
            8 => "[!-~]([ -~]{0,40}[!-~])?",
            1 => (17_000usize..24_000).prop_map(|n| "v".repeat(n)),
        ];
        let headers = prop::collection::vec(("x-[a-z]{1,8}", value), 0..5);
        let body = prop::collection::vec(any::<u8>(), 0..20_000);
        (authority, headers, body).prop_map(|(authority, headers, body)| Req {
            authority,
            headers,
            body,
        })
    }

    async fn round_trip(
        reqs: Vec<Req>,
        chunks: Vec<usize>,
    ) -> Vec<(http::request::Parts, Vec<u8>)> {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let io =
                AuthorityFixingStream::with_check(Chunked::new(server_io, &chunks), fix_marked);
            let mut conn = h2::server::handshake(io).await.unwrap();
            // Each request in its own task: h2 only reads the connection while accept() is polled.
            let mut handlers = Vec::new();
            while let Some(next) = conn.accept().await {
                let (request, mut respond) = next.unwrap();
                handlers.push(tokio::spawn(async move {
                    let (parts, mut body) = request.into_parts();
                    let mut data = Vec::new();
                    while let Some(chunk) = body.data().await {
                        let chunk = chunk.unwrap();
                        body.flow_control().release_capacity(chunk.len()).unwrap();
                        data.extend_from_slice(&chunk);
                    }
                    respond
                        .send_response(http::Response::new(()), true)
                        .unwrap();
                    (parts, data)
                }));
            }
            futures::future::try_join_all(handlers).await.unwrap()
        });
        let (sender, conn) = h2::client::handshake(client_io).await.unwrap();
        let client_conn = tokio::spawn(conn);
        let calls = reqs.into_iter().enumerate().map(|(i, req)| {
            let mut sender = sender.clone();
            async move {
                let mut builder = http::Request::post(format!("http://{}/r/{i}", req.authority));
                for (name, value) in &req.headers {
                    builder = builder.header(name, value);
                }
                sender = sender.ready().await.unwrap();
                let (response, mut stream) = sender
                    .send_request(builder.body(()).unwrap(), false)
                    .unwrap();
                stream
                    .send_data(bytes::Bytes::from(req.body), true)
                    .unwrap();
                response.await.unwrap();
            }
        });
        futures::future::join_all(calls).await;
        drop(sender);
        client_conn.await.unwrap().unwrap();
        server.await.unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn h2_client_traffic_round_trips(
            reqs in prop::collection::vec(any_request(), 1..6),
            chunks in prop::collection::vec(1usize..3000, 1..6),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let seen = rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(30), round_trip(reqs.clone(), chunks)).await
            }).expect("round trip timed out");
            prop_assert_eq!(seen.len(), reqs.len());
            for (parts, body) in seen {
                let i: usize = parts.uri.path().strip_prefix("/r/").unwrap().parse().unwrap();
                let req = &reqs[i];
                let expected = if req.authority.starts_with("fix-") { "localhost" } else { req.authority.as_str() };
                prop_assert_eq!(parts.uri.authority().unwrap().as_str(), expected);
                prop_assert_eq!(&parts.method, &http::Method::POST);
                let mut headers = http::HeaderMap::new();
                for (name, value) in &req.headers {
                    headers.append(http::HeaderName::try_from(name.as_str()).unwrap(), value.parse().unwrap());
                }
                prop_assert_eq!(&parts.headers, &headers);
                prop_assert_eq!(&body, &req.body);
            }
        }
    }
}
