//! Wire-format tests: round trips, golden bytes, size bound, malformed input.

use proptest::prelude::*;
use pulsebell_proto::*;

fn typical_health() -> Health {
    Health {
        cpu_permille: 31,
        load1_centi: 8,
        load5_centi: 12,
        load15_centi: 9,
        mem_total_kib: 3_884_108,
        mem_used_kib: 412_336,
        swap_total_kib: 102_396,
        swap_used_kib: 0,
        disk_total_mib: 29_612,
        disk_used_mib: 4_730,
        temp_decicelsius: Some(462),
        uptime_secs: 264_117,
        net_rx_bps: 1_830,
        net_tx_bps: 912,
        throttled: Some(Throttled(0)),
    }
}

/// A version-1 Hello: its bytes must never change.
fn hello() -> Hello {
    Hello {
        protocol_version: 1,
        device_id: "pi-1".into(),
        agent_version: "0.1.0".into(),
        boot_id: "b".into(),
        hostname: "pi".into(),
        os: "Debian".into(),
        kernel: "6.6".into(),
        arch: "aarch64".into(),
        board_model: Some("Pi 4".into()),
        interval_ms: 5000,
        tags: vec!["shop".into()],
        actions: vec!["ping".into()],
    }
}

#[test]
fn typical_pulse_is_at_most_48_bytes() {
    let msg = AgentMsg::Pulse(Pulse { seq: 17_280, health: typical_health() });
    let len = encode(&msg).unwrap().len();
    assert!(len <= 48, "typical pulse is {len} bytes");
    // A busy, throttled Pi with large counters still fits.
    let busy = Health {
        cpu_permille: 1000,
        load1_centi: 412,
        load5_centi: 388,
        load15_centi: 301,
        mem_used_kib: 3_512_004,
        swap_used_kib: 81_220,
        disk_used_mib: 27_991,
        temp_decicelsius: Some(851),
        net_rx_bps: 2_412_113,
        net_tx_bps: 1_150_402,
        throttled: Some(Throttled::from_firmware(0x5_0005)),
        ..typical_health()
    };
    let len = encode(&AgentMsg::Pulse(Pulse { seq: 17_280, health: busy })).unwrap().len();
    assert!(len <= 48, "busy pulse is {len} bytes");
}

// Golden vectors: if one of these fails, the wire format changed. That needs
// a new PROTOCOL_VERSION, not a new vector.
#[test]
fn golden_pulse() {
    let msg = AgentMsg::Pulse(Pulse { seq: 300, health: typical_health() });
    assert_eq!(hex(&encode(&msg).unwrap()), "01ac021f080c09cc88ed01b09519fc9f0600ace701fa24019c07b58f10a60e90070100");
}

#[test]
fn golden_hello() {
    assert_eq!(
        hex(&encode(&AgentMsg::Hello(hello())).unwrap()),
        "00010470692d3105302e312e3001620270690644656269616e03362e3607616172636836340104506920348827010473686f70010470696e67"
    );
}

fn check(name: &str, status: CheckStatus) -> CheckResult {
    CheckResult {
        name: name.into(),
        kind: CheckKind::Unit,
        status,
        summary: "app.service is failed".into(),
        output: "Result: exit-code\n".into(),
        since_ms: 1_700_000_000_000,
    }
}

/// Version 2's messages. Version 1's above keep their bytes: the new
/// variants were appended.
#[test]
fn golden_version_2_messages() {
    let report = AgentMsg::Checks(CheckReport { full: true, results: vec![check("app", CheckStatus::Critical)] });
    assert_eq!(
        hex(&encode(&report).unwrap()),
        "030101036170700002156170702e73657276696365206973206661696c656412526573756c743a20657869742d636f64650a80d095ffbc31"
    );
    let digest = CheckDigest { ok: 3, warning: 0, critical: 1, unknown: 0 };
    let pulse = AgentMsg::CheckedPulse(Pulse { seq: 300, health: typical_health() }, digest);
    assert_eq!(
        hex(&encode(&pulse).unwrap()),
        "04ac021f080c09cc88ed01b09519fc9f0600ace701fa24019c07b58f10a60e9007010003000100"
    );
    assert_eq!(hex(&encode(&ServerMsg::ResendChecks).unwrap()), "03");
    let actions = AgentMsg::Actions(vec![ActionInfo {
        name: "update".into(),
        params: vec!["version".into()],
        disruptive: true,
        reboots: false,
    }]);
    assert_eq!(hex(&encode(&actions).unwrap()), "050106757064617465010776657273696f6e0100");
    assert_eq!(decode::<AgentMsg>(&encode(&actions).unwrap()).unwrap(), actions);
    let mut v2 = hello();
    v2.protocol_version = 2;
    assert_eq!(peek_hello_version(&encode(&AgentMsg::Hello(v2)).unwrap()), Some(2));
    // A checked pulse costs five bytes over a plain one.
    let plain = encode(&AgentMsg::Pulse(Pulse { seq: 300, health: typical_health() })).unwrap().len();
    assert_eq!(encode(&pulse).unwrap().len(), plain + 4);
    assert_eq!(AgentMsg::Checks(CheckReport { full: false, results: vec![] }).since_version(), 2);
    assert_eq!(AgentMsg::Hello(hello()).since_version(), 1);
}

