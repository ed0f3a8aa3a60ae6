//! The decision core: pure values and functions, no I/O.
//!
//! Nothing here knows about gRPC, protobuf or SQL. The service layer parses
//! wire values into these types at the edge; the store loads records into
//! them; [`resolve`] decides the mode and [`build_env`] shapes the
//! provisioning environment from that one decision.

pub mod env;
pub mod record;
pub mod registry;
pub mod resolver;
pub mod types;

pub use env::{build_env, BuiltEnv, CandidateEnv, EnvError, EnvInput};
pub use record::{Change, Patch, Record, Stored};
pub use registry::{Registry, RegistryError, RegistryProblem};
pub use resolver::{resolve, Resolution, Source};
pub use types::{
    CredentialKeys, EnvKey, Instance, Mode, Model, Origin, Reason, Runtime, ValidationError,
    WorkspaceId,
};

#[cfg(test)]
mod tests;
