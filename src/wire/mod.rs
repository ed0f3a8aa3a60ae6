//! The wire: where proto names meet domain values. The server's handlers
//! convert requests and answers here.

pub mod convert;
