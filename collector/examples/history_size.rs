//! Disk used by a week of one-minute history: writes 7 days of buckets for
//! a few devices into a real sled store and reports bytes per device.
//!
//! `cargo run --release -p pulsebell-collector --example history_size -- [DEVICES]`

use pulsebell_collector::history::Accumulator;
use pulsebell_collector::store::{SledStore, Store};
use pulsebell_proto::Health;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let devices: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path(), 64 << 20)?;
    let week = 7 * 24 * 60u32;
    let start = 29_500_000u32;
    for d in 0..devices {
        let id = format!("pi-greenhouse-{d:04}");
        let mut batch = Vec::with_capacity(1000);
        for m in 0..week {
            let h = Health {
                cpu_permille: (100 + (m * 7 + d as u32) % 500) as u16,
                temp_decicelsius: Some(450 + (m % 80) as i16),
                mem_used_kib: 400_000 + u64::from(m % 5000) * 10,
                load1_centi: 20 + m % 300,
                ..Health::default()
            };
            let mut acc = Accumulator::new(start + m, &h);
            acc.add(start + m, &h);
            batch.push((id.clone(), acc.bucket()));
            if batch.len() == 1000 {
                store.put_history(&batch).await?;
                batch.clear();
            }
        }
        store.put_history(&batch).await?;
    }
    store.flush().await?;
    let bytes = dir_size(dir.path())?;
    println!("| devices | days | buckets/device | bytes on disk | per device |");
    println!("|---:|---:|---:|---:|---:|");
    println!("| {devices} | 7 | {week} | {bytes} | {:.0} KiB |", bytes as f64 / devices as f64 / 1024.0);
    Ok(())
}

fn dir_size(p: &std::path::Path) -> std::io::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(p)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() { dir_size(&e.path())? } else { m.len() };
    }
    Ok(total)
}
