//! The library half of the `vigil` CLI: reading audit logs and recordings back and rendering
//! them safely. It is a library so that the fuzz targets (node/fuzz) can drive the same
//! readers an operator runs on logs and recordings they did not write.

pub mod replay;
pub use vigil_node::audit::{asciicast, display, recording, terminal};
