//! Attacks from a terminal's side, over real MQTT/TLS: another terminal's topics, forged and
//! replayed confirmations, bad and revoked certificates, silent clients.

use std::time::Duration;

use tokio::time::Instant;

use posgate::pki::Pki;
use posgate_proto::confirmation::{self, VerifyError};
use posgate_proto::topics;
use posgate_sim::terminal::{Bundle, Identity, Seen, Terminal};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{TestGateway, connack, spawn_gateway, spawn_with};

const WAIT: Duration = Duration::from_secs(10);

async fn connect(
    gw: &TestGateway,
    identity: &Identity,
) -> Result<(AsyncClient, EventLoop), String> {
    gw.mqtt_connect(identity).await
}

/// What the broker answers next: a SUBACK's codes, a PUBACK, a publish, or the connection's end.
#[derive(Debug, PartialEq)]
enum Next {
    SubAck(Vec<SubscribeReasonCode>),
    PubAck,
    Publish(String),
    Closed,
}

async fn next(eventloop: &mut EventLoop) -> Next {
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => return Next::SubAck(ack.return_codes),
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => return Next::PubAck,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return Next::Publish(p.topic),
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Next::Closed,
            Err(_) => panic!("the broker answered nothing within {WAIT:?}"),
        }
    }
}

