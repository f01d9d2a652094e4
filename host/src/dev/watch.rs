//! `livecast watch`: a terminal client for the live channel. It connects
//! with a cookie or bearer token, subscribes to the given topics, and prints
//! every message it receives, one JSON object per line.

use std::io::Write;

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// WebSocket URL of the host.
    #[arg(long, default_value = "ws://127.0.0.1:8081/ws-live")]
    url: String,
    /// Cookie header to send, e.g. `directus_session_token=<token>`.
    #[arg(long)]
    cookie: Option<String>,
    /// Bearer token to send instead of a cookie.
    #[arg(long)]
    bearer: Option<String>,
    /// Topics to subscribe to, e.g. `event:<uuid>`.
    #[arg(required = true)]
    topics: Vec<String>,
}

pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    let mut req = args.url.as_str().into_client_request()?;
    if let Some(c) = &args.cookie {
        req.headers_mut()
            .insert("cookie", HeaderValue::from_str(c)?);
    }
    if let Some(b) = &args.bearer {
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {b}"))?,
        );
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", args.url))?;
    for (i, topic) in args.topics.iter().enumerate() {
        let frame =
            serde_json::json!({"type": "subscribe", "topic": topic, "id": format!("watch-{i}")});
        ws.send(Message::Text(Utf8Bytes::from(frame.to_string())))
            .await?;
    }
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                let _ = ws.close(None).await;
                return Ok(());
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    // A closed pipe (`| head`) ends the watch quietly.
                    if writeln!(std::io::stdout(), "{t}").is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    eprintln!("closed by the host: {frame:?}");
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
        }
    }
}
