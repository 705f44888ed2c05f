//! Base64 (RFC 4648, standard alphabet, padded) of little-endian `f32` bytes: the
//! `encoding_format: "base64"` form of an embedding, as OpenAI and vLLM send it (numpy's
//! `float32.tobytes()` then `base64.b64encode`), through the `base64` crate.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Base64 of `bytes`, padded with `=`.
pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// The bytes of padded base64 `text`; `None` when it is not valid base64.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    STANDARD.decode(text).ok()
}

/// Base64 of the little-endian bytes of `values`.
pub fn encode_f32_le(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    encode(&bytes)
}

/// The `f32` values of base64 `text` (little-endian); `None` when it is not valid base64
/// or not a whole number of `f32`s.
pub fn decode_f32_le(text: &str) -> Option<Vec<f32>> {
    let bytes = decode(text)?;
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(plain.as_bytes()), enc);
            assert_eq!(decode(enc).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn numpy_float32_bytes() {
        // base64.b64encode(np.array([1.0, -2.5], dtype="float32").tobytes())
        assert_eq!(encode_f32_le(&[1.0, -2.5]), "AACAPwAAIMA=");
        assert_eq!(decode_f32_le("AACAPwAAIMA=").unwrap(), vec![1.0, -2.5]);
    }

    #[test]
    fn all_byte_values_round_trip_and_garbage_is_refused() {
        let bytes: Vec<u8> = (0..=255).collect();
        for n in 0..bytes.len() {
            assert_eq!(decode(&encode(&bytes[..n])).unwrap(), &bytes[..n]);
        }
        for bad in ["A", "AB=C", "A===", "Zg==Zg==", "Zm9v!A==", "é==="] {
            assert!(decode(bad).is_none(), "{bad}");
        }
        assert!(decode_f32_le("Zm9v").is_none(), "3 bytes are not an f32");
    }
}
