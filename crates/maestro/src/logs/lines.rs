//! Splitting an instance's output into lines, each at most `MAX_LINE_BYTES`: a runaway line
//! is cut and marked rather than buffered.

use std::io;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Longest line kept, in bytes of input. Longer lines are cut there and end with `CUT_MARKER`;
/// the rest, up to the next newline, is skipped. So one runaway line (a binary blob, a
/// minified bundle printed by mistake) cannot eat memory, while any sensible line, stack
/// trace frames and JSON log records included, is far shorter.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// Appended to a line that was cut at `MAX_LINE_BYTES`.
pub const CUT_MARKER: &str = " …[line cut]";
/// Read buffer per attached pipe: the capacity of a Linux pipe, so one read can drain it.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Splits a byte stream into lines without ever buffering more than `MAX_LINE_BYTES` of one.
pub(super) struct LineReader<R> {
    inner: BufReader<R>,
    line: Vec<u8>,
    /// The current line was cut: skip input up to and including the next newline.
    skipping: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(super) fn new(inner: R) -> Self {
        Self::with_capacity(READ_BUFFER_BYTES, inner)
    }

    fn with_capacity(capacity: usize, inner: R) -> Self {
        Self {
            inner: BufReader::with_capacity(capacity, inner),
            line: Vec::new(),
            skipping: false,
        }
    }

    /// The next line; `None` at EOF. A last line without a newline is still returned.
    pub(super) async fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            let available = self.inner.fill_buf().await?;
            if available.is_empty() {
                if self.skipping || self.line.is_empty() {
                    // The cut line was already returned, or there is nothing left.
                    self.skipping = false;
                    return Ok(None);
                }
                return Ok(Some(self.finish(false)));
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let content = newline.unwrap_or(available.len());
            let consumed = newline.map_or(available.len(), |at| at + 1);
            if self.skipping {
                self.inner.consume(consumed);
                self.skipping = newline.is_none();
                continue;
            }
            let room = MAX_LINE_BYTES.saturating_sub(self.line.len());
            if content > room {
                self.line.extend_from_slice(&available[..room]);
                self.inner.consume(consumed);
                self.skipping = newline.is_none();
                return Ok(Some(self.finish(true)));
            }
            self.line.extend_from_slice(&available[..content]);
            self.inner.consume(consumed);
            if newline.is_some() {
                return Ok(Some(self.finish(false)));
            }
        }
    }

    fn finish(&mut self, cut: bool) -> String {
        let mut bytes = std::mem::take(&mut self.line);
        if cut {
            trim_partial_char(&mut bytes);
        } else if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let mut line = match String::from_utf8(bytes) {
            Ok(line) => line,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        if cut {
            line.push_str(CUT_MARKER);
        }
        line
    }
}

/// Drops an incomplete UTF-8 sequence at the end of `bytes` (left by cutting a line in the
/// middle of a character), so the cut does not show up as a replacement character.
fn trim_partial_char(bytes: &mut Vec<u8>) {
    // Walk back over at most three continuation bytes to the lead byte of the last character.
    let mut start = bytes.len();
    while start > 0 && bytes.len() - start < 3 && bytes[start - 1] & 0xC0 == 0x80 {
        start -= 1;
    }
    let Some(lead_at) = start.checked_sub(1) else {
        return;
    };
    let needed = match bytes[lead_at] {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => return,
    };
    if bytes.len() - lead_at < needed {
        bytes.truncate(lead_at);
    }
}

/// Cuts `line` at `MAX_LINE_BYTES` (on a character boundary) and marks it.
pub(super) fn cut_line(line: &mut String) {
    if line.len() <= MAX_LINE_BYTES {
        return;
    }
    let mut end = MAX_LINE_BYTES;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line.truncate(end);
    line.push_str(CUT_MARKER);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn line_splitting_holds_across_small_reads() {
        // A 7-byte buffer makes every line, and the cut, straddle reads.
        let mut input = b"ab\r\n\nc".repeat(3);
        input.extend_from_slice(&[b'z'; MAX_LINE_BYTES + 20]);
        input.extend_from_slice(b"\r\nend");
        let mut reader = LineReader::with_capacity(7, &input[..]);
        let mut lines = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap() {
            lines.push(line);
        }
        let cut = format!("c{}{CUT_MARKER}", "z".repeat(MAX_LINE_BYTES - 1));
        assert_eq!(lines, ["ab", "", "cab", "", "cab", "", &cut, "end"]);
    }

    #[tokio::test]
    async fn a_cut_inside_a_character_leaves_no_replacement_character() {
        let mut input = "a".repeat(MAX_LINE_BYTES - 1).into_bytes();
        input.extend_from_slice("é and more\n".as_bytes());
        let mut reader = LineReader::new(&input[..]);
        let line = reader.next_line().await.unwrap().unwrap();
        assert_eq!(
            line,
            format!("{}{CUT_MARKER}", "a".repeat(MAX_LINE_BYTES - 1))
        );
        assert_eq!(reader.next_line().await.unwrap(), None);
    }
}
