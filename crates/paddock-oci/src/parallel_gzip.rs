//! A multithreaded gzip encoder whose output does not depend on the thread count.
//!
//! Role: gzip layers for runtimes that cannot read zstd, at the speed of every core rather than
//! one. The technique is pigz's: the input is cut into fixed-size chunks; each chunk is deflated on
//! its own thread, primed with the previous chunk's last 32 KiB as the dictionary (so the ratio
//! stays within a fraction of a percent of a single stream), and ended with a sync flush, which
//! closes the chunk on a byte boundary without ending the stream. The chunks are written in input
//! order, then one empty final block and the gzip trailer, whose CRC-32 is combined from the
//! chunks' CRCs. The result is one ordinary gzip member that any inflater reads.
//!
//! Contract:
//! - Output is a pure function of (input, level, [`CHUNK_SIZE`]): the same at 1 or 64 threads.
//! - At most `2 × threads` chunks are in flight, so memory stays bounded (about
//!   `4 × threads × CHUNK_SIZE`) however large the layer is.
//! - The gzip header carries no name and mtime 0, so equal input gives equal bytes.
//! - A worker that fails (it cannot, short of running out of memory) surfaces as an `io::Error` on
//!   the next write or at [`ParallelGzipEncoder::finish`]; nothing is written after a failure.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;
use std::thread::JoinHandle;

use flate2::{Compress, FlushCompress, Status};

/// Bytes of input per independently compressed chunk. 1 MiB: large enough that the sync-flush
/// marker (5 bytes) and the cold start of each chunk cost nothing measurable, small enough to
/// spread a layer over many threads.
pub const CHUNK_SIZE: usize = 1 << 20;
/// deflate's window: the dictionary each chunk is primed with.
const WINDOW: usize = 32 * 1024;
/// gzip header: magic, deflate, no flags, mtime 0, no extra flags, OS "unknown".
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
/// An empty final fixed-Huffman block (BFINAL=1, BTYPE=01, end-of-block), byte aligned.
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];

/// One compressed chunk: its deflate bytes, the CRC-32 state of its input, and its input length.
struct Compressed {
    deflate: Vec<u8>,
    crc: crc32fast::Hasher,
}

/// A `Write` that gzips what it is given on several threads; call [`finish`](Self::finish) to
/// write the trailer and get the inner writer back.
pub struct ParallelGzipEncoder<W: Write> {
    inner: Option<W>,
    level: u32,
    threads: usize,
    /// Input not yet handed to a worker.
    pending: Vec<u8>,
    /// The last [`WINDOW`] bytes of the previous chunk: the next chunk's dictionary.
    dictionary: Arc<Vec<u8>>,
    in_flight: VecDeque<JoinHandle<io::Result<Compressed>>>,
    crc: crc32fast::Hasher,
    header_written: bool,
}

impl<W: Write> ParallelGzipEncoder<W> {
    /// An encoder writing to `inner` at deflate `level` (0–9) on `threads` threads (at least 1).
    pub fn new(inner: W, level: u32, threads: usize) -> Self {
        Self {
            inner: Some(inner),
            level: level.min(9),
            threads: threads.max(1),
            pending: Vec::with_capacity(CHUNK_SIZE),
            dictionary: Arc::new(Vec::new()),
            in_flight: VecDeque::new(),
            crc: crc32fast::Hasher::new(),
            header_written: false,
        }
    }

    fn inner(&mut self) -> io::Result<&mut W> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::other("the gzip encoder was already finished"))
    }

    /// Hands the pending chunk to a new worker thread.
    fn dispatch(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK_SIZE));
        let dictionary = std::mem::replace(
            &mut self.dictionary,
            Arc::new(chunk[chunk.len().saturating_sub(WINDOW)..].to_vec()),
        );
        let level = self.level;
        let worker = std::thread::Builder::new()
            .name("paddock-gzip".into())
            .spawn(move || compress_chunk(&chunk, &dictionary, level))?;
        self.in_flight.push_back(worker);
        while self.in_flight.len() >= 2 * self.threads {
            self.write_oldest()?;
        }
        Ok(())
    }

    /// Waits for the oldest chunk and writes it out.
    fn write_oldest(&mut self) -> io::Result<()> {
        let Some(worker) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let compressed = worker
            .join()
            .map_err(|_| io::Error::other("a gzip worker thread panicked"))??;
        if !self.header_written {
            self.inner()?.write_all(&HEADER)?;
            self.header_written = true;
        }
        self.inner()?.write_all(&compressed.deflate)?;
        self.crc.combine(&compressed.crc);
        Ok(())
    }

    /// Compresses what is left, writes the final block and the trailer, and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.pending.is_empty() {
            self.dispatch()?;
        }
        while !self.in_flight.is_empty() {
            self.write_oldest()?;
        }
        if !self.header_written {
            self.inner()?.write_all(&HEADER)?;
            self.header_written = true;
        }
        let crc = std::mem::replace(&mut self.crc, crc32fast::Hasher::new());
        // The trailer's length is the input size modulo 2^32, as RFC 1952 defines ISIZE.
        let length = (crc.total_len() & 0xffff_ffff) as u32;
        let checksum = crc.finalize();
        let inner = self.inner()?;
        inner.write_all(&FINAL_BLOCK)?;
        inner.write_all(&checksum.to_le_bytes())?;
        inner.write_all(&length.to_le_bytes())?;
        self.inner
            .take()
            .ok_or_else(|| io::Error::other("the gzip encoder was already finished"))
    }
}

