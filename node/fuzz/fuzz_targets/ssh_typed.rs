//! Arbitrary keystrokes and host output through the reading of lines typed into a shell
//! (`ssh::typed`): the keystrokes become lines, the host's output (escape sequences and all)
//! decides which were echoed. Each byte of the input says whether the next bytes (up to 15)
//! are keystrokes or output. Panics are not fine, and neither is a line lost, a line out of
//! order, or a line taken as echoed whose text the host never showed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::ssh::typed::{Decided, Echoes, TypedLines};

fuzz_target!(|data: &[u8]| {
    let mut lines = TypedLines::default();
    let mut echoes = Echoes::default();
    let (mut ended, mut decided): (Vec<String>, Vec<Decided>) = (Vec::new(), Vec::new());
    let mut output = Vec::new();
    let mut rest = data;
    while let Some((&head, tail)) = rest.split_first() {
        let (chunk, after) = tail.split_at(usize::from(head & 0x0f).min(tail.len()));
        if head & 0x80 == 0 {
            decided.extend(echoes.typing());
            for line in lines.feed(chunk) {
                ended.push(line.line.clone());
                decided.extend(echoes.ended(line));
            }
        } else {
            output.extend_from_slice(chunk);
            decided.extend(echoes.shown(chunk));
        }
        rest = after;
    }
    decided.extend(echoes.end());
    let order: Vec<&String> = decided.iter().map(|d| &d.typed.line).collect();
    assert_eq!(order, ended.iter().collect::<Vec<_>>(), "every line, in order");
    // The host's output with its escape sequences and controls taken out holds the text of
    // a line taken as echoed: so the raw output holds it as a subsequence.
    for d in decided.iter().filter(|d| d.echoed) {
        let mut shown = output.iter();
        assert!(
            d.typed.line.bytes().all(|b| shown.any(|&o| o == b)),
            "{:?} taken as echoed, never shown",
            d.typed.line
        );
    }
});
