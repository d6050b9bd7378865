//! Error rates as people write them in `app.toml`: `"5%"`, `"0.5%"`, or a fraction such as
//! `0.05`. Kept as parts per million, so a manifest stays comparable with `==`.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const PER_MILLION: u64 = 1_000_000;

/// A share of requests, from 0 (none) to 1 (all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate(u32);

impl Rate {
    pub const fn per_million(n: u32) -> Self {
        Self(n)
    }

    pub fn as_fraction(self) -> f64 {
        f64::from(self.0) / PER_MILLION as f64
    }

    /// Whether `part` of `whole` is more than this rate (exact, no floating point).
    pub fn exceeded_by(self, part: u64, whole: u64) -> bool {
        whole > 0
            && u128::from(part) * u128::from(PER_MILLION) > u128::from(self.0) * u128::from(whole)
    }

    fn from_fraction(f: f64) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&f) {
            return Err(format!(
                "{f} is not a rate; write a fraction from 0 to 1 (0.05) or a percentage (\"5%\")"
            ));
        }
        Ok(Self((f * PER_MILLION as f64).round() as u32))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let (number, scale) = match trimmed.strip_suffix('%') {
            Some(n) => (n.trim(), 100.0),
            None => (trimmed, 1.0),
        };
        let value: f64 = number.parse().map_err(|_| {
            format!("{text:?} is not a rate; write a percentage such as \"5%\", or 0.05")
        })?;
        if !value.is_finite() {
            return Err(format!("{text:?} is not a rate"));
        }
        Self::from_fraction(value / scale)
            .map_err(|_| format!("{text:?} is not a rate from 0% to 100%"))
    }
}

impl fmt::Display for Rate {
    /// As a percentage: `5%`, `0.5%`, `12.25%`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let percent = f64::from(self.0) / 10_000.0;
        let text = format!("{percent:.4}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        write!(f, "{text}%")
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RateVisitor;
        impl Visitor<'_> for RateVisitor {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a percentage such as \"5%\", or a fraction such as 0.05")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Rate, E> {
                Rate::from_fraction(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Rate, E> {
                Rate::from_fraction(v as f64).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Rate, E> {
                Rate::from_fraction(v as f64).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Rate, E> {
                Rate::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(RateVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_as_percentages_or_fractions_and_print_as_percentages() {
        for (text, ppm, shown) in [
            ("5%", 50_000, "5%"),
            ("0.5 %", 5_000, "0.5%"),
            ("0.05", 50_000, "5%"),
            ("100%", 1_000_000, "100%"),
            ("0", 0, "0%"),
            ("12.25%", 122_500, "12.25%"),
        ] {
            let rate = Rate::parse(text).unwrap();
            assert_eq!(rate, Rate::per_million(ppm), "{text}");
            assert_eq!(rate.to_string(), shown);
            assert_eq!(Rate::parse(shown).unwrap(), rate);
        }
        let from_toml: std::collections::BTreeMap<String, Rate> =
            toml::from_str("a = 0.1\nb = \"2%\"\nc = 0").unwrap();
        assert_eq!(from_toml["a"], Rate::per_million(100_000));
        assert_eq!(from_toml["b"], Rate::per_million(20_000));
        assert_eq!(from_toml["c"], Rate::per_million(0));
    }

    #[test]
    fn bad_rates_say_how_to_write_one() {
        for text in ["", "%", "five", "150%", "-1%", "1.5", "NaN"] {
            let err = Rate::parse(text).unwrap_err();
            assert!(err.contains("rate"), "{text}: {err}");
        }
    }

    #[test]
    fn exceeded_compares_exactly() {
        let five = Rate::parse("5%").unwrap();
        assert!(!five.exceeded_by(5, 100));
        assert!(five.exceeded_by(6, 100));
        assert!(!five.exceeded_by(0, 0));
        assert!(Rate::per_million(0).exceeded_by(1, 1_000_000));
        assert!(!Rate::parse("100%").unwrap().exceeded_by(10, 10));
    }
}
