//! Prints the encoded size of a typical pulse: postcard next to serde_json.
//!
//! `cargo run --example pulse_size -p pulsebell-proto`
use pulsebell_proto::{encode, AgentMsg, Health, Pulse, Throttled};

fn main() {
    let cases = [
        ("Raspberry Pi 4, idle", pi_idle()),
        ("Raspberry Pi 4, busy, throttled", pi_busy()),
        ("x86 server, no Pi flags", server()),
    ];
    println!("{:<34} {:>9} {:>6}", "pulse", "postcard", "json");
    for (name, health) in cases {
        let msg = AgentMsg::Pulse(Pulse { seq: 17_280, health });
        let postcard = encode(&msg).expect("encode").len();
        let json = serde_json::to_vec(&msg).expect("json").len();
        println!("{name:<34} {postcard:>9} {json:>6}");
    }
}

fn pi_idle() -> Health {
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

fn pi_busy() -> Health {
    Health {
        cpu_permille: 973,
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
        ..pi_idle()
    }
}

fn server() -> Health {
    Health {
        cpu_permille: 250,
        load1_centi: 1_210,
        load5_centi: 990,
        load15_centi: 870,
        mem_total_kib: 65_842_120,
        mem_used_kib: 21_004_332,
        swap_total_kib: 8_388_604,
        swap_used_kib: 1_024,
        disk_total_mib: 953_869,
        disk_used_mib: 402_110,
        temp_decicelsius: Some(540),
        uptime_secs: 8_640_000,
        net_rx_bps: 58_000_000,
        net_tx_bps: 41_000_000,
        throttled: None,
    }
}
