//! The bell journal: what the agent did with each bell, kept on disk so a
//! re-delivered bell is answered from the record instead of running twice.
//!
//! A record is written (and fsynced) *before* an action starts and again
//! when it ends. The file holds the newest [`JOURNAL_LIMIT`] bells and is
//! replaced atomically (write, fsync, rename), so a crash leaves either the
//! old or the new journal, never half of one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use pulsebell_proto::BellReport;
use serde::{Deserialize, Serialize};

/// How many bells the journal remembers. The collector re-delivers only
/// bells it has not seen finish, so only recent ones can come back.
pub const JOURNAL_LIMIT: usize = 512;

/// File name inside the state directory.
pub const JOURNAL_FILE: &str = "bells.journal.json";

/// One bell as the agent knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// The action was started (or, for a reboot, asked for) on this boot,
    /// at this Unix time in milliseconds, with this timeout.
    Started {
        /// Boot id when it started.
        boot_id: String,
        /// Start, Unix ms.
        started_ms: u64,
        /// Timeout in ms.
        timeout_ms: u64,
        /// Whether the action reboots the board.
        reboots: bool,
    },
    /// The final report.
    Done(JournaledReport),
}

/// A [`BellReport`] in a serde-friendly shape for the journal file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournaledReport {
    state: String,
    exit_code: Option<i32>,
    output: String,
    duration_ms: u64,
    reason: Option<String>,
}

impl JournaledReport {
    /// From a final report.
    pub fn from_report(r: &BellReport) -> Self {
        JournaledReport {
            state: format!("{:?}", r.state),
            exit_code: r.exit_code,
            output: r.output.clone(),
            duration_ms: r.duration_ms,
            reason: r.reason.clone(),
        }
    }

    /// Back to a report for bell `id`.
    pub fn to_report(&self, id: u64) -> BellReport {
        use pulsebell_proto::BellState::*;
        let state = match self.state.as_str() {
            "Succeeded" => Succeeded,
            "TimedOut" => TimedOut,
            "Rejected" => Rejected,
            "Cancelled" => Cancelled,
            _ => Failed,
        };
        BellReport {
            id,
            state,
            exit_code: self.exit_code,
            output: self.output.clone(),
            duration_ms: self.duration_ms,
            reason: self.reason.clone(),
        }
    }
}

/// The journal, loaded in memory and written through to disk.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    entries: BTreeMap<u64, Entry>,
}

impl Journal {
    /// Opens (or creates) the journal in `state_dir`.
    pub fn open(state_dir: &Path) -> anyhow::Result<Journal> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| anyhow::anyhow!("cannot create state_dir {}: {e}", state_dir.display()))?;
        let path = state_dir.join(JOURNAL_FILE);
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("bell journal {} is corrupt: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => anyhow::bail!("cannot read bell journal {}: {e}", path.display()),
        };
        Ok(Journal { path, entries })
    }

    /// The entry for bell `id`.
    pub fn get(&self, id: u64) -> Option<&Entry> {
        self.entries.get(&id)
    }

    /// Every entry.
    pub fn entries(&self) -> impl Iterator<Item = (&u64, &Entry)> {
        self.entries.iter()
    }

    /// Records `entry` for bell `id` and makes it durable before returning.
    pub fn put(&mut self, id: u64, entry: Entry) -> std::io::Result<()> {
        self.entries.insert(id, entry);
        while self.entries.len() > JOURNAL_LIMIT {
            self.entries.pop_first();
        }
        self.persist()
    }

    fn persist(&self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(&self.entries).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulsebell_proto::BellState;

    #[test]
    fn survives_reopen_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let report = BellReport {
            id: 1,
            state: BellState::Failed,
            exit_code: Some(3),
            output: "oops".into(),
            duration_ms: 12,
            reason: Some("exit status 3".into()),
        };
        j.put(1, Entry::Done(JournaledReport::from_report(&report))).unwrap();
        for id in 2..(JOURNAL_LIMIT as u64 + 10) {
            j.put(id, Entry::Started { boot_id: "b".into(), started_ms: 0, timeout_ms: 1, reboots: false }).unwrap();
        }
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.entries().count(), JOURNAL_LIMIT);
        assert!(j.get(1).is_none(), "oldest entry evicted");
        assert!(j.get(JOURNAL_LIMIT as u64 + 9).is_some());

        let mut j = Journal::open(dir.path()).unwrap();
        j.put(9999, Entry::Done(JournaledReport::from_report(&report))).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        match j.get(9999) {
            Some(Entry::Done(r)) => assert_eq!(r.to_report(9999), BellReport { id: 9999, ..report }),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn corrupt_journal_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(JOURNAL_FILE), b"{not json").unwrap();
        assert!(Journal::open(dir.path()).is_err());
    }
}
