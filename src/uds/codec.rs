//! A protobuf codec whose per-stream buffers start small.
//!
//! tonic's generated clients and servers hard-wire its default codec, which gives every
//! stream an 8 KiB encode and an 8 KiB decode buffer up front. The messages the bridge
//! exchanges are a few hundred bytes to a few KiB, and a node holds thousands of streams
//! (SDS streams downstream, one Delegated Identity subscription per workload upstream), so
//! these start at 1 KiB and grow only when a message needs it (BENCHMARKS.md §4.1).

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a stream's encode and decode buffers; they grow on demand.
const BUFFER_BYTES: usize = 1024;
/// tonic's default: how much encoded data a response stream buffers before yielding.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Encodes `T`, decodes `U`, like `tonic_prost::ProstCodec`, with small initial buffers.
pub struct SmallBufferCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> SmallBufferCodec<T, U> {
    pub fn new() -> Self {
        Self(PhantomData)
    }

    fn settings() -> BufferSettings {
        BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
    }
}

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(Self::settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(Self::settings())
    }
}
