//! Static facts about the device, sent once per connection in the Hello.

use std::path::Path;

use pulsebell_proto::MAX_STRING;
use serde::Serialize;

use super::read_text;

/// Facts that do not change while the system runs. Each string is at most
/// [`MAX_STRING`] bytes so the Hello always passes the protocol's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SystemFacts {
    /// Linux boot id; changes on every boot. Empty if unreadable.
    pub boot_id: String,
    /// Hostname. Empty if unreadable.
    pub hostname: String,
    /// `PRETTY_NAME` from os-release, or "Linux" as the os-release spec says.
    pub os: String,
    /// Kernel release. Empty if unreadable.
    pub kernel: String,
    /// CPU architecture the agent was built for.
    pub arch: String,
    /// Board model from the device tree or DMI, if known.
    pub board_model: Option<String>,
}

/// Reads the static facts from the tree under `root` (`/` in production).
/// Never fails: what cannot be read is empty, the documented default or
/// `None`.
pub fn facts(root: &Path) -> SystemFacts {
    let trimmed = |rel: &str| read_text(&root.join(rel)).map_or_else(String::new, |s| truncate(s.trim().to_owned()));
    // The os-release spec: read /etc first, /usr/lib only if it is absent.
    let os = read_text(&root.join("etc/os-release"))
        .or_else(|| read_text(&root.join("usr/lib/os-release")))
        .and_then(|text| pretty_name(&text))
        .unwrap_or_else(|| "Linux".to_owned());
    SystemFacts {
        boot_id: trimmed("proc/sys/kernel/random/boot_id"),
        hostname: trimmed("proc/sys/kernel/hostname"),
        os: truncate(os),
        kernel: trimmed("proc/sys/kernel/osrelease"),
        arch: std::env::consts::ARCH.to_owned(),
        board_model: board_model(root).map(truncate),
    }
}

/// Cuts `s` to at most [`MAX_STRING`] bytes without splitting a character.
fn truncate(mut s: String) -> String {
    if s.len() > MAX_STRING {
        let mut end = MAX_STRING;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The unquoted `PRETTY_NAME` of an os-release file; `None` if absent or
/// empty. Values are shell-like: double quotes allow `\"`, `\\`, `\$` and
/// `` \` `` escapes, single quotes none.
pub(super) fn pretty_name(text: &str) -> Option<String> {
    let raw = text
        .lines()
        .rev() // like the shell, the last assignment wins
        .find_map(|l| l.trim().strip_prefix("PRETTY_NAME="))?
        .trim();
    let value = if let Some(inner) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match (c, chars.clone().next()) {
                ('\\', Some(next @ ('"' | '\\' | '$' | '`'))) => {
                    out.push(next);
                    chars.next();
                }
                _ => out.push(c),
            }
        }
        out
    } else if let Some(inner) = raw.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        inner.to_owned()
    } else {
        raw.to_owned()
    };
    let value = value.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

/// Device-tree model strings end in NUL bytes.
pub(super) fn clean_dt_model(s: &str) -> Option<String> {
    let s = s.trim_end_matches('\0').trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// DMI product name, unless it is a firmware placeholder that says nothing.
pub(super) fn clean_dmi_product(s: &str) -> Option<String> {
    const JUNK: [&str; 7] = [
        "to be filled by o.e.m.",
        "system product name",
        "default string",
        "not specified",
        "not applicable",
        "none",
        "unknown",
    ];
    let s = s.trim();
    let lower = s.to_ascii_lowercase();
    (!s.is_empty() && !JUNK.contains(&lower.as_str())).then(|| s.to_owned())
}

/// Board model: device tree (ARM boards) first, then DMI (PCs, some SBCs).
fn board_model(root: &Path) -> Option<String> {
    ["proc/device-tree/model", "sys/firmware/devicetree/base/model"]
        .iter()
        .find_map(|rel| clean_dt_model(&read_text(&root.join(rel))?))
        .or_else(|| clean_dmi_product(&read_text(&root.join("sys/class/dmi/id/product_name"))?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use tempfile::TempDir;

    fn put(root: &Path, rel: &str, contents: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    #[test]
    fn pretty_name_unquoting() {
        assert_eq!(
            pretty_name("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n").as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(pretty_name("PRETTY_NAME='Alpine Linux v3.20'").as_deref(), Some("Alpine Linux v3.20"));
        assert_eq!(pretty_name("PRETTY_NAME=Arch").as_deref(), Some("Arch"));
        assert_eq!(pretty_name("PRETTY_NAME=Old\nPRETTY_NAME=New\n").as_deref(), Some("New"));
        assert_eq!(pretty_name(r#"PRETTY_NAME="My \"Pi\" \\ \$5 \n""#).as_deref(), Some(r#"My "Pi" \ $5 \n"#));
        assert_eq!(pretty_name("PRETTY_NAME=\"\"\n"), None);
        assert_eq!(pretty_name("NAME=Debian\n#PRETTY_NAME=x\n"), None);
    }

    #[test]
    fn model_cleanup() {
        assert_eq!(
            clean_dt_model("Raspberry Pi 5 Model B Rev 1.0\0").as_deref(),
            Some("Raspberry Pi 5 Model B Rev 1.0")
        );
        assert_eq!(clean_dt_model("\0\0"), None);
        assert_eq!(clean_dmi_product("OptiPlex 7050\n").as_deref(), Some("OptiPlex 7050"));
        assert_eq!(clean_dmi_product("To Be Filled By O.E.M.\n"), None);
        assert_eq!(clean_dmi_product("Default string"), None);
        assert_eq!(clean_dmi_product("  \n"), None);
    }

    #[test]
    fn truncates_at_char_boundary() {
        assert_eq!(truncate("a".repeat(300)).len(), MAX_STRING);
        // 86 three-byte chars = 258 bytes: cut to 85 whole chars, 255 bytes.
        let t = truncate("€".repeat(86));
        assert_eq!(t, "€".repeat(85));
        assert_eq!(truncate("short".into()), "short");
    }

    #[test]
    fn fallbacks() {
        let dir = TempDir::new().unwrap();
        let r = dir.path();
        put(r, "usr/lib/os-release", "PRETTY_NAME=\"Fedora Linux 40\"\n");
        put(r, "sys/firmware/devicetree/base/model", "Pine64 RockPro64\0");
        put(r, "sys/class/dmi/id/product_name", "ignored\n");
        put(r, "proc/sys/kernel/hostname", &"é".repeat(200));
        let f = facts(r);
        assert_eq!(f.os, "Fedora Linux 40");
        assert_eq!(f.board_model.as_deref(), Some("Pine64 RockPro64"));
        assert_eq!(f.hostname, "é".repeat(128));

        // /etc/os-release exists without PRETTY_NAME: /usr/lib is not consulted.
        put(r, "etc/os-release", "NAME=Thing\n");
        fs::remove_file(r.join("sys/firmware/devicetree/base/model")).unwrap();
        let f = facts(r);
        assert_eq!(f.os, "Linux");
        assert_eq!(f.board_model.as_deref(), Some("ignored"));

        put(r, "sys/class/dmi/id/product_name", "System Product Name\n");
        assert_eq!(facts(r).board_model, None);
    }
}
