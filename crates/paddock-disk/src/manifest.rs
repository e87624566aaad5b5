//! OVA manifests (`.mf`): the checksums an exporter (VMware ovftool, VirtualBox, vSphere) writes
//! next to the descriptor, one line per member: `SHA256(disk1.vmdk)= 4f3c…`.
//!
//! Contract: [`Manifest::parse`] accepts SHA1, SHA256 and SHA512 lines (the algorithms OVF 1.x and
//! 2.x exporters write) and refuses anything else, so a manifest is either fully understood or
//! the OVA is refused — a checksum paddock cannot check is never silently skipped. [`MemberHasher`]
//! computes a member's digest while its bytes stream past, so verifying the boot disk costs no
//! second read. Signatures (`.cert`) are not checked: they need the signer's trust chain, which an
//! air-gapped packaging host does not have.

use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};

/// A digest algorithm an OVA manifest may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algorithm {
    /// SHA-1 (OVF 1.0 exporters, older VirtualBox).
    Sha1,
    /// SHA-256 (ovftool and VirtualBox defaults today).
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Algorithm {
    fn parse(name: &str) -> Option<Algorithm> {
        match name.to_ascii_uppercase().as_str() {
            "SHA1" => Some(Algorithm::Sha1),
            "SHA256" => Some(Algorithm::Sha256),
            "SHA512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
            Algorithm::Sha512 => "SHA512",
        }
    }

    fn hex_length(self) -> usize {
        match self {
            Algorithm::Sha1 => 40,
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// One manifest line: the member it names (as written) and its expected digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The digest algorithm.
    pub(crate) algorithm: Algorithm,
    /// The member name exactly as the manifest writes it (relative to the manifest).
    pub(crate) file: String,
    /// The expected digest, lowercase hex.
    pub(crate) digest: String,
}

/// A parsed manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Manifest {
    /// Every line, in order.
    pub(crate) entries: Vec<Entry>,
}

impl Manifest {
    /// Parses manifest text; the error says which line is wrong and how.
    pub(crate) fn parse(text: &str) -> Result<Manifest, String> {
        let mut entries = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            let number = index + 1;
            let malformed =
                || format!("line {number} ({line:?}) is not of the form ALGORITHM(FILE)= HEXDIGEST");
            let (algorithm_name, rest) = line.split_once('(').ok_or_else(malformed)?;
            let (file, digest) = rest.rsplit_once(")=").ok_or_else(malformed)?;
            let algorithm = Algorithm::parse(algorithm_name.trim()).ok_or_else(|| {
                format!(
                    "line {number} uses the digest algorithm {:?}; paddock checks SHA1, SHA256 and SHA512",
                    algorithm_name.trim()
                )
            })?;
            let digest = digest.trim().to_ascii_lowercase();
            if digest.len() != algorithm.hex_length() || !digest.bytes().all(|byte| byte.is_ascii_hexdigit())
            {
                return Err(format!(
                    "line {number} has {:?}, not a {} digest ({} hex digits)",
                    digest,
                    algorithm.name(),
                    algorithm.hex_length()
                ));
            }
            entries.push(Entry {
                algorithm,
                file: file.to_string(),
                digest,
            });
        }
        Ok(Manifest { entries })
    }
}

/// Hashes a member's bytes with the manifest's algorithm for it.
pub(crate) enum MemberHasher {
    /// SHA-1.
    Sha1(Sha1),
    /// SHA-256.
    Sha256(Sha256),
    /// SHA-512.
    Sha512(Box<Sha512>),
}

impl MemberHasher {
    /// A hasher for `algorithm`.
    pub(crate) fn new(algorithm: Algorithm) -> MemberHasher {
        match algorithm {
            Algorithm::Sha1 => MemberHasher::Sha1(Sha1::new()),
            Algorithm::Sha256 => MemberHasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => MemberHasher::Sha512(Box::default()),
        }
    }

    /// Feeds bytes.
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        match self {
            MemberHasher::Sha1(hasher) => hasher.update(bytes),
            MemberHasher::Sha256(hasher) => hasher.update(bytes),
            MemberHasher::Sha512(hasher) => hasher.update(bytes),
        }
    }

    /// The digest as lowercase hex.
    pub(crate) fn finish(self) -> String {
        let bytes: Vec<u8> = match self {
            MemberHasher::Sha1(hasher) => hasher.finalize().to_vec(),
            MemberHasher::Sha256(hasher) => hasher.finalize().to_vec(),
            MemberHasher::Sha512(hasher) => hasher.finalize().to_vec(),
        };
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }
}

/// Checks `actual` against an entry, or says what differs.
pub(crate) fn check(entry: &Entry, actual: &str) -> Result<(), String> {
    if entry.digest == actual {
        Ok(())
    } else {
        Err(format!(
            "says {:?} has {} {}, but the archive's copy has {actual}",
            entry.file,
            entry.algorithm.name(),
            entry.digest
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{Algorithm, Manifest, MemberHasher, check};

    #[test]
    fn lines_of_every_exporter_parse() {
        let text = "SHA256(vm.ovf)= 2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824\n\
                    SHA1(disk 1.vmdk)= aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d\r\n\
                    \n\
                    SHA512 (x.nvram)=cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e\n";
        let manifest = Manifest::parse(text).unwrap();
        assert_eq!(manifest.entries.len(), 3);
        assert_eq!(manifest.entries[0].algorithm, Algorithm::Sha256);
        assert_eq!(manifest.entries[0].file, "vm.ovf");
        assert_eq!(
            manifest.entries[0].digest,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(manifest.entries[1].file, "disk 1.vmdk");
        assert_eq!(manifest.entries[2].algorithm, Algorithm::Sha512);
    }

    #[test]
    fn what_cannot_be_checked_is_refused() {
        for (text, needle) in [
            ("MD5(a.vmdk)= d41d8cd98f00b204e9800998ecf8427e", "MD5"),
            ("SHA256(a.vmdk) 2cf2", "not of the form"),
            ("SHA256(a.vmdk)= 2cf2", "not a SHA256 digest"),
            (
                "SHA1(a.vmdk)= zzf4c61ddcc5e8a2dabede0f3b482cd9aea9434d",
                "not a SHA1",
            ),
        ] {
            let error = Manifest::parse(text).unwrap_err();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    #[test]
    fn hashers_match_known_digests() {
        for (algorithm, expected) in [
            (Algorithm::Sha1, "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"),
            (
                Algorithm::Sha256,
                "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            ),
        ] {
            let mut hasher = MemberHasher::new(algorithm);
            hasher.update(b"hel");
            hasher.update(b"lo");
            let actual = hasher.finish();
            assert_eq!(actual, expected);
            let entry = Manifest::parse(&format!("{algorithm:?}(x)= {expected}"))
                .unwrap()
                .entries
                .remove(0);
            assert!(check(&entry, &actual).is_ok());
            assert!(check(&entry, &"0".repeat(actual.len())).is_err());
        }
    }
}
