//! Sparse, size-bounded file writing shared by decompression and OVA extraction.
//!
//! Contract: bytes are written in 64 KiB blocks; a block that is all zeros is skipped with a seek
//! instead of written, and [`SparseWriter::finish`] sets the final length, so a decompressed raw disk
//! stays as sparse as the original. The writer counts the logical bytes it accepted so callers can stop
//! a decompression bomb as soon as the count passes their limit.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};

/// Size of the blocks checked for zeros; matches qemu's default cluster size.
pub(crate) const BLOCK: usize = 64 * 1024;

/// True when `block` holds only zero bytes. Folding without early exit lets the compiler vectorise
/// each 4 KiB chunk; the per-chunk `all` still stops early on data.
fn is_zero(block: &[u8]) -> bool {
    block
        .chunks(4096)
        .all(|chunk| chunk.iter().fold(0u8, |acc, byte| acc | byte) == 0)
}

/// Writes a file sparsely (see module docs).
pub(crate) struct SparseWriter {
    file: File,
    /// Logical length accepted so far (holes included), excluding `pending`.
    logical: u64,
    /// Where the file cursor is.
    cursor: u64,
    /// A partial block waiting for more bytes.
    pending: Vec<u8>,
}

impl SparseWriter {
    /// Wraps a freshly created, empty file.
    pub(crate) fn new(file: File) -> Self {
        SparseWriter {
            file,
            logical: 0,
            cursor: 0,
            pending: Vec::with_capacity(BLOCK),
        }
    }

    /// Logical bytes accepted so far (written, skipped and pending).
    pub(crate) fn accepted(&self) -> u64 {
        self.logical + self.pending.len() as u64
    }

    /// Accepts `data`, writing complete non-zero blocks and skipping zero ones.
    pub(crate) fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        if !self.pending.is_empty() {
            let take = (BLOCK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == BLOCK {
                let block = std::mem::take(&mut self.pending);
                self.emit(&block)?;
                self.pending = block;
                self.pending.clear();
            }
        }
        while data.len() >= BLOCK {
            let (block, rest) = data.split_at(BLOCK);
            self.emit(block)?;
            data = rest;
        }
        self.pending.extend_from_slice(data);
        Ok(())
    }

    fn emit(&mut self, block: &[u8]) -> io::Result<()> {
        if !is_zero(block) {
            if self.cursor != self.logical {
                self.file.seek(SeekFrom::Start(self.logical))?;
            }
            self.file.write_all(block)?;
            self.cursor = self.logical + block.len() as u64;
        }
        self.logical += block.len() as u64;
        Ok(())
    }

    /// Writes the last partial block, sets the file length (trailing holes included) and returns it.
    pub(crate) fn finish(mut self) -> io::Result<u64> {
        let block = std::mem::take(&mut self.pending);
        self.emit(&block)?;
        self.file.set_len(self.logical)?;
        Ok(self.logical)
    }
}

#[cfg(test)]
mod tests {
    use super::{BLOCK, SparseWriter};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn zero_blocks_become_holes_and_content_survives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut expected = vec![0u8; 16 * BLOCK + 123];
        expected[3 * BLOCK + 7] = 1;
        expected[16 * BLOCK + 5] = 2;
        let mut writer = SparseWriter::new(std::fs::File::create(&path).unwrap());
        // Odd chunk sizes exercise the pending-block path.
        for chunk in expected.chunks(10_000) {
            writer.write(chunk).unwrap();
        }
        assert_eq!(writer.accepted(), expected.len() as u64);
        assert_eq!(writer.finish().unwrap(), expected.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        // Two data blocks, the rest holes (filesystems allocate at least the written blocks).
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated < 8 * BLOCK as u64, "allocated {allocated} bytes");
    }

    #[test]
    fn trailing_zeros_keep_the_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut writer = SparseWriter::new(std::fs::File::create(&path).unwrap());
        writer.write(&vec![0u8; 5 * BLOCK + 1]).unwrap();
        writer.finish().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 5 * BLOCK as u64 + 1);
    }
}
