//! [`Store`] on sled, the embedded default.
//!
//! Trees of the main database, at `dir`:
//! - `enrolments`: device id → [`Enrolment`] (JSON)
//! - `devices`: device id → [`DeviceRecord`] (postcard, see below)
//! - `events`: at_ms (u64 BE), seq (u64 BE) → [`EventRecord`] (JSON)
//! - `outbox`: alert id (u64 BE) → [`OutboxEntry`] (JSON)
//! - `generations`: device id → newest connection generation (u64 BE)
//! - `provision`: provisioning key id → [`ProvisionKey`] (JSON)
//! - `meta`: `instance` → random id of this database
//! - `history`: device id, 0, hour (u32 BE) → that hour's minutes, `Vec<StoredBucket>` (postcard)
//!
//! Trees of the bells' own database, at `dir/bells` (see [`BELLS_DIR`]):
//! - `bells`: id (u64 BE) → [`BellRecord`] (JSON)
//! - `bells_by_device`: device id, 0, id (u64 BE) → ()
//! - `bells_pending`: id (u64 BE) → () for bells not in a final state
//! - `meta`: `bell_seq` → the last bell id handed out (u64 BE),
//!   `migrated` → set once bells of an earlier version were moved here
//!
//! Values are JSON so records can gain fields (`#[serde(default)]`)
//! without a migration.

use std::path::Path;
use std::sync::Arc;

use ::sled::transaction::{ConflictableTransactionError, TransactionError};
use ::sled::{Transactional, Tree};
use async_trait::async_trait;
use serde::{de::DeserializeOwned, Serialize};

use super::*;

/// The sled-backed store. Cheap to clone (one database).
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: ::sled::Db,
    /// Bells live in a sled database of their own: sled flushes one log
    /// per database, and a bell's flush (accepted, then finished) must not
    /// wait behind the write-back's flush of thousands of device records.
    bells_db: ::sled::Db,
    bells_meta: Tree,
    enrolments: Tree,
    devices: Tree,
    bells: Tree,
    bells_by_device: Tree,
    bells_pending: Tree,
    events: Tree,
    history: Tree,
    outbox: Tree,
    generations: Tree,
    provision: Tree,
    instance: String,
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::db("sled", e.to_string())
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::db("encoding a record", e))
}

fn decode<T: DeserializeOwned>(tree: &'static str, key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(tree, key, e))
}

fn corrupt(tree: &'static str, key: &[u8], error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { tree, key: String::from_utf8_lossy(key).into_owned(), error: error.to_string() }
}

/// Format tag of a device record stored as postcard. Device records are
/// rewritten for every device that pulsed, every write-back, and sled keeps
/// every value in its cache: as postcard a record is about a quarter of its
/// JSON (field names and numbers as text), in memory and on disk, and
/// cheaper to encode. Records of earlier versions are JSON objects, which
/// start with `{`, and are still read.
///
/// Tag 1: the record before checks. Tag 2: with `checks` and
/// `action_info` appended. A tag-1 record is a tag-2 one without its last
/// two fields, and postcard writes an empty list as the single byte 0: a
/// tag-1 record reads as tag 2 with two zero bytes appended.
const DEVICE_RECORD_POSTCARD_V1: u8 = 1;
const DEVICE_RECORD_POSTCARD: u8 = 2;

fn encode_device(rec: &DeviceRecord) -> Result<Vec<u8>> {
    postcard::to_extend(rec, vec![DEVICE_RECORD_POSTCARD]).map_err(|e| StoreError::db("encoding a device record", e))
}

fn decode_device(key: &[u8], bytes: &[u8]) -> Result<DeviceRecord> {
    match bytes.split_first() {
        Some((&DEVICE_RECORD_POSTCARD, rest)) => postcard::from_bytes(rest).map_err(|e| corrupt("devices", key, e)),
        Some((&DEVICE_RECORD_POSTCARD_V1, rest)) => {
            let mut v2 = Vec::with_capacity(rest.len() + 2);
            v2.extend_from_slice(rest);
            v2.extend_from_slice(&[0, 0]); // no checks, no action info
            postcard::from_bytes(&v2).map_err(|e| corrupt("devices", key, e))
        }
        _ => decode("devices", key, bytes),
    }
}

fn by_device_key(device: &str, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 9);
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn history_key(device: &str, hour: u32) -> Vec<u8> {
    let mut k = device_prefix(device);
    k.extend_from_slice(&hour.to_be_bytes());
    k
}

/// The bells' own database, a directory inside the main one so the store
/// stays one directory to back up.
pub const BELLS_DIR: &str = "bells";

/// Set in the bells database once bells of an earlier version (kept in the
/// main database) were copied over; the main database's copies go after.
const BELLS_MIGRATED: &str = "migrated";

const BELL_TREES: [&str; 3] = ["bells", "bells_by_device", "bells_pending"];

