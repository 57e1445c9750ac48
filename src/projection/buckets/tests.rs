//! Unit tests of `projection/buckets.rs`.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::domain::KpiKind;
use crate::domain::aggregate::Observation;

/// A COUNT state holding `n` measurements: states compare by their count.
fn state(n: u64) -> BucketState {
    let mut state = BucketState::new(KpiKind::Count).expect("COUNT has buckets");
    for _ in 0..n {
        state
            .record(Observation {
                value: 1.0,
                occurred_at: chrono::DateTime::UNIX_EPOCH,
                seq: 1,
                subject: None,
            })
            .expect("COUNT takes any value");
    }
    state
}

fn key(k: i64) -> BucketKey {
    BucketKey::from_unix_seconds(k)
}

/// The entries of every chunk, stored ones read back.
fn chunk_entries(map: &BucketMap, store: Option<&PageStore>) -> Vec<Vec<Entry>> {
    map.chunks
        .iter()
        .map(|chunk| match chunk {
            Chunk::Resident(entries) => entries.to_vec(),
            Chunk::Stored(stored, late) => {
                read_stored(store, stored, late.as_deref()).expect("page reads")
            }
        })
        .collect()
}

/// Late measurements kept beside the stored chunks.
fn late_count(map: &BucketMap) -> usize {
    map.chunks
        .iter()
        .map(|chunk| match chunk {
            Chunk::Stored(_, Some(late)) => late.observations.len(),
            Chunk::Stored(_, None) | Chunk::Resident(_) => 0,
        })
        .sum()
}

/// Stored chunks with a late page.
fn late_pages(map: &BucketMap) -> usize {
    map.chunks
        .iter()
        .filter(|chunk| matches!(chunk, Chunk::Stored(stored, _) if stored.late.is_some()))
        .count()
}

fn insert(map: &mut BucketMap, k: i64, n: u64) {
    *map.get_or_insert_at(key(k), map.locate(key(k)), &mut PageIo::default(), || {
        state(0)
    })
    .expect("no pages") = state(n);
}

fn count(map: &BucketMap, k: i64, store: Option<&PageStore>) -> Option<u64> {
    map.get(&key(k), store)
        .expect("page reads")
        .map(|s| s.count())
}

fn from(map: &BucketMap, k: i64, store: Option<&PageStore>) -> Vec<(i64, u64)> {
    let mut got = Vec::new();
    map.visit_from(key(k), store, |k, s| {
        got.push((k.unix_seconds(), s.count()));
        ControlFlow::Continue(())
    })
    .expect("page reads");
    got
}

/// The map's invariant: non-empty sorted chunks of at most CHUNK in memory and
/// STORED_CHUNK stored, ordered, len right.
fn check_invariant(map: &BucketMap, store: Option<&PageStore>) {
    let mut previous = None;
    let mut len = 0;
    // Late measurements in memory or in late pages may add buckets when a chunk is read.
    let late = late_count(map) + late_pages(map);
    for (chunk, entries) in map.chunks.iter().zip(chunk_entries(map, store)) {
        let most = match chunk {
            Chunk::Resident(_) => CHUNK,
            // Late measurements may add buckets to a stored chunk when it is read.
            Chunk::Stored(..) => STORED_CHUNK + late,
        };
        let chunk = entries;
        assert!(!chunk.is_empty() && chunk.len() <= most);
        for (k, _) in chunk.iter() {
            assert!(previous < Some(*k), "keys in order");
            previous = Some(*k);
        }
        len += chunk.len();
    }
    assert_eq!(
        previous, map.sealed_last,
        "sealed_last is the last chunk key"
    );
    assert!(map.tail.len() <= TAIL);
    for (k, _) in &map.tail {
        assert!(previous < Some(*k), "tail keys in order, above the chunks");
        previous = Some(*k);
    }
    len += map.tail.len();
    if late == 0 {
        assert_eq!(len, map.len());
    } else {
        assert!(
            map.len() <= len,
            "stored buckets count those of their pages"
        );
    }
}

fn contents(map: &BucketMap) -> Vec<(i64, u64)> {
    map.resident()
        .map(|(k, s)| (k.unix_seconds(), s.count()))
        .collect()
}

