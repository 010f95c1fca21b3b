//! Publish-to-result latency through a running slmd, measured by a real MQTT
//! client: `cargo run --release --example e2e_latency -- PORT [N] [TOPIC]
//! [RESULT_FILTER] [serial|burst]`.
//!
//! - `serial` (default): one message at a time, each waiting for its result:
//!   the latency a single speaker sees, not queueing.
//! - `burst`: all N published at once; prints the throughput (results per
//!   second from the first publish to the last result) and latencies that
//!   include queueing.

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
    let burst = args.get(5).is_some_and(|m| m == "burst");

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
    // Ids unique per run: the daemon skips an id it has already processed.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let ids: Vec<String> = (0..n).map(|i| format!("lat-{run}-{i}")).collect();
    // Never waits on the request channel: this one task also polls the
    // event loop that drains it (a full channel is polled first).
    let publish = |i: usize| {
        let payload = serde_json::json!({"id": ids[i], "text": TEXTS[i % TEXTS.len()]}).to_string();
        client
            .try_publish(&topic, QoS::AtLeastOnce, false, payload)
            .is_ok()
    };
    let started = Instant::now();
    let mut sent = vec![started; n];
    let mut latencies = Vec::with_capacity(n);
    let mut next = 0;
    while latencies.len() < n {
        // Serial: the next message once the last result is in. Burst: all.
        while next < n && (burst || next == latencies.len()) {
            sent[next] = Instant::now();
            if !publish(next) {
                break;
            }
            next += 1;
        }
        match tokio::time::timeout(Duration::from_secs(60), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                if let Some(i) = ids.iter().position(|id| v["id"] == id.as_str()) {
                    latencies.push(sent[i].elapsed().as_secs_f64() * 1000.0);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("broker: {e}"),
            Err(_) => panic!("no result within 60 s ({} of {n} in)", latencies.len()),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "mode={} n={} msgs_per_s={:.0} p50_ms={:.1} p95_ms={:.1} max_ms={:.1}",
        if burst { "burst" } else { "serial" },
        latencies.len(),
        n as f64 / elapsed,
        pct(0.50),
        pct(0.95),
        latencies[latencies.len() - 1]
    );
}
