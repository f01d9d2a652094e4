//! A real host for the JavaScript client's tests (`clients/js/test/`).
//!
//! It builds the world of one Rust end-to-end test with the same harness
//! ([`TestEnv`]: its own PostgreSQL schema and stream, a Directus stand-in)
//! and runs a real host in this process. A Node test spawns it and drives it
//! with one JSON object per line on stdin; each command gets one JSON line
//! on stdout, `{"id": <echoed>, "ok": true, ...}` or `{"id": ..., "ok":
//! false, "error": "..."}`. The first line, `{"ready": true}`, says the
//! world exists. End of stdin stops the host and removes the schema and the
//! stream.
//!
//! | `cmd` | fields | does | answer |
//! |---|---|---|---|
//! | `event` | `devices`: IMEIs | an event with those devices | `event` |
//! | `demo-event` | `devices`: n | an event with the demo's first n devices | `event`, `devices` |
//! | `user` | `token`, `events` | a session that may read the events | `cookie` |
//! | `end-session` | `token` | the session expires | |
//! | `directus-down` / `directus-up` | | the stand-in answers every call with 503 / normally again | |
//! | `start` | `pages`: token?, `proxy`: bool? | starts the host, on the port of the last start if any; with `pages`, serves the demo's map page (setting that session's cookie); with `proxy`, clients go through a TCP proxy | `ws`, `page`? |
//! | `stop` | | stops the host as SIGTERM would (clients get 1001) | |
//! | `proxy-down` / `proxy-up` | | cuts every proxied connection and refuses new ones / accepts again | |
//! | `publish` | `device`, `ts`, `lat`, `lon`, `speed`?, `course`? | `XADD` of a position | `entry` |
//! | `row` | `device`, `ts`, `lat`, `lon` | a stored position (as the durable writer's) | |
//! | `move` | `device`, `from`, `to` | re-registers a device to another event | |
//! | `drive` | `devices`: n, `interval_ms` | publishes the demo's moving positions until `park` | |
//! | `park` | | stops `drive` | |
//! | `stats` | | Directus calls so far, subscriptions held, connections that negotiated permessage-deflate and the bytes compressed for them | `users_me_calls`, `items_calls`, `subscriptions`, `deflate_connections`, `deflate_out_bytes` |

use std::process::ExitCode;
use std::time::Duration;

use livecast::Host;
use livecast::test_util::{demo, page};
use livecast_tests::{Proxy, TestEnv, TestHost, cookie, iso, now_ms, payload, proxy};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinHandle;
use uuid::Uuid;

#[derive(Default)]
struct Running {
    host: Option<TestHost>,
    /// The host's port, kept so a restart binds the same one.
    port: u16,
    proxy: Option<Proxy>,
    drive: Option<JoinHandle<()>>,
}

type Answer = Result<Map<String, Value>, String>;

#[tokio::main]
async fn main() -> ExitCode {
    let env = TestEnv::new().await;
    let mut run = Running::default();
    println!("{}", json!({"ready": true}));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let (id, answer) = match serde_json::from_str::<Value>(&line) {
            Ok(cmd) => (cmd["id"].clone(), command(&env, &mut run, &cmd).await),
            Err(e) => (Value::Null, Err(format!("not JSON: {e}"))),
        };
        let mut reply = Map::new();
        reply.insert("id".into(), id);
        match answer {
            Ok(fields) => {
                reply.insert("ok".into(), true.into());
                reply.extend(fields);
            }
            Err(e) => {
                reply.insert("ok".into(), false.into());
                reply.insert("error".into(), e.into());
            }
        }
        println!("{}", Value::Object(reply));
    }
    if let Some(d) = run.drive.take() {
        d.abort();
    }
    if let Some(host) = run.host.take() {
        host.stop().await;
    }
    ExitCode::SUCCESS
}

fn str_field<'a>(cmd: &'a Value, name: &str) -> Result<&'a str, String> {
    cmd[name]
        .as_str()
        .ok_or_else(|| format!("`{name}` must be a string"))
}

fn int_field(cmd: &Value, name: &str) -> Result<i64, String> {
    cmd[name]
        .as_i64()
        .ok_or_else(|| format!("`{name}` must be an integer"))
}

fn num_field(cmd: &Value, name: &str) -> Result<f64, String> {
    cmd[name]
        .as_f64()
        .ok_or_else(|| format!("`{name}` must be a number"))
}

fn uuid_field(cmd: &Value, name: &str) -> Result<Uuid, String> {
    Uuid::try_parse(str_field(cmd, name)?).map_err(|e| format!("`{name}`: {e}"))
}

fn answer(fields: Value) -> Answer {
    match fields {
        Value::Object(m) => Ok(m),
        _ => Ok(Map::new()),
    }
}

