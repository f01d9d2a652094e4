//! Reads the telemetry stream as this instance's own consumer group and hands
//! batches to the record path.
//!
//! Read-only towards everything but its own group: it never writes to the
//! stream, never touches the `processor` group, never trims. The group starts
//! at the stream's end (live only: a restarted instance does not replay the
//! backlog) and entries are read with NOACK, so nothing piles up in a pending
//! list: for a live map, missing a position is fine, the next one supersedes
//! it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::{AsyncConnectionConfig, RedisError, Value, aio::MultiplexedConnection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broadcast::{StreamEntry, Work};
use crate::metrics::{Metrics, inc};
use crate::resume::Coverage;

/// Where and how to read.
#[derive(Clone)]
pub struct StreamConfig {
    pub stream: String,
    pub group: String,
    pub consumer: String,
    pub batch_size: u32,
    pub block: Duration,
}

pub struct Consumer {
    pub client: redis::Client,
    pub config: StreamConfig,
    pub metrics: Arc<Metrics>,
    /// True while connected with the group in place (`/readyz`).
    pub ready: Arc<AtomicBool>,
    /// Since when reading has had no break (see `resume`).
    pub coverage: Arc<Coverage>,
}

fn kind(e: &RedisError) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        "connection"
    } else {
        "server"
    }
}

