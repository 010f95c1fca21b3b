//! The broker link: one task polls rumqttc's event loop (receive, persist,
//! acknowledge; match PUBACKs to outbox entries), one publishes the outbox.
//!
//! slmd speaks MQTT 5 (mosquitto since 1.6, EMQX, HiveMQ, VerneMQ, NanoMQ
//! and the cloud brokers all do): a request's response topic and correlation
//! data are kept with it in the inbox, and the session outlives a
//! disconnection for `broker.session_expiry_secs`. Clients of any protocol
//! version can publish to slmd and read its results; the broker translates.
//! TLS (CA file, optional client certificate) uses rustls with *ring*.
//!
//! # Presence
//!
//! On every connection slmd publishes a retained `{"state": "online"}` to
//! `broker.status_topic` (QoS 0: the next connection says it again), and
//! leaves a retained Last Will `{"state": "offline"}` that the broker
//! publishes when the connection ends without a DISCONNECT: a crash, a
//! power cut, a network loss, or a normal stop (slmd never disconnects
//! politely, so consumers always hear it leave).
//!
//! # Receive path
//!
//! Subscriptions are QoS 1 with manual acks and a persistent session, so the
//! broker keeps what we have not acknowledged (at most `max_inflight`
//! unacknowledged at a time: our receive maximum). Each PUBLISH is appended to the
//! inbox; when the event loop has no more buffered events (the end of a
//! burst), the inbox is flushed once and the PUBACKs of the whole burst are
//! queued, in receive order, on the event loop's own pending queue (from the
//! polling task itself, so it can never wait on a full channel: no deadlock).
//!
//! # Quota
//!
//! While the store holds more than its quota, incoming messages are neither
//! stored nor acknowledged: the broker keeps them (and, its in-flight window
//! full, stops sending). Once the store is below 90% of the quota the link
//! reconnects, and the resumed session redelivers them. Nothing is dropped.
//!
//! # Send path
//!
//! Our outbox, not rumqttc's in-memory state, is the record of what still
//! has to reach the broker. The publisher sends up to `max_inflight` outbox
//! entries; the polling task learns each one's packet id from the
//! `Outgoing::Publish(pkid)` events, which come in send order, and deletes
//! the entry on its PUBACK. When the connection drops, rumqttc's own copies
//! (retransmits and requests it drained from its channel) are removed and
//! those entries become unsent again, to be published anew after reconnect:
//! at-least-once, never lost, and one place that decides. Each batch is
//! read from the outbox and then the store is flushed before it is
//! published, so no published result can be undone by a crash.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    Filter, LastWill, PubAck, PubAckReason, Publish, PublishProperties, Subscribe,
    SubscribeReasonCode, Unsubscribe,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Request};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::store::{now_ms, InboxEntry, Reply, Store};

/// A TLS or password file named in the config could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct TlsFileError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Where to connect, from the config or `--broker mqtt://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for BrokerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("mqtt://")
            .or_else(|| s.strip_prefix("tcp://"))
            .unwrap_or(s);
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected mqtt://HOST:PORT"))?;
        let port = port
            .trim_end_matches('/')
            .parse()
            .map_err(|_| format!("{s:?}: bad port"))?;
        if host.is_empty() {
            return Err(format!("{s:?}: empty host"));
        }
        Ok(BrokerAddr {
            host: host.to_owned(),
            port,
        })
    }
}

/// Which outbox entries are on their way to the broker.
#[derive(Default)]
struct Tracker {
    /// Sent to rumqttc, packet id not yet known, in send order.
    unassigned: VecDeque<u64>,
    /// Sent on the wire, waiting for PUBACK.
    by_pkid: HashMap<u16, u64>,
    /// Keys in either of the above.
    inflight: HashSet<u64>,
    connected: bool,
}

impl Tracker {
    fn reset_after_disconnect(&mut self, eventloop: &mut EventLoop) {
        let mut lost = 0;
        eventloop.pending.retain(|r| match r {
            // An outbox entry not yet sent (QoS 0 is the presence message,
            // which the next connection sends again).
            Request::Publish(p) => {
                lost += usize::from(p.qos == QoS::AtLeastOnce && p.pkid == 0);
                false
            }
            // Acks belong to the dead connection; the broker redelivers.
            Request::PubAck(_) => false,
            _ => true,
        });
        // Events still buffered from the dead connection: received messages
        // were not acknowledged (redelivered), sent ones are resent.
        lost += eventloop
            .state
            .events
            .iter()
            .filter(|e| matches!(e, Event::Outgoing(Outgoing::Publish(pkid)) if *pkid != 0))
            .count();
        eventloop.state.events.clear();
        for _ in 0..lost {
            if let Some(k) = self.unassigned.pop_front() {
                self.inflight.remove(&k);
            }
        }
        for (_, k) in self.by_pkid.drain() {
            self.inflight.remove(&k);
        }
        self.connected = false;
    }
}

