//! What `vigil replay --play` lets reach the operator's terminal. The recorded output of a
//! host or a container is the other side's text: besides drawing, a terminal obeys escape
//! sequences that set the clipboard (OSC 52), open links, change fonts and colours, switch
//! the character encoding, or make the terminal answer on its input (a status or title
//! report, `ENQ`), where the operator's shell reads the answer as typed once the replay ends.
//! [`Screen`] passes the recorded bytes through a VT parser and keeps only what draws: text,
//! the ordinary control characters, and the escape sequences of an allow-list (text
//! attributes, cursor moves, erasing, scrolling, insertion and deletion, tab stops, the
//! alternate screen, character sets, a few modes). Everything else is left out whole and
//! counted. A sequence split across chunks is followed across them.

/// What `vigil replay --play` writes before each of its own lines and at the end: the text
/// attributes, the scroll region, the insert and newline modes, origin mode, autowrap, the
/// cursor, the main screen, the character sets, the keypads and bracketed paste back to their
/// defaults, whatever state the recorded output left the terminal in.
pub const RESET: &str = "\x1b[0m\x1b[r\x1b[4l\x1b[20l\x1b[?6l\x1b[?7h\x1b[?25h\x1b[?1049l\x1b(B\x1b)B\x0f\x1b>\x1b[?1l\x1b[?2004l";

/// The longest escape sequence followed; a longer one is left out (a terminal would not
/// draw anything from it either).
const MAX_SEQUENCE: usize = 256;

/// CSI finals that draw, moved the cursor or edit the screen, with no private marker and no
/// intermediate byte: `@` ICH, `A`–`H` cursor moves, `I` CHT, `J` ED, `K` EL, `L` IL, `M` DL,
/// `P` DCH, `S` SU, `T` SD, `X` ECH, `Z` CBT, `` ` `` HPA, `a` HPR, `d` VPA, `e` VPR, `f` HVP,
/// `g` TBC, `m` SGR, `r` DECSTBM, `s` and `u` save and restore the cursor.
const CSI_FINALS: &[u8] = b"@ABCDEFGHIJKLMPSTXZ`adefgmrsu";

/// Modes `CSI ? … h` / `l` may set: cursor keys, origin, autowrap, blinking and visible
/// cursor, the alternate screen (47, 1047, 1048, 1049) and bracketed paste. Not the mouse or
/// focus reports, which make the terminal write on its input.
const PRIVATE_MODES: &[u32] = &[1, 6, 7, 12, 25, 47, 1047, 1048, 1049, 2004];

/// Modes `CSI … h` / `l` may set: insert (4) and automatic newline (20).
const MODES: &[u32] = &[4, 20];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ground,
    /// After `ESC`.
    Escape,
    /// After `ESC (`, `)`, `*`, `+` (a character set's designation) or `ESC #`.
    EscapeArgument(u8),
    /// In `ESC [ …`, collected in `seq`.
    Csi,
    /// In an OSC, DCS, SOS, PM or APC string, left out up to its terminator; the byte before.
    Text(u8),
    /// `ESC` inside such a string: `\` ends it.
    TextEscape,
}

/// A filter of recorded terminal output; see the module's documentation.
pub struct Screen {
    state: State,
    seq: Vec<u8>,
    /// A UTF-8 character's bytes so far (the lead byte and continuations).
    utf8: Vec<u8>,
    /// Its length as the lead byte says.
    utf8_len: usize,
    /// Escape sequences and control characters left out.
    pub dropped: usize,
}

impl Default for Screen {
    fn default() -> Self {
        Self::new()
    }
}

impl Screen {
    pub fn new() -> Self {
        Self {
            state: State::Ground,
            seq: Vec::new(),
            utf8: Vec::new(),
            utf8_len: 0,
            dropped: 0,
        }
    }