fn device_prefix(device: &str) -> Vec<u8> {
    let mut k = device.as_bytes().to_vec();
    k.push(0);
    k
}

impl SledStore {
    /// Opens (or creates) the database in `dir` with a page cache of
    /// `cache_bytes`.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<SledStore> {
        Ok(SledStore { inner: Arc::new(Inner::open(dir, cache_bytes)?) })
    }

    /// Runs `f` on the blocking pool (sled flushes block).
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Inner) -> Result<T> + Send + 'static) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|e| StoreError::db("sled task", e.to_string()))?
    }
}

impl Inner {
    fn open(dir: &Path, cache_bytes: u64) -> Result<Inner> {
        let open = |path: &Path, cache: u64| {
            ::sled::Config::new()
                .path(path)
                .cache_capacity(cache)
                // We flush explicitly where durability matters; sled's own
                // periodic flush covers the rest.
                .flush_every_ms(Some(1000))
                .open()
                .map_err(|e| StoreError::db(format!("cannot open sled at {}", path.display()), e))
        };
        let db = open(dir, cache_bytes)?;
        let bells_db = open(&dir.join(BELLS_DIR), (cache_bytes / 4).max(1 << 20))?;
        let tree = |name: &str| db.open_tree(name).map_err(db_err);
        let bell_tree = |name: &str| bells_db.open_tree(name).map_err(db_err);
        let meta = tree("meta")?;
        let bells_meta = bell_tree("meta")?;
        migrate_bells(&db, &meta, &bells_db, &bells_meta)?;
        let instance = match meta.get("instance").map_err(db_err)? {
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => {
                let id = format!("{:016x}", rand::random::<u64>());
                meta.insert("instance", id.as_bytes()).map_err(db_err)?;
                id
            }
        };
        Ok(Inner {
            generations: tree("generations")?,
            provision: tree("provision")?,
            enrolments: tree("enrolments")?,
            devices: tree("devices")?,
            bells: bell_tree("bells")?,
            bells_by_device: bell_tree("bells_by_device")?,
            bells_pending: bell_tree("bells_pending")?,
            events: tree("events")?,
            history: tree("history")?,
            outbox: tree("outbox")?,
            bells_meta,
            instance,
            db,
            bells_db,
        })
    }

    /// Flushes the bells' database only.
    fn flush_bells(&self) -> Result<()> {
        self.bells_db.flush().map(|_| ()).map_err(db_err)
    }

    fn flush_now(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(db_err)
    }
}

/// Moves bells written by an earlier version (in the main database) into
/// the bells' own. Crash-safe in any order: the copy is redone until the
/// marker is flushed, and the old trees are dropped only after it.
fn migrate_bells(db: &::sled::Db, meta: &Tree, bells_db: &::sled::Db, bells_meta: &Tree) -> Result<()> {
    if bells_meta.get(BELLS_MIGRATED).map_err(db_err)?.is_none() {
        let names = db.tree_names();
        for name in BELL_TREES {
            let to = bells_db.open_tree(name).map_err(db_err)?;
            to.clear().map_err(db_err)?;
            if names.iter().any(|n| n.as_ref() == name.as_bytes()) {
                for kv in db.open_tree(name).map_err(db_err)?.iter() {
                    let (k, v) = kv.map_err(db_err)?;
                    to.insert(k, v).map_err(db_err)?;
                }
            }
        }
        match meta.get("bell_seq").map_err(db_err)? {
            Some(seq) => bells_meta.insert("bell_seq", seq).map_err(db_err)?,
            None => bells_meta.remove("bell_seq").map_err(db_err)?,
        };
        bells_meta.insert(BELLS_MIGRATED, &[1u8][..]).map_err(db_err)?;
        bells_db.flush().map_err(db_err)?;
    }
    let mut dropped = false;
    for name in BELL_TREES {
        dropped |= db.drop_tree(name).map_err(db_err)?;
    }
    dropped |= meta.remove("bell_seq").map_err(db_err)?.is_some();
    if dropped {
        db.flush().map_err(db_err)?;
    }
    Ok(())
}

impl Inner {
    fn put_enrolments(&self, es: &[Enrolment]) -> Result<()> {
        let mut batch = ::sled::Batch::default();
        for e in es {
            batch.insert(e.device.as_bytes(), encode(e)?);
        }
        self.enrolments.apply_batch(batch).map_err(db_err)?;
        self.flush_now()
    }

    fn delete_device(&self, device: &str) -> Result<bool> {
        let existed = self.enrolments.remove(device.as_bytes()).map_err(db_err)?.is_some();
        self.devices.remove(device.as_bytes()).map_err(db_err)?;
        self.prune_history(device, u32::MAX)?;
        self.flush_now()?;
        Ok(existed)
    }