#[test]
fn check_reports_are_bounded() {
    let full = |results| postcard::to_stdvec(&AgentMsg::Checks(CheckReport { full: true, results })).unwrap();
    let many = full(vec![check("c", CheckStatus::Ok); MAX_CHECKS + 1]);
    assert!(matches!(decode::<AgentMsg>(&many), Err(DecodeError::Limit { field: "checks", .. })));
    let mut long = check("c", CheckStatus::Ok);
    long.output = "o".repeat(MAX_CHECK_OUTPUT + 1);
    assert!(matches!(decode::<AgentMsg>(&full(vec![long])), Err(DecodeError::Limit { field: "check output", .. })));
    assert!(matches!(decode::<AgentMsg>(&full(vec![check("a/b", CheckStatus::Ok)])), Err(DecodeError::Malformed(_))));
    // The largest valid report fits in a frame.
    let biggest: Vec<_> = (0..MAX_CHECKS)
        .map(|i| CheckResult {
            name: format!("{i:0>64}"),
            kind: CheckKind::Command,
            status: CheckStatus::Unknown,
            summary: "s".repeat(MAX_STRING),
            output: "o".repeat(MAX_CHECK_OUTPUT),
            since_ms: u64::MAX,
        })
        .collect();
    let msg = AgentMsg::Checks(CheckReport { full: true, results: biggest });
    assert_eq!(decode::<AgentMsg>(&encode(&msg).unwrap()).unwrap(), msg);
}

#[test]
fn golden_server_messages() {
    let welcome = ServerMsg::Welcome(Welcome {
        protocol_version: 1,
        server_time_ms: 1_700_000_000_000,
        interval_ms: 5000,
        offline_after_ms: 15_000,
        generation: 3,
    });
    assert_eq!(hex(&encode(&welcome).unwrap()), "000180d095ffbc318827987503");
    let bell = ServerMsg::Bell(Bell {
        id: 42,
        action: "update".into(),
        params: vec![("version".into(), "1.2.3".into())],
        timeout_ms: Some(600_000),
    });
    assert_eq!(hex(&encode(&bell).unwrap()), "012a06757064617465010776657273696f6e05312e322e3301c0cf24");
    assert_eq!(hex(&encode(&ServerMsg::Cancel(42)).unwrap()), "022a");
    let report = AgentMsg::BellReport(BellReport {
        id: 42,
        state: BellState::Failed,
        exit_code: Some(2),
        output: "no\n".into(),
        duration_ms: 1234,
        reason: Some("exit 2".into()),
    });
    assert_eq!(hex(&encode(&report).unwrap()), "022a020104036e6f0ad2090106657869742032");
}

#[test]
fn round_trips() {
    let msgs = [
        AgentMsg::Hello(hello()),
        AgentMsg::Pulse(Pulse { seq: u32::MAX, health: typical_health() }),
        AgentMsg::Pulse(Pulse { seq: 1, health: Health::default() }),
    ];
    for msg in msgs {
        assert_eq!(decode::<AgentMsg>(&encode(&msg).unwrap()).unwrap(), msg);
    }
}

#[test]
fn malformed_input_gives_typed_errors() {
    let bytes = encode(&AgentMsg::Hello(hello())).unwrap();
    assert_eq!(decode::<AgentMsg>(&bytes[..bytes.len() - 3]), Err(DecodeError::Truncated));
    assert_eq!(decode::<AgentMsg>(&[]), Err(DecodeError::Truncated));
    assert_eq!(decode::<AgentMsg>(&[9, 0, 0]), Err(DecodeError::UnknownVariant));
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(decode::<AgentMsg>(&trailing), Err(DecodeError::TrailingBytes(1)));
    let huge = vec![0u8; MAX_FRAME + 1];
    assert_eq!(decode::<AgentMsg>(&huge), Err(DecodeError::TooLarge { len: MAX_FRAME + 1 }));
    // Invalid UTF-8 in a string field.
    let mut bad_utf8 = vec![0u8, 1, 2, 0xff, 0xfe];
    bad_utf8.extend_from_slice(&[0; 16]);
    assert!(matches!(decode::<AgentMsg>(&bad_utf8), Err(DecodeError::Malformed(_))));
}

