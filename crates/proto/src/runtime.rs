//! Runtime requirements of an app (`runtime = "python3>=3.11"`, `requires = ["ffmpeg"]` in
//! `app.toml`): their parsing, dotted version numbers, and the check of a found version against
//! a requirement. Maestro probes its host with these, Beacon places apps with them. The version
//! specs of other ecosystems' files (npm ranges in `engines.node`, PEP 440 specifiers in
//! `requires-python`) are turned into the same requirements here, for `detect`.

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

    /// The version with part `i` raised by one and the parts after it dropped: the smallest
    /// version above every version that starts with `self`'s parts up to `i` (`20.1` raised
    /// at 0 is `21`, at 1 is `20.2`). `None` when the part would overflow.
    fn raised(&self, i: usize) -> Option<Self> {
        let mut parts: Vec<u64> = (0..=i).map(|j| self.part(j)).collect();
        let last = parts.last_mut()?;
        *last = last.checked_add(1)?;
        Some(Self(parts))
    }

    /// The version padded with zeros to at least `n` parts (`3.12` to 3 parts is `3.12.0`).
    fn padded(&self, n: usize) -> Self {
        let n = n.min(MAX_VERSION_PARTS).max(self.0.len());
        Self((0..n).map(|i| self.part(i)).collect())
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

impl Requirement {
    /// `command` with these constraints, checked as [`FromStr`](std::str::FromStr) checks the
    /// text form, so the result always writes back as text that parses to it.
    pub fn new(command: &str, constraints: Vec<Constraint>) -> Result<Self, String> {
        check_command(command)?;
        if constraints.len() > MAX_CONSTRAINTS {
            return Err(format!(
                "has more than {MAX_CONSTRAINTS} constraints; one range is enough"
            ));
        }
        Ok(Self {
            command: command.to_string(),
            constraints,
        })
    }

    /// `command` at `version`, every part given matching: `.python-version`'s `3.12` admits
    /// 3.12.1, its `3.12.1` only 3.12.1.
    pub fn exactly(command: &str, version: Version) -> Result<Self, String> {
        Self::new(
            command,
            vec![Constraint {
                op: Op::Exactly,
                version,
            }],
        )
    }

    /// From an npm semver range as `package.json`'s `engines.node` writes it: a version or
    /// a partial one (`20`, `20.1.2`, `20.x`, `20.*`, `*`), comparisons (`>=18`, `> 18`,
    /// `<=20.x`), caret and tilde ranges (`^20.1` is `>=20.1,<21`, `~20.1` is
    /// `>=20.1,<20.2`), several of them separated by spaces (all must hold). Alternatives
    /// (`||`), hyphen ranges and pre-release tags are refused with what to write instead.
    pub fn from_npm_range(command: &str, range: &str) -> Result<Self, String> {
        Self::new(command, npm_constraints(range)?)
    }

    /// From PEP 440 version specifiers as `pyproject.toml`'s `requires-python` writes them:
    /// `>=3.11`, `>=3.9,<4`, `~=3.11` (`>=3.11,<4`), `==3.12.*` (any 3.12), `==3.12.1`.
    /// Exclusions (`!=`) and arbitrary equality (`===`) are refused with what to write instead.
    pub fn from_python_specifiers(command: &str, spec: &str) -> Result<Self, String> {
        Self::new(command, python_constraints(spec)?)
    }
}

/// A version that may end in wildcards (`20`, `20.x`, `3.12.*`, `v20.1`); `Some(None)` for a
/// whole wildcard (`*`, `x`), `None` when it is no version at all.
fn parse_partial(text: &str) -> Option<Option<Version>> {
    let text = text.strip_prefix('v').unwrap_or(text);
    let mut parts = Vec::new();
    let mut wild = false;
    for part in text.split('.') {
        match part {
            "x" | "X" | "*" => wild = true,
            digits if !wild && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
                parts.push(digits.parse().ok()?);
            }
            _ => return None,
        }
    }
    if parts.len() > MAX_VERSION_PARTS {
        return None;
    }
    Some((!parts.is_empty()).then_some(Version(parts)))
}

/// Parts in a full npm version; fewer given parts make a partial version (an x-range).
const FULL_VERSION_PARTS: usize = 3;

fn npm_constraints(range: &str) -> Result<Vec<Constraint>, String> {
    let range = range.trim();
    if range.contains("||") {
        return Err(format!(
            "{range:?} offers alternatives (`||`), which are not supported; name one range, e.g. \">=18\""
        ));
    }
    // `>= 18` is one comparator written with a space: an operator alone joins the next token.
    let mut tokens: Vec<String> = Vec::new();
    let mut pending_op: Option<&str> = None;
    for token in range.split(|c: char| c.is_whitespace() || c == ',') {
        if token.is_empty() {
            continue;
        }
        if token == "-" {
            return Err(format!(
                "{range:?} is a hyphen range, which is not supported; write it as \">=A <=B\""
            ));
        }
        if let Some(op) = pending_op.take() {
            tokens.push(format!("{op}{token}"));
        } else if matches!(token, ">=" | "<=" | ">" | "<" | "=" | "^" | "~" | "~>") {
            pending_op = Some(token);
        } else {
            tokens.push(token.to_string());
        }
    }
    if let Some(op) = pending_op {
        return Err(format!(
            "{range:?} ends with {op:?} and no version after it"
        ));
    }
    let mut constraints = Vec::new();
    for token in &tokens {
        constraints.extend(npm_comparator(token)?);
    }
    Ok(constraints)
}

