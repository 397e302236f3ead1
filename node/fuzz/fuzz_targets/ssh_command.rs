//! Arbitrary text through the SSH exec command-line parser: errors are fine, panics, stack
//! overflows and runaway time or memory are not, however deep or long the line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::ssh::command;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    if let Ok(parsed) = command::parse(line) {
        let words: usize = parsed
            .commands
            .iter()
            .map(|c| {
                // The name a policy compares is a suffix of the program as written.
                assert!(c.program.ends_with(c.program_name()));
                1 + c.args.len() + c.assignments.len()
            })
            .sum();
        assert!(words <= command::MAX_WORDS);
    }
    // Any text matches itself once every character is escaped, and `*` matches anything.
    let escaped: String = line.chars().flat_map(|c| ['\\', c]).collect();
    assert!(command::glob_match(&escaped, line));
    assert!(command::glob_match("*", line));
    let _ = command::glob_match(line, "authorized_keys");
});
