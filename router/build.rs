fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/generate.proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["../proto/generate.proto"], &["../proto"])?;
    Ok(())
}
