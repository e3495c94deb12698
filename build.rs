//! Generates the gRPC code from `proto/` without `protoc`: `protox` parses the files
//! (keeping comments, so reflection clients see the documentation) and
//! `tonic-prost-build` writes the Rust types and service traits.

use std::{env, fs, path::PathBuf};

const PROTO_FILES: &[&str] = &[
    "proto/tokenlease/v1/lease.proto",
    "proto/tokenlease/v1/admin.proto",
    "proto/tokenlease/v1/events.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    // `sqlx::migrate!()` embeds migrations/ at build time: rebuild when one is added.
    println!("cargo:rerun-if-changed=migrations");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTO_FILES)?;

    fs::write(
        out_dir.join("tokenlease_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Parse errors answer INVALID_ARGUMENT (see src/grpc/codec.rs).
        .codec_path("crate::grpc::codec::Codec")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
