//! Shared by the targets: libFuzzer without a sanitizer runtime cannot see through the slice
//! comparison of the envelope's magic, so a target decodes each input twice: as sent, and as the
//! body of a well-formed envelope of the type (magic, kind, version), which is where the
//! decoders' work is.

use hyfhe::fhe::{decode, CodecError, Wire};

/// `data` decoded as a `T` blob as sent, and framed as one.
pub fn decode_both<T: Wire>(data: &[u8]) -> [Result<T, CodecError>; 2] {
    let mut framed = Vec::with_capacity(8 + data.len());
    framed.extend_from_slice(b"HYFHE");
    framed.push(T::KIND);
    framed.extend_from_slice(&T::VERSION.to_le_bytes());
    framed.extend_from_slice(data);
    [
        decode::<T>(data, data.len()),
        decode::<T>(&framed, framed.len()),
    ]
}
