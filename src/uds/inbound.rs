//! The request messages of one long-lived gRPC stream, decoded from its HTTP/2 body with a
//! buffer that does not keep the size of the largest message.
//!
//! tonic's `Streaming` keeps one buffer per stream and never shrinks it: it grows to the
//! largest message the stream has carried and stays that size until the stream ends. Envoy's
//! first request on every SDS stream carries its whole node (Envoy 1.40: 516 extensions, a
//! 61 KB message), every later request is an ACK of a few hundred bytes, and an Envoy holds
//! its two streams for its lifetime: on a node of 110 pods those buffers were most of the
//! bridge's memory (BENCHMARKS.md §6). Here a buffer that grew past `RETAINED_BYTES` is let
//! go as soon as the message that needed it is decoded.

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures::Stream;
use http_body::Body;
use http_body_util::BodyExt;
use tonic::Status;
use tonic::codegen::StdError;

/// A gRPC message's prefix: a compression flag and a big-endian 32-bit length.
const PREFIX_BYTES: usize = 5;
/// The most a stream's buffer keeps between messages: Envoy's ACKs fit.
const RETAINED_BYTES: usize = 4 * 1024;

type RequestBody = Pin<Box<dyn Body<Data = Bytes, Error = StdError> + Send>>;

/// The decoded request messages of one stream, as a `Stream` (what `tonic::Streaming` is to
/// a generated server). It ends when the client ends or resets the stream; an error is a
/// request the server refuses (too large, compressed, not decodable), for the client to see.
pub struct InboundMessages<T> {
    body: RequestBody,
    /// Received bytes; those before `read` are decoded already.
    buf: Vec<u8>,
    read: usize,
    max_message_bytes: usize,
    ended: bool,
    message: PhantomData<fn() -> T>,
}

impl<T: prost::Message + Default> InboundMessages<T> {
    /// Messages over `max_message_bytes` end the stream with `OUT_OF_RANGE`, before any of
    /// their body is buffered past the prefix.
    pub fn new<B>(body: B, max_message_bytes: usize) -> Self
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError>,
    {
        let body = body
            .map_frame(|frame| frame.map_data(|mut data| data.copy_to_bytes(data.remaining())))
            .map_err(Into::into);
        Self {
            body: Box::pin(body),
            buf: Vec::new(),
            read: 0,
            max_message_bytes,
            ended: false,
            message: PhantomData,
        }
    }

    /// The size of the stream's buffer.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.buf.capacity()
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.read..]
    }

    /// The next whole message in the buffer, if there is one.
    fn decode_next(&mut self) -> Result<Option<T>, Status> {
        let pending = self.pending();
        let Some(prefix) = pending.get(..PREFIX_BYTES) else {
            return Ok(None);
        };
        match prefix[0] {
            0 => {}
            1 => {
                return Err(Status::internal(
                    "a compressed request message, but no compression was agreed \
                     (grpc-encoding); send requests uncompressed",
                ));
            }
            flag => {
                return Err(Status::internal(format!(
                    "invalid compression flag {flag} in a request message's prefix"
                )));
            }
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.max_message_bytes {
            return Err(Status::out_of_range(format!(
                "a request message of {len} bytes is over the limit of {} bytes",
                self.max_message_bytes
            )));
        }
        let end = PREFIX_BYTES + len;
        if pending.len() < end {
            let missing = end - pending.len();
            self.buf.reserve(missing);
            return Ok(None);
        }
        let message = T::decode(&pending[PREFIX_BYTES..end])
            .map_err(|err| Status::internal(format!("decoding a request message: {err}")))?;
        self.read += end;
        self.compact();
        Ok(Some(message))
    }

    /// Forgets decoded bytes; a buffer grown past `RETAINED_BYTES` is replaced by one the
    /// size of what is left (usually nothing), which frees the large one.
    fn compact(&mut self) {
        if self.read == self.buf.len() {
            self.buf.clear();
            self.read = 0;
        }
        if self.buf.capacity() > RETAINED_BYTES {
            self.buf = self.pending().to_vec();
            self.read = 0;
        }
    }
}