    fn enrolments(&self) -> Result<Vec<Enrolment>> {
        self.enrolments
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(db_err)?;
                decode("enrolments", &k, &v)
            })
            .collect()
    }

    fn put_device_states(&self, states: &[(String, DeviceRecord)]) -> Result<()> {
        let mut batch = ::sled::Batch::default();
        for (id, rec) in states {
            batch.insert(id.as_bytes(), encode_device(rec)?);
        }
        self.devices.apply_batch(batch).map_err(db_err)?;
        self.flush_now()
    }

    fn device_states(&self) -> Result<Vec<(String, DeviceRecord)>> {
        self.devices
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(db_err)?;
                Ok((String::from_utf8_lossy(&k).into_owned(), decode_device(&k, &v)?))
            })
            .collect()
    }

    fn next_bell_id(&self) -> Result<u64> {
        // A counter of its own so bell ids read 1, 2, 3… It reaches disk
        // with the bell that uses it (put_bells flushes); a crash before
        // that can only reuse an id that was never returned.
        let next = self
            .bells_meta
            .update_and_fetch("bell_seq", |old| {
                let n = old.and_then(|v| <[u8; 8]>::try_from(v).ok()).map_or(0, u64::from_be_bytes);
                Some((n + 1).to_be_bytes().to_vec())
            })
            .map_err(db_err)?
            .ok_or_else(|| db_err("bell counter missing"))?;
        let bytes: [u8; 8] = next.as_ref().try_into().map_err(|_| db_err("bell counter corrupt"))?;
        Ok(u64::from_be_bytes(bytes))
    }

    fn put_bells(&self, bells: &[BellRecord]) -> Result<()> {
        let encoded: Vec<(u64, Vec<u8>)> = bells.iter().map(|b| Ok((b.id, encode(b)?))).collect::<Result<_>>()?;
        (&self.bells, &self.bells_by_device, &self.bells_pending)
            .transaction(|(bells_t, by_device_t, pending_t)| {
                for (b, (id, bytes)) in bells.iter().zip(&encoded) {
                    let key = id.to_be_bytes();
                    bells_t.insert(&key, bytes.as_slice())?;
                    by_device_t.insert(by_device_key(&b.device, *id), &[] as &[u8])?;
                    if b.state.is_final() {
                        pending_t.remove(&key)?;
                    } else {
                        pending_t.insert(&key, &[] as &[u8])?;
                    }
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e: TransactionError<()>| db_err(format!("{e:?}")))?;
        self.flush_bells()
    }

    fn bell(&self, id: u64) -> Result<Option<BellRecord>> {
        let key = id.to_be_bytes();
        match self.bells.get(key).map_err(db_err)? {
            Some(v) => Ok(Some(decode("bells", &key, &v)?)),
            None => Ok(None),
        }
    }

    fn bells(&self, device: Option<&str>, limit: usize) -> Result<Vec<BellRecord>> {
        let mut out = Vec::new();
        match device {
            Some(d) => {
                for kv in self.bells_by_device.scan_prefix(device_prefix(d)).rev() {
                    let (k, _) = kv.map_err(db_err)?;
                    let id = u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8-byte suffix"));
                    if let Some(b) = self.bell(id)? {
                        out.push(b);
                    }
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            None => {
                for kv in self.bells.iter().rev().take(limit) {
                    let (k, v) = kv.map_err(db_err)?;
                    out.push(decode("bells", &k, &v)?);
                }
            }
        }
        Ok(out)
    }

    fn pending_bells(&self) -> Result<Vec<BellRecord>> {
        let mut out = Vec::new();
        for kv in self.bells_pending.iter() {
            let (k, _) = kv.map_err(db_err)?;
            if let Some(v) = self.bells.get(&k).map_err(db_err)? {
                out.push(decode("bells", &k, &v)?);
            }
        }
        Ok(out)
    }

    fn append_events(&self, events: &[EventRecord]) -> Result<()> {
        let mut batch = ::sled::Batch::default();
        for e in events {
            let mut key = Vec::with_capacity(16);
            key.extend_from_slice(&e.at_ms.to_be_bytes());
            key.extend_from_slice(&self.db.generate_id().map_err(db_err)?.to_be_bytes());
            batch.insert(key, encode(e)?);
        }
        self.events.apply_batch(batch).map_err(db_err)?;
        self.flush_now()
    }

    fn events(&self, device: Option<&str>, since_ms: u64, limit: usize) -> Result<Vec<EventRecord>> {
        let mut out = Vec::new();
        for kv in self.events.range(since_ms.to_be_bytes()..).rev() {
            let (k, v) = kv.map_err(db_err)?;
            let e: EventRecord = decode("events", &k, &v)?;
            if device.is_none_or(|d| d == e.device) {
                out.push(e);
                if out.len() >= limit {
                    break;
                }
            }
        }
        out.reverse();
        Ok(out)
    }

    fn prune_events(&self, before_ms: u64) -> Result<usize> {
        let mut n = 0;
        for kv in self.events.range(..before_ms.to_be_bytes()) {
            let (k, _) = kv.map_err(db_err)?;
            self.events.remove(k).map_err(db_err)?;
            n += 1;
        }
        Ok(n)
    }

    fn put_history(&self, buckets: &[(String, crate::history::Bucket)]) -> Result<()> {
        use crate::history::StoredBucket;
        // One key per device-hour holding up to 60 minutes: far less
        // per-key overhead in sled than a key per minute.
        for (device, b) in buckets {
            let key = history_key(device, b.minute / 60);
            let stored = StoredBucket::from(b);
            let mut error = None;
            self.history
                .fetch_and_update(key, |old| {
                    let mut hour: Vec<StoredBucket> =
                        old.and_then(|v| postcard::from_bytes(v).ok()).unwrap_or_default();
                    match hour.binary_search_by_key(&stored.minute(), StoredBucket::minute) {
                        Ok(i) => hour[i] = stored.clone(),
                        Err(i) => hour.insert(i, stored.clone()),
                    }
                    match postcard::to_stdvec(&hour) {
                        Ok(bytes) => Some(bytes),
                        Err(e) => {
                            error = Some(e);
                            old.map(|v| v.to_vec())
                        }
                    }
                })
                .map_err(db_err)?;
            if let Some(e) = error {
                return Err(db_err(e));
            }
        }
        Ok(())
    }

    fn history(&self, device: &str, since_minute: u32) -> Result<Vec<crate::history::Bucket>> {
        use crate::history::StoredBucket;
        let start = history_key(device, since_minute / 60);
        let end = history_key(device, u32::MAX);
        let mut out = Vec::new();
        for kv in self.history.range(start..=end) {
            let (k, v) = kv.map_err(db_err)?;
            let hour: Vec<StoredBucket> = postcard::from_bytes(&v).map_err(|e| StoreError::Corrupt {
                tree: "history",
                key: String::from_utf8_lossy(&k).into_owned(),
                error: e.to_string(),
            })?;
            out.extend(hour.into_iter().filter(|b| b.minute() >= since_minute).map(Into::into));
        }
        Ok(out)
    }

    fn prune_history(&self, device: &str, before_minute: u32) -> Result<usize> {
        let start = history_key(device, 0);
        let end = history_key(device, before_minute / 60);
        let mut n = 0;
        for kv in self.history.range(start..end) {
            let (k, _) = kv.map_err(db_err)?;
            self.history.remove(k).map_err(db_err)?;
            n += 1;
        }
        Ok(n)
    }

    fn next_id(&self) -> Result<u64> {
        self.db.generate_id().map_err(db_err)
    }

    fn instance_id(&self) -> String {
        self.instance.clone()
    }

    fn put_outbox(&self, entries: &[OutboxEntry]) -> Result<()> {
        let mut batch = ::sled::Batch::default();
        for e in entries {
            batch.insert(&e.alert.id.to_be_bytes(), encode(e)?);
        }
        self.outbox.apply_batch(batch).map_err(db_err)?;
        self.flush_now()
    }

    fn outbox(&self) -> Result<Vec<OutboxEntry>> {
        self.outbox
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(db_err)?;
                decode("outbox", &k, &v)
            })
            .collect()
    }

    fn remove_outbox(&self, id: u64) -> Result<()> {
        self.outbox.remove(id.to_be_bytes()).map_err(db_err)?;
        self.flush_now()
    }

    fn claim(&self, device: &str, floor: u64) -> Result<u64> {
        // Not flushed by itself (a reconnect storm would flush per device);
        // sled's periodic flush and the device's state both carry it.
        let next = self
            .generations
            .update_and_fetch(device.as_bytes(), |old| {
                let n = old.and_then(|v| <[u8; 8]>::try_from(v).ok()).map_or(0, u64::from_be_bytes);
                Some((n.max(floor) + 1).to_be_bytes().to_vec())
            })
            .map_err(db_err)?
            .ok_or_else(|| db_err("generation counter missing"))?;
        let bytes: [u8; 8] = next.as_ref().try_into().map_err(|_| db_err("generation counter corrupt"))?;
        Ok(u64::from_be_bytes(bytes))
    }

    fn create_enrolment(&self, e: &Enrolment) -> Result<bool> {
        let added = self
            .enrolments
            .compare_and_swap(e.device.as_bytes(), None as Option<&[u8]>, Some(encode(e)?))
            .map_err(db_err)?
            .is_ok();
        if added {
            self.flush_now()?;
        }
        Ok(added)
    }

    fn put_provision_key(&self, k: &ProvisionKey) -> Result<()> {
        self.provision.insert(k.id.as_bytes(), encode(k)?).map_err(db_err)?;
        self.flush_now()
    }

    fn provision_keys(&self) -> Result<Vec<ProvisionKey>> {
        self.provision
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(db_err)?;
                decode("provision", &k, &v)
            })
            .collect()
    }

    /// Replaces key `id` if it still holds `old`; flushed. Whether it did.
    fn cas_provision_key(&self, id: &str, old: ::sled::IVec, new: Vec<u8>) -> Result<bool> {
        let done = self.provision.compare_and_swap(id.as_bytes(), Some(old), Some(new)).map_err(db_err)?.is_ok();
        if done {
            self.flush_now()?;
        }
        Ok(done)
    }

    /// Replaces bell `id` if it still holds `old`; flushed. Whether it did.
    fn cas_bell(&self, id: u64, old: ::sled::IVec, new: Vec<u8>, is_final: bool) -> Result<bool> {
        let key = id.to_be_bytes();
        let done = (&self.bells, &self.bells_pending)
            .transaction(|(bells_t, pending_t)| {
                if bells_t.get(key)?.as_ref() != Some(&old) {
                    return Ok(false);
                }
                bells_t.insert(&key, new.as_slice())?;
                if is_final {
                    pending_t.remove(&key)?;
                } else {
                    pending_t.insert(&key, &[] as &[u8])?;
                }
                Ok::<bool, ConflictableTransactionError<()>>(true)
            })
            .map_err(|e: TransactionError<()>| db_err(format!("{e:?}")))?;
        if done {
            self.flush_bells()?;
        }
        Ok(done)
    }

    fn flush(&self) -> Result<()> {
        self.flush_now()?;
        self.flush_bells()
    }
}

