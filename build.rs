//! Compiles proto/ with protox (pure Rust, no `protoc` on the machine) and
//! generates the tonic client and server code from the descriptor set.

use prost::Message;
use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/porthole/v1/ports.proto",
    "proto/porthole/v1/relay.proto",
    "proto/porthole/v1/tunnels.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("porthole_descriptor.bin"), fds.encode_to_vec())?;
    // Relay data frames are handed on without copying.
    tonic_prost_build::configure()
        .bytes(".porthole.v1.RelayFrame")
        .compile_fds(fds)?;
    Ok(())
}
