//! Zero-touch enrolment: an agent with a provisioning key and no token asks
//! the collector, over the same TLS listener, for its own device token.
//!
//! The agent opens a WebSocket to [`PROVISION_PATH`] with the provisioning
//! key as its bearer token and the device id in [`DEVICE_ID_HEADER`]. The
//! collector answers with one binary frame holding a postcard
//! [`Provisioned`] and closes normally, or closes with
//! [`crate::close::POLICY`] (1008) and the reason (`key expired`,
//! `device id taken`, …) when it refuses.

use serde::{Deserialize, Serialize};

use crate::codec::{DecodeError, Validate};
use crate::limits::{valid_device_id, MAX_STRING};

/// Where agents provision.
pub const PROVISION_PATH: &str = "/v1/provision";
/// Header carrying the device id the agent asks for.
pub const DEVICE_ID_HEADER: &str = "pulsebell-device-id";

/// The collector's answer: the device's own token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provisioned {
    /// The device id, as enrolled.
    pub device_id: String,
    /// The device token (keep it like a password).
    pub token: String,
}

impl Validate for Provisioned {
    fn validate(&self) -> Result<(), DecodeError> {
        if !valid_device_id(&self.device_id) {
            return Err(DecodeError::Malformed("not a valid device id".into()));
        }
        if self.token.is_empty() || self.token.len() > MAX_STRING || !self.token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(DecodeError::Malformed("not a valid token".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let p = Provisioned { device_id: "pi-1".into(), token: "pb1.0123456789abcdef.secret".into() };
        let bytes = crate::encode(&p).unwrap();
        assert_eq!(crate::decode::<Provisioned>(&bytes).unwrap(), p);
        let bad = Provisioned { device_id: "pi 1".into(), ..p.clone() };
        assert!(crate::decode::<Provisioned>(&crate::encode(&bad).unwrap()).is_err());
        let bad = Provisioned { token: "with space".into(), ..p };
        assert!(crate::decode::<Provisioned>(&crate::encode(&bad).unwrap()).is_err());
    }
}
