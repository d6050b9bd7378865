//! Splitting a build command's output into lines for the build log: lossy UTF-8, `\r`
//! dropped, over-long lines cut.

/// Longest output line forwarded whole; longer ones are cut, so a line without a newline
/// cannot grow a buffer without end.
const MAX_LINE_BYTES: usize = 8 * 1024;

/// Splits output into lines: lossy UTF-8, `\r` dropped, lines over [`MAX_LINE_BYTES`] cut.
#[derive(Default)]
pub(crate) struct Lines {
    pending: Vec<u8>,
    /// The current line was already cut; the rest of it up to its newline is dropped.
    cut: bool,
}

impl Lines {
    pub(crate) fn push(&mut self, mut data: &[u8], emit: &mut dyn FnMut(&str)) {
        while !data.is_empty() {
            let newline = data.iter().position(|b| *b == b'\n');
            let (chunk, rest, ends) = match newline {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &[][..], false),
            };
            if !self.cut {
                let room = MAX_LINE_BYTES - self.pending.len();
                self.pending
                    .extend_from_slice(&chunk[..chunk.len().min(room)]);
                if self.pending.len() == MAX_LINE_BYTES && (chunk.len() > room || !ends) {
                    self.flush(emit);
                    self.cut = true;
                }
            }
            if ends {
                if !self.cut {
                    self.flush(emit);
                }
                self.cut = false;
            }
            data = rest;
        }
    }

    fn flush(&mut self, emit: &mut dyn FnMut(&str)) {
        let text = String::from_utf8_lossy(&self.pending);
        emit(text.trim_end_matches('\r'));
        self.pending.clear();
    }

    pub(crate) fn finish(&mut self, emit: &mut dyn FnMut(&str)) {
        if !self.pending.is_empty() {
            self.flush(emit);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lines_are_split_and_long_ones_cut() {
        let mut got = Vec::new();
        let mut lines = Lines::default();
        lines.push(b"one\r\ntw", &mut |l| got.push(l.to_string()));
        lines.push(b"o\n", &mut |l| got.push(l.to_string()));
        let long = vec![b'x'; MAX_LINE_BYTES * 3];
        lines.push(&long, &mut |l| got.push(l.to_string()));
        lines.push(b"\nlast", &mut |l| got.push(l.to_string()));
        lines.finish(&mut |l| got.push(l.to_string()));
        assert_eq!(
            got.len(),
            4,
            "{:?}",
            got.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(got[0], "one");
        assert_eq!(got[1], "two");
        assert_eq!(got[2].len(), MAX_LINE_BYTES);
        assert_eq!(got[3], "last");
    }
}
