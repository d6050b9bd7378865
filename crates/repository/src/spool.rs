//! The spool file's writer: hashes every body chunk and stores it through large aligned blocks
//! written with direct I/O (`O_DIRECT`), so the bytes go from apprepo's memory to the device
//! without a copy into the page cache, while a second thread fills the next block. A profile of
//! a 1 GiB upload put that copy (the kernel's `copy_folio_from_iter_atomic`) at more than twice
//! the CPU of SHA-256 on a 2-core machine; with direct I/O the device (or the hypervisor) moves
//! the bytes instead. A filesystem that refuses direct I/O (tmpfs, some network and FUSE ones)
//! gets the same blocks through the page cache. Either way the file is fsynced before the
//! writer returns, so what the caller renames into place is on disk.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};

use bytes::Bytes;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Bytes handed to the disk in one write: large enough that one write in flight keeps a
/// device (or virtio queue) busy, small enough that [`SPOOL_BLOCKS`] of them per upload stay a
/// few MiB.
pub const SPOOL_BLOCK_BYTES: usize = 2 << 20;
/// Blocks per upload: one being filled while the others are written. Memory per upload is at
/// most this many [`SPOOL_BLOCK_BYTES`], whatever the bundle's size.
pub const SPOOL_BLOCKS: usize = 3;
/// What direct I/O needs the buffer's address, each write's length and its file offset to be
/// a multiple of: the device's logical block size, 4 KiB or less on every common device.
const DIRECT_IO_ALIGN: usize = 4096;

/// Writes every chunk `chunks` brings to `file` as it comes, hashing it, then syncs the file:
/// the spool writer's blocking thread. Returns the SHA-256 of what was written.
pub fn write_and_hash(file: File, chunks: mpsc::Receiver<Bytes>) -> io::Result<String> {
    let direct = enable_direct_io(&file);
    write_and_hash_as(file, chunks, direct)
}

/// [`write_and_hash`] with direct I/O already turned on (`direct`) or not.
fn write_and_hash_as(
    file: File,
    mut chunks: mpsc::Receiver<Bytes>,
    direct: bool,
) -> io::Result<String> {
    let (to_disk, full) = sync_channel::<Block>(SPOOL_BLOCKS);
    let (recycle, empty) = sync_channel::<Block>(SPOOL_BLOCKS);
    let (hashed, written) = std::thread::scope(|scope| {
        let disk = std::thread::Builder::new()
            .name("spool-disk".into())
            .spawn_scoped(scope, || write_blocks(&file, direct, full, recycle))?;
        let hashed = hash_into_blocks(&mut chunks, direct, &to_disk, &empty);
        // The disk thread ends once every block sent to it is written (or it failed).
        drop(to_disk);
        let written = disk
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the spool disk thread panicked")));
        io::Result::Ok((hashed, written))
    })?;
    // A write error explains a stopped hasher, so it comes first.
    let size = written?;
    let (digest, hashed_size) = hashed?;
    if size != hashed_size {
        return Err(io::Error::other(format!(
            "the spool file holds {size} bytes but {hashed_size} were received"
        )));
    }
    // The last block was padded to the alignment direct I/O needs: cut the padding off.
    file.set_len(size)?;
    file.sync_all()?;
    Ok(digest)
}

/// Asks for direct I/O on `file`; false when its filesystem refuses it (tmpfs answers EINVAL),
/// and the writes then go through the page cache.
fn enable_direct_io(file: &File) -> bool {
    let Ok(bits) = fcntl(file, FcntlArg::F_GETFL) else {
        return false;
    };
    let flags = OFlag::from_bits_truncate(bits);
    fcntl(file, FcntlArg::F_SETFL(flags | OFlag::O_DIRECT)).is_ok()
}

/// Turns direct I/O off again, for a filesystem that took the flag but refuses the writes.
fn disable_direct_io(file: &File) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL(flags - OFlag::O_DIRECT))?;
    Ok(())
}

