//! The HTTP channels for terminals without MQTT (issue 7 part 4): polling, Server-Sent Events and
//! WebSocket on the ingress listener carry the very bytes MQTT carries, take the same acks, and
//! refuse anyone but the terminal itself.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt};
use posgate_proto::confirmation::{self, Confirmation};
use posgate_sim::terminal::{Bundle, Identity, connect_raw};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::harness::{
    SECRET, TestGateway, assert_error_body, eventually, signed_post, spawn_gateway, spawn_with,
    status_json, tls_client,
};

const WAIT: Duration = Duration::from_secs(10);

// === clients ===

/// A bare MQTT/TLS client of the terminal that subscribes to its payments and never acks, so
/// what it saw can be compared with the HTTP channels.
struct MqttWatch {
    rx: mpsc::UnboundedReceiver<(String, Bytes)>,
    _client: AsyncClient,
    task: JoinHandle<()>,
}

impl MqttWatch {
    async fn start(gw: &TestGateway, bundle: &Bundle) -> MqttWatch {
        let identity = Identity {
            last_will: None,
            ..Identity::of(bundle)
        };
        let (client, mut eventloop) = connect_raw(gw.mqtt, &identity).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (c, filter) = (client.clone(), bundle.topics.payments.clone());
        let task = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                match event {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        c.subscribe(&filter, QoS::AtLeastOnce).await.unwrap();
                    }
                    Event::Incoming(Packet::SubAck(_)) => {
                        drop(tx.send((String::new(), Bytes::new())))
                    }
                    Event::Incoming(Packet::Publish(p)) => drop(tx.send((p.topic, p.payload))),
                    _ => {}
                }
            }
        });
        let subscribed = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(subscribed.0, "", "subscribed first");
        MqttWatch {
            rx,
            _client: client,
            task,
        }
    }

    /// The next message on a payments topic that is not `skip` (republishes of what was seen).
    async fn next_other_than(&mut self, skip: &[Bytes]) -> (String, Bytes) {
        loop {
            let (topic, payload) = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("an MQTT message in time")
                .unwrap();
            if !skip.contains(&payload) {
                return (topic, payload);
            }
        }
    }
}

impl Drop for MqttWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One block of an SSE stream.
#[derive(Debug, PartialEq)]
enum Sse {
    Event {
        event: String,
        id: String,
        data: String,
    },
    Comment,
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A Server-Sent Events client over reqwest.
struct SseClient {
    stream: ByteStream,
    buffer: String,
}

impl SseClient {
    async fn open(gw: &TestGateway, token: &str) -> SseClient {
        SseClient::of(get(gw, "/v1/terminal/events", Some(token)).await)
    }

    fn of(response: reqwest::Response) -> SseClient {
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        SseClient {
            stream: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        }
    }

