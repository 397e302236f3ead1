//! The SSH matcher of a rule: what a channel request is (an exec's parsed command line, a
//! shell, a file transfer, a forward) and what it touches.

use crate::ssh::command::{glob_match, CommandFlag, CommandLine, SimpleCommand};
use crate::ssh::sftp::SftpOp;
use serde::{Deserialize, Serialize};

/// What a client asks a host to do on a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SshRequestKind {
    /// A command (`ssh host CMD`), decided on its parsed command line.
    Exec,
    /// An interactive shell. Commands typed in it are recorded, not decided: a shell is not a
    /// boundary, deny it where that matters.
    Shell,
    /// The SFTP subsystem.
    Sftp,
    /// `scp` (an exec of `scp -t` / `scp -f`), decided on its paths too.
    Scp,
    /// A local forward (`direct-tcpip`: the host connects to `host:port` for the client):
    /// refused unless a rule allows it.
    Forward,
    /// A remote forward (`tcpip-forward`: the host listens on `address:port`, and whoever
    /// connects there reaches the client's side): refused unless a rule allows it. A kind of
    /// its own, so that a rule written for local forwards (`localhost:5432`, the host's own
    /// database) never lets a client take over that port on the host.
    RemoteForward,
    /// Another subsystem.
    Subsystem,
}

/// The SSH part of a rule. Every condition given must hold; inside a list any entry may match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SshMatch {
    pub requests: Vec<SshRequestKind>,
    /// What an exec's command is.
    pub command: CommandMatch,
    /// Globs on the login on the host.
    pub logins: Vec<String>,
    /// Globs on the path a file transfer touches, or `host:port` of a forward (for a remote
    /// forward, the address and port the host listens on).
    pub paths: Vec<String>,
    /// SFTP operations (`open`, `remove`, `rename`, `mkdir`, `set_stat` …), or `modify`: any
    /// operation that may change the file system (writes, removals, renames, attribute
    /// changes, links, and anything unknown).
    pub operations: Vec<String>,
}

/// The conditions on a command of an exec line, shared by SSH and Kubernetes exec rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandMatch {
    /// Globs on a command's program, as written (`/usr/bin/rm`) or its last component (`rm`).
    pub programs: Vec<String>,
    /// Globs on any argument of the command.
    pub args: Vec<String>,
    /// Any of these is set on the command line.
    pub flags: Vec<CommandFlag>,
}

impl CommandMatch {
    /// Whether `command` (one command of `line`) meets every condition given; with
    /// conditions, no command meets them.
    pub fn matches(&self, command: Option<&SimpleCommand>, line: Option<&CommandLine>) -> bool {
        let any = |globs: &[String], text: &str| globs.iter().any(|g| glob_match(g, text));
        (self.programs.is_empty()
            || command.is_some_and(|c| {
                any(&self.programs, &c.program) || any(&self.programs, c.program_name())
            }))
            && (self.args.is_empty()
                || command.is_some_and(|c| c.args.iter().any(|x| any(&self.args, x))))
            && (self.flags.is_empty()
                || line.is_some_and(|line| self.flags.iter().any(|f| line.flags.contains(f))))
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One thing to decide: a command of an exec (each command of a line is decided on its own,
/// with the line's flags), a shell, a transfer path, a forward.
#[derive(Clone, Copy, Debug)]
pub struct SshAction<'a> {
    pub kind: SshRequestKind,
    pub login: &'a str,
    /// One command of an exec line.
    pub command: Option<&'a SimpleCommand>,
    /// The exec line the command is part of (its flags).
    pub line: Option<&'a CommandLine>,
    pub path: Option<&'a str>,
    /// An SFTP request's operation.
    pub operation: Option<&'a SftpOp>,
}

impl SshMatch {
    pub fn matches(&self, a: &SshAction<'_>) -> bool {
        let any = |globs: &[String], text: &str| globs.iter().any(|g| glob_match(g, text));
        (self.requests.is_empty() || self.requests.contains(&a.kind))
            && (self.logins.is_empty() || any(&self.logins, a.login))
            && self.command.matches(a.command, a.line)
            && (self.paths.is_empty() || a.path.is_some_and(|p| any(&self.paths, p)))
            && (self.operations.is_empty()
                || a.operation.is_some_and(|op| {
                    self.operations
                        .iter()
                        .any(|o| o == op.name() || (o == "modify" && op.is_write()))
                }))
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}
