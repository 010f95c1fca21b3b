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
//! What to acknowledge, hold, send and forget is decided by [`delivery`],
//! a state machine with no I/O and its own unit tests; this module is the
//! rumqttc adapter around it: it polls, stores, flushes and publishes as
//! told.
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
//! QoS 0 messages are stored, flushed and handed to the router the same
//! way, only not acknowledged; if slmd dies before their flush they are
//! gone, as at-most-once means.
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

use std::path::{Path, PathBuf};
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

pub mod config;
mod delivery;
mod heartbeat;

pub use config::BrokerConfig;
use delivery::{Delivery, Flushed, Grant, Hold, Receive, Room, Sent};
pub use heartbeat::Heartbeat;
use slmd_core::now_ms;
use slmd_store::{InboxEntry, Reply, Store};

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

/// Results rumqttc had taken but will never report a packet id for, once
/// the connection is gone; their requests and the dead connection's
/// buffered events are dropped (received messages were not acknowledged:
/// the broker redelivers them; sent ones are sent anew from the outbox).
fn drop_dead_connection(eventloop: &mut EventLoop) -> usize {
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
    lost += eventloop
        .state
        .events
        .iter()
        .filter(|e| matches!(e, Event::Outgoing(Outgoing::Publish(pkid)) if *pkid != 0))
        .count();
    eventloop.state.events.clear();
    lost
}

/// Shared by the two tasks of a link.
pub struct Link {
    client: AsyncClient,
    delivery: Mutex<Delivery>,
    store: Store,
    intake: Intake,
    /// Woken when the outbox has something new or room to send.
    pub publisher_wake: Notify,
}

/// What the receiver takes in.
pub struct Intake {
    /// Store bytes above which input is held at the broker.
    pub quota: u64,
    /// Payload bytes kept of a task's message; a larger one is stored cut,
    /// to be answered `too_large`.
    pub max_payload: usize,
    /// Topics whose messages are kept whole whatever their size (model
    /// control and entity injection, which bound their own requests).
    pub whole: Vec<String>,
}

impl Intake {
    /// The payload bytes kept of a message on `topic`.
    fn keeps(&self, topic: &[u8]) -> usize {
        if self.whole.iter().any(|t| t.as_bytes() == topic) {
            usize::MAX
        } else {
            self.max_payload
        }
    }
}

