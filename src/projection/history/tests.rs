//! Unit tests of the history index (`projection/history/`).

use super::*;
use crate::domain::Measurement;
use crate::domain::query::Labels;

fn measurement(i: i64) -> Measurement {
    Measurement {
        kpi_id: "signups".into(),
        value: if i % 3 == 0 {
            f64::NAN
        } else {
            i as f64 * -1.5
        },
        // Before and after 1970, with nanoseconds, out of order.
        occurred_at: DateTime::from_timestamp(i * 7_919 * if i % 2 == 0 { 1 } else { -1 }, 999)
            .unwrap(),
        labels: Labels::from([(
            "channel".into(),
            ["web", "shop", "é"][(i % 3) as usize].into(),
        )]),
        subject: match i % 4 {
            0 => None,
            1 => Some(String::new()),
            _ => Some(format!("user-{i}")),
        },
        event_id: None,
    }
}

fn cursor(blocks: Blocks, area: Area, from: u64) -> Cursor {
    let dir = tempfile::tempdir().unwrap();
    Cursor {
        from,
        pages: Arc::new(PageStore::open(dir.path(), 0).unwrap()),
        blocks,
        stored: VecDeque::new(),
        stored_to: 0,
        memory: VecDeque::from([area]),
        area: Area::default(),
        from_tree: false,
        pos: 0,
        prev: 0,
        prev_seconds: 0,
        to_seq: u64::MAX,
    }
}

fn read_back(area: Area) -> Result<Vec<(u64, Measurement)>, StoreError> {
    read_back_from(area, 0)
}

fn read_back_from(area: Area, from: u64) -> Result<Vec<(u64, Measurement)>, StoreError> {
    let mut read = Vec::new();
    merge(
        vec![cursor(Blocks::Measurements("signups".into()), area, from)],
        |seq, visited| read.extend(visited.to_measurement().map(|m| (seq, m))),
    )?;
    Ok(read)
}

fn written() -> (KpiArea, Vec<(u64, Measurement)>) {
    let mut kpi = KpiArea::default();
    let measurements: Vec<(u64, Measurement)> = (0..40_i64)
        .map(|i| (3 + 2 * i.cast_unsigned(), measurement(i)))
        .collect();
    for (seq, m) in &measurements {
        kpi.push(*seq, m);
    }
    (kpi, measurements)
}

/// Bit-for-bit: NaN is not equal to itself.
fn same(a: &[(u64, Measurement)], b: &[(u64, Measurement)]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((s, x), (t, y))| {
            s == t
                && x.value.to_bits() == y.value.to_bits()
                && (x.occurred_at, &x.labels, &x.subject, &x.kpi_id)
                    == (y.occurred_at, &y.labels, &y.subject, &y.kpi_id)
        })
}

#[test]
fn an_index_of_another_format_or_without_one_is_told_apart() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    assert_eq!(other_format(&db).unwrap(), None, "an empty index");
    let tree = db.open_tree(TREE).unwrap();
    tree.insert(blocks::part_key(1), &[0; 20]).unwrap();
    assert_eq!(other_format(&db).unwrap().as_deref(), Some("none"));
    tree.insert(COVERED_KEY, &[3, 1, 2]).unwrap();
    assert_eq!(other_format(&db).unwrap().as_deref(), Some("3"));
    tree.insert(COVERED_KEY, &[FORMAT, 1, 2]).unwrap();
    assert_eq!(other_format(&db).unwrap(), None);
    tree.clear().unwrap();
    let checkpoints = db.open_tree(CHECKPOINTS_TREE).unwrap();
    checkpoints.insert(b"kpi", &[1]).unwrap();
    assert_eq!(other_format(&db).unwrap().as_deref(), Some("none"));
}

#[test]
fn measurements_read_back_as_written_from_memory_and_from_a_block() {
    let (kpi, measurements) = written();
    assert!(same(&read_back(kpi.area.clone()).unwrap(), &measurements));
    let stored = Area::decode(&kpi.area.encode()).expect("decodes");
    assert!(same(&read_back(stored).unwrap(), &measurements));
}

#[test]
fn a_cursor_from_a_seq_skips_the_entries_before_it() {
    let (kpi, measurements) = written();
    let stored = Area::decode(&kpi.area.encode()).expect("decodes");
    for from in [0, 3, 4, 5, 40, 81, 82, 1000] {
        let expected: Vec<_> = measurements
            .iter()
            .filter(|(seq, _)| *seq >= from)
            .cloned()
            .collect();
        for area in [kpi.area.clone(), stored.clone()] {
            assert!(
                same(&read_back_from(area, from).unwrap(), &expected),
                "from {from}"
            );
        }
    }
}

