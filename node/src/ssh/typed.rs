//! Command lines typed into an interactive shell, as far as the keystrokes tell. A shell is
//! not a boundary: these lines are recorded (and marked in the recording), never decided,
//! and they are a reading of the keystrokes, not of what the shell ran: line editing with
//! cursor keys, history recall and tab completion change the line in ways only the shell
//! knows. The recording itself (every byte, both ways) is the evidence; this is the index.
//!
//! A line the host did not echo was typed at a prompt that hides what is typed (`sudo`,
//! `passwd`, `read -s`, a database client's password prompt): its text goes in no record
//! ([`Echoes`]); its keystrokes stay in the recording, on the node.

use std::collections::VecDeque;

/// Longest line kept; longer input is cut (and marked) so a paste cannot grow it unbounded.
const MAX_LINE: usize = 4096;

#[derive(Default)]
pub struct TypedLines {
    line: Vec<u8>,
    /// The line was edited in a way this reading cannot follow (cursor keys, completion,
    /// a control key of the line editor).
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
                // Ctrl-C drops the line; Ctrl-U what is before the cursor, which is the whole
                // line only if the cursor was never moved; Ctrl-W a word.
                0x03 => {
                    self.line.clear();
                    self.inexact = false;
                }
                0x15 => self.line.clear(),
                0x17 => {
                    while self.line.last() == Some(&b' ') {
                        self.line.pop();
                    }
                    while self.line.last().is_some_and(|c| *c != b' ') {
                        self.line.pop();
                    }
                }
                // Tab (completion), and any other control key: readline's history search
                // (Ctrl-R) and recall (Ctrl-P/N), cursor moves (Ctrl-A/E/B/F), kill and yank
                // (Ctrl-K/Y), transposition (Ctrl-T), deletion (Ctrl-D) … change the line in
                // ways only the shell knows.
                b if b < 0x20 => self.inexact = true,
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

/// How much of the host's output a typed line is looked for in, after the line began: past
/// this, a line not yet shown is taken for one the host did not echo.
const ECHO_WINDOW: usize = 16 * 1024;

/// Lines still waiting for their echo, at most; an older one is then taken as not echoed.
const MAX_WATCHED: usize = 64;

/// Which typed lines the host echoed. A terminal shows what is typed because the host sends
/// it back (the terminal driver, or the shell's line editor); a prompt for a password turns
/// that off. So a line is taken as echoed when its text is in what the host showed since the
/// line began (escape sequences and control characters taken out, line breaks kept as
/// breaks), and as typed without echo when, after it was ended, the host showed something
/// and the user typed on without its text ever being shown (or the channel ended, or the
/// host showed [`ECHO_WINDOW`] bytes without it). Lines come out in the order they were
/// typed; a line waits for the lines before it.
#[derive(Default)]
pub struct Echoes {
    /// What the host showed since the oldest line watched began (or since the last Enter).
    shown: Vec<u8>,
    /// Where in `shown` the line being typed now began: at the last Enter.
    line_start: usize,
    watched: VecDeque<Watched>,
    /// Inside an escape sequence of the host's output.
    escape: OutputEscape,
}

/// A typed line, and whether the host echoed it.
#[derive(Debug, PartialEq, Eq)]
pub struct Decided {
    pub typed: Typed,
    pub echoed: bool,
}

struct Watched {
    typed: Typed,
    /// Where in `shown` the line began, and where it was ended (Enter).
    start: usize,
    enter: usize,
    /// `shown` is searched up to here.
    searched: usize,
    echoed: Option<bool>,
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum OutputEscape {
    #[default]
    None,
    /// After ESC.
    Start,
    /// A control sequence (`ESC [`): up to its final byte.
    Csi,
    /// A string (`ESC ]`, `ESC P` …): up to BEL or ESC `\`.
    Text,
    /// ESC inside a string.
    TextEsc,
}

impl Echoes {
    /// A line was ended (Enter): watched from where it began. Returns the lines now decided.
    pub fn ended(&mut self, typed: Typed) -> Vec<Decided> {
        if self.watched.len() == MAX_WATCHED {
            if let Some(w) = self.watched.iter_mut().find(|w| w.echoed.is_none()) {
                w.echoed = Some(false);
            }
        }
        self.watched.push_back(Watched {
            typed,
            start: self.line_start,
            enter: self.shown.len(),
            searched: self.line_start,
            echoed: None,
        });
        self.line_start = self.shown.len();
        self.decide()
    }

