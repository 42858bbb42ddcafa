//! The floor under gatehouse's durable writes: raw redb commits on this machine's disk,
//! with no gatehouse code in the way.
//!
//! Each case runs `COMMITS` write transactions on a temporary file and reports the time
//! per commit and the bytes written to the disk per commit (`/proc/self/io`), with
//! gatehouse's settings (`Durability::Immediate`, two-phase commit, quick repair: see
//! `begin_durable_write` in `crates/store/src/lib.rs`) and with plain durable commits (one phase,
//! no quick repair) for comparison. Rows are 230 bytes, about an audit event.
//!
//! - `append/N`: N rows appended under increasing `u64` keys, as the audit log does;
//! - `update/N`: N rows of a 200 000-row table keyed by random 36-character strings
//!   (a token-family id) read and rewritten, plus N appends: what N revocations do.
//!
//! Run: `cargo bench --bench redb_floor` (about 20 s). Under `cargo test` each case runs a
//! few commits on a small table.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

use std::time::Instant;

use redb::{Database, Durability, ReadableTable, TableDefinition};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const FAMILIES: TableDefinition<&str, &[u8]> = TableDefinition::new("families");

fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Bytes this process has caused to be written to the disk so far (`/proc/self/io`).
fn written_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn family_key(i: u64) -> String {
    format!("fam_{:032x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

struct Floor {
    db: Database,
    seq: u64,
    families: u64,
    rng: u64,
}

impl Floor {
    fn new(path: &std::path::Path, families: u64) -> Self {
        let mut builder = redb::Builder::new();
        // gatehouse's cache size (crates/store/src/lib.rs).
        builder.set_cache_size(128 * 1024 * 1024);
        let db = builder.create(path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut table = tx.open_table(FAMILIES).unwrap();
            for i in 0..families {
                table
                    .insert(family_key(i).as_str(), [5u8; 120].as_slice())
                    .unwrap();
            }
            tx.open_table(LOG).unwrap();
        }
        tx.commit().unwrap();
        Self {
            db,
            seq: 0,
            families,
            rng: 0x2545_f491_4f6c_dd1d,
        }
    }

    fn random_family(&mut self) -> String {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        family_key(self.rng % self.families)
    }

    /// One durable commit of `updates` random family rewrites and `appends` log rows.
    fn commit(&mut self, gatehouse: bool, updates: usize, appends: usize) {
        let mut tx = self.db.begin_write().unwrap();
        tx.set_durability(Durability::Immediate).unwrap();
        tx.set_two_phase_commit(gatehouse);
        tx.set_quick_repair(gatehouse);
        {
            let mut families = tx.open_table(FAMILIES).unwrap();
            let mut log = tx.open_table(LOG).unwrap();
            for _ in 0..updates {
                let key = self.random_family();
                let mut value = families
                    .get(key.as_str())
                    .unwrap()
                    .unwrap()
                    .value()
                    .to_vec();
                value[0] = value[0].wrapping_add(1);
                families.insert(key.as_str(), value.as_slice()).unwrap();
            }
            for _ in 0..appends {
                self.seq += 1;
                log.insert(self.seq, [7u8; 230].as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }
}

fn main() {
    let benching = measuring();
    let (commits, families) = if benching {
        (1_000, 200_000)
    } else {
        (5, 2_000)
    };
    let dir = tempfile::tempdir().unwrap();
    let mut floor = Floor::new(&dir.path().join("floor.redb"), families);
    println!(
        "redb_floor: {families} family rows loaded; {commits} commits per case; KiB = bytes \
         written to the disk per commit"
    );
    println!(
        "{:<12} {:>26} {:>26}",
        "case", "gatehouse (2PC + repair)", "plain durable"
    );
    let cases: [(&str, usize, usize); 6] = [
        ("append/1", 0, 1),
        ("append/32", 0, 32),
        ("append/64", 0, 64),
        ("update/1", 1, 1),
        ("update/25", 25, 25),
        ("update/50", 50, 50),
    ];
    for (name, updates, appends) in cases {
        let mut cells = Vec::new();
        for gatehouse in [true, false] {
            let written = written_bytes();
            let start = Instant::now();
            for _ in 0..commits {
                floor.commit(gatehouse, updates, appends);
            }
            let us = start.elapsed().as_secs_f64() * 1e6 / commits as f64;
            let kib = (written_bytes() - written) as f64 / 1024.0 / commits as f64;
            cells.push(format!("{us:>7.0} µs {kib:>6.1} KiB"));
        }
        println!("{name:<12} {:>26} {:>26}", cells[0], cells[1]);
    }
    if !benching {
        println!("redb_floor: test mode, figures not meaningful");
    }
}
