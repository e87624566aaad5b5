//! Packages a disk file into an OCI layout and prints the digest and throughput; used for the
//! compression benchmark in issue 3 until `paddock package` exists.
//!
//! Usage: `cargo run --release -p paddock-oci --example package -- DISK OUT_DIR none|gzip|zstd`

use std::path::Path;
use std::time::Instant;

use paddock_oci::{Compression, ImageOptions, NoProgress, build_layout};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, disk, out, compression] = args.as_slice() else {
        return Err("usage: package DISK OUT_DIR none|gzip|zstd".into());
    };
    let compression = match compression.as_str() {
        "none" => Compression::None,
        "gzip" => Compression::Gzip,
        "zstd" => Compression::Zstd,
        other => {
            return Err(format!("unknown compression {other:?}; use none, gzip or zstd").into());
        }
    };
    let opts = ImageOptions {
        compression,
        ..ImageOptions::default()
    };
    let start = Instant::now();
    let img = build_layout(Path::new(disk), Path::new(out), &opts, &mut NoProgress)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:?}: {} bytes -> layer {} bytes in {secs:.2}s ({:.0} MiB/s), manifest {}",
        compression,
        img.source_size,
        img.layer.size,
        img.source_size as f64 / secs / (1024.0 * 1024.0),
        img.manifest.digest
    );
    Ok(())
}
