//! The dev cluster's test kubelet (deploy/dev/kube/kubelet): its exec log, one JSON line per
//! exec, attach and port-forward it ran and per log request it answered (the ground truth of
//! what reached the pod), and the container log it serves to `kubectl logs`.

use crate::env;
use std::io::Write as _;

/// The exec log's length in bytes: what [`exec_log_since`] reads after.
pub fn exec_log_len() -> u64 {
    std::fs::metadata(env().get("VIGIL_DEV_KUBE_EXEC_LOG"))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// The exec log's entries after byte `offset`.
pub fn exec_log_since(offset: u64) -> Vec<serde_json::Value> {
    let bytes =
        std::fs::read(env().get("VIGIL_DEV_KUBE_EXEC_LOG")).expect("the kubelet's exec log");
    let start = (offset as usize).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..])
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The kubelet's one exec entry of `sh -c SCRIPT` (it ran exactly once: asserted).
pub fn ran_once(script: &str) -> serde_json::Value {
    let mut ran: Vec<_> = exec_log_since(0)
        .into_iter()
        .filter(|e| e["kind"] == "exec" && e["command"][2] == script)
        .collect();
    assert_eq!(ran.len(), 1, "the kubelet ran it once: {ran:?}");
    ran.remove(0)
}

/// Appends `line` and a newline to the container log (what `kubectl logs -f` follows).
pub fn append_container_log(line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(env().get("VIGIL_DEV_KUBE_CONTAINER_LOG"))
        .expect("the container log (deploy/dev/kube.sh start makes it)");
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}