#[test]
fn buckets_arriving_in_order_fill_chunks_completely() {
    let mut map = BucketMap::default();
    for k in 0..10 * CHUNK as i64 {
        insert(&mut map, k, 1);
    }
    check_invariant(&map, None);
    // The last TAIL buckets are in the tail; the chunks before the last one are full.
    assert_eq!(map.tail.len(), TAIL);
    assert_eq!(map.chunks.len(), 10);
    let (last, full) = map.chunks.split_last().expect("chunks");
    assert!(full.iter().all(|chunk| chunk.len() == CHUNK));
    let last = last.len();
    assert_eq!(last, CHUNK - TAIL);
}

/// A snapshot clones the model, sharing every chunk: sealing the tail afterwards starts
/// a chunk of its own rather than copying the shared last chunk to fill it up (a copy of
/// every map's last chunk while the snapshot is written), and both answer as before.
#[test]
fn sealing_the_tail_does_not_copy_a_chunk_a_snapshot_shares() {
    let mut map = BucketMap::default();
    for k in 0..2 * CHUNK as i64 {
        insert(&mut map, k, 1);
    }
    let snapshot = map.clone();
    let Some(Chunk::Resident(shared)) = snapshot.chunks.last() else {
        panic!("a chunk in memory");
    };
    assert!(shared.len() < CHUNK, "the last chunk has room");
    for k in 2 * CHUNK as i64..(2 * CHUNK + 2 * TAIL) as i64 {
        insert(&mut map, k, 1);
    }
    let index = snapshot.chunks.len() - 1;
    assert!(
        matches!(&map.chunks[index], Chunk::Resident(chunk) if Arc::ptr_eq(chunk, shared)),
        "still the chunk the snapshot holds"
    );
    assert!(
        map.chunks.len() > snapshot.chunks.len(),
        "a chunk of its own"
    );
    check_invariant(&map, None);
    let all: Vec<(i64, u64)> = (0..(2 * CHUNK + 2 * TAIL) as i64).map(|k| (k, 1)).collect();
    assert_eq!(from(&map, 0, None), all);
    assert_eq!(from(&snapshot, 0, None), all[..2 * CHUNK].to_vec());
}

#[test]
fn a_late_bucket_splits_only_its_chunk() {
    let mut map = BucketMap::default();
    for k in 0..2 * CHUNK as i64 {
        insert(&mut map, 2 * k, 1);
    }
    insert(&mut map, 1, 2);
    check_invariant(&map, None);
    assert_eq!(map.chunks.len(), 3);
    assert_eq!(count(&map, 1, None), Some(2));
    assert_eq!(from(&map, 1, None).first(), Some(&(1, 2)));
}

#[test]
fn a_damaged_order_is_refused_when_decoding() {
    // A BucketMap is stored as its chunks and tail in order; these keys are not.
    let swapped: Vec<Entry> = vec![(key(7), state(1)), (key(5), state(1))];
    let parts = vec![PartOut::Entries(&swapped), PartOut::Tail(&[])];
    let bytes = crate::encoding::encode(&parts).expect("encodes");
    let decoded: Result<BucketMap, _> = crate::encoding::decode(&bytes);
    decoded.expect_err("keys out of order");
    // postcard keeps no custom message; the same parts in order decode, so the refusal
    // is the order's.
    let ordered: Vec<Entry> = vec![(key(5), state(1)), (key(7), state(1))];
    let parts = vec![PartOut::Entries(&ordered), PartOut::Tail(&[])];
    let bytes = crate::encoding::encode(&parts).expect("encodes");
    let decoded: BucketMap = crate::encoding::decode(&bytes).expect("keys in order");
    assert_eq!(decoded.len(), 2);
}

#[test]
fn a_clone_keeps_its_buckets_while_the_original_changes() {
    let mut map = BucketMap::default();
    for k in 0..3 * CHUNK as i64 {
        insert(&mut map, k, 1);
    }
    let before = contents(&map);
    let clone = map.clone();
    let mut io = PageIo::default();
    *map.get_mut(&key(5), &mut io)
        .expect("no pages")
        .expect("held") = state(7);
    insert(&mut map, -1, 2);
    map.remove(&key(CHUNK as i64 + 3), &mut io)
        .expect("no pages");
    assert_eq!(contents(&clone), before);
    // Only the chunks that changed were copied.
    let (Chunk::Resident(ours), Chunk::Resident(theirs)) =
        (&map.chunks[map.chunks.len() - 1], &clone.chunks[2])
    else {
        panic!("resident chunks");
    };
    assert!(Arc::ptr_eq(ours, theirs));
    assert_eq!(count(&map, 5, None), Some(7));
}

