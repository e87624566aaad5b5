// Integration test helpers fail the test on error; clippy's test allowance covers only #[test]
// functions, so allow unwrap/expect/panic for the whole file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `paddock package --zarf` against the real zarf CLI (built from its Go module by
//! `tests/zarf/build.sh`): the generated `zarf.yaml` validates against Zarf v0.84.0's JSON schema,
//! the VirtualMachineApp against paddock's CRD schema, `zarf package create` builds the package in
//! an empty network namespace (so nothing is pulled), `zarf package inspect` shows the component
//! and the image, and the image inside the package has exactly the digest paddock produced.

use std::path::Path;
use std::process::Command;

use paddock_tests::paths::{repository_root, schemas_dir};
use paddock_tests::schema::StructuralSchema;
use paddock_tests::testdisk::test_disk;
use paddock_tests::zarf::require_zarf;

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn zarf_package_create_carries_the_image_paddock_built() {
    let Some(zarf) = require_zarf("zarf_package_create_carries_the_image_paddock_built").unwrap() else {
        return;
    };
    let disk = test_disk().unwrap();
    let work = tempfile::tempdir().unwrap();
    let package_directory = work.path().join("tiny-zarf");
    let reference = "registry.example.com/vms/tiny:1.0";
    let output = Command::new(env!("CARGO_BIN_EXE_paddock"))
        .args([
            "package",
            text(&disk),
            "--name",
            "tiny",
            "--namespace",
            "vms",
            "--image",
            reference,
        ])
        .args(["--zarf", text(&package_directory), "--json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let digest = report["digest"].as_str().unwrap().to_owned();

    // The definition is what Zarf's schema allows.
    let zarf_yaml: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(package_directory.join("zarf.yaml")).unwrap()).unwrap();
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(schemas_dir().join("zarf-v0.84.0-schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&zarf_yaml)
        .map(|error| error.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "zarf.yaml violates the Zarf v0.84.0 schema: {errors:#?}\n{zarf_yaml:#}"
    );
    // A schema check that cannot fail proves nothing: an unknown field must be refused.
    let mut broken = zarf_yaml.clone();
    broken["components"][0]["imageArchive"] = serde_json::json!("typo");
    assert!(
        validator.iter_errors(&broken).next().is_some(),
        "the schema check is live"
    );

    // The VirtualMachineApp is what paddock's CRD accepts.
    let app: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(package_directory.join("manifests/tiny.yaml")).unwrap(),
    )
    .unwrap();
    let crd = StructuralSchema::from_crd_file(
        &repository_root().join("deploy/crds/virtualmachineapps.paddock.dev.yaml"),
        "v1alpha1",
    )
    .unwrap();
    let violations = crd.violations(&app);
    assert!(violations.is_empty(), "{violations:?}\n{app:#}");
    assert_eq!(app["spec"]["image"]["containerDisk"], reference);

    // zarf package create, offline.
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let created = zarf
        .run(
            work.path(),
            &[
                "package",
                "create",
                text(&package_directory),
                "--confirm",
                "--skip-sbom",
                "--output",
                text(&out),
            ],
        )
        .unwrap();
    assert!(created.status.success(), "zarf package create failed");
    let packages: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(packages.len(), 1, "{packages:?}");
    let package = &packages[0];
    assert!(
        text(package).ends_with("zarf-package-tiny-amd64-1.0.tar.zst"),
        "{package:?}"
    );

    // zarf package inspect shows the component and the image.
    let definition = zarf
        .run(work.path(), &["package", "inspect", "definition", text(package)])
        .unwrap();
    assert!(definition.status.success());
    let definition = String::from_utf8_lossy(&definition.stdout);
    assert!(definition.contains("name: tiny"), "{definition}");
    assert!(definition.contains(reference), "{definition}");
    let images = zarf
        .run(work.path(), &["package", "inspect", "images", text(package)])
        .unwrap();
    assert!(images.status.success());
    assert!(String::from_utf8_lossy(&images.stdout).contains(reference));

    // Inside the package, the image has paddock's digest.
    let unpacked = work.path().join("unpacked");
    let decompressed = zarf
        .run(
            work.path(),
            &[
                "tools",
                "archiver",
                "decompress",
                text(package),
                text(&unpacked),
                "--unarchive-all",
            ],
        )
        .unwrap();
    assert!(decompressed.status.success());
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(unpacked.join("images/index.json")).unwrap()).unwrap();
    let digests: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|manifest| manifest["digest"].as_str().unwrap())
        .collect();
    assert!(
        digests.contains(&digest.as_str()),
        "package images {index:#} lack {digest}"
    );
    assert!(unpacked.join("images/blobs/sha256").join(&digest[7..]).is_file());
    let layer = report["images"][0]["layer"]["digest"].as_str().unwrap();
    assert!(
        unpacked.join("images/blobs/sha256").join(&layer[7..]).is_file(),
        "the disk layer is in the package"
    );
}
