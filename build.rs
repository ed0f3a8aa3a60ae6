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

    git_commit();

    let served = protox::compile([proto].iter().chain(&error_details), ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("billing_mode_descriptor.bin"),
        prost::Message::encode_to_vec(&served),
    )?;
    let api = protox::compile([proto], ["proto"])?;
    // serde for every message, in protobuf's JSON mapping (lowerCamelCase
    // names, enums by name, defaults omitted): what grpcurl prints, and what
    // the CLI's --json prints.
    pbjson_build::Builder::new()
        .register_descriptors(&prost::Message::encode_to_vec(&api))?
        .build(&[".molecule.billing.v1"])?;
    tonic_prost_build::configure()
        // Undecodable requests are INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::service::codec::Codec")
        // The one well-known type the API uses, with serde in the JSON
        // mapping above (src/wire/timestamp.rs).
        .extern_path(".google.protobuf.Timestamp", "crate::wire::Timestamp")
        .build_client(true)
        .build_server(true)
        .compile_fds(api)?;
    Ok(())
}

/// `BILLING_MODE_GIT_COMMIT` for the build-info metric: the environment
/// variable of that name when set (container builds have no `.git`), else
/// `git rev-parse`, else `unknown`.
fn git_commit() {
    println!("cargo:rerun-if-env-changed=BILLING_MODE_GIT_COMMIT");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let commit = env::var("BILLING_MODE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    // Rebuild when HEAD moves. Only files that exist are named: a missing
    // one would make cargo rerun this script, and rebuild the crate, every time.
    let mut watched = vec!["HEAD".to_owned()];
    if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(head_ref);
    }
    watched.push("packed-refs".to_owned());
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    println!("cargo:rustc-env=BILLING_MODE_GIT_COMMIT={commit}");
}
