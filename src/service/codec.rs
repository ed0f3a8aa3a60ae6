//! The protobuf codec of the BillingMode service: prost, except that bytes
//! that do not decode are the caller's error (`INVALID_ARGUMENT`, reason
//! `INVALID_FIELD`), not an `INTERNAL` one. A malformed request is never
//! answered with INTERNAL.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    codec::{BufferSettings, Codec as TonicCodec, DecodeBuf, Decoder as TonicDecoder},
    Status,
};
use tonic_prost::ProstEncoder;

use super::error::{ApiError, ErrorReason};

/// Used by the generated server and client (see `build.rs`).
#[derive(Debug, Clone, Copy)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> TonicCodec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(PhantomData)
    }
}

/// Decodes `U`, mapping undecodable bytes to INVALID_ARGUMENT.
#[derive(Debug, Clone, Copy)]
pub struct Decoder<U>(PhantomData<U>);

impl<U: Message + Default> TonicDecoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            ApiError::new(
                ErrorReason::InvalidField,
                format!("the message is not valid protobuf for this method: {e}"),
            )
            .into()
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
