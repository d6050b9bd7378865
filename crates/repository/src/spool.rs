//! The spool's blocks and the threads that consume them: the received body is copied into
//! large aligned blocks, and each full block is shared, read-only, by three consumers on
//! threads of their own: the hasher, the writer (direct I/O, `O_DIRECT`) and the inspector
//! (`upload.rs`). A block goes back to its upload's [`BlockPool`] once all three are done with
//! it, so an upload holds at most [`SPOOL_BLOCKS`] blocks whatever its size, and a consumer
//! that falls behind holds up receiving instead of memory growing.
//!
//! Why blocks rather than the body's chunks: a profile of a 1 GiB upload that handed each
//! 64 KiB chunk to a hashing thread and to the inspector put a seventh of the receiving
//! threads' time in waking those threads (two wake-ups per chunk) and a tenth in faulting in
//! fresh read buffers (the chunks lived on in the queues, so the HTTP server could not reuse
//! its buffer). A block wakes each consumer once per 2 MiB, and a chunk is dropped as soon as
//! it is copied. Why direct I/O: the kernel's copy into the page cache
//! (`copy_folio_from_iter_atomic`) cost more than twice SHA-256's CPU; with direct I/O the
//! device (or the hypervisor) takes the bytes from the block. A filesystem that refuses direct
//! I/O (some network and FUSE ones) gets the same blocks through the page cache. Either way the
//! file is fsynced before the writer returns, so what the caller renames into place is on disk.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Bytes in one block: large enough that one write in flight keeps a device (or virtio queue)
/// busy and that waking the consumers once per block costs nothing next to hashing it, small
/// enough that [`SPOOL_BLOCKS`] of them per upload stay a few MiB.
pub const SPOOL_BLOCK_BYTES: usize = 2 << 20;
/// Blocks per upload: one being filled while the others are hashed, written and inspected.
/// Memory per upload is at most this many [`SPOOL_BLOCK_BYTES`], whatever the bundle's size.
pub const SPOOL_BLOCKS: usize = 4;
/// What direct I/O needs the buffer's address, each write's length and its file offset to be
/// a multiple of: the device's logical block size, 4 KiB or less on every common device.
const DIRECT_IO_ALIGN: usize = 4096;

/// One upload's blocks: made only as the consumers fall behind, up to [`SPOOL_BLOCKS`], and
/// reused once their last consumer drops them, so a small upload holds one.
struct BlockPool {
    home: mpsc::Sender<Block>,
    returned: mpsc::Receiver<Block>,
    allocated: usize,
}

impl BlockPool {
    fn new() -> Self {
        // Room for every block there can be, so returning one never waits.
        let (home, returned) = mpsc::channel(SPOOL_BLOCKS);
        Self {
            home,
            returned,
            allocated: 0,
        }
    }

    /// An empty block: one returned, a new one while fewer than [`SPOOL_BLOCKS`] exist, or
    /// else the next one a consumer is done with (the backpressure on receiving).
    async fn take(&mut self) -> Block {
        if let Ok(block) = self.returned.try_recv() {
            return block;
        }
        if self.allocated < SPOOL_BLOCKS {
            self.allocated += 1;
            return Block::new();
        }
        // The pool holds a sender, so the queue never closes; `None` cannot happen.
        match self.returned.recv().await {
            Some(block) => block,
            None => Block::new(),
        }
    }

    /// Shares `block` with its consumers; it comes back to this pool when the last one drops
    /// it.
    fn share(&self, block: Block) -> SharedBlock {
        SharedBlock {
            block: Some(Arc::new(block)),
            home: self.home.clone(),
        }
    }
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

    /// The body bytes.
    fn body(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// What goes to the disk with direct I/O: the body bytes and any padding.
    fn padded(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len + self.padding]
    }

    fn emptied(mut self) -> Self {
        self.len = 0;
        self.padding = 0;
        self
    }
}

/// A full block, read-only, as its consumers hold it; the last one to drop it sends it back to
/// its pool.
#[derive(Clone)]
pub struct SharedBlock {
    /// Always `Some` but while being dropped.
    block: Option<Arc<Block>>,
    home: mpsc::Sender<Block>,
}

impl SharedBlock {
    /// The body bytes the block holds.
    pub fn body(&self) -> &[u8] {
        self.block.as_deref().map_or(&[], Block::body)
    }

    fn padded(&self) -> &[u8] {
        self.block.as_deref().map_or(&[], Block::padded)
    }
}

impl Drop for SharedBlock {
    fn drop(&mut self) {
        // `into_inner` gives the block to exactly one of the consumers dropping it at once.
        if let Some(shared) = self.block.take()
            && let Some(block) = Arc::into_inner(shared)
        {
            // A pool that is gone (the upload ended) frees the block instead.
            let _ = self.home.try_send(block.emptied());
        }
    }
}