/// The bytes of a state, to compare states bit for bit.
fn encoded(state: &BucketState) -> Vec<u8> {
    crate::encoding::encode(state).expect("encodes")
}

/// Every bucket of `map`: its summary, and its encoding but for DISTINCT buckets
/// (whose sketch keeps the same hashes in another order once it was read from a page).
fn encoded_all(map: &BucketMap, store: Option<&PageStore>) -> Vec<(i64, String, Vec<u8>)> {
    let mut got = Vec::new();
    map.visit_from(key(i64::MIN), store, |k, s| {
        let bytes = if s.kind() == KpiKind::Distinct {
            Vec::new()
        } else {
            encoded(s)
        };
        got.push((k.unix_seconds(), format!("{:?}", s.summary()), bytes));
        ControlFlow::Continue(())
    })
    .expect("page reads");
    got
}

/// Values whose compensated sums and HyperLogLogs depend on the order they come in.
fn awkward(i: u64) -> Observation<'static> {
    const SUBJECTS: [&str; 5] = ["ann", "bob", "cyd", "dee", "eve"];
    let value = match i % 4 {
        0 => 1e16,
        1 => 0.1,
        2 => -1e16,
        _ => 3.3e-7 * i as f64,
    };
    Observation {
        value,
        occurred_at: chrono::DateTime::UNIX_EPOCH + chrono::TimeDelta::seconds(i as i64),
        seq: i,
        subject: Some(SUBJECTS[usize::try_from(i % 5).expect("small")]),
    }
}

/// Records the next `awkward` measurement in bucket `k` of both maps: `plain`, which
/// never stores a chunk, and `paged`, whose stored chunks are in `store`.
fn recorder<'a>(
    store: &'a PageStore,
    empty: &'a BucketState,
) -> impl FnMut(&mut BucketMap, &mut BucketMap, i64) + 'a {
    let mut seq = 0;
    move |plain, paged, k| {
        seq += 1;
        let observation = awkward(seq);
        plain
            .record(key(k), observation, empty, &mut PageIo::default())
            .expect("memory");
        paged
            .record(key(k), observation, empty, &mut PageIo::new(Some(store)))
            .expect("page reads");
    }
}

#[test]
fn late_measurements_beside_a_stored_chunk_answer_bit_for_bit_as_in_memory() {
    for kind in [
        KpiKind::Sum,
        KpiKind::Average,
        KpiKind::Distinct,
        KpiKind::Last,
    ] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = PageStore::open(dir.path(), 0).expect("page store");
        let empty = BucketState::new(kind).expect("a kind with buckets");
        let (mut plain, mut paged) = (BucketMap::default(), BucketMap::default());
        let mut record = recorder(&store, &empty);
        for k in 0..3 * CHUNK as i64 {
            record(&mut plain, &mut paged, 2 * k);
        }
        paged
            .evict_below(key(4 * CHUNK as i64), &store)
            .expect("pages write");
        let stored = paged.pages().count();
        assert!(stored >= 1, "{kind:?}: chunks stored");
        // Late measurements to stored buckets, new buckets between them and below all.
        for k in [5, 6, 7, 6, -3, 301, 302, 5, 511, 0, -3] {
            record(&mut plain, &mut paged, k);
        }
        assert_eq!(paged.pages().count(), stored, "{kind:?}: nothing read back");
        assert_eq!(late_count(&paged), 11, "{kind:?}: kept beside the pages");
        check_invariant(&paged, Some(&store));
        let want = encoded_all(&plain, None);
        assert_eq!(
            encoded_all(&paged, Some(&store)),
            want,
            "{kind:?}: read with them"
        );

        let mut round = paged.clone();
        let bytes = crate::encoding::encode(&round).expect("encodes");
        round = crate::encoding::decode(&bytes).expect("decodes");
        assert_eq!(
            encoded_all(&round, Some(&store)),
            want,
            "{kind:?}: after a snapshot"
        );

        let mut io = PageIo::new(Some(&store));
        let state = round
            .get_mut(&key(6), &mut io)
            .expect("page reads")
            .expect("held");
        let held = plain.get(&key(6), None).expect("memory").expect("held");
        assert_eq!(state.summary(), held.summary());
        assert_eq!(
            encoded_all(&round, Some(&store)),
            want,
            "{kind:?}: read back"
        );

        let freed = paged.flush_late(0, &store).expect("pages write");
        assert!(freed > 0);
        assert_eq!(late_count(&paged), 0, "{kind:?}: written out");
        check_invariant(&paged, Some(&store));
        assert_eq!(
            encoded_all(&paged, Some(&store)),
            want,
            "{kind:?}: after the flush"
        );
    }
}