/// One npm comparator, with npm's meaning for partial versions.
fn npm_comparator(text: &str) -> Result<Vec<Constraint>, String> {
    let not_a_range = || {
        format!(
            "{text:?} is not a version range; write e.g. \">=18\", \"20.x\", \"^20.1\" or \"20\""
        )
    };
    let (op, rest) = [">=", "<=", "~>", ">", "<", "=", "^", "~"]
        .iter()
        .find_map(|op| text.strip_prefix(op).map(|rest| (*op, rest)))
        .unwrap_or(("", text));
    let Some(parsed) = parse_partial(rest.trim()) else {
        return Err(not_a_range());
    };
    let Some(version) = parsed else {
        // A whole wildcard admits any version; nothing is above or below all of them.
        return match op {
            "" | "=" | ">=" | "<=" | "^" | "~" | "~>" => Ok(Vec::new()),
            _ => Err(not_a_range()),
        };
    };
    let given = version.0.len();
    let partial = given < FULL_VERSION_PARTS;
    let raised = |i: usize| version.raised(i).ok_or_else(not_a_range);
    let constraint = |op, version| Constraint { op, version };
    Ok(match op {
        "" | "=" => vec![constraint(Op::Exactly, version.clone())],
        ">=" => vec![constraint(Op::AtLeast, version.clone())],
        "<" => vec![constraint(Op::Below, version.clone())],
        // `>20` is above every 20.x: at least 21. `<=20` admits every 20.x: below 21.
        ">" if partial => vec![constraint(Op::AtLeast, raised(given - 1)?)],
        ">" => vec![constraint(Op::Above, version.clone())],
        "<=" if partial => vec![constraint(Op::Below, raised(given - 1)?)],
        "<=" => vec![constraint(Op::AtMost, version.clone())],
        "~" | "~>" => vec![
            constraint(Op::AtLeast, version.clone()),
            constraint(Op::Below, raised(if given >= 2 { 1 } else { 0 })?),
        ],
        // `^`: changes that do not modify the first non-zero part given (`^0.2` is below 0.3).
        _ => {
            let first_non_zero = version.0.iter().position(|p| *p != 0).unwrap_or(given - 1);
            vec![
                constraint(Op::AtLeast, version.clone()),
                constraint(Op::Below, raised(first_non_zero)?),
            ]
        }
    })
}

