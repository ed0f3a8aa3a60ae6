//! The wire: the one place proto names meet domain values. The server's
//! handlers and the operator CLI both convert through it.

pub mod convert;
pub mod names;
pub mod timestamp;

pub use timestamp::Timestamp;
