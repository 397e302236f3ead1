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

impl SshRequestKind {
    /// Whether only a rule that names this kind in its `requests` may allow it (forwards):
    /// the policy's `default` does not apply to it either.
    pub fn by_name(self) -> bool {
        matches!(self, Self::Forward | Self::RemoteForward)
    }
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

impl SshMatch {
    /// Refuses, at load, an SFTP operation that is not one (a rule naming `delete` instead of
    /// `remove` would never match).
    pub(super) fn check(&self) -> Result<(), String> {
        match self
            .operations
            .iter()
            .find(|o| o.as_str() != "modify" && !SftpOp::NAMES.contains(&o.as_str()))
        {
            Some(o) => Err(format!(
                "operations: {o:?} is not an SFTP operation; use `modify` or one of: {}",
                SftpOp::NAMES.join(", ")
            )),
            None => Ok(()),
        }
    }
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

/// The host of a forward in the one spelling rules are matched against (and records hold):
/// lower case, without one trailing dot; an IP address in canonical form (an IPv4-mapped
/// IPv6 address as its IPv4 address). A rule on `127.0.0.1:*` or `localhost:*` must not be
/// passed by `127.1`, `0x7f.1`, `2130706433`, `0177.0.0.1`, `0`, `LOCALHOST`, `localhost.` or
/// `::ffff:127.0.0.1`, which the host's resolver (glibc's `inet_aton`, then DNS) takes for
/// the same address. A numeric IPv4 spelling other than the canonical dotted quad is refused
/// rather than converted (what `inet_aton` makes of it is the host's C library's business),
/// and so is anything that is neither an IP address nor made of the characters of a host name
/// (letters, digits, `.`, `-`, `_`). An empty host (a remote forward on every address) and
/// `*` stay as they are. The error says why, for the client and the record.
pub fn forward_host(host: &str) -> Result<String, String> {
    let lower = host.to_ascii_lowercase();
    let host = lower.strip_suffix('.').unwrap_or(&lower);
    if host.is_empty() || host == "*" {
        return Ok(host.to_string());
    }
    if let Ok(v6) = host.parse::<std::net::Ipv6Addr>() {
        return Ok(match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        });
    }
    let numeric = host.split('.').all(|part| {
        let digits = part
            .strip_prefix("0x")
            .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .is_some();
        digits || (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    });
    if numeric {
        return match host.parse::<std::net::Ipv4Addr>() {
            // Rust reads only the canonical dotted quad (no leading zeros).
            Ok(v4) if v4.to_string() == host => Ok(host.to_string()),
            _ => Err(format!(
                "the host {host:?} is a numeric address not written as a dotted quad (a.b.c.d, decimal, no leading zeros); write it so"
            )),
        };
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        return Err(format!(
            "the host {host:?} is neither an IP address nor a host name"
        ));
    }
    Ok(host.to_string())
}

/// The host a local forward (`direct-tcpip`) connects to, as [`forward_host`] decides it, but
/// never an empty host, `*` or an unspecified address (`0.0.0.0`, `::`): connecting there
/// reaches the host itself, past a rule on `127.0.0.1:*` or `localhost:*`.
pub fn connect_host(host: &str) -> Result<String, String> {
    let decided = forward_host(host)?;
    let unspecified = decided.is_empty()
        || decided == "*"
        || decided
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified());
    if unspecified {
        return Err(format!(
            "the host {host:?} names no one address (a connection to it reaches the host itself); name the address"
        ));
    }
    Ok(decided)
}

#[cfg(test)]
mod tests {
    use super::{connect_host, forward_host};

    #[test]
    fn a_local_forward_connects_to_one_address() {
        for host in [
            "0.0.0.0",
            "::",
            "0:0:0:0:0:0:0:0",
            "",
            ".",
            "*",
            "::ffff:0.0.0.0",
        ] {
            let refused = connect_host(host);
            assert!(refused.is_err(), "{host:?}: {refused:?}");
        }
        assert_eq!(connect_host("LocalHost.").as_deref(), Ok("localhost"));
        assert_eq!(connect_host("10.0.0.1").as_deref(), Ok("10.0.0.1"));
    }

    #[test]
    fn forward_hosts_are_decided_in_one_spelling() {
        for (host, want) in [
            ("127.0.0.1", "127.0.0.1"),
            ("127.0.0.1.", "127.0.0.1"),
            ("LOCALHOST", "localhost"),
            ("localhost.", "localhost"),
            ("Db.Internal.", "db.internal"),
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("::FFFF:7f00:1", "127.0.0.1"),
            ("0:0:0:0:0:0:0:1", "::1"),
            ("::1", "::1"),
            ("", ""),
            ("*", "*"),
            ("0.0.0.0", "0.0.0.0"),
            ("cafe.de", "cafe.de"),
            ("1e5", "1e5"),
            ("web-1_a", "web-1_a"),
        ] {
            assert_eq!(forward_host(host).as_deref(), Ok(want), "{host}");
        }
        for host in [
            "127.1",
            "0x7f.1",
            "0X7F.0.0.1",
            "2130706433",
            "0177.0.0.1",
            "127.000.0.1",
            "0",
            "0x",
            "1.2.3.4.5",
            "999.1.1.1",
            "127.0.0.1 ",
            "fe80::1%eth0",
            "[::1]",
            "a b",
        ] {
            let refused = forward_host(host);
            assert!(refused.is_err(), "{host}: {refused:?}");
        }
    }
}