#[test]
fn limits_are_enforced_on_decode() {
    let mut h = hello();
    h.hostname = "x".repeat(MAX_STRING + 1);
    let bytes = postcard::to_stdvec(&AgentMsg::Hello(h)).unwrap();
    assert_eq!(
        decode::<AgentMsg>(&bytes),
        Err(DecodeError::Limit { field: "hostname", len: MAX_STRING + 1, max: MAX_STRING })
    );
    let mut h = hello();
    h.tags = vec!["t".into(); MAX_TAGS + 1];
    let bytes = postcard::to_stdvec(&AgentMsg::Hello(h)).unwrap();
    assert!(matches!(decode::<AgentMsg>(&bytes), Err(DecodeError::Limit { field: "tags", .. })));
    let report = AgentMsg::BellReport(BellReport {
        id: 1,
        state: BellState::Succeeded,
        exit_code: Some(0),
        output: "o".repeat(MAX_OUTPUT + 1),
        duration_ms: 0,
        reason: None,
    });
    let bytes = postcard::to_stdvec(&report).unwrap();
    assert!(matches!(decode::<AgentMsg>(&bytes), Err(DecodeError::Limit { field: "output", .. })));
}

#[test]
fn encode_refuses_oversized_messages() {
    let bell = ServerMsg::Bell(Bell {
        id: 1,
        action: "x".into(),
        params: vec![("p".into(), "v".repeat(MAX_FRAME))],
        timeout_ms: None,
    });
    assert!(matches!(encode(&bell), Err(EncodeError::TooLarge { .. })));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn arb_health() -> impl Strategy<Value = Health> {
    (
        (any::<u16>(), any::<u32>(), any::<u32>(), any::<u32>()),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        (any::<Option<i16>>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<Option<u8>>()),
    )
        .prop_map(|((c, l1, l5, l15), (mt, mu, st, su, dt, du), (t, up, rx, tx, th))| Health {
            cpu_permille: c,
            load1_centi: l1,
            load5_centi: l5,
            load15_centi: l15,
            mem_total_kib: mt,
            mem_used_kib: mu,
            swap_total_kib: st,
            swap_used_kib: su,
            disk_total_mib: dt,
            disk_used_mib: du,
            temp_decicelsius: t,
            uptime_secs: up,
            net_rx_bps: rx,
            net_tx_bps: tx,
            throttled: th.map(Throttled),
        })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<AgentMsg>(&bytes);
        let _ = decode::<ServerMsg>(&bytes);
        let _ = peek_hello_version(&bytes);
    }

    #[test]
    fn mutated_messages_never_panic(idx in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = encode(&AgentMsg::Hello(hello())).unwrap();
        let i = idx.index(bytes.len());
        bytes[i] = byte;
        let _ = decode::<AgentMsg>(&bytes);
    }

    #[test]
    fn any_check_report_round_trips(
        full in any::<bool>(),
        checks in proptest::collection::vec(("[a-z0-9_][a-z0-9_-]{0,63}", 0u8..5, 0u8..4, ".{0,80}", ".{0,200}", any::<u64>()), 0..8),
        seq in any::<u32>(),
        digest in (any::<u16>(), any::<u16>(), any::<u16>(), any::<u16>()),
    ) {
        let kinds = [CheckKind::Unit, CheckKind::Command, CheckKind::Http, CheckKind::Tcp, CheckKind::Process];
        let results = checks
            .into_iter()
            .map(|(name, k, s, summary, output, since_ms)| CheckResult {
                name,
                kind: kinds[k as usize],
                status: CheckStatus::ALL[s as usize],
                summary,
                output,
                since_ms,
            })
            .filter(|r| r.summary.len() <= MAX_STRING && r.output.len() <= MAX_CHECK_OUTPUT)
            .collect();
        let msg = AgentMsg::Checks(CheckReport { full, results });
        prop_assert_eq!(decode::<AgentMsg>(&encode(&msg).unwrap()).unwrap(), msg);
        let (ok, warning, critical, unknown) = digest;
        let msg = AgentMsg::CheckedPulse(Pulse { seq, health: Health::default() }, CheckDigest { ok, warning, critical, unknown });
        prop_assert_eq!(decode::<AgentMsg>(&encode(&msg).unwrap()).unwrap(), msg);
    }

    #[test]
    fn any_pulse_round_trips(seq in any::<u32>(), health in arb_health()) {
        let msg = AgentMsg::Pulse(Pulse { seq, health });
        prop_assert_eq!(decode::<AgentMsg>(&encode(&msg).unwrap()).unwrap(), msg);
    }
}
