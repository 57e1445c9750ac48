//! Black-box tests of kpi.v1.Audit: the head digest, replay, and the hash chain recomputed
//! by the test itself with SHA-256.

mod common;

use common::{TestServer, kpi, measurement};
use kpi_service::proto::{self, KpiKind, replay_events_request::Start};
use sha2::{Digest, Sha256};

/// hash_n = SHA-256(hash_{n-1} || seq_n as 8 bytes big-endian || record_n), computed here
/// from the bytes the server sent, independently of the server's code.
fn recompute_chain(envelopes: &[proto::EventEnvelope]) -> Vec<Vec<u8>> {
    let mut previous = vec![0u8; 32];
    let mut hashes = Vec::new();
    for envelope in envelopes {
        let mut hasher = Sha256::new();
        hasher.update(&previous);
        hasher.update(envelope.seq.to_be_bytes());
        hasher.update(&envelope.record);
        previous = hasher.finalize().to_vec();
        hashes.push(previous.clone());
    }
    hashes
}

#[tokio::test]
async fn an_empty_log_has_a_zero_digest() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let info = server.log_info().await;
    assert_eq!(info.head_seq, 0);
    assert_eq!(info.event_count, 0);
    assert_eq!(info.head_hash, vec![0u8; 32]);
    assert!(info.head_recorded_at.is_none());
    let verified = server.verify_log().await;
    assert!(verified.ok);
    assert_eq!(verified.checked_events, 0);
    assert!(server.replay_all().await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn the_replayed_chain_recomputed_with_sha256_matches_the_head_hash() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    server.define(kpi("nps", KpiKind::Nps)).await;
    for i in 0..5 {
        server
            .record(vec![
                measurement("revenue", f64::from(i)),
                measurement("nps", 9.0),
            ])
            .await
            .unwrap();
    }
    let info = server.log_info().await;
    assert_eq!(info.head_seq, 12);
    assert_eq!(info.event_count, 12);

    let envelopes = server.replay_all().await;
    assert_eq!(
        envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    let hashes = recompute_chain(&envelopes);
    let mut previous = vec![0u8; 32];
    for (envelope, hash) in envelopes.iter().zip(&hashes) {
        assert_eq!(envelope.prev_hash, previous, "seq {}", envelope.seq);
        assert_eq!(&envelope.hash, hash, "seq {}", envelope.seq);
        previous = hash.clone();
        // The decoded form is the decoding of the verbatim bytes.
        let decoded = <proto::EventRecord as prost::Message>::decode(envelope.record.as_slice())
            .expect("record decodes");
        assert_eq!(Some(decoded), envelope.event);
        assert_eq!(
            envelope.recorded_at,
            envelope.event.as_ref().unwrap().recorded_at
        );
    }
    assert_eq!(hashes.last().unwrap(), &info.head_hash);

    let verified = server.verify_log().await;
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.checked_events, 12);
    assert_eq!(verified.head_seq, 12);
    assert_eq!(verified.head_hash, info.head_hash);
    assert!(verified.chain_break.is_none());
    server.stop().await;
}

#[tokio::test]
async fn replay_serves_a_range_of_seqs_or_times() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.define(kpi("revenue", KpiKind::Sum)).await;
    for i in 0..10 {
        server
            .record(vec![measurement("revenue", f64::from(i))])
            .await
            .unwrap();
    }
    let all = server.replay_all().await;
    let replay = |request: proto::ReplayEventsRequest| {
        let mut client = server.audit();
        async move {
            let mut stream = client.replay_events(request).await.unwrap().into_inner();
            let mut seqs = Vec::new();
            while let Some(item) = stream.message().await.unwrap() {
                if let Some(proto::replay_events_response::Item::Event(e)) = item.item {
                    seqs.push(e.seq);
                }
            }
            seqs
        }
    };
    let middle = replay(proto::ReplayEventsRequest {
        start: Some(Start::FromSeq(4)),
        to_seq: Some(7),
        ..Default::default()
    })
    .await;
    assert_eq!(middle, [4, 5, 6, 7]);
    // A start past the head: see replay.rs (OUT_OF_RANGE).

    let sixth = &all[5];
    let from_time = replay(proto::ReplayEventsRequest {
        start: Some(Start::FromRecordedAt(sixth.recorded_at.unwrap())),
        ..Default::default()
    })
    .await;
    // Events recorded in the same instant as seq 6 may come before it; none after it is missed.
    assert_eq!(from_time.last(), Some(&11));
    assert!(from_time.first().is_some_and(|first| *first <= 6));
    let recorded_at = |seq: u64| all[usize::try_from(seq - 1).unwrap()].recorded_at.unwrap();
    let first = from_time[0];
    assert_eq!(recorded_at(first), sixth.recorded_at.unwrap());
    if first > 1 {
        let before = recorded_at(first - 1);
        let sixth_at = sixth.recorded_at.unwrap();
        assert!((before.seconds, before.nanos) < (sixth_at.seconds, sixth_at.nanos));
    }
    server.stop().await;
}

