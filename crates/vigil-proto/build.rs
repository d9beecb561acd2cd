//! Compiles proto/vigil/v1 with protox (pure Rust: no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not when it was compiled: a build script binary
    // reused from another checkout must not compile that checkout's files.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        root.join("vigil/v1/snapshot.proto"),
        root.join("vigil/v1/control.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Shared, not copied: one signed snapshot goes to many streams.
        .bytes(".vigil.v1.Envelope.payload")
        .bytes(".vigil.v1.UpdatePart.payload")
        .compile_fds(fds)?;
    Ok(())
}
