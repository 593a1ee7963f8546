//! The event log: what makes an accepted event durable between two durable redb commits.
//!
//! A durable redb commit rewrites every B-tree page the batch touched (events, intents, outbox,
//! registry, redb's own allocator tables: about 25 pages for one webhook) and fsyncs them: most of
//! a webhook's answer time at 1,000/s. A batch of events is instead committed to redb without
//! fsync and its events are appended here, to one preallocated file, with a single `fdatasync` of
//! one or two pages. Every so often (and at a clean close) a durable redb commit makes the log
//! redundant, and writing starts again at the beginning of the file.
//!
//! Recovery replays every record still in the log through the ordinary ingest path, in order.
//! That is idempotent (an event already in `events` is a duplicate with no effect), so records
//! from before the last durable commit, or stale records from an older pass over the file, do no
//! harm. Acks and last-seen times are not logged: losing them costs a republish the terminal
//! deduplicates, as before.
//!
//! Record: `magic u32 | lsn u64 | header_len u32 | raw_len u32 | crc32 u32 | header | raw`, all
//! little endian; `crc32` covers `lsn` to the end of `raw`. The header is the event as JSON, the
//! raw body follows as bytes. Reading stops at the first record whose magic or checksum is wrong or
//! whose `lsn` does not follow the previous one: a torn write was never answered `200`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use posgate_proto::event::{EventData, PaymentIntent, Settlement, Transaction};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::IncomingEvent;

const MAGIC: u32 = 0x5047_574C; // "PGWL"
const HEAD: usize = 4 + 8 + 4 + 4 + 4;
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// The log file's name in `data_dir`.
pub(crate) const FILE: &str = "posgate.wal";

/// The event's fields other than its raw body.
#[derive(Serialize, Deserialize)]
struct Header {
    event_id: String,
    kind: String,
    #[serde(with = "time::serde::rfc3339")]
    received_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    created_at: Option<OffsetDateTime>,
    data: Data,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Data {
    PaymentIntent(PaymentIntent),
    Transaction(Transaction),
    Settlement(Settlement),
    Unknown,
    Unparsed(String),
}

/// Encodes one record.
fn encode(lsn: u64, event: &IncomingEvent) -> io::Result<Vec<u8>> {
    let data = match &event.data {
        Ok(EventData::PaymentIntent(pi)) => Data::PaymentIntent(pi.clone()),
        Ok(EventData::Transaction(tx)) => Data::Transaction(tx.clone()),
        Ok(EventData::Settlement(s)) => Data::Settlement(s.clone()),
        Ok(EventData::Unknown) => Data::Unknown,
        Err(message) => Data::Unparsed(message.clone()),
    };
    let header = serde_json::to_vec(&Header {
        event_id: event.event_id.clone(),
        kind: event.kind.clone(),
        received_at: event.received_at,
        created_at: event.created_at,
        data,
    })?;
    let (header_len, raw_len) = (len32(header.len())?, len32(event.raw.len())?);
    let mut out = Vec::with_capacity(HEAD + header.len() + event.raw.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&header);
    out.extend_from_slice(&event.raw);
    let crc = checksum(&out);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn checksum(record: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&record[4..20]);
    hasher.update(&record[HEAD..]);
    hasher.finalize()
}

fn len32(n: usize) -> io::Result<u32> {
    u32::try_from(n).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record too large"))
}

/// Decodes the record at the start of `buf`: its lsn, event and length, or `None` if there is no
/// valid record there.
fn decode(buf: &[u8]) -> Option<(u64, IncomingEvent, usize)> {
    let word = |at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().unwrap_or_default());
    if buf.len() < HEAD || word(0) != MAGIC {
        return None;
    }
    let lsn = u64::from_le_bytes(buf[4..12].try_into().ok()?);
    let (header_len, raw_len) = (word(12) as usize, word(16) as usize);
    let end = HEAD.checked_add(header_len)?.checked_add(raw_len)?;
    if end > buf.len() || checksum(&buf[..end]) != word(20) {
        return None;
    }
    let header: Header = serde_json::from_slice(&buf[HEAD..HEAD + header_len]).ok()?;
    let data = match header.data {
        Data::PaymentIntent(pi) => Ok(EventData::PaymentIntent(pi)),
        Data::Transaction(tx) => Ok(EventData::Transaction(tx)),
        Data::Settlement(s) => Ok(EventData::Settlement(s)),
        Data::Unknown => Ok(EventData::Unknown),
        Data::Unparsed(message) => Err(message),
    };
    let event = IncomingEvent {
        event_id: header.event_id,
        kind: header.kind,
        raw: Bytes::copy_from_slice(&buf[HEAD + header_len..end]),
        received_at: header.received_at,
        created_at: header.created_at,
        data,
    };
    Some((lsn, event, end))
}

