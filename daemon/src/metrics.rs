//! Prometheus metrics: counters the router updates, gauges read from the
//! store and the link at scrape time, and a minimal HTTP endpoint serving
//! them in the text exposition format (`GET /metrics`). Off unless
//! `[metrics] listen` is set; loopback by default.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use slmd_link::Link;
use slmd_store::Store;

/// Upper bounds (ms) of the inference latency histogram's buckets.
const BUCKETS_MS: [f64; 10] = [
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS_MS.len()],
    count: u64,
    sum_ms: f64,
}

#[derive(Default)]
struct Counters {
    /// Per task.
    results: BTreeMap<String, u64>,
    abstentions: BTreeMap<String, u64>,
    /// Per (task, reason).
    errors: BTreeMap<(String, String), u64>,
    /// Per (task, outcome).
    escalations: BTreeMap<(String, String), u64>,
    duplicates: BTreeMap<String, u64>,
    tokens: BTreeMap<String, u64>,
    latency: BTreeMap<String, Histogram>,
    inference: BTreeMap<String, Histogram>,
}

impl Histogram {
    fn observe(&mut self, ms: f64) {
        for (i, bound) in BUCKETS_MS.iter().enumerate() {
            if ms <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum_ms += ms;
    }
}

/// One committed result, as counted.
pub struct Observed {
    pub recognised: bool,
    /// From receipt to result.
    pub latency_ms: f64,
    /// Of that, on the inference thread.
    pub inference_ms: f64,
    /// Tokens the request put through the model.
    pub tokens: usize,
}

/// Everything counted while the daemon runs.
pub struct Metrics {
    counters: Mutex<Counters>,
    /// Seconds the model load and head training took at start.
    model_load_seconds: f64,
}

impl Metrics {
    pub fn new(model_load_seconds: f64) -> Metrics {
        Metrics {
            counters: Mutex::default(),
            model_load_seconds,
        }
    }

    /// A result was committed.
    pub fn result(&self, task: &str, o: &Observed) {
        let mut c = self.counters.lock().unwrap();
        *c.results.entry(task.to_owned()).or_default() += 1;
        if !o.recognised {
            *c.abstentions.entry(task.to_owned()).or_default() += 1;
        }
        *c.tokens.entry(task.to_owned()).or_default() += o.tokens as u64;
        c.latency
            .entry(task.to_owned())
            .or_default()
            .observe(o.latency_ms);
        c.inference
            .entry(task.to_owned())
            .or_default()
            .observe(o.inference_ms);
    }

    pub fn error(&self, task: &str, reason: &str) {
        let mut c = self.counters.lock().unwrap();
        *c.errors
            .entry((task.to_owned(), reason.to_owned()))
            .or_default() += 1;
    }

    pub fn escalation(&self, task: &str, outcome: &str) {
        let mut c = self.counters.lock().unwrap();
        *c.escalations
            .entry((task.to_owned(), outcome.to_owned()))
            .or_default() += 1;
    }

    pub fn duplicate(&self, task: &str) {
        let mut c = self.counters.lock().unwrap();
        *c.duplicates.entry(task.to_owned()).or_default() += 1;
    }

