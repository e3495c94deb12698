//! Generates the client stubs from the service's `proto/` (one level up) without
//! `protoc`: `protox` parses the files, `tonic-prost-build` writes the message types and
//! the clients. No servers: this crate only calls.

use std::path::Path;

const PROTO_ROOT: &str = "../proto";
const PROTO_FILES: &[&str] = &[
    "../proto/tokenlease/v1/lease.proto",
    "../proto/tokenlease/v1/admin.proto",
    "../proto/tokenlease/v1/events.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    if !Path::new(PROTO_ROOT).is_dir() {
        return Err(format!(
            "{PROTO_ROOT} not found: build this crate inside the tokenlease repository"
        )
        .into());
    }
    let mut compiler = protox::Compiler::new([PROTO_ROOT])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTO_FILES)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
