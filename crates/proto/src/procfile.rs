//! The `Procfile` at an app's root (docs/src/reference/manifest.md#procfile): `name: command`
//! lines naming the app's process types. Its `web:` line is the run command when `app.toml`
//! has no `run` and the bundle no `apprunner`; the other types are kept, parsed, for the
//! process types a later change runs.

/// File name of the Procfile at the bundle root.
pub const PROCFILE: &str = "Procfile";
/// Name of the process type that serves HTTP and is the app's run command.
pub const WEB_PROCESS: &str = "web";
/// Longest line, in bytes. A Procfile line is one shell command; anything longer belongs in a
/// script inside the app, and the bound keeps error messages and records small.
pub const MAX_PROCFILE_LINE_BYTES: usize = 4096;
/// Most lines, comments and blank lines included. Real Procfiles have a handful; this bounds
/// the work a hostile one can cause while leaving room for generous comments.
pub const MAX_PROCFILE_LINES: usize = 512;
/// Most process types. Each becomes processes on every web server, so dozens already mean a
/// mistake; 32 leaves room for any real app.
pub const MAX_PROCESS_TYPES: usize = 32;
/// Longest process type name: a DNS label's length, since a type's name will name its
/// instances, units and log streams.
pub const MAX_PROCESS_NAME_LEN: usize = 63;

/// One `name: command` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessType {
    pub name: String,
    /// The command as written after the colon, trimmed.
    pub command: String,
    /// Its line in the Procfile, from 1.
    pub line: usize,
}

/// A parsed Procfile: its process types in file order, each name once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Procfile {
    pub processes: Vec<ProcessType>,
}

/// What is wrong with a Procfile, with the line to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcfileError {
    #[error("the Procfile is not valid UTF-8; save it as UTF-8")]
    NotUtf8,
    #[error(
        "the Procfile has more than {max} lines; keep one line per process type ({line} lines counted)"
    )]
    TooManyLines { max: usize, line: usize },
    #[error("the Procfile, line {line}: longer than {max} bytes; put a long command in a script")]
    LineTooLong { line: usize, max: usize },
    #[error(
        "the Procfile, line {line}: {text:?} is not `name: command`, e.g. `web: gunicorn mysite.wsgi`"
    )]
    NotAProcess { line: usize, text: String },
    #[error(
        "the Procfile, line {line}: process type {name:?} must be 1 to {max} letters, digits, '_' or '-'",
        max = MAX_PROCESS_NAME_LEN
    )]
    BadName { line: usize, name: String },
    #[error("the Procfile, line {line}: process type `{name}` has no command after the colon")]
    EmptyCommand { line: usize, name: String },
    #[error(
        "the Procfile, line {line}: process type `{name}` appears again (first on line {first}); keep one line per type"
    )]
    Duplicate {
        line: usize,
        name: String,
        first: usize,
    },
    #[error("the Procfile has more than {max} process types")]
    TooManyProcesses { max: usize },
}

