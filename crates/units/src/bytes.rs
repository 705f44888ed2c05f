//! Byte sizes, one grammar for every flag and file that takes one (`--kv-cache-memory`,
//! a deployment's `memory`, `colocate gpu mps start --pinned-mem`).
//!
//! A number (decimals allowed) and a unit:
//! - none or `B`: bytes;
//! - `KB`, `MB`, `GB`, `TB` (any case): decimal, 1000^n, as SI and disk makers write them;
//! - `KiB`, `MiB`, `GiB`, `TiB` and `Ki`, `Mi`, `Gi`, `Ti` (any case): binary, 1024^n;
//! - a bare letter follows vLLM's `human_readable_int`: lower case `k`, `m`, `g`, `t` is
//!   decimal, upper case `K`, `M`, `G`, `T` is binary. So `4096M` means MiB, as in
//!   `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`, and a size copied from a vLLM command line reads
//!   the same here.

/// Parses a byte size (see the module's grammar). At least one byte; the error says what
/// was wrong and gives examples.
pub fn parse(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("{s:?} is not a size: write bytes or e.g. \"512MiB\", \"12GiB\", \"40GB\"")
    })?;
    let unit = unit.trim();
    let mult = multiplier(unit).ok_or_else(|| {
        format!(
            "{s:?}: unknown unit {unit:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, \
             or vLLM's k/m/g = 1000^n and K/M/G = 1024^n)"
        )
    })?;
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 1.0 {
        return Err(format!("{s:?} must be at least one byte"));
    }
    if bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(bytes as u64)
}

/// The factor of a unit, or `None` when it is not one.
fn multiplier(unit: &str) -> Option<f64> {
    const K: f64 = 1024.0;
    let bare = match unit {
        "" | "B" | "b" => Some(1.0),
        "k" => Some(1e3),
        "m" => Some(1e6),
        "g" => Some(1e9),
        "t" => Some(1e12),
        "K" => Some(K),
        "M" => Some(K * K),
        "G" => Some(K * K * K),
        "T" => Some(K * K * K * K),
        _ => None,
    };
    bare.or_else(|| match unit.to_ascii_lowercase().as_str() {
        "kb" => Some(1e3),
        "mb" => Some(1e6),
        "gb" => Some(1e9),
        "tb" => Some(1e12),
        "ki" | "kib" => Some(K),
        "mi" | "mib" => Some(K * K),
        "gi" | "gib" => Some(K * K * K),
        "ti" | "tib" => Some(K * K * K * K),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn units_read_as_the_module_says() {
        assert_eq!(parse("1024"), Ok(1024));
        assert_eq!(parse("1024B"), Ok(1024));
        assert_eq!(parse("40GB"), Ok(40_000_000_000));
        assert_eq!(parse("40gb"), Ok(40_000_000_000));
        assert_eq!(parse("12GiB"), Ok(12 << 30));
        assert_eq!(parse("12gi"), Ok(12 << 30));
        assert_eq!(parse("512MiB"), Ok(512 << 20));
        assert_eq!(parse("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse(" 2 TiB "), Ok(2 << 40));
    }

    #[test]
    fn a_bare_letter_is_decimal_in_lower_case_and_binary_in_upper_case_as_in_vllm() {
        assert_eq!(parse("1k"), Ok(1000));
        assert_eq!(parse("1K"), Ok(1024));
        assert_eq!(parse("25.6k"), Ok(25_600));
        assert_eq!(parse("4096M"), Ok(4096 << 20));
        assert_eq!(parse("4m"), Ok(4_000_000));
        assert_eq!(parse("8G"), Ok(8 << 30));
        assert_eq!(parse("8g"), Ok(8_000_000_000));
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        for (s, said) in [
            ("", "is not a size"),
            ("GiB", "is not a size"),
            ("-1GiB", "is not a size"),
            ("12XB", "unknown unit \"XB\""),
            ("0", "at least one byte"),
            ("0.1", "at least one byte"),
            ("1e30TiB", "unknown unit"),
            ("99999999999999999999999TiB", "too large"),
        ] {
            let e = parse(s).unwrap_err();
            assert!(e.contains(said), "{s:?}: {e}");
        }
    }
}
