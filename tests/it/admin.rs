//! The admin listener: health, readiness, the token, and the intent views.

use std::os::unix::fs::PermissionsExt;

use posgate_proto::MicroUsdc;
use posgate_sim::events::{self, Intent};

use crate::harness::{assert_error_body, spawn_gateway, spawn_with, status_json};

#[tokio::test]
async fn health_and_readiness_need_no_token() {
    let gw = spawn_gateway().await;
    let health = gw
        .http
        .get(format!("http://{}/healthz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let (status, body) = status_json(
        gw.http
            .get(format!("http://{}/readyz", gw.admin))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, &body["ready"]),
        (200, &serde_json::Value::Bool(true)),
        "{body}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn api_requires_the_token() {
    let gw = spawn_gateway().await;
    let url = format!("http://{}/v1/payment-intents/pi_x", gw.admin);
    for auth in [
        None,
        Some("Bearer wrong-token-wrong-token"),
        Some("Basic abc"),
        Some("Bearer "),
    ] {
        let mut request = gw.http.get(&url);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let (status, body) = status_json(request.send().await.unwrap()).await;
        assert_eq!(status, 401, "{auth:?}");
        assert_error_body(&body);
    }
    let (status, body) = status_json(gw.admin_get("/v1/payment-intents/pi_x").await).await;
    assert_eq!(status, 404);
    assert_error_body(&body);
    gw.shutdown().await;
}

#[tokio::test]
async fn generated_token_is_private_and_stable_across_restarts() {
    let gw = spawn_gateway().await;
    let path = gw.data_dir.path().join("admin.token");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap().trim(),
        gw.admin_token
    );
    let token = gw.admin_token.clone();
    let gw = gw.restart().await;
    assert_eq!(gw.admin_token, token);
    gw.shutdown().await;
}

#[tokio::test]
async fn configured_token_is_used() {
    let gw = spawn_with(&[("POSGATE__ADMIN__TOKEN", "a-configured-admin-token")]).await;
    assert_eq!(gw.admin_token, "a-configured-admin-token");
    assert!(!gw.data_dir.path().join("admin.token").exists());
    gw.shutdown().await;
}

#[tokio::test]
async fn intents_list_filters_and_pages() {
    let gw = spawn_gateway().await;
    for i in 0..5 {
        let terminal = if i % 2 == 0 { "pos-even" } else { "pos-odd" };
        let pi = Intent::new(&format!("pi_list_{i}"), MicroUsdc(1_000_000), terminal);
        let status = if i < 3 { "confirmed" } else { "expired" };
        let body = events::intent_event(&format!("evt_list_{i}"), status, &pi);
        assert_eq!(gw.post_signed(&body).await.status(), 200);
    }
    let ids = |body: &serde_json::Value| -> Vec<String> {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, all) = status_json(gw.admin_get("/v1/payment-intents").await).await;
    assert_eq!(ids(&all).len(), 5);
    let (_, confirmed) =
        status_json(gw.admin_get("/v1/payment-intents?status=confirmed").await).await;
    assert_eq!(ids(&confirmed), ["pi_list_0", "pi_list_1", "pi_list_2"]);
    let (_, even) = status_json(
        gw.admin_get("/v1/payment-intents?terminal_id=pos-even&status=expired")
            .await,
    )
    .await;
    assert_eq!(ids(&even), ["pi_list_4"]);
    let (_, page1) = status_json(gw.admin_get("/v1/payment-intents?limit=2").await).await;
    assert_eq!(
        (ids(&page1), &page1["has_more"]),
        (vec!["pi_list_0".into(), "pi_list_1".into()], &true.into())
    );
    let (_, page2) = status_json(
        gw.admin_get("/v1/payment-intents?limit=2&starting_after=pi_list_1")
            .await,
    )
    .await;
    assert_eq!(ids(&page2), ["pi_list_2", "pi_list_3"]);
    for bad in ["?status=paid", "?limit=0", "?limit=many"] {
        let (status, body) =
            status_json(gw.admin_get(&format!("/v1/payment-intents{bad}")).await).await;
        assert_eq!(status, 422, "{bad}");
        assert_error_body(&body);
    }
    gw.shutdown().await;
}

/// A merchant id that cannot be the provider's (`mer_…`) is refused at provisioning with a clear
/// 400, and nothing is registered: before, it was accepted and every payment of the terminal
/// failed at the provider.
#[tokio::test]
async fn provisioning_refuses_a_merchant_id_the_provider_cannot_have() {
    let gw = spawn_gateway().await;
    let long = format!("mer_{}", "a".repeat(252));
    for merchant_id in [
        "m",
        "acct_1",
        "mer_",
        "MER_acme",
        " mer_acme",
        "mer_acme\n",
        "mer_ac me",
        "mer_\u{7}x",
        long.as_str(),
    ] {
        let (status, body) = status_json(
            gw.admin_post(
                "/v1/terminals",
                serde_json::json!({"id": "pos_merchant", "merchant_id": merchant_id}),
            )
            .await,
        )
        .await;
        assert_eq!(status, 400, "{merchant_id:?}: {body}");
        assert_error_body(&body);
        assert_eq!(body["error"]["code"], "invalid_merchant_id", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("mer_"), "{message}");
        let (status, _) = status_json(gw.admin_get("/v1/terminals/pos_merchant").await).await;
        assert_eq!(status, 404, "{merchant_id:?} registered a terminal");
    }
    // Not a string at all: the admin API's usual 422 naming the field.
    let (status, body) = status_json(
        gw.admin_post(
            "/v1/terminals",
            serde_json::json!({"id": "pos_merchant", "merchant_id": 7}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (422, &"invalid_field".into())
    );
    // The provider's own form, up to 255 bytes, is taken as it is.
    for (id, merchant_id) in [
        ("pos_merchant", "mer_4kT9wQz2"),
        ("pos_merchant_long", &long[..255]),
    ] {
        let (status, body) = status_json(
            gw.admin_post(
                "/v1/terminals",
                serde_json::json!({"id": id, "merchant_id": merchant_id}),
            )
            .await,
        )
        .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(gw.terminal_view(id).await["merchant_id"], merchant_id);
    }
    gw.shutdown().await;
}
