//! The spool's write-ahead log, `spool.wal` and `spool.wal.1`: what makes a spool transaction
//! durable without writing the database's pages.
//!
//! The writer thread commits each group of operations to redb without an fsync (redb keeps the
//! pages in its buffers) and appends what the group changed, table by table, to this log as one
//! record; an acknowledgement is answered once that record is fsync'd. That is one sequential
//! write of the bytes that changed, where a durable redb commit writes every B-tree page the
//! group touched — about two dozen scattered 4 KiB writes per group. Now and then (see `redb.rs`)
//! a checkpoint commits redb durably and records in its `meta` table the generation of the log it
//! covers; the log then goes on with the next generation, in its other file.
//!
//! The log is two files used in turn, one generation each: odd generations in the first, even
//! ones in the second. The next generation can so be written, and made durable, before redb's
//! commit says the current one is covered — a checkpoint carries what only the log holds over
//! into the next generation's first record instead of writing it to redb — while the current
//! generation's records stay whole until that commit is on disk.
//!
//! A record is `magic, length, generation, crc32, entries`. Each file is preallocated and reused
//! in place, so records of earlier generations lie behind the last one written: reading stops at
//! the first record that is torn, damaged or of another generation. Records are fsync'd in
//! order, so every record before an fsync'd one is whole.
//!
//! This module knows files and bytes, not deliveries: the entries are table changes encoded and
//! applied by `redb.rs`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: u32 = 0x5359_574c; // "SYWL"
/// magic, payload length, generation, crc32.
pub const HEADER: usize = 4 + 4 + 8 + 4;

/// One change to a spool table, as logged.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry<'a> {
    PendingInsert {
        target: &'a str,
        due: u64,
        id: u128,
        value: &'a [u8],
    },
    PendingRemove {
        target: &'a str,
        due: u64,
        id: u128,
    },
    AgeInsert {
        target: &'a str,
        id: u128,
    },
    AgeRemove {
        target: &'a str,
        id: u128,
    },
    DeadInsert {
        id: u128,
        value: &'a [u8],
    },
    DeadRemove {
        id: u128,
    },
    /// The spool's byte count after the group.
    Used(u64),
}

const PENDING_INSERT: u8 = 1;
const PENDING_REMOVE: u8 = 2;
const AGE_INSERT: u8 = 3;
const AGE_REMOVE: u8 = 4;
const DEAD_INSERT: u8 = 5;
const DEAD_REMOVE: u8 = 6;
const USED: u8 = 7;

/// The entries of one record, encoded as they are added behind room for the record's header,
/// which [`Wal::append`] fills in: the record is written from this buffer as it is.
pub struct Entries(Vec<u8>);

impl Default for Entries {
    fn default() -> Entries {
        Entries(vec![0; HEADER])
    }
}

impl Entries {
    pub fn push(&mut self, entry: &Entry<'_>) {
        let b = &mut self.0;
        match *entry {
            Entry::PendingInsert {
                target,
                due,
                id,
                value,
            } => {
                b.push(PENDING_INSERT);
                put_bytes(b, target.as_bytes());
                b.extend_from_slice(&due.to_le_bytes());
                b.extend_from_slice(&id.to_le_bytes());
                put_bytes(b, value);
            }
            Entry::PendingRemove { target, due, id } => {
                b.push(PENDING_REMOVE);
                put_bytes(b, target.as_bytes());
                b.extend_from_slice(&due.to_le_bytes());
                b.extend_from_slice(&id.to_le_bytes());
            }
            Entry::AgeInsert { target, id } => {
                b.push(AGE_INSERT);
                put_bytes(b, target.as_bytes());
                b.extend_from_slice(&id.to_le_bytes());
            }
            Entry::AgeRemove { target, id } => {
                b.push(AGE_REMOVE);
                put_bytes(b, target.as_bytes());
                b.extend_from_slice(&id.to_le_bytes());
            }
            Entry::DeadInsert { id, value } => {
                b.push(DEAD_INSERT);
                b.extend_from_slice(&id.to_le_bytes());
                put_bytes(b, value);
            }
            Entry::DeadRemove { id } => {
                b.push(DEAD_REMOVE);
                b.extend_from_slice(&id.to_le_bytes());
            }
            Entry::Used(n) => {
                b.push(USED);
                b.extend_from_slice(&n.to_le_bytes());
            }
        }
    }

