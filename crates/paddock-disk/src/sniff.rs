//! Content sniffing and the safety checks that must run before qemu-img opens a file.
//!
//! Contract: [`sniff`] classifies a file by its first bytes only (compression magic, the tar `ustar`
//! magic, or "a disk for qemu-img to identify") and refuses formats paddock recognises but does not
//! read. [`precheck`] parses the headers of the two formats whose metadata can name other files —
//! qcow2 (backing file, external data file; also encryption) and text vmdk descriptors (extent files)
//! — and refuses them, so qemu-img is never pointed at a file that references a host path. File names
//! are never consulted.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{Compression, Error, Result};

/// How many leading bytes the sniffers look at: enough for the ISO9660 descriptor at 0x8001.
const HEAD_LENGTH: usize = 0x8800;

/// What a file's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sniffed {
    /// A compressed stream.
    Compressed(Compression),
    /// A tar archive (an OVA when it holds an .ovf).
    Tar,
    /// Anything else: a disk image for qemu-img to identify.
    Disk,
}

/// Header facts of a qcow2 image that passed [`precheck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Qcow2Header {
    pub(crate) version: u32,
    pub(crate) cluster_size: u64,
}

/// Reads up to [`HEAD_LENGTH`] leading bytes (fewer for a short file).
pub(crate) fn read_head(path: &Path) -> Result<Vec<u8>> {
    let read_error = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let mut head = Vec::with_capacity(HEAD_LENGTH);
    file.take(HEAD_LENGTH as u64)
        .read_to_end(&mut head)
        .map_err(read_error)?;
    Ok(head)
}

/// Classifies `head` (the first bytes of `path`), refusing inputs paddock knows but does not read.
pub(crate) fn sniff(path: &Path, head: &[u8]) -> Result<Sniffed> {
    // gzip: magic plus the deflate method byte, so a raw disk starting 1f 8b is not mistaken.
    if head.starts_with(&[0x1f, 0x8b, 0x08]) {
        return Ok(Sniffed::Compressed(Compression::Gzip));
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        return Ok(Sniffed::Compressed(Compression::Xz));
    }
    // zstd frame, or a skippable frame (0x184D2A5?) that zstd tools put in front of data.
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || (head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18])
    {
        return Ok(Sniffed::Compressed(Compression::Zstd));
    }
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Ok(Sniffed::Tar);
    }
    let unsupported = |kind, hint| {
        Err(Error::UnsupportedInput {
            path: path.to_path_buf(),
            kind,
            hint,
        })
    };
    if head.len() >= 4 && head.starts_with(b"BZh") && head[3].is_ascii_digit() {
        return unsupported(
            "bzip2-compressed",
            "decompress it first (bunzip2 -k FILE) or recompress it with xz, gzip or zstd",
        );
    }
    if head.starts_with(&[0x04, 0x22, 0x4d, 0x18]) {
        return unsupported(
            "lz4-compressed",
            "decompress it first (lz4 -d FILE) or recompress it with xz, gzip or zstd",
        );
    }
    if head.starts_with(b"PK\x03\x04") {
        return unsupported(
            "a zip archive",
            "extract the disk or OVA from it first (unzip FILE)",
        );
    }
    let text = head.strip_prefix(b"\xef\xbb\xbf").unwrap_or(head);
    let text_start = text
        .iter()
        .position(|byte| !byte.is_ascii_whitespace())
        .unwrap_or(text.len());
    if text[text_start..].starts_with(b"<?xml") || text[text_start..].starts_with(b"<Envelope") {
        return unsupported(
            "an XML file (an OVF descriptor?)",
            "package the OVA, or the disk file the descriptor references",
        );
    }
    Ok(Sniffed::Disk)
}

fn be32(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_be_bytes(word)
}

fn be64(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_be_bytes(word)
}

/// Reads `length` bytes at `offset`, shortened at end of file; lossy UTF-8 for messages.
fn read_string_at(file: &File, offset: u64, length: usize) -> String {
    let mut buffer = vec![0u8; length];
    let mut filled = 0;
    while filled < length {
        match file.read_at(&mut buffer[filled..], offset + filled as u64) {
            Ok(0) | Err(_) => break,
            Ok(read) => filled += read,
        }
    }
    buffer.truncate(filled);
    String::from_utf8_lossy(&buffer).into_owned()
}

const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
/// qcow2 incompatible feature bit: the guest data lives in an external file.
const QCOW2_INCOMPATIBLE_DATA_FILE: u64 = 1 << 2;
/// qcow2 header extension naming the external data file ("DATA").
const QCOW2_EXTENSION_DATA_FILE: u32 = 0x4441_5441;

/// Refuses unsafe qcow2 headers and vmdk descriptors in `path` (whose first bytes are `head`) before
/// qemu-img opens the file. Returns the qcow2 header facts for a qcow2 image.
pub(crate) fn precheck(path: &Path, head: &[u8]) -> Result<Option<Qcow2Header>> {
    if head.starts_with(QCOW2_MAGIC) && head.len() >= 72 {
        return check_qcow2(path, head).map(Some);
    }
    if !head.starts_with(b"KDMV") && !head.starts_with(b"COWD") && is_vmdk_descriptor(head) {
        return Err(Error::VmdkDescriptor {
            path: path.to_path_buf(),
            extents: vmdk_extents(head),
        });
    }
    Ok(None)
}

