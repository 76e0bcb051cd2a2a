//! `provision create | list | revoke`: provisioning keys.

use super::client::Client;
use super::ProvisionCommand;
use crate::provision::KeyView;

/// Runs one `provision` subcommand.
pub async fn run(client: &Client, cmd: ProvisionCommand) -> anyhow::Result<()> {
    match cmd {
        ProvisionCommand::Create { tags, uses, ttl, json } => {
            let req = serde_json::json!({ "tags": tags, "uses": uses, "ttl_ms": ttl.map(|d| d.as_millis() as u64) });
            let k: KeyView = client.post("/v1/provision", &req).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&k)?);
                return Ok(());
            }
            println!("provisioning key {} (shown once; put it in the image's agent config as provision_key):", k.id);
            println!("{}", k.key.as_deref().unwrap_or_default());
            match &k.ca_fingerprint {
                Some(f) => println!("ca_fingerprint = \"{f}\""),
                None => println!("(the collector's certificate chain holds no CA to pin: give agents ca_file instead)"),
            }
            println!(
                "tags: {}; uses: {}; expires: {}",
                if k.tags.is_empty() { "-".to_string() } else { k.tags.join(", ") },
                k.uses_left.map_or("unlimited".to_string(), |u| u.to_string()),
                k.expires_at.as_deref().unwrap_or("never")
            );
        }
        ProvisionCommand::List { json } => {
            let keys: Vec<KeyView> = client.get("/v1/provision").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
                return Ok(());
            }
            println!("{:<18} {:<9} {:>5} {:>9} {:<25} TAGS", "ID", "STATE", "USED", "USES LEFT", "EXPIRES");
            for k in keys {
                let state = if k.revoked { "revoked" } else { "active" };
                println!(
                    "{:<18} {:<9} {:>5} {:>9} {:<25} {}",
                    k.id,
                    state,
                    k.used,
                    k.uses_left.map_or("-".to_string(), |u| u.to_string()),
                    k.expires_at.as_deref().unwrap_or("never"),
                    k.tags.join(",")
                );
            }
        }
        ProvisionCommand::Revoke { id } => {
            let _: serde_json::Value = client.delete(&format!("/v1/provision/{id}")).await?;
            println!("revoked provisioning key {id}");
        }
    }
    Ok(())
}