impl Procfile {
    /// Parses Procfile bytes: `name: command` lines, `#` comments and blank lines; CRLF line
    /// ends and a leading byte order mark are accepted, since editors on other systems write
    /// them.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProcfileError> {
        let text = std::str::from_utf8(bytes).map_err(|_| ProcfileError::NotUtf8)?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut processes: Vec<ProcessType> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            if line > MAX_PROCFILE_LINES {
                return Err(ProcfileError::TooManyLines {
                    max: MAX_PROCFILE_LINES,
                    line,
                });
            }
            if raw.len() > MAX_PROCFILE_LINE_BYTES {
                return Err(ProcfileError::LineTooLong {
                    line,
                    max: MAX_PROCFILE_LINE_BYTES,
                });
            }
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let Some((name, command)) = trimmed.split_once(':') else {
                return Err(ProcfileError::NotAProcess {
                    line,
                    text: trimmed.to_string(),
                });
            };
            let name = name.trim_end();
            if name.is_empty()
                || name.len() > MAX_PROCESS_NAME_LEN
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(ProcfileError::BadName {
                    line,
                    name: name.to_string(),
                });
            }
            let command = command.trim();
            if command.is_empty() {
                return Err(ProcfileError::EmptyCommand {
                    line,
                    name: name.to_string(),
                });
            }
            if let Some(first) = processes.iter().find(|p| p.name == name) {
                return Err(ProcfileError::Duplicate {
                    line,
                    name: name.to_string(),
                    first: first.line,
                });
            }
            if processes.len() == MAX_PROCESS_TYPES {
                return Err(ProcfileError::TooManyProcesses {
                    max: MAX_PROCESS_TYPES,
                });
            }
            processes.push(ProcessType {
                name: name.to_string(),
                command: command.to_string(),
                line,
            });
        }
        Ok(Self { processes })
    }

    /// The command of process type `name`, if the Procfile has one.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.command.as_str())
    }

    /// The `web:` command: the app's run command when `app.toml` names none.
    pub fn web(&self) -> Option<&str> {
        self.get(WEB_PROCESS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Procfile, ProcfileError> {
        Procfile::parse(text.as_bytes())
    }

    #[test]
    fn real_procfiles_parse() {
        let p = parse(
            "\u{feff}# processes\r\nweb: gunicorn mysite.wsgi --log-file -\r\n\r\n  worker:celery -A mysite worker  \nrelease: python manage.py migrate\n",
        )
        .unwrap();
        let names: Vec<_> = p.processes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["web", "worker", "release"]);
        assert_eq!(p.web(), Some("gunicorn mysite.wsgi --log-file -"));
        assert_eq!(p.get("worker"), Some("celery -A mysite worker"));
        assert_eq!(p.processes[1].line, 4);
        // A command may itself hold colons (URLs, times).
        let p = parse("web: node server.js --url http://x:1").unwrap();
        assert_eq!(p.web(), Some("node server.js --url http://x:1"));
        assert_eq!(parse("").unwrap(), Procfile::default());
        assert_eq!(parse("worker: x").unwrap().web(), None);
    }

    #[test]
    fn bad_procfiles_name_the_line() {
        let long = format!("web: {}", "x".repeat(MAX_PROCFILE_LINE_BYTES));
        let many_lines = "#\n".repeat(MAX_PROCFILE_LINES + 1);
        let many_types: String = (0..=MAX_PROCESS_TYPES)
            .map(|i| format!("p{i}: x\n"))
            .collect();
        let cases: Vec<(&str, ProcfileError)> = vec![
            (
                "# c\nweb gunicorn x",
                ProcfileError::NotAProcess {
                    line: 2,
                    text: "web gunicorn x".into(),
                },
            ),
            (
                "web:",
                ProcfileError::EmptyCommand {
                    line: 1,
                    name: "web".into(),
                },
            ),
            (
                "we b: x",
                ProcfileError::BadName {
                    line: 1,
                    name: "we b".into(),
                },
            ),
            (
                ": x",
                ProcfileError::BadName {
                    line: 1,
                    name: String::new(),
                },
            ),
            (
                "web.1: x",
                ProcfileError::BadName {
                    line: 1,
                    name: "web.1".into(),
                },
            ),
            (
                "web: a\n\nweb: b",
                ProcfileError::Duplicate {
                    line: 3,
                    name: "web".into(),
                    first: 1,
                },
            ),
            (
                &long,
                ProcfileError::LineTooLong {
                    line: 1,
                    max: MAX_PROCFILE_LINE_BYTES,
                },
            ),
            (
                &many_lines,
                ProcfileError::TooManyLines {
                    max: MAX_PROCFILE_LINES,
                    line: MAX_PROCFILE_LINES + 1,
                },
            ),
            (
                &many_types,
                ProcfileError::TooManyProcesses {
                    max: MAX_PROCESS_TYPES,
                },
            ),
        ];
        for (text, expected) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e, expected, "{text:?}");
            let shown = e.to_string();
            assert!(shown.contains("Procfile"), "{shown}");
            assert!(!shown.ends_with('.'), "{shown}");
        }
        assert_eq!(
            Procfile::parse(b"web: \xff").unwrap_err(),
            ProcfileError::NotUtf8
        );
        let e = parse("web: a\nweb: b").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn the_longest_allowed_name_and_line_pass() {
        let name = "a".repeat(MAX_PROCESS_NAME_LEN);
        let p = parse(&format!("{name}: x")).unwrap();
        assert_eq!(p.get(&name), Some("x"));
        let too_long = "a".repeat(MAX_PROCESS_NAME_LEN + 1);
        assert!(matches!(
            parse(&format!("{too_long}: x")),
            Err(ProcfileError::BadName { .. })
        ));
        let line = format!("web: {}", "x".repeat(MAX_PROCFILE_LINE_BYTES - 5));
        assert_eq!(line.len(), MAX_PROCFILE_LINE_BYTES);
        assert!(parse(&line).is_ok());
    }
}
