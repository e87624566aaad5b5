// Integration tests use unwrap/expect/panic in helpers too; clippy's test allowance only covers
// #[test] functions, so allow them for the whole file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! End-to-end checks of containerDisk images with real tools: qemu-img makes the input disk, the
//! `tar` crate reads the layer back, and skopeo must accept the layout and the archive.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use paddock_oci::{
    BuiltImage, Compression, ImageOptions, NoProgress, Platform, PlatformDisk, build_index_layout,
    build_layout, write_archive,
};
use sha2::{Digest, Sha256};

const ALL: [Compression; 3] = [Compression::None, Compression::Gzip, Compression::Zstd];

fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let mut s = String::from("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn qcow2(dir: &Path) -> PathBuf {
    let p = dir.join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("64M")
        .output()
        .expect("qemu-img must be installed (hack/test.sh installs it)");
    assert!(out.status.success(), "qemu-img failed: {out:?}");
    p
}

fn raw(dir: &Path) -> PathBuf {
    let p = dir.join("disk.raw");
    // Non-trivial, non-repeating content so compression and hashing see real data.
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 17u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&p, data).unwrap();
    p
}

fn opts(c: Compression) -> ImageOptions {
    ImageOptions {
        tag: "v1".into(),
        compression: c,
        default_instancetype: Some("u1.small".into()),
        default_preference: Some("fedora".into()),
        ..ImageOptions::default()
    }
}

fn blob(img: &BuiltImage, digest: &str) -> Vec<u8> {
    fs::read(
        img.layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .unwrap()
}

fn decompressed_layer(img: &BuiltImage, c: Compression) -> Vec<u8> {
    let raw = blob(img, &img.layer.digest);
    let mut out = Vec::new();
    match c {
        Compression::None => out = raw,
        Compression::Gzip => {
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_end(&mut out)
                .unwrap();
        }
        Compression::Zstd => out = zstd::decode_all(&raw[..]).unwrap(),
    }
    out
}

fn check_layer(img: &BuiltImage, c: Compression, disk: &Path) {
    let layer_blob = blob(img, &img.layer.digest);
    assert_eq!(sha256_hex(&layer_blob), img.layer.digest);
    assert_eq!(layer_blob.len() as u64, img.layer.size);
    assert_eq!(img.layer.media_type, c.media_type());
    let tar_bytes = decompressed_layer(img, c);
    assert_eq!(sha256_hex(&tar_bytes), img.diff_id, "diffID is sha256 of the tar");
    let disk_bytes = fs::read(disk).unwrap();
    assert_eq!(sha256_hex(&disk_bytes), img.source_digest);

    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let mut seen = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        assert_eq!(h.uid().unwrap(), 107, "{path} uid");
        assert_eq!(h.gid().unwrap(), 107, "{path} gid");
        assert_eq!(h.mtime().unwrap(), 0, "{path} mtime");
        assert!(h.username().unwrap().unwrap_or("").is_empty(), "{path} uname");
        assert!(h.groupname().unwrap().unwrap_or("").is_empty(), "{path} gname");
        match path.as_str() {
            "disk/" => {
                assert!(h.entry_type().is_dir());
                assert_eq!(h.mode().unwrap() & 0o7777, 0o555);
            }
            "disk/disk.img" => {
                assert!(h.entry_type().is_file());
                assert_eq!(h.mode().unwrap() & 0o7777, 0o444);
                let mut content = Vec::new();
                e.read_to_end(&mut content).unwrap();
                assert!(content == disk_bytes, "disk.img content differs from input");
            }
            other => panic!("unexpected layer entry {other}"),
        }
        seen.push(path);
    }
    assert_eq!(seen, ["disk/", "disk/disk.img"]);

    let config: serde_json::Value = serde_json::from_slice(&blob(img, &img.config.digest)).unwrap();
    assert_eq!(config["architecture"], img.platform.architecture.as_str());
    assert_eq!(config["os"], "linux");
    assert_eq!(config["rootfs"]["diff_ids"][0], img.diff_id.as_str());
    assert_eq!(
        config["config"]["Labels"]["dev.paddock.source.digest"],
        img.source_digest.as_str()
    );
    assert_eq!(
        config["config"]["Env"],
        serde_json::json!([
            "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small",
            "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE=fedora"
        ])
    );
    assert!(config.get("created").is_none());

    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(img.layout.join("index.json")).unwrap()).unwrap();
    if index["manifests"][0]["mediaType"] == "application/vnd.oci.image.index.v1+json" {
        return; // part of a multi-platform image; the caller checks the index
    }
    assert_eq!(index["manifests"][0]["digest"], img.manifest.digest.as_str());
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "v1"
    );
    // Nothing but the three blobs (no leftover temp files).
    assert_eq!(fs::read_dir(img.layout.join("blobs/sha256")).unwrap().count(), 3);
}

