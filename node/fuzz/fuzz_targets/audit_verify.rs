//! Arbitrary log contents through the record parser and the stream verifier.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_proto::record::Record;
use vigil_proto::verify::Verifier;

fuzz_target!(|data: &[u8]| {
    let mut verifier = Verifier::new();
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        let _ = Record::parse(line);
        let expected = if i % 2 == 0 { Some("s") } else { None };
        verifier.push("fuzz", line, expected);
    }
    let report = verifier.report();
    assert!(report.verified() as usize <= data.len());
});
