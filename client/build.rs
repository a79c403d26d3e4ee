fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/generate.proto");
    // A vendored protoc, so a build needs no system package. prost reads $PROTOC.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["../proto/generate.proto"], &["../proto"])?;
    Ok(())
}