#[async_trait]
impl Store for SledStore {
    fn backend(&self) -> &'static str {
        "sled"
    }

    async fn put_enrolments(&self, es: &[Enrolment]) -> Result<()> {
        let es = es.to_vec();
        self.blocking(move |s| s.put_enrolments(&es)).await
    }

    async fn create_enrolment(&self, e: &Enrolment) -> Result<bool> {
        let e = e.clone();
        self.blocking(move |s| s.create_enrolment(&e)).await
    }

    async fn put_provision_key(&self, key: &ProvisionKey) -> Result<()> {
        let key = key.clone();
        self.blocking(move |s| s.put_provision_key(&key)).await
    }

    async fn provision_keys(&self) -> Result<Vec<ProvisionKey>> {
        self.blocking(|s| s.provision_keys()).await
    }

    async fn update_provision_key(&self, id: &str, change: ProvisionChange<'_>) -> Result<Option<ProvisionKey>> {
        loop {
            let Some(old) = self.inner.provision.get(id.as_bytes()).map_err(db_err)? else { return Ok(None) };
            let current: ProvisionKey = decode("provision", id.as_bytes(), &old)?;
            let Some(new) = change(&current) else { return Ok(None) };
            let bytes = encode(&new)?;
            let key = id.to_string();
            if self.blocking(move |s| s.cas_provision_key(&key, old, bytes)).await? {
                return Ok(Some(new));
            }
        }
    }

    async fn delete_device(&self, device: &str) -> Result<bool> {
        let device = device.to_string();
        self.blocking(move |s| s.delete_device(&device)).await
    }

    async fn enrolments(&self) -> Result<Vec<Enrolment>> {
        self.blocking(|s| s.enrolments()).await
    }

    async fn put_device_states(&self, states: &[(String, DeviceRecord)]) -> Result<()> {
        let states = states.to_vec();
        self.blocking(move |s| s.put_device_states(&states)).await
    }

    async fn device_states(&self) -> Result<Vec<(String, DeviceRecord)>> {
        self.blocking(|s| s.device_states()).await
    }

    async fn claim(&self, device: &str, _node: &str, floor: u64) -> Result<u64> {
        self.inner.claim(device, floor)
    }

    async fn release(&self, _device: &str, _node: &str, _generation: u64, _reason: Reason) -> Result<bool> {
        Ok(true)
    }

    async fn owners(&self) -> Result<Vec<(String, Owner)>> {
        Ok(vec![])
    }

    async fn next_bell_id(&self) -> Result<u64> {
        self.inner.next_bell_id()
    }

    async fn put_bells(&self, bells: &[BellRecord]) -> Result<()> {
        let bells = bells.to_vec();
        self.blocking(move |s| s.put_bells(&bells)).await
    }

    async fn update_bell(&self, id: u64, change: BellChange<'_>) -> Result<Option<BellRecord>> {
        let key = id.to_be_bytes();
        loop {
            let Some(old) = self.inner.bells.get(key).map_err(db_err)? else { return Ok(None) };
            let current: BellRecord = decode("bells", &key, &old)?;
            let Some(mut new) = change(&current) else { return Ok(None) };
            new.version = current.version + 1;
            let bytes = encode(&new)?;
            let is_final = new.state.is_final();
            if self.blocking(move |s| s.cas_bell(id, old, bytes, is_final)).await? {
                return Ok(Some(new));
            }
        }
    }

    async fn bell(&self, id: u64) -> Result<Option<BellRecord>> {
        self.inner.bell(id)
    }

    async fn bells(&self, device: Option<&str>, limit: usize) -> Result<Vec<BellRecord>> {
        let device = device.map(str::to_string);
        self.blocking(move |s| s.bells(device.as_deref(), limit)).await
    }

    async fn pending_bells(&self) -> Result<Vec<BellRecord>> {
        self.blocking(|s| s.pending_bells()).await
    }

    async fn append_events(&self, events: &[EventRecord]) -> Result<()> {
        let events = events.to_vec();
        self.blocking(move |s| s.append_events(&events)).await
    }

    async fn events(&self, device: Option<&str>, since_ms: u64, limit: usize) -> Result<Vec<EventRecord>> {
        let device = device.map(str::to_string);
        self.blocking(move |s| s.events(device.as_deref(), since_ms, limit)).await
    }

    async fn put_history(&self, buckets: &[(String, Bucket)]) -> Result<()> {
        let buckets = buckets.to_vec();
        self.blocking(move |s| s.put_history(&buckets)).await
    }

    async fn history(&self, device: &str, since_minute: u32) -> Result<Vec<Bucket>> {
        let device = device.to_string();
        self.blocking(move |s| s.history(&device, since_minute)).await
    }

    async fn prune(&self, events_before_ms: u64, history_before_minute: u32, devices: &[String]) -> Result<usize> {
        let devices = devices.to_vec();
        self.blocking(move |s| {
            let mut n = s.prune_events(events_before_ms)?;
            for d in &devices {
                n += s.prune_history(d, history_before_minute)?;
            }
            Ok(n)
        })
        .await
    }

    async fn next_id(&self) -> Result<u64> {
        self.inner.next_id()
    }

    fn instance_id(&self) -> String {
        self.inner.instance_id()
    }

    async fn put_outbox(&self, entries: &[OutboxEntry]) -> Result<()> {
        let entries = entries.to_vec();
        self.blocking(move |s| s.put_outbox(&entries)).await
    }

    async fn outbox(&self) -> Result<Vec<OutboxEntry>> {
        self.blocking(|s| s.outbox()).await
    }

    async fn lease_outbox(&self, _id: u64, _node: &str, _until_ms: u64) -> Result<bool> {
        Ok(true)
    }

    async fn remove_outbox(&self, id: u64) -> Result<()> {
        self.blocking(move |s| s.remove_outbox(id)).await
    }

    async fn flush(&self) -> Result<()> {
        self.blocking(|s| s.flush()).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn bell(id: u64, device: &str, state: BellStatus) -> BellRecord {
        BellRecord {
            id,
            device: device.into(),
            action: "ping".into(),
            params: BTreeMap::new(),
            state,
            created_ms: 1,
            updated_ms: 1,
            expires_ms: 10,
            timeout_ms: None,
            exit_code: None,
            output: String::new(),
            duration_ms: None,
            reason: None,
            transitions: vec![],
            cancel_requested: false,
            version: 0,
            origin: None,
        }
    }

    /// Opens the store again after the test dropped its last handle.
    /// sled finishes a dropped database's writes on its own I/O threads,
    /// which hold the directory's lock until they are done; sled offers no
    /// way to wait for them, so poll for the lock (bounded).
    fn reopen(dir: &Path) -> SledStore {
        for _ in 0..500 {
            match SledStore::open(dir, 1 << 20) {
                Err(e) if e.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                other => return other.unwrap(),
            }
        }
        panic!("{} stayed locked for 5 s", dir.display())
    }

    fn device_record() -> DeviceRecord {
        DeviceRecord {
            hello: Some(pulsebell_proto::Hello {
                protocol_version: 1,
                device_id: "pi-7".into(),
                agent_version: "0.1.0".into(),
                boot_id: "6f1c2a9e-4b7d-4e0a-9c3f-000000000007".into(),
                hostname: "pi-7".into(),
                os: "Debian GNU/Linux 12 (bookworm)".into(),
                kernel: "6.6.31+rpt-rpi-v8".into(),
                arch: "aarch64".into(),
                board_model: Some("Raspberry Pi 4 Model B Rev 1.4".into()),
                interval_ms: 10_000,
                tags: vec!["shop".into()],
                actions: vec!["ping".into(), "reboot".into()],
            }),
            health: Some(pulsebell_proto::Health {
                cpu_permille: 125,
                mem_total_kib: 3_884_000,
                temp_decicelsius: Some(512),
                ..Default::default()
            }),
            last_seq: 17_280,
            last_seen_ms: Some(1_764_500_000_000),
            generation: 3,
            online: true,
            last_offline_reason: Some(Reason::Silent),
            link: LinkStats {
                pulses: 17_280,
                missed_pulses: 2,
                late_pulses: 1,
                connects_ms: vec![1_764_400_000_000],
                rtt_ms: Some(1.5),
            },
            checks: vec![],
            action_info: vec![],
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn device_records_are_postcard_and_earlier_json_ones_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let rec = device_record();
        let json = serde_json::to_vec(&rec).unwrap();
        {
            let s = SledStore::open(dir.path(), 1 << 20).unwrap();
            s.put_device_states(&[("new".into(), rec.clone())]).await.unwrap();
            // As an earlier version wrote it.
            s.inner.devices.insert("old", json.clone()).unwrap();
            let stored = s.inner.devices.get("new").unwrap().unwrap();
            assert_eq!(stored[0], DEVICE_RECORD_POSTCARD);
            assert!(stored.len() * 3 < json.len(), "postcard {} B vs JSON {} B", stored.len(), json.len());
            s.inner.db.flush().unwrap();
        }
        let s = reopen(dir.path());
        let mut states = s.device_states().await.unwrap();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(states, [("new".to_string(), rec.clone()), ("old".to_string(), rec)]);
        // Neither format: a clear error naming the record.
        s.inner.devices.insert("bad", vec![0xff, 1, 2]).unwrap();
        let err = s.device_states().await.unwrap_err().to_string();
        assert!(err.contains("devices") && err.contains("bad"), "{err}");
    }

    /// The stored layout of a device record. postcard is not self-describing:
    /// when this fails because `DeviceRecord` (or `Hello`, `Health`,
    /// `LinkStats`) changed, records on disk no longer decode. Give the new
    /// layout a new format tag and keep reading the old one (see
    /// `DEVICE_RECORD_POSTCARD`); then update these bytes.
    #[test]
    fn device_record_layout_is_frozen() {
        // Tag 1, as versions before checks wrote it: still reads, with none.
        let v1 = concat!(
            "0101010470692d3705302e312e302436663163326139652d346237642d346530612d396333662d30",
            "30303030303030303030370470692d371e44656269616e20474e552f4c696e75782031322028626f",
            "6f6b776f726d2911362e362e33312b7270742d7270692d76380761617263683634011e5261737062",
            "657272792050692034204d6f64656c20422052657620312e34904e010473686f70020470696e6706",
            "7265626f6f74017d000000e087ed0100000000000180080000000080870101809a95a3ad33030101",
            "0380870102010180d8bdf3ac3301000000000000f83f",
        );
        assert_eq!(decode_device(b"pi-7", &hex::decode(v1).unwrap()).unwrap(), device_record());
        // Tag 2: the same bytes, then the checks and the actions.
        let mut rec = device_record();
        rec.checks = vec![pulsebell_proto::CheckResult {
            name: "app".into(),
            kind: pulsebell_proto::CheckKind::Unit,
            status: pulsebell_proto::CheckStatus::Critical,
            summary: "app.service is failed".into(),
            output: String::new(),
            since_ms: 1_764_500_000_000,
        }];
        rec.action_info = vec![pulsebell_proto::ActionInfo {
            name: "reboot".into(),
            params: vec![],
            disruptive: true,
            reboots: true,
        }];
        let bytes = encode_device(&rec).unwrap();
        // One check: name, kind (unit), status (critical), summary, no
        // output, since. One action: name, no params, disruptive, reboots.
        let golden = format!(
            "02{}01036170700002156170702e73657276696365206973206661696c656400809a95a3ad33{}",
            &v1[2..],
            "01067265626f6f74000101"
        );
        assert_eq!(hex::encode(&bytes), golden, "device record layout changed");
        assert_eq!(decode_device(b"pi-7", &bytes).unwrap(), rec);
        assert_eq!(
            encode_device(&device_record()).unwrap()[1..],
            hex::decode(v1).unwrap()[1..].iter().chain(&[0, 0]).copied().collect::<Vec<_>>()[..]
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn everything_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path(), 1 << 20).unwrap();
            s.put_enrolments(&[Enrolment {
                device: "a".into(),
                key_id: "k".into(),
                secret_sha256: "h".into(),
                created_ms: 1,
                tags: vec![],
                provisioned_by: None,
            }])
            .await
            .unwrap();
            s.put_device_states(&[("a".into(), DeviceRecord { last_seq: 7, ..Default::default() })]).await.unwrap();
            let id1 = s.next_bell_id().await.unwrap();
            let id2 = s.next_bell_id().await.unwrap();
            assert!(id2 > id1 && id1 >= 1);
            s.put_bells(&[bell(id1, "a", BellStatus::Queued), bell(id2, "b", BellStatus::Succeeded)]).await.unwrap();
            s.append_events(&[EventRecord {
                device: "a".into(),
                kind: EventKind::Online,
                reason: Reason::Connected,
                at_ms: 5,
                generation: 1,
                check: None,
            }])
            .await
            .unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.enrolments().await.unwrap().len(), 1);
        assert_eq!(s.device_states().await.unwrap()[0].1.last_seq, 7);
        let pending = s.pending_bells().await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].device, "a");
        assert_eq!(s.bells(Some("b"), 10).await.unwrap().len(), 1);
        assert_eq!(s.bells(None, 10).await.unwrap().len(), 2);
        // A final state leaves the pending index.
        s.put_bells(&[bell(pending[0].id, "a", BellStatus::Cancelled)]).await.unwrap();
        assert!(s.pending_bells().await.unwrap().is_empty());
        assert_eq!(s.events(Some("a"), 0, 10).await.unwrap().len(), 1);
        assert_eq!(s.events(Some("a"), 6, 10).await.unwrap().len(), 0);
        assert_eq!(s.prune(6, 0, &[]).await.unwrap(), 1);
        // History: minutes of one hour share a key; reads filter by minute.
        let h = pulsebell_proto::Health { cpu_permille: 500, ..Default::default() };
        let bucket = |m: u32| ("a".to_string(), crate::history::Accumulator::new(m, &h).bucket());
        s.put_history(&[bucket(600), bucket(601), bucket(659), bucket(660), bucket(601)]).await.unwrap();
        let got: Vec<u32> = s.history("a", 601).await.unwrap().iter().map(|b| b.minute).collect();
        assert_eq!(got, [601, 659, 660]);
        assert_eq!(s.history("a", 0).await.unwrap()[0].cpu.avg, 50.0);
        assert_eq!(s.prune(0, 660, &["a".to_string()]).await.unwrap(), 1, "the hour 600..659 goes");
        assert_eq!(s.history("a", 0).await.unwrap().len(), 1);
        assert!(s.delete_device("a").await.unwrap());
        assert!(s.history("a", 0).await.unwrap().is_empty());
        assert!(s.enrolments().await.unwrap().is_empty());
        assert!(s.bell(12345).await.unwrap().is_none());
        // Generations grow past the floor and past every earlier claim.
        assert_eq!(s.claim("a", "n", 0).await.unwrap(), 1);
        assert_eq!(s.claim("a", "n", 7).await.unwrap(), 8);
        assert_eq!(s.claim("a", "n", 0).await.unwrap(), 9);
    }

    /// A store written before bells had their own database: its bells, their
    /// indexes and the bell counter move over on open, once.
    #[tokio::test(flavor = "multi_thread")]
    async fn bells_of_an_earlier_version_move_to_their_own_database() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The earlier layout: everything in one database.
            let db = ::sled::open(dir.path()).unwrap();
            let queued = bell(6, "a", BellStatus::Queued);
            let done = bell(7, "b", BellStatus::Succeeded);
            let bells = db.open_tree("bells").unwrap();
            for b in [&queued, &done] {
                bells.insert(b.id.to_be_bytes(), serde_json::to_vec(b).unwrap()).unwrap();
                db.open_tree("bells_by_device").unwrap().insert(by_device_key(&b.device, b.id), &[]).unwrap();
            }
            db.open_tree("bells_pending").unwrap().insert(6u64.to_be_bytes(), &[]).unwrap();
            db.open_tree("meta").unwrap().insert("bell_seq", &7u64.to_be_bytes()).unwrap();
            db.open_tree("meta").unwrap().insert("instance", "0123456789abcdef").unwrap();
            db.flush().unwrap();
        }
        for round in 0..2 {
            let s = reopen(dir.path());
            assert_eq!(s.instance_id(), "0123456789abcdef");
            let pending = s.pending_bells().await.unwrap();
            assert_eq!(pending.iter().map(|b| b.id).collect::<Vec<_>>(), [6], "round {round}");
            assert_eq!(s.bells(Some("b"), 10).await.unwrap()[0].state, BellStatus::Succeeded);
            assert_eq!(s.bells(None, 10).await.unwrap().len(), 2 + round);
            // The counter carries on from the old one.
            let id = s.next_bell_id().await.unwrap();
            assert_eq!(id, 8 + round as u64);
            s.put_bells(&[bell(id, "c", BellStatus::Succeeded)]).await.unwrap();
            // The main database no longer holds bells.
            let names = s.inner.db.tree_names();
            assert!(!names.iter().any(|n| n.as_ref() == b"bells"), "round {round}");
            assert!(s.inner.db.open_tree("meta").unwrap().get("bell_seq").unwrap().is_none());
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn bell_updates_compare_and_set() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 1 << 20).unwrap();
        s.put_bells(&[bell(1, "a", BellStatus::Queued)]).await.unwrap();
        let to_sent = |b: &BellRecord| {
            (b.state == BellStatus::Queued).then(|| BellRecord { state: BellStatus::Sent, ..b.clone() })
        };
        let got = s.update_bell(1, &to_sent).await.unwrap().unwrap();
        assert_eq!((got.state, got.version), (BellStatus::Sent, 1));
        assert!(s.update_bell(1, &to_sent).await.unwrap().is_none(), "no longer queued");
        assert!(s.update_bell(2, &to_sent).await.unwrap().is_none(), "no such bell");
        let done = |b: &BellRecord| Some(BellRecord { state: BellStatus::Succeeded, ..b.clone() });
        assert_eq!(s.update_bell(1, &done).await.unwrap().unwrap().version, 2);
        assert!(s.pending_bells().await.unwrap().is_empty());
    }
}
