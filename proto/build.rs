//! Generates the `shoal.v1` messages and services from `proto/shoal/v1/shoal.proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/shoal/v1/shoal.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/shoal/v1/shoal.proto"], &["proto"])?;
    Ok(())
}