/// The open log.
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    capacity: u64,
    /// Where the next record goes.
    offset: u64,
    next_lsn: u64,
}

impl Wal {
    /// Opens (creating and preallocating it if needed) the log in `dir` and returns it with the
    /// events it still holds, oldest first. Writing resumes at the start of the file.
    ///
    /// # Errors
    /// When the file cannot be created, read or preallocated.
    pub(crate) fn open(dir: &Path, capacity: u64) -> io::Result<(Wal, Vec<IncomingEvent>)> {
        let path = dir.join(FILE);
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let mut events = Vec::new();
        let (mut at, mut last) = (0usize, None::<u64>);
        while let Some((lsn, event, len)) = decode(&buf[at..]) {
            if last.is_some_and(|prev| lsn != prev + 1) {
                break;
            }
            events.push(event);
            last = Some(lsn);
            at += len;
        }
        // Preallocated with real zeros, so that a later fdatasync has no size or extent metadata
        // to write: only the pages of the new record.
        let len = file.metadata()?.len();
        if len < capacity {
            file.seek(SeekFrom::Start(len))?;
            let mut left = capacity - len;
            while left > 0 {
                let n = left.min(ZEROS.len() as u64) as usize;
                file.write_all(&ZEROS[..n])?;
                left -= n as u64;
            }
            file.sync_all()?;
            if !existed {
                File::open(dir)?.sync_all()?;
            }
        }
        let wal = Wal {
            file,
            path,
            capacity: capacity.max(len),
            offset: 0,
            next_lsn: last.map_or(1, |l| l + 1),
        };
        Ok((wal, events))
    }

    /// Whether `bytes` more fit before the end of the file.
    pub(crate) fn fits(&self, bytes: u64) -> bool {
        self.offset + bytes <= self.capacity
    }

