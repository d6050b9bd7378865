//! Byte sizes as people write them in `app.toml`: `"25MiB"`, `"512 KiB"`, `"1GiB"`, or a plain
//! number of bytes. Binary units only (1 KiB = 1024 bytes); `KB`/`MB`/`GB` are read the same
//! way, since that is what people mean by them in upload limits.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const UNITS: &[(&str, u64)] = &[
    ("b", 1),
    ("k", 1 << 10),
    ("kb", 1 << 10),
    ("kib", 1 << 10),
    ("m", 1 << 20),
    ("mb", 1 << 20),
    ("mib", 1 << 20),
    ("g", 1 << 30),
    ("gb", 1 << 30),
    ("gib", 1 << 30),
];

/// A number of bytes, written as text with a unit or as an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().map_err(|_| {
            format!("{text:?} is not a size; write a whole number and a unit, e.g. \"25MiB\"")
        })?;
        let unit = unit.trim().to_ascii_lowercase();
        let factor = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, f)| *f)
                .ok_or_else(|| {
                    format!("{text:?} has an unknown unit; use B, KiB, MiB or GiB, e.g. \"25MiB\"")
                })?
        };
        number
            .checked_mul(factor)
            .map(Self)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

/// A byte count for people to read, in the largest binary unit it reaches, one decimal:
/// `812 B`, `2.9 KiB`, `32.9 MiB`, `1.2 GiB` (so a small upload never reads `0.0 MiB`).
pub fn human(bytes: u64) -> String {
    const STEPS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, factor) in STEPS {
        if bytes >= factor {
            return format!("{:.1} {unit}", bytes as f64 / factor as f64);
        }
    }
    format!("{bytes} B")
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 >= factor && self.0.is_multiple_of(factor) {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"25MiB\", or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_read_in_the_largest_unit_reached() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(812), "812 B");
        assert_eq!(human(2970), "2.9 KiB");
        assert_eq!(human(34_498_560), "32.9 MiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }

    #[test]
    fn sizes_parse_with_units_and_print_back() {
        for (text, bytes, shown) in [
            ("25MiB", 25 << 20, "25MiB"),
            ("512 KiB", 512 << 10, "512KiB"),
            ("1gb", 1 << 30, "1GiB"),
            ("1000", 1000, "1000B"),
            ("1536KiB", 1536 << 10, "1536KiB"),
            ("0", 0, "0B"),
        ] {
            let size = ByteSize::parse(text).unwrap();
            assert_eq!(size.0, bytes, "{text}");
            assert_eq!(size.to_string(), shown);
            assert_eq!(ByteSize::parse(shown).unwrap(), size);
        }
    }

    #[test]
    fn bad_sizes_say_how_to_write_one() {
        for text in ["", "MiB", "1.5MiB", "10 parsecs", "-1", "99999999999999GiB"] {
            let err = ByteSize::parse(text).unwrap_err();
            assert!(err.contains(&format!("{text:?}")), "{err}");
        }
    }
}
