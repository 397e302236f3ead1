//! Command lines typed into an interactive shell, as far as the keystrokes tell. A shell is
//! not a boundary: these lines are recorded (and marked in the recording), never decided,
//! and they are a reading of the keystrokes, not of what the shell ran: line editing with
//! cursor keys, history recall and tab completion change the line in ways only the shell
//! knows. The recording itself (every byte, both ways) is the evidence; this is the index.

/// Longest line kept; longer input is cut (and marked) so a paste cannot grow it unbounded.
const MAX_LINE: usize = 4096;

#[derive(Default)]
pub struct TypedLines {
    line: Vec<u8>,
    /// The line was edited in a way this reading cannot follow (cursor keys, completion).
    inexact: bool,
    /// Inside an escape sequence (ESC, then `[` or `O` and parameters, up to a final byte).
    escape: Escape,
}

#[derive(Default, PartialEq, Eq)]
enum Escape {
    #[default]
    None,
    Start,
    Sequence,
}

/// A line the user ended with Enter.
#[derive(Debug, PartialEq, Eq)]
pub struct Typed {
    pub line: String,
    /// Cursor keys, completion or an overlong line were involved: the shell may have run
    /// something else.
    pub inexact: bool,
}

impl TypedLines {
    /// Feeds keystrokes; returns the lines they end.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Typed> {
        let mut done = Vec::new();
        for &b in bytes {
            match self.escape {
                Escape::Start => {
                    self.escape = if b == b'[' || b == b'O' {
                        Escape::Sequence
                    } else {
                        Escape::None
                    };
                    self.inexact = true;
                    continue;
                }
                Escape::Sequence => {
                    if (0x40..=0x7e).contains(&b) {
                        self.escape = Escape::None;
                    }
                    continue;
                }
                Escape::None => {}
            }
            match b {
                b'\r' | b'\n' => {
                    if !self.line.is_empty() {
                        done.push(Typed {
                            line: String::from_utf8_lossy(&self.line).into_owned(),
                            inexact: self.inexact,
                        });
                    }
                    self.line.clear();
                    self.inexact = false;
                }
                0x1b => self.escape = Escape::Start,
                // Backspace / DEL: one character back (a whole UTF-8 sequence).
                0x7f | 0x08 => {
                    while let Some(c) = self.line.pop() {
                        if c & 0xc0 != 0x80 {
                            break;
                        }
                    }
                }
                // Ctrl-C and Ctrl-U drop the line; Ctrl-W a word.
                0x03 | 0x15 => {
                    self.line.clear();
                    self.inexact = false;
                }
                0x17 => {
                    while self.line.last() == Some(&b' ') {
                        self.line.pop();
                    }
                    while self.line.last().is_some_and(|c| *c != b' ') {
                        self.line.pop();
                    }
                }
                b'\t' => self.inexact = true,
                b if b < 0x20 => {}
                b => {
                    if self.line.len() < MAX_LINE {
                        self.line.push(b);
                    } else {
                        self.inexact = true;
                    }
                }
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<(String, bool)> {
        let mut t = TypedLines::default();
        input
            .chunks(3)
            .flat_map(|c| t.feed(c))
            .map(|l| (l.line, l.inexact))
            .collect()
    }

    #[test]
    fn keystrokes_become_lines_across_chunks() {
        assert_eq!(
            lines(b"ls -l\rcd /tmp\r\r"),
            [("ls -l".into(), false), ("cd /tmp".into(), false)]
        );
    }

    #[test]
    fn editing_keys_are_applied_or_flagged() {
        assert_eq!(lines(b"lsx\x7f -a\r"), [("ls -a".into(), false)]);
        assert_eq!(lines(b"rm -rf /\x03echo hi\r"), [("echo hi".into(), false)]);
        assert_eq!(
            lines(b"echo one two\x17three\r"),
            [("echo one three".into(), false)]
        );
        assert_eq!(
            lines("caf\u{e9}\x7fe\r".as_bytes()),
            [("cafe".into(), false)]
        );
        // Cursor keys and completion: the shell's line may differ.
        assert_eq!(lines(b"\x1b[Als\r"), [("ls".into(), true)]);
        assert_eq!(
            lines(b"cat /et\tpasswd\r"),
            [("cat /etpasswd".into(), true)]
        );
        assert_eq!(
            lines(b"ok\r"),
            [("ok".into(), false)],
            "the next line starts exact"
        );
    }

    #[test]
    fn a_long_paste_is_cut_and_flagged() {
        let mut input = vec![b'a'; MAX_LINE + 10];
        input.push(b'\r');
        let got = lines(&input);
        assert_eq!(got[0].0.len(), MAX_LINE);
        assert!(got[0].1);
    }
}
