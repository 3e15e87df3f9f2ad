//! `dmq bench`: an end-to-end load generator. Producers (each on its own
//! connection) send `--count` messages in total, or for `--duration`, at a
//! target `--rate` (0 = as fast as possible), each carrying its send time
//! in a header; consumers (each on its own connection, one fresh group)
//! receive them and, with `--acks`, ack each one. Reports produce→ack and
//! produce→deliver latency percentiles (hdrhistogram), msgs/s and MB/s.
//!
//! Every loop is bounded: producers stop at the count or the deadline;
//! consumers stop when every acknowledged message arrived, or after
//! `--drain-timeout` without progress once the producers are done.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use dmq_client::{ClientError, ErrorCode, Message, ProducerOptions, Start, SubscribeOptions};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio::sync::watch;

use crate::output::Format;
use crate::{parse_duration, Cli};

/// Header carrying the send time (ns since the Unix epoch, u64 LE).
const SEND_TIME_HEADER: &str = "dmq-bench-ts";
/// Latencies above this (µs) are clamped into the histogram's top bucket.
const MAX_LATENCY_US: u64 = 60_000_000;

/// `dmq bench` arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Producer connections.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Consumer connections (0: produce only).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Messages in total (default 100000 unless --duration).
    #[arg(long, conflicts_with = "duration")]
    pub count: Option<u64>,
    /// Produce for this long instead of a count (e.g. 10s).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Target messages per second over all producers; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Topic (created if missing).
    #[arg(long, default_value = "dmq-bench")]
    pub topic: String,
    /// Spread the produce over this many topics (`<topic>-00000`, ...,
    /// created if missing, `--partitions` each): each batch goes to a
    /// topic chosen at random. Produce only (`--consumers 0`).
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Partitions when the topic is created.
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Consumers ack every message (per-message acks, batched in frames).
    #[arg(long)]
    pub acks: bool,
    /// Producer batch size (messages).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Producer linger (e.g. 1ms).
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    pub linger: Duration,
    /// Unacknowledged sends per producer, at most.
    #[arg(long, default_value_t = 20_000)]
    pub window: usize,
    /// Consumer credit window.
    #[arg(long, default_value_t = 5000)]
    pub credit: u32,
    /// Every message is delayed to one instant this long after the bench
    /// starts (e.g. 60s): a burst of delays falling due together. The
    /// produce→deliver latency is then measured from that instant.
    #[arg(long, value_parser = parse_duration)]
    pub due_in: Option<Duration>,
    /// Producers are idempotent (producer id and sequence on every batch).
    #[arg(long)]
    pub idempotent: bool,
    /// Each producer task starts a new producer (a new random producer id)
    /// after this many messages: with --idempotent, many distinct producer
    /// ids, to watch the broker's dedup window stay bounded.
    #[arg(long)]
    pub new_producer_every: Option<u64>,
    /// Produce in transactions of this many messages each (begin, send,
    /// commit; 0: no transactions). The produce→ack latency of a message
    /// is then its transaction's, from its begin to the commit's answer.
    #[arg(long, default_value_t = 0)]
    pub transaction_size: usize,
    /// With --transaction-size: transactions each producer runs at once
    /// (pipelined on its connection).
    #[arg(long, default_value_t = 64)]
    pub transactions_in_flight: usize,
    /// With --transaction-size: leave every transaction open (no commit),
    /// to measure what open transactions cost the broker. Nothing is
    /// delivered: use --consumers 0.
    #[arg(long)]
    pub leave_open: bool,
    /// Consumers give up after this long without a message once producers are done.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("histogram bounds")
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
        })
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_LATENCY_US)
}

struct Counters {
    acked: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
    /// Set once every produced message was delivered: every consumer stops
    /// at once (not after its drain timeout, which would count as time).
    all_delivered: watch::Sender<bool>,
}

