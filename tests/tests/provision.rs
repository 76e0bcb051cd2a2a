//! Zero-touch enrolment with provisioning keys (issue 11): one config for
//! many boards, the collector's CA pinned by fingerprint, refusals, and
//! the saved token on later starts.

use std::path::Path;
use std::time::Duration;

use pulsebell_tests::serde_json::{self, Value};
use pulsebell_tests::{toml_str, wait_until, Agent, Collector};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("pulsebell-provision-").tempdir().expect("temp dir")
}

/// `provision create --json` with extra arguments.
fn create_key(collector: &Collector, args: &[&str]) -> Value {
    let mut full = vec!["provision", "create", "--json"];
    full.extend_from_slice(args);
    let out = collector.cli_ok(&full);
    serde_json::from_slice(&out.stdout).expect("provision create --json")
}

/// An image's agent config: the key, the CA pinned by fingerprint (no CA
/// file), a device id template.
fn image_config(collector: &Collector, dir: &Path, key: &str, fingerprint: &str, device_id: &str) -> String {
    format!(
        "collector_url = {}\ndevice_id = {}\nprovision_key = {}\nca_fingerprint = {}\ninterval = \"400ms\"\nstate_dir = {}\n",
        toml_str(&collector.device_url()),
        toml_str(device_id),
        toml_str(key),
        toml_str(fingerprint),
        toml_str(&dir.join("state").to_string_lossy()),
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname").trim().to_string()
}

#[test]
fn a_flashed_image_enrols_itself_pins_the_ca_and_keeps_its_token() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let key = create_key(&collector, &["--tag", "greenhouse", "--uses", "5", "--ttl", "1h"]);
    let secret = key["key"].as_str().expect("key shown once").to_string();
    let fingerprint = key["ca_fingerprint"].as_str().expect("ca_fingerprint").to_string();
    assert_eq!(key["uses_left"], 5);
    assert_eq!(key["tags"], serde_json::json!(["greenhouse"]));
    assert!(key["expires_at"].is_string(), "{key}");

    let id = format!("pi-{}", hostname());
    let mut agent = Agent::start_with_config(&collector, "image", |dir| {
        image_config(&collector, dir, &secret, &fingerprint, "pi-{hostname}")
    });
    let d = collector.wait_for_state(&id, "online");
    assert!(d["tags"].as_array().unwrap().iter().any(|t| t == "greenhouse"), "the key's tags: {d}");
    // The token was saved (0600), and the pinned CA is the collector's.
    let state = agent.dir().join("state");
    let token = std::fs::read_to_string(state.join("device.token")).expect("saved token");
    assert!(token.trim().starts_with("pb1."), "{token}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("device.token")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let saved_ca = std::fs::read_to_string(state.join("ca.pem")).expect("pinned CA saved");
    assert_eq!(saved_ca.trim(), std::fs::read_to_string(collector.ca_file()).unwrap().trim());

    // Listed without the key; one use taken; an event and the tags.
    let out = collector.cli_ok(&["provision", "list", "--json"]);
    let keys: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(keys[0]["uses_left"], 4, "{keys}");
    assert_eq!(keys[0]["used"], 1, "{keys}");
    assert!(keys[0].get("key").is_none(), "the key is shown once: {keys}");
    let out = collector.cli_ok(&["events", &id, "--json"]);
    let events: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(events[0]["kind"], "provisioned", "{events}");

    // Revoke the key: the enrolled device keeps working on its saved token.
    collector.cli_ok(&["provision", "revoke", key["id"].as_str().unwrap()]);
    agent.stop();
    collector.wait_for_state(&id, "offline");
    agent.restart();
    collector.wait_for_state(&id, "online");
    assert_eq!(agent.log().text().matches("provisioned").count(), 1, "provisioned once:\n{}", agent.log().text());
}

/// Waits for the agent's log to say why provisioning was refused.
fn refused(agent: &Agent, why: &str) {
    wait_until(&format!("provisioning refused: {why}"), Duration::from_secs(20), || {
        let log = agent.log().text();
        if log.contains("provisioning refused") && log.contains(why) {
            Ok(())
        } else {
            Err(log)
        }
    });
}

#[test]
fn used_up_expired_revoked_keys_and_taken_ids_are_refused() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let fp_of = |k: &Value| k["ca_fingerprint"].as_str().unwrap().to_string();
    let start = |label: &str, key: &Value, id: &str| {
        let secret = key["key"].as_str().unwrap().to_string();
        let fp = fp_of(key);
        Agent::start_with_config(&collector, label, |dir| image_config(&collector, dir, &secret, &fp, id))
    };

    // One use: the first board gets it, the second is refused.
    let once = create_key(&collector, &["--uses", "1"]);
    let _first = start("first", &once, "board-1");
    collector.wait_for_state("board-1", "online");
    let second = start("second", &once, "board-2");
    refused(&second, "provisioning key used up");

    // Expired.
    let short = create_key(&collector, &["--ttl", "1"]);
    wait_until("the key to expire", Duration::from_secs(10), || {
        let out = collector.cli_ok(&["provision", "list", "--json"]);
        let keys: Value = serde_json::from_slice(&out.stdout).unwrap();
        let k = keys.as_array().unwrap().iter().find(|k| k["id"] == short["id"]).cloned().unwrap();
        let at = pulsebell_tests::parse_time(&k["expires_at"])?;
        if at < time::OffsetDateTime::now_utc() {
            Ok(())
        } else {
            Err(format!("{k}"))
        }
    });
    let late = start("late", &short, "board-3");
    refused(&late, "provisioning key expired");

    // Revoked.
    let gone = create_key(&collector, &[]);
    collector.cli_ok(&["provision", "revoke", gone["id"].as_str().unwrap()]);
    let revoked = start("revoked", &gone, "board-4");
    refused(&revoked, "provisioning key revoked");

    // No takeover: an enrolled id cannot be provisioned, even with a good key.
    let _token = collector.enroll("pi-existing");
    let good = create_key(&collector, &[]);
    let thief = start("thief", &good, "pi-existing");
    refused(&thief, "device id already enrolled");
    let out = collector.cli_ok(&["provision", "list", "--json"]);
    let keys: Value = serde_json::from_slice(&out.stdout).unwrap();
    let k = keys.as_array().unwrap().iter().find(|k| k["id"] == good["id"]).cloned().unwrap();
    assert_eq!(k["used"], 0, "a refused takeover uses nothing: {k}");

    for id in ["board-2", "board-3", "board-4"] {
        assert!(collector.device(id).is_none(), "{id} must not be enrolled");
    }
}

/// A wrong fingerprint: the agent refuses the collector (TLS) and enrols
/// nothing.
#[test]
fn a_wrong_ca_fingerprint_is_refused() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let key = create_key(&collector, &[]);
    let secret = key["key"].as_str().unwrap().to_string();
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let agent =
        Agent::start_with_config(&collector, "mitm", |dir| image_config(&collector, dir, &secret, &wrong, "board-x"));
    wait_until("a TLS failure", Duration::from_secs(20), || {
        let log = agent.log().text();
        if log.contains("ca_fingerprint") {
            Ok(())
        } else {
            Err(log)
        }
    });
    assert!(collector.device("board-x").is_none());
    assert!(!agent.dir().join("state/ca.pem").exists());
}
