//! Zero-touch enrolment: provisioning keys.
//!
//! An operator creates a key (`provision create`); it goes into one image
//! flashed onto many boards. On first start, an agent with the key and no
//! token connects to [`pulsebell_proto::provision::PROVISION_PATH`] on the
//! device listener, presents the key and its device id, and gets its own
//! device token; later starts use that token.
//!
//! Trust model: the key lets its holder enrol *new* device ids (never an id
//! that is already enrolled: no takeover), within its uses and lifetime,
//! with the key's tags. A leaked key lets an attacker add bogus devices,
//! not impersonate existing ones; revoke it (`provision revoke ID`) and
//! revoke the bogus devices. Only a hash of the secret is stored; it is
//! compared in constant time; failures are throttled per source address;
//! every enrolment is an event (`provisioned`) and an alert.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::{self, PROVISION_PREFIX};
use crate::clock::{now_ms, rfc3339};
use crate::fleet::Fleet;
use crate::store::{ProvisionKey, Store};

/// Why a redemption was refused (the close reason the agent sees).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a provisioning key.
    #[error("malformed provisioning key")]
    Malformed,
    /// No such key, or a wrong secret.
    #[error("unknown provisioning key")]
    Unknown,
    /// Revoked by an operator.
    #[error("provisioning key revoked")]
    Revoked,
    /// Past its lifetime.
    #[error("provisioning key expired")]
    Expired,
    /// No uses left.
    #[error("provisioning key used up")]
    UsedUp,
    /// A device with that id is already enrolled.
    #[error("device id already enrolled")]
    Taken,
    /// The store failed; try again later.
    #[error("collector store unavailable; try again later")]
    Unavailable,
}

/// A key as listed (`provision list --json`), without its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyView {
    /// Id.
    pub id: String,
    /// The key itself: only in the answer to `create`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key: Option<String>,
    /// SHA-256 fingerprint of the collector's CA (`sha256:<hex>`) for the
    /// agents' `ca_fingerprint`; null when the CA is not in the served chain.
    pub ca_fingerprint: Option<String>,
    /// Tags given to enrolled devices.
    pub tags: Vec<String>,
    /// Uses left; null: unlimited.
    pub uses_left: Option<u32>,
    /// Expiry, RFC 3339; null: none.
    pub expires_at: Option<String>,
    /// Devices enrolled with it.
    pub used: u32,
    /// Revoked.
    pub revoked: bool,
    /// Created, RFC 3339.
    pub created_at: String,
}

/// Provisioning keys and their redemption.
pub struct Provisioning {
    fleet: Arc<Fleet>,
    store: Arc<dyn Store>,
    ca_fingerprint: Option<String>,
}

impl Provisioning {
    /// Keys in `fleet`'s store; agents pin `ca_fingerprint`.
    pub fn new(fleet: Arc<Fleet>, ca_fingerprint: Option<String>) -> Provisioning {
        let store = fleet.store().clone();
        Provisioning { fleet, store, ca_fingerprint }
    }

    fn view(&self, k: &ProvisionKey, key: Option<String>) -> KeyView {
        KeyView {
            id: k.id.clone(),
            key,
            ca_fingerprint: self.ca_fingerprint.clone(),
            tags: k.tags.clone(),
            uses_left: k.uses_left,
            expires_at: k.expires_ms.map(rfc3339),
            used: k.used,
            revoked: k.revoked,
            created_at: rfc3339(k.created_ms),
        }
    }

    /// Creates a key. Durable. The view carries the key (shown once).
    pub async fn create(&self, tags: Vec<String>, uses: Option<u32>, ttl: Option<Duration>) -> anyhow::Result<KeyView> {
        let t = auth::generate_with(PROVISION_PREFIX);
        let now = now_ms();
        let k = ProvisionKey {
            id: t.key_id,
            secret_sha256: t.secret_sha256,
            tags,
            uses_left: uses,
            expires_ms: ttl.map(|d| now + d.as_millis() as u64),
            revoked: false,
            created_ms: now,
            used: 0,
        };
        self.store.put_provision_key(&k).await?;
        Ok(self.view(&k, Some(t.token)))
    }

    /// Every key, oldest first.
    pub async fn list(&self) -> anyhow::Result<Vec<KeyView>> {
        let mut keys = self.store.provision_keys().await?;
        keys.sort_by_key(|k| k.created_ms);
        Ok(keys.iter().map(|k| self.view(k, None)).collect())
    }

    /// Revokes a key. Durable. Whether it exists.
    pub async fn revoke(&self, id: &str) -> anyhow::Result<bool> {
        let done = self
            .store
            .update_provision_key(id, &|k| (!k.revoked).then(|| ProvisionKey { revoked: true, ..k.clone() }))
            .await?;
        Ok(done.is_some() || self.store.provision_keys().await?.iter().any(|k| k.id == id))
    }

