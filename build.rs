//! Generates the ConductorOne protobuf and gRPC code from `proto/`.
//!
//! `protox` parses the `.proto` files in pure Rust, so a fresh `cargo build`
//! needs no `protoc` on the machine; `tonic-prost-build` turns the descriptor
//! set into prost messages and tonic client/server stubs.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/c1/connectorapi/baton/v1/baton.proto",
        "proto/c1/connector/v2/annotation_trait.proto",
        "proto/c1/connector/v2/grant.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
