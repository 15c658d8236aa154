//! The codec every generated client and server uses: prost, as `tonic_prost::ProstCodec` is, with
//! first buffers sized for this protocol's messages.
//!
//! tonic's default gives every call an 8 KiB encode and an 8 KiB decode buffer. Open-API requests
//! and answers are tens to hundreds of bytes, so each unary call allocated (and freed) 16 KiB it
//! hardly touched, on the daemon and in the client alike; a 1 KiB buffer comes from the
//! allocator's per-thread cache instead. Buffers still grow for a larger message, and the limits
//! on message size are set on each service as before.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The first size of a call's encode and decode buffers.
pub const BUFFER_BYTES: usize = 1024;
/// tonic's default: how much encoded data a stream buffers before it yields to the connection.
pub const YIELD_BYTES: usize = 32 * 1024;

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct ProstCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        ProstCodec(PhantomData)
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
    }
}
