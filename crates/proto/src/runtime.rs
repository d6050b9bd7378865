//! Runtime requirements of an app (`runtime = "python3>=3.11"`, `requires = ["ffmpeg"]` in
//! `app.toml`): their parsing, dotted version numbers, and the check of a found version against
//! a requirement. Maestro probes its host with these, Beacon places apps with them.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest command name in a requirement; real ones are a few characters.
pub const MAX_COMMAND_LEN: usize = 64;
/// Most comma-separated constraints in one requirement (`node>=20,<23` has two).
pub const MAX_CONSTRAINTS: usize = 4;
/// Most numeric parts of a version (`3.11.7` has three).
pub const MAX_VERSION_PARTS: usize = 4;
/// Runtimes every Maestro probes on its host (with `<command> --version`) and reports to
/// Beacon, so apps that need one are placed only where it is installed.
pub const KNOWN_RUNTIMES: &[&str] = &[
    "python3", "node", "ruby", "php", "perl", "java", "deno", "bun", "go", "dotnet",
];

/// A dotted version, compared part by part; missing parts count as zero.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(Vec<u64>);

impl Version {
    /// Parses `3.11.7`, `20`, `v20.1.0`. Anything else is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.strip_prefix('v').unwrap_or(text);
        let parts: Option<Vec<u64>> = text.split('.').map(|p| p.parse().ok()).collect();
        let parts = parts?;
        (!parts.is_empty() && parts.len() <= MAX_VERSION_PARTS).then_some(Self(parts))
    }

    /// Finds the first version number in a `--version` output ("Python 3.11.7", "v20.20.2",
    /// "openjdk version \"17.0.15\" 2025-04-15", "go version go1.22.1 linux/amd64").
    pub fn find_in(output: &str) -> Option<Self> {
        let bytes = output.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i].is_ascii_digit()
                && (i == 0
                    || !bytes[i - 1].is_ascii_alphanumeric()
                    || bytes[i - 1] == b'v'
                    || output[..i].ends_with("go"))
            {
                let end = output[i..]
                    .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .map_or(output.len(), |n| i + n);
                let candidate = output[i..end].trim_end_matches('.');
                // A date (2025-04-15) or a lone number is less likely a version than x.y.
                if candidate.contains('.')
                    && let Some(v) = Self::take_prefix(candidate)
                {
                    return Some(v);
                }
                i = end.max(i + 1);
            } else {
                i += 1;
            }
        }
        None
    }

    /// The first `MAX_VERSION_PARTS` parts of a dotted run of digits.
    fn take_prefix(text: &str) -> Option<Self> {
        let parts: Vec<u64> = text
            .split('.')
            .take(MAX_VERSION_PARTS)
            .map_while(|p| p.parse().ok())
            .collect();
        (!parts.is_empty()).then_some(Self(parts))
    }

    fn part(&self, i: usize) -> u64 {
        self.0.get(i).copied().unwrap_or(0)
    }

    fn cmp_padded(&self, other: &Self) -> Ordering {
        let n = self.0.len().max(other.0.len());
        (0..n)
            .map(|i| self.part(i).cmp(&other.part(i)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }

    /// Whether `self` starts with every part of `prefix` (`3.11.7` matches `3.11`).
    fn matches_prefix(&self, prefix: &Self) -> bool {
        prefix.0.iter().enumerate().all(|(i, p)| self.part(i) == *p)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u64::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

/// How a found version is compared with a required one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AtLeast,
    Above,
    AtMost,
    Below,
    /// `=3.11` (or `==3.11`): every part given must match, so 3.11.7 satisfies it.
    Exactly,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::AtLeast => ">=",
            Op::Above => ">",
            Op::AtMost => "<=",
            Op::Below => "<",
            Op::Exactly => "=",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    pub op: Op,
    pub version: Version,
}

impl Constraint {
    pub fn admits(&self, found: &Version) -> bool {
        let order = found.cmp_padded(&self.version);
        match self.op {
            Op::AtLeast => order.is_ge(),
            Op::Above => order.is_gt(),
            Op::AtMost => order.is_le(),
            Op::Below => order.is_lt(),
            Op::Exactly => found.matches_prefix(&self.version),
        }
    }
}

/// `python3>=3.11`, `node>=20,<23`, or a bare `ffmpeg` (any version). Written in `app.toml` as
/// a string; serialises back to the same text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Requirement {
    pub command: String,
    pub constraints: Vec<Constraint>,
}

impl Requirement {
    /// Whether a host (or bundle) where `command` reports `found` satisfies this.
    pub fn admits(&self, found: Option<&Version>) -> bool {
        match found {
            Some(v) => self.constraints.iter().all(|c| c.admits(v)),
            // A command whose version could not be read satisfies only "any version".
            None => self.constraints.is_empty(),
        }
    }
}

/// Whether `name` is something we may look up on `PATH` and run: no slashes, no spaces, no
/// shell metacharacters.
pub fn check_command(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_COMMAND_LEN {
        return Err(format!(
            "a command name must be 1 to {MAX_COMMAND_LEN} characters"
        ));
    }
    if name.starts_with(['-', '.'])
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
    {
        return Err(format!(
            "{name:?} is not a command name; use its name on PATH, e.g. \"python3\" or \"ffmpeg\""
        ));
    }
    Ok(())
}

impl TryFrom<String> for Requirement {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl std::str::FromStr for Requirement {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text.find(['<', '>', '=']).unwrap_or(text.len());
        let command = text[..split].trim();
        check_command(command).map_err(|e| {
            format!("{e} (write it as \"<command>[<op><version>]\", e.g. \"python3>=3.11\")")
        })?;
        let rest = text[split..].trim();
        let mut constraints = Vec::new();
        if !rest.is_empty() {
            for part in rest.split(',') {
                let part = part.trim();
                let (op, version) = if let Some(v) = part.strip_prefix(">=") {
                    (Op::AtLeast, v)
                } else if let Some(v) = part.strip_prefix("<=") {
                    (Op::AtMost, v)
                } else if let Some(v) = part.strip_prefix("==") {
                    (Op::Exactly, v)
                } else if let Some(v) = part.strip_prefix('>') {
                    (Op::Above, v)
                } else if let Some(v) = part.strip_prefix('<') {
                    (Op::Below, v)
                } else if let Some(v) = part.strip_prefix('=') {
                    (Op::Exactly, v)
                } else {
                    return Err(format!(
                        "{part:?} is not a version constraint; use >=, >, <=, < or = before a version, e.g. \"{command}>=3.11\""
                    ));
                };
                let version = Version::parse(version.trim()).ok_or_else(|| {
                    format!(
                        "{:?} is not a version; write numbers separated by dots, e.g. 3.11 or 20",
                        version.trim()
                    )
                })?;
                constraints.push(Constraint { op, version });
            }
            if constraints.len() > MAX_CONSTRAINTS {
                return Err(format!(
                    "has more than {MAX_CONSTRAINTS} constraints; one range is enough"
                ));
            }
        }
        Ok(Self {
            command: command.to_string(),
            constraints,
        })
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.command)?;
        let parts: Vec<String> = self
            .constraints
            .iter()
            .map(|c| format!("{}{}", c.op.as_str(), c.version))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl From<Requirement> for String {
    fn from(r: Requirement) -> Self {
        r.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    fn req(text: &str) -> Requirement {
        text.parse().unwrap()
    }

    #[test]
    fn versions_are_found_in_real_version_outputs() {
        let cases = [
            ("Python 3.11.7", "3.11.7"),
            ("v20.20.2\n", "20.20.2"),
            (
                "openjdk version \"17.0.15\" 2025-04-15\nOpenJDK Runtime",
                "17.0.15",
            ),
            ("go version go1.22.1 linux/amd64", "1.22.1"),
            (
                "ruby 3.1.2p20 (2022-04-12 revision 4491bb740a) [x86_64-linux-gnu]",
                "3.1.2",
            ),
            (
                "ffmpeg version 5.1.6-0+deb12u1 Copyright (c) 2000-2024",
                "5.1.6",
            ),
            (
                "This is perl 5, version 36, subversion 0 (v5.36.0)",
                "5.36.0",
            ),
        ];
        for (output, expected) in cases {
            assert_eq!(
                Version::find_in(output).map(|v| v.to_string()).as_deref(),
                Some(expected),
                "{output}"
            );
        }
        assert_eq!(Version::find_in("no numbers here"), None);
    }

    #[test]
    fn constraints_compare_part_by_part() {
        assert!(req("python3>=3.11").admits(Some(&v("3.11.7"))));
        assert!(req("python3>=3.11").admits(Some(&v("3.12"))));
        assert!(!req("python3>=3.11").admits(Some(&v("3.9.2"))));
        // Numeric, not string, comparison: 3.10 is above 3.9.
        assert!(req("python3>3.9").admits(Some(&v("3.10.1"))));
        assert!(req("node>=20,<23").admits(Some(&v("20.20.2"))));
        assert!(!req("node>=20,<23").admits(Some(&v("23.0.0"))));
        assert!(req("node=20").admits(Some(&v("20.1.0"))));
        assert!(!req("node==20.1").admits(Some(&v("20.10.0"))));
        assert!(req("ffmpeg").admits(Some(&v("5.1"))));
        assert!(req("ffmpeg").admits(None));
        assert!(!req("node>=20").admits(None));
    }

    #[test]
    fn requirements_round_trip_as_text() {
        for text in ["python3>=3.11", "node>=20,<23", "ffmpeg", "ruby=3.1"] {
            assert_eq!(req(text).to_string(), text);
        }
        assert_eq!(req(" node >= 20 , < 23 ").to_string(), "node>=20,<23");
        assert_eq!(req("node==20").to_string(), "node=20");
    }

    #[test]
    fn bad_requirements_say_what_to_write() {
        for (text, hint) in [
            ("", "command name"),
            (">=3", "command name"),
            ("python3>=three", "not a version"),
            ("python3~3.11", "not a command name"),
            ("python3>=3.11,", "not a version"),
            ("/usr/bin/python3", "not a command name"),
            ("py thon", "not a command name"),
            ("node>=1,>=2,>=3,>=4,>=5", "constraints"),
            ("node>=1.2.3.4.5", "not a version"),
        ] {
            let e = text.parse::<Requirement>().unwrap_err();
            assert!(e.contains(hint), "{text:?}: {e}");
        }
    }
}
