//! Arbitrary recorded output, cut into chunks at arbitrary places, through what `vigil replay
//! --play` gives the operator's terminal (`audit::screen`). Panics are not fine, and neither is
//! output that is not UTF-8, output whose reading depends on where the chunks were cut, or
//! output that would itself lose anything when filtered again (what passes is only what draws).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::audit::screen::Screen;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(data.len());
    let (mut whole, mut parts) = (Vec::new(), Vec::new());
    Screen::new().filter(data, &mut whole);
    let mut screen = Screen::new();
    screen.filter(&data[..cut], &mut parts);
    screen.filter(&data[cut..], &mut parts);
    assert_eq!(whole, parts, "the cut changed the output");
    // A character broken at the very end waits for its next byte; with none, it is not shown.
    assert!(std::str::from_utf8(&whole).is_ok(), "{whole:?}");
    let mut again = Screen::new();
    let mut twice = Vec::new();
    again.filter(&whole, &mut twice);
    assert_eq!(again.dropped, 0, "{whole:?}");
    assert_eq!(twice, whole);
});