async fn command(env: &TestEnv, run: &mut Running, cmd: &Value) -> Answer {
    match str_field(cmd, "cmd")? {
        "event" => {
            let devices = cmd["devices"]
                .as_array()
                .ok_or("`devices` must be an array of IMEIs")?;
            let imeis: Vec<&str> = devices.iter().filter_map(Value::as_str).collect();
            answer(json!({"event": env.event(&imeis).await}))
        }
        "demo-event" => {
            let n = u32::try_from(int_field(cmd, "devices")?).map_err(|e| e.to_string())?;
            let imeis: Vec<String> = (0..n).map(demo::imei).collect();
            let refs: Vec<&str> = imeis.iter().map(String::as_str).collect();
            answer(json!({"event": env.event(&refs).await, "devices": imeis}))
        }
        "user" => {
            let token = str_field(cmd, "token")?;
            let events = cmd["events"]
                .as_array()
                .ok_or("`events` must be an array of event ids")?
                .iter()
                .map(|e| e.as_str().and_then(|s| Uuid::try_parse(s).ok()))
                .collect::<Option<Vec<Uuid>>>()
                .ok_or("`events` must hold event ids")?;
            env.user(token, None, &events);
            answer(json!({"cookie": cookie(token)}))
        }
        "end-session" => {
            env.directus.end_session(str_field(cmd, "token")?);
            answer(json!({}))
        }
        "directus-down" | "directus-up" => {
            env.directus.set_failing(cmd["cmd"] == "directus-down");
            answer(json!({}))
        }
        "start" => start(env, run, cmd).await,
        "stop" => {
            let host = run.host.take().ok_or("the host is not running")?;
            host.stop().await;
            answer(json!({}))
        }
        "proxy-down" | "proxy-up" => {
            let p = run.proxy.as_ref().ok_or("started without a proxy")?;
            if cmd["cmd"] == "proxy-down" {
                p.down();
            } else {
                p.up();
            }
            answer(json!({}))
        }
        "publish" => {
            let mut p = payload(
                str_field(cmd, "device")?,
                int_field(cmd, "ts")?,
                num_field(cmd, "lat")?,
                num_field(cmd, "lon")?,
            );
            for (from, to) in [("speed", "speed"), ("course", "angle")] {
                if !cmd[from].is_null() {
                    p[to] = cmd[from].clone();
                }
            }
            answer(json!({"entry": env.publish(&p).await}))
        }
        "row" => {
            env.insert_position(
                str_field(cmd, "device")?,
                int_field(cmd, "ts")?,
                num_field(cmd, "lat")?,
                num_field(cmd, "lon")?,
                false,
            )
            .await;
            answer(json!({}))
        }
        "move" => {
            let (from, to) = (uuid_field(cmd, "from")?, uuid_field(cmd, "to")?);
            env.move_device(str_field(cmd, "device")?, from, to).await;
            answer(json!({}))
        }
        "drive" => {
            let n = u32::try_from(int_field(cmd, "devices")?).map_err(|e| e.to_string())?;
            let every = Duration::from_millis(
                u64::try_from(int_field(cmd, "interval_ms")?).map_err(|e| e.to_string())?,
            );
            if let Some(d) = run.drive.take() {
                d.abort();
            }
            run.drive = Some(tokio::spawn(drive(
                env.redis.clone(),
                env.stream.clone(),
                n,
                every,
            )));
            answer(json!({}))
        }
        "park" => {
            if let Some(d) = run.drive.take() {
                d.abort();
            }
            answer(json!({}))
        }
        "stats" => answer(json!({
            "users_me_calls": env.directus.users_me_calls(),
            "items_calls": env.directus.items_calls(),
            "subscriptions": run.host.as_ref().map(|h| h.inspector.subscriptions()),
            "deflate_connections": run.host.as_ref().map(|h| h.metrics.deflate_connections.get()),
            "deflate_out_bytes": run.host.as_ref().map(|h| h.metrics.deflate_out_bytes.get()),
        })),
        other => Err(format!("unknown command `{other}`")),
    }
}

async fn start(env: &TestEnv, run: &mut Running, cmd: &Value) -> Answer {
    if run.host.is_some() {
        return Err("the host is already running".into());
    }
    let mut config = env.config();
    config.live_ws_port = run.port;
    // A resume test need not wait the default 5 s for the host's memory to
    // reach back far enough; the rules are the same at any width.
    config.live_resume_slack_ms = 300;
    let mut host = Host::bind(config).await.map_err(|e| format!("{e:#}"))?;
    run.port = host.ws_addr().port();
    if let Some(token) = cmd["pages"].as_str() {
        host.serve_pages(page::map_pages(Some(format!(
            "directus_session_token={token}"
        ))));
    }
    let host = TestHost::run(host).await;
    if cmd["proxy"] == true && run.proxy.is_none() {
        run.proxy = Some(Proxy::start(proxy::authority(&host.ws_url)).await);
    }
    let origin = match &run.proxy {
        Some(p) => p.addr.to_string(),
        None => proxy::authority(&host.ws_url),
    };
    run.host = Some(host);
    let mut fields = json!({"ws": format!("ws://{origin}/ws-live")});
    if cmd["pages"].is_string() {
        fields["page"] = format!("http://{origin}{}", page::MAP_PATH).into();
    }
    answer(fields)
}

/// The demo's ingestion: every device's next position each interval, fix
/// time now.
async fn drive(
    mut redis: redis::aio::MultiplexedConnection,
    stream: String,
    devices: u32,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    for t in 1u64.. {
        tick.tick().await;
        let ts = iso(now_ms());
        let mut pipe = redis::pipe();
        for i in 0..devices {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("ts")
                .arg(&ts)
                .arg("device_id")
                .arg(demo::imei(i))
                .arg("codec")
                .arg("8E")
                .arg("payload")
                .arg(demo::payload(i, t, &ts).to_string())
                .ignore();
        }
        if pipe.query_async::<()>(&mut redis).await.is_err() {
            return;
        }
    }
}
