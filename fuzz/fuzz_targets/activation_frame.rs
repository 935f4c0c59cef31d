//! Fuzzes the activation frame path a worker runs on every `Forward` frame: protobuf
//! decoding of a `ForwardFrame`, then the activation codec's decoder on whatever dtype,
//! token count and width the frame claims. Any input must decode or give an error, never
//! panic, hang or allocate beyond what the input can justify.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use shoal_kernels::codec::{Codec, decode};
use shoal_proto::v1::{ActivationDtype, ForwardFrame, forward_frame::Input};

fn codec_of(dtype: i32) -> Option<Codec> {
    match ActivationDtype::try_from(dtype).ok()? {
        ActivationDtype::F32 => Some(Codec::F32),
        ActivationDtype::Bf16 => Some(Codec::Bf16),
        ActivationDtype::Q8 => Some(Codec::Q8),
        ActivationDtype::Unspecified => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    // Raw payloads: the first 9 bytes pick the codec, the token count and the width.
    if data.len() >= 9 {
        let codec = [Codec::F32, Codec::Bf16, Codec::Q8][data[0] as usize % 3];
        let n = u32::from_le_bytes([data[1], data[2], data[3], data[4]]) as usize;
        let dim = u32::from_le_bytes([data[5], data[6], data[7], data[8]]) as usize;
        if decode(codec, &data[9..], n, dim, &mut out).is_ok() {
            assert_eq!(out.len(), n * dim);
        }
    }
    // Whole frames, as they arrive on the stream.
    if let Ok(f) = ForwardFrame::decode(data)
        && let Some(Input::Hidden(a)) = f.input
        && let Some(codec) = codec_of(a.dtype)
        && decode(codec, &a.data, a.n_tokens as usize, a.dim as usize, &mut out).is_ok()
    {
        assert_eq!(out.len(), a.n_tokens as usize * a.dim as usize);
    }
});