    /// The next block, `None` when the server ended the stream.
    async fn next_block(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data, mut comment) =
                    (String::new(), String::new(), String::new(), false);
                for line in block.lines() {
                    match line.split_once(':') {
                        Some(("", _)) => comment = true,
                        Some(("event", v)) => event = v.trim_start().to_owned(),
                        Some(("id", v)) => id = v.trim_start().to_owned(),
                        Some(("data", v)) => data.push_str(v.trim_start()),
                        _ => {}
                    }
                }
                return Some(if comment && event.is_empty() && data.is_empty() {
                    Sse::Comment
                } else {
                    Sse::Event { event, id, data }
                });
            }
            match tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("SSE data in time")
            {
                Some(Ok(chunk)) => self.buffer.push_str(std::str::from_utf8(&chunk).unwrap()),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next confirmation event other than `skip` (keep-alives and republishes skipped).
    async fn next_other_than(&mut self, skip: &[Bytes]) -> (String, Bytes) {
        loop {
            match self.next_block().await.expect("the stream is open") {
                Sse::Event { event, id, data } => {
                    assert_eq!(event, "confirmation");
                    let data = Bytes::from(data);
                    if !skip.contains(&data) {
                        return (id, data);
                    }
                }
                Sse::Comment => {}
            }
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn ws_request(gw: &TestGateway, token: Option<&str>) -> tungstenite::handshake::client::Request {
    let mut request = format!("ws://{}/v1/terminal/ws", gw.ingress)
        .into_client_request()
        .unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

async fn ws_connect(gw: &TestGateway, token: &str) -> Ws {
    let (ws, response) = tokio_tungstenite::connect_async(ws_request(gw, Some(token)))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    ws
}

/// The status a refused WebSocket handshake was answered with.
async fn ws_refused(gw: &TestGateway, token: Option<&str>) -> u16 {
    match tokio_tungstenite::connect_async(ws_request(gw, token)).await {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Ok(_) => panic!("the WebSocket was accepted"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// The next text frame other than `skip`; `Err` with the close frame when the server closed.
async fn ws_next_other_than(
    ws: &mut Ws,
    skip: &[Bytes],
) -> Result<Bytes, Option<tungstenite::protocol::CloseFrame>> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a WebSocket frame in time")
        {
            Some(Ok(Message::Text(text))) => {
                let data = Bytes::from(text.as_str().to_owned());
                if !skip.contains(&data) {
                    return Ok(data);
                }
            }
            Some(Ok(Message::Close(frame))) => return Err(frame),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(None),
        }
    }
}

// === helpers ===

async fn get(gw: &TestGateway, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = gw.http.get(format!("http://{}{path}", gw.ingress));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

async fn post_ack(
    gw: &TestGateway,
    token: Option<&str>,
    intent_id: &str,
    seq: u64,
) -> (u16, Value) {
    let mut request = gw
        .http
        .post(format!("http://{}/v1/terminal/acks", gw.ingress))
        .json(&serde_json::json!({"intent_id": intent_id, "seq": seq}));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    status_json(request.send().await.unwrap()).await
}

async fn poll(gw: &TestGateway, token: Option<&str>, intent_id: &str, query: &str) -> (u16, Value) {
    status_json(
        get(
            gw,
            &format!("/v1/terminal/payments/{intent_id}{query}"),
            token,
        )
        .await,
    )
    .await
}

/// What a terminal runs on every message.
fn check(bundle: &Bundle, jws: &Bytes) -> Confirmation {
    let key = bundle.gateway_jwk.verifying_key().unwrap();
    confirmation::verify(
        std::str::from_utf8(jws).unwrap(),
        &key,
        &bundle.terminal_id,
        0,
    )
    .unwrap()
}

async fn pending(gw: &TestGateway, id: &str) -> u64 {
    gw.terminal_view(id).await["pending"].as_u64().unwrap()
}

async fn wait_pending(gw: &TestGateway, id: &str, n: u64) {
    eventually(WAIT, || async {
        (pending(gw, id).await == n).then_some(())
    })
    .await;
}

// === tests ===

#[tokio::test]
async fn sse_carries_the_mqtt_bytes_and_an_http_ack_sends_the_next() {
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_sse").await;
    let mut mqtt = MqttWatch::start(&gw, &bundle).await;
    let mut sse = SseClient::open(&gw, &bundle.http_token).await;
    assert_eq!(
        gw.metric("posgate_http_streams{channel=\"sse\"}").await,
        Some(1.0)
    );
    gw.pay("pos_sse", "pi_sse_1").await;
    gw.pay("pos_sse", "pi_sse_2").await;

    let (topic, on_mqtt) = mqtt.next_other_than(&[]).await;
    assert!(topic.ends_with("/payments/pi_sse_1"), "{topic}");
    let (id, on_sse) = sse.next_other_than(&[]).await;
    assert_eq!(on_sse, on_mqtt, "the same bytes on both channels");
    assert_eq!(id, "1");
    let c = check(&bundle, &on_sse);
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_sse_1", 1));
    assert_eq!(pending(&gw, "pos_sse").await, 2);

    // An HTTP ack has the MQTT ack's effect: the retained message is cleared, the next goes out
    // on every channel.
    let (status, body) = post_ack(&gw, Some(&bundle.http_token), "pi_sse_1", 1).await;
    assert_eq!((status, body), (202, serde_json::json!({"accepted": true})));
    let (id, second) = sse.next_other_than(std::slice::from_ref(&on_sse)).await;
    assert_eq!(id, "2");
    assert_eq!(check(&bundle, &second).intent_id, "pi_sse_2");
    let (topic, cleared) = mqtt.next_other_than(std::slice::from_ref(&on_mqtt)).await;
    assert!(
        topic.ends_with("/payments/pi_sse_1") && cleared.is_empty(),
        "{topic} {cleared:?}"
    );
    let (topic, on_mqtt) = mqtt.next_other_than(&[Bytes::new()]).await;
    assert!(topic.ends_with("/payments/pi_sse_2"), "{topic}");
    assert_eq!(on_mqtt, second);
    assert_eq!(pending(&gw, "pos_sse").await, 1);

    post_ack(&gw, Some(&bundle.http_token), "pi_sse_2", 2).await;
    wait_pending(&gw, "pos_sse", 0).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn sse_sends_keep_alive_comments() {
    let gw = spawn_with(&[("POSGATE__INGRESS__KEEPALIVE_SECS", "1")]).await;
    let bundle = gw.provision("pos_keep").await;
    let mut sse = SseClient::open(&gw, &bundle.http_token).await;
    assert_eq!(sse.next_block().await, Some(Sse::Comment));
    gw.shutdown().await;
}

#[tokio::test]
async fn websocket_carries_the_mqtt_bytes_and_a_frame_ack_sends_the_next() {
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_ws").await;
    let mut mqtt = MqttWatch::start(&gw, &bundle).await;
    let mut ws = ws_connect(&gw, &bundle.http_token).await;
    gw.metric_reaches(
        "posgate_http_streams{channel=\"ws\"}",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    gw.pay("pos_ws", "pi_ws_1").await;
    gw.pay("pos_ws", "pi_ws_2").await;

    let (topic, on_mqtt) = mqtt.next_other_than(&[]).await;
    assert!(topic.ends_with("/payments/pi_ws_1"), "{topic}");
    let on_ws = ws_next_other_than(&mut ws, &[]).await.unwrap();
    assert_eq!(on_ws, on_mqtt, "the same bytes on both channels");
    assert_eq!(check(&bundle, &on_ws).seq, 1);

    // The gateway answers pings.
    ws.send(Message::Ping(Bytes::from_static(b"hi")))
        .await
        .unwrap();
    let pong = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Pong(p))) => break p,
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str().as_bytes(), &on_ws[..]),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(&pong[..], b"hi");

    // A text frame ack has the MQTT ack's effect.
    ws.send(Message::text(r#"{"intent_id":"pi_ws_1","seq":1}"#))
        .await
        .unwrap();
    let second = ws_next_other_than(&mut ws, std::slice::from_ref(&on_ws))
        .await
        .unwrap();
    let c = check(&bundle, &second);
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_ws_2", 2));
    let (topic, cleared) = mqtt.next_other_than(std::slice::from_ref(&on_mqtt)).await;
    assert!(topic.ends_with("/payments/pi_ws_1") && cleared.is_empty());
    assert_eq!(mqtt.next_other_than(&[Bytes::new()]).await.1, second);

    // A frame that is not an ack gets an error frame, and the session goes on.
    ws.send(Message::text("not json")).await.unwrap();
    let error: Value = serde_json::from_slice(
        &ws_next_other_than(&mut ws, std::slice::from_ref(&second))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_error_body(&error);

    ws.send(Message::text(r#"{"intent_id":"pi_ws_2","seq":2}"#))
        .await
        .unwrap();
    wait_pending(&gw, "pos_ws", 0).await;
    ws.close(None).await.unwrap();
    eventually(WAIT, || async {
        (gw.metric("posgate_http_streams{channel=\"ws\"}").await == Some(0.0)).then_some(())
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn polling_returns_the_mqtt_bytes_and_long_polls_for_the_next() {
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_poll").await;
    let token = bundle.http_token.as_str();
    let mut mqtt = MqttWatch::start(&gw, &bundle).await;
    gw.pay("pos_poll", "pi_poll_1").await;
    let (_, on_mqtt) = mqtt.next_other_than(&[]).await;

    let (status, body) = poll(&gw, Some(token), "pi_poll_1", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["intent_id"], "pi_poll_1");
    assert_eq!(body["status"], "confirmed");
    assert_eq!(body["seq"], 1);
    let jws = Bytes::from(body["confirmation"].as_str().unwrap().to_owned());
    assert_eq!(jws, on_mqtt, "the same bytes as MQTT");
    assert_eq!(check(&bundle, &jws).intent_id, "pi_poll_1");

    // Acked: the state stays readable, the confirmation is gone.
    assert_eq!(post_ack(&gw, Some(token), "pi_poll_1", 1).await.0, 202);
    wait_pending(&gw, "pos_poll", 0).await;
    let (_, body) = poll(&gw, Some(token), "pi_poll_1", "").await;
    assert_eq!(
        (&body["status"], &body["confirmation"], &body["seq"]),
        (&Value::from("confirmed"), &Value::Null, &Value::Null)
    );

    // A long poll waits for the intent's next confirmation: the provider says pi_poll_2 expired
    // (delivered and acked), then that it was paid after all.
    let intent = posgate_sim::events::Intent::new(
        "pi_poll_2",
        posgate_proto::MicroUsdc(4_500_000),
        "pos_poll",
    );
    let expired = posgate_sim::events::intent_event("evt_poll_2x", "expired", &intent);
    assert_eq!(gw.post_signed(&expired).await.status(), 200);
    let (topic, _) = mqtt.next_other_than(&[on_mqtt, Bytes::new()]).await;
    assert!(topic.ends_with("/payments/pi_poll_2"), "{topic}");
    assert_eq!(post_ack(&gw, Some(token), "pi_poll_2", 2).await.0, 202);
    wait_pending(&gw, "pos_poll", 0).await;
    let (_, body) = poll(&gw, Some(token), "pi_poll_2", "").await;
    assert_eq!(
        (&body["status"], &body["confirmation"]),
        (&Value::from("expired"), &Value::Null)
    );
    let waiting = {
        let (http, ingress, token) = (gw.http.clone(), gw.ingress, token.to_owned());
        tokio::spawn(async move {
            let response = http
                .get(format!(
                    "http://{ingress}/v1/terminal/payments/pi_poll_2?wait_secs=30"
                ))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            status_json(response).await
        })
    };
    gw.pay("pos_poll", "pi_poll_2").await;
    let (status, body) = tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["seq"], 3);
    let third = Bytes::from(body["confirmation"].as_str().unwrap().to_owned());
    let c = check(&bundle, &third);
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_poll_2", 3));
    assert_eq!(body["status"], serde_json::to_value(c.status).unwrap());
    let (topic, on_mqtt) = mqtt.next_other_than(&[Bytes::new()]).await;
    assert!(topic.ends_with("/payments/pi_poll_2"), "{topic}");
    assert_eq!(on_mqtt, third, "the same bytes as MQTT");

    // A bad wait is a 400 with the house body; an unknown intent a 404.
    let (status, body) = poll(&gw, Some(token), "pi_poll_1", "?wait_secs=31").await;
    assert_eq!(status, 400);
    assert_error_body(&body);
    let (status, body) = poll(&gw, Some(token), "pi_nope", "").await;
    assert_eq!(status, 404);
    assert_error_body(&body);
    gw.shutdown().await;
}

/// Polling follows the terminal's order: an intent's confirmation is handed out only when it is
/// the terminal's next one (its lowest unacked `seq`). Handing out a later one first let a
/// terminal show `seq` 2 before 1, and a terminal that keeps its last shown `seq` would then
/// drop 1.
#[tokio::test]
async fn polling_hands_out_confirmations_in_the_terminals_seq_order() {
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_poll_order").await;
    let token = bundle.http_token.clone();
    gw.pay("pos_poll_order", "pi_order_a").await;
    gw.pay("pos_poll_order", "pi_order_b").await;
    let (status, b) = poll(&gw, Some(&token), "pi_order_b", "").await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(
        b["confirmation"],
        Value::Null,
        "B (seq 2) handed out before A: {b}"
    );
    let (_, a) = poll(&gw, Some(&token), "pi_order_a", "").await;
    assert_eq!(a["seq"], 1, "{a}");
    let jws = Bytes::from(a["confirmation"].as_str().unwrap().to_owned());
    assert_eq!(check(&bundle, &jws).seq, 1);
    assert_eq!(post_ack(&gw, Some(&token), "pi_order_a", 1).await.0, 202);
    let b = eventually(WAIT, || async {
        let (_, b) = poll(&gw, Some(&token), "pi_order_b", "").await;
        (b["seq"] == 2).then_some(b)
    })
    .await;
    let jws = Bytes::from(b["confirmation"].as_str().unwrap().to_owned());
    assert_eq!(check(&bundle, &jws).seq, 2);
    gw.shutdown().await;
}

/// A terminal (or a stolen token) that opens stream after stream without closing them holds at
/// most four: the fifth is refused `429`, and once one closes a new one is taken again.
#[tokio::test]
async fn a_terminal_holds_a_bounded_number_of_streams() {
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_streams").await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(SseClient::open(&gw, &bundle.http_token).await);
    }
    let refused = get(&gw, "/v1/terminal/events", Some(&bundle.http_token)).await;
    let (status, body) = status_json(refused).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_streams");
    // Another terminal is not affected.
    let other = gw.provision("pos_streams_other").await;
    let _fine = SseClient::open(&gw, &other.http_token).await;
    drop(open.pop());
    eventually(WAIT, || async {
        let response = get(&gw, "/v1/terminal/events", Some(&bundle.http_token)).await;
        (response.status() == 200).then_some(())
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn unauthenticated_wrong_token_and_revoked_terminals_get_401_and_nothing() {
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_auth").await;
    gw.pay("pos_auth", "pi_auth_1").await;
    let wrong = "0".repeat(64);
    for token in [None, Some(wrong.as_str()), Some("")] {
        let (status, body) = poll(&gw, token, "pi_auth_1", "").await;
        assert_eq!(status, 401, "{token:?} {body}");
        assert_error_body(&body);
        assert!(!body.to_string().contains("eyJ"), "no JWS in {body}");
        let response = get(&gw, "/v1/terminal/events", token).await;
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        assert_error_body(&response.json().await.unwrap());
        assert_eq!(ws_refused(&gw, token).await, 401);
        let (status, body) = post_ack(&gw, token, "pi_auth_1", 1).await;
        assert_eq!(status, 401, "{body}");
        assert_error_body(&body);
    }
    // A scheme other than Bearer is refused too.
    let response = gw
        .http
        .get(format!("http://{}/v1/terminal/events", gw.ingress))
        .basic_auth("pos_auth", Some(&bundle.http_token))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(pending(&gw, "pos_auth").await, 1, "no ack got through");

    // Streams open at the revocation end; from then on the terminal is refused everywhere.
    let token = bundle.http_token.as_str();
    let mut sse = SseClient::open(&gw, token).await;
    let mut ws = ws_connect(&gw, token).await;
    let (_, first) = sse.next_other_than(&[]).await;
    assert_eq!(ws_next_other_than(&mut ws, &[]).await.unwrap(), first);
    let (status, _) = status_json(
        gw.admin_post("/v1/terminals/pos_auth/revoke", Value::Null)
            .await,
    )
    .await;
    assert_eq!(status, 200);
    loop {
        match sse.next_block().await {
            None => break,
            Some(Sse::Comment) => {}
            Some(Sse::Event { data, .. }) => assert_eq!(data.as_bytes(), &first[..]),
        }
    }
    let frame = ws_next_other_than(&mut ws, &[first])
        .await
        .unwrap_err()
        .unwrap();
    assert_eq!(frame.code, CloseCode::Policy);
    assert_eq!(poll(&gw, Some(token), "pi_auth_1", "").await.0, 401);
    assert_eq!(
        get(&gw, "/v1/terminal/events", Some(token)).await.status(),
        401
    );
    assert_eq!(ws_refused(&gw, Some(token)).await, 401);
    assert_eq!(post_ack(&gw, Some(token), "pi_auth_1", 1).await.0, 401);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_terminal_never_sees_another_terminals_confirmations() {
    let gw = spawn_gateway().await;
    let a = gw.provision("pos_a").await;
    let b = gw.provision("pos_b").await;
    let mut sse_a = SseClient::open(&gw, &a.http_token).await;
    let mut sse_b = SseClient::open(&gw, &b.http_token).await;
    let mut ws_b = ws_connect(&gw, &b.http_token).await;
    gw.pay("pos_a", "pi_of_a").await;
    let (_, for_a) = sse_a.next_other_than(&[]).await;
    assert_eq!(check(&a, &for_a).intent_id, "pi_of_a");

    // B asks for A's intent: exactly what an unknown intent gets.
    let (status, foreign) = poll(&gw, Some(&b.http_token), "pi_of_a", "").await;
    let (_, unknown) = poll(&gw, Some(&b.http_token), "pi_unknown", "").await;
    assert_eq!((status, &foreign), (404, &unknown));
    let (status, _) = poll(&gw, Some(&b.http_token), "pi_of_a", "?wait_secs=1").await;
    assert_eq!(status, 404);

    // B's streams: the first thing they carry is B's own confirmation, nothing of A's before it.
    gw.pay("pos_b", "pi_of_b").await;
    let (_, for_b) = sse_b.next_other_than(&[]).await;
    assert_eq!(check(&b, &for_b).intent_id, "pi_of_b");
    assert_eq!(ws_next_other_than(&mut ws_b, &[]).await.unwrap(), for_b);

    // B acking A's confirmation changes nothing for A.
    assert_eq!(
        post_ack(&gw, Some(&b.http_token), "pi_of_a", 1).await.0,
        202
    );
    assert_eq!(
        post_ack(&gw, Some(&b.http_token), "pi_of_b", 1).await.0,
        202
    );
    wait_pending(&gw, "pos_b", 0).await;
    assert_eq!(pending(&gw, "pos_a").await, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn open_streams_do_not_hold_up_shutdown() {
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_drain").await;
    let mut sse = SseClient::open(&gw, &bundle.http_token).await;
    let mut ws = ws_connect(&gw, &bundle.http_token).await;
    gw.pay("pos_drain", "pi_drain_1").await;
    let (_, first) = sse.next_other_than(&[]).await;
    assert_eq!(ws_next_other_than(&mut ws, &[]).await.unwrap(), first);
    // A long poll on an intent with nothing to deliver (pi_drain_1's confirmation is acked).
    assert_eq!(
        post_ack(&gw, Some(&bundle.http_token), "pi_drain_1", 1)
            .await
            .0,
        202
    );
    wait_pending(&gw, "pos_drain", 0).await;
    let long_poll = {
        let (http, ingress, token) = (gw.http.clone(), gw.ingress, bundle.http_token.clone());
        tokio::spawn(async move {
            let response = http
                .get(format!(
                    "http://{ingress}/v1/terminal/payments/pi_drain_1?wait_secs=30"
                ))
                .bearer_auth(token)
                .send()
                .await?;
            Ok::<_, reqwest::Error>(status_json(response).await)
        })
    };
    let took = gw.shutdown().await;
    assert!(took < Duration::from_secs(5), "drain took {took:?}");
    let frame = ws_next_other_than(&mut ws, &[first])
        .await
        .unwrap_err()
        .unwrap();
    assert_eq!(frame.code, CloseCode::Away);
    while let Some(block) = sse.next_block().await {
        assert!(
            matches!(block, Sse::Comment | Sse::Event { .. }),
            "{block:?}"
        );
    }
    // Either it was in when shutdown began and is answered at once with what there is, or the
    // listener had already stopped; either way it does not wait its 30 s.
    if let Ok((status, body)) = tokio::time::timeout(Duration::from_secs(5), long_poll)
        .await
        .expect("the long poll ends with the drain")
        .unwrap()
    {
        assert_eq!((status, &body["confirmation"]), (200, &Value::Null));
    }
}

// === TLS on the ingress listener, client certificates ===

/// A WebSocket over TLS presenting the bundle's client certificate, no bearer token.
async fn wss_connect(gw: &TestGateway, bundle: &Bundle) -> WebSocketStream<TlsStream<TcpStream>> {
    let config = posgate_sim::terminal::tls_config(
        &bundle.ca_pem,
        Some((&bundle.cert_pem, &bundle.key_pem)),
    )
    .unwrap();
    let tcp = TcpStream::connect(gw.ingress).await.unwrap();
    let name = ServerName::IpAddress(gw.ingress.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let request = format!("wss://{}/v1/terminal/ws", gw.ingress)
        .into_client_request()
        .unwrap();
    let (ws, response) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    assert_eq!(response.status(), 101);
    ws
}

#[tokio::test]
async fn over_tls_the_client_certificate_authenticates_the_terminal() {
    let gw = spawn_with(&[("POSGATE__INGRESS__TLS", "true")]).await;
    let a = gw.provision("pos_tls_a").await;
    let b = gw.provision("pos_tls_b").await;
    let url = |path: &str| format!("https://{}{path}", gw.ingress);
    let as_a = tls_client(&a.ca_pem, Some((&a.cert_pem, &a.key_pem)));
    let as_b = tls_client(&b.ca_pem, Some((&b.cert_pem, &b.key_pem)));
    let anonymous = tls_client(&a.ca_pem, None);
    let mut mqtt = MqttWatch::start(&gw, &a).await;

    // A's certificate alone opens its streams.
    let mut sse = SseClient::of(as_a.get(url("/v1/terminal/events")).send().await.unwrap());
    let mut ws = wss_connect(&gw, &a).await;
    // Webhooks come over TLS too now.
    let intent = posgate_sim::events::Intent::new(
        "pi_tls_1",
        posgate_proto::MicroUsdc(4_500_000),
        "pos_tls_a",
    );
    let body = posgate_sim::events::intent_event("evt_tls_1", "confirmed", &intent);
    let webhook = signed_post(&anonymous, &url("/webhooks/stablegenius"), SECRET, body);
    assert_eq!(webhook.send().await.unwrap().status(), 200);

    let (_, on_mqtt) = mqtt.next_other_than(&[]).await;
    let (_, on_sse) = sse.next_other_than(&[]).await;
    assert_eq!(on_sse, on_mqtt, "the same bytes as MQTT");
    assert_eq!(check(&a, &on_sse).intent_id, "pi_tls_1");
    let on_ws = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => break Bytes::from(t.as_str().to_owned()),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(on_ws, on_mqtt);
    let (status, polled) = status_json(
        as_a.get(url("/v1/terminal/payments/pi_tls_1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{polled}");
    assert_eq!(
        polled["confirmation"].as_str().unwrap().as_bytes(),
        &on_mqtt[..]
    );

    // The bearer token works over TLS too; no credentials, or two that disagree, do not.
    let with_token = anonymous
        .get(url("/v1/terminal/payments/pi_tls_1"))
        .bearer_auth(&a.http_token);
    assert_eq!(with_token.send().await.unwrap().status(), 200);
    let (status, body) = status_json(
        anonymous
            .get(url("/v1/terminal/payments/pi_tls_1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    assert_error_body(&body);
    let mixed = as_a
        .get(url("/v1/terminal/payments/pi_tls_1"))
        .bearer_auth(&b.http_token);
    assert_eq!(mixed.send().await.unwrap().status(), 401);
    // B's certificate does not see A's intent.
    let foreign = as_b.get(url("/v1/terminal/payments/pi_tls_1"));
    assert_eq!(foreign.send().await.unwrap().status(), 404);

    // A certificate naming A but issued by another CA fails the handshake; plain HTTP gets nothing.
    let other = tempfile::tempdir().unwrap();
    let forged = posgate::pki::Pki::load_or_create(other.path(), &["127.0.0.1".into()])
        .unwrap()
        .issue_terminal("pos_tls_a", &posgate_proto::topics::tenant_for("pos_tls_a"))
        .unwrap();
    let forger = tls_client(&a.ca_pem, Some((&forged.cert_pem, &forged.key_pem)));
    assert!(
        forger
            .get(url("/v1/terminal/payments/pi_tls_1"))
            .send()
            .await
            .is_err()
    );
    let plain = gw
        .http
        .get(format!(
            "http://{}/v1/terminal/payments/pi_tls_1",
            gw.ingress
        ))
        .bearer_auth(&a.http_token)
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);

    // An ack over the certificate-authenticated WebSocket clears it.
    ws.send(Message::text(r#"{"intent_id":"pi_tls_1","seq":1}"#))
        .await
        .unwrap();
    wait_pending(&gw, "pos_tls_a", 0).await;

    // Revoked: the certificate is refused, the open streams end.
    let (status, _) = status_json(
        gw.admin_post("/v1/terminals/pos_tls_a/revoke", Value::Null)
            .await,
    )
    .await;
    assert_eq!(status, 200);
    while let Some(block) = sse.next_block().await {
        assert!(matches!(block, Sse::Comment | Sse::Event { .. }));
    }
    let closed = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => break frame.unwrap(),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(closed.code, CloseCode::Policy);
    let refused = as_a.get(url("/v1/terminal/payments/pi_tls_1"));
    assert_eq!(refused.send().await.unwrap().status(), 401);
    gw.shutdown().await;
}

// === browsers: single-use tickets for the streams, CORS ===

/// A ticket for `token`'s terminal, checked for the contract's shape.
async fn ticket(gw: &TestGateway, token: &str) -> String {
    let response = gw
        .http
        .post(format!("http://{}/v1/terminal/tickets", gw.ingress))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["cache-control"], "no-store");
    let (status, body) = status_json(response).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["expires_in"], 30);
    let ticket = body["ticket"].as_str().unwrap().to_owned();
    assert!(
        ticket.len() == 64 && ticket.bytes().all(|b| b.is_ascii_hexdigit()),
        "{ticket}"
    );
    ticket
}

async fn ws_with_ticket(gw: &TestGateway, ticket: &str) -> Result<Ws, u16> {
    let request = format!("ws://{}/v1/terminal/ws?ticket={ticket}", gw.ingress)
        .into_client_request()
        .unwrap();
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn a_ticket_opens_one_stream_once_and_only_for_its_terminal() {
    let gw = spawn_gateway().await;
    let a = gw.provision("pos_tk_a").await;
    let b = gw.provision("pos_tk_b").await;
    let events = |ticket: &str| format!("/v1/terminal/events?ticket={ticket}");

    // Tickets are for terminals only.
    let response = gw
        .http
        .post(format!("http://{}/v1/terminal/tickets", gw.ingress))
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(response).await;
    assert_eq!(status, 401, "{body}");
    assert_error_body(&body);

    // A ticket and no header opens A's stream, once.
    let t = ticket(&gw, &a.http_token).await;
    let mut sse = SseClient::of(get(&gw, &events(&t), None).await);
    gw.pay("pos_tk_a", "pi_tk_a").await;
    let (_, on_sse) = sse.next_other_than(&[]).await;
    assert_eq!(check(&a, &on_sse).intent_id, "pi_tk_a");
    let again = get(&gw, &events(&t), None).await;
    assert_eq!(again.status(), 401, "a spent ticket");
    assert_eq!(again.headers()["www-authenticate"], "Bearer");
    assert_error_body(&again.json().await.unwrap());

    // The same for a WebSocket.
    let t = ticket(&gw, &a.http_token).await;
    let mut ws = ws_with_ticket(&gw, &t).await.unwrap();
    assert_eq!(ws_next_other_than(&mut ws, &[]).await.unwrap(), on_sse);
    assert_eq!(ws_with_ticket(&gw, &t).await.unwrap_err(), 401);
    assert_eq!(ws_with_ticket(&gw, &"0".repeat(64)).await.unwrap_err(), 401);

    // A's ticket with B's token is refused; B's ticket gives B's stream, without A's confirmation.
    let t = ticket(&gw, &a.http_token).await;
    let mixed = get(&gw, &events(&t), Some(&b.http_token)).await;
    assert_eq!(mixed.status(), 401);
    let t = ticket(&gw, &b.http_token).await;
    let mut sse_b = SseClient::of(get(&gw, &events(&t), None).await);
    gw.pay("pos_tk_b", "pi_tk_b").await;
    let (_, on_b) = sse_b.next_other_than(&[]).await;
    assert_eq!(check(&b, &on_b).intent_id, "pi_tk_b");

    // Polling takes the bearer token, not a ticket.
    let t = ticket(&gw, &a.http_token).await;
    let (status, _) = poll(&gw, None, &format!("pi_tk_a?ticket={t}"), "").await;
    assert_eq!(status, 401);

    // An unspent ticket of a terminal revoked since is refused.
    let t = ticket(&gw, &a.http_token).await;
    let (status, _) = status_json(
        gw.admin_post("/v1/terminals/pos_tk_a/revoke", Value::Null)
            .await,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(get(&gw, &events(&t), None).await.status(), 401);
    assert_eq!(ws_with_ticket(&gw, &t).await.unwrap_err(), 401);
    gw.shutdown().await;
}

#[tokio::test]
async fn cors_answers_the_listed_origins_and_no_other() {
    let listed = "https://pos.example";
    let gw = spawn_with(&[(
        "POSGATE__INGRESS__CORS_ALLOWED_ORIGINS",
        "https://pos.example,http://127.0.0.1:8480",
    )])
    .await;
    let bundle = gw.provision("pos_cors").await;
    let url = |path: &str| format!("http://{}{path}", gw.ingress);
    let preflight = |origin: &str| {
        gw.http
            .request(
                reqwest::Method::OPTIONS,
                url("/v1/terminal/payment-intents"),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };

    let ok = preflight(listed).await.unwrap();
    assert_eq!(ok.status(), 200);
    let h = ok.headers();
    assert_eq!(h["access-control-allow-origin"], listed);
    assert_eq!(h["access-control-allow-methods"], "GET,POST");
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization,content-type"
    );
    assert_eq!(h["access-control-max-age"], "600");
    assert!(h.get("access-control-allow-credentials").is_none());
    assert!(
        h.get_all("vary")
            .iter()
            .any(|v| v.to_str().unwrap().contains("origin")),
        "{h:?}"
    );

    // The answers themselves, errors included, carry it for a listed origin only.
    for (origin, allowed) in [
        (listed, true),
        ("http://127.0.0.1:8480", true),
        ("https://evil.example", false),
        ("https://pos.example.evil", false),
        ("http://pos.example", false),
    ] {
        let response = gw
            .http
            .get(url("/v1/terminal/payments/pi_unknown"))
            .header("origin", origin)
            .bearer_auth(&bundle.http_token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
        let echoed = response.headers().get("access-control-allow-origin");
        assert_eq!(echoed.is_some(), allowed, "{origin}");
        if allowed {
            assert_eq!(echoed.unwrap(), origin);
            assert!(
                response.headers()["access-control-expose-headers"]
                    .to_str()
                    .unwrap()
                    .contains("retry-after")
            );
        }
        let refused = preflight(origin).await.unwrap();
        assert_eq!(
            refused
                .headers()
                .get("access-control-allow-origin")
                .is_some(),
            allowed,
            "preflight from {origin}"
        );
    }

    // The provider's webhook path never answers CORS.
    let webhook = gw
        .http
        .post(url("/webhooks/stablegenius"))
        .header("origin", listed)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(webhook.status(), 401);
    assert!(
        webhook
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    gw.shutdown().await;

    // By default: no CORS headers at all.
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_cors").await;
    let response = gw
        .http
        .get(format!(
            "http://{}/v1/terminal/payments/pi_unknown",
            gw.ingress
        ))
        .header("origin", listed)
        .bearer_auth(&bundle.http_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(
        response
            .headers()
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-")),
        "{:?}",
        response.headers()
    );
    gw.shutdown().await;
}
