//! Produces ten messages to topic `demo` on a broker at 127.0.0.1:7070
//! (creating the topic if needed) and prints where each was stored.
//!
//! `cargo run -p dmq-client --example produce`

use std::time::Duration;

use dmq_client::{Client, ClientOptions, ErrorCode, Message};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::connect("127.0.0.1:7070", ClientOptions::new("example-producer")).await?;
    match client.create_topic("demo", 2, false).await {
        Err(error) if error.code() != Some(ErrorCode::TopicExists) => return Err(error.into()),
        _ => {}
    }
    let producer = client.producer();
    // Queue all ten first (they are batched together), then wait for acks.
    let sends: Vec<_> = (0..10)
        .map(|i| {
            let message = Message::new("demo", format!("hello {i}"))
                .key(format!("key-{}", i % 3))
                .header("source", "example");
            producer.send(message)
        })
        .collect();
    for send in sends {
        let receipt = send.await?;
        println!(
            "partition {} offset {:?} id {}",
            receipt.partition, receipt.offset, receipt.id
        );
    }
    let delayed = producer
        .send(Message::new("demo", "see you in 2 s").delay(Duration::from_secs(2)))
        .await?;
    println!(
        "delayed message {} due at {:?}",
        delayed.id, delayed.deliver_at
    );
    Ok(())
}