/// The receiving side of one spool: copies the body into blocks, as it arrives, and hands each
/// full block to the hasher and the writer (each on a blocking thread of its own) and to the
/// inspector while it listens.
pub struct Spooler {
    pool: BlockPool,
    /// The block being filled; taken from the pool when the first byte for it arrives.
    filling: Option<Block>,
    to_hasher: mpsc::Sender<SharedBlock>,
    to_disk: mpsc::Sender<SharedBlock>,
    /// `None` once the inspector has stopped (it found an error, or the archive's end).
    inspector: Option<mpsc::Sender<SharedBlock>>,
    hasher: tokio::task::JoinHandle<(String, u64)>,
    writer: tokio::task::JoinHandle<io::Result<u64>>,
}

impl Spooler {
    /// Starts the hasher and the writer of `file`; full blocks also go to `inspector`.
    pub fn start(file: File, inspector: mpsc::Sender<SharedBlock>) -> Self {
        Self::start_as(file, inspector, true)
    }

    /// [`Spooler::start`], with direct I/O tried (`direct`) or not.
    fn start_as(file: File, inspector: mpsc::Sender<SharedBlock>, direct: bool) -> Self {
        // The pool bounds the blocks in flight, so these queues never make a sender wait.
        let (to_hasher, hash_queue) = mpsc::channel(SPOOL_BLOCKS);
        let (to_disk, disk_queue) = mpsc::channel(SPOOL_BLOCKS);
        Self {
            pool: BlockPool::new(),
            filling: None,
            to_hasher,
            to_disk,
            inspector: Some(inspector),
            hasher: tokio::task::spawn_blocking(move || hash_blocks(hash_queue)),
            writer: tokio::task::spawn_blocking(move || {
                let direct = direct && enable_direct_io(&file);
                write_blocks(file, disk_queue, direct)
            }),
        }
    }

    /// Copies `bytes` into blocks, handing on each one that fills. False when the writer or
    /// the hasher has stopped: [`Spooler::finish`] says why, and nothing more need be sent.
    pub async fn push(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            let block = match &mut self.filling {
                Some(block) => block,
                None => self.filling.insert(self.pool.take().await),
            };
            bytes = block.fill(bytes);
            if block.is_full()
                && let Some(full) = self.filling.take()
                && !self.hand_on(full).await
            {
                return false;
            }
        }
        true
    }

    async fn hand_on(&mut self, block: Block) -> bool {
        let shared = self.pool.share(block);
        if let Some(inspector) = &self.inspector
            && inspector.send(shared.clone()).await.is_err()
        {
            self.inspector = None;
        }
        self.to_hasher.send(shared.clone()).await.is_ok() && self.to_disk.send(shared).await.is_ok()
    }

    /// Hands on the last, partial block, tells the consumers the body is complete, and waits
    /// for the file to be written and synced. Returns the body's SHA-256 and size.
    pub async fn finish(mut self) -> io::Result<(String, u64)> {
        if let Some(mut last) = self.filling.take() {
            last.pad_to_alignment();
            // A stopped writer or hasher reports its own error below.
            let _ = self.hand_on(last).await;
        }
        let Self {
            to_hasher,
            to_disk,
            inspector,
            hasher,
            writer,
            ..
        } = self;
        drop((to_hasher, to_disk, inspector));
        let written = writer
            .await
            .unwrap_or_else(|e| Err(io::Error::other(format!("the spool writer failed: {e}"))));
        let hashed = hasher
            .await
            .map_err(|e| io::Error::other(format!("the spool hasher failed: {e}")));
        // A write error explains a stopped hasher, so it comes first.
        let size = written?;
        let (digest, hashed_size) = hashed?;
        if size != hashed_size {
            return Err(io::Error::other(format!(
                "the spool file holds {size} bytes but {hashed_size} were hashed"
            )));
        }
        Ok((digest, size))
    }
}

/// Hashes every block `blocks` brings, in order: the hasher's blocking thread. Returns the
/// SHA-256 and the bytes hashed.
fn hash_blocks(mut blocks: mpsc::Receiver<SharedBlock>) -> (String, u64) {
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    while let Some(block) = blocks.blocking_recv() {
        hasher.update(block.body());
        size += block.body().len() as u64;
    }
    (hex::encode(hasher.finalize()), size)
}

/// Writes every block `blocks` brings to `file`, one after the other, with direct I/O when
/// `direct` (it is on), then cuts off the last block's padding and syncs the file: the
/// writer's blocking thread. Returns the body bytes written.
fn write_blocks(
    file: File,
    mut blocks: mpsc::Receiver<SharedBlock>,
    mut direct: bool,
) -> io::Result<u64> {
    let mut offset: u64 = 0;
    while let Some(block) = blocks.blocking_recv() {
        let bytes = if direct { block.padded() } else { block.body() };
        match file.write_all_at(bytes, offset) {
            Ok(()) => {}
            // Accepted at open, refused at the first write: some filesystems do that.
            Err(e) if direct && offset == 0 && e.raw_os_error() == Some(nix::libc::EINVAL) => {
                disable_direct_io(&file)?;
                direct = false;
                file.write_all_at(block.body(), offset)?;
            }
            Err(e) => return Err(e),
        }
        // Only the last block is padded, so a next write starts where the body bytes end.
        offset += block.body().len() as u64;
    }
    // The last block was padded to the alignment direct I/O needs: cut the padding off.
    file.set_len(offset)?;
    file.sync_all()?;
    Ok(offset)
}