impl Consumer {
    /// Reads until cancelled, reconnecting with backoff when Redis goes away,
    /// then removes the group (it only ever served this instance).
    pub async fn run(self, batches: mpsc::Sender<Work>, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        // Where the group must start if it has to be created again: just
        // after the last entry read, so that nothing written after a loss
        // (a deleted stream, a Redis that restarted empty) is skipped, and
        // nothing read before it replayed. `None` until the group exists.
        let mut resume: Option<String> = None;
        loop {
            let result = self
                .session(&batches, &cancel, &mut backoff, &mut resume)
                .await;
            self.set_ready(false);
            match result {
                Ok(()) => break,
                Err(e) => {
                    inc(&self.metrics.consumer_errors, "kind", kind(&e));
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "stream consumer lost Redis; reconnecting");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        self.destroy_group().await;
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.metrics.redis_connected.set(i64::from(ready));
    }

    /// One connection's life. `Ok` means cancelled or the record path is gone.
    async fn session(
        &self,
        batches: &mpsc::Sender<Work>,
        cancel: &CancellationToken,
        backoff: &mut Duration,
        resume: &mut Option<String>,
    ) -> Result<(), RedisError> {
        // A blocking read on a connection of its own, with a response timeout
        // longer than the BLOCK (redis-rs applies its default of 500 ms to
        // blocking commands too).
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(self.config.block + Duration::from_secs(5)));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?;
        match resume.as_deref() {
            None => {
                let started = crate::resume::unix_ms();
                *resume = Some(self.start_group(&mut conn).await?);
                self.coverage.begin(started);
            }
            Some(after) => self.recreate_group(&mut conn, after).await?,
        }
        self.set_ready(true);
        *backoff = Duration::from_millis(100);

        let c = &self.config;
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(&c.group)
            .arg(&c.consumer)
            .arg("COUNT")
            .arg(c.batch_size)
            .arg("BLOCK")
            .arg(c.block.as_millis() as u64)
            .arg("NOACK")
            .arg("STREAMS")
            .arg(&c.stream)
            .arg(">");
        loop {
            let reply = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = read.query_async::<Value>(&mut conn) => r,
            };
            let batch = match reply {
                Ok(v) => parse_read_reply(v),
                // The group vanished, or the stream was deleted under a
                // blocked read ("UNBLOCKED the stream key no longer exists"):
                // the connection is fine, the group is not.
                Err(e) if matches!(e.code(), Some("NOGROUP" | "UNBLOCKED")) => {
                    tracing::warn!(group = %c.group, error = %e, "the consumer group or the stream vanished; creating the group again where this instance stopped reading");
                    inc(&self.metrics.consumer_errors, "kind", "group_lost");
                    let after = resume.clone().unwrap_or_else(|| "0".into());
                    self.recreate_group(&mut conn, &after).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(last) = batch.last() {
                *resume = Some(last.id.clone());
            }
            if !batch.is_empty() && batches.send(Work::Batch(batch)).await.is_err() {
                return Ok(());
            }
        }
    }

    /// At start-up: the group at the stream's end (live only, no replay),
    /// moved there if an earlier run of this instance left it behind.
    /// Returns the id it starts after.
    async fn start_group(&self, conn: &mut MultiplexedConnection) -> Result<String, RedisError> {
        let c = &self.config;
        let exists: bool = redis::cmd("EXISTS")
            .arg(&c.stream)
            .query_async(conn)
            .await?;
        if !exists {
            tracing::warn!(stream = %c.stream, "the telemetry stream does not exist (yet); is REDIS_TELEMETRY_STREAM right? Waiting for entries on it");
        }
        match self.create_group(conn, "$").await {
            Err(e) if e.code() == Some("BUSYGROUP") => {
                redis::cmd("XGROUP")
                    .arg("SETID")
                    .arg(&c.stream)
                    .arg(&c.group)
                    .arg("$")
                    .query_async::<()>(conn)
                    .await?;
            }
            other => other?,
        }
        let info: Value = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&c.stream)
            .query_async(conn)
            .await?;
        tracing::info!(stream = %c.stream, group = %c.group, consumer = %c.consumer, "reading the telemetry stream");
        Ok(last_generated_id(&info).unwrap_or_else(|| "0".into()))
    }

    /// After a reconnect or a loss: the group kept where it was when it
    /// still exists (what arrived during a short outage is still delivered;
    /// stale positions are dropped downstream), else created again just
    /// after `after`, the last entry read. A group created again may have
    /// missed entries (a trimmed or deleted stream), so resumes from before
    /// now get full snapshots.
    async fn recreate_group(
        &self,
        conn: &mut MultiplexedConnection,
        after: &str,
    ) -> Result<(), RedisError> {
        let now = crate::resume::unix_ms();
        match self.create_group(conn, after).await {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Ok(()) => {
                self.coverage.begin(now);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn create_group(
        &self,
        conn: &mut MultiplexedConnection,
        at: &str,
    ) -> Result<(), RedisError> {
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(at)
            .arg("MKSTREAM")
            .query_async(conn)
            .await
    }

    async fn destroy_group(&self) {
        let c = &self.config;
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)));
        let destroyed = async {
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await?;
            redis::cmd("XGROUP")
                .arg("DESTROY")
                .arg(&c.stream)
                .arg(&c.group)
                .query_async::<i64>(&mut conn)
                .await
        };
        match destroyed.await {
            Ok(_) => tracing::info!(group = %c.group, "removed this instance's consumer group"),
            Err(e) => {
                tracing::warn!(group = %c.group, error = %e, "could not remove this instance's consumer group")
            }
        }
    }

    /// Publishes the group's lag (entries not yet read) every `every`.
    pub async fn lag_loop(
        client: redis::Client,
        config: StreamConfig,
        metrics: Arc<Metrics>,
        every: Duration,
        cancel: CancellationToken,
    ) {
        let mut conn: Option<MultiplexedConnection> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if conn.is_none() {
                conn = client.get_multiplexed_async_connection().await.ok();
            }
            let Some(c) = conn.as_mut() else { continue };
            match redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&config.stream)
                .query_async::<Value>(c)
                .await
            {
                Ok(v) => {
                    if let Some(lag) = group_lag(&v, &config.group) {
                        metrics.consumer_lag.set(lag);
                    }
                }
                Err(e) if e.is_io_error() || e.is_connection_dropped() => conn = None,
                Err(_) => {}
            }
        }
    }
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// Entries of an XREADGROUP reply on one stream. Entries without a `payload`
/// field are kept (the record path counts them as malformed).
pub fn parse_read_reply(v: Value) -> Vec<StreamEntry> {
    let streams = match v {
        Value::Array(s) => s,
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    for stream in streams {
        let Value::Array(mut kv) = stream else {
            continue;
        };
        let Some(Value::Array(entries)) = kv.pop() else {
            continue;
        };
        out.reserve(entries.len());
        for entry in entries {
            let Value::Array(mut parts) = entry else {
                continue;
            };
            let fields = parts.pop();
            let id = parts
                .first()
                .and_then(bulk)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let payload = match fields {
                Some(Value::Array(fields)) => take_field(fields, b"payload"),
                Some(Value::Map(pairs)) => {
                    pairs.into_iter().find_map(|(k, v)| match (bulk(&k), v) {
                        (Some(b"payload"), Value::BulkString(p)) => Some(p),
                        _ => None,
                    })
                }
                _ => None,
            };
            out.push(StreamEntry { id, payload });
        }
    }
    out
}

fn take_field(fields: Vec<Value>, name: &[u8]) -> Option<Vec<u8>> {
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if bulk(&k) == Some(name) {
            return match v {
                Value::BulkString(p) => Some(p),
                Value::SimpleString(s) => Some(s.into_bytes()),
                _ => None,
            };
        }
    }
    None
}

