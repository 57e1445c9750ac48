//! Unit tests of `store/dedup/run.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::TimeZone;
use proptest::prelude::*;

use super::*;

fn at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

fn sample(n: u64) -> Vec<(u64, u64)> {
    // Some hashes repeat (collisions of different ids) across a page boundary.
    let mut entries: Vec<(u64, u64)> = (0..n)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) / 3, i + 1))
        .collect();
    entries.extend((0..300).map(|i| (7_777, 1_000_000 + i)));
    entries.sort_unstable();
    entries
}

#[test]
fn a_run_round_trips_and_finds_every_hash() {
    let dir = tempfile::tempdir().unwrap();
    let entries = sample(2_000);
    let n = widen(entries.len());
    let written = write(dir.path(), 3, n, at(), entries.iter().copied().map(Ok)).unwrap();
    assert_eq!(written.entries, n);
    let run = Run::open(dir.path(), 3).unwrap();
    assert_eq!((run.entries, run.newest), (n, at()));
    run.verify().unwrap();
    let back: Vec<_> = run.iter().map(Result::unwrap).collect();
    assert_eq!(back, entries);
    let mut by_hash: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (hash, seq) in &entries {
        by_hash.entry(*hash).or_default().push(*seq);
    }
    for (hash, seqs) in &by_hash {
        assert!(run.may_contain(*hash));
        assert_eq!(&run.seqs_of(*hash).unwrap(), seqs);
    }
    assert_eq!(by_hash[&7_777].len(), 300, "the repeated hash spans pages");
    // Hashes that are not there: none found, and most rejected by the filter alone.
    let absent: Vec<u64> = (0..10_000u64)
        .map(|i| i.wrapping_mul(0xD6E8_FEB8_6659_FD93) | 1)
        .filter(|hash| !by_hash.contains_key(hash))
        .collect();
    let passed = absent.iter().filter(|hash| run.may_contain(**hash)).count();
    assert!(passed < absent.len() / 10, "{passed} of {}", absent.len());
    for hash in absent.iter().take(500) {
        assert!(run.seqs_of(*hash).unwrap().is_empty());
    }
    // Opened under another number (a file renamed), it is refused.
    std::fs::rename(dir.path().join(file_name(3)), dir.path().join(file_name(4))).unwrap();
    assert!(Run::open(dir.path(), 4).is_err());
}

#[test]
fn every_changed_byte_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let entries = sample(600);
    let n = widen(entries.len());
    write(dir.path(), 9, n, at(), entries.iter().copied().map(Ok)).unwrap();
    let path = dir.path().join(file_name(9));
    let good = std::fs::read(&path).unwrap();
    for byte in 0..good.len() {
        let mut bytes = good.clone();
        bytes[byte] ^= 0x5a;
        std::fs::write(&path, &bytes).unwrap();
        let refused = Run::open(dir.path(), 9).and_then(|run| run.verify());
        assert!(
            refused.is_err(),
            "a change of byte {byte} of {} was accepted",
            good.len()
        );
    }
    // A cut file too.
    std::fs::write(&path, &good[..good.len() - 1]).unwrap();
    assert!(Run::open(dir.path(), 9).is_err());
}

#[test]
fn merging_drops_expired_and_repeated_entries() {
    let dir = tempfile::tempdir().unwrap();
    let a = vec![(1, 1), (5, 2), (9, 3)];
    let b = vec![(1, 1), (2, 10), (9, 11)];
    let run = |number, entries: &Vec<(u64, u64)>| {
        Arc::new(write(dir.path(), number, 3, at(), entries.iter().copied().map(Ok)).unwrap())
    };
    let runs = vec![run(1, &a), run(2, &b)];
    let all: Vec<_> = merged(&runs, 0).map(Result::unwrap).collect();
    assert_eq!(all, vec![(1, 1), (2, 10), (5, 2), (9, 3), (9, 11)]);
    let recent: Vec<_> = merged(&runs, 2).map(Result::unwrap).collect();
    assert_eq!(recent, vec![(2, 10), (9, 3), (9, 11)]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn lookups_agree_with_a_sorted_list(
        mut entries in proptest::collection::vec((0u64..5_000, 1u64..1_000_000), 0..1_500),
        probes in proptest::collection::vec(0u64..5_000, 50),
    ) {
        entries.sort_unstable();
        entries.dedup();
        let dir = tempfile::tempdir().unwrap();
        let n = widen(entries.len());
        write(dir.path(), 1, n, at(), entries.iter().copied().map(Ok)).unwrap();
        let run = Run::open(dir.path(), 1).unwrap();
        for probe in probes {
            let expected: Vec<u64> =
                entries.iter().filter(|(h, _)| *h == probe).map(|(_, s)| *s).collect();
            prop_assert_eq!(run.seqs_of(probe).unwrap(), expected);
        }
    }
}
