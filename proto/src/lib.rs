//! Vigil's contracts with the outside world, free of I/O so that a SIEM-side verifier needs
//! nothing else: the audit record ([`record`]), the hash chain that links a stream's records
//! ([`chain`]) and stream verification ([`verify`]).

pub mod chain;
pub mod record;
pub mod verify;
