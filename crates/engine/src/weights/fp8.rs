//! Block-FP8 weights as published (Qwen3-30B-A3B-FP8, DeepSeek-V3): e4m3fn values with a
//! float32 `weight_scale_inv` per `[br, bc]` block; the weight is value x its block's
//! scale. The portable (CPU) path dequantises once at load, into its f32 compute dtype:
//! its GEMMs are f32, so keeping FP8 would only add a conversion per use, and the CPU is
//! the numerics reference, which wants the exact dequantised weight.

/// e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; subnormals at exponent 0, no
/// infinities, NaN only at `0x7f`/`0xff` (everything else up to +-448 is finite).
const fn e4m3_decode(b: u8) -> f32 {
    let sign = ((b >> 7) as u32) << 31;
    let exp = ((b >> 3) & 0xf) as u32;
    let man = (b & 7) as u32;
    if exp == 15 && man == 7 {
        return f32::from_bits(sign | 0x7fc0_0000);
    }
    if exp == 0 {
        if man == 0 {
            return f32::from_bits(sign);
        }
        // man x 2^-9: normalise around its leading bit p, so value = 2^(p-9) x 1.rest.
        let p = 31 - man.leading_zeros();
        let rest = (man ^ (1 << p)) << (23 - p);
        return f32::from_bits(sign | ((127 + p - 9) << 23) | rest);
    }
    f32::from_bits(sign | ((exp + 127 - 7) << 23) | (man << 20))
}

/// Every e4m3fn byte's value.
const E4M3: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_decode(i as u8);
        i += 1;
    }
    t
};

/// The value of one e4m3fn byte (NaN for `0x7f`/`0xff`).
pub fn e4m3_to_f32(b: u8) -> f32 {
    E4M3[b as usize]
}

/// Dequantises a `[rows, cols]` e4m3 weight with its `[ceil(rows/br), ceil(cols/bc)]`
/// scales (row-major), into f32. A NaN byte is an error: no finite weight encodes to one.
pub fn dequantise(
    q: &[u8],
    rows: usize,
    cols: usize,
    scales: &[f32],
    block: [usize; 2],
) -> anyhow::Result<Vec<f32>> {
    let [br, bc] = block;
    let scale_cols = cols.div_ceil(bc);
    if q.len() != rows * cols || scales.len() != rows.div_ceil(br) * scale_cols {
        anyhow::bail!(
            "{} FP8 bytes and {} scales for a [{rows}, {cols}] weight in [{br}, {bc}] blocks",
            q.len(),
            scales.len()
        );
    }
    check_finite(q)?;
    let mut out = Vec::with_capacity(q.len());
    for (r, row) in q.chunks_exact(cols.max(1)).enumerate() {
        let s = &scales[(r / br) * scale_cols..(r / br + 1) * scale_cols];
        out.extend(
            row.iter()
                .enumerate()
                .map(|(c, &b)| E4M3[b as usize] * s[c / bc]),
        );
    }
    Ok(out)
}

/// An error naming the first NaN byte of `q`, if any: no finite weight encodes to one.
pub fn check_finite(q: &[u8]) -> anyhow::Result<()> {
    match q.iter().position(|&b| b & 0x7f == 0x7f) {
        Some(i) => anyhow::bail!("element {i} is NaN (e4m3 byte {:#04x})", q[i]),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table against the format's definition, computed another way.
    #[test]
    fn e4m3_values_follow_the_definition() {
        for b in 0..=255u8 {
            let (s, e, m) = (b >> 7, i32::from((b >> 3) & 0xf), f64::from(b & 7));
            let got = e4m3_to_f32(b);
            if e == 15 && m == 7.0 {
                assert!(got.is_nan(), "{b:#04x}");
                continue;
            }
            let mag = if e == 0 {
                m / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + m / 8.0) * 2f64.powi(e - 7)
            };
            let want = if s == 1 { -mag } else { mag };
            assert_eq!(f64::from(got), want, "{b:#04x}");
        }
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
    }

    #[test]
    fn blocks_take_their_own_scale() {
        // [3, 5] in [2, 2] blocks: 2 x 3 scales, the last row and column partial.
        let q = vec![0x38u8; 15]; // all 1.0
        let scales = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w = dequantise(&q, 3, 5, &scales, [2, 2]).unwrap();
        assert_eq!(
            w,
            [
                1.0, 1.0, 2.0, 2.0, 3.0, //
                1.0, 1.0, 2.0, 2.0, 3.0, //
                4.0, 4.0, 5.0, 5.0, 6.0
            ]
        );
        let err = dequantise(&q, 3, 5, &scales[..5], [2, 2]).unwrap_err();
        assert!(err.to_string().contains("5 scales"), "{err}");
        let mut nan = q.clone();
        nan[7] = 0xff;
        let err = dequantise(&nan, 3, 5, &scales, [2, 2]).unwrap_err();
        assert!(err.to_string().contains("element 7 is NaN"), "{err}");
    }
}
