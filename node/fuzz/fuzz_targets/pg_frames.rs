//! Client and target bytes through the frame splitter and every message parser: errors are
//! fine, panics and unbounded allocations are not. The frames' bodies, as COPY data, through
//! the look for masks: found in the chunks exactly when found in the whole.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use vigil_node::pg::{codec, messages};
use vigil_node::policy::masking::MaskScan;

const MAX: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let mut startup = BytesMut::from(data);
    if let Ok(Some(packet)) = codec::split_startup(&mut startup, MAX) {
        if packet.len() >= 4 {
            let _ = messages::Startup::parse(&packet[4..]);
        }
    }
    let mut buf = BytesMut::from(data);
    let (mut chunks, mut whole, mut found) = (MaskScan::default(), Vec::new(), false);
    while let Ok(Some(frame)) = codec::split_frame(&mut buf, MAX) {
        let body = frame.body();
        found |= chunks.feed(&body).is_some();
        whole.extend_from_slice(&body);
        let _ = messages::parse_query(&body);
        let _ = messages::parse_parse(&body);
        let _ = messages::parse_bind(&body);
        let _ = messages::parse_execute(&body);
        let _ = messages::parse_target(&body, "Describe");
        let _ = messages::parse_row_description(&body);
        if let Ok(values) = messages::parse_data_row(&body) {
            for v in values.into_iter().flatten() {
                let _ = messages::display_value(v);
            }
        }
        let _ = messages::parse_error_fields(&body);
    }
    found |= chunks.finish().is_some();
    let mut once = MaskScan::default();
    let in_whole = once.feed(&whole).is_some() || once.finish().is_some();
    assert_eq!(found, in_whole, "{whole:?}");
});