/// Shared by the two tasks of a link.
pub struct Link {
    client: AsyncClient,
    tracker: Mutex<Tracker>,
    store: Store,
    max_inflight: usize,
    /// Store bytes above which input is held at the broker.
    quota: u64,
    /// Input is being held because the store is over its quota.
    holding: AtomicBool,
    /// Woken when the outbox has something new or room to send.
    pub publisher_wake: Notify,
}

pub fn options(config: &Config, addr: &BrokerAddr) -> Result<MqttOptions, TlsFileError> {
    let cfg = &config.broker;
    let mut o = MqttOptions::new(cfg.client_id.clone(), addr.host.clone(), addr.port);
    o.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs.max(5)))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(cfg.session_expiry_secs))
        .set_manual_acks(true)
        .set_outgoing_inflight_upper_limit(cfg.max_inflight)
        .set_receive_maximum(Some(cfg.max_inflight))
        .set_max_packet_size(Some(1 << 20))
        .set_last_will(LastWill::new(
            cfg.status_topic(),
            presence("offline"),
            QoS::AtLeastOnce,
            true,
            None,
        ));
    if let Some(u) = &cfg.username {
        let password = config
            .broker_password()
            .map_err(|(path, source)| TlsFileError { path, source })?;
        o.set_credentials(u.clone(), password.unwrap_or_default());
    }
    if let Some(tls) = &cfg.tls {
        let read = |p: &Path| {
            let path = config.resolve(p);
            std::fs::read(&path).map_err(|source| TlsFileError { path, source })
        };
        let client_auth = match (&tls.client_cert, &tls.client_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        // The one crypto provider built in; rustls needs it named once.
        let _ = rustls::crypto::ring::default_provider().install_default();
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: read(&tls.ca_file)?,
            alpn: None,
            client_auth,
        }));
    }
    Ok(o)
}

impl Link {
    pub fn new(mut opts: MqttOptions, store: Store, quota: u64) -> (Arc<Link>, EventLoop) {
        let max_inflight = opts.get_outgoing_inflight_upper_limit().unwrap_or(32) as usize;
        // Small packets (a PUBACK, then a result) must not wait for the
        // broker's delayed TCP ACK: with Nagle's algorithm on, each result
        // sat about 40 ms in the socket (e2e p50 91.9 ms vs 40 ms inference).
        let mut net = opts.network_options();
        net.set_tcp_nodelay(true);
        opts.set_network_options(net);
        // Room for every publish we may have outstanding plus the subscribe.
        let (client, eventloop) = AsyncClient::new(opts, max_inflight + 8);
        let link = Link {
            client,
            tracker: Mutex::new(Tracker::default()),
            store,
            max_inflight,
            quota,
            holding: AtomicBool::new(false),
            publisher_wake: Notify::new(),
        };
        (Arc::new(link), eventloop)
    }