/// Returns false (after a loud SKIP line) when skopeo is missing and PADDOCK_ALLOW_SKIP=1.
fn skopeo_available() -> bool {
    if Command::new("skopeo").arg("--version").output().is_ok() {
        return true;
    }
    if std::env::var("PADDOCK_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("!!!!! SKIP: skopeo not installed; skopeo cross-checks NOT run (PADDOCK_ALLOW_SKIP=1)");
        return false;
    }
    panic!("skopeo is not installed; install it (apt-get install skopeo) or set PADDOCK_ALLOW_SKIP=1");
}

fn skopeo(dir: &Path, args: &[&str]) -> String {
    // Our own permissive policy: hosts may lack /etc/containers/policy.json.
    let policy = dir.join("policy.json");
    fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
    let out = Command::new("skopeo")
        .arg("--policy")
        .arg(&policy)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn skopeo_check(img: &BuiltImage, work: &Path) {
    let reference = format!("oci:{}:{}", img.layout.display(), img.tag);
    let inspect: serde_json::Value = serde_json::from_str(&skopeo(work, &["inspect", &reference])).unwrap();
    assert_eq!(inspect["Digest"], img.manifest.digest.as_str());
    assert_eq!(inspect["Layers"], serde_json::json!([img.layer.digest]));
    assert_eq!(inspect["Architecture"], "amd64");
    let copy_dir = work.join(format!("copy-{}", &img.manifest.digest[7..19]));
    skopeo(
        work,
        &["copy", &reference, &format!("dir:{}", copy_dir.display())],
    );
    // dir: keeps blobs as-is, so the layer file must be byte-identical.
    let copied = fs::read(copy_dir.join(&img.layer.digest[7..])).unwrap();
    assert_eq!(sha256_hex(&copied), img.layer.digest);

    let archive = work.join(format!("image-{}.tar", &img.manifest.digest[7..19]));
    write_archive(&img.layout, &archive).unwrap();
    let inspect: serde_json::Value = serde_json::from_str(&skopeo(
        work,
        &[
            "inspect",
            &format!("oci-archive:{}:{}", archive.display(), img.tag),
        ],
    ))
    .unwrap();
    assert_eq!(inspect["Layers"], serde_json::json!([img.layer.digest]));
}

#[test]
fn qcow2_and_raw_every_compression() {
    let work = tempfile::tempdir().unwrap();
    let inputs = [qcow2(work.path()), raw(work.path())];
    let with_skopeo = skopeo_available();
    for disk in &inputs {
        for c in ALL {
            let name = format!("{}-{c:?}", disk.file_name().unwrap().to_string_lossy());
            let mut seen = 0u64;
            let mut progress = |n: u64| seen += n;
            let a = build_layout(
                disk,
                &work.path().join(format!("{name}-a")),
                &opts(c),
                &mut progress,
            )
            .unwrap();
            assert_eq!(
                seen,
                fs::metadata(disk).unwrap().len(),
                "progress covers the disk"
            );
            let b = build_layout(
                disk,
                &work.path().join(format!("{name}-b")),
                &opts(c),
                &mut NoProgress,
            )
            .unwrap();
            assert_eq!(a.manifest.digest, b.manifest.digest, "{name}: deterministic");
            assert_eq!(a.layer.digest, b.layer.digest);
            check_layer(&a, c, disk);
            // Same archive bytes from identical layouts.
            let (ta, tb) = (
                work.path().join(format!("{name}-a.tar")),
                work.path().join(format!("{name}-b.tar")),
            );
            write_archive(&a.layout, &ta).unwrap();
            write_archive(&b.layout, &tb).unwrap();
            assert!(
                fs::read(&ta).unwrap() == fs::read(&tb).unwrap(),
                "{name}: archive deterministic"
            );
            if with_skopeo {
                skopeo_check(&a, work.path());
            }
        }
    }
}

#[test]
fn compressed_output_independent_of_thread_count() {
    let work = tempfile::tempdir().unwrap();
    let disk = raw(work.path());
    for compression in [Compression::Zstd, Compression::Gzip] {
        let mut digests = Vec::new();
        for threads in [1, 4] {
            let o = ImageOptions {
                compression_threads: threads,
                ..opts(compression)
            };
            let img = build_layout(
                &disk,
                &work.path().join(format!("{compression:?}-{threads}")),
                &o,
                &mut NoProgress,
            )
            .unwrap();
            digests.push(img.layer.digest);
        }
        assert_eq!(digests[0], digests[1], "{compression:?}");
    }
}

#[test]
fn refuses_existing_destination_and_bad_input() {
    let work = tempfile::tempdir().unwrap();
    let disk = raw(work.path());
    let dest = work.path().join("out");
    fs::create_dir(&dest).unwrap();
    let err = build_layout(&disk, &dest, &opts(Compression::None), &mut NoProgress).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    let err = build_layout(
        &work.path().join("missing.qcow2"),
        &work.path().join("out2"),
        &opts(Compression::None),
        &mut NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("cannot read disk image"), "{err}");
    // A failed build leaves nothing behind: no output and no temp directory.
    let leftovers: Vec<_> = fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".paddock-oci-") || n == "out2")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let err = build_layout(
        &disk,
        &work.path().join("out3"),
        &ImageOptions {
            tag: "-bad/tag".into(),
            ..opts(Compression::None)
        },
        &mut NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("invalid tag"), "{err}");
}

