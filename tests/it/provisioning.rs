//! Provisioning from the terminal's own CSR, and certificate renewal, over the real admin API,
//! real MQTT/TLS and the TLS ingress: the test plays a terminal whose key never leaves it.

use std::time::Duration;

use posgate_proto::confirmation::ConfirmationStatus;
use posgate_sim::terminal::{Bundle, Identity};
use rcgen::{CertificateParams, DnType, KeyPair};
use serde_json::{Value, json};

use crate::harness::{
    TestGateway, assert_error_body, eventually, spawn_gateway, spawn_with, status_json, tls_client,
};

const WAIT: Duration = Duration::from_secs(10);

/// A CSR for `key` as a keystore would make it, asking for a name it will not get.
fn csr(key: &KeyPair) -> String {
    let mut params = CertificateParams::new(vec!["evil.example".into()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "someone_else");
    params.serialize_request(key).unwrap().pem().unwrap()
}

/// The terminal's bundle as it assembles it: what the gateway answered, plus the key it kept
/// (and the bearer token it already had, which a renewal does not repeat).
fn assemble(answer: &Value, key_pem: &str, http_token: &str) -> Bundle {
    let mut bundle = answer.clone();
    assert!(
        bundle.get("key_pem").is_none(),
        "a CSR's bundle has no key: {bundle}"
    );
    bundle["key_pem"] = key_pem.into();
    if bundle.get("http_token").is_none() {
        bundle["http_token"] = http_token.into();
    }
    serde_json::from_value(bundle).unwrap()
}

async fn provision_csr(gw: &TestGateway, id: &str, key: &KeyPair) -> Bundle {
    let (status, answer) = status_json(
        gw.admin_post(
            "/v1/terminals",
            json!({"id": id, "merchant_id": "mer_test", "csr_pem": csr(key)}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    assemble(&answer, &key.serialize_pem(), "")
}

async fn renew(gw: &TestGateway, id: &str, body: Value) -> (u16, Value) {
    status_json(
        gw.admin_post(&format!("/v1/terminals/{id}/certificate"), body)
            .await,
    )
    .await
}

/// Connects (and disconnects) as `bundle`'s identity: `Ok` if the broker accepted the CONNECT.
async fn connects(gw: &TestGateway, bundle: &Bundle) -> Result<(), String> {
    let (client, _eventloop) = gw.mqtt_connect(&Identity::of(bundle)).await?;
    drop(client.disconnect().await);
    Ok(())
}

/// The provider confirms a payment at `bundle`'s terminal, and the terminal, connected with
/// that bundle's certificate, shows it.
async fn paid_at(gw: &TestGateway, bundle: &Bundle, intent_id: &str) {
    let mut terminal = gw.connect(bundle.clone()).await;
    gw.pay(&bundle.terminal_id, intent_id).await;
    let confirmation = terminal.next_confirmation(WAIT).await.unwrap();
    assert_eq!(
        (confirmation.intent_id.as_str(), confirmation.status),
        (intent_id, ConfirmationStatus::Confirmed)
    );
}

#[tokio::test]
async fn a_terminal_provisioned_from_its_csr_connects_with_its_own_key() {
    let gw = spawn_gateway().await;
    for (id, alg) in [
        ("pos_csr_p256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("pos_csr_ed25519", &rcgen::PKCS_ED25519),
    ] {
        let key = KeyPair::generate_for(alg).unwrap();
        let bundle = provision_csr(&gw, id, &key).await;
        // The gateway named it, whatever the CSR asked for.
        let identity = posgate::pki::identity_of_pem(&bundle.cert_pem).unwrap();
        assert_eq!(identity.cn, id);
        assert_eq!(identity.o, bundle.tenant);
        assert!(!bundle.http_token.is_empty());
        paid_at(&gw, &bundle, &format!("pi_{id}")).await;
    }
    gw.shutdown().await;
}

/// `pem` with the last byte of its DER (inside the signature value) changed.
fn tamper(pem: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = b64.decode(body).unwrap();
    *der.last_mut().unwrap() ^= 0x01;
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        b64.encode(der)
    )
}

#[tokio::test]
async fn bad_csrs_are_refused_and_register_nothing() {
    let gw = spawn_gateway().await;
    let key = KeyPair::generate().unwrap();
    let good = csr(&key);
    let tampered = tamper(&good);
    let cert_pem = gw.provision("pos_other").await.cert_pem;
    for (csr_pem, says) in [
        ("not a csr", "not PEM"),
        (cert_pem.as_str(), "not a CERTIFICATE REQUEST"),
        (tampered.as_str(), "does not verify"),
        (
            include_str!("../../gateway/src/pki/testdata/rsa1024.csr"),
            "RSA-1024",
        ),
    ] {
        let (status, body) = status_json(
            gw.admin_post(
                "/v1/terminals",
                json!({"id": "pos_bad", "merchant_id": "mer_test", "csr_pem": csr_pem}),
            )
            .await,
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_error_body(&body);
        assert_eq!(body["error"]["code"], "invalid_csr");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message:?} should say {says:?}");
    }
    let (status, body) = status_json(
        gw.admin_post(
            "/v1/terminals",
            json!({"id": "pos_bad", "merchant_id": "mer_test", "csr_pem": 42}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 422, "{body}");
    // Nothing was registered: the id is still free for a good request.
    assert_eq!(gw.admin_get("/v1/terminals/pos_bad").await.status(), 404);
    let bundle = provision_csr(&gw, "pos_bad", &key).await;
    assert!(connects(&gw, &bundle).await.is_ok());
    gw.shutdown().await;
}

#[tokio::test]
async fn renewal_keeps_both_certificates_until_the_new_one_connects() {
    let gw = spawn_gateway().await;
    let old = gw.provision("pos_renew").await;
    paid_at(&gw, &old, "pi_before").await;

    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let (status, answer) = renew(&gw, "pos_renew", json!({"csr_pem": csr(&key)})).await;
    assert_eq!(status, 200, "{answer}");
    let old_serial = posgate::pki::identity_of_pem(&old.cert_pem)
        .unwrap()
        .serial_hex;
    assert_eq!(answer["previous_cert_serial"].as_str(), Some(&*old_serial));
    assert!(answer["revoke_old_at"].is_string());
    assert!(
        answer.get("http_token").is_none(),
        "the token is kept, not repeated"
    );
    let new = assemble(&answer, &key.serialize_pem(), &old.http_token);
    assert_eq!(
        (&new.terminal_id, &new.client_id, &new.tenant),
        (&old.terminal_id, &old.client_id, &old.tenant)
    );
    assert_eq!(new.topics.payments, old.topics.payments);
    let new_id = posgate::pki::identity_of_pem(&new.cert_pem).unwrap();
    assert_eq!(new_id.cn, "pos_renew");
    assert_ne!(new_id.serial_hex, old_serial);

    // Both work until the new one is used, also after a restart.
    assert_eq!(connects(&gw, &old).await, Ok(()));
    let gw = gw.restart().await;
    assert_eq!(connects(&gw, &old).await, Ok(()));
    let view = gw.terminal_view("pos_renew").await;
    assert_eq!(view["previous_cert"]["serial"].as_str(), Some(&*old_serial));
    assert_eq!(
        gw.metric("posgate_terminal_cert_renewals_pending").await,
        Some(1.0)
    );

    // The new certificate connects (and gets confirmations): from then on the old one is refused.
    paid_at(&gw, &new, "pi_after").await;
    eventually(WAIT, || async {
        connects(&gw, &old).await.is_err().then_some(())
    })
    .await;
    let view = gw.terminal_view("pos_renew").await;
    assert!(view["previous_cert"].is_null(), "{view}");
    assert_eq!(view["revoked"], false);
    gw.metric_reaches(r#"posgate_mqtt_refused_total{reason="revoked"}"#, 1.0, WAIT)
        .await;
    assert_eq!(
        gw.metric("posgate_terminal_cert_renewals_pending").await,
        Some(0.0)
    );

    // And so it stays after a restart; the new one still works.
    let gw = gw.restart().await;
    assert!(connects(&gw, &old).await.is_err());
    assert_eq!(connects(&gw, &new).await, Ok(()));
    gw.shutdown().await;
}

#[tokio::test]
async fn renewal_without_a_csr_and_the_deadline() {
    let gw = spawn_gateway().await;
    let old = gw.provision("pos_deadline").await;
    // An empty body: a new key made on the gateway, the default deadline, the token kept.
    let response = gw
        .http
        .post(format!(
            "http://{}/v1/terminals/pos_deadline/certificate",
            gw.admin
        ))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .unwrap();
    let (status, answer) = status_json(response).await;
    assert_eq!(status, 200, "{answer}");
    let key_pem = answer["key_pem"]
        .as_str()
        .expect("the gateway made the key");
    let revoke_at = time::OffsetDateTime::parse(
        answer["revoke_old_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let in_7_days = time::OffsetDateTime::now_utc() + time::Duration::days(7);
    assert!((revoke_at - in_7_days).abs() < time::Duration::minutes(1));
    let mut second = answer.clone();
    second.as_object_mut().unwrap().remove("key_pem");
    let second = assemble(&second, key_pem, &old.http_token);
    assert_eq!(connects(&gw, &old).await, Ok(()));

    // Renewed again before that one was used: the unused one is refused at once, the old one
    // (which the terminal may still have) keeps working, now until the new deadline: 1 s.
    let (status, answer) = renew(&gw, "pos_deadline", json!({"revoke_old_after": 1})).await;
    assert_eq!(status, 200, "{answer}");
    let third = {
        let key_pem = answer["key_pem"].as_str().unwrap().to_owned();
        let mut a = answer.clone();
        a.as_object_mut().unwrap().remove("key_pem");
        assemble(&a, &key_pem, &old.http_token)
    };
    eventually(WAIT, || async {
        connects(&gw, &second).await.is_err().then_some(())
    })
    .await;
    // The deadline passes without the new certificate being used: the old one is refused.
    eventually(WAIT, || async {
        connects(&gw, &old).await.is_err().then_some(())
    })
    .await;
    assert_eq!(connects(&gw, &third).await, Ok(()));
    assert!(gw.terminal_view("pos_deadline").await["previous_cert"].is_null());
    gw.shutdown().await;
}

#[tokio::test]
async fn renewal_is_refused_for_unknown_and_revoked_terminals_and_bad_input() {
    let gw = spawn_gateway().await;
    let (status, body) = renew(&gw, "nobody", json!({})).await;
    assert_eq!(status, 404, "{body}");
    assert_error_body(&body);

    gw.provision("pos_gone").await;
    for (bad, code) in [
        (json!({"csr_pem": "nope"}), 400),
        (json!({"revoke_old_after": -1}), 422),
        (json!({"revoke_old_after": 99_999_999}), 422),
        (json!({"rotate_http_token": "yes"}), 422),
        (json!([1]), 422),
    ] {
        let (status, body) = renew(&gw, "pos_gone", bad.clone()).await;
        assert_eq!(status, code, "{bad}: {body}");
        assert_error_body(&body);
    }
    // None of that changed the terminal.
    assert!(gw.terminal_view("pos_gone").await["previous_cert"].is_null());

    let revoked = gw
        .admin_post("/v1/terminals/pos_gone/revoke", json!({}))
        .await;
    assert_eq!(revoked.status(), 200);
    let (status, body) = renew(&gw, "pos_gone", json!({})).await;
    assert_eq!((status, &body["error"]["code"]), (409, &json!("revoked")));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_rotated_http_token_replaces_the_old_one() {
    let gw = spawn_gateway().await;
    let old = gw.provision("pos_token").await;
    let url = format!("http://{}/v1/terminal/payments/pi_none", gw.ingress);
    let status_with = |token: String| {
        let request = gw.http.get(&url).bearer_auth(token);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status_with(old.http_token.clone()).await, 404);
    let (status, answer) = renew(&gw, "pos_token", json!({"rotate_http_token": true})).await;
    assert_eq!(status, 200, "{answer}");
    let token = answer["http_token"].as_str().unwrap().to_owned();
    assert_ne!(token, old.http_token);
    assert_eq!(status_with(token).await, 404, "the new token authenticates");
    assert_eq!(status_with(old.http_token.clone()).await, 401);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_new_certificate_on_the_tls_ingress_completes_the_renewal() {
    the_new_certificate_completes_the_renewal("false").await;
}

#[tokio::test]
async fn the_new_certificate_completes_the_renewal_behind_the_front_door() {
    the_new_certificate_completes_the_renewal("true").await;
}

/// With `mqtt.front_door` off (rmqtt's TLS listener holds the certificate) or on (posgate's front
/// door does).
async fn the_new_certificate_completes_the_renewal(front_door: &str) {
    let gw = spawn_with(&[
        ("POSGATE__INGRESS__TLS", "true"),
        ("POSGATE__MQTT__FRONT_DOOR", front_door),
    ])
    .await;
    let key = KeyPair::generate().unwrap();
    let old = provision_csr(&gw, "pos_tls_renew", &key).await;
    let new_key = KeyPair::generate().unwrap();
    let (status, answer) = renew(&gw, "pos_tls_renew", json!({"csr_pem": csr(&new_key)})).await;
    assert_eq!(status, 200, "{answer}");
    let new = assemble(&answer, &new_key.serialize_pem(), &old.http_token);
    let url = format!("https://{}/v1/terminal/payments/pi_none", gw.ingress);
    let get = |bundle: &Bundle| {
        let client = tls_client(&bundle.ca_pem, Some((&bundle.cert_pem, &bundle.key_pem)));
        let request = client.get(&url);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    // The old certificate is still accepted on both listeners; an MQTT connection stays open on it.
    assert_eq!(get(&old).await, 404);
    let (_client, mut on_old) = gw.mqtt_connect(&Identity::of(&old)).await.unwrap();
    // An HTTP request with the new one completes the renewal: the old one's MQTT connection is
    // closed, and it is refused on both listeners.
    assert_eq!(get(&new).await, 404);
    let closed = tokio::time::timeout(WAIT, async { while on_old.poll().await.is_ok() {} }).await;
    assert!(
        closed.is_ok(),
        "the connection on the replaced certificate is still open"
    );
    assert!(connects(&gw, &old).await.is_err());
    assert_eq!(get(&old).await, 401);
    assert_eq!(get(&new).await, 404);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_earliest_certificate_expiry_is_exported() {
    let gw = spawn_gateway().await;
    let none = gw
        .metric("posgate_terminal_cert_earliest_expiry_timestamp_seconds")
        .await;
    assert_eq!(none, Some(f64::INFINITY), "present with no terminals");
    let a = gw.provision("pos_exp_a").await;
    let not_after = posgate::pki::identity_of_pem(&a.cert_pem)
        .unwrap()
        .not_after
        .unix_timestamp() as f64;
    assert_eq!(
        gw.metric("posgate_terminal_cert_earliest_expiry_timestamp_seconds")
            .await,
        Some(not_after)
    );
    // A later one does not move it; revoking the earliest does.
    let b = gw.provision("pos_exp_b").await;
    let b_after = posgate::pki::identity_of_pem(&b.cert_pem)
        .unwrap()
        .not_after
        .unix_timestamp() as f64;
    assert!(b_after >= not_after);
    assert_eq!(
        gw.metric("posgate_terminal_cert_earliest_expiry_timestamp_seconds")
            .await,
        Some(not_after)
    );
    let revoked = gw
        .admin_post("/v1/terminals/pos_exp_a/revoke", json!({}))
        .await;
    assert_eq!(revoked.status(), 200);
    assert_eq!(
        gw.metric("posgate_terminal_cert_earliest_expiry_timestamp_seconds")
            .await,
        Some(b_after)
    );
    gw.shutdown().await;
}