    /// The host showed `bytes`. Returns the lines now decided.
    pub fn shown(&mut self, bytes: &[u8]) -> Vec<Decided> {
        for &b in bytes {
            self.escape = match (self.escape, b) {
                (OutputEscape::None, 0x1b) => OutputEscape::Start,
                (OutputEscape::None, b'\r' | b'\n') => {
                    if self.shown.last() != Some(&b'\n') {
                        self.shown.push(b'\n');
                    }
                    OutputEscape::None
                }
                (OutputEscape::None, b) => {
                    if b >= 0x20 && b != 0x7f {
                        self.shown.push(b);
                    }
                    OutputEscape::None
                }
                (OutputEscape::Start, b'[') => OutputEscape::Csi,
                (OutputEscape::Start, b']' | b'P' | b'X' | b'^' | b'_') => OutputEscape::Text,
                (OutputEscape::Start, _) => OutputEscape::None,
                (OutputEscape::Csi, 0x40..=0x7e) => OutputEscape::None,
                (OutputEscape::Csi, _) => OutputEscape::Csi,
                (OutputEscape::Text, 0x07) | (OutputEscape::TextEsc, b'\\') => OutputEscape::None,
                (OutputEscape::Text | OutputEscape::TextEsc, 0x1b) => OutputEscape::TextEsc,
                (OutputEscape::Text | OutputEscape::TextEsc, _) => OutputEscape::Text,
            };
        }
        // The line being typed is looked for in the last ECHO_WINDOW bytes at most.
        self.line_start = self
            .line_start
            .max(self.shown.len().saturating_sub(ECHO_WINDOW));
        self.decide()
    }

    /// The user typed on: a line ended before, after which the host showed something but
    /// never its text, was typed without echo. Returns the lines now decided.
    pub fn typing(&mut self) -> Vec<Decided> {
        let shown = self.shown.len();
        for w in self.watched.iter_mut() {
            if w.echoed.is_none() && shown > w.enter {
                w.echoed = Some(false);
            }
        }
        self.decide()
    }

    /// The channel ended: a line not shown by now was not echoed.
    pub fn end(&mut self) -> Vec<Decided> {
        for w in self.watched.iter_mut() {
            w.echoed.get_or_insert(false);
        }
        self.decide()
    }

    /// Looks for the text of each line still waiting (one with more than `ECHO_WINDOW` bytes
    /// shown since it began and not its text was not echoed), and hands over the lines decided
    /// from the front.
    fn decide(&mut self) -> Vec<Decided> {
        let shown = &self.shown;
        for w in self.watched.iter_mut().filter(|w| w.echoed.is_none()) {
            let text = w.typed.line.as_bytes();
            // The text may straddle what was searched and what is new.
            let from = w
                .searched
                .saturating_sub(text.len().saturating_sub(1))
                .max(w.start);
            if memchr::memmem::find(&shown[from..], text).is_some() {
                w.echoed = Some(true);
            } else if shown.len() - w.start > ECHO_WINDOW {
                // Too much shown without the line's text: it was not echoed.
                w.echoed = Some(false);
            }
            w.searched = shown.len();
        }
        let mut decided = Vec::new();
        while let Some(echoed) = self.watched.front().and_then(|w| w.echoed) {
            let w = self.watched.pop_front().expect("a front");
            decided.push(Decided {
                typed: w.typed,
                echoed,
            });
        }
        // What no line will be looked for in again.
        let keep = self
            .watched
            .front()
            .map_or(self.line_start, |w| w.start.min(self.line_start));
        if keep > 4096 {
            self.shown.drain(..keep);
            self.line_start -= keep;
            for w in self.watched.iter_mut() {
                w.start -= keep;
                w.enter -= keep;
                w.searched -= keep;
            }
        }
        decided
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
        // Readline's control keys: history search and recall, cursor moves, kill and yank,
        // transposition, deletion under the cursor.
        for key in [
            0x12u8, 0x10, 0x0e, 0x01, 0x05, 0x02, 0x06, 0x0b, 0x19, 0x14, 0x04, 0x00, 0x1f,
        ] {
            let mut input = b"echo hi".to_vec();
            input.push(key);
            input.push(b'\r');
            assert_eq!(lines(&input), [("echo hi".into(), true)], "{key:#04x}");
        }
        // Ctrl-U after the cursor moved kills only what is before it.
        assert_eq!(lines(b"rm x\x01\x15ls\r"), [("ls".into(), true)]);
        assert_eq!(lines(b"rm x\x15ls\r"), [("ls".into(), false)]);
    }

