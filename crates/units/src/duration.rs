//! Durations in config files: `#[serde(with = "units::duration")]` on a `Duration`,
//! `#[serde(with = "units::duration::option")]` on an `Option<Duration>`.
//!
//! Read: a humantime string (`"30s"`, `"2m"`, `"500ms"`, `"1m 30s"`) or a whole number of
//! seconds (`90`). Written: a humantime string (`"1m 30s"`), which reads back the same.
//! A bad value is an error that quotes it and says what to write; the file's parser adds
//! where it is (TOML: the line and the key).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// What a duration may be written as, for errors.
const EXPECTED: &str = "write e.g. \"30s\", \"2m\", \"500ms\" or whole seconds (90)";

/// Parses a humantime duration string (`"30s"`, `"2m"`, `"500ms"`); the error quotes the
/// text and says what to write.
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("bad duration {text:?}: {e}; {EXPECTED}"))
}

/// A duration as files write it (`"1m 30s"`).
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

struct DurationVisitor;

impl<'de> Visitor<'de> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a duration: {EXPECTED}")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Ok(Duration::from_secs(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v)
            .map(Duration::from_secs)
            .map_err(|_| E::custom(format!("bad duration {v}: a duration cannot be negative")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Err(E::custom(format!(
            "bad duration {v}: seconds are whole; {EXPECTED}"
        )))
    }
}

/// The same for `Option<Duration>`: absent or `null` is `None` (give the field
/// `#[serde(default)]` so that it may be left out).
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        d.deserialize_option(OptionVisitor)
    }

    struct OptionVisitor;

    impl<'de> Visitor<'de> for OptionVisitor {
        type Value = Option<Duration>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a duration or nothing: {EXPECTED}")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Spec {
        #[serde(with = "crate::duration")]
        warmup: Duration,
        #[serde(default, with = "crate::duration::option")]
        slo: Option<Duration>,
    }

    fn toml_spec(warmup: &str) -> Result<Spec, String> {
        toml::from_str(&format!("warmup = {warmup}\n")).map_err(|e| e.to_string())
    }

    #[test]
    fn strings_and_whole_seconds_are_read() {
        for (text, want) in [
            ("\"30s\"", Duration::from_secs(30)),
            ("\"2m\"", Duration::from_secs(120)),
            ("\"500ms\"", Duration::from_millis(500)),
            ("\"1m 30s\"", Duration::from_secs(90)),
            ("90", Duration::from_secs(90)),
            ("0", Duration::ZERO),
        ] {
            assert_eq!(toml_spec(text).unwrap().warmup, want, "{text}");
        }
        let json: Spec = serde_json::from_str(r#"{"warmup": 5, "slo": "250ms"}"#).unwrap();
        assert_eq!(json.warmup, Duration::from_secs(5));
        assert_eq!(json.slo, Some(Duration::from_millis(250)));
    }

    #[test]
    fn bad_values_say_what_to_write_and_where() {
        for (text, want) in [
            ("\"soon\"", "bad duration \"soon\""),
            ("-3", "bad duration -3: a duration cannot be negative"),
            ("1.5", "bad duration 1.5: seconds are whole"),
            ("true", "a duration: write e.g. \"30s\""),
        ] {
            let e = toml_spec(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            // the TOML parser points at the key
            assert!(e.contains("warmup ="), "{text}: {e}");
        }
        assert!(parse("fast").unwrap_err().contains("write e.g. \"30s\""));
    }

    #[test]
    fn written_as_humantime_and_read_back() {
        let s = Spec {
            warmup: Duration::from_millis(90_500),
            slo: None,
        };
        let text = toml::to_string(&s).unwrap();
        assert_eq!(text, "warmup = \"1m 30s 500ms\"\n");
        assert_eq!(toml::from_str::<Spec>(&text).unwrap(), s);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"warmup":"1m 30s 500ms","slo":null}"#);
        assert_eq!(serde_json::from_str::<Spec>(&json).unwrap(), s);
        let with = Spec {
            slo: Some(Duration::from_secs(2)),
            ..s
        };
        let back: Spec = toml::from_str(&toml::to_string(&with).unwrap()).unwrap();
        assert_eq!(back, with);
    }
}
