//! The billing-mode authority: decides, for every workspace, who pays for its
//! LLM usage, and builds the environment its container is provisioned with.
//!
//! Layers, dependencies pointing one way: [`service`] → [`domain`],
//! [`service`] → [`store`]; [`store`] knows [`domain`] types; [`domain`]
//! knows neither.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod client;
pub mod config;
pub mod domain;
pub mod feed;
pub mod health;
pub mod import;
pub mod metrics;
pub mod reload;
pub mod service;
pub mod snapshot;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod wire;

#[cfg(test)]
mod registry_doc;

/// Generated protobuf and gRPC code for `molecule.billing.v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("molecule.billing.v1");

    /// The encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("billing_mode_descriptor");
}
