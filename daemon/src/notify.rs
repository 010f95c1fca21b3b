//! systemd's notify protocol (`sd_notify(3)`): one datagram per state
//! change to the socket named by `$NOTIFY_SOCKET`, written directly (the
//! protocol is a line of `KEY=value` pairs; no crate needed).
//!
//! slmd says `READY=1` once its store is open and its model loaded (not
//! waiting for the broker: it works offline), `STATUS=` lines that say what
//! it is doing, `EXTEND_TIMEOUT_USEC=` while a model loads, `STOPPING=1` on
//! shutdown, and `WATCHDOG=1` only while both the inference thread and the
//! MQTT loop make progress: [`Watchdog`] checks both before each ping, so a
//! stuck engine gets the service restarted by systemd.
//!
//! Outside systemd (no `$NOTIFY_SOCKET`) every call is a no-op.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use slmd_link::Heartbeat;

/// A handle on `$NOTIFY_SOCKET`; cheap to share.
#[derive(Clone)]
pub struct Notifier {
    socket: Option<Arc<(UnixDatagram, SocketAddr)>>,
}

impl Notifier {
    /// From the environment systemd gives a `Type=notify` service.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let addr = match path.strip_prefix('@') {
                // An abstract socket (Linux): the name without the '@'.
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    SocketAddr::from_abstract_name(name.as_bytes())
                }
                None => SocketAddr::from_pathname(&path),
            };
            match (UnixDatagram::unbound(), addr) {
                (Ok(sock), Ok(addr)) => Some(Arc::new((sock, addr))),
                (Err(e), _) | (_, Err(e)) => {
                    log::warn!("NOTIFY_SOCKET={path}: {e}; not notifying systemd");
                    None
                }
            }
        });
        Notifier { socket }
    }

    /// Sends `state` (newline-separated `KEY=value` pairs); errors are
    /// logged, never fatal: systemd being gone must not stop the daemon.
    pub fn send(&self, state: &str) {
        if let Some(s) = &self.socket {
            let (sock, addr) = &**s;
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                log::debug!("cannot notify systemd ({state:?}): {e}");
            }
        }
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// The watchdog interval systemd expects pings within, if it set one
    /// for this process.
    pub fn watchdog_interval() -> Option<Duration> {
        if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
            if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
                return None;
            }
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec))
    }
}

/// Pings systemd's watchdog at half its interval, each time only after the
/// engine answered a ping and the MQTT loop beat within the interval.
pub struct Watchdog {
    pub notifier: Notifier,
    pub interval: Duration,
    /// Its current engine is pinged (it changes with reloads and updates).
    pub router: std::sync::Arc<crate::router::Router>,
    pub mqtt: Arc<Heartbeat>,
}

impl Watchdog {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let period = self.interval / 2;
        let mut healthy = true;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
            let engine = tokio::time::timeout(period, self.router.routing().engine.ping()).await;
            let problem = match engine {
                Err(_) => Some(format!(
                    "the inference thread has not answered for {} ms",
                    period.as_millis()
                )),
                Ok(Err(e)) => Some(format!("the inference thread is gone: {e}")),
                Ok(Ok(())) if self.mqtt.age() > self.interval => Some(format!(
                    "the MQTT loop has not run for {} ms",
                    self.mqtt.age().as_millis()
                )),
                Ok(Ok(())) => None,
            };
            match problem {
                None => {
                    if !healthy {
                        log::info!("watchdog: inference and MQTT loops are running again");
                    }
                    healthy = true;
                    self.notifier.send("WATCHDOG=1");
                }
                Some(why) => {
                    if healthy {
                        log::error!("watchdog: {why}; no longer telling systemd we are alive");
                    }
                    healthy = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_the_socket_and_no_socket_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: Some(Arc::new((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            ))),
        };
        n.send("READY=1");
        n.status("loading model");
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STATUS=loading model");
        Notifier { socket: None }.send("READY=1");
    }

    #[test]
    fn a_heartbeat_ages_from_its_last_beat() {
        let h = Heartbeat::default();
        assert!(h.age() > Duration::from_secs(3600), "never beaten");
        h.beat();
        assert!(h.age() < Duration::from_secs(5));
    }
}