/// Asks for direct I/O on `file`; false when its filesystem refuses it, and the writes then go
/// through the page cache.
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

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;

    use super::*;

    /// Spools `body`, pushed in chunks of `chunk` bytes, into a new file in `dir`, with direct
    /// I/O as the filesystem allows or through the page cache, while a listener reads the
    /// blocks as the inspector does. Returns the digest and size `finish` reported, the file's
    /// bytes and the bytes the listener read.
    async fn spool_into(
        dir: &std::path::Path,
        body: &[u8],
        chunk: usize,
        page_cache: bool,
    ) -> (String, u64, Vec<u8>, Vec<u8>) {
        let path = dir.join("spooled");
        let file = File::create_new(&path).unwrap();
        let (inspector, mut inspected) = mpsc::channel::<SharedBlock>(SPOOL_BLOCKS);
        let listener = tokio::task::spawn_blocking(move || {
            let mut seen = Vec::new();
            while let Some(block) = inspected.blocking_recv() {
                seen.extend_from_slice(block.body());
            }
            seen
        });
        let mut spooler = Spooler::start_as(file, inspector, !page_cache);
        for c in body.chunks(chunk) {
            assert!(spooler.push(c).await);
        }
        let (digest, size) = spooler.finish().await.unwrap();
        let seen = listener.await.unwrap();
        let stored = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        (digest, size, stored, seen)
    }

    /// A body of several times the blocks an upload may hold, ending mid-block and
    /// mid-device-block, so blocks are reused and fill across chunks that do not divide them.
    fn odd_body() -> Vec<u8> {
        let len = (SPOOL_BLOCKS + 3) * SPOOL_BLOCK_BYTES + SPOOL_BLOCK_BYTES / 3 + 1234;
        (0..len).map(|i| (i * 7 + i / 4099) as u8).collect()
    }

    /// Both ways of writing: direct I/O (the test directory's filesystem takes it on Linux's
    /// usual filesystems) and the page cache, which filesystems without it get.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_file_and_the_inspector_get_the_body_exactly_and_the_digest_is_its_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let body = odd_body();
        let sha256 = hex::encode(Sha256::digest(&body));
        for page_cache in [false, true] {
            for chunk in [65_536 + 17, 1_000_003, body.len()] {
                let (digest, size, stored, seen) =
                    spool_into(dir.path(), &body, chunk, page_cache).await;
                let case = format!("chunks of {chunk}, page cache {page_cache}");
                assert_eq!(size, body.len() as u64, "{case}");
                assert_eq!(stored.len(), body.len(), "{case}");
                assert!(stored == body, "the stored bytes differ ({case})");
                assert!(seen == body, "the inspector's bytes differ ({case})");
                assert_eq!(digest, sha256, "{case}");
            }
            // Smaller than one device block, and empty.
            for body in [&b"tiny"[..], b""] {
                let (digest, size, stored, seen) =
                    spool_into(dir.path(), body, 3, page_cache).await;
                assert_eq!(
                    (size, &stored[..], &seen[..]),
                    (body.len() as u64, body, body)
                );
                assert_eq!(digest, hex::encode(Sha256::digest(body)));
            }
        }
    }

    /// Memory stays constant: however many blocks a body fills, the pool makes at most
    /// [`SPOOL_BLOCKS`] and reuses them once their consumers are done.
    #[tokio::test]
    async fn an_upload_holds_at_most_spool_blocks_blocks() {
        let mut pool = BlockPool::new();
        for _ in 0..3 * SPOOL_BLOCKS {
            let mut block = pool.take().await;
            assert!(block.fill(&[1; SPOOL_BLOCK_BYTES]).is_empty());
            let shared = pool.share(block);
            // Two consumers, dropping it one after the other.
            let other = shared.clone();
            drop(shared);
            drop(other);
        }
        assert_eq!(pool.allocated, 1);
        // Held blocks are not reused: the pool makes new ones, up to the bound, then waits.
        let mut held = Vec::new();
        for _ in 0..SPOOL_BLOCKS - 1 {
            let block = pool.take().await;
            held.push(pool.share(block));
        }
        let last = pool.take().await;
        assert_eq!(pool.allocated, SPOOL_BLOCKS);
        assert!(
            pool.take().now_or_never().is_none(),
            "a block beyond the bound was made"
        );
        drop(held.pop());
        let _reused = pool.take().await;
        assert_eq!(pool.allocated, SPOOL_BLOCKS);
        drop(last);
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