/// The connection's options. Files the section names are relative to
/// `base_dir` (the config file's directory); `max_packet_bytes` is the
/// largest packet slmd accepts (MQTT 5 Maximum Packet Size).
pub fn options(
    cfg: &BrokerConfig,
    base_dir: &Path,
    max_packet_bytes: u32,
    addr: &BrokerAddr,
) -> Result<MqttOptions, TlsFileError> {
    let mut o = MqttOptions::new(cfg.client_id.clone(), addr.host.clone(), addr.port);
    o.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs.max(5)))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(cfg.session_expiry_secs))
        .set_manual_acks(true)
        .set_outgoing_inflight_upper_limit(cfg.max_inflight)
        .set_receive_maximum(Some(cfg.max_inflight))
        .set_max_packet_size(Some(max_packet_bytes))
        .set_last_will(LastWill::new(
            cfg.status_topic(),
            presence("offline"),
            QoS::AtLeastOnce,
            true,
            None,
        ));
    if let Some(u) = &cfg.username {
        let password = cfg
            .password(base_dir)
            .map_err(|(path, source)| TlsFileError { path, source })?;
        o.set_credentials(u.clone(), password.unwrap_or_default());
    }
    if let Some(tls) = &cfg.tls {
        let read = |p: &Path| {
            let path = base_dir.join(p);
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
    pub fn new(mut opts: MqttOptions, store: Store, intake: Intake) -> (Arc<Link>, EventLoop) {
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
            delivery: Mutex::new(Delivery::new(max_inflight)),
            store,
            intake,
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
        beat: Arc<Heartbeat>,
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
        let mut backoff = Backoff::new(max_backoff);
        let mut subscribed = filters.borrow().clone();
        let mut said: Option<String> = None;
        // Wakes an idle loop, so its heartbeat shows it is not stuck.
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            beat.beat();
            // The tick must not cancel a connection attempt half-way (a
            // broker slow to answer CONNECT was never heard from, its
            // refusal never logged): it runs only while connected.
            let connected = self.delivery().connected();
            let event = tokio::select! {
                ev = eventloop.poll() => ev,
                _ = tick.tick(), if connected => {
                    if self.delivery().on_tick(self.room()) {
                        log::info!(
                            "the store takes input again: reconnecting so the broker \
                             redelivers what it held"
                        );
                        eventloop.clean();
                        let lost = drop_dead_connection(&mut eventloop);
                        self.delivery().on_disconnect(lost);
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
                    backoff.connected();
                    said = None;
                    let props = ack.properties.as_ref();
                    let grant = Grant::of(
                        props.and_then(|p| p.max_qos),
                        props.and_then(|p| p.retain_available),
                    );
                    log::info!(
                        "connected to broker {addr} (session present: {})",
                        ack.session_present
                    );
                    if grant != Grant::default() {
                        log::warn!(
                            "broker {addr} grants maximum QoS {:?}, retain {}: results go \
                             out at that QoS{}",
                            grant.qos,
                            if grant.retain {
                                "available"
                            } else {
                                "not available"
                            },
                            if grant.qos == QoS::AtMostOnce {
                                " (at most once: a result lost on the way is not sent again)"
                            } else {
                                ""
                            }
                        );
                    }
                    self.delivery().on_connack(grant);
                    subscribe(&mut eventloop, &filters.borrow());
                    let mut online =
                        Publish::new(&status_topic, QoS::AtMostOnce, presence("online"), None);
                    online.retain = grant.retain;
                    eventloop.pending.push_back(Request::Publish(online));
                    self.publisher_wake.notify_one();
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let receive = self.delivery().on_publish(self.room());
                    match receive {
                        Receive::Store => {
                            let (qos, pkid) = (p.qos, p.pkid);
                            let keep = self.intake.keeps(&p.topic);
                            let entry = inbox_entry(p, keep);
                            match self.store.append_inbox(&entry) {
                                Ok(_) => self.delivery().stored(qos, pkid),
                                // Not acknowledged: the broker redelivers it.
                                Err(e) => {
                                    log::error!("cannot store message from {}: {e}", entry.topic)
                                }
                            }
                        }
                        Receive::Hold(None) => {}
                        Receive::Hold(Some(why)) => self.say_held(why),
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
                Ok(Event::Incoming(Incoming::Disconnect(d))) => {
                    let why = format!(
                        "broker {addr} closed the connection: {:?}{}",
                        d.reason_code,
                        d.properties
                            .and_then(|p| p.reason_string)
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    );
                    log_once(&mut said, why);
                }
                // Our outbox entries are QoS 1; pkid 0 is the presence message.
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                    self.delivery().on_outgoing(pkid);
                }
                Ok(_) => {}
                Err(e) => {
                    let lost = drop_dead_connection(&mut eventloop);
                    let (accepted, fresh) = {
                        let mut d = self.delivery();
                        (d.connected(), d.on_disconnect(lost))
                    };
                    if fresh {
                        // Not acknowledged (the broker redelivers), but
                        // stored: make it durable and let the router see it.
                        let _ = self.store.flush().await;
                        inbox_wake.notify_one();
                    }
                    if let Some(why) = fit_will_to_broker(&mut eventloop.options, &e) {
                        // Not an outage: the same broker, asked what it takes.
                        log::warn!("broker {addr}: {why}");
                        continue;
                    }
                    let wait = backoff.next();
                    log_once(&mut said, connection_error(&addr, &e, accepted));
                    log::debug!("broker {addr}: {e}; retrying in {} ms", wait.as_millis());
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => break,
                    }
                    continue;
                }
            }
            let due = self.delivery().flush_due(eventloop.state.events.len());
            if due {
                let ok = match self.store.flush().await {
                    Ok(()) => true,
                    Err(e) => {
                        if !self.store.failed() {
                            log::error!(
                                "cannot flush the inbox: {e}; messages stay unacknowledged"
                            );
                        }
                        false
                    }
                };
                let flushed = self.delivery().on_flushed(ok);
                match flushed {
                    Flushed::Ack(pkids) => {
                        for pkid in pkids {
                            eventloop
                                .pending
                                .push_back(Request::PubAck(PubAck::new(pkid, None)));
                        }
                        inbox_wake.notify_one();
                    }
                    Flushed::Held => self.say_held(Hold::Store),
                }
            }
        }
        if self.delivery().flush_due(0) {
            let _ = self.store.flush().await;
        }
    }

    fn delivery(&self) -> std::sync::MutexGuard<'_, Delivery> {
        self.delivery.lock().unwrap()
    }

    /// The store's state as it bears on input.
    fn room(&self) -> Room {
        let bytes = self.store.bytes();
        Room {
            over_quota: bytes >= self.intake.quota,
            below_resume: bytes < self.intake.quota / 10 * 9,
            failed: self.store.failed(),
        }
    }

    fn say_held(&self, why: Hold) {
        match why {
            Hold::Store => log::warn!(
                "the store cannot be written ({}): not acknowledging new messages (the broker \
                 keeps them) until it can",
                self.store.failure().unwrap_or_default()
            ),
            Hold::Quota => log::warn!(
                "store quota of {} bytes reached: not acknowledging new messages (the broker \
                 keeps them) until results drain",
                self.intake.quota
            ),
        }
    }

    /// After a reload: subscribes to the new filter list and drops what
    /// left it. When disconnected, the next CONNACK subscribes to the new
    /// list anyway.
    fn resubscribe(&self, eventloop: &mut EventLoop, before: &[String], now: &[String]) {
        if !self.delivery().connected() {
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
        let key = self.delivery().on_puback(ack.pkid);
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
            self.delivery().removed(k);
            self.publisher_wake.notify_one();
        }
    }

    /// Publishes outbox entries, at most `max_inflight` unacknowledged.
    pub async fn run_publisher(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut said = None;
        loop {
            tokio::select! {
                _ = self.publisher_wake.notified() => {}
                // A slow safety net: never rely on a wake-up alone.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => break,
            }
            match self.publish_some().await {
                Ok(()) => said = None,
                // A failed store is reported by its healer.
                Err(_) if self.store.failed() => {}
                Err(e) => log_once(&mut said, format!("cannot read the outbox: {e}")),
            }
        }
    }

    /// Whether the link is connected and whether input is being held.
    pub fn state(&self) -> (bool, bool) {
        let d = self.delivery();
        (d.connected(), d.holding().is_some())
    }

    async fn publish_some(&self) -> Result<(), slmd_store::StoreError> {
        let batch = {
            let d = self.delivery();
            match d.room() {
                0 => return Ok(()),
                room => self.store.outbox_pending(room, |k| d.in_flight(k))?,
            }
        };
        if batch.is_empty() {
            return Ok(());
        }
        // Read, then flush: every entry read was written before the flush
        // began, so it is durable when the flush returns. (Flushing first
        // would let results completed during the flush out undurable, and a
        // crash then would have them processed again.) Only this task adds
        // to what is in flight, so the batch is still unsent.
        self.store.flush().await?;
        let mut done = Vec::new();
        {
            let mut d = self.delivery();
            if !d.connected() {
                return Ok(());
            }
            let grant = d.grant();
            for (key, entry) in batch {
                // Under the lock, so send order is the order of `sent`.
                let properties = PublishProperties {
                    correlation_data: entry.correlation.map(Into::into),
                    content_type: Some("application/json".into()),
                    payload_format_indicator: Some(1),
                    ..Default::default()
                };
                let handed = self.client.try_publish_with_properties(
                    entry.topic,
                    grant.qos,
                    entry.retain && grant.retain,
                    entry.payload,
                    properties,
                );
                if handed.is_err() {
                    break;
                }
                if d.sent(key) == Sent::Done {
                    done.push(key);
                }
            }
        }
        for key in done {
            self.store.outbox_remove(key)?;
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

/// Reconnect delays: doubling from 200 ms up to the configured cap, with
/// jitter (each wait is 50-100% of the step), and reset only by a
/// connection that lasted: a broker that accepts and then closes at once
/// is not retried at full speed.
struct Backoff {
    step: Duration,
    max: Duration,
    connected_at: Option<std::time::Instant>,
    seed: u64,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    /// A connection up this long was a real one: start again from FIRST.
    const STABLE: Duration = Duration::from_secs(10);

    fn new(max: Duration) -> Backoff {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Backoff {
            step: Backoff::FIRST,
            max: max.max(Backoff::FIRST),
            connected_at: None,
            seed,
        }
    }

    fn connected(&mut self) {
        self.connected_at = Some(std::time::Instant::now());
    }

    /// The wait before the next attempt.
    fn next(&mut self) -> Duration {
        if self
            .connected_at
            .take()
            .is_some_and(|at| at.elapsed() >= Backoff::STABLE)
        {
            self.step = Backoff::FIRST;
        }
        // xorshift64: jitter needs no cryptographic quality.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let share = 0.5 + (self.seed % 1000) as f64 / 2000.0;
        let wait = self.step.mul_f64(share);
        self.step = (self.step * 2).min(self.max);
        wait
    }
}

/// A broker that refuses our CONNECT because of the Last Will's QoS or
/// retain flag (MQTT 5 reason codes 0x9B, 0x9A; mosquitto with `max_qos 0`
/// or `retain_available false`) gets the will it takes: at QoS 0, or not
/// retained. Returns what was changed, or `None` if nothing can be.
fn fit_will_to_broker(
    options: &mut MqttOptions,
    e: &rumqttc::v5::ConnectionError,
) -> Option<String> {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as Code;
    let rumqttc::v5::ConnectionError::ConnectionRefused(code) = e else {
        return None;
    };
    let mut will = options.last_will()?;
    let why = match code {
        Code::QoSNotSupported if will.qos != QoS::AtMostOnce => {
            will.qos = QoS::AtMostOnce;
            "it does not take QoS 1: the Last Will (offline presence) goes at QoS 0, and so do \
             results if the CONNACK grants no more"
        }
        Code::RetainNotSupported if will.retain => {
            will.retain = false;
            "it does not take retained messages: presence and model status go unretained"
        }
        _ => return None,
    };
    options.set_last_will(will);
    Some(why.into())
}

/// Logs `what` as an error unless it is what was said last.
fn log_once(said: &mut Option<String>, what: String) {
    if said.as_deref() != Some(what.as_str()) {
        log::error!("{what}");
        *said = Some(what);
    }
}

/// A connection error, with what to do about it where we know;
/// `accepted`: the broker had accepted the connection (a CONNACK came).
fn connection_error(addr: &str, e: &rumqttc::v5::ConnectionError, accepted: bool) -> String {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as Code;
    use rumqttc::v5::ConnectionError as E;
    if accepted {
        return format!("broker {addr}: connection lost: {e}; reconnecting with backoff");
    }
    let hint = match e {
        E::ConnectionRefused(Code::UnsupportedProtocolVersion) => {
            "; slmd speaks MQTT 5 only: use a broker that does (mosquitto 1.6 or later, EMQX, \
             HiveMQ, VerneMQ, NanoMQ) or put one in front as a bridge"
        }
        E::ConnectionRefused(Code::NotAuthorized | Code::BadUserNamePassword) => {
            "; check broker.username and broker.password, and the broker's ACL"
        }
        E::ConnectionRefused(Code::ClientIdentifierNotValid) => "; check broker.client_id",
        E::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            "; is the broker running, on this host and port?"
        }
        E::Io(_) | E::Timeout(_) | E::MqttState(_) | E::NotConnAck(_) => {
            "; the connection ended before the broker accepted it: check that the broker is \
             reachable and speaks MQTT 5 (slmd needs MQTT 5; a 3.1.1-only broker drops or \
             ignores its CONNECT), and the broker's log for why"
        }
        E::Tls(_) => "; check broker.tls (CA file, certificate names)",
        _ => "",
    };
    format!("broker {addr}: {e}{hint}; retrying with backoff")
}

/// What the inbox keeps of a received PUBLISH: all of it, but for a
/// payload over `max_payload` bytes, of which the first `max_payload` bytes
/// and the size are kept (it is answered `too_large`).
fn inbox_entry(p: Publish, max_payload: usize) -> InboxEntry {
    let reply = p.properties.and_then(|props| {
        Some(Reply {
            topic: props.response_topic?,
            correlation: props.correlation_data.map(|c| c.to_vec()),
        })
    });
    // MQTT requires UTF-8 topics; a broker that let another through
    // gets the name stored lossily rather than the message dropped.
    let topic = String::from_utf8_lossy(&p.topic).into_owned();
    let truncated = (p.payload.len() > max_payload).then(|| {
        let id = slmd_core::ids::id_of(&topic, &p.payload);
        slmd_store::Truncated {
            size: p.payload.len() as u64,
            // An id the size of a payload is no id to store.
            id: if id.len() <= 256 {
                id
            } else {
                slmd_core::ids::derived_id(&topic, &p.payload)
            },
        }
    });
    InboxEntry {
        received_ms: now_ms(),
        dup: p.dup,
        reply,
        topic,
        truncated,
        payload: p.payload[..p.payload.len().min(max_payload)].to_vec(),
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
