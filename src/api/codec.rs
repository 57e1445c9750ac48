//! The protobuf codec of the kpi.v1 services and clients: tonic-prost's, except that a
//! message that does not decode is INVALID_ARGUMENT (the peer sent bytes that are not the
//! message), where tonic-prost answers INTERNAL, which says the server is at fault.
//! `build.rs` names it as the generated code's codec.

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// tonic-prost's codec with [`KpiDecoder`].
#[derive(Debug, Clone, Default)]
pub struct KpiCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for KpiCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = KpiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        KpiDecoder(self.0.decoder())
    }
}

/// tonic-prost's decoder, with undecodable messages INVALID_ARGUMENT.
#[derive(Debug, Clone, Default)]
pub struct KpiDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for KpiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            if status.code() == Code::Internal {
                let message = std::any::type_name::<U>().rsplit("::").next();
                super::status::undecodable_message(message.unwrap_or("message"), status.message())
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
