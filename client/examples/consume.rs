//! Consumes topic `demo` as group `example` from a broker at
//! 127.0.0.1:7070, printing and acking each message; stops after 10 s
//! without a message.
//!
//! `cargo run -p dmq-client --example consume`

use std::time::Duration;

use dmq_client::{Client, ClientOptions, Start, SubscribeOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::connect("127.0.0.1:7070", ClientOptions::new("example-consumer")).await?;
    let options = SubscribeOptions {
        start: Start::Earliest,
        ..SubscribeOptions::default()
    };
    let mut subscription = client
        .consumer()
        .subscribe("demo", "example", options)
        .await?;
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_secs(10), subscription.recv()).await
    {
        let message = message?;
        println!(
            "{}:{} attempt {} {}",
            message.partition,
            message.offset,
            message.attempt,
            String::from_utf8_lossy(&message.value)
        );
        message.ack().await?;
    }
    Ok(())
}
