//! Unit tests of `store/segment.rs`.

use super::*;

fn sample(first_seq: u64, records: &[&[u8]]) -> (Vec<u8>, Hash) {
    let mut builder = SegmentBuilder::new(first_seq, [7; 32], 0);
    for record in records {
        builder.push(&[record]);
    }
    let head = builder.head_hash();
    (builder.finish(), head)
}

#[test]
fn a_segment_survives_the_round_trip() {
    let big = vec![0xab; 300];
    let records: [&[u8]; 4] = [b"first", b"", &big, b"last"];
    let (value, head) = sample(41, &records);
    assert_eq!(value[0], SEGMENT_FORMAT_LZ4);
    let (segment, decompressed) = Segment::parse(&value).unwrap();
    let bytes = decompressed.expect("format 2 decompresses");
    assert_eq!(segment.first_seq, 41);
    assert_eq!(segment.last_seq(), 44);
    assert_eq!(segment.prev_hash, [7; 32]);
    assert_eq!(segment.head_hash, head);
    let parsed: Vec<(u64, &[u8])> = segment.seq_records(&bytes).collect();
    let expected: Vec<(u64, &[u8])> = (41..).zip(records).collect();
    assert_eq!(parsed, expected);

    let mut hash = [7; 32];
    for (seq, record) in parsed {
        hash = chain::next_hash(&hash, seq, record);
    }
    assert_eq!(hash, head);
}

#[test]
fn format_1_as_older_builds_wrote_it_still_reads() {
    let mut builder = SegmentBuilder::new(5, [3; 32], 0);
    builder.push(&[b"old"]);
    builder.push(&[b"records"]);
    let head = builder.head_hash();
    let value = builder.finish_raw();
    assert_eq!(value[0], SEGMENT_FORMAT_RAW);
    let (segment, decompressed) = Segment::parse(&value).unwrap();
    assert!(
        decompressed.is_none(),
        "format 1 points into the value itself"
    );
    assert_eq!(segment.head_hash, head);
    let parsed: Vec<(u64, &[u8])> = segment.seq_records(&value).collect();
    assert_eq!(parsed, [(5, &b"old"[..]), (6, &b"records"[..])]);
}

#[test]
fn a_damaged_length_is_refused_not_allocated() {
    let (mut value, _) = sample(1, &[b"one"]);
    value[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let error = Segment::parse(&value).unwrap_err();
    assert!(error.to_string().contains("too large"), "{error}");
}

#[test]
fn parts_hash_like_their_concatenation() {
    let mut split = SegmentBuilder::new(1, chain::GENESIS_HASH, 0);
    split.push(&[b"abc", b"def"]);
    let mut whole = SegmentBuilder::new(1, chain::GENESIS_HASH, 0);
    whole.push(&[b"abcdef"]);
    assert_eq!(split.head_hash(), whole.head_hash());
    assert_eq!(split.finish_raw(), whole.finish_raw());
}

#[test]
fn varints_round_trip_and_reject_overlong_input() {
    for value in [
        0,
        1,
        127,
        128,
        300,
        16_383,
        16_384,
        u64::from(u32::MAX),
        u64::MAX,
    ] {
        let mut buf = Vec::new();
        write_varint(&mut buf, value);
        assert_eq!(read_varint(&buf), Some((value, buf.len())));
        assert_eq!(read_varint(&buf[..buf.len() - 1]), None);
    }
    assert_eq!(read_varint(&[0xff; 11]), None);
    assert_eq!(read_varint(&[]), None);
    assert_eq!(read_varint(&[0x80; 3]), None);
    assert_eq!(
        read_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
        None
    );
}

/// The encoder stored logs were written with before prost's: the stored, hashed bytes
/// must not change.
fn hand_written_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push(value.to_le_bytes()[0] | 0x80);
        value >>= 7;
    }
    buf.push(value.to_le_bytes()[0]);
}

