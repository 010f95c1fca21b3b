//! The systemd notify protocol against a real datagram socket: READY after
//! the model loads, WATCHDOG pings that stop when the engine stalls, STOPPING
//! on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::util::{write_config, Broker, Client, Daemon};

/// Datagrams received until `until` matches one or `timeout` passes.
fn collect(sock: &UnixDatagram, timeout: Duration, until: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // Whatever is queued is read even when the deadline has passed.
    loop {
        let queued = sock.recv(&mut buf);
        if queued.is_err() && Instant::now() >= deadline {
            break;
        }
        if let Ok(n) = queued {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = until(&msg);
            got.push(msg);
            if done {
                break;
            }
        }
    }
    got
}

fn watchdogs(msgs: &[String]) -> usize {
    msgs.iter().filter(|m| m.contains("WATCHDOG=1")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_watchdog_and_stopping() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), broker.port, "");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let stall = "stall the engine now";
    let mut daemon = Daemon::start_env(
        &config,
        &broker.url(),
        &dir.path().join("slmd.log"),
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
            ("SLMD_FAULT_STALL_ON", stall),
        ],
    );

    // READY only after the model load, which extended the start timeout.
    let start = collect(&sock, Duration::from_secs(180), |m| m.contains("READY=1"));
    let ready = start.iter().position(|m| m.contains("READY=1"));
    let ready = ready.unwrap_or_else(|| panic!("no READY=1: {start:?}\n{}", daemon.log_text()));
    assert!(start[..ready]
        .iter()
        .any(|m| m.contains("EXTEND_TIMEOUT_USEC=")));
    assert!(
        daemon.log_text().contains("loaded from"),
        "the model was loaded first"
    );

    // Healthy: pings at half the 1 s interval, and status lines.
    let healthy = collect(&sock, Duration::from_secs(3), |_| false);
    assert!(watchdogs(&healthy) >= 3, "{healthy:?}");
    assert!(
        healthy
            .iter()
            .any(|m| m.starts_with("STATUS=") && m.contains("inbox 0")),
        "{healthy:?}"
    );

    // A stalled inference thread: the pings stop (systemd would restart us).
    daemon.wait_subscribed().await;
    let client = Client::connect(broker.port, &[]).await;
    client.publish("test/home/x", stall).await;
    daemon
        .wait_for_log("inference thread has not answered", Duration::from_secs(20))
        .await;
    // (A ping sent before the stall was noticed may still be queued.)
    collect(&sock, Duration::from_millis(1), |_| false);
    let stalled = collect(&sock, Duration::from_secs(3), |_| false);
    assert_eq!(watchdogs(&stalled), 0, "{stalled:?}");

    // SIGTERM: STOPPING at once.
    daemon.terminate();
    let stopping = collect(&sock, Duration::from_secs(2), |m| m.contains("STOPPING=1"));
    assert!(
        stopping.iter().any(|m| m.contains("STOPPING=1")),
        "{stopping:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_one_state_directory_is_refused() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), broker.port, "");
    let mut first = Daemon::start(&config, &broker.url());
    first.wait_subscribed().await;
    let mut second = Daemon::start_logged(&config, &broker.url(), &dir.path().join("2.log"));
    let code = second.exit_code(Duration::from_secs(30)).await;
    assert_ne!(code, Some(0));
    let said = second.log_text();
    assert!(said.contains("another slmd (pid "), "{said}");
    assert!(first.is_running(), "the first instance keeps serving");
}
