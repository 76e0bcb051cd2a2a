//! Feeds arbitrary bytes to every decoder of the wire protocol. Decoding must
//! never panic, and whatever decodes must re-encode to bytes that decode to
//! the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pulsebell_proto::{decode, encode, peek_hello_version, AgentMsg, ServerMsg};

fuzz_target!(|data: &[u8]| {
    let _ = peek_hello_version(data);
    if let Ok(msg) = decode::<AgentMsg>(data) {
        let bytes = encode(&msg).expect("a decoded message re-encodes");
        assert_eq!(decode::<AgentMsg>(&bytes).expect("round trip"), msg);
    }
    if let Ok(msg) = decode::<ServerMsg>(data) {
        let bytes = encode(&msg).expect("a decoded message re-encodes");
        assert_eq!(decode::<ServerMsg>(&bytes).expect("round trip"), msg);
    }
});
