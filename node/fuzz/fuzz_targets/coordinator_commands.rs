//! What a coordinator member decodes from the network, from arbitrary bytes: the Raft log
//! entries members exchange (JSON) and the domain commands inside them, applied to the state
//! machine (which must never panic, must refuse without changing anything, and must report
//! every object it changed, since the store writes only those), and signed checkpoints (which
//! must not verify unless genuinely signed).
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
            let mut changed = Vec::new();
            if state.apply_noting(cmd, &mut changed).is_err() {
                assert_eq!(before, state, "a refused command changed the state");
                assert!(changed.is_empty(), "a refused command reported changes");
            }
            for d in before.differences(&state) {
                assert!(changed.contains(&d), "{d:?} changed unreported");
            }
        }
        if let Ok(cp) = serde_json::from_slice::<Checkpoint>(line) {
            let _ = cp.verify();
        }
    }
});