    /// The exposition text, with the store's and link's state as of now.
    pub fn render(&self, store: &Store, link: &Link) -> String {
        let c = self.counters.lock().unwrap();
        let mut text = String::new();
        head(
            &mut text,
            "results_total",
            "counter",
            "Results committed, per task.",
        );
        let per_task = |text: &mut String, name: &str, map: &BTreeMap<String, u64>| {
            for (task, n) in map {
                let _ = writeln!(text, "slmd_{name}{{task=\"{}\"}} {n}", escape(task));
            }
        };
        per_task(&mut text, "results_total", &c.results);
        head(
            &mut text,
            "abstentions_total",
            "counter",
            "Results not recognised (below the abstain threshold, the reject label won, or unlike the task's examples), per task.",
        );
        per_task(&mut text, "abstentions_total", &c.abstentions);
        head(
            &mut text,
            "duplicates_total",
            "counter",
            "Redeliveries answered from the stored result, per task.",
        );
        per_task(&mut text, "duplicates_total", &c.duplicates);
        head(
            &mut text,
            "errors_total",
            "counter",
            "Error results, per task and reason.",
        );
        let per_pair =
            |text: &mut String, name: &str, key: &str, map: &BTreeMap<(String, String), u64>| {
                for ((task, k), n) in map {
                    let (task, k) = (escape(task), escape(k));
                    let _ = writeln!(text, "slmd_{name}{{task=\"{task}\",{key}=\"{k}\"}} {n}");
                }
            };
        per_pair(&mut text, "errors_total", "reason", &c.errors);
        head(
            &mut text,
            "escalations_total",
            "counter",
            "Doubtful answers sent upstream, per task and outcome (answered, refused, unavailable).",
        );
        per_pair(&mut text, "escalations_total", "outcome", &c.escalations);
        head(
            &mut text,
            "tokens_total",
            "counter",
            "Tokens put through the model (input, scored labels, generated replies), per task.",
        );
        per_task(&mut text, "tokens_total", &c.tokens);
        histogram(
            &mut text,
            "latency_seconds",
            "Receipt to result, per task (inference included).",
            &c.latency,
        );
        histogram(
            &mut text,
            "inference_seconds",
            "Time on the inference thread, per task (waiting for the batch included).",
            &c.inference,
        );
        drop(c);
        let stats = store.stats().unwrap_or_default();
        let (connected, holding) = link.state();
        let gauges: [(&str, &str, f64); 11] = [
            (
                "inbox_messages",
                "Messages stored, not yet processed.",
                stats.inbox as f64,
            ),
            (
                "outbox_messages",
                "Results stored, not yet acknowledged by the broker.",
                stats.outbox as f64,
            ),
            (
                "dead_letters",
                "Messages sent to the dead-letter topic, ever.",
                stats.dead_letters as f64,
            ),
            (
                "store_bytes",
                "Inbox plus outbox bytes (the quota's measure).",
                stats.bytes as f64,
            ),
            (
                "dedup_bytes",
                "Bytes of dedup records (bounded by limits.max_dedup_bytes).",
                stats.dedup_bytes as f64,
            ),
            (
                "store_write_failed",
                "1 while the store cannot be written (a full disk); input is held.",
                f64::from(u8::from(stats.write_failure.is_some())),
            ),
            (
                "broker_connected",
                "1 while connected to the broker.",
                f64::from(u8::from(connected)),
            ),
            (
                "quota_full",
                "1 while input is held at the broker (store over quota).",
                f64::from(u8::from(holding)),
            ),
            (
                "tokens_per_second",
                "Tokens the inference thread put through the model per second busy, since start.",
                slmd_engine::THROUGHPUT.tokens_per_second(),
            ),
            (
                "model_load_seconds",
                "Model load and head training at start.",
                self.model_load_seconds,
            ),
            (
                "resident_memory_bytes",
                "Resident set size of the daemon.",
                rss_bytes(),
            ),
        ];
        for (name, help, value) in gauges {
            head(&mut text, name, "gauge", help);
            let _ = writeln!(text, "slmd_{name} {value}");
        }
        text
    }
}

fn histogram(text: &mut String, name: &str, help: &str, per_task: &BTreeMap<String, Histogram>) {
    head(text, name, "histogram", help);
    for (task, h) in per_task {
        let task = escape(task);
        for (bound, n) in BUCKETS_MS.iter().zip(h.counts) {
            let le = bound / 1000.0;
            let _ = writeln!(
                text,
                "slmd_{name}_bucket{{task=\"{task}\",le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            text,
            "slmd_{name}_bucket{{task=\"{task}\",le=\"+Inf\"}} {}\n\
             slmd_{name}_sum{{task=\"{task}\"}} {}\n\
             slmd_{name}_count{{task=\"{task}\"}} {}",
            h.count,
            h.sum_ms / 1000.0,
            h.count
        );
    }
}

fn head(text: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(text, "# HELP slmd_{name} {help}\n# TYPE slmd_{name} {kind}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// VmRSS from /proc/self/status (Linux); 0 where it cannot be read.
fn rss_bytes() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    kib * 1024.0
}

/// Serves `GET /metrics` until shutdown. One short request per connection.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Store,
    link: Arc<Link>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (mut conn, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("metrics endpoint: {e}");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let (metrics, store, link) = (metrics.clone(), store.clone(), link.clone());
        tokio::spawn(async move {
            // The request line and headers, however they are split into
            // segments (1 KiB and 5 s at most).
            let mut buf = [0u8; 1024];
            let mut n = 0;
            let read = async {
                while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(got) => n += got,
                    }
                }
            };
            if tokio::time::timeout(std::time::Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if request.starts_with("GET ") && path == "/metrics" {
                ("200 OK", metrics.render(&store, &link))
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_owned(),
                )
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
