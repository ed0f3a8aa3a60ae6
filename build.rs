//! Generates the gRPC code and the descriptor set served by reflection.
//!
//! The proto is parsed by `protox`, a pure-Rust compiler, so a fresh machine
//! needs nothing beyond cargo (no `protoc`).

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/molecule/billing/v1/billing_mode.proto";
    // The error detail types every error carries (vendored from googleapis).
    // They are served by reflection, so that reflection clients such as
    // grpcurl can print a status's ErrorInfo and RetryInfo; no code is
    // generated for them (tonic-types has it).
    let error_details = [
        "proto/google/rpc/status.proto",
        "proto/google/rpc/error_details.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds migrations/ at compile time: a new or edited
    // migration must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");

    let served = protox::compile([proto].iter().chain(&error_details), ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("billing_mode_descriptor.bin"),
        prost::Message::encode_to_vec(&served),
    )?;
    tonic_prost_build::configure()
        // Undecodable requests are INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::service::codec::Codec")
        .build_client(true)
        .build_server(true)
        .compile_fds(protox::compile([proto], ["proto"])?)?;
    Ok(())
}