    /// Bytes written since the last [`Wal::reset`].
    pub(crate) fn used(&self) -> u64 {
        self.offset
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Encodes `events` as the next records (not yet written).
    pub(crate) fn encode(&mut self, events: &[&IncomingEvent]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        for (lsn, event) in (self.next_lsn..).zip(events) {
            out.extend(encode(lsn, event)?);
        }
        Ok(out)
    }

    /// Writes records made by [`Wal::encode`] (for as many events) and waits until they are on
    /// disk. The caller checked [`Wal::fits`].
    pub(crate) fn append(&mut self, records: &[u8], count: u64) -> io::Result<()> {
        self.file.write_all_at(records, self.offset)?;
        self.file.sync_data()?;
        self.offset += records.len() as u64;
        self.next_lsn += count;
        Ok(())
    }

    /// Everything logged so far is in a durable redb commit: start again at the beginning. Stale
    /// records behind the new ones are told apart by their lsn, and replaying them is harmless.
    pub(crate) fn reset(&mut self) {
        self.offset = 0;
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use posgate_proto::event::Envelope;

    use super::*;

    fn event(n: u32) -> IncomingEvent {
        let body = format!(
            r#"{{"id":"evt_{n}","type":"payment_intent.confirmed","created_at":"2026-04-01T10:00:00Z","data":{{"id":"pi_{n}","status":"confirmed","amount":4.5,"metadata":{{"terminal_id":"pos-1"}}}}}}"#
        );
        let env = Envelope::parse(body.as_bytes()).unwrap();
        let data = EventData::parse(env.event_type(), env.data).map_err(|e| e.to_string());
        IncomingEvent {
            event_id: env.id.clone(),
            kind: env.kind.clone(),
            raw: Bytes::from(body.clone()),
            received_at: OffsetDateTime::from_unix_timestamp(1_775_000_000).unwrap(),
            created_at: env.created_at,
            data,
        }
    }

    fn ids(events: &[IncomingEvent]) -> Vec<String> {
        events.iter().map(|e| e.event_id.clone()).collect()
    }

    fn append(wal: &mut Wal, range: std::ops::RangeInclusive<u32>) {
        let events: Vec<IncomingEvent> = range.map(event).collect();
        let refs: Vec<&IncomingEvent> = events.iter().collect();
        let records = wal.encode(&refs).unwrap();
        assert!(wal.fits(records.len() as u64));
        wal.append(&records, refs.len() as u64).unwrap();
    }

    #[test]
    fn records_come_back_in_order_with_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, found) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert!(found.is_empty());
        assert_eq!(std::fs::metadata(wal.path()).unwrap().len(), 1 << 20);
        append(&mut wal, 1..=3);
        let mut unparsed = event(4);
        unparsed.data = Err("amount: too many decimals".into());
        let records = wal.encode(&[&unparsed]).unwrap();
        wal.append(&records, 1).unwrap();
        drop(wal);

        let (_, found) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&found), ["evt_1", "evt_2", "evt_3", "evt_4"]);
        let original = event(2);
        assert_eq!(found[1].raw, original.raw);
        assert_eq!(found[1].created_at, original.created_at);
        assert_eq!(found[1].received_at, original.received_at);
        assert_eq!(
            format!("{:?}", found[1].data),
            format!("{:?}", original.data)
        );
        assert_eq!(
            found[3].data.as_ref().unwrap_err(),
            "amount: too many decimals"
        );
    }

    #[test]
    fn a_torn_or_corrupt_tail_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 20).unwrap();
        append(&mut wal, 1..=2);
        let keep = wal.used();
        append(&mut wal, 3..=3);
        let end = wal.used();
        drop(wal);
        // A record cut short (a crash in the middle of the write) is not read.
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join(FILE))
            .unwrap();
        file.write_all_at(&vec![0; (end - keep) as usize / 2], keep + (end - keep) / 2)
            .unwrap();
        let (_, found) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&found), ["evt_1", "evt_2"]);
        // Nor is one with a flipped bit.
        file.write_all_at(&[0xff], keep - 3).unwrap();
        let (_, found) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&found), ["evt_1"]);
    }

    #[test]
    fn after_a_reset_only_the_new_pass_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 20).unwrap();
        append(&mut wal, 1..=5);
        wal.reset();
        append(&mut wal, 6..=7);
        drop(wal);
        let (mut wal, found) = Wal::open(dir.path(), 1 << 20).unwrap();
        // Records 3..5 of the old pass lie behind 6 and 7: their lsn does not follow.
        assert_eq!(ids(&found), ["evt_6", "evt_7"]);
        // Reopened, writing continues the lsn sequence, so the old records stay unread.
        append(&mut wal, 8..=8);
        drop(wal);
        let (_, found) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&found), ["evt_8"]);
    }

    #[test]
    fn a_full_log_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 4096).unwrap();
        let e = event(1);
        let records = wal.encode(&[&e]).unwrap();
        let per = records.len() as u64;
        let mut n = 0;
        while wal.fits(per) {
            let records = wal.encode(&[&e]).unwrap();
            wal.append(&records, 1).unwrap();
            n += 1;
        }
        assert_eq!(n, 4096 / per);
        wal.reset();
        assert!(wal.fits(per));
    }

    /// Copies the store's files as a crash would leave them: whatever reached the file system.
    fn crash_copy(from: &Path, to: &Path, with_log: bool) {
        std::fs::copy(
            from.join(super::super::DB_FILE),
            to.join(super::super::DB_FILE),
        )
        .unwrap();
        if with_log {
            std::fs::copy(from.join(FILE), to.join(FILE)).unwrap();
        }
    }

    #[tokio::test]
    async fn events_answered_from_the_log_survive_a_crash() {
        use crate::store::{Ingested, Store};
        let live = tempfile::tempdir().unwrap();
        let store = Store::open(live.path(), 64, 16).unwrap();
        // A durable commit first (a registration is not logged), then events that are.
        store
            .register_terminal(crate::store::NewTerminal::for_test("pos-1"))
            .await
            .unwrap()
            .unwrap();
        for n in 1..=20 {
            assert!(matches!(
                store.ingest(event(n)).await.unwrap(),
                Ingested::New { .. }
            ));
        }
        let (with_log, without_log) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        crash_copy(live.path(), with_log.path(), true);
        crash_copy(live.path(), without_log.path(), false);
        store.close().await;

        // Without the log, redb alone has lost them (so this test does exercise the log)...
        let bare = Store::open(without_log.path(), 64, 16).unwrap();
        assert!(bare.event("evt_20".into()).await.unwrap().is_none());
        bare.close().await;
        // ...with it, every one is back, with its effect, and applied once.
        let recovered = Store::open(with_log.path(), 64, 16).unwrap();
        for n in 1..=20 {
            assert!(
                recovered.event(format!("evt_{n}")).await.unwrap().is_some(),
                "evt_{n}"
            );
            assert!(
                recovered.intent(format!("pi_{n}")).await.unwrap().is_some(),
                "pi_{n}"
            );
            assert_eq!(
                recovered.ingest(event(n)).await.unwrap(),
                Ingested::Duplicate
            );
        }
        let rows = recovered.outbox(Some("pos-1".into())).await.unwrap();
        let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
        recovered.close().await;
        // A clean close made it all durable in redb: the log is no longer needed.
        let again = tempfile::tempdir().unwrap();
        crash_copy(with_log.path(), again.path(), false);
        let reopened = Store::open(again.path(), 64, 16).unwrap();
        assert!(reopened.event("evt_20".into()).await.unwrap().is_some());
        reopened.close().await;
    }
}