    /// Polls the event loop until shutdown: receives into the inbox, acks,
    /// tracks publishes, reconnects with backoff.
    pub async fn run_receiver(
        self: Arc<Self>,
        mut eventloop: EventLoop,
        mut filters: watch::Receiver<Vec<String>>,
        max_backoff: Duration,
        inbox_wake: Arc<Notify>,
        beat: Arc<crate::notify::Heartbeat>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let addr = {
            let (h, p) = eventloop.options.broker_address();
            format!("{h}:{p}")
        };
        let status_topic = eventloop
            .options
            .last_will()
            .map(|w| String::from_utf8_lossy(&w.topic).into_owned())
            .unwrap_or_default();
        let mut backoff = Duration::from_millis(200);
        let mut to_ack: Vec<u16> = Vec::new();
        let mut subscribed = filters.borrow().clone();
        // Wakes an idle loop, so its heartbeat shows it is not stuck.
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            beat.beat();
            let holding = self.holding.load(Ordering::Relaxed);
            let event = tokio::select! {
                ev = eventloop.poll() => ev,
                _ = tick.tick() => {
                    if holding && self.store.bytes() < self.quota / 10 * 9 {
                        log::info!(
                            "store below 90% of its quota again: reconnecting so the broker \
                             redelivers what it held"
                        );
                        self.holding.store(false, Ordering::Relaxed);
                        eventloop.clean();
                        self.tracker.lock().unwrap().reset_after_disconnect(&mut eventloop);
                    }
                    continue;
                }
                Ok(()) = filters.changed() => {
                    let (now, before) = (filters.borrow_and_update().clone(), subscribed.clone());
                    self.resubscribe(&mut eventloop, &before, &now);
                    subscribed = now;
                    continue;
                }
                _ = shutdown.changed() => break,
            };
            match event {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    backoff = Duration::from_millis(200);
                    log::info!(
                        "connected to broker {addr} (session present: {})",
                        ack.session_present
                    );
                    subscribe(&mut eventloop, &filters.borrow());
                    let mut online =
                        Publish::new(&status_topic, QoS::AtMostOnce, presence("online"), None);
                    online.retain = true;
                    eventloop.pending.push_back(Request::Publish(online));
                    self.tracker.lock().unwrap().connected = true;
                    self.publisher_wake.notify_one();
                }
                Ok(Event::Incoming(Incoming::Publish(_)))
                    if holding || self.store.bytes() >= self.quota =>
                {
                    // Neither stored nor acknowledged: redelivered later.
                    if !holding {
                        log::warn!(
                            "store quota of {} bytes reached: not acknowledging new messages \
                             (the broker keeps them) until results drain",
                            self.quota
                        );
                        self.holding.store(true, Ordering::Relaxed);
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let (qos, pkid) = (p.qos, p.pkid);
                    let entry = inbox_entry(p);
                    match self.store.append_inbox(&entry) {
                        Ok(_) if qos != QoS::AtMostOnce => to_ack.push(pkid),
                        Ok(_) => {}
                        // Not acknowledged: the broker keeps it and redelivers.
                        Err(e) => log::error!("cannot store message from {}: {e}", entry.topic),
                    }
                }
                Ok(Event::Incoming(Incoming::PubAck(ack))) => self.acked(&ack),
                Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                    let mut granted = 0;
                    let filters = filters.borrow().clone();
                    for (f, code) in filters.iter().zip(&ack.return_codes) {
                        if matches!(code, SubscribeReasonCode::Success(_)) {
                            granted += 1;
                        } else {
                            log::error!("broker {addr} refused the subscription to {f}: {code:?}");
                        }
                    }
                    log::info!(
                        "subscribed to {granted} of {} topic filter(s)",
                        filters.len()
                    );
                }
                // Our outbox entries are QoS 1; pkid 0 is the presence message.
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                    let mut t = self.tracker.lock().unwrap();
                    if let Some(k) = t.unassigned.pop_front() {
                        t.by_pkid.insert(pkid, k);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // Whatever was received but not yet flushed is not acked:
                    // the broker redelivers it. Flush what we have anyway.
                    to_ack.clear();
                    let _ = self.store.flush().await;
                    self.tracker
                        .lock()
                        .unwrap()
                        .reset_after_disconnect(&mut eventloop);
                    log::warn!("broker {addr}: {e}; retrying in {} ms", backoff.as_millis());
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => break,
                    }
                    backoff = (backoff * 2).min(max_backoff);
                    continue;
                }
            }
            if !to_ack.is_empty() && (eventloop.state.events.is_empty() || to_ack.len() >= 256) {
                match self.store.flush().await {
                    Ok(()) => {
                        for pkid in to_ack.drain(..) {
                            eventloop
                                .pending
                                .push_back(Request::PubAck(PubAck::new(pkid, None)));
                        }
                        inbox_wake.notify_one();
                    }
                    Err(e) => {
                        log::error!("cannot flush the inbox: {e}; messages stay unacknowledged");
                        to_ack.clear();
                    }
                }
            }
        }
        if !to_ack.is_empty() {
            let _ = self.store.flush().await;
        }
    }

    /// After a reload: subscribes to the new filter list and drops what
    /// left it. When disconnected, the next CONNACK subscribes to the new
    /// list anyway.
    fn resubscribe(&self, eventloop: &mut EventLoop, before: &[String], now: &[String]) {
        if !self.tracker.lock().unwrap().connected {
            return;
        }
        subscribe(eventloop, now);
        for gone in before.iter().filter(|f| !now.contains(f)) {
            log::info!("unsubscribing from {gone} (no task consumes it any more)");
            eventloop
                .pending
                .push_back(Request::Unsubscribe(Unsubscribe::new(gone.clone(), None)));
        }
    }

    fn acked(&self, ack: &PubAck) {
        let key = self.tracker.lock().unwrap().by_pkid.remove(&ack.pkid);
        if let Some(k) = key {
            if !matches!(
                ack.reason,
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers
            ) {
                // Sending it again would be refused again (an ACL, say).
                log::error!(
                    "the broker refused result {k} ({:?}); it is dropped",
                    ack.reason
                );
            }
            if let Err(e) = self.store.outbox_remove(k) {
                log::error!("cannot remove published result {k} from the outbox: {e}");
            }
            // Only now: the publisher sends whatever is in the outbox and not
            // in flight, so leaving flight first would send this one again.
            self.tracker.lock().unwrap().inflight.remove(&k);
            self.publisher_wake.notify_one();
        }
    }

    /// Publishes outbox entries, at most `max_inflight` unacknowledged.
    pub async fn run_publisher(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.publisher_wake.notified() => {}
                // A slow safety net: never rely on a wake-up alone.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => break,
            }
            if let Err(e) = self.publish_some().await {
                log::error!("cannot read the outbox: {e}");
            }
        }
    }

    /// Whether the link is connected and whether input is being held.
    pub fn state(&self) -> (bool, bool) {
        let connected = self.tracker.lock().unwrap().connected;
        (connected, self.holding.load(Ordering::Relaxed))
    }

    async fn publish_some(&self) -> Result<(), crate::store::StoreError> {
        let batch = {
            let t = self.tracker.lock().unwrap();
            if !t.connected || t.inflight.len() >= self.max_inflight {
                return Ok(());
            }
            let room = self.max_inflight - t.inflight.len();
            self.store
                .outbox_pending(room, |k| t.inflight.contains(&k))?
        };
        if batch.is_empty() {
            return Ok(());
        }
        // Read, then flush: every entry read was written before the flush
        // began, so it is durable when the flush returns. (Flushing first
        // would let results completed during the flush out undurable, and a
        // crash then would have them processed again.) Only this task adds
        // to `inflight`, so the batch is still unsent.
        self.store.flush().await?;
        let mut t = self.tracker.lock().unwrap();
        if !t.connected {
            return Ok(());
        }
        for (key, entry) in batch {
            // Under the tracker lock, so send order is `unassigned` order.
            let properties = PublishProperties {
                correlation_data: entry.correlation.map(Into::into),
                ..Default::default()
            };
            match self.client.try_publish_with_properties(
                entry.topic,
                QoS::AtLeastOnce,
                entry.retain,
                entry.payload,
                properties,
            ) {
                Ok(()) => {
                    t.unassigned.push_back(key);
                    t.inflight.insert(key);
                }
                Err(_) => break,
            }
        }
        Ok(())
    }
}