/// Late measurements written out go to the chunk's late page, which is rewritten with
/// them while it stays under half the chunk's page; then the chunk itself is rewritten.
/// Answers stay bit for bit those of a map that never stored a chunk, through snapshots
/// and compaction's page moves.
#[test]
fn late_measurements_are_written_to_a_late_page_until_the_chunk_is_rewritten() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = PageStore::open(dir.path(), 0).expect("page store");
    let empty = BucketState::new(KpiKind::Average).expect("AVERAGE has buckets");
    let (mut plain, mut paged) = (BucketMap::default(), BucketMap::default());
    let mut record = recorder(&store, &empty);
    for k in 0..2 * CHUNK as i64 {
        record(&mut plain, &mut paged, 2 * k);
    }
    paged
        .evict_below(key(2 * CHUNK as i64), &store)
        .expect("pages write");
    let Some(Chunk::Stored(first, None)) = paged.chunks.first().cloned() else {
        panic!("the first chunk is stored");
    };
    let (mut base, mut late_pages, mut rewritten) = (first.page, 0, false);
    for round in 1..200 {
        // Late measurements to a bucket the chunk holds, one it lacks, one below all.
        for k in [10, 2 * round + 101, -round] {
            record(&mut plain, &mut paged, k);
        }
        assert!(paged.flush_late(0, &store).expect("pages write") > 0);
        assert_eq!(
            late_count(&paged),
            0,
            "round {round}: nothing left in memory"
        );
        let Some(Chunk::Stored(stored, None)) = paged.chunks.first() else {
            panic!("round {round}: the first chunk stays stored");
        };
        if stored.page == base {
            assert!(stored.late.is_some(), "round {round}: a late page");
            late_pages += 1;
        } else {
            assert!(stored.late.is_none(), "round {round}: rewritten with them");
            rewritten = true;
        }
        check_invariant(&paged, Some(&store));
        let want = encoded_all(&plain, None);
        assert_eq!(encoded_all(&paged, Some(&store)), want, "round {round}");
        let bytes = crate::encoding::encode(&paged).expect("encodes");
        let decoded: BucketMap = crate::encoding::decode(&bytes).expect("decodes");
        assert_eq!(
            encoded_all(&decoded, Some(&store)),
            want,
            "round {round}: after a snapshot"
        );
        if round == 2 {
            let pages: Vec<PageRef> = paged.pages().collect();
            assert!(pages.contains(&stored.late.expect("a late page")));
            let files = pages.iter().map(|page| page.file()).collect();
            paged.move_pages(&files, &store).expect("pages move");
            assert!(
                paged.pages().all(|page| !pages.contains(&page)),
                "all moved"
            );
            assert_eq!(encoded_all(&paged, Some(&store)), want, "after the moves");
            if let Some(Chunk::Stored(moved, _)) = paged.chunks.first() {
                base = moved.page;
            }
        }
        if rewritten {
            break;
        }
    }
    assert!(late_pages >= 4, "{late_pages} writes to the late page");
    assert!(
        rewritten,
        "the chunk is rewritten once its late page passes half of it"
    );
}

#[test]
fn a_chunk_whose_late_measurements_pass_a_quarter_of_it_is_read_back() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = PageStore::open(dir.path(), 0).expect("page store");
    let empty = BucketState::new(KpiKind::Count).expect("COUNT has buckets");
    let mut map = BucketMap::default();
    let mut io = PageIo::new(Some(&store));
    for k in 0..2 * CHUNK as i64 {
        map.record(key(k), awkward(1), &empty, &mut io)
            .expect("memory");
    }
    map.evict_below(key(CHUNK as i64), &store)
        .expect("pages write");
    let Chunk::Stored(stored, None) = map.chunks[0] else {
        panic!("the first chunk is stored");
    };
    let room = stored.bytes as usize / 4 / size_of::<LateObservation>();
    assert!(room > 4, "room for {room}");
    for _ in 0..room {
        map.record(key(3), awkward(2), &empty, &mut io)
            .expect("page reads");
    }
    assert_eq!(late_count(&map), room);
    map.record(key(3), awkward(3), &empty, &mut io)
        .expect("page reads");
    assert_eq!(late_count(&map), 0);
    assert!(matches!(map.chunks[0], Chunk::Resident(_)), "read back");
    assert_eq!(count(&map, 3, None), Some(room as u64 + 2));
}

