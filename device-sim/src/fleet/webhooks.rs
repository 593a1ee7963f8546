//! Signed webhooks posted to the gateway's ingress: [`WebhookConn`], one keep-alive HTTP/1.1
//! connection, and [`WebhookSender`], batches of confirmations over a few of them.

use std::net::SocketAddr;

use anyhow::bail;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use posgate_proto::MicroUsdc;

use crate::events::{self, Intent};

/// One keep-alive HTTP/1.1 connection that posts signed webhooks.
pub(crate) struct WebhookConn {
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl WebhookConn {
    pub(crate) async fn connect(addr: SocketAddr) -> anyhow::Result<WebhookConn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(WebhookConn { addr, sender })
    }

    pub(crate) async fn post(&mut self, secret: &str, body: String) -> anyhow::Result<()> {
        let mut request = Request::post(events::WEBHOOK_PATH)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json");
        for (name, value) in events::signed_headers(secret, events::now_unix(), body.as_bytes()) {
            request = request.header(name, value);
        }
        self.sender.ready().await?;
        let response = self
            .sender
            .send_request(request.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = response.status();
        response.into_body().collect().await?;
        if status != 200 {
            bail!("webhook answered {status}");
        }
        Ok(())
    }
}

/// Sends batches of confirmations over a few connections.
pub(super) struct WebhookSender {
    conns: Vec<tokio::sync::Mutex<WebhookConn>>,
    secret: String,
}

impl WebhookSender {
    pub(super) async fn new(
        addr: SocketAddr,
        secret: &str,
        n: usize,
    ) -> anyhow::Result<WebhookSender> {
        let mut conns = Vec::new();
        for _ in 0..n {
            conns.push(tokio::sync::Mutex::new(WebhookConn::connect(addr).await?));
        }
        Ok(WebhookSender {
            conns,
            secret: secret.to_owned(),
        })
    }

    /// Confirms each `(terminal, intent)`; returns once every webhook was answered 200.
    pub(super) async fn send_all(&self, intents: &[(String, String)]) -> anyhow::Result<()> {
        let chunks: Vec<&[(String, String)]> = intents
            .chunks(intents.len().div_ceil(self.conns.len()).max(1))
            .collect();
        let futures = chunks
            .into_iter()
            .zip(&self.conns)
            .map(|(chunk, conn)| async move {
                let mut conn = conn.lock().await;
                for (terminal, intent) in chunk {
                    let body = events::intent_event(
                        &format!("evt_{intent}"),
                        "confirmed",
                        &Intent::new(intent, MicroUsdc(4_500_000), terminal),
                    );
                    conn.post(&self.secret, body).await?;
                }
                anyhow::Ok(())
            });
        for result in futures::future::join_all(futures).await {
            result?;
        }
        Ok(())
    }
}
