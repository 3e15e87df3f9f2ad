//! NATS JetStream through async-nats: a file-storage stream; each producer
//! on its own connection publishes asynchronously with up to `window`
//! publish acks outstanding; one durable pull consumer with explicit acks
//! (`AckPolicy::Explicit`), pulling batches of `batch` messages, acks each
//! message (`Message::ack`, a publish to the reply subject); the
//! connection is flushed after the last ack.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, stream};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;

use crate::server::{free_port, Server};
use crate::workload::{
    histogram, measure, record_delivery, stamped, Outcome, Shared, Workload, DRAIN_TIMEOUT,
};

const STREAM: &str = "COMPARE";
const SUBJECT: &str = "compare";

async fn connect(url: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name("dmq-compare")
        .connect(url)
        .await
        .with_context(|| format!("connecting to nats-server at {url}"))
}

pub async fn run(nats_server: &str, sync_always: bool, workload: &Workload) -> Result<Outcome> {
    let port = free_port()?;
    let mut server = Server::start("nats-server", nats_server, |dir| {
        let store = dir.join("jetstream");
        let sync = if sync_always {
            "  sync_interval: always\n"
        } else {
            ""
        };
        let config = format!(
            "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{\n  store_dir: \"{}\"\n{sync}}}\n",
            store.display()
        );
        let path = dir.join("nats.conf");
        std::fs::write(&path, config).context("writing nats.conf")?;
        Ok(vec!["-c".into(), path.display().to_string()])
    })?;
    if let Err(error) = server.wait_for_port(port).await {
        if sync_always && server.log_tail().contains("sync_interval") {
            bail!(
                "this nats-server does not support `sync_interval: always` (needs ≥ 2.10; \
                 pass a newer one with --nats-server): {error:#}"
            );
        }
        return Err(error);
    }
    let url = format!("nats://127.0.0.1:{port}");
    let admin = jetstream::new(connect(&url).await?);
    let stream = admin
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the stream")?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("compare".into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: i64::try_from(workload.messages).unwrap_or(i64::MAX),
            ..Default::default()
        })
        .await
        .context("creating the consumer")?;

    let shared = Shared::new(workload.producers);
    let consumer_client = connect(&url).await?;
    let consumer = jetstream::new(consumer_client.clone())
        .get_consumer_from_stream::<pull::Config, _, _>(consumer.cached_info().name.clone(), STREAM)
        .await
        .context("binding the consumer")?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(workload.batch)
        .messages()
        .await
        .context("starting the pull")?;

    let mut producer_contexts = Vec::new();
    for _ in 0..workload.producers {
        let client = connect(&url).await?;
        producer_contexts.push(
            jetstream::ContextBuilder::new()
                .max_ack_inflight(workload.window + 1)
                // Deep pipelines against a slow (fsync-per-write) server
                // wait long for their acks; the run's own timeout bounds it.
                .ack_timeout(Duration::from_secs(300))
                .timeout(Duration::from_secs(300))
                .build(client),
        );
    }

    let consumer = consume(
        messages,
        consumer_client,
        workload.messages,
        Arc::clone(&shared),
    );
    let template = workload.template();
    let producers = producer_contexts
        .into_iter()
        .enumerate()
        .map(|(index, context)| {
            produce(
                context,
                template.clone(),
                workload.share(index),
                workload.window,
                Arc::clone(&shared),
            )
        })
        .collect();
    let outcome = measure(&shared, consumer, producers).await;
    drop(server);
    outcome
}

async fn produce(
    context: jetstream::Context,
    template: Bytes,
    count: u64,
    window: usize,
    shared: Arc<Shared>,
) -> Result<()> {
    let mut in_flight = FuturesUnordered::new();
    let mut first_error: Option<String> = None;
    let mut record = |result: Result<(), String>| match result {
        Ok(_) => {
            shared.produced.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            first_error.get_or_insert(error);
        }
    };
    for sent in 0..count {
        while in_flight.len() >= window {
            if let Some(result) = in_flight.next().await {
                record(result);
            }
        }
        match context.publish(SUBJECT, stamped(&template)).await {
            Ok(ack) => {
                in_flight.push(async move { ack.await.map(|_| ()).map_err(|e| e.to_string()) })
            }
            Err(error) => {
                record(Err(format!("{error}")));
                break;
            }
        }
        if sent % 64 == 63 {
            while let Some(Some(result)) = in_flight.next().now_or_never() {
                record(result);
            }
        }
    }
    while let Some(result) = in_flight.next().await {
        record(result);
    }
    shared.producer_done();
    match first_error {
        Some(error) => bail!("publishing to JetStream: {error}"),
        None => Ok(()),
    }
}

async fn consume(
    mut messages: pull::Stream,
    client: async_nats::Client,
    total: u64,
    shared: Arc<Shared>,
) -> Result<(u64, hdrhistogram::Histogram<u64>)> {
    let mut latency = histogram()?;
    let mut consumed = 0u64;
    let mut idle_since = Instant::now();
    while !shared.consumer_finished(consumed, total) {
        let message = match tokio::time::timeout(Duration::from_millis(100), messages.next()).await
        {
            Ok(Some(message)) => message.map_err(|e| anyhow::anyhow!("pull failed: {e}"))?,
            Ok(None) => break,
            Err(_) => {
                if shared.producers_done.load(Ordering::SeqCst)
                    && idle_since.elapsed() > DRAIN_TIMEOUT
                {
                    break;
                }
                continue;
            }
        };
        idle_since = Instant::now();
        record_delivery(&mut latency, &message.payload);
        consumed += 1;
        message
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("ack failed: {e}"))?;
    }
    client
        .flush()
        .await
        .map_err(|e| anyhow::anyhow!("flushing the acks: {e}"))?;
    Ok((consumed, latency))
}