#[test]
fn a_damaged_block_is_refused() {
    let (kpi, _) = written();
    let block = kpi.area.encode();
    for at in 0..block.len() {
        for flip in [0x01, 0x80, 0xff] {
            let mut damaged = block.clone();
            damaged[at] ^= flip;
            assert!(
                Area::decode(&damaged).is_none(),
                "{flip:#x} at {at} decodes"
            );
        }
        assert!(
            Area::decode(&block[..at]).is_none(),
            "a block cut at {at} decodes"
        );
    }
}

#[test]
fn damaged_entries_are_errors_not_panics() {
    let (kpi, _) = written();
    for at in 0..kpi.area.bytes.len() {
        for flip in [0x01, 0x80, 0xff] {
            let mut area = kpi.area.clone();
            area.bytes[at] ^= flip;
            let _ = read_back(area);
        }
        let mut area = kpi.area.clone();
        area.bytes.truncate(at);
        let _ = read_back(area);
    }
}

fn page(file: u32, offset: u64) -> PageRef {
    let mut bytes = [0; crate::projection::pages::PAGE_REF_BYTES];
    bytes[..4].copy_from_slice(&file.to_le_bytes());
    bytes[4..12].copy_from_slice(&offset.to_le_bytes());
    // A page is never empty.
    bytes[12..16].copy_from_slice(&1u32.to_le_bytes());
    PageRef::from_bytes(&bytes).unwrap()
}

#[test]
fn a_directory_finds_every_kpi_it_lists_and_no_other() {
    let ids: Vec<String> = (0..300).map(|i| format!("kpi_{i:04}")).collect();
    let listed: Vec<(&str, PageRef)> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(i, id)| (id.as_str(), page(7, i as u64 * 11)))
        .collect();
    let directory = blocks::encode_directory(&listed);
    for (i, id) in ids.iter().enumerate() {
        let expected = (i % 3 != 0).then(|| page(7, i as u64 * 11));
        assert_eq!(
            blocks::find_in_directory(&directory, id),
            Some(expected),
            "{id}"
        );
    }
    assert_eq!(blocks::find_in_directory(&directory, ""), Some(None));
    assert_eq!(
        blocks::find_in_directory(&blocks::encode_directory(&[]), "a"),
        Some(None)
    );
}

#[test]
fn a_damaged_directory_is_an_error_not_a_panic() {
    let ids: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let listed: Vec<(&str, PageRef)> = ids.iter().map(|id| (id.as_str(), page(1, 2))).collect();
    let directory = blocks::encode_directory(&listed);
    for at in 0..directory.len() {
        for flip in [0x01, 0x80, 0xff] {
            let mut damaged = directory.clone();
            damaged[at] ^= flip;
            for id in &ids {
                let _ = blocks::find_in_directory(&damaged, id);
            }
        }
        assert!(
            ids.iter()
                .any(|id| blocks::find_in_directory(&directory[..at], id).is_none()),
            "a directory cut at {at} reads whole"
        );
    }
}

#[test]
fn a_part_entry_reads_back_and_a_damaged_one_is_refused() {
    for others in [None, Some(page(3, 99))] {
        let part = StoredRef {
            first_seq: 100_001,
            directory: page(2, 5),
            others,
        };
        assert_eq!(StoredRef::decode(&part.key(), &part.value()), Some(part));
        let value = part.value();
        assert_eq!(
            StoredRef::decode(&part.key(), &value[..value.len() - 1]),
            None
        );
        assert_eq!(StoredRef::decode(b"e00000001", &value), None);
    }
}

#[test]
fn measurements_read_back_from_a_stored_part() {
    let (kpi, measurements) = written();
    let dir = tempfile::tempdir().unwrap();
    let pages = Arc::new(PageStore::open(dir.path(), 0).unwrap());
    let block = pages.write_as_is(&kpi.area.encode()).unwrap();
    let directory = pages
        .write(&blocks::encode_directory(&[
            ("other", page(9, 9)),
            ("signups", block),
        ]))
        .unwrap();
    let part = StoredRef {
        first_seq: 3,
        directory,
        others: None,
    };
    let read = |pages: Arc<PageStore>, kpi_id: &str| {
        let mut cursor = cursor(Blocks::Measurements(kpi_id.into()), Area::default(), 0);
        cursor.pages = pages;
        cursor.memory.clear();
        cursor.stored = VecDeque::from([part]);
        cursor.stored_to = 81;
        let mut read = Vec::new();
        merge(vec![cursor], |seq, visited| {
            read.extend(visited.to_measurement().map(|m| (seq, m)));
        })
        .map(|()| read)
    };
    assert!(same(
        &read(pages.clone(), "signups").unwrap(),
        &measurements
    ));
    assert!(read(pages.clone(), "absent").unwrap().is_empty());
    // A block whose page file is gone is an error, not an empty history.
    drop(pages);
    for file in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::remove_file(file.unwrap().path()).unwrap();
    }
    let pages = Arc::new(PageStore::open(dir.path(), 0).unwrap());
    assert!(matches!(
        read(pages, "signups"),
        Err(StoreError::Corrupt { .. })
    ));
}
