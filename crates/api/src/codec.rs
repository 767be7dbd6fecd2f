//! The codec of every Plexus gRPC service: prost encoding with small per-RPC buffers.
//!
//! tonic's default reserves 8 KiB for each direction of every RPC and keeps it for the RPC's
//! life. A control plane holds one long-lived Watch stream per proxy whose requests are about
//! 100 bytes, so that default is most of what an idle proxy costs it. Buffers here start at
//! 1 KiB and grow in 1 KiB steps to fit the largest message actually sent.

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size and growth step of the encode and decode buffers.
pub const BUFFER_SIZE: usize = 1024;

/// Messages at least this large make the encoder yield to the runtime (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`BUFFER_SIZE`] buffers.
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(std::marker::PhantomData)
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
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
