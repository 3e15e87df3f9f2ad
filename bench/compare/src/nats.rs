//! NATS JetStream through async-nats: a file-storage stream; each producer
//! on its own connection publishes asynchronously with up to `window`
//! publish acks outstanding (or, with `--lockstep`, as `nats bench js pub
//! async` does: `batch` publishes, then a wait for all their acks); one
//! durable pull consumer with explicit acks (`AckPolicy::Explicit`),
//! pulling batches of `batch` messages, acks each message (`Message::ack`,
//! a publish to the reply subject); the connection is flushed after the
//! last ack.
//!
//! `replicas` 1 is one `nats-server`; 3 is a three-server cluster (routes
//! on 127.0.0.1) with an R3 stream and consumer, every client connected to
//! the first server (which forwards to the stream's leader, wherever it
//! is), as DMQ's clients are connected to its first node.

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
    READY_TIMEOUT,
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

/// Starts `replicas` servers (1, or a cluster of 3) and waits for their
/// client ports; returns them and the first one's URL.
async fn start_servers(
    nats_server: &str,
    sync_always: bool,
    replicas: usize,
) -> Result<(Vec<Server>, String)> {
    let ports: Vec<u16> = (0..replicas).map(|_| free_port()).collect::<Result<_>>()?;
    let routes: Vec<u16> = (0..replicas).map(|_| free_port()).collect::<Result<_>>()?;
    let mut servers = Vec::new();
    for (index, port) in ports.iter().enumerate() {
        let cluster = if replicas > 1 {
            let others: Vec<String> = routes
                .iter()
                .enumerate()
                .filter(|&(other, _)| other != index)
                .map(|(_, route)| format!("nats-route://127.0.0.1:{route}"))
                .collect();
            format!(
                "server_name: n{index}\ncluster {{\n  name: compare\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                routes[index],
                others.join(", ")
            )
        } else {
            String::new()
        };
        let mut server = Server::start("nats-server", nats_server, |dir| {
            let store = dir.join("jetstream");
            let sync = if sync_always {
                "  sync_interval: always\n"
            } else {
                ""
            };
            let config = format!(
                "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{\n  store_dir: \"{}\"\n{sync}}}\n{cluster}",
                store.display()
            );
            let path = dir.join("nats.conf");
            std::fs::write(&path, config).context("writing nats.conf")?;
            Ok(vec!["-c".into(), path.display().to_string()])
        })?;
        if let Err(error) = server.wait_for_port(*port).await {
            if sync_always && server.log_tail().contains("sync_interval") {
                bail!(
                    "this nats-server does not support `sync_interval: always` (needs ≥ 2.10; \
                     pass a newer one with --nats-server): {error:#}"
                );
            }
            return Err(error);
        }
        servers.push(server);
    }
    Ok((servers, format!("nats://127.0.0.1:{}", ports[0])))
}

pub async fn run(
    nats_server: &str,
    sync_always: bool,
    replicas: usize,
    workload: &Workload,
) -> Result<Outcome> {
    let (servers, url) = start_servers(nats_server, sync_always, replicas).await?;
    let admin = jetstream::new(connect(&url).await?);
    // A cluster takes a moment to elect its JetStream meta leader.
    let started = Instant::now();
    let stream = loop {
        let created = admin
            .create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec![SUBJECT.into()],
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await;
        match created {
            Ok(stream) => break stream,
            Err(error) if started.elapsed() > READY_TIMEOUT => {
                return Err(error).context("creating the stream")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
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
                // `nats bench js pub async`: a batch, then all its acks.
                if workload.lockstep {
                    Window::Lockstep(workload.batch)
                } else {
                    Window::Sliding(workload.window)
                },
                Arc::clone(&shared),
            )
        })
        .collect();
    let outcome = measure(&shared, consumer, producers).await;
    drop(servers);
    outcome
}

/// How many publishes a producer keeps unacknowledged.
enum Window {
    /// Up to this many at any time.
    Sliding(usize),
    /// This many, then a wait for all their acks.
    Lockstep(usize),
}

async fn produce(
    context: jetstream::Context,
    template: Bytes,
    count: u64,
    window: Window,
    shared: Arc<Shared>,
) -> Result<()> {
    let (window, lockstep) = match window {
        Window::Sliding(window) => (window, false),
        Window::Lockstep(batch) => (batch, true),
    };
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
        if lockstep && in_flight.len() >= window {
            while let Some(result) = in_flight.next().await {
                record(result);
            }
        }
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