#[test]
fn multi_platform_index_with_full_reference() {
    let work = tempfile::tempdir().unwrap();
    let amd64_disk = raw(work.path());
    let arm64_disk = qcow2(work.path());
    let reference = "registry.example:5000/vms/tiny:1.0";
    let options = ImageOptions {
        tag: "1.0".into(),
        reference: Some(reference.into()),
        ..opts(Compression::Zstd)
    };
    let disks = [
        PlatformDisk {
            disk: amd64_disk.clone(),
            platform: Platform::parse("linux/amd64").unwrap(),
        },
        PlatformDisk {
            disk: arm64_disk.clone(),
            platform: Platform::parse("linux/arm64/v8").unwrap(),
        },
    ];
    let built = build_index_layout(&disks, &work.path().join("multi"), &options, &mut NoProgress).unwrap();
    let again = build_index_layout(
        &disks,
        &work.path().join("multi-again"),
        &options,
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(built.index.digest, again.index.digest, "deterministic index");

    // index.json names the image index by the full reference, the way Zarf and containerd read it.
    let top: serde_json::Value =
        serde_json::from_slice(&fs::read(built.layout.join("index.json")).unwrap()).unwrap();
    let entry = &top["manifests"][0];
    assert_eq!(entry["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        reference
    );
    assert_eq!(entry["annotations"]["io.containerd.image.name"], reference);

    let index: serde_json::Value = serde_json::from_slice(
        &fs::read(built.layout.join("blobs/sha256").join(&built.index.digest[7..])).unwrap(),
    )
    .unwrap();
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let p = &m["platform"];
            format!("{}/{}/{}", p["os"], p["architecture"], p["variant"]).replace('"', "")
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64/null", "linux/arm64/v8"]);
    for (image, disk) in built.images.iter().zip([&amd64_disk, &arm64_disk]) {
        check_layer(image, Compression::Zstd, disk);
        let config: serde_json::Value = serde_json::from_slice(
            &fs::read(built.layout.join("blobs/sha256").join(&image.config.digest[7..])).unwrap(),
        )
        .unwrap();
        assert_eq!(config["architecture"], image.platform.architecture.as_str());
    }

    if skopeo_available() {
        // skopeo resolves the index to the platform asked for.
        for (arch, image) in [("amd64", &built.images[0]), ("arm64", &built.images[1])] {
            let inspect: serde_json::Value = serde_json::from_str(&skopeo(
                work.path(),
                &[
                    "--override-arch",
                    arch,
                    "inspect",
                    &format!("oci:{}:{reference}", built.layout.display()),
                ],
            ))
            .unwrap();
            // Digest is the tag's (the index's); the layers are the chosen platform's.
            assert_eq!(inspect["Digest"], built.index.digest.as_str(), "{arch}");
            assert_eq!(
                inspect["Layers"],
                serde_json::json!([image.layer.digest]),
                "{arch}"
            );
            assert_eq!(inspect["Architecture"], arch);
        }
    }
}

#[test]
fn platform_parsing_refuses_what_kubevirt_cannot_run() {
    assert_eq!(
        Platform::parse("linux/arm64/v8").unwrap().to_string(),
        "linux/arm64/v8"
    );
    for (text, expected) in [
        ("windows/amd64", "always linux"),
        ("linux/riscv64", "KubeVirt runs VMs on"),
        ("amd64", "expected os/architecture"),
        ("linux/arm64/", "variant"),
    ] {
        let error = Platform::parse(text).unwrap_err().to_string();
        assert!(error.contains(expected), "{text}: {error}");
    }
    let work = tempfile::tempdir().unwrap();
    let disk = raw(work.path());
    let twice = [
        PlatformDisk {
            disk: disk.clone(),
            platform: Platform::default(),
        },
        PlatformDisk {
            disk,
            platform: Platform::default(),
        },
    ];
    let error = build_index_layout(
        &twice,
        &work.path().join("x"),
        &opts(Compression::None),
        &mut NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("given twice"), "{error}");
}
