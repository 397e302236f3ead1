//! Arbitrary bytes, in arbitrary chunks and both directions, through the SFTP tracker:
//! errors are fine, panics and unbounded buffering are not.
//!
//! Input: a sequence of chunks, each a header byte and up to 127 bytes of data. The header's
//! top bit picks the direction (set: from the host), the rest is the chunk's length. Unless
//! the first byte is 0, the streams start with a valid INIT and VERSION, so that the fuzzer
//! spends its time past the handshake.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::ssh::sftp::{self, SftpTracker};

const INIT: &[u8] = &[0, 0, 0, 5, 1, 0, 0, 0, 3];
const VERSION: &[u8] = &[0, 0, 0, 5, 2, 0, 0, 0, 3];

fuzz_target!(|data: &[u8]| {
    let mut tracker = SftpTracker::new().with_lookups(data.first() == Some(&1));
    let mut data = data;
    if data.first() != Some(&0) {
        tracker.client_bytes(INIT).expect("INIT is accepted");
        tracker.server_bytes(VERSION).expect("VERSION is accepted");
    } else {
        data = &data[1..];
    }
    let (mut fed, mut returned) = (0usize, 0usize);
    let mut client_failed = false;
    while let Some((&header, rest)) = data.split_first() {
        let len = usize::from(header & 0x7f).min(rest.len());
        let (chunk, tail) = rest.split_at(len);
        data = tail;
        if header & 0x80 != 0 {
            let _ = tracker.server_bytes(chunk);
            continue;
        }
        let Ok(packets) = tracker.client_bytes(chunk) else {
            client_failed = true;
            continue;
        };
        assert!(!client_failed, "a failed tracker stays failed");
        fed += chunk.len();
        for packet in packets {
            returned += packet.raw.len();
            // The gateway refuses some requests and answers them itself.
            if let Some(id) = packet.request.id.filter(|id| id % 3 == 0) {
                let _ = sftp::status_reply(id, sftp::SSH_FX_PERMISSION_DENIED, "refused");
                let _ = tracker.refused(id, sftp::SSH_FX_PERMISSION_DENIED, "refused");
            }
            let _ = (packet.request.op.name(), packet.request.op.is_write());
        }
        // Packets are the client's bytes, never more; at most one packet is held back.
        assert!(returned <= fed);
        assert!(fed - returned <= 4 + sftp::MAX_PACKET);
    }
    let _ = tracker.finish();
});
