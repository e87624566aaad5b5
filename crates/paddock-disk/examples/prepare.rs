//! Prepares one disk and prints what was found and how long each stage took; used to measure.
//!
//! `cargo run --release -p paddock-disk --example prepare -- INPUT [keep|raw|qcow2|qcow2c] [WORK_DIR]`

use std::path::PathBuf;
use std::time::Instant;

use paddock_disk::{OutputFormat, PrepareOptions, Stage, prepare};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let input = PathBuf::from(
        args.next()
            .ok_or("usage: prepare INPUT [keep|raw|qcow2|qcow2c] [WORK_DIR]")?,
    );
    let output = match args.next().as_deref() {
        None | Some("qcow2") => OutputFormat::Qcow2 { compressed: false },
        Some("qcow2c") => OutputFormat::Qcow2 { compressed: true },
        Some("raw") => OutputFormat::Raw,
        Some("keep") => OutputFormat::Keep,
        Some(other) => return Err(format!("unknown output {other:?}").into()),
    };
    let options = PrepareOptions {
        output,
        work_dir: args.next().map(PathBuf::from),
        ..PrepareOptions::default()
    };
    let started = Instant::now();
    let mut stage_started: Option<(Stage, Instant)> = None;
    let prepared = prepare(&input, &options, &mut |stage: Stage, done: u64, total: u64| {
        if done == 0 {
            stage_started = Some((stage, Instant::now()));
        } else if done == total
            && let Some((started_stage, at)) = stage_started.take()
            && started_stage == stage
        {
            eprintln!("{stage}: {:.2} s", at.elapsed().as_secs_f64());
        }
    })?;
    println!("detected:       {}", prepared.detected);
    println!(
        "output:         {} ({}, {:?}, passed through: {})",
        prepared.path.display(),
        prepared.format,
        prepared.media,
        prepared.passed_through
    );
    println!("virtual size:   {}", prepared.virtual_size);
    if let Some(hints) = &prepared.ovf {
        println!("ovf:            {hints:?}");
    }
    for warning in &prepared.warnings {
        println!("warning:        {warning}");
    }
    println!("total:          {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}