/// Queues one SUBSCRIBE (QoS 1) for all of `filters`.
fn subscribe(eventloop: &mut EventLoop, filters: &[String]) {
    let subs = filters
        .iter()
        .map(|f| Filter::new(f.clone(), QoS::AtLeastOnce));
    eventloop
        .pending
        .push_back(Request::Subscribe(Subscribe::new_many(subs, None)));
}

/// The payload of the status topic.
fn presence(state: &str) -> Vec<u8> {
    serde_json::json!({"state": state, "version": env!("CARGO_PKG_VERSION")})
        .to_string()
        .into_bytes()
}

/// What the inbox keeps of a received PUBLISH.
fn inbox_entry(p: Publish) -> InboxEntry {
    let reply = p.properties.and_then(|props| {
        Some(Reply {
            topic: props.response_topic?,
            correlation: props.correlation_data.map(|c| c.to_vec()),
        })
    });
    InboxEntry {
        received_ms: now_ms(),
        dup: p.dup,
        reply,
        // MQTT requires UTF-8 topics; a broker that let another through
        // gets the name stored lossily rather than the message dropped.
        topic: String::from_utf8_lossy(&p.topic).into_owned(),
        payload: p.payload.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_parse() {
        let a: BrokerAddr = "mqtt://127.0.0.1:1884".parse().unwrap();
        assert_eq!(
            a,
            BrokerAddr {
                host: "127.0.0.1".into(),
                port: 1884
            }
        );
        assert_eq!("localhost:1883".parse::<BrokerAddr>().unwrap().port, 1883);
        assert!("mqtt://host".parse::<BrokerAddr>().is_err());
        assert!("mqtt://:1883".parse::<BrokerAddr>().is_err());
    }
}