impl<W: Write> Write for ParallelGzipEncoder<W> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let room = CHUNK_SIZE - self.pending.len();
        let taken = room.min(buffer.len());
        self.pending.extend_from_slice(&buffer[..taken]);
        if self.pending.len() == CHUNK_SIZE {
            self.dispatch()?;
        }
        Ok(taken)
    }

    /// Writes out the chunks that are done; the pending partial chunk stays (flushing it would
    /// make the output depend on where callers flush).
    fn flush(&mut self) -> io::Result<()> {
        while self.in_flight.front().is_some_and(JoinHandle::is_finished) {
            self.write_oldest()?;
        }
        self.inner()?.flush()
    }
}

/// Deflates one chunk (raw deflate, primed with `dictionary`, ended by a sync flush).
fn compress_chunk(chunk: &[u8], dictionary: &[u8], level: u32) -> io::Result<Compressed> {
    let mut compress = Compress::new(flate2::Compression::new(level), false);
    if !dictionary.is_empty() {
        compress
            .set_dictionary(dictionary)
            .map_err(|error| io::Error::other(format!("cannot prime the gzip chunk: {error}")))?;
    }
    let mut deflate = Vec::with_capacity(chunk.len() / 2 + 1024);
    loop {
        let consumed = usize::try_from(compress.total_in()).map_err(io::Error::other)?;
        if deflate.capacity() - deflate.len() < 1024 {
            deflate.reserve(chunk.len() / 4 + 1024);
        }
        let status = compress
            .compress_vec(&chunk[consumed..], &mut deflate, FlushCompress::Sync)
            .map_err(|error| io::Error::other(format!("cannot deflate a gzip chunk: {error}")))?;
        let all_in = usize::try_from(compress.total_in()).map_err(io::Error::other)? == chunk.len();
        // The sync flush is complete once all input is in and deflate left output space unused.
        if all_in && deflate.len() < deflate.capacity() {
            break;
        }
        if status == Status::BufError && deflate.len() < deflate.capacity() {
            return Err(io::Error::other("deflate made no progress on a gzip chunk"));
        }
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(chunk);
    Ok(Compressed { deflate, crc })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn gzip(input: &[u8], level: u32, threads: usize, write_size: usize) -> Vec<u8> {
        let mut encoder = ParallelGzipEncoder::new(Vec::new(), level, threads);
        for piece in input.chunks(write_size.max(1)) {
            encoder.write_all(piece).unwrap();
        }
        encoder.finish().unwrap()
    }

    fn gunzip(compressed: &[u8]) -> Vec<u8> {
        let mut decoder = flate2::read::GzDecoder::new(compressed);
        let mut output = Vec::new();
        decoder.read_to_end(&mut output).unwrap();
        // One member, nothing after it.
        assert!(decoder.into_inner().is_empty());
        output
    }

    /// Text-like, compressible, and different in every chunk.
    fn sample(length: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_u32;
        (0..length)
            .map(|index| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                if index % 7 == 0 {
                    (state % 26) as u8 + b'a'
                } else {
                    b"paddock "[index % 8]
                }
            })
            .collect()
    }

    #[test]
    fn round_trips_every_size_around_chunk_boundaries() {
        for length in [
            0,
            1,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            3 * CHUNK_SIZE + 12_345,
        ] {
            let input = sample(length);
            for level in [0, 1, 6, 9] {
                assert_eq!(
                    gunzip(&gzip(&input, level, 3, 70_000)),
                    input,
                    "length {length} level {level}"
                );
            }
        }
    }

    #[test]
    fn output_does_not_depend_on_threads_or_write_sizes() {
        let input = sample(5 * CHUNK_SIZE + 777);
        let reference = gzip(&input, 6, 1, CHUNK_SIZE);
        for (threads, write_size) in [(2, 4096), (8, 1), (64, 3 * CHUNK_SIZE)] {
            if write_size == 1 {
                // Byte-at-a-time over 5 MiB is slow in debug builds; a prefix proves the point.
                let prefix = &input[..CHUNK_SIZE + 10];
                assert_eq!(gzip(prefix, 6, threads, 1), gzip(prefix, 6, 1, CHUNK_SIZE));
                continue;
            }
            assert_eq!(
                gzip(&input, 6, threads, write_size),
                reference,
                "{threads} threads"
            );
        }
    }

    #[test]
    fn priming_keeps_the_ratio_close_to_one_stream() {
        let input = sample(4 * CHUNK_SIZE);
        let parallel = gzip(&input, 6, 4, 65_536).len();
        let mut single = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        single.write_all(&input).unwrap();
        let single = single.finish().unwrap().len();
        assert!(
            (parallel as f64) < single as f64 * 1.01,
            "parallel {parallel} bytes vs single stream {single}"
        );
    }

    #[test]
    fn zeros_compress_like_a_sparse_disk_should() {
        let input = vec![0u8; 8 * CHUNK_SIZE];
        let compressed = gzip(&input, 6, 4, 1 << 16);
        assert!(
            compressed.len() < 64 * 1024,
            "{} bytes for 8 MiB of zeros",
            compressed.len()
        );
        assert_eq!(gunzip(&compressed), input);
    }

    #[test]
    fn the_system_gzip_reads_it() {
        let Ok(status) = std::process::Command::new("gzip").arg("--version").output() else {
            panic!("gzip(1) is not installed; it is part of every Debian system (apt-get install gzip)");
        };
        assert!(status.status.success());
        let input = sample(2 * CHUNK_SIZE + 5);
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("layer.gz");
        std::fs::write(&path, gzip(&input, 6, 2, 1 << 16)).unwrap();
        let output = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(output.stdout, input);
        let test = std::process::Command::new("gzip")
            .arg("-t")
            .arg(&path)
            .status()
            .unwrap();
        assert!(test.success());
    }
}
