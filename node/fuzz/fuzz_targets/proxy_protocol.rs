//! Bytes a load balancer (or anyone at its address) sends before the client's: the PROXY
//! protocol v2 parser never panics, a header it accepts lies inside the bytes and within the
//! length limit, every shorter beginning of it asks for more bytes, and the same text as a
//! `node.proxy_protocol_from` entry is parsed or refused without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::core::proxy_protocol::{parse, Balancers, MAX_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, n))) = parse(data) {
        assert!((16..=16 + MAX_PAYLOAD).contains(&n) && n <= data.len());
        for cut in 0..n {
            assert_eq!(parse(&data[..cut]), Ok(None), "a beginning of a header");
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(b) = Balancers::try_from(vec![text.to_string()]) {
            let _ = b.contains(std::net::Ipv4Addr::LOCALHOST.into());
        }
    }
});