/// The hashing side: hashes each chunk and copies it into the current block, handing full
/// blocks to the disk thread and reusing the ones it has written. Returns the digest and the
/// bytes hashed; stops early (with `Ok`) when the disk thread has stopped, whose error is the
/// one to report.
fn hash_into_blocks(
    chunks: &mut mpsc::Receiver<Bytes>,
    direct: bool,
    to_disk: &SyncSender<Block>,
    empty: &Receiver<Block>,
) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut allocated = 1;
    let mut block = Block::new();
    while let Some(chunk) = chunks.blocking_recv() {
        hasher.update(&chunk);
        size += chunk.len() as u64;
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            rest = block.fill(rest);
            if block.is_full() {
                if to_disk.send(block).is_err() {
                    return Ok((String::new(), size));
                }
                // Blocks are made only as the disk falls behind, up to the bound, so a small
                // upload holds one.
                block = match empty.try_recv() {
                    Ok(block) => block,
                    Err(TryRecvError::Empty) if allocated < SPOOL_BLOCKS => {
                        allocated += 1;
                        Block::new()
                    }
                    Err(_) => match empty.recv() {
                        Ok(block) => block,
                        Err(_) => return Ok((String::new(), size)),
                    },
                };
            }
        }
    }
    if block.len > 0 {
        if direct {
            block.pad_to_alignment();
        }
        // A stopped disk thread reports its own error.
        let _ = to_disk.send(block);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// The disk side: writes each block at the end of what it wrote before and sends it back for
/// reuse. Returns the bytes of body written (the padding of the last block not counted).
fn write_blocks(
    file: &File,
    mut direct: bool,
    full: Receiver<Block>,
    recycle: SyncSender<Block>,
) -> io::Result<u64> {
    let mut offset: u64 = 0;
    let mut size: u64 = 0;
    for block in full {
        let bytes = block.written();
        match file.write_all_at(bytes, offset) {
            Ok(()) => {}
            // Accepted at open, refused at the first write: some filesystems do that.
            Err(e) if direct && offset == 0 && e.raw_os_error() == Some(nix::libc::EINVAL) => {
                disable_direct_io(file)?;
                direct = false;
                file.write_all_at(bytes, offset)?;
            }
            Err(e) => return Err(e),
        }
        offset += bytes.len() as u64;
        size += block.len as u64;
        // The hasher is done with blocks once it has sent its last one.
        let _ = recycle.try_send(block.emptied());
    }
    Ok(size)
}

/// A buffer of [`SPOOL_BLOCK_BYTES`] whose start is aligned for direct I/O.
struct Block {
    /// Over-allocated by the alignment, so an aligned window of the full size fits in it.
    storage: Vec<u8>,
    /// Where the aligned window starts in `storage`.
    start: usize,
    /// Body bytes in the block.
    len: usize,
    /// Zero bytes after them, up to the alignment, on the last block.
    padding: usize,
}

impl Block {
    fn new() -> Self {
        let storage = vec![0u8; SPOOL_BLOCK_BYTES + DIRECT_IO_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_IO_ALIGN);
        Self {
            storage,
            start,
            len: 0,
            padding: 0,
        }
    }

    /// Copies as much of `bytes` as fits and returns the rest.
    fn fill<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let n = bytes.len().min(SPOOL_BLOCK_BYTES - self.len);
        let at = self.start + self.len;
        self.storage[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        &bytes[n..]
    }

    fn is_full(&self) -> bool {
        self.len == SPOOL_BLOCK_BYTES
    }

    /// Extends the last, partial block with zeros to a multiple of the alignment, as direct
    /// I/O writes whole device blocks; the file is cut back to the body's size afterwards.
    fn pad_to_alignment(&mut self) {
        let padded = self.len.next_multiple_of(DIRECT_IO_ALIGN);
        let at = self.start + self.len;
        self.storage[at..self.start + padded].fill(0);
        self.padding = padded - self.len;
    }

    /// What goes to the disk: the body bytes and any padding.
    fn written(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len + self.padding]
    }

    fn emptied(mut self) -> Self {
        self.len = 0;
        self.padding = 0;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `body` in chunks of `chunk` bytes to a writer of a new file in `dir`, with direct
    /// I/O as the filesystem allows or through the page cache, and returns the digest and the
    /// file's bytes.
    fn spool_into(
        dir: &std::path::Path,
        body: &[u8],
        chunk: usize,
        page_cache: bool,
    ) -> (String, Vec<u8>) {
        let path = dir.join("spooled");
        let file = File::create_new(&path).unwrap();
        let (tx, rx) = mpsc::channel(4);
        let chunks: Vec<Bytes> = body.chunks(chunk).map(Bytes::copy_from_slice).collect();
        let sender = std::thread::spawn(move || {
            for c in chunks {
                tx.blocking_send(c).unwrap();
            }
        });
        let digest = if page_cache {
            write_and_hash_as(file, rx, false).unwrap()
        } else {
            write_and_hash(file, rx).unwrap()
        };
        sender.join().unwrap();
        let stored = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        (digest, stored)
    }

    /// A body of several blocks that ends mid-block and mid-device-block, in chunks that do
    /// not divide a block, so blocks fill across chunks.
    fn odd_body() -> Vec<u8> {
        let len = 3 * SPOOL_BLOCK_BYTES + SPOOL_BLOCK_BYTES / 3 + 1234;
        (0..len).map(|i| (i * 7 + i / 4099) as u8).collect()
    }

    /// Both ways of writing: direct I/O (the test directory's filesystem takes it on Linux's
    /// usual filesystems) and the page cache, which filesystems without it get.
    #[test]
    fn the_file_holds_the_body_exactly_and_the_digest_is_its_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let body = odd_body();
        for page_cache in [false, true] {
            for chunk in [65_536 + 17, 1_000_003, body.len()] {
                let (digest, stored) = spool_into(dir.path(), &body, chunk, page_cache);
                let case = format!("chunks of {chunk}, page cache {page_cache}");
                assert_eq!(stored.len(), body.len(), "{case}");
                assert!(stored == body, "the stored bytes differ ({case})");
                assert_eq!(digest, hex::encode(Sha256::digest(&body)), "{case}");
            }
            // Smaller than one device block, and empty.
            for body in [&b"tiny"[..], b""] {
                let (digest, stored) = spool_into(dir.path(), body, 3, page_cache);
                assert_eq!(stored, body);
                assert_eq!(digest, hex::encode(Sha256::digest(body)));
            }
        }
    }

    /// The spool directory's filesystem (ext4, xfs, btrfs, tmpfs since Linux 6.6) takes direct
    /// I/O, so the fast path is the one the tests above take.
    #[test]
    fn the_spool_directory_takes_direct_io() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create_new(dir.path().join("probe")).unwrap();
        assert!(enable_direct_io(&file));
        let flags = OFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GETFL).unwrap());
        assert!(flags.contains(OFlag::O_DIRECT));
        disable_direct_io(&file).unwrap();
        let flags = OFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GETFL).unwrap());
        assert!(!flags.contains(OFlag::O_DIRECT));
    }
}
