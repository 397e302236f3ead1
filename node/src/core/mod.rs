//! What every protocol server shares: the refusal model (and, as protocols arrive, the
//! services a protocol server is given).

pub mod refusal;

pub use refusal::Refusal;
