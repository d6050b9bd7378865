//! How `em` fails: a message that names the problem and the fix, and an exit code a script
//! can act on.

use std::fmt;

/// Exit codes. 2 is clap's own for usage errors.
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
/// No remote or token configured: run `em up` or `em login`.
pub const EXIT_NOT_CONFIGURED: u8 = 3;
/// The remote could not be reached.
pub const EXIT_UNREACHABLE: u8 = 4;
/// The remote refused the request (bad token, bad input).
pub const EXIT_REFUSED: u8 = 5;
/// The app directory or its `app.toml` is wrong.
pub const EXIT_BAD_APP: u8 = 6;

#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(EXIT_FAILED, message)
    }
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(EXIT_USAGE, message)
    }
    pub fn bad_app(message: impl Into<String>) -> Self {
        Self::new(EXIT_BAD_APP, message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::failed(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Failure>;
