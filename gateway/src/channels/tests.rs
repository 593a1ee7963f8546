//! The channels' parts over a real store.

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, header};
use sha2::{Digest, Sha256};

use super::auth::bearer;
use super::*;
use crate::delivery::Published;
use crate::store::TerminalRecord;

#[test]
fn bearer_parsing() {
    let mut h = HeaderMap::new();
    assert_eq!(bearer(&h), None);
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer abc"),
    );
    assert_eq!(bearer(&h), Some("abc"));
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("bearer  abc "),
    );
    assert_eq!(bearer(&h), Some("abc"));
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
    assert_eq!(bearer(&h), None);
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
    assert_eq!(bearer(&h), None);
}

#[tokio::test]
async fn hub_forwards_per_terminal_and_forgets_the_revoked() {
    let hub = Hub::default();
    let (tx, rx) = broadcast::channel(8);
    let token = CancellationToken::new();
    let task = tokio::spawn(hub.clone().run(rx, token.clone()));
    let mut a = hub.subscribe("a");
    let mut b = hub.subscribe("b");
    let published = |t: &str, seq| Published {
        terminal_id: t.into(),
        intent_id: format!("pi_{seq}"),
        seq,
        jws: Bytes::from_static(b"x.y.z"),
    };
    tx.send(published("a", 1)).unwrap();
    tx.send(published("b", 2)).unwrap();
    match a.recv().await.unwrap() {
        Signal::Published(p) => assert_eq!((p.terminal_id.as_str(), p.seq), ("a", 1)),
        other => panic!("{other:?}"),
    }
    match b.recv().await.unwrap() {
        Signal::Published(p) => assert_eq!((p.terminal_id.as_str(), p.seq), ("b", 2)),
        other => panic!("{other:?}"),
    }
    hub.revoke("a");
    assert!(matches!(a.recv().await.unwrap(), Signal::Revoked));
    assert!(!hub.lock().contains_key("a"));
    // A terminal whose streams are all gone is forgotten at its next publish.
    drop(b);
    tx.send(published("b", 3)).unwrap();
    drop(tx);
    task.await.unwrap();
    assert!(hub.lock().is_empty());
    token.cancel();
}

#[test]
fn token_index_finds_by_hash_only() {
    let record = TerminalRecord {
        id: "pos_1".into(),
        tenant: "t".into(),
        merchant_id: "m".into(),
        label: None,
        cert_serial: "01".into(),
        http_token_sha256: hex::encode(Sha256::digest(b"secret-token")),
        created_at: time::OffsetDateTime::UNIX_EPOCH,
        revoked_at: None,
        next_seq: 1,
        last_seen: None,
        cert_not_after: None,
        previous_cert: None,
    };
    let index = TokenIndex::of([&record]);
    assert_eq!(index.lookup("secret-token").as_deref(), Some("pos_1"));
    assert_eq!(index.lookup("secret-tokem"), None);
    assert_eq!(index.lookup(""), None);
}
