//! What a coordinator member decodes from the network, from arbitrary bytes: the Raft log
//! entries members exchange (JSON) and the domain commands inside them, applied to the state
//! machine (which must never panic, and must refuse without changing anything), and signed
//! checkpoints (which must not verify unless genuinely signed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_coordinator::approvals::{Command, State};
use vigil_coordinator::store::TypeConfig;
use vigil_proto::checkpoint::Checkpoint;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<openraft::Entry<TypeConfig>>(data);
    let _ = serde_json::from_slice::<openraft::raft::AppendEntriesRequest<TypeConfig>>(data);
    let mut state = State::default();
    for line in data.split(|&b| b == b'\n') {
        if let Ok(cmd) = serde_json::from_slice::<Command>(line) {
            let before = state.clone();
            if state.apply(cmd).is_err() {
                assert_eq!(before, state, "a refused command changed the state");
            }
        }
        if let Ok(cp) = serde_json::from_slice::<Checkpoint>(line) {
            let _ = cp.verify();
        }
    }
});