    fn typed(line: &str) -> Typed {
        Typed {
            line: line.into(),
            inexact: false,
        }
    }

    fn seen(decided: Vec<Decided>) -> Vec<(String, bool)> {
        decided
            .into_iter()
            .map(|d| (d.typed.line, d.echoed))
            .collect()
    }

    #[test]
    fn a_line_the_host_echoed_is_shown_and_one_it_did_not_is_hidden() {
        let mut e = Echoes::default();
        // Typed a key at a time: each key echoed before the Enter.
        e.shown(b"\x1b[01;32muser@web\x1b[00m:~$ ");
        e.shown(b"l");
        e.shown(b"s");
        assert_eq!(seen(e.ended(typed("ls"))), [("ls".into(), true)]);
        // A whole line at once: echoed after its Enter (and coloured by the shell).
        assert_eq!(e.ended(typed("sudo id")), []);
        assert_eq!(
            seen(e.shown(b"\x1b[32msudo\x1b[0m id\r\n[sudo] password for bob: ")),
            [("sudo id".into(), true)]
        );
        // The password: not echoed, then sudo's line break and the command's output.
        assert_eq!(e.ended(typed("hunter2")), []);
        assert_eq!(e.shown(b"\r\nuid=0(root) gid=0(root)\r\n:~$ "), []);
        // Typing on decides it.
        assert_eq!(seen(e.typing()), [("hunter2".into(), false)]);
        // A line typed on before the last was shown waits for it.
        e.typing();
        assert_eq!(e.ended(typed("read -s pw")), []);
        assert_eq!(e.ended(typed("s3cret")), []);
        assert_eq!(
            seen(e.shown(b"read -s pw\r\n")),
            [("read -s pw".into(), true)]
        );
        assert_eq!(seen(e.end()), [("s3cret".into(), false)]);
    }

    #[test]
    fn a_line_typed_ahead_is_shown_when_the_shell_reads_it() {
        let mut e = Echoes::default();
        assert_eq!(e.ended(typed("ls")), []);
        assert_eq!(e.ended(typed("pwd")), []);
        assert_eq!(seen(e.shown(b"ls\r\na b c\r\n$ ")), [("ls".into(), true)]);
        assert_eq!(seen(e.shown(b"pw")), []);
        assert_eq!(seen(e.shown(b"d\r\n/home\r\n")), [("pwd".into(), true)]);
        // Text split by a line break is not an echo; a backspace and a space are dropped.
        assert_eq!(e.ended(typed("ab")), []);
        e.shown(b"a\nb");
        assert_eq!(seen(e.typing()), [("ab".into(), false)]);
        assert_eq!(e.ended(typed("cd")), []);
        assert_eq!(seen(e.shown(b"cdd\x08 \x08\r\n")), [("cd".into(), true)]);
    }

    #[test]
    fn typing_before_the_host_answered_decides_nothing() {
        let mut e = Echoes::default();
        assert_eq!(e.ended(typed("make")), []);
        assert_eq!(e.typing(), []);
        assert_eq!(seen(e.shown(b"make\r\n")), [("make".into(), true)]);
    }

    #[test]
    fn a_line_not_shown_in_a_long_output_is_hidden_and_the_buffer_stays_small() {
        let mut e = Echoes::default();
        assert_eq!(e.ended(typed("secret-value")), []);
        let mut decided = Vec::new();
        for _ in 0..(ECHO_WINDOW / 1000 + 2) {
            decided.extend(e.shown(&[b'x'; 1000]));
        }
        assert_eq!(seen(decided), [("secret-value".into(), false)]);
        for _ in 0..100 {
            e.shown(&[b'y'; 1000]);
        }
        assert!(e.shown.len() <= ECHO_WINDOW + 4096, "{}", e.shown.len());
        // Escape strings (a window title) are no echo either.
        assert_eq!(e.ended(typed("t1tle")), []);
        e.shown(b"\x1b]0;t1tle\x07\x1bPt1tle\x1b\\");
        assert_eq!(seen(e.end()), [("t1tle".into(), false)]);
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