fn check_qcow2(path: &Path, head: &[u8]) -> Result<Qcow2Header> {
    let file = File::open(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let version = be32(head, 4);
    let backing_offset = be64(head, 8);
    let backing_length = be32(head, 16);
    let cluster_bits = be32(head, 20);
    let crypt_method = be32(head, 32);
    if backing_offset != 0 {
        // qemu caps backing names at 1023 bytes; so does this message.
        let backing = read_string_at(&file, backing_offset, backing_length.min(1023) as usize);
        return Err(Error::BackingFile {
            path: path.to_path_buf(),
            backing,
        });
    }
    if version >= 3 && head.len() >= 104 {
        let incompatible = be64(head, 72);
        if incompatible & QCOW2_INCOMPATIBLE_DATA_FILE != 0 {
            let header_length = u64::from(be32(head, 100));
            return Err(Error::ExternalDataFile {
                path: path.to_path_buf(),
                data_file: qcow2_data_file_name(&file, header_length, cluster_bits),
            });
        }
    }
    if crypt_method != 0 {
        let method = match crypt_method {
            1 => "aes".to_string(),
            2 => "luks".to_string(),
            other => format!("method {other}"),
        };
        return Err(Error::Encrypted {
            path: path.to_path_buf(),
            method,
        });
    }
    Ok(Qcow2Header {
        version,
        cluster_size: 1u64.checked_shl(cluster_bits).unwrap_or(0),
    })
}

/// Walks the qcow2 header extensions (they end before the first cluster) for the data file name.
fn qcow2_data_file_name(file: &File, header_length: u64, cluster_bits: u32) -> String {
    let end = 1u64.checked_shl(cluster_bits.min(21)).unwrap_or(65536);
    let mut offset = header_length;
    for _ in 0..64 {
        if offset + 8 > end {
            break;
        }
        let mut header = [0u8; 8];
        if file.read_exact_at(&mut header, offset).is_err() {
            break;
        }
        let kind = be32(&header, 0);
        let length = u64::from(be32(&header, 4));
        if kind == 0 {
            break;
        }
        if kind == QCOW2_EXTENSION_DATA_FILE {
            return read_string_at(file, offset + 8, length.min(4096) as usize);
        }
        offset += 8 + length.div_ceil(8) * 8;
    }
    "(name not recorded)".to_string()
}

/// True when `head` looks like a text vmdk descriptor the way qemu's vmdk probe sees it: comment and
/// blank lines, then a `version=` line. Slightly broader than qemu (any version, empty lines), so
/// anything qemu would open as a descriptor is caught.
fn is_vmdk_descriptor(head: &[u8]) -> bool {
    let probe = &head[..head.len().min(2048)];
    for line in probe.split(|byte| *byte == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first() == Some(&b'#') || line.iter().all(|byte| *byte == b' ') {
            continue;
        }
        return line.starts_with(b"version=");
    }
    false
}

/// Extent file names listed in a vmdk descriptor (`RW 4192256 SPARSE "disk-s001.vmdk"`).
fn vmdk_extents(head: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(head);
    let extents: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let mut words = line.split_whitespace();
            let access = words.next()?;
            if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
                return None;
            }
            let start = line.find('"')?;
            let end = line[start + 1..].find('"')?;
            Some(line[start + 1..start + 1 + end].to_string())
        })
        .collect();
    if extents.is_empty() {
        vec!["none readable".to_string()]
    } else {
        extents
    }
}

/// True when `head` carries the ISO9660 volume descriptor signature `CD001` at 0x8001.
pub(crate) fn is_iso9660(head: &[u8]) -> bool {
    head.len() >= 0x8006 && &head[0x8001..0x8006] == b"CD001"
}

#[cfg(test)]
mod tests {
    use super::{is_vmdk_descriptor, vmdk_extents};

    #[test]
    fn vmdk_descriptors_are_recognised_like_qemu_does() {
        let descriptor = b"# Disk DescriptorFile\nversion=1\nCID=1\ncreateType=\"twoGbMaxExtentSparse\"\n\n# Extent description\nRW 4192256 SPARSE \"disk-s001.vmdk\"\nRW 4192256 SPARSE \"disk-s002.vmdk\"\n";
        assert!(is_vmdk_descriptor(descriptor));
        assert!(is_vmdk_descriptor(b"  \r\nversion=3\r\n"));
        assert_eq!(vmdk_extents(descriptor), ["disk-s001.vmdk", "disk-s002.vmdk"]);
        assert!(!is_vmdk_descriptor(&[0u8; 512]));
        assert!(!is_vmdk_descriptor(b"\xeb\x63\x90version=1\n"));
    }
}
