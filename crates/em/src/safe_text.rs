//! Text that came from an app (its output, its events, a build's log) made safe to print on
//! a terminal: control characters and escape sequences are shown as `\x1b`, `\r` and so on,
//! so an app cannot move the cursor, rewrite earlier lines, retitle the window or hide text
//! from the person reading `em logs`. Tabs stay as they are.

use std::fmt::Write as _;

/// One line of app text with every control character shown escaped; a newline inside it is
/// escaped too, since a line must stay one line.
pub fn line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        push(&mut out, c);
    }
    out
}

/// Several lines of app text: each line as [`line`] makes it, the newlines kept.
pub fn lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, part) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&line(part));
    }
    out
}

fn push(out: &mut String, c: char) {
    match c {
        '\t' => out.push('\t'),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        // C0 controls, DEL and the C1 controls (U+0080 to U+009F, which some terminals take as
        // the start of an escape sequence just as they take ESC).
        c if c.is_control() => {
            let code = u32::from(c);
            if code <= 0xff {
                let _ = write!(out, "\\x{code:02x}");
            } else {
                let _ = write!(out, "\\u{{{code:x}}}");
            }
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_and_controls_are_shown_not_obeyed() {
        assert_eq!(
            line("\x1b[2J\x1b]0;owned\x07ok"),
            "\\x1b[2J\\x1b]0;owned\\x07ok"
        );
        assert_eq!(line("progress\rdone"), "progress\\rdone");
        assert_eq!(line("a\u{9b}31mb\u{7f}"), "a\\x9b31mb\\x7f");
        assert_eq!(line("one\ntwo"), "one\\ntwo");
    }

    #[test]
    fn tabs_and_ordinary_text_stay_as_they_are() {
        assert_eq!(line("name\tvalue ünïcode ✓"), "name\tvalue ünïcode ✓");
        assert_eq!(lines("a\x1b[1m\nb\tc\n"), "a\\x1b[1m\nb\tc\n");
    }
}