/// Runs `dmq bench`.
pub async fn run(cli: &Cli, args: &BenchArgs) -> Result<()> {
    if args.producers == 0 {
        bail!("--producers must be at least 1");
    }
    if args.topics == 0 || (args.topics > 1 && args.consumers > 0) {
        bail!("--topics must be at least 1, and more than 1 only with --consumers 0");
    }
    let topics: Arc<[String]> = match args.topics {
        1 => vec![args.topic.clone()].into(),
        n => (0..n).map(|i| format!("{}-{i:05}", args.topic)).collect(),
    };
    let admin = cli.connect().await?;
    for topic in topics.iter() {
        match admin
            .create_topic(topic, args.partitions.max(1), false)
            .await
        {
            Err(error) if error.code() != Some(ErrorCode::TopicExists) => {
                return Err(error).context("creating the bench topic")
            }
            _ => {}
        }
    }
    let count = match (args.count, args.duration) {
        (Some(count), _) => Some(count),
        (None, Some(_)) => None,
        (None, None) => Some(100_000),
    };
    let counters = Arc::new(Counters {
        all_delivered: watch::Sender::new(false),
        acked: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    // Consumers first, so that a group starting at "latest" sees everything.
    let group = format!("bench-{}-{}", std::process::id(), now_ns() / 1_000_000);
    let (done_sender, done) = watch::channel(None::<u64>);
    let mut consumers = Vec::new();
    for index in 0..args.consumers {
        let client = cli.connect().await?;
        let options = SubscribeOptions {
            member_name: format!("bench-consumer-{index}"),
            start: Start::Latest,
            credit_window: args.credit.max(1),
            ..SubscribeOptions::default()
        };
        let subscription = client
            .consumer()
            .subscribe(&args.topic, &group, options)
            .await
            .context("subscribing the bench consumer")?;
        consumers.push(tokio::spawn(consume(
            subscription,
            args.acks,
            Arc::clone(&counters),
            done.clone(),
            args.drain_timeout,
        )));
    }

    let progress = if std::io::stderr().is_terminal() {
        match count {
            Some(total) => ProgressBar::new(total),
            None => ProgressBar::new(args.duration.map_or(0, |d| d.as_secs())),
        }
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
    {
        progress.set_style(style.progress_chars("=> "));
    }

    let payload = Bytes::from(vec![b'x'; args.size]);
    let started = Instant::now();
    let due = args.due_in.map(|due_in| SystemTime::now() + due_in);
    let deadline = args.duration.map(|duration| started + duration);
    let mut producers = Vec::new();
    for index in 0..args.producers {
        let share = count.map(|total| {
            let base = total / args.producers as u64;
            base + u64::from((index as u64) < total % args.producers as u64)
        });
        let client = cli.connect().await?;
        let options = ProducerOptions {
            linger: args.linger,
            max_batch_messages: args.batch.max(1),
            max_pending_messages: args.window.max(1),
            idempotence: args.idempotent,
            ..ProducerOptions::default()
        };
        let interval = (args.rate > 0)
            .then(|| Duration::from_secs_f64(args.producers as f64 / args.rate as f64));
        if args.transaction_size > 0 {
            if args.topics > 1 || args.due_in.is_some() || args.rate > 0 {
                bail!("--transaction-size goes with one topic, no --due-in and no --rate");
            }
            producers.push(tokio::spawn(produce_transactions(
                client,
                args.topic.clone(),
                (
                    args.transaction_size,
                    args.transactions_in_flight.max(1),
                    args.leave_open,
                ),
                payload.clone(),
                (share, deadline),
                index,
                Arc::clone(&counters),
            )));
            continue;
        }
        producers.push(tokio::spawn(produce(
            (client, options, args.new_producer_every),
            (Arc::clone(&topics), args.batch.max(1), index as u64),
            payload.clone(),
            share,
            deadline,
            interval,
            args.window.max(1),
            due,
            Arc::clone(&counters),
        )));
    }

    // Progress until the producers are done.
    let ticker = {
        let progress = progress.clone();
        let counters = Arc::clone(&counters);
        let by_time = count.is_none();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let acked = counters.acked.load(Ordering::Relaxed);
                let delivered = counters.delivered.load(Ordering::Relaxed);
                if by_time {
                    progress.set_position(started.elapsed().as_secs());
                } else {
                    progress.set_position(acked);
                }
                progress.set_message(format!("acked {acked} delivered {delivered}"));
            }
        })
    };
    let mut produce_latency = histogram()?;
    for producer in producers {
        let histogram = producer.await.context("producer task")??;
        produce_latency
            .add(&histogram)
            .context("merging histograms")?;
    }
    let produce_elapsed = started.elapsed();
    let produced = counters.acked.load(Ordering::Relaxed);
    done_sender.send_replace(Some(produced));
    let mut deliver_latency = histogram()?;
    for consumer in consumers {
        let histogram = consumer.await.context("consumer task")??;
        deliver_latency
            .add(&histogram)
            .context("merging histograms")?;
    }
    let total_elapsed = started.elapsed();
    ticker.abort();
    progress.finish_and_clear();

    let delivered = counters.delivered.load(Ordering::Relaxed);
    let errors = counters.errors.load(Ordering::Relaxed);
    let seconds = produce_elapsed.as_secs_f64().max(1e-9);
    let produce_rate = produced as f64 / seconds;
    let produce_mb = produce_rate * args.size as f64 / 1e6;
    let end_to_end_rate = delivered as f64 / total_elapsed.as_secs_f64().max(1e-9);
    let percentiles = |histogram: &Histogram<u64>| {
        json!({
            "count": histogram.len(),
            "p50_us": histogram.value_at_quantile(0.50),
            "p99_us": histogram.value_at_quantile(0.99),
            "p999_us": histogram.value_at_quantile(0.999),
            "max_us": histogram.max(),
        })
    };
    match cli.format {
        Format::Json => println!(
            "{}",
            json!({
                "topic": args.topic,
                "topics": args.topics,
                "producers": args.producers,
                "consumers": args.consumers,
                "size": args.size,
                "acks": args.acks,
                "transaction_size": args.transaction_size,
                "rate_target": args.rate,
                "produced": produced,
                "delivered": delivered,
                "errors": errors,
                "produce_seconds": produce_elapsed.as_secs_f64(),
                "total_seconds": total_elapsed.as_secs_f64(),
                "produce_msgs_per_sec": produce_rate,
                "produce_mb_per_sec": produce_mb,
                "end_to_end_msgs_per_sec": end_to_end_rate,
                "produce_to_ack": percentiles(&produce_latency),
                "produce_to_deliver": percentiles(&deliver_latency),
            })
        ),
        Format::Table => {
            println!(
                "produced {produced} messages of {} bytes in {:.2} s: {:.0} msgs/s, {:.1} MB/s ({errors} errors)",
                args.size,
                produce_elapsed.as_secs_f64(),
                produce_rate,
                produce_mb
            );
            if args.consumers > 0 {
                println!(
                    "delivered {delivered} messages in {:.2} s: {:.0} msgs/s end to end{}",
                    total_elapsed.as_secs_f64(),
                    end_to_end_rate,
                    if args.acks { ", each acked" } else { "" }
                );
                if !args.acks && delivered < produced {
                    eprintln!(
                        "note: without --acks the group stops at its cap of unacked messages \
                         per partition (10,000 by default); add --acks to consume everything"
                    );
                }
            }
            let line = |name: &str, histogram: &Histogram<u64>| {
                println!(
                    "{name:<18} p50 {:>8} µs  p99 {:>8} µs  p99.9 {:>8} µs  max {:>8} µs",
                    histogram.value_at_quantile(0.50),
                    histogram.value_at_quantile(0.99),
                    histogram.value_at_quantile(0.999),
                    histogram.max()
                );
            };
            line("produce→ack", &produce_latency);
            if args.consumers > 0 {
                line("produce→deliver", &deliver_latency);
            }
        }
    }
    if produced == 0 {
        bail!("no message was acknowledged");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn produce(
    (client, options, new_producer_every): (dmq_client::Client, ProducerOptions, Option<u64>),
    (topics, run, seed): (Arc<[String]>, usize, u64),
    payload: Bytes,
    count: Option<u64>,
    deadline: Option<Instant>,
    interval: Option<Duration>,
    window: usize,
    due: Option<SystemTime>,
    counters: Arc<Counters>,
) -> Result<Histogram<u64>> {
    // Delayed to `due`: latency to delivery counts from the due time.
    let due_ns = due.map(|due| {
        due.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    });
    let mut producer = client.producer_with(options.clone());
    let mut latency = histogram()?;
    // Sends in the order they were made, with their start times. One
    // producer's sends complete in order (its batches are answered in
    // order), so the oldest is the one to wait for: a queue needs no
    // allocation or wakeup per message, unlike a `FuturesUnordered`.
    let mut in_flight = VecDeque::with_capacity(window);
    let mut sent = 0u64;
    // A topic chosen at random for each run of `run` messages (one batch).
    let mut random = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut topic = &topics[0];
    let mut next_at = tokio::time::Instant::now();
    let mut first_error: Option<ClientError> = None;
    let mut record = |result: Result<Duration, ClientError>| match result {
        Ok(elapsed) => {
            let _ = latency.record(micros(elapsed));
            counters.acked.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            first_error.get_or_insert(error);
        }
    };
    loop {
        if count.is_some_and(|count| sent >= count)
            || deadline.is_some_and(|deadline| Instant::now() >= deadline)
        {
            break;
        }
        if let Some(interval) = interval {
            next_at += interval;
            if next_at > tokio::time::Instant::now() {
                tokio::time::sleep_until(next_at).await;
            }
        }
        if topics.len() > 1 && sent % run as u64 == 0 {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            topic = &topics[(random % topics.len() as u64) as usize];
        }
        let mut message = Message::new(topic.as_str(), payload.clone()).header(
            SEND_TIME_HEADER,
            Bytes::copy_from_slice(&due_ns.unwrap_or_else(now_ns).to_le_bytes()),
        );
        if let Some(due) = due {
            message = message.deliver_at(due);
        }
        in_flight.push_back((Instant::now(), producer.send(message)));
        sent += 1;
        if new_producer_every.is_some_and(|every| sent % every.max(1) == 0) {
            // Every send of the old producer answered, then a new producer
            // (a new producer id) takes over.
            while let Some((started, send)) = in_flight.pop_front() {
                record(send.await.map(|_| elapsed_since(started)));
            }
            producer = client.producer_with(options.clone());
        }
        // Wait for room before the next send: with fewer than `window`
        // (= the producer's `max_pending_messages`) sends outstanding, a
        // send always finds room and is queued at once, instead of waiting
        // to be polled.
        while in_flight.len() >= window {
            let Some((started, send)) = in_flight.pop_front() else {
                break;
            };
            record(send.await.map(|_| elapsed_since(started)));
        }
        // Record the completions that arrived, without waiting.
        while let Some((started, send)) = in_flight.front_mut() {
            let started = *started;
            match futures_util::FutureExt::now_or_never(send) {
                Some(result) => {
                    in_flight.pop_front();
                    record(result.map(|_| elapsed_since(started)));
                }
                None => break,
            }
        }
    }
    while let Some((started, send)) = in_flight.pop_front() {
        record(send.await.map(|_| elapsed_since(started)));
    }
    if let Some(error) = first_error {
        if counters.acked.load(Ordering::Relaxed) == 0 {
            return Err(error).context("producing");
        }
        eprintln!("warning: some sends failed; the first error: {error}");
    }
    Ok(latency)
}

/// One producer's transactions: `in_flight` loops on one connection, each
/// beginning a transaction of `size` messages (one TXN_PRODUCE), committing
/// it, and starting the next, until the producer's share is sent or the
/// deadline passes.
async fn produce_transactions(
    client: dmq_client::Client,
    topic: String,
    (size, in_flight, leave_open): (usize, usize, bool),
    payload: Bytes,
    (count, deadline): (Option<u64>, Option<Instant>),
    producer: usize,
    counters: Arc<Counters>,
) -> Result<Histogram<u64>> {
    let transactions = count.map(|count| count.div_ceil(size as u64));
    let next = Arc::new(AtomicU64::new(0));
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (client, topic, payload) = (client.clone(), topic.clone(), payload.clone());
        let (next, counters) = (Arc::clone(&next), Arc::clone(&counters));
        loops.spawn(async move {
            let mut latency = histogram()?;
            loop {
                let number = next.fetch_add(1, Ordering::Relaxed);
                if transactions.is_some_and(|total| number >= total)
                    || deadline.is_some_and(|deadline| Instant::now() >= deadline)
                {
                    return Ok::<_, anyhow::Error>(latency);
                }
                let messages = match count {
                    Some(count) => (count - number * size as u64).min(size as u64) as usize,
                    None => size,
                };
                let started = Instant::now();
                let mut txn = client.transaction(format!("bench-{producer}"), format!("t{number}"));
                let batch = (0..messages)
                    .map(|_| {
                        Message::new(topic.as_str(), payload.clone()).header(
                            SEND_TIME_HEADER,
                            Bytes::copy_from_slice(&now_ns().to_le_bytes()),
                        )
                    })
                    .collect();
                let result = match txn.send(batch).await {
                    Ok(_) if leave_open => Ok(()),
                    Ok(_) => txn.commit().await,
                    Err(error) => Err(error),
                };
                match result {
                    Ok(()) => {
                        let elapsed = micros(started.elapsed());
                        for _ in 0..messages {
                            let _ = latency.record(elapsed);
                        }
                        counters.acked.fetch_add(messages as u64, Ordering::Relaxed);
                    }
                    Err(error) => {
                        if counters.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("warning: a transaction failed: {error}");
                        }
                        if counters.acked.load(Ordering::Relaxed) == 0 {
                            return Err(error).context("producing in a transaction");
                        }
                    }
                }
            }
        });
    }
    let mut latency = histogram()?;
    while let Some(done) = loops.join_next().await {
        latency
            .add(&done.context("transaction loop")??)
            .context("merging histograms")?;
    }
    Ok(latency)
}