/// The `last-generated-id` of an XINFO STREAM reply.
fn last_generated_id(v: &Value) -> Option<String> {
    let field = match v {
        Value::Array(f) => f
            .chunks_exact(2)
            .find(|kv| bulk(&kv[0]) == Some(b"last-generated-id"))
            .map(|kv| &kv[1]),
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| bulk(k) == Some(b"last-generated-id"))
            .map(|(_, v)| v),
        _ => None,
    }?;
    bulk(field).map(|b| String::from_utf8_lossy(b).into_owned())
}

/// The `lag` of `group` in an XINFO GROUPS reply (Redis ≥ 7).
fn group_lag(v: &Value, group: &str) -> Option<i64> {
    let Value::Array(groups) = v else { return None };
    for g in groups {
        let pairs: Vec<(&Value, &Value)> = match g {
            Value::Array(f) => f.chunks_exact(2).map(|c| (&c[0], &c[1])).collect(),
            Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
            _ => continue,
        };
        let field = |name: &[u8]| {
            pairs
                .iter()
                .find(|(k, _)| bulk(k) == Some(name))
                .map(|(_, v)| *v)
        };
        if field(b"name").and_then(bulk) != Some(group.as_bytes()) {
            continue;
        }
        return match field(b"lag") {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_entries_and_keeps_those_without_payload() {
        let reply = Value::Array(vec![Value::Array(vec![
            b("telemetry:teltonika"),
            Value::Array(vec![
                Value::Array(vec![
                    b("1-0"),
                    Value::Array(vec![b("ts"), b("x"), b("payload"), b("{}")]),
                ]),
                Value::Array(vec![b("2-0"), Value::Array(vec![b("device_id"), b("1")])]),
            ]),
        ])]);
        let entries = parse_read_reply(reply);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(entries[0].payload.as_deref(), Some(&b"{}"[..]));
        assert_eq!(entries[1].payload, None);
        assert!(parse_read_reply(Value::Nil).is_empty());
    }

    #[test]
    fn reads_where_the_stream_ends() {
        let reply = Value::Array(vec![
            b("length"),
            Value::Int(2),
            b("last-generated-id"),
            b("1700000000000-3"),
        ]);
        assert_eq!(
            last_generated_id(&reply).as_deref(),
            Some("1700000000000-3")
        );
        assert_eq!(last_generated_id(&Value::Nil), None);
    }

    #[test]
    fn reads_the_lag_of_its_group() {
        let reply = Value::Array(vec![
            Value::Array(vec![b("name"), b("processor"), b("lag"), Value::Int(9)]),
            Value::Array(vec![
                b("name"),
                b("live-broadcast-a"),
                b("lag"),
                Value::Int(2),
            ]),
        ]);
        assert_eq!(group_lag(&reply, "live-broadcast-a"), Some(2));
        assert_eq!(group_lag(&reply, "other"), None);
    }
}