    /// Enrols `device_id` with `key`: checks the key, takes one use
    /// (compare-and-set), enrols the id if nobody has it. The device token.
    pub async fn redeem(&self, key: &str, device_id: &str) -> Result<String, Refusal> {
        let (id, secret) = auth::parse_with(PROVISION_PREFIX, key).ok_or(Refusal::Malformed)?;
        if self.fleet.exists(device_id) {
            return Err(Refusal::Taken);
        }
        let now = now_ms();
        // Decided inside the compare-and-set, on the current record.
        let verdict = std::sync::Mutex::new(Refusal::Unknown);
        let take = |k: &ProvisionKey| {
            let refuse = |r| {
                *verdict.lock().expect("verdict lock") = r;
                None
            };
            if !auth::verify_secret(secret, &k.secret_sha256) {
                return refuse(Refusal::Unknown);
            }
            if k.revoked {
                return refuse(Refusal::Revoked);
            }
            if k.expires_ms.is_some_and(|e| e <= now) {
                return refuse(Refusal::Expired);
            }
            if k.uses_left == Some(0) {
                return refuse(Refusal::UsedUp);
            }
            Some(ProvisionKey { uses_left: k.uses_left.map(|n| n - 1), used: k.used + 1, ..k.clone() })
        };
        let taken = self.store.update_provision_key(id, &take).await.map_err(|_| Refusal::Unavailable)?;
        let Some(k) = taken else { return Err(*verdict.lock().expect("verdict lock")) };
        match self.fleet.enroll_new(device_id, k.tags.clone(), &k.id).await {
            Ok(Some(token)) => Ok(token),
            Ok(None) => {
                // Someone enrolled the id meanwhile: give the use back.
                let _ = self
                    .store
                    .update_provision_key(id, &|k| {
                        Some(ProvisionKey {
                            uses_left: k.uses_left.map(|n| n + 1),
                            used: k.used.saturating_sub(1),
                            ..k.clone()
                        })
                    })
                    .await;
                Err(Refusal::Taken)
            }
            Err(_) => Err(Refusal::Unavailable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::MemoryStore;

    async fn setup() -> (Provisioning, Arc<Fleet>) {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let fleet = Fleet::load(Arc::new(Config::default()), "n1".into(), store).await.unwrap();
        (Provisioning::new(fleet.clone(), Some("sha256:00".into())), fleet)
    }

    #[tokio::test]
    async fn a_key_enrols_new_ids_within_its_uses_and_never_an_existing_one() {
        let (p, fleet) = setup().await;
        let k = p.create(vec!["shop".into()], Some(2), None).await.unwrap();
        let key = k.key.clone().unwrap();
        assert_eq!(k.ca_fingerprint.as_deref(), Some("sha256:00"));

        let token = p.redeem(&key, "pi-1").await.unwrap();
        assert_eq!(fleet.authenticate(&token).unwrap(), "pi-1");
        assert_eq!(fleet.view("pi-1").unwrap().tags, ["shop"]);
        // The same id again: taken, and no use spent.
        assert_eq!(p.redeem(&key, "pi-1").await, Err(Refusal::Taken));
        fleet.enroll(&["pi-manual".to_string()], false).await.unwrap();
        assert_eq!(p.redeem(&key, "pi-manual").await, Err(Refusal::Taken));
        // A wrong secret with the right id: unknown, no use spent.
        let (id, _) = auth::parse_with(PROVISION_PREFIX, &key).unwrap();
        let forged = format!("{PROVISION_PREFIX}.{id}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
        assert_eq!(p.redeem(&forged, "pi-2").await, Err(Refusal::Unknown));
        assert_eq!(p.redeem("nonsense", "pi-2").await, Err(Refusal::Malformed));

        p.redeem(&key, "pi-2").await.unwrap();
        assert_eq!(p.redeem(&key, "pi-3").await, Err(Refusal::UsedUp));
        let listed = p.list().await.unwrap();
        assert_eq!((listed[0].used, listed[0].uses_left, listed[0].key.is_none()), (2, Some(0), true));
    }

    #[tokio::test]
    async fn revoked_and_expired_keys_enrol_nothing() {
        let (p, fleet) = setup().await;
        let revoked = p.create(vec![], None, None).await.unwrap();
        assert!(p.revoke(&revoked.id).await.unwrap());
        assert!(!p.revoke("0000000000000000").await.unwrap());
        assert_eq!(p.redeem(revoked.key.as_deref().unwrap(), "pi-r").await, Err(Refusal::Revoked));
        let expired = p.create(vec![], None, Some(Duration::ZERO)).await.unwrap();
        assert_eq!(p.redeem(expired.key.as_deref().unwrap(), "pi-e").await, Err(Refusal::Expired));
        assert!(!fleet.exists("pi-r") && !fleet.exists("pi-e"));
    }
}
