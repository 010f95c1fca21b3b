//! Publish-to-result latency through a running slmd, measured by a real MQTT
//! client: `cargo run --release --example e2e_latency -- PORT [N] [TOPIC]
//! [RESULT_FILTER]`. Messages go one at a time (each waits for its result),
//! so the figure is the latency a single speaker sees, not queueing.

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

const TEXTS: &[&str] = &[
    "turn off the kitchen lights",
    "make me a coffee",
    "dim the lights a little",
    "start the vacuum cleaner",
    "set the lights to blue",
    "switch the socket on",
    "lights on please",
    "turn the plug off",
];

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args
        .get(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: e2e_latency PORT [N] [TOPIC] [RESULT_FILTER]");
    let n: usize = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(100);
    let topic = args
        .get(3)
        .cloned()
        .unwrap_or_else(|| "home/bench/command".into());
    let results = args.get(4).cloned().unwrap_or_else(|| "slmd/home/#".into());

    let mut opts = MqttOptions::new(
        format!("e2e-latency-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    // Like the daemon: no Nagle delay on small packets.
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    client.subscribe(&results, QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Ok(Event::Incoming(Incoming::SubAck(_))) = eventloop.poll().await {
            break;
        }
    }
    let mut latencies = Vec::with_capacity(n);
    // Ids unique per run: the daemon skips an id it has already processed.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    for i in 0..n {
        let id = format!("lat-{run}-{i}");
        let text = TEXTS[i % TEXTS.len()];
        let payload = serde_json::json!({"id": id, "text": text}).to_string();
        let sent = Instant::now();
        client
            .publish(&topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&p.payload).unwrap_or_default();
                    if v["id"] == id.as_str() {
                        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                        break;
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("broker: {e}"),
                Err(_) => panic!("no result for {id} within 30 s"),
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "n={} p50_ms={:.1} p95_ms={:.1} max_ms={:.1}",
        latencies.len(),
        pct(0.50),
        pct(0.95),
        latencies[latencies.len() - 1]
    );
}
