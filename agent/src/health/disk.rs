//! Usage of the filesystem holding a configured path, via `statvfs`.

use std::path::Path;

const MIB: u128 = 1024 * 1024;

/// Total and used size in MiB (rounded down) from `statvfs` fields.
///
/// "Used" is size − space available to unprivileged users, so the blocks
/// reserved for root count as used: a filesystem at 100 % here is one where
/// services running as ordinary users can no longer write, which is what an
/// alert on it should mean. `frsize` of 0 falls back to `bsize`, as old
/// kernels did.
pub(super) fn from_statvfs(blocks: u64, bavail: u64, frsize: u64, bsize: u64) -> (u64, u64) {
    let unit = u128::from(if frsize == 0 { bsize } else { frsize });
    let to_mib = |n: u64| u64::try_from(u128::from(n) * unit / MIB).unwrap_or(u64::MAX);
    (to_mib(blocks), to_mib(blocks.saturating_sub(bavail)))
}

/// Total and used MiB of the filesystem holding `path`; zeros (and a debug
/// log) when it cannot be queried.
pub(super) fn usage(path: &Path) -> (u64, u64) {
    match rustix::fs::statvfs(path) {
        Ok(s) => from_statvfs(s.f_blocks, s.f_bavail, s.f_frsize, s.f_bsize),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "health: statvfs failed");
            (0, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statvfs_fields_to_mib() {
        // 1 GiB of 4 KiB blocks, 256 MiB available to users.
        assert_eq!(from_statvfs(262_144, 65_536, 4096, 4096), (1024, 768));
        // frsize 0 uses bsize; partial MiB rounds down.
        assert_eq!(from_statvfs(300, 44, 0, 4096), (1, 1));
        // Available above size (never seen) does not wrap.
        assert_eq!(from_statvfs(10, 20, 1 << 20, 0), (10, 0));
        // No overflow for absurd sizes.
        assert_eq!(from_statvfs(u64::MAX, 0, u64::MAX, 0), (u64::MAX, u64::MAX));
    }

    #[test]
    fn real_and_missing_paths() {
        let dir = tempfile::TempDir::new().unwrap();
        let (total, used) = usage(dir.path());
        assert!(total > 0 && used <= total);
        assert_eq!(usage(&dir.path().join("missing")), (0, 0));
    }
}