    /// Appends to `out` what of `input` may reach the terminal.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            self.byte(b, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<u8>) {
        match self.state {
            State::Ground => self.ground(b, out),
            State::Escape => self.escape(b, out),
            State::EscapeArgument(first) => {
                let allowed = match first {
                    b'#' => matches!(b, b'3'..=b'8'),
                    b'(' | b')' | b'*' | b'+' => matches!(b, b'0' | b'A' | b'B'),
                    _ => false,
                };
                if allowed {
                    out.extend_from_slice(&[0x1b, first, b]);
                } else {
                    self.dropped += 1;
                }
                self.state = State::Ground;
            }
            State::Csi => {
                self.seq.push(b);
                if (0x40..=0x7e).contains(&b) {
                    if csi_draws(&self.seq) {
                        out.extend_from_slice(b"\x1b[");
                        out.extend_from_slice(&self.seq);
                    } else {
                        self.dropped += 1;
                    }
                    self.seq.clear();
                    self.state = State::Ground;
                } else if !(0x20..=0x3f).contains(&b) || self.seq.len() > MAX_SEQUENCE {
                    // Not a CSI byte (a control character cancels it), or too long.
                    self.dropped += 1;
                    self.seq.clear();
                    self.state = State::Ground;
                    if b == 0x1b {
                        self.state = State::Escape;
                    }
                }
            }
            State::Text(before) => {
                self.state = match b {
                    // BEL, CAN and SUB end it, and so does ST: `ESC \`, U+009C (0xC2 0x9C),
                    // or a byte 0x9C that is no other character's part.
                    0x07 | 0x18 | 0x1a => State::Ground,
                    0x9c if before == 0xc2 || before < 0x80 => State::Ground,
                    0x1b => State::TextEscape,
                    _ => State::Text(b),
                };
            }
            // `ESC \` ends the string; an `ESC` before anything else ends it too (as in the
            // DEC parser a terminal runs), and starts a sequence of its own.
            State::TextEscape => {
                self.state = State::Ground;
                if b != b'\\' {
                    self.escape(b, out);
                }
            }
        }
    }

    fn ground(&mut self, b: u8, out: &mut Vec<u8>) {
        if self.utf8_len > 0 {
            if (0x80..=0xbf).contains(&b) {
                self.utf8.push(b);
                if self.utf8.len() == self.utf8_len {
                    // U+0080–U+009F are the C1 controls (CSI, OSC, DCS … in one character),
                    // which a terminal in UTF-8 mode may obey: left out.
                    if self.utf8 == [0xc2, b] && b <= 0x9f {
                        self.dropped += 1;
                    } else if std::str::from_utf8(&self.utf8).is_ok() {
                        out.extend_from_slice(&self.utf8);
                    } else {
                        // Overlong, a surrogate, past U+10FFFF.
                        out.extend_from_slice("\u{fffd}".as_bytes());
                    }
                    self.utf8.clear();
                    self.utf8_len = 0;
                }
                return;
            }
            // A broken character: what came of it is shown as the terminal shows bad UTF-8,
            // never as a control.
            out.extend_from_slice("\u{fffd}".as_bytes());
            self.utf8.clear();
            self.utf8_len = 0;
        }
        match b {
            0x1b => self.state = State::Escape,
            // BEL, BS, HT, LF, VT, FF, CR, SO, SI.
            0x07..=0x0f => out.push(b),
            0x00..=0x1f => self.dropped += 1,
            0x20..=0x7f => out.push(b),
            0xc2..=0xdf => self.lead(b, 2),
            0xe0..=0xef => self.lead(b, 3),
            0xf0..=0xf4 => self.lead(b, 4),
            // A lone continuation byte or an invalid lead: 0x80–0x9F alone are C1 controls
            // to a terminal in an 8-bit mode.
            _ => out.extend_from_slice("\u{fffd}".as_bytes()),
        }
    }

    fn lead(&mut self, b: u8, len: usize) {
        self.utf8.push(b);
        self.utf8_len = len;
    }

    fn escape(&mut self, b: u8, out: &mut Vec<u8>) {
        self.state = State::Ground;
        match b {
            b'[' => self.state = State::Csi,
            // OSC, DCS, SOS, PM, APC: strings, left out whole.
            b']' | b'P' | b'X' | b'^' | b'_' => {
                self.dropped += 1;
                self.state = State::Text(0);
            }
            // A character set's designation, a line's size, or another sequence with an
            // intermediate byte (`ESC %` leaves UTF-8, after which 8-bit controls work):
            // decided with the byte that ends it.
            0x20..=0x2f => self.state = State::EscapeArgument(b),
            // Save and restore the cursor, index, next line, tab set, reverse index, keypad
            // modes. Not `ESC c`, the full reset (it may clear the scrollback).
            b'7' | b'8' | b'D' | b'E' | b'H' | b'M' | b'=' | b'>' => {
                out.extend_from_slice(&[0x1b, b]);
            }
            0x1b => {
                self.dropped += 1;
                self.state = State::Escape;
            }
            // `ESC Z` (identify: an answer on the input), and anything else.
            _ => self.dropped += 1,
        }
    }
}

