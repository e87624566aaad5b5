//! Streaming decompression of gzip, xz and zstd inputs into a sparse, size-bounded file.
//!
//! Contract: the whole input is decoded (every gzip member, every xz stream, every zstd frame, so
//! concatenated files decode like their tools do), written with [`SparseWriter`] so zero runs stay
//! holes, and stopped with [`Error::ExpandsTooLarge`] as soon as the output passes `limit` — a
//! decompression bomb costs at most `limit` plus one buffer of work, and its zeros are never written.
//! Progress is reported in compressed bytes consumed, out of the compressed file's size.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::rc::Rc;

use liblzma::stream::{Action, MtStreamBuilder, Status, Stream};

use crate::prepare::{Progress, Stage};
use crate::sparse::SparseWriter;
use crate::{Compression, Error, Result};

/// Decompresses `input` into the new file `output`; returns the decompressed length.
pub(crate) fn decompress(
    input: &Path,
    compression: Compression,
    output: &Path,
    limit: u64,
    max_virtual_size: u64,
    progress: &mut dyn Progress,
) -> Result<u64> {
    let read_error = |source| Error::Read {
        path: input.to_path_buf(),
        source,
    };
    let file = File::open(input).map_err(read_error)?;
    let total = file.metadata().map_err(read_error)?.len();
    let consumed = Rc::new(Cell::new(0u64));
    let counting = CountingReader {
        inner: file,
        count: Rc::clone(&consumed),
    };
    let decompress_error = |source| Error::Decompress {
        path: input.to_path_buf(),
        compression,
        source,
    };
    let mut decoder: Box<dyn Read> = match compression {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(counting)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(counting).map_err(decompress_error)?),
        Compression::Xz => {
            Box::new(XzStreams::new(BufReader::with_capacity(1 << 20, counting)).map_err(decompress_error)?)
        }
    };
    let write_error = |source| Error::Write {
        path: output.to_path_buf(),
        source,
    };
    let out = File::create_new(output).map_err(write_error)?;
    let mut writer = SparseWriter::new(out);
    let mut buffer = vec![0u8; 1 << 20];
    let stage = Stage::Decompress(compression);
    progress.update(stage, 0, total);
    loop {
        let read = match decoder.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(decompress_error(error)),
        };
        writer.write(&buffer[..read]).map_err(write_error)?;
        if writer.accepted() > limit {
            return Err(Error::ExpandsTooLarge {
                action: format!("decompressing {compression}"),
                path: input.to_path_buf(),
                produced: writer.accepted(),
                limit: max_virtual_size,
            });
        }
        // Decoders read ahead (the multithreaded xz decoder by whole blocks), so the input can be
        // consumed well before the output is complete: "done" is only reported at the very end.
        progress.update(stage, consumed.get().min(total.saturating_sub(1)), total);
    }
    let length = writer.finish().map_err(write_error)?;
    progress.update(stage, total, total);
    Ok(length)
}

/// Counts the bytes read through it, so progress can be shown in compressed bytes.
struct CountingReader<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.count.set(self.count.get() + read as u64);
        Ok(read)
    }
}

/// Decodes every xz stream in the input (`cat a.xz b.xz` style concatenation, with the zero padding
/// the format allows between streams) with liblzma's multithreaded decoder. liblzma's own
/// "concatenated" flag is not available for the multithreaded decoder, hence this loop.
struct XzStreams<R> {
    input: R,
    stream: Stream,
    stream_ended: bool,
}

impl<R: BufRead> XzStreams<R> {
    fn new(input: R) -> io::Result<Self> {
        Ok(XzStreams {
            input,
            stream: new_xz_stream()?,
            stream_ended: false,
        })
    }
}

fn new_xz_stream() -> io::Result<Stream> {
    let threads = std::thread::available_parallelism().map_or(1, |count| count.get());
    MtStreamBuilder::new()
        .threads(u32::try_from(threads).unwrap_or(1))
        // Threads only when the buffers stay under 1 GiB; single-block files decode single-threaded.
        .memlimit_threading(1 << 30)
        .memlimit_stop(u64::MAX)
        .decoder()
        .map_err(io::Error::other)
}

impl<R: BufRead> Read for XzStreams<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if buffer.is_empty() {
            return Ok(0);
        }
        loop {
            if self.stream_ended {
                let available = self.input.fill_buf()?;
                if available.is_empty() {
                    return Ok(0);
                }
                let zeros = available.iter().take_while(|byte| **byte == 0).count();
                if zeros > 0 {
                    self.input.consume(zeros);
                    continue;
                }
                self.stream = new_xz_stream()?;
                self.stream_ended = false;
            }
            let available = self.input.fill_buf()?;
            let eof = available.is_empty();
            let before_in = self.stream.total_in();
            let before_out = self.stream.total_out();
            let action = if eof { Action::Finish } else { Action::Run };
            let status = self
                .stream
                .process(available, buffer, action)
                .map_err(io::Error::other)?;
            let consumed = (self.stream.total_in() - before_in) as usize;
            let produced = (self.stream.total_out() - before_out) as usize;
            self.input.consume(consumed);
            if status == Status::StreamEnd {
                self.stream_ended = true;
            }
            if produced > 0 {
                return Ok(produced);
            }
            if self.stream_ended {
                continue;
            }
            if eof {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the xz stream is truncated",
                ));
            }
            if consumed == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the xz stream is corrupt",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::XzStreams;
    use std::io::{Read, Write};

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut encoder = liblzma::write::XzEncoder::new(Vec::new(), 1);
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn concatenated_xz_streams_with_padding_decode_fully() {
        let mut input = xz(b"first stream, ");
        input.extend_from_slice(&[0, 0, 0, 0]);
        input.extend(xz(b"second stream"));
        let mut output = String::new();
        XzStreams::new(&input[..])
            .unwrap()
            .read_to_string(&mut output)
            .unwrap();
        assert_eq!(output, "first stream, second stream");
    }

    #[test]
    fn truncated_xz_is_an_error() {
        let input = xz(&[7u8; 100_000]);
        let mut output = Vec::new();
        let error = XzStreams::new(&input[..input.len() - 10])
            .unwrap()
            .read_to_end(&mut output)
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");
    }
}