proptest::proptest! {
    #[test]
    fn varints_are_the_bytes_stored_logs_hold(value: u64, shift in 0_u32..64) {
        for value in [value, value >> shift] {
            let (mut ours, mut before) = (Vec::new(), Vec::new());
            write_varint(&mut ours, value);
            hand_written_varint(&mut before, value);
            proptest::prop_assert_eq!(&ours, &before);
            proptest::prop_assert_eq!(read_varint(&before), Some((value, before.len())));
        }
    }
}

/// A segment in format 1, where every byte of the records is seen by the parser.
fn raw_sample(first_seq: u64, records: &[&[u8]]) -> Vec<u8> {
    let mut builder = SegmentBuilder::new(first_seq, [7; 32], 0);
    for record in records {
        builder.push(&[record]);
    }
    builder.finish_raw()
}

#[test]
fn every_truncation_is_an_error() {
    for value in [
        sample(1, &[b"one", b"two", b"three"]).0,
        raw_sample(1, &[b"one", b"two", b"three"]),
    ] {
        for len in 0..value.len() {
            assert!(Segment::parse(&value[..len]).is_err(), "truncated to {len}");
        }
    }
}

#[test]
fn bad_headers_are_errors() {
    let value = raw_sample(1, &[b"one"]);

    let mut bad_version = value.clone();
    bad_version[0] = 3;
    let error = Segment::parse(&bad_version).unwrap_err();
    assert!(error.to_string().contains("version 3"), "{error}");

    let mut zero_seq = value.clone();
    zero_seq[FIRST_SEQ_AT..PREV_HASH_AT].copy_from_slice(&0_u64.to_be_bytes());
    assert!(Segment::parse(&zero_seq).is_err());

    let mut no_records = value.clone();
    no_records[COUNT_AT..HEADER_LEN].copy_from_slice(&0_u32.to_be_bytes());
    assert!(Segment::parse(&no_records).is_err());

    let mut huge_count = value.clone();
    huge_count[COUNT_AT..HEADER_LEN].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(Segment::parse(&huge_count).is_err());

    let mut overflow = value.clone();
    overflow[FIRST_SEQ_AT..PREV_HASH_AT].copy_from_slice(&u64::MAX.to_be_bytes());
    overflow[COUNT_AT..HEADER_LEN].copy_from_slice(&2_u32.to_be_bytes());
    assert!(Segment::parse(&overflow).is_err());

    let mut trailing = value;
    trailing.push(0);
    let error = Segment::parse(&trailing).unwrap_err();
    assert!(error.to_string().contains("follow the last"), "{error}");
}

#[test]
fn keys_are_big_endian_seqs() {
    assert_eq!(segment_key(258), [0, 0, 0, 0, 0, 0, 1, 2]);
    assert_eq!(key_seq(&segment_key(258)), Some(258));
    assert_eq!(key_seq(b"short"), None);
    assert_eq!(describe_key(&segment_key(9)), "9");
    assert_eq!(describe_key(&[1, 0xff]), "0x01ff");
    assert!(segment_key(255) < segment_key(256));
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(value in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        let _ = Segment::parse(&value);
        // Also behind a valid header of each format.
        for version in [SEGMENT_FORMAT_RAW, SEGMENT_FORMAT_LZ4] {
            let mut headed = raw_sample(1, &[b"x"])[..HEADER_LEN].to_vec();
            headed[0] = version;
            headed.extend_from_slice(&value);
            let _ = Segment::parse(&headed);
        }
    }

    #[test]
    fn any_damaged_byte_never_panics(
        records in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..40), 1..6),
        position in proptest::num::usize::ANY,
        flip in 1_u8..,
    ) {
        let slices: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        for mut value in [sample(3, &slices).0, raw_sample(3, &slices)] {
            let at = position % value.len();
            value[at] ^= flip;
            if let Ok((segment, decompressed)) = Segment::parse(&value) {
                // Whatever parsed must stay within its bytes.
                let bytes = decompressed.unwrap_or_else(|| value.clone());
                for (_, record) in segment.seq_records(&bytes) {
                    proptest::prop_assert!(record.len() <= bytes.len());
                }
            }
        }
    }
}