    /// The entries, without the room for the header.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0[HEADER..]
    }

    /// Fills in the header for a record of `generation`: the record, as it is written.
    fn seal(&mut self, generation: u64) -> &[u8] {
        let (header, payload) = self.0.split_at_mut(HEADER);
        let header: &mut [u8; HEADER] = header.try_into().expect("HEADER bytes");
        header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        header[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[8..16].copy_from_slice(&generation.to_le_bytes());
        let crc = checksum(header, payload);
        header[16..20].copy_from_slice(&crc.to_le_bytes());
        &self.0
    }
}

fn put_bytes(b: &mut Vec<u8>, bytes: &[u8]) {
    b.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    b.extend_from_slice(bytes);
}

/// Reads the entries of one record's payload, in the order they were added.
pub fn entries(payload: &[u8]) -> impl Iterator<Item = Result<Entry<'_>, String>> {
    let mut r = Reader(payload);
    std::iter::from_fn(move || {
        if r.0.is_empty() {
            return None;
        }
        Some(r.entry())
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("a log entry ends early".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn u128(&mut self) -> Result<u128, String> {
        Ok(u128::from_le_bytes(
            self.take(16)?.try_into().expect("16 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
        self.take(n as usize)
    }
    fn str(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|_| "a log entry names no valid target".into())
    }
    fn entry(&mut self) -> Result<Entry<'a>, String> {
        let tag = self.take(1)?[0];
        Ok(match tag {
            PENDING_INSERT => Entry::PendingInsert {
                target: self.str()?,
                due: self.u64()?,
                id: self.u128()?,
                value: self.bytes()?,
            },
            PENDING_REMOVE => Entry::PendingRemove {
                target: self.str()?,
                due: self.u64()?,
                id: self.u128()?,
            },
            AGE_INSERT => Entry::AgeInsert {
                target: self.str()?,
                id: self.u128()?,
            },
            AGE_REMOVE => Entry::AgeRemove {
                target: self.str()?,
                id: self.u128()?,
            },
            DEAD_INSERT => Entry::DeadInsert {
                id: self.u128()?,
                value: self.bytes()?,
            },
            DEAD_REMOVE => Entry::DeadRemove { id: self.u128()? },
            USED => Entry::Used(self.u64()?),
            other => return Err(format!("unknown log entry type {other}")),
        })
    }
}

/// One of the log's two files.
struct LogFile {
    file: File,
    path: PathBuf,
}

/// The log: two files, each written from its beginning when a generation starts in it.
pub struct Wal {
    files: [LogFile; 2],
    capacity: u64,
    generation: u64,
    /// Where the next record goes, in the current generation's file.
    pos: u64,
    /// Whether records were written since the last fsync.
    unsynced: bool,
}

/// The next generation, its first record written and durable: [`Wal::start`] goes on with it.
#[must_use]
pub struct Next {
    generation: u64,
    pos: u64,
}

/// The file a generation's records go to: odd generations in the first, even in the second.
fn slot(generation: u64) -> usize {
    ((generation + 1) % 2) as usize
}

impl Wal {
    /// Opens the log's two files, creating each with room for `capacity` bytes of records if it
    /// does not exist. Writing starts at generation 1 until [`Wal::restart`] says otherwise.
    pub fn open(paths: [&Path; 2], capacity: u64) -> io::Result<Wal> {
        let open = |path: &Path| {
            open_file(path, capacity)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        };
        Ok(Wal {
            files: [open(paths[0])?, open(paths[1])?],
            capacity,
            generation: 1,
            pos: 0,
            unsynced: false,
        })
    }

    /// The file the current generation's records go to.
    pub fn path(&self) -> &Path {
        &self.files[slot(self.generation)].path
    }

    /// The file the next generation's records go to.
    pub fn next_path(&self) -> &Path {
        &self.files[slot(self.generation + 1)].path
    }

    /// Calls `apply` with the payload of each record of `generation`, in order, and returns how
    /// many there were. Both files are read: a generation is written to one file only, which is
    /// not always the one its number gives (a log of one file, from before there were two, has
    /// every generation in the first).
    pub fn replay(
        &self,
        generation: u64,
        mut apply: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> io::Result<Result<u64, String>> {
        let mut records = 0;
        for file in &self.files {
            match self.replay_file(&file.file, generation, &mut apply)? {
                Ok(n) => records += n,
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(records))
    }

    fn replay_file(
        &self,
        file: &File,
        generation: u64,
        apply: &mut impl FnMut(&[u8]) -> Result<(), String>,
    ) -> io::Result<Result<u64, String>> {
        let mut reader = io::BufReader::with_capacity(64 << 10, At { file, pos: 0 });
        let mut pos = 0u64;
        let mut records = 0u64;
        let mut payload = Vec::new();
        loop {
            let mut header = [0u8; HEADER];
            if pos + HEADER as u64 > self.capacity || read_exact_at(&mut reader, &mut header)? {
                break;
            }
            let magic = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
            let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as u64;
            let record_generation = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
            let crc = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
            if magic != MAGIC
                || record_generation != generation
                || pos + HEADER as u64 + len > self.capacity
            {
                break;
            }
            payload.resize(len as usize, 0);
            if read_exact_at(&mut reader, &mut payload)? || checksum(&header, &payload) != crc {
                break;
            }
            if let Err(e) = apply(&payload) {
                return Ok(Err(e));
            }
            records += 1;
            pos += HEADER as u64 + len;
        }
        Ok(Ok(records))
    }

    /// From now on records go to the beginning of `generation`'s file, as `generation`.
    pub fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.pos = 0;
        self.unsynced = false;
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether a record of `len` bytes of entries still fits.
    pub fn has_room(&self, len: usize) -> bool {
        self.pos + (HEADER + len) as u64 <= self.capacity
    }

    /// Appends one record; with `sync`, returns once it (and every record before it) is on disk.
    /// A record that could not be written is not counted: the next one takes its place.
    pub fn append(&mut self, entries: &mut Entries, sync: bool) -> io::Result<()> {
        let record = entries.seal(self.generation);
        self.files[slot(self.generation)]
            .file
            .write_all_at(record, self.pos)?;
        self.unsynced = true;
        if sync {
            self.sync()?;
        }
        self.pos += record.len() as u64;
        Ok(())
    }

    /// Writes `first` as the first record of the next generation, at the beginning of the other
    /// file, and returns once it is on disk. The current generation is untouched: records still
    /// go to it until [`Wal::start`].
    pub fn prepare_next(&mut self, first: &mut Entries) -> io::Result<Next> {
        let generation = self.generation + 1;
        let record = first.seal(generation);
        if record.len() as u64 > self.capacity {
            return Err(io::Error::other("a record larger than the log"));
        }
        let file = &self.files[slot(generation)].file;
        file.write_all_at(record, 0)?;
        file.sync_data()?;
        Ok(Next {
            generation,
            pos: record.len() as u64,
        })
    }

    /// Goes on with the generation [`Wal::prepare_next`] began, after its first record.
    pub fn start(&mut self, next: Next) {
        self.generation = next.generation;
        self.pos = next.pos;
        self.unsynced = false;
    }

    /// Makes every record written so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.files[slot(self.generation)].file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }
}

/// Opens one of the log's files, preallocated to `capacity` bytes.
fn open_file(path: &Path, capacity: u64) -> io::Result<LogFile> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if file.metadata()?.len() < capacity {
        // Allocated up front, so that an append's fsync has no file size to write too.
        allocate(&file, capacity)?;
        file.sync_all()?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
    }
    Ok(LogFile {
        file,
        path: path.to_path_buf(),
    })
}

/// Reads the file from a position of its own (not the file's cursor).
struct At<'f> {
    file: &'f File,
    pos: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads exactly `buf.len()` bytes; `true` at the end of the file.
fn read_exact_at(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(true),
        Err(e) => Err(e),
    }
}

/// CRC-32 of the length, the generation and the payload.
fn checksum(header: &[u8; HEADER], payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[4..16]);
    crc.update(payload);
    crc.finalize()
}

/// Gives the file `len` bytes of allocated space; where the file system cannot allocate ahead,
/// only its length.
fn allocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a file descriptor this function borrows; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => file.set_len(len),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u64) -> Entries {
        let mut e = Entries::default();
        e.push(&Entry::PendingInsert {
            target: "t",
            due: n,
            id: n as u128,
            value: b"record",
        });
        e.push(&Entry::AgeInsert {
            target: "t",
            id: n as u128,
        });
        e.push(&Entry::PendingRemove {
            target: "u",
            due: 7,
            id: 9,
        });
        e.push(&Entry::AgeRemove { target: "u", id: 9 });
        e.push(&Entry::DeadInsert {
            id: 3,
            value: b"dead",
        });
        e.push(&Entry::DeadRemove { id: 4 });
        e.push(&Entry::Used(n * 10));
        e
    }

    fn replayed(wal: &Wal, generation: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        wal.replay(generation, |p| {
            out.push(p.to_vec());
            Ok(())
        })
        .unwrap()
        .unwrap();
        out
    }

    #[test]
    fn entries_read_back_as_written() {
        let e = sample(5);
        let read: Vec<Entry<'_>> = entries(e.as_bytes()).map(Result::unwrap).collect();
        assert_eq!(
            read,
            vec![
                Entry::PendingInsert {
                    target: "t",
                    due: 5,
                    id: 5,
                    value: b"record"
                },
                Entry::AgeInsert { target: "t", id: 5 },
                Entry::PendingRemove {
                    target: "u",
                    due: 7,
                    id: 9
                },
                Entry::AgeRemove { target: "u", id: 9 },
                Entry::DeadInsert {
                    id: 3,
                    value: b"dead"
                },
                Entry::DeadRemove { id: 4 },
                Entry::Used(50),
            ]
        );
        // A cut entry is an error, not a shorter list.
        let bytes = e.as_bytes();
        let cut: Vec<_> = entries(&bytes[..bytes.len() - 3]).collect();
        assert!(cut.last().unwrap().is_err());
    }

    /// The log's two files in a new directory.
    fn files(dir: &tempfile::TempDir) -> [PathBuf; 2] {
        [dir.path().join("spool.wal"), dir.path().join("spool.wal.1")]
    }

    fn open(paths: &[PathBuf; 2], capacity: u64) -> Wal {
        Wal::open([&paths[0], &paths[1]], capacity).unwrap()
    }

    #[test]
    fn records_of_the_current_generation_are_replayed_in_order_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        let paths = files(&dir);
        let mut wal = open(&paths, 1 << 16);
        for path in &paths {
            assert_eq!(std::fs::metadata(path).unwrap().len(), 1 << 16);
        }
        wal.restart(4);
        for n in 0..3 {
            wal.append(&mut sample(n), n == 2).unwrap();
        }
        assert_eq!(wal.path(), paths[1]);
        // Generation 5 goes to the other file; 6 to generation 4's, over its start: the last
        // record of generation 4 lies behind it.
        wal.restart(5);
        wal.append(&mut sample(5), true).unwrap();
        assert_eq!(wal.path(), paths[0]);
        wal.restart(6);
        wal.append(&mut sample(10), true).unwrap();
        wal.append(&mut sample(11), true).unwrap();
        drop(wal);

        let wal = open(&paths, 1 << 16);
        assert_eq!(
            replayed(&wal, 6),
            vec![
                sample(10).as_bytes().to_vec(),
                sample(11).as_bytes().to_vec()
            ]
        );
        assert_eq!(replayed(&wal, 5), vec![sample(5).as_bytes().to_vec()]);
        // Generation 4's records are stale: the first of them was overwritten.
        assert!(replayed(&wal, 4).is_empty());
        assert!(replayed(&wal, 7).is_empty());
    }

    /// A checkpoint writes the next generation's first record before redb says the current one
    /// is covered: until then both are whole, each in its file.
    #[test]
    fn the_next_generation_begins_in_the_other_file_and_leaves_the_current_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let paths = files(&dir);
        let mut wal = open(&paths, 1 << 16);
        wal.restart(7);
        wal.append(&mut sample(1), false).unwrap();
        wal.append(&mut sample(2), true).unwrap();
        let next = wal.prepare_next(&mut sample(3)).unwrap();
        // Not started yet: records still go to generation 7.
        wal.append(&mut sample(4), true).unwrap();
        assert_eq!(wal.generation(), 7);
        let reopened = open(&paths, 1 << 16);
        let seven: Vec<Vec<u8>> = [1, 2, 4].map(|n| sample(n).as_bytes().to_vec()).into();
        assert_eq!(replayed(&reopened, 7), seven);
        assert_eq!(replayed(&reopened, 8), vec![sample(3).as_bytes().to_vec()]);

        wal.start(next);
        assert_eq!(wal.generation(), 8);
        assert_eq!(wal.path(), paths[1]);
        wal.append(&mut sample(5), true).unwrap();
        let reopened = open(&paths, 1 << 16);
        assert_eq!(replayed(&reopened, 7), seven);
        assert_eq!(
            replayed(&reopened, 8),
            vec![sample(3).as_bytes().to_vec(), sample(5).as_bytes().to_vec()]
        );
        // The generation after starts over in generation 7's file.
        let next = wal.prepare_next(&mut sample(6)).unwrap();
        wal.start(next);
        assert_eq!(wal.path(), paths[0]);
        let reopened = open(&paths, 1 << 16);
        assert!(replayed(&reopened, 7).is_empty());
        assert_eq!(replayed(&reopened, 9), vec![sample(6).as_bytes().to_vec()]);
        // A first record larger than a file is refused, and nothing changes.
        let mut huge = Entries::default();
        huge.push(&Entry::DeadInsert {
            id: 1,
            value: &vec![0; 1 << 16],
        });
        assert!(wal.prepare_next(&mut huge).is_err());
        assert_eq!(replayed(&open(&paths, 1 << 16), 9).len(), 1);
    }

    /// A data directory from when the log was one file has every generation in `spool.wal`.
    #[test]
    fn a_generation_is_read_from_whichever_file_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let paths = files(&dir);
        let mut one_file = Wal::open([&paths[1], &paths[0]], 1 << 16).unwrap();
        one_file.restart(2);
        one_file.append(&mut sample(1), true).unwrap();
        drop(one_file);
        let wal = open(&paths, 1 << 16);
        assert_eq!(replayed(&wal, 2), vec![sample(1).as_bytes().to_vec()]);
    }

    #[test]
    fn reading_stops_at_a_torn_or_damaged_record() {
        let dir = tempfile::tempdir().unwrap();
        let paths = files(&dir);
        let mut wal = open(&paths, 1 << 16);
        for n in 0..3 {
            wal.append(&mut sample(n), true).unwrap();
        }
        drop(wal);
        let record = (HEADER + sample(0).as_bytes().len()) as u64;
        let file = OpenOptions::new().write(true).open(&paths[0]).unwrap();
        // One byte of the third record's payload flipped, as a torn write would leave it.
        file.write_all_at(&[0xff], 2 * record + HEADER as u64 + 3)
            .unwrap();
        let wal = open(&paths, 1 << 16);
        assert_eq!(replayed(&wal, 1).len(), 2);
        // The second record's length damaged: nothing from there on.
        file.write_all_at(&[0xff, 0xff], record + 4).unwrap();
        assert_eq!(replayed(&wal, 1).len(), 1);
    }

    #[test]
    fn a_full_log_says_so_and_an_error_from_apply_stops_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let record = HEADER + sample(0).as_bytes().len();
        let mut wal = open(&files(&dir), 2 * record as u64);
        assert!(wal.has_room(sample(0).as_bytes().len()));
        wal.append(&mut sample(0), false).unwrap();
        wal.append(&mut sample(1), true).unwrap();
        assert!(!wal.has_room(1));
        let mut seen = 0;
        let result = wal
            .replay(1, |_| {
                seen += 1;
                Err("bad".into())
            })
            .unwrap();
        assert_eq!(result, Err("bad".to_string()));
        assert_eq!(seen, 1);
    }
}