fn python_constraints(spec: &str) -> Result<Vec<Constraint>, String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok(Vec::new());
    }
    let mut constraints = Vec::new();
    for clause in spec.split(',') {
        let clause = clause.trim();
        let not_a_version = |v: &str| {
            format!(
                "{v:?} in {spec:?} is not a version; write numbers separated by dots, e.g. \">=3.11\""
            )
        };
        if clause.starts_with("===") || clause.starts_with("!=") {
            return Err(format!(
                "{clause:?} in {spec:?} is not supported; use >=, >, <=, <, == or ~=, e.g. \">=3.11\""
            ));
        }
        let Some((op, rest)) = [">=", "<=", "==", "~=", ">", "<"]
            .iter()
            .find_map(|op| clause.strip_prefix(op).map(|rest| (*op, rest.trim())))
        else {
            return Err(format!(
                "{clause:?} in {spec:?} has no comparison; write e.g. \">=3.11\" or \"==3.12.*\""
            ));
        };
        if op == "==" {
            if let Some(prefix) = rest.strip_suffix(".*") {
                let version = Version::parse(prefix).ok_or_else(|| not_a_version(rest))?;
                constraints.push(Constraint {
                    op: Op::Exactly,
                    version,
                });
            } else {
                // `==3.12` is 3.12.0 exactly in PEP 440, not any 3.12.
                let version = Version::parse(rest).ok_or_else(|| not_a_version(rest))?;
                constraints.push(Constraint {
                    op: Op::Exactly,
                    version: version.padded(FULL_VERSION_PARTS),
                });
            }
            continue;
        }
        let version = Version::parse(rest).ok_or_else(|| not_a_version(rest))?;
        match op {
            "~=" => {
                let given = version.0.len();
                if given < 2 {
                    return Err(format!(
                        "{clause:?} in {spec:?} needs at least two parts, e.g. \"~=3.11\""
                    ));
                }
                let upper = version
                    .raised(given - 2)
                    .ok_or_else(|| not_a_version(rest))?;
                constraints.push(Constraint {
                    op: Op::AtLeast,
                    version,
                });
                constraints.push(Constraint {
                    op: Op::Below,
                    version: upper,
                });
            }
            ">=" => constraints.push(Constraint {
                op: Op::AtLeast,
                version,
            }),
            "<=" => constraints.push(Constraint {
                op: Op::AtMost,
                version,
            }),
            ">" => constraints.push(Constraint {
                op: Op::Above,
                version,
            }),
            _ => constraints.push(Constraint {
                op: Op::Below,
                version,
            }),
        }
    }
    Ok(constraints)
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
    fn npm_ranges_become_requirements() {
        let cases = [
            (">=18", "node>=18"),
            (">= 18", "node>=18"),
            ("20", "node=20"),
            ("v20", "node=20"),
            ("20.x", "node=20"),
            ("20.*", "node=20"),
            ("20.1.x", "node=20.1"),
            ("20.1.2", "node=20.1.2"),
            ("=20.1", "node=20.1"),
            ("^20.1", "node>=20.1,<21"),
            ("^20", "node>=20,<21"),
            ("^0.10", "node>=0.10,<0.11"),
            ("^0.0.3", "node>=0.0.3,<0.0.4"),
            ("^0", "node>=0,<1"),
            ("~20.1", "node>=20.1,<20.2"),
            ("~20.1.2", "node>=20.1.2,<20.2"),
            ("~20", "node>=20,<21"),
            (">20", "node>=21"),
            (">20.1.2", "node>20.1.2"),
            ("<=20", "node<21"),
            ("<=20.1.2", "node<=20.1.2"),
            ("<22", "node<22"),
            (">=18 <23", "node>=18,<23"),
            (">=18.0.0, <23", "node>=18.0.0,<23"),
            ("*", "node"),
            ("x", "node"),
            ("", "node"),
        ];
        for (range, expected) in cases {
            let r = Requirement::from_npm_range("node", range)
                .unwrap_or_else(|e| panic!("{range:?}: {e}"));
            assert_eq!(r.to_string(), expected, "{range:?}");
            // The text form parses back to the same requirement.
            assert_eq!(req(expected), r, "{range:?}");
        }
        // What the ranges admit, as npm would.
        let admits = |range: &str, version: &str| {
            Requirement::from_npm_range("node", range)
                .unwrap()
                .admits(Some(&v(version)))
        };
        assert!(admits("^20.1", "20.9.0") && !admits("^20.1", "21.0.0"));
        assert!(!admits("^20.1", "20.0.9"));
        assert!(admits("20.x", "20.19.1") && !admits("20.x", "21.1.0"));
        assert!(admits("<=20", "20.99.0") && !admits(">20", "20.99.0"));
    }

    #[test]
    fn npm_ranges_that_are_not_ranges_say_what_to_write() {
        for (range, hint) in [
            ("banana", "not a version range"),
            ("lts/*", "not a version range"),
            ("20.x.1", "not a version range"),
            ("20.0.0-rc.1", "not a version range"),
            (">*", "not a version range"),
            ("18 || 20", "alternatives"),
            ("18 - 20", "hyphen range"),
            (">=", "no version after it"),
            ("^1 ^2 ^3", "constraints"),
            ("1.2.3.4.5", "not a version range"),
        ] {
            let e = Requirement::from_npm_range("node", range).unwrap_err();
            assert!(e.contains(hint), "{range:?}: {e}");
        }
    }

    #[test]
    fn python_specifiers_become_requirements() {
        let cases = [
            (">=3.11", "python3>=3.11"),
            (" >= 3.9 , < 4 ", "python3>=3.9,<4"),
            ("~=3.11", "python3>=3.11,<4"),
            ("~=3.11.2", "python3>=3.11.2,<3.12"),
            ("==3.12.*", "python3=3.12"),
            ("==3.12", "python3=3.12.0"),
            ("==3.12.1", "python3=3.12.1"),
            (">3.8", "python3>3.8"),
            ("<=3.13", "python3<=3.13"),
            ("", "python3"),
        ];
        for (spec, expected) in cases {
            let r = Requirement::from_python_specifiers("python3", spec)
                .unwrap_or_else(|e| panic!("{spec:?}: {e}"));
            assert_eq!(r.to_string(), expected, "{spec:?}");
            assert_eq!(req(expected), r, "{spec:?}");
        }
        for (spec, hint) in [
            ("3.11", "no comparison"),
            (">=3.9,!=3.9.1", "not supported"),
            ("===3.12", "not supported"),
            (">=three", "not a version"),
            (">=3.11,", "no comparison"),
            ("~=3", "at least two parts"),
            ("==3.12.0rc1", "not a version"),
        ] {
            let e = Requirement::from_python_specifiers("python3", spec).unwrap_err();
            assert!(e.contains(hint), "{spec:?}: {e}");
        }
    }

    #[test]
    fn raised_versions_bound_a_prefix() {
        assert_eq!(v("20.1").raised(0), Some(v("21")));
        assert_eq!(v("20.1").raised(1), Some(v("20.2")));
        assert_eq!(v("20").raised(1), Some(v("20.1")));
        assert_eq!(Version(vec![u64::MAX]).raised(0), None);
        assert_eq!(v("3.12").padded(3), v("3.12.0"));
        assert_eq!(v("3.12.1.4").padded(3), v("3.12.1.4"));
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
