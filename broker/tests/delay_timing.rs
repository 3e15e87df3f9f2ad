//! A delayed message arrives no earlier than due and within 100 ms after,
//! through a real broker and the real client. Alone in its own test binary
//! so that no other test loads the broker while it is timed.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use dmq_client::Message;

mod common;
use common::{client, next, options, Broker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_arrives_on_time() {
    let broker = Broker::start(|_| {}).await;
    let client = client(&broker).await;
    client.create_topic("reminders", 1, false).await.unwrap();
    let mut subscription = client
        .consumer()
        .subscribe("reminders", "g", options("m"))
        .await
        .unwrap();
    let sent = Instant::now();
    let receipt = client
        .producer()
        .send(Message::new("reminders", "pay").delay(Duration::from_secs(2)))
        .await
        .unwrap();
    assert_eq!(receipt.offset, None, "waits in the delay store");
    let message = next(&mut subscription, Duration::from_secs(10))
        .await
        .unwrap();
    let elapsed = sent.elapsed();
    assert_eq!(message.id, receipt.id);
    eprintln!(
        "delayed message arrived {:?} after the send (due after 2 s)",
        elapsed
    );
    assert!(elapsed >= Duration::from_millis(2000), "early: {elapsed:?}");
    assert!(elapsed <= Duration::from_millis(2100), "late: {elapsed:?}");
    broker.stop().await;
}