fn elapsed_since(started: Instant) -> Duration {
    started.elapsed()
}

async fn consume(
    mut subscription: dmq_client::Subscription,
    acks: bool,
    counters: Arc<Counters>,
    mut done: watch::Receiver<Option<u64>>,
    drain_timeout: Duration,
) -> Result<Histogram<u64>> {
    let mut latency = histogram()?;
    let mut all_delivered = counters.all_delivered.subscribe();
    // The drain timeout runs from the last message. One timer, pushed
    // back only when it fires early, rather than a timer per message
    // (registering and clearing one per message cost the load tool
    // several per cent of its time).
    let drain = tokio::time::sleep(drain_timeout);
    tokio::pin!(drain);
    let mut last_message = tokio::time::Instant::now();
    loop {
        let target = *done.borrow();
        if let Some(target) = target {
            if counters.delivered.load(Ordering::Relaxed) >= target {
                counters.all_delivered.send_replace(true);
                break;
            }
        }
        if *all_delivered.borrow_and_update() {
            break;
        }
        let message = tokio::select! {
            message = subscription.recv() => message,
            _ = done.changed(), if target.is_none() => {
                // The producers are done: the drain timeout starts now.
                last_message = tokio::time::Instant::now();
                drain.as_mut().reset(last_message + drain_timeout);
                continue;
            }
            _ = all_delivered.changed() => continue,
            _ = &mut drain, if target.is_some() => {
                let quiet_until = last_message + drain_timeout;
                if tokio::time::Instant::now() >= quiet_until {
                    break;
                }
                drain.as_mut().reset(quiet_until);
                continue;
            }
        };
        last_message = tokio::time::Instant::now();
        let Some(message) = message else {
            break;
        };
        let message = message.context("bench subscription failed")?;
        if let Some(sent) = message.header(SEND_TIME_HEADER.as_bytes()) {
            if let Ok(bytes) = <[u8; 8]>::try_from(sent.as_ref()) {
                let sent_ns = u64::from_le_bytes(bytes);
                let elapsed = Duration::from_nanos(now_ns().saturating_sub(sent_ns));
                let _ = latency.record(micros(elapsed));
            }
        }
        let delivered = counters.delivered.fetch_add(1, Ordering::Relaxed) + 1;
        if acks {
            // Queued at once and batched; confirmation is not awaited.
            drop(message.ack());
        }
        if done.borrow().is_some_and(|target| delivered >= target) {
            counters.all_delivered.send_replace(true);
        }
    }
    // Acks made are sent before leaving (nothing acked is redelivered to
    // the others, which would count twice).
    subscription
        .unsubscribe()
        .await
        .context("leaving the bench group")?;
    Ok(latency)
}