/// Whether `CSI seq` (parameters, then the final byte) only draws.
fn csi_draws(seq: &[u8]) -> bool {
    let Some((&last, params)) = seq.split_last() else {
        return false;
    };
    let (private, params) = match params.first() {
        Some(b'?') => (true, &params[1..]),
        Some(b'<' | b'=' | b'>') => return false,
        _ => (false, params),
    };
    // Only digits and separators (and SGR's sub-parameters, `38:2:255:0:0`): no
    // intermediate bytes (`CSI … $ p`, `CSI … SP q` …).
    let separator = |c: u8| c == b';' || c == b':' && last == b'm';
    if !params.iter().all(|c| c.is_ascii_digit() || separator(*c)) {
        return false;
    }
    let numbers = || {
        params
            .split(|c| *c == b';')
            .map(|n| std::str::from_utf8(n).ok()?.parse::<u32>().ok())
    };
    match last {
        b'h' | b'l' => {
            let allowed = if private { PRIVATE_MODES } else { MODES };
            numbers().all(|n| n.is_some_and(|n| allowed.contains(&n)))
        }
        // SGR's parameters are colours and attributes, any of them; the rest take counts and
        // positions. None of them makes the terminal answer.
        _ => !private && CSI_FINALS.contains(&last),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(input: &[u8]) -> (String, usize) {
        let mut s = Screen::new();
        let mut out = Vec::new();
        s.filter(input, &mut out);
        (String::from_utf8(out).unwrap(), s.dropped)
    }

    /// What draws reaches the terminal unchanged: text in any script, colours, cursor moves,
    /// erasing, the alternate screen, line-drawing characters.
    #[test]
    fn what_draws_passes() {
        let drawing = "héllo 世界 🦀\r\n\x1b[1;31mred\x1b[0m\x1b[38:2:255:0:0m \x1b[2J\x1b[H\x1b[10;5H\x1b[K\x1b[?1049h\x1b[?25l\x1b[?25h\x1b[?1049l\x1b(0qqq\x1b(B\x1b7\x1b8\x1bM\t\x08\x07\x1b[3@\x1b[2;20r";
        assert_eq!(shown(drawing.as_bytes()), (drawing.to_string(), 0));
    }

    /// What makes the terminal act beyond drawing, or answer on its input, is left out whole
    /// and counted: the clipboard, hyperlinks, titles, colours of the palette (OSC, ended by
    /// BEL or ST), device status and attribute reports, window reports, DECRQSS (a DCS),
    /// APC/PM/SOS strings, the mouse and focus reports, leaving UTF-8, ENQ, C1 controls as
    /// UTF-8 characters and as lone bytes.
    #[test]
    fn what_acts_or_answers_is_left_out() {
        let cases: &[(&[u8], &str, usize)] = &[
            (b"a\x1b]52;c;cm0gLXJmIH4K\x07b", "ab", 1),
            (
                b"a\x1b]8;;https://evil\x1b\\link\x1b]8;;\x1b\\b",
                "alinkb",
                2,
            ),
            (b"\x1b]0;title\x07\x1b]4;1;rgb:ff/00/00\x1b\\x", "x", 2),
            (b"\x1b[6n\x1b[c\x1b[>c\x1b[21t\x1b[14tx", "x", 5),
            (
                b"\x1bP$qm\x1b\\x\x1b_apc\x1b\\\x1b^pm\x1b\\\x1bXsos\x1b\\",
                "x",
                4,
            ),
            (b"\x1b[?1000h\x1b[?1004h\x1b[?25;1006hx", "x", 3),
            (b"\x1b%@x\x05\x1bZ", "x", 3),
            ("\u{9b}6n\u{9d}52;c;x\u{7}y".as_bytes(), "6n52;c;x\u{7}y", 2),
            (b"\x9b6n", "\u{fffd}6n", 0),
            (b"\xed\xa0\x80\xe0\x80\x80x", "\u{fffd}\u{fffd}x", 0),
            (b"\x1b[1$p\x1b[0 qx", "x", 2),
            // An ESC inside a string ends it: what follows is read (final review, 2026-12-07).
            (
                b"a\x1b]0;t\x1b[31mVISIBLE\r\nmore",
                "a\x1b[31mVISIBLE\r\nmore",
                1,
            ),
            (b"x\x1bP\x1b[1mafter\x1bc", "x\x1b[1mafter", 2),
            ("\x1b]52;c;x\u{9c}y".as_bytes(), "y", 1),
            (b"\x1b]52;c;x\x9cy\x1b P", "y", 2),
        ];
        for (input, text, dropped) in cases {
            assert_eq!(
                shown(input),
                (text.to_string(), *dropped),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    /// A sequence split across chunks is followed across them, as the terminal would.
    #[test]
    fn sequences_are_followed_across_chunks() {
        let input = b"a\x1b]52;c;Zm9v\x07b\x1b[31mc\xc3\xa9";
        for cut in 0..input.len() {
            let mut s = Screen::new();
            let mut out = Vec::new();
            s.filter(&input[..cut], &mut out);
            s.filter(&input[cut..], &mut out);
            assert_eq!(
                (String::from_utf8(out).unwrap(), s.dropped),
                ("ab\x1b[31mcé".to_string(), 1),
                "cut at {cut}"
            );
        }
    }
}