/// One operation of the model test.
#[derive(Debug, Clone)]
enum Op {
    Insert(i64, u64),
    Remove(i64),
    Range(i64),
    RoundTrip,
    /// Store the buckets below this key.
    Evict(i64),
    /// Write out the late measurements of lists of at least this many bytes.
    Flush(usize),
}

fn op() -> impl Strategy<Value = Op> {
    // Keys from a small range so inserts hit existing buckets and removes find them.
    let k = 0i64..3000;
    prop_oneof![
        6 => (k.clone(), 1u64..4).prop_map(|(k, n)| Op::Insert(k, n)),
        2 => k.clone().prop_map(Op::Remove),
        1 => k.clone().prop_map(Op::Range),
        1 => Just(Op::RoundTrip),
        2 => k.prop_map(Op::Evict),
        1 => prop_oneof![Just(0usize), 100usize..2000].prop_map(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Against a BTreeMap: every operation gives the same answers, with chunks stored
    /// and read back, and the invariant holds after each.
    #[test]
    fn behaves_like_an_ordered_map(
        ops in prop::collection::vec(op(), 1..600),
        ascending in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = PageStore::open(dir.path(), 0).expect("page store");
        let pages = Some(&store);
        let mut map = BucketMap::default();
        let mut model: BTreeMap<i64, u64> = BTreeMap::new();
        // SUM buckets: their heap grows from the second measurement on.
        let empty = BucketState::new(KpiKind::Sum).expect("SUM has buckets");
        let mut io = PageIo::new(pages);
        if ascending {
            // A run of in-order buckets first, as a time-ordered ingest makes.
            for k in (0..3000).step_by(3) {
                map.record(key(k), awkward(1), &empty, &mut io).expect("memory");
                model.insert(k, 1);
            }
        }
        // What the changes report of the map's bytes, against what it holds.
        let mut tracked = map.bytes().cast_signed() - io.delta;
        for op in ops {
            tracked += io.delta;
            prop_assert_eq!(tracked, map.bytes().cast_signed(), "bytes counted exactly");
            io = PageIo::new(pages);
            match op {
                Op::Insert(k, n) => {
                    for i in 0..n {
                        map.record(key(k), awkward(i), &empty, &mut io).expect("page reads");
                    }
                    *model.entry(k).or_default() += n;
                }
                Op::Flush(least) => {
                    let late = late_count(&map);
                    map.flush_late(least, &store).expect("pages write");
                    prop_assert!(late_count(&map) <= late);
                    if least == 0 {
                        prop_assert_eq!(late_count(&map), 0);
                    }
                    tracked = map.bytes().cast_signed();
                }
                Op::Remove(k) => {
                    prop_assert_eq!(
                        map.remove(&key(k), &mut io).expect("page reads").map(|s| s.count()),
                        model.remove(&k)
                    );
                }
                Op::Range(k) => {
                    let want: Vec<(i64, u64)> =
                        model.range(k..).map(|(k, n)| (*k, *n)).collect();
                    prop_assert_eq!(from(&map, k, pages), want);
                }
                Op::RoundTrip => {
                    let bytes = crate::encoding::encode(&map).expect("encodes");
                    let decoded: BucketMap = crate::encoding::decode(&bytes).expect("decodes");
                    prop_assert_eq!(from(&decoded, i64::MIN, pages), from(&map, i64::MIN, pages));
                    map = decoded;
                    tracked = map.bytes().cast_signed();
                }
                Op::Evict(k) => {
                    let (before, directory) = (map.bytes(), map.chunks.capacity());
                    let freed = map.evict_below(key(k), &store).expect("pages write");
                    let grown = map.chunks.capacity().saturating_sub(directory) * size_of::<Chunk>();
                    prop_assert!(map.bytes() <= before + grown, "eviction frees memory");
                    prop_assert!(freed > 0 || before + grown == map.bytes());
                    tracked = map.bytes().cast_signed();
                    prop_assert!(map.tail.iter().all(|(key, _)| key.unix_seconds() >= k));
                    let below = map.resident().filter(|(key, _)| key.unix_seconds() < k);
                    // Only a chunk that also holds newer buckets stays in memory.
                    for (old, _) in below {
                        prop_assert!(map.chunks.iter().any(|chunk| matches!(chunk,
                            Chunk::Resident(e) if e.iter().any(|(x, _)| x == old)
                                && e.last().is_some_and(|(last, _)| last.unix_seconds() >= k))));
                    }
                }
            }
            check_invariant(&map, pages);
            prop_assert!(map.len() <= model.len());
            prop_assert_eq!(from(&map, i64::MIN, pages).len(), model.len());
            for probe in [0, 1, 1500, 2999] {
                prop_assert_eq!(count(&map, probe, pages), model.get(&probe).copied());
            }
        }
        let all: Vec<(i64, u64)> = model.into_iter().collect();
        prop_assert_eq!(from(&map, i64::MIN, pages), all);
    }
}

/// A map of `total` buckets recorded in key order, with a late measurement to the bucket
/// `back` keys before every `every`-th one, and evicted below the key `cut` names (if
/// any) after each; with its page store.
fn recorded_in_cuts(
    total: i64,
    (every, back): (i64, i64),
    mut cut: impl FnMut(i64) -> Option<i64>,
) -> (tempfile::TempDir, PageStore, BucketMap) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = PageStore::open(dir.path(), 0).expect("page store");
    let empty = BucketState::new(KpiKind::Count).expect("COUNT has buckets");
    let mut map = BucketMap::default();
    for k in 0..total {
        let mut io = PageIo::new(Some(&store));
        map.record(key(k), awkward(1), &empty, &mut io)
            .expect("memory");
        if k % every == 0 && k >= back {
            map.record(key(k - back), awkward(2), &empty, &mut io)
                .expect("page reads");
        }
        if let Some(below) = cut(k) {
            map.evict_below(key(below), &store).expect("pages write");
        }
    }
    check_invariant(&map, Some(&store));
    let got = from(&map, 0, Some(&store));
    assert_eq!(got.len(), total as usize);
    for (k, n) in got {
        let late = (k + back) % every == 0 && k + back < total;
        assert_eq!(n, if late { 2 } else { 1 }, "bucket {k}");
    }
    (dir, store, map)
}

/// Evictions that store a few buckets at a time (each cut of the tail a chunk of its
/// own, as under ingest) leave a directory of about one chunk per STORED_CHUNK buckets,
/// not one per eviction, with every bucket still answered.
#[test]
fn small_evictions_merge_into_few_stored_chunks() {
    let total = 3 * STORED_CHUNK as i64;
    let (_dir, _store, map) = recorded_in_cuts(total, (97, 400), |k| (k % 7 == 6).then_some(k - 3));
    let (stored, resident, _) = map.census();
    assert!(stored <= 16, "{stored} stored chunks for {total} buckets");
    assert!(resident <= 1, "{resident} resident chunks");
}

/// Evictions that cut pieces of every size (as the budget's do: a few buckets one time,
/// dozens the next), with late measurements to the recently stored ones, still leave,
/// besides the chunks too big to merge, about one stored chunk per size level.
#[test]
fn evictions_of_uneven_sizes_merge_into_few_stored_chunks() {
    let total = 2 * STORED_CHUNK as i64 + 700;
    let sizes = [1, 5, 2, 60, 3, 1, 20, 8, 1, 2];
    let (mut cuts, mut last_cut) = (0, 0);
    let (_dir, _store, map) = recorded_in_cuts(total, (11, 90), |k| {
        (k - last_cut == sizes[cuts % sizes.len()]).then(|| {
            (cuts, last_cut) = (cuts + 1, k);
            k
        })
    });
    let (stored, _, _) = map.census();
    // Two neighbours that stay apart are of falling levels or fill a page together.
    let most = 2 * total as usize / STORED_CHUNK + 7;
    assert!(
        stored <= most,
        "{stored} stored chunks for {total} buckets in {cuts} cuts"
    );
}
