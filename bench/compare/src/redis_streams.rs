//! Redis Streams through the redis crate (multiplexed tokio connections):
//! `appendonly yes`, `appendfsync always`. Each producer, on its own
//! connection, sends pipelines of `batch` XADD commands (one per message),
//! with up to `window / batch` pipelines in flight; one consumer in a
//! consumer group reads with XREADGROUP (COUNT `batch`, BLOCK 100 ms) and
//! acks each message with its own XACK command (the XACKs of one read go
//! out as one pipeline, whose replies are awaited before the next read).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::Value;

use crate::server::{free_port, Server};
use crate::workload::{
    histogram, measure, record_delivery, stamped, Outcome, Shared, Workload, DRAIN_TIMEOUT,
    READY_TIMEOUT,
};

const KEY: &str = "compare";
const GROUP: &str = "compare";

async fn connect(client: &redis::Client) -> Result<MultiplexedConnection> {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("connecting to redis-server")
}

pub async fn run(redis_server: &str, workload: &Workload) -> Result<Outcome> {
    let port = free_port()?;
    let mut server = Server::start("redis-server", redis_server, |dir| {
        Ok([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--dir",
            &dir.display().to_string(),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect())
    })?;
    server.wait_for_port(port).await?;
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{port}/")).context("redis client")?;
    let ready = Instant::now();
    let mut admin = loop {
        match connect(&client).await {
            Ok(mut con) => {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut con).await;
                if pong.is_ok() {
                    break con;
                }
            }
            Err(error) if ready.elapsed() > READY_TIMEOUT => return Err(error),
            Err(_) => {}
        }
        if ready.elapsed() > READY_TIMEOUT {
            bail!("redis-server did not answer PING");
        }
        server.check_running()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(KEY)
        .arg(GROUP)
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut admin)
        .await
        .context("XGROUP CREATE")?;

    let shared = Shared::new(workload.producers);
    let consumer_con = connect(&client).await?;
    let mut producer_cons = Vec::new();
    for _ in 0..workload.producers {
        producer_cons.push(connect(&client).await?);
    }

    let consumer = consume(
        consumer_con,
        workload.batch,
        workload.messages,
        Arc::clone(&shared),
    );
    let template = workload.template();
    let pipelines = (workload.window / workload.batch).max(1);
    let producers = producer_cons
        .into_iter()
        .enumerate()
        .map(|(index, con)| {
            produce(
                con,
                template.clone(),
                workload.share(index),
                workload.batch,
                pipelines,
                Arc::clone(&shared),
            )
        })
        .collect();
    let outcome = measure(&shared, consumer, producers).await;
    drop(server);
    outcome
}

async fn produce(
    con: MultiplexedConnection,
    template: Bytes,
    count: u64,
    batch: usize,
    pipelines: usize,
    shared: Arc<Shared>,
) -> Result<()> {
    let mut in_flight = FuturesUnordered::new();
    let mut first_error = None;
    let mut record = |result: (u64, redis::RedisResult<()>)| match result {
        (n, Ok(())) => {
            shared.produced.fetch_add(n, Ordering::Relaxed);
        }
        (n, Err(error)) => {
            shared.errors.fetch_add(n, Ordering::Relaxed);
            first_error.get_or_insert(error);
        }
    };
    let mut sent = 0u64;
    while sent < count {
        while in_flight.len() >= pipelines {
            if let Some(result) = in_flight.next().await {
                record(result);
            }
        }
        let n = (count - sent).min(batch as u64);
        let mut pipe = redis::pipe();
        for _ in 0..n {
            pipe.cmd("XADD")
                .arg(KEY)
                .arg("*")
                .arg("d")
                .arg(stamped(&template).as_ref())
                .ignore();
        }
        let mut con = con.clone();
        in_flight.push(async move { (n, pipe.query_async::<()>(&mut con).await) });
        sent += n;
    }
    while let Some(result) = in_flight.next().await {
        record(result);
    }
    shared.producer_done();
    match first_error {
        Some(error) => Err(error).context("XADD"),
        None => Ok(()),
    }
}

/// (id, payload) of each entry in an XREADGROUP reply.
fn entries(reply: Value) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let streams = match reply {
        Value::Nil => return Ok(out),
        Value::Array(streams) => streams,
        Value::Map(pairs) => pairs
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        other => bail!("unexpected XREADGROUP reply: {other:?}"),
    };
    for stream in streams {
        let Value::Array(mut parts) = stream else {
            bail!("unexpected stream entry in XREADGROUP reply");
        };
        let Some(Value::Array(items)) = parts.pop() else {
            bail!("unexpected XREADGROUP reply shape");
        };
        for item in items {
            let Value::Array(mut fields) = item else {
                bail!("unexpected XREADGROUP item");
            };
            if fields.len() != 2 {
                bail!("unexpected XREADGROUP item length");
            }
            let values = fields.pop();
            let id = match fields.pop() {
                Some(Value::BulkString(id)) => id,
                Some(Value::SimpleString(id)) => id.into_bytes(),
                other => bail!("unexpected entry id {other:?}"),
            };
            let payload = match values {
                Some(Value::Array(mut kv)) if kv.len() >= 2 => match kv.swap_remove(1) {
                    Value::BulkString(data) => data,
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            };
            out.push((id, payload));
        }
    }
    Ok(out)
}

async fn consume(
    mut con: MultiplexedConnection,
    batch: usize,
    total: u64,
    shared: Arc<Shared>,
) -> Result<(u64, hdrhistogram::Histogram<u64>)> {
    let mut latency = histogram()?;
    let mut consumed = 0u64;
    let mut idle_since = Instant::now();
    while !shared.consumer_finished(consumed, total) {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg("compare-consumer")
            .arg("COUNT")
            .arg(batch)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(KEY)
            .arg(">")
            .query_async(&mut con)
            .await
            .context("XREADGROUP")?;
        let entries = entries(reply)?;
        if entries.is_empty() {
            if shared.producers_done.load(Ordering::SeqCst) && idle_since.elapsed() > DRAIN_TIMEOUT
            {
                break;
            }
            continue;
        }
        idle_since = Instant::now();
        let mut acks = redis::pipe();
        for (id, payload) in &entries {
            record_delivery(&mut latency, payload);
            acks.cmd("XACK")
                .arg(KEY)
                .arg(GROUP)
                .arg(id.as_slice())
                .ignore();
        }
        consumed += entries.len() as u64;
        let _: () = acks.query_async(&mut con).await.context("XACK")?;
    }
    Ok((consumed, latency))
}
