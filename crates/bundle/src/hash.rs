//! Streaming SHA-256: a writer and a reader that hash and count what passes through, so
//! callers learn a bundle's digest and size without buffering it.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

/// Passes writes through to `W`, hashing and counting the bytes actually written.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Returns the inner writer, the lowercase hex SHA-256 and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.bytes)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        // Hash only what the inner writer accepted: a short write is retried by the caller
        // with the rest, and hashing the whole buffer would count those bytes twice.
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Passes reads through from `R`, hashing and counting the bytes actually read.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Bytes read so far (not `bytes`, which `Read` already names).
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// Lowercase hex SHA-256 of the bytes read so far.
    pub fn digest(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    /// Returns the inner reader, the lowercase hex SHA-256 and the byte count.
    pub fn finish(self) -> (R, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.bytes)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // SHA-256 of "abc", from FIPS 180-2 appendix B.1.
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    /// Accepts at most two bytes per call, like a socket under pressure.
    struct Trickle(Vec<u8>);
    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(2);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writer_hashes_what_was_written_even_with_short_writes() {
        let mut w = HashingWriter::new(Trickle(Vec::new()));
        w.write_all(b"abc").unwrap();
        assert_eq!(w.bytes_written(), 3);
        let (inner, digest, n) = w.finish();
        assert_eq!(inner.0, b"abc");
        assert_eq!(digest, ABC);
        assert_eq!(n, 3);
    }

    #[test]
    fn reader_hashes_what_was_read() {
        let mut r = HashingReader::new(&b"abc"[..]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(r.digest(), ABC);
        assert_eq!(r.bytes_read(), 3);
        let (_, digest, n) = r.finish();
        assert_eq!((digest.as_str(), n), (ABC, 3));
    }
}