#[tokio::test]
async fn terminal_b_cannot_read_or_write_terminal_a() {
    let gw = spawn_gateway().await;
    let a = gw.provision("pos_a").await;
    let b = gw.provision("pos_b").await;
    gw.pay("pos_a", "pi_victim").await;
    let ta = topics::tenant_for("pos_a");
    let me = Identity::of(&b);

    // Subscriptions outside its own payments and replies are refused.
    for filter in [
        topics::payments_filter(&ta),
        topics::payments(&ta, "pi_victim"),
        "#".to_owned(),
        "/tenants/#".to_owned(),
        "/tenants/+/payments/+".to_owned(),
        format!("/tenants/{ta}/#"),
    ] {
        let (client, mut eventloop) = connect(&gw, &me).await.unwrap();
        client.subscribe(&filter, QoS::AtLeastOnce).await.unwrap();
        match next(&mut eventloop).await {
            Next::SubAck(codes) => assert_eq!(codes, [SubscribeReasonCode::Failure], "{filter}"),
            Next::Closed => {}
            other => panic!("{filter}: {other:?}"),
        }
        // Nothing of A's ever reaches B.
        assert!(
            !matches!(next_or_quiet(&mut eventloop).await, Some(Next::Publish(_))),
            "{filter}"
        );
    }

    // Publishing into A's space (a retained fake "paid", an ack of A's intent) cuts B off.
    let fake = confirmation::sign(
        &ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
        "forged",
        &sample(&a, "pi_victim"),
    );
    for (topic, payload, retain) in [
        (
            topics::payments(&ta, "pi_victim"),
            fake.clone().into_bytes(),
            true,
        ),
        (
            topics::payments(&ta, "pi_other"),
            fake.clone().into_bytes(),
            true,
        ),
        (
            topics::acks(&ta),
            br#"{"intent_id":"pi_victim","seq":1}"#.to_vec(),
            false,
        ),
        (
            topics::status(&ta),
            br#"{"state":"offline"}"#.to_vec(),
            true,
        ),
        (
            topics::payments(&topics::tenant_for("pos_b"), "pi_victim"),
            fake.clone().into_bytes(),
            true,
        ),
    ] {
        let (client, mut eventloop) = connect(&gw, &me).await.unwrap();
        client
            .publish(&topic, QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap();
        assert_eq!(
            next(&mut eventloop).await,
            Next::Closed,
            "publishing to {topic} must be refused"
        );
    }

    // An ack of A's intent on B's own topic is B's business only: it acks nothing of A's.
    let (client, mut eventloop) = connect(&gw, &me).await.unwrap();
    let ack = br#"{"intent_id":"pi_victim","seq":1}"#.to_vec();
    client
        .publish(
            topics::acks(&topics::tenant_for("pos_b")),
            QoS::AtLeastOnce,
            false,
            ack,
        )
        .await
        .unwrap();
    assert_eq!(next(&mut eventloop).await, Next::PubAck);

    // A last will aimed at A's status topic: refused at CONNECT.
    let mut will = me.clone();
    will.last_will = Some((topics::status(&ta), br#"{"state":"online"}"#.to_vec()));
    assert!(connect(&gw, &will).await.is_err());

    // A still has its confirmation pending, and receives exactly that, verified.
    assert_eq!(gw.terminal_view("pos_a").await["pending"], 1);
    let mut ta_client = Terminal::connect(a, gw.mqtt).await.unwrap();
    let c = ta_client.next_confirmation(WAIT).await.unwrap();
    assert_eq!(
        (c.intent_id.as_str(), c.seq, c.terminal_id.as_str()),
        ("pi_victim", 1, "pos_a")
    );
    while let Some(seen) = ta_client.next_seen(Duration::from_millis(300)).await {
        assert!(
            !matches!(seen, Seen::Rejected(_) | Seen::Confirmation(_)),
            "A saw something false: {seen:?}"
        );
    }
    gw.shutdown().await;
}

/// The next event if one comes within a short quiet period.
/// A terminal that subscribes to filter after filter under its own tenant is refused once it holds
/// `MAX_SUBSCRIPTIONS`: the broker keeps a bounded set per session whatever the firmware does.
#[tokio::test]
async fn a_session_holds_a_bounded_number_of_subscriptions() {
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_subflood").await;
    let (client, mut eventloop) = connect(&gw, &Identity::of(&bundle)).await.unwrap();
    let base = bundle.topics.payments.trim_end_matches('+').to_owned();
    let (mut granted, mut refused) = (0, 0);
    for n in 0..40 {
        client
            .subscribe(format!("{base}flood{n}"), QoS::AtLeastOnce)
            .await
            .unwrap();
        match next(&mut eventloop).await {
            Next::SubAck(codes) if codes == [SubscribeReasonCode::Failure] => refused += 1,
            Next::SubAck(_) => granted += 1,
            Next::Closed => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        granted,
        posgate::broker::MAX_SUBSCRIPTIONS,
        "granted {granted}, refused {refused}"
    );
    gw.shutdown().await;
}

async fn next_or_quiet(eventloop: &mut EventLoop) -> Option<Next> {
    tokio::time::timeout(Duration::from_millis(300), next(eventloop))
        .await
        .ok()
}

fn sample(bundle: &Bundle, intent: &str) -> confirmation::Confirmation {
    confirmation::Confirmation::new(
        &bundle.terminal_id,
        intent,
        1,
        confirmation::ConfirmationStatus::Confirmed,
        posgate_proto::MicroUsdc(4_500_000),
        "2026-11-25T00:00:00Z",
    )
}

#[tokio::test]
async fn verify_rejects_forged_foreign_and_replayed_confirmations() {
    let gw = spawn_gateway().await;
    let mut a = gw.terminal("pos_v").await;
    gw.pay("pos_v", "pi_v_1").await;
    let real = a.next_confirmation(WAIT).await.unwrap();
    let key = a.bundle.gateway_jwk.verifying_key().unwrap();
    let jws = confirmation::sign(
        &ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
        &a.bundle.gateway_jwk.kid,
        &real,
    );
    assert!(matches!(
        confirmation::verify(&jws, &key, "pos_v", 0),
        Err(VerifyError::BadSignature)
    ));
    // The gateway's own bytes, as the terminal got them, with the payload altered.
    let genuine = retained_jws(&gw, &a.bundle).await;
    assert!(confirmation::verify(&genuine, &key, "pos_v", 0).is_ok());
    let parts: Vec<&str> = genuine.split('.').collect();
    let mut altered = real.clone();
    altered.amount_micros = 1;
    let payload = base64_url(&serde_json::to_vec(&altered).unwrap());
    let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
    assert!(matches!(
        confirmation::verify(&tampered, &key, "pos_v", 0),
        Err(VerifyError::BadSignature)
    ));
    assert!(matches!(
        confirmation::verify(&genuine, &key, "pos_other", 0),
        Err(VerifyError::WrongTerminal { .. })
    ));
    // The retained message read may be seq 1 or, once 1 is acked, 2.
    let seq = confirmation::verify(&genuine, &key, "pos_v", 0)
        .unwrap()
        .seq;
    assert!(matches!(
        confirmation::verify(&genuine, &key, "pos_v", seq + 1),
        Err(VerifyError::OldSeq { seq: s, min_seq: m }) if s == seq && m == seq + 1
    ));
    gw.shutdown().await;
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A second session of the terminal reads the retained confirmation (before the first one acks it,
/// the gateway keeps it retained; after, it is republished on reconnect), as raw bytes.
async fn retained_jws(gw: &TestGateway, bundle: &Bundle) -> String {
    let mut identity = Identity::of(bundle);
    identity.last_will = None;
    let (client, mut eventloop) = connect(gw, &identity).await.unwrap();
    // Reconnecting makes the gateway publish the head row again even if it was acked meanwhile
    // (then there is none): pay once more to be sure there is something to read.
    gw.pay(&bundle.terminal_id, "pi_v_2").await;
    client
        .subscribe(&bundle.topics.payments, QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Incoming(Packet::Publish(p)) if !p.payload.is_empty() => {
                return String::from_utf8(p.payload.to_vec()).unwrap();
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn bad_certificates_are_refused() {
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_c").await;

    // No client certificate.
    let mut anonymous = Identity::of(&bundle);
    anonymous.cert_key = None;
    assert!(connect(&gw, &anonymous).await.is_err());

    // A certificate from another CA (another gateway's), for the same id.
    let other = spawn_gateway().await;
    let foreign = other.provision("pos_c").await;
    let mut identity = Identity::of(&foreign);
    identity.ca_pem = bundle.ca_pem.clone();
    assert!(connect(&gw, &identity).await.is_err());
    other.shutdown().await;

    // An expired certificate from the right CA.
    let pki = Pki::load_or_create(
        &gw.data_dir.path().join("."),
        &["localhost".into(), "127.0.0.1".into()],
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let expired = pki
        .issue_terminal_valid(
            "pos_c",
            &topics::tenant_for("pos_c"),
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .unwrap();
    let mut identity = Identity::of(&bundle);
    identity.cert_key = Some((expired.cert_pem, expired.key_pem));
    assert!(connect(&gw, &identity).await.is_err());

    // Its own certificate, but another client id.
    let mut identity = Identity::of(&bundle);
    identity.client_id = "pos_d".into();
    identity.last_will = None;
    assert!(connect(&gw, &identity).await.is_err());

    // And the genuine article connects.
    assert!(connect(&gw, &Identity::of(&bundle)).await.is_ok());
    gw.shutdown().await;
}

#[tokio::test]
async fn revocation_cuts_the_connection_and_refuses_it_even_after_a_restart() {
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_r").await;
    let (_client, mut eventloop) = connect(&gw, &Identity::of(&bundle)).await.unwrap();
    let response = gw
        .admin_post("/v1/terminals/pos_r/revoke", serde_json::json!({}))
        .await;
    assert_eq!(response.status(), 200);
    // The open connection is cut.
    let started = Instant::now();
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
            Err(_) => panic!("the revoked terminal's connection is still open after {WAIT:?}"),
        }
    }
    assert!(started.elapsed() < WAIT);
    assert!(
        connect(&gw, &Identity::of(&bundle)).await.is_err(),
        "refused after revocation"
    );
    // Operators see why connections are refused.
    gw.metric_reaches(r#"posgate_mqtt_refused_total{reason="revoked"}"#, 1.0, WAIT)
        .await;
    let view = gw.terminal_view("pos_r").await;
    assert_eq!(
        (view["revoked"].as_bool(), view["online"].as_bool()),
        (Some(true), Some(false))
    );
    let gw = gw.restart().await;
    assert!(
        connect(&gw, &Identity::of(&bundle)).await.is_err(),
        "refused after a restart"
    );
    assert_eq!(
        gw.admin_post("/v1/terminals/nobody/revoke", serde_json::json!({}))
            .await
            .status(),
        404
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn silent_and_half_handshake_clients_delay_no_one() {
    let gw = spawn_with(&[("POSGATE__MQTT__HANDSHAKE_TIMEOUT_SECS", "2")]).await;
    let bundle = gw.provision("pos_s").await;
    let mut silent = Vec::new();
    for i in 0..200 {
        let mut stream = tokio::net::TcpStream::connect(gw.mqtt).await.unwrap();
        if i % 4 == 0 {
            // Half a TLS ClientHello: a record header announcing 512 bytes, then 3 of them.
            stream
                .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01])
                .await
                .unwrap();
        }
        silent.push(stream);
    }
    let started = Instant::now();
    let mut t = Terminal::connect(bundle, gw.mqtt).await.unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "a fresh terminal took {took:?} beside 200 silent clients"
    );
    gw.pay("pos_s", "pi_s_1").await;
    assert_eq!(t.next_confirmation(WAIT).await.unwrap().intent_id, "pi_s_1");
    // Both kinds are dropped after the handshake timeout: [0] sent half a ClientHello, [1] nothing.
    for stream in &mut silent[..2] {
        let mut buf = [0u8; 16];
        let closed =
            tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(stream, &mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "a silent client was not dropped: {closed:?}"
        );
    }
    gw.shutdown().await;
}

/// A scanner that opens sockets and sends nothing: a listener holds at most its bound of
/// connections (the admin listener: 256); the next one waits in the backlog, and is served as soon
/// as one of the idle ones goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_holds_a_bounded_number_of_connections() {
    let gw = spawn_gateway().await;
    let mut idle = Vec::new();
    for _ in 0..posgate::serve::ADMIN_MAX_CONNECTIONS {
        let mut s = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        idle.push(s);
    }
    let healthz = || {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = format!("http://{}/healthz", gw.admin);
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    };
    let waiting = tokio::spawn(healthz());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "served beyond the bound");
    drop(idle.pop());
    let status = tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap();
    assert_eq!(status.unwrap(), 200);
    drop(idle);
    gw.shutdown().await;
}

/// A TLS connection to the MQTT listener with the bundle's certificate, and nothing else.
async fn tls_only(
    gw: &TestGateway,
    bundle: &Bundle,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    tls_to(gw.mqtt, bundle).await
}

async fn tls_to(
    addr: std::net::SocketAddr,
    bundle: &Bundle,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = posgate_sim::terminal::tls_config(
        &bundle.ca_pem,
        Some((&bundle.cert_pem, &bundle.key_pem)),
    )
    .map_err(std::io::Error::other)?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name =
        rustls::pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    // TLS 1.3: the server checks the client certificate after the client's handshake has
    // finished; its verdict arrives as an alert on the first read (or as the session ticket).
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(300), tls.read(&mut byte)).await {
        Ok(Err(e)) => Err(e),
        Ok(Ok(0)) => Err(std::io::ErrorKind::UnexpectedEof.into()),
        Ok(Ok(_)) | Err(_) => Ok(tls),
    }
}

/// Waits until the server closes `stream`; `Err` with what happened when it does not within `wait`.
async fn closed_within(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    wait: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout_at(started + wait, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Ok(started.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return Err(format!("still open after {wait:?}")),
        }
    }
}

/// A stolen certificate that completes TLS and then sends nothing used to hold its socket forever
/// (rmqtt waits for the first MQTT packet without a deadline); now it is closed at the handshake
/// timeout, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_silent_after_tls_is_closed_at_the_handshake_timeout() {
    let gw = spawn_with(&[
        ("POSGATE__MQTT__FRONT_DOOR", "true"),
        ("POSGATE__MQTT__HANDSHAKE_TIMEOUT_SECS", "1"),
    ])
    .await;
    let bundle = gw.provision("pos_quiet").await;
    let mut silent = tls_only(&gw, &bundle)
        .await
        .expect("TLS with a valid certificate");
    let took = closed_within(&mut silent, WAIT).await.unwrap();
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    gw.metric_reaches(
        r#"posgate_mqtt_refused_total{reason="first_packet"}"#,
        1.0,
        WAIT,
    )
    .await;
    // A terminal that does send its CONNECT stays connected past the timeout.
    let mut t = Terminal::connect(bundle, gw.mqtt).await.unwrap();
    // Past the handshake timeout (there is no event to wait for: nothing must happen).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.pay("pos_quiet", "pi_quiet_1").await;
    assert_eq!(
        t.next_confirmation(WAIT).await.unwrap().intent_id,
        "pi_quiet_1"
    );
    gw.shutdown().await;
}

/// A revoked certificate no longer gets a socket past TLS: the handshake itself fails, so it
/// cannot hold sockets that way (it used to be refused only at CONNECT).
#[tokio::test]
async fn a_revoked_certificate_fails_in_the_tls_handshake() {
    let gw = spawn_with(&[("POSGATE__MQTT__FRONT_DOOR", "true")]).await;
    let bundle = gw.provision("pos_stolen").await;
    assert!(tls_only(&gw, &bundle).await.is_ok(), "before revocation");
    let response = gw
        .admin_post("/v1/terminals/pos_stolen/revoke", serde_json::json!({}))
        .await;
    assert_eq!(response.status(), 200);
    let refused = tls_only(&gw, &bundle).await;
    let error = refused.expect_err("a revoked certificate completed the TLS handshake");
    assert!(
        error.to_string().contains("Revoked") || error.to_string().contains("revoked"),
        "the alert names revocation: {error}"
    );
    gw.metric_reaches(r#"posgate_mqtt_refused_total{reason="revoked"}"#, 1.0, WAIT)
        .await;
    gw.shutdown().await;
}

/// One certificate holds at most `mqtt.max_connections_per_terminal` sockets: one more closes
/// its oldest (as MQTT's session takeover would), and other terminals are not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_holds_a_bounded_number_of_sockets() {
    let gw = spawn_with(&[
        ("POSGATE__MQTT__FRONT_DOOR", "true"),
        ("POSGATE__MQTT__MAX_CONNECTIONS_PER_TERMINAL", "2"),
        ("POSGATE__MQTT__HANDSHAKE_TIMEOUT_SECS", "30"),
    ])
    .await;
    let thief = gw.provision("pos_many").await;
    let honest = gw.provision("pos_one").await;
    let mut t = Terminal::connect(honest, gw.mqtt).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tls_only(&gw, &thief).await.expect("within the cap"));
    }
    let mut third = tls_only(&gw, &thief).await.expect("the newest is let in");
    // The oldest goes at once, not at the handshake timeout.
    closed_within(&mut held[0], Duration::from_secs(5))
        .await
        .unwrap();
    for stream in [&mut held[1], &mut third] {
        assert!(
            closed_within(stream, Duration::from_millis(300))
                .await
                .is_err(),
            "a socket within the cap was closed"
        );
    }
    for _ in 0..10 {
        held.push(tls_only(&gw, &thief).await.expect("the newest is let in"));
    }
    let open_fds = gw.metric("process_open_fds").await.unwrap();
    gw.metric_reaches(
        r#"posgate_mqtt_refused_total{reason="replaced"}"#,
        11.0,
        WAIT,
    )
    .await;
    // The honest terminal is still served.
    gw.pay("pos_one", "pi_one_1").await;
    assert_eq!(
        t.next_confirmation(WAIT).await.unwrap().intent_id,
        "pi_one_1"
    );
    assert!(open_fds < 200.0, "{open_fds} descriptors open");
    gw.shutdown().await;
}

/// The broker's loopback listener behind the front door knows only the connections the front door
/// made: a local process that dials it directly, even with a genuine terminal id, is refused.
#[tokio::test]
async fn the_listener_behind_the_front_door_refuses_direct_clients() {
    let gw = spawn_with(&[("POSGATE__MQTT__FRONT_DOOR", "true")]).await;
    let bundle = gw.provision("pos_local").await;
    let behind = gw.mqtt_behind().expect("mqtt.front_door is on");
    assert!(behind.ip().is_loopback(), "{behind}");
    let mut options =
        rumqttc::MqttOptions::new("pos_local", behind.ip().to_string(), behind.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    assert!(
        connack(&mut eventloop).await.is_err(),
        "a direct CONNECT was accepted"
    );
    gw.metric_reaches(
        r#"posgate_mqtt_refused_total{reason="no_certificate"}"#,
        1.0,
        WAIT,
    )
    .await;
    // Through the front door the same terminal connects.
    assert!(connect(&gw, &Identity::of(&bundle)).await.is_ok());
    gw.shutdown().await;
}

/// MQTT over secure WebSocket goes through the same front door: the certificate is the identity,
/// a CONNECT under its own id gets a CONNACK, under another id it is refused.
#[tokio::test]
async fn mqtt_over_secure_websocket_connects_with_the_certificate_identity() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    // Both ways: rmqtt's own TLS listener, and the front door.
    for front_door in ["false", "true"] {
        let gw = spawn_with(&[
            ("POSGATE__MQTT__WS_LISTEN", "127.0.0.1:0"),
            ("POSGATE__MQTT__FRONT_DOOR", front_door),
        ])
        .await;
        let bundle = gw.provision("pos_wss").await;
        let ws_addr = gw.mqtt_ws().expect("ws_listen is configured");
        // MQTT 3.1.1 CONNECT, clean session, keep-alive 60 s.
        let connect_packet = |client_id: &str| {
            let mut packet = vec![0x10, (12 + client_id.len()) as u8];
            packet.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0]);
            packet.push(client_id.len() as u8);
            packet.extend_from_slice(client_id.as_bytes());
            packet
        };
        let mut answers = Vec::new();
        for client_id in ["pos_wss", "pos_other"] {
            let tls = tls_to(ws_addr, &bundle).await.expect("TLS");
            let mut request = format!("ws://localhost:{}/mqtt", ws_addr.port())
                .into_client_request()
                .unwrap();
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
            let (mut ws, _) = tokio_tungstenite::client_async(request, tls)
                .await
                .expect("WebSocket upgrade");
            ws.send(Message::binary(connect_packet(client_id)))
                .await
                .unwrap();
            let answer = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("an answer");
            answers.push(match answer {
                Some(Ok(Message::Binary(bytes))) => bytes.to_vec(),
                other => panic!("{client_id}: {other:?}"),
            });
        }
        // CONNACK accepted; CONNACK "not authorized" (5).
        assert_eq!(answers[0], [0x20, 2, 0, 0]);
        assert_eq!(answers[1], [0x20, 2, 0, 5]);
        gw.shutdown().await;
    }
}

/// A terminal whose connection dies with a reset (power cut behind a NAT, a crashed firmware)
/// is seen offline at once, with or without the front door: through the front door the reset
/// must close the loopback connection too, or the broker would keep the session "online" until
/// its keep-alive ran out and the terminal's next connection would have to take it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_by_the_terminal_ends_its_session_at_once() {
    for front_door in ["false", "true"] {
        let gw = spawn_with(&[("POSGATE__MQTT__FRONT_DOOR", front_door)]).await;
        let bundle = gw.provision("pos_reset").await;
        let mut tls = tls_only(&gw, &bundle).await.expect("TLS");
        // MQTT 3.1.1 CONNECT: clean session, keep-alive 60 s, client id = the terminal id.
        let id = bundle.terminal_id.as_bytes();
        let mut connect = vec![0x10, (12 + id.len()) as u8, 0, 4];
        connect.extend_from_slice(b"MQTT");
        connect.extend_from_slice(&[4, 0x02, 0, 60, 0, id.len() as u8]);
        connect.extend_from_slice(id);
        tls.write_all(&connect).await.unwrap();
        let mut connack = [0u8; 4];
        tls.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0], "front door {front_door}");
        let online = |want: bool| {
            let gw = &gw;
            async move {
                let deadline = Instant::now() + Duration::from_secs(5);
                while gw.terminal_view("pos_reset").await["online"] != want {
                    if Instant::now() > deadline {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                true
            }
        };
        assert!(online(true).await, "front door {front_door}: never online");
        // A reset, not a close: SO_LINGER 0, then drop.
        tls.get_ref().0.set_zero_linger().unwrap();
        drop(tls);
        assert!(
            online(false).await,
            "front door {front_door}: still online 5 s after the reset (keep-alive 60 s)"
        );
        gw.shutdown().await;
    }
}