/// Checks a signed head as an auditor would, from the contract alone (audit.proto): the
/// Ed25519 signature of "kpi.v1.SignedHead\0", seq, hash, and signed_at's seconds and
/// nanos, integers big-endian, with the public key the auditor holds.
fn verify_signed_head(
    head: &proto::SignedHead,
    trusted: &ed25519_dalek::VerifyingKey,
) -> Result<(), String> {
    use ed25519_dalek::Verifier;
    let signed_at = head.signed_at.ok_or("no signed_at")?;
    let mut message = b"kpi.v1.SignedHead\0".to_vec();
    message.extend_from_slice(&head.seq.to_be_bytes());
    message.extend_from_slice(&head.hash);
    message.extend_from_slice(&signed_at.seconds.to_be_bytes());
    message.extend_from_slice(&u32::try_from(signed_at.nanos).unwrap().to_be_bytes());
    let signature =
        ed25519_dalek::Signature::from_slice(&head.signature).map_err(|error| error.to_string())?;
    trusted
        .verify(&message, &signature)
        .map_err(|error| error.to_string())
}

/// The event `seq` of the server's log now.
async fn event_at(server: &TestServer, seq: u64) -> proto::EventEnvelope {
    let mut stream = server
        .audit()
        .replay_events(proto::ReplayEventsRequest {
            start: Some(Start::FromSeq(seq)),
            to_seq: Some(seq),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let message = stream.message().await.unwrap().expect("the event");
        if let Some(proto::replay_events_response::Item::Event(envelope)) = message.item {
            return envelope;
        }
    }
}

#[tokio::test]
async fn signed_heads_verify_with_the_public_key_alone_and_later_logs_extend_them() {
    use ed25519_dalek::pkcs8::DecodePublicKey;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("signing.pem");
    let mut config = kpi_service::Config::with_data_dir(dir.path().join("data"));
    config.signing_key = Some(key_file.clone());
    config.generate_signing_key = true;
    config.heartbeat_ms = 100;
    let server = TestServer::start_with(config).await;
    server.define(kpi("orders", KpiKind::Sum)).await;
    server
        .record(vec![measurement("orders", 1.0), measurement("orders", 2.0)])
        .await
        .unwrap();

    // The auditor's copy of the public key, from the command line tool.
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_kpi-server"))
        .arg("public-key")
        .arg("--signing-key")
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(printed.status.success(), "{printed:?}");
    let printed = String::from_utf8(printed.stdout).unwrap();
    let end = "-----END PUBLIC KEY-----\n";
    let pem = &printed[..printed.find(end).expect("a PEM public key") + end.len()];
    let trusted = ed25519_dalek::VerifyingKey::from_public_key_pem(pem).unwrap();
    assert!(printed.contains(&hex::encode(trusted.to_bytes())));

    let info = server.log_info().await;
    let signed = info.signed_head.clone().expect("a signed head");
    assert_eq!((signed.seq, &signed.hash), (info.head_seq, &info.head_hash));
    assert_eq!(signed.public_key, trusted.to_bytes());
    verify_signed_head(&signed, &trusted).expect("the signature checks out");
    // Any change to what was signed breaks it.
    for forged in [
        proto::SignedHead {
            seq: signed.seq + 1,
            ..signed.clone()
        },
        proto::SignedHead {
            hash: vec![0; 32],
            ..signed.clone()
        },
    ] {
        assert!(verify_signed_head(&forged, &trusted).is_err());
    }
    // Another key does not verify it.
    let other = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
    assert!(verify_signed_head(&signed, &other).is_err());

    // The log grows; it still extends the signed head: its event at that seq has that hash.
    server
        .record(vec![measurement("orders", 3.0)])
        .await
        .unwrap();
    assert_eq!(event_at(&server, signed.seq).await.hash, signed.hash);
    assert!(server.log_info().await.head_seq > signed.seq);

    // A following replay's idle checkpoints are signed heads too: from the start, from
    // just past the head (where it has read nothing yet), and from a seq further on
    // (where it waits for the log to reach it).
    let head = server.log_info().await.head_seq;
    for from_seq in [1, head + 1, head + 5] {
        let mut stream = server
            .audit()
            .replay_events(proto::ReplayEventsRequest {
                start: Some(Start::FromSeq(from_seq)),
                follow: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let checkpoint = loop {
            let message = stream.message().await.unwrap().expect("the stream goes on");
            if let Some(proto::replay_events_response::Item::Checkpoint(checkpoint)) = message.item
            {
                break checkpoint;
            }
        };
        assert_eq!(checkpoint.seq, head);
        let signed = checkpoint.signed_head.expect("a signed checkpoint");
        assert_eq!(signed.seq, checkpoint.seq);
        verify_signed_head(&signed, &trusted).expect("the checkpoint's signature checks out");
        assert_eq!(event_at(&server, signed.seq).await.hash, signed.hash);
    }
    server.stop().await;

    // Without a key, nothing is signed.
    let unsigned = TestServer::start(&dir.path().join("data")).await;
    assert!(unsigned.log_info().await.signed_head.is_none());
    unsigned.stop().await;
}
