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
        cert_names_serial: true,
    };
    let index = TokenIndex::of([&record]);
    assert_eq!(index.lookup("secret-token").as_deref(), Some("pos_1"));
    assert_eq!(index.lookup("secret-tokem"), None);
    assert_eq!(index.lookup(""), None);
}

// === tickets and CORS, through the router, under paused time ===

mod browser {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::response::Response;
    use tower::ServiceExt;

    use super::*;
    use crate::store::testing::{Kind, TestDb, on_both_backends};
    use crate::store::{Limits, NewTerminal};

    const TOKEN_A: &str = "token-of-pos-a";
    const TOKEN_B: &str = "token-of-pos-b";

    /// The channels over a real store holding terminals `pos_a` and `pos_b` (and the dir).
    async fn channels(kind: Kind) -> (Arc<Channels>, TestDb) {
        let db = TestDb::new(kind).await;
        let store = db.open(Limits::new(16, 16)).await;
        let mut records = Vec::new();
        for (id, token) in [("pos_a", TOKEN_A), ("pos_b", TOKEN_B)] {
            let new = NewTerminal {
                http_token_sha256: hex::encode(Sha256::digest(token.as_bytes())),
                ..NewTerminal::for_test(id)
            };
            records.push(store.register_terminal(new).await.unwrap().unwrap());
        }
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let channels = Channels {
            store: store.clone(),
            signer: crate::delivery::Signer {
                key,
                kid: "kid".into(),
            },
            hub: Hub::default(),
            tokens: TokenIndex::of(&records),
            tickets: Tickets::default(),
            acks: mpsc::unbounded_channel().0,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            keepalive: Duration::from_secs(15),
            streams: crate::metrics::Metrics::new().unwrap().http_streams,
            rpc: Arc::new(crate::rpc::Rpc::new(store.clone(), None)),
            renewals: crate::admin::Renewals::load(&store).await.unwrap(),
        };
        (Arc::new(channels), db)
    }

    async fn send(router: &Router, request: Request<Body>) -> Response {
        router.clone().oneshot(request).await.unwrap()
    }

    async fn ticket(router: &Router, token: &str) -> String {
        let response = send(
            router,
            Request::post(TICKETS_PATH)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["expires_in"], 30);
        body["ticket"].as_str().unwrap().to_owned()
    }

    /// The status of `GET path` with `?ticket=` and, when given, a bearer token.
    async fn open(router: &Router, path: &str, ticket: &str, bearer: Option<&str>) -> StatusCode {
        let mut request = Request::get(format!("{path}?ticket={ticket}"));
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        send(router, request.body(Body::empty()).unwrap())
            .await
            .status()
    }

    async fn a_ticket_opens_one_stream_of_its_terminal_within_its_ttl(kind: Kind) {
        let (channels, _db) = channels(kind).await;
        let router = router(channels.clone(), &[]);
        tokio::time::pause();

        let t = ticket(&router, TOKEN_A).await;
        assert_eq!(open(&router, EVENTS_PATH, &t, None).await, StatusCode::OK);
        assert_eq!(
            open(&router, EVENTS_PATH, &t, None).await,
            StatusCode::UNAUTHORIZED,
            "spent"
        );

        // Just inside and just past the TTL.
        let t = ticket(&router, TOKEN_A).await;
        let late = ticket(&router, TOKEN_A).await;
        tokio::time::advance(tickets::TICKET_TTL - Duration::from_millis(1)).await;
        assert_eq!(open(&router, EVENTS_PATH, &t, None).await, StatusCode::OK);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            open(&router, EVENTS_PATH, &late, None).await,
            StatusCode::UNAUTHORIZED,
            "expired"
        );

        // With another terminal's bearer token: refused (and spent).
        let t = ticket(&router, TOKEN_A).await;
        assert_eq!(
            open(&router, EVENTS_PATH, &t, Some(TOKEN_B)).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            open(&router, EVENTS_PATH, &t, None).await,
            StatusCode::UNAUTHORIZED
        );
        // With a token that is no terminal's: refused, and spent all the same.
        let t = ticket(&router, TOKEN_A).await;
        assert_eq!(
            open(&router, EVENTS_PATH, &t, Some("no-such-token")).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            open(&router, EVENTS_PATH, &t, None).await,
            StatusCode::UNAUTHORIZED
        );
        // With its own terminal's token: fine.
        let t = ticket(&router, TOKEN_A).await;
        assert_eq!(
            open(&router, EVENTS_PATH, &t, Some(TOKEN_A)).await,
            StatusCode::OK
        );

        // Only the streams take tickets: not polling, not the ticket endpoint itself.
        let t = ticket(&router, TOKEN_A).await;
        assert_eq!(
            open(&router, "/v1/terminal/payments/pi_x", &t, None).await,
            StatusCode::UNAUTHORIZED
        );
        let response = send(
            &router,
            Request::post(format!("{TICKETS_PATH}?ticket={t}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            open(&router, EVENTS_PATH, &t, None).await,
            StatusCode::OK,
            "still unspent: neither call took it"
        );
        assert_eq!(
            open(&router, WS_PATH, "nonsense", None).await,
            StatusCode::UNAUTHORIZED
        );
        channels.store.close().await;
    }

    async fn a_revoked_terminals_ticket_is_refused(kind: Kind) {
        let (channels, _db) = channels(kind).await;
        let router = router(channels.clone(), &[]);
        let t = ticket(&router, TOKEN_A).await;
        channels
            .store
            .revoke_terminal("pos_a".into())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            open(&router, EVENTS_PATH, &t, None).await,
            StatusCode::UNAUTHORIZED
        );
        channels.store.close().await;
    }

    async fn cors_answers_only_the_listed_origins(kind: Kind) {
        let (channels, _db) = channels(kind).await;
        let listed = "http://127.0.0.1:8480";
        let with_cors = router(channels.clone(), &[listed.to_owned()]);
        let preflight = |origin: &str| {
            Request::options(INTENTS_PATH)
                .header(header::ORIGIN, origin)
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
                .header(
                    header::ACCESS_CONTROL_REQUEST_HEADERS,
                    "authorization,content-type",
                )
                .body(Body::empty())
                .unwrap()
        };
        let ok = send(&with_cors, preflight(listed)).await;
        assert_eq!(ok.status(), StatusCode::OK);
        let h = ok.headers();
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], listed);
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_METHODS], "GET,POST");
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization,content-type"
        );
        assert!(h.get(header::ACCESS_CONTROL_ALLOW_CREDENTIALS).is_none());

        let other = send(&with_cors, preflight("http://evil.example")).await;
        assert!(
            other
                .headers()
                .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
                .is_none()
        );

        // Without the key: no CORS headers at all, and no preflight answer.
        let without = router(channels.clone(), &[]);
        let none = send(&without, preflight(listed)).await;
        assert!(
            none.headers()
                .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
                .is_none()
        );
        assert_eq!(none.status(), StatusCode::METHOD_NOT_ALLOWED);
        channels.store.close().await;
    }

    on_both_backends!(
        a_ticket_opens_one_stream_of_its_terminal_within_its_ttl,
        a_revoked_terminals_ticket_is_refused,
        cors_answers_only_the_listed_origins,
    );
}