impl<T: prost::Message + Default> Stream for InboundMessages<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match this.decode_next() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(status) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
            match ready!(this.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers carry nothing a request stream needs.
                    if let Ok(data) = frame.into_data() {
                        this.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(error)) => {
                    // The client reset the stream or the connection broke: no one is left
                    // to tell, so the stream simply ends (D-11).
                    tracing::debug!(%error, "request stream ended by the transport");
                    this.ended = true;
                    return Poll::Ready(None);
                }
                None => {
                    this.ended = true;
                    let left = this.pending().len();
                    if left == 0 {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(Status::internal(format!(
                        "the request stream ended inside a message ({left} bytes of it)"
                    )))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use futures::StreamExt;
    use http_body::Frame;
    use http_body_util::StreamBody;
    use prost::Message;

    use super::*;

    fn framed(message: &impl Message) -> Vec<u8> {
        let body = message.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// A request whose encoding is about `len` bytes (its `version_info`).
    fn text(len: usize) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: "x".repeat(len),
            ..Default::default()
        }
    }

    /// A body that yields `chunks` as DATA frames, then ends.
    fn body_of(chunks: Vec<Vec<u8>>) -> InboundMessages<DiscoveryRequest> {
        body_with_limit(chunks, 1024 * 1024)
    }

    fn body_with_limit(chunks: Vec<Vec<u8>>, limit: usize) -> InboundMessages<DiscoveryRequest> {
        let frames = chunks
            .into_iter()
            .map(|chunk| Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))));
        InboundMessages::new(StreamBody::new(futures::stream::iter(frames)), limit)
    }

    /// The size of the next message, `None` at an error or the end.
    async fn next_len(stream: &mut InboundMessages<DiscoveryRequest>) -> Option<usize> {
        stream.next().await?.ok().map(|m| m.version_info.len())
    }

    async fn lengths(mut stream: InboundMessages<DiscoveryRequest>) -> Vec<Result<usize, Status>> {
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            out.push(item.map(|m| m.version_info.len()));
        }
        out
    }

    #[tokio::test]
    async fn messages_split_across_frames_and_packed_into_one_are_all_decoded() {
        let (a, b, c) = (framed(&text(3)), framed(&text(40_000)), framed(&text(0)));
        // a and the start of b in one frame, b's rest in three more, c alone.
        let mut chunks = vec![[a.as_slice(), &b[..7]].concat()];
        chunks.extend(b[7..].chunks(16_384).map(<[u8]>::to_vec));
        chunks.push(c);
        let got = lengths(body_of(chunks)).await;
        assert_eq!(
            got.into_iter().map(Result::ok).collect::<Vec<_>>(),
            [Some(3), Some(40_000), Some(0)]
        );
    }

    #[tokio::test]
    async fn a_large_first_message_does_not_stay_in_the_streams_buffer() {
        // What Envoy sends on each SDS stream: its node once (61 KB), then small ACKs.
        let first = framed(&text(61_000));
        let mut chunks: Vec<Vec<u8>> = first.chunks(16_384).map(<[u8]>::to_vec).collect();
        chunks.push(framed(&text(200)));
        let mut stream = body_of(chunks);

        assert_eq!(next_len(&mut stream).await, Some(61_000));
        assert!(
            stream.held_bytes() <= RETAINED_BYTES,
            "after the 61 KB message the stream holds {} bytes",
            stream.held_bytes()
        );
        assert_eq!(next_len(&mut stream).await, Some(200));
        assert!(stream.held_bytes() <= RETAINED_BYTES);
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_message_over_the_limit_ends_the_stream_naming_the_limit() {
        let chunks = vec![framed(&text(100)), framed(&text(5000)), framed(&text(1))];
        let got = lengths(body_with_limit(chunks, 4096)).await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].as_ref().ok(), Some(&100));
        let err = got[1].as_ref().unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
        assert!(
            err.message().contains("over the limit of 4096 bytes"),
            "{}",
            err.message()
        );
    }

    #[tokio::test]
    async fn a_compressed_message_is_refused_with_a_clear_error() {
        let mut message = framed(&text(10));
        message[0] = 1;
        let got = lengths(body_of(vec![message])).await;
        let err = got[0].as_ref().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(
            err.message().contains("no compression was agreed"),
            "{}",
            err.message()
        );
        assert_eq!(got.len(), 1, "nothing after the error");
    }

    #[tokio::test]
    async fn a_body_that_ends_inside_a_message_is_an_error_and_a_clean_end_is_not() {
        let whole = framed(&text(100));
        let got = lengths(body_of(vec![whole[..50].to_vec()])).await;
        let err = got[0].as_ref().unwrap_err();
        assert!(
            err.message().contains("ended inside a message"),
            "{}",
            err.message()
        );

        assert!(lengths(body_of(vec![])).await.is_empty());
    }

    #[tokio::test]
    async fn bytes_that_are_not_the_message_type_are_a_decode_error() {
        // Field 1 as a varint where DiscoveryRequest has a string (version_info).
        let got = lengths(body_of(vec![vec![0, 0, 0, 0, 2, 0x08, 0x01]])).await;
        let err = got[0].as_ref().unwrap_err();
        assert!(
            err.message().contains("decoding a request message"),
            "{}",
            err.message()
        );
    }
}
