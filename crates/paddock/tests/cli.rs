//! The `paddock` binary as a user runs it: exit codes, output and error messages.

// Helpers outside #[test] functions may fail loudly too; clippy's in-test allowance does not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

fn paddock(arguments: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_paddock"))
        .args(arguments)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn example() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/debian.yaml")).unwrap()
}

#[test]
fn crd_prints_the_committed_crd() {
    let output = paddock(&["crd"], "");
    assert!(output.status.success());
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/crds/virtualmachineapps.paddock.dev.yaml"
    ))
    .unwrap();
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        committed,
        "deploy/crds/virtualmachineapps.paddock.dev.yaml drifted: regenerate it with \
         `cargo run -p paddock -- crd > deploy/crds/virtualmachineapps.paddock.dev.yaml`"
    );
}

#[test]
fn validate_accepts_the_example_and_lists_every_problem_of_a_bad_manifest() {
    let output = paddock(&["validate", "-f", "-"], &example());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8(output.stdout).unwrap(), "debian: valid\n");

    let bad = "apiVersion: paddock.dev/v1alpha1\nkind: VirtualMachineApp\nmetadata: {name: x}\nspec: {image: {}, resources: {cpu: 0}}\n";
    let output = paddock(&["validate", "-f", "-"], bad);
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("spec.image: no image source is set"), "{stderr}");
    assert!(
        stderr.contains("spec.resources.cpu: 0 cores is out of range"),
        "{stderr}"
    );
}

#[test]
fn a_file_that_is_not_a_manifest_says_what_was_expected() {
    let output = paddock(&["validate", "-f", "-"], "hello: world\n");
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("is not a VirtualMachineApp (apiVersion: paddock.dev/v1alpha1"),
        "{stderr}"
    );
    let output = paddock(&["validate", "-f", "/nonexistent/app.yaml"], "");
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("cannot read the manifest /nonexistent/app.yaml")
    );
}

#[test]
fn render_prints_the_objects_the_operator_creates() {
    let output = paddock(
        &[
            "render",
            "-f",
            "-",
            "--zarf-registry",
            "127.0.0.1:31999",
            "--baffles",
        ],
        &example(),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let kinds: Vec<String> = stdout
        .split("---\n")
        .map(|document| {
            serde_yaml::from_str::<serde_json::Value>(document).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(kinds, ["DataVolume", "VirtualMachine", "BafflesApplication"]);
    assert!(stdout.contains("pullMethod: node"));
    assert!(stdout.contains("runStrategy: Always"));
}
