//! The broker link's delivery logic, with no I/O: the adapter in
//! [`super`] feeds it what rumqttc and the store report, and does what it
//! answers (store, flush, acknowledge, hold, reconnect, publish, forget).
//!
//! Receive side: a stored message, of any QoS, is *fresh* until a flush
//! makes it durable; a burst ends ([`Delivery::flush_due`]) when rumqttc
//! has no more events buffered; after the flush the burst's QoS 1
//! messages are acknowledged and the router is woken (QoS 0 ones need the
//! wake-up as much as the others). Input is *held* (neither stored nor
//! acknowledged, so the broker keeps it) while the store is over its quota
//! or cannot be written; once it can take input again the link reconnects
//! so the broker redelivers what it held.
//!
//! Send side: our outbox is the record of what must reach the broker. A
//! result handed to rumqttc is *unassigned* until rumqttc reports its
//! packet id, then waits for that id's PUBACK; packet ids are reused by
//! rumqttc after an ack, so the map is by the id in flight now. A lost
//! connection (with or without a session the broker kept) returns every
//! result in flight to the outbox's unsent ones: they are published anew,
//! from the outbox, after the next CONNACK. At QoS 0 (a broker granting no
//! more) a result handed over is done: no PUBACK will come.

use std::collections::{HashMap, HashSet, VecDeque};

use rumqttc::v5::mqttbytes::QoS;

/// What the broker's CONNACK allows us to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Maximum QoS: results go out at QoS 1 unless the broker grants less.
    pub qos: QoS,
    /// Retain Available: presence and model status are retained unless not.
    pub retain: bool,
}

impl Default for Grant {
    fn default() -> Self {
        Grant {
            qos: QoS::AtLeastOnce,
            retain: true,
        }
    }
}

impl Grant {
    /// From a CONNACK's Maximum QoS and Retain Available properties.
    pub fn of(max_qos: Option<u8>, retain_available: Option<u8>) -> Grant {
        Grant {
            qos: match max_qos {
                Some(0) => QoS::AtMostOnce,
                _ => QoS::AtLeastOnce,
            },
            retain: retain_available != Some(0),
        }
    }
}

/// Why input is held at the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Inbox plus outbox are over `limits.max_store_bytes`.
    Quota,
    /// The store cannot be written (a full disk).
    Store,
}

/// The store's state as it bears on input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Room {
    pub over_quota: bool,
    /// Below 90% of the quota: room enough to ask for held input again.
    pub below_resume: bool,
    pub failed: bool,
}

impl Room {
    fn hold(&self) -> Option<Hold> {
        if self.failed {
            Some(Hold::Store)
        } else if self.over_quota {
            Some(Hold::Quota)
        } else {
            None
        }
    }
}

/// What to do with a received PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receive {
    /// Append it to the inbox, then report [`Delivery::stored`].
    Store,
    /// Neither store nor acknowledge it; `Some` the first time: say why.
    Hold(Option<Hold>),
}

/// What a finished flush leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flushed {
    /// Acknowledge these, in order, and wake the router.
    Ack(Vec<u16>),
    /// The flush failed: nothing is acknowledged (the broker redelivers
    /// after the reconnect that follows the store's recovery), and input
    /// is held from here.
    Held,
}

/// What happens to a result handed to rumqttc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Waiting for its packet id and PUBACK.
    InFlight,
    /// QoS 0: nothing more will come; remove it from the outbox.
    Done,
}

#[derive(Debug)]
pub struct Delivery {
    max_inflight: usize,
    connected: bool,
    grant: Grant,
    /// Sent to rumqttc, packet id not yet known, in send order.
    unassigned: VecDeque<u64>,
    /// Sent on the wire, waiting for PUBACK.
    by_pkid: HashMap<u16, u64>,
    /// Keys in either of the above.
    inflight: HashSet<u64>,
    /// Messages stored since the last flush.
    fresh: usize,
    /// Packet ids of the fresh QoS 1 messages.
    to_ack: Vec<u16>,
    holding: Option<Hold>,
}

impl Delivery {
    /// A burst this long is flushed even if more is buffered.
    const MAX_BURST: usize = 256;

    pub fn new(max_inflight: usize) -> Delivery {
        Delivery {
            max_inflight,
            connected: false,
            grant: Grant::default(),
            unassigned: VecDeque::new(),
            by_pkid: HashMap::new(),
            inflight: HashSet::new(),
            fresh: 0,
            to_ack: Vec::new(),
            holding: None,
        }
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    pub fn holding(&self) -> Option<Hold> {
        self.holding
    }

    pub fn grant(&self) -> Grant {
        self.grant
    }

    /// A CONNACK: sending may start, within the broker's grant.
    pub fn on_connack(&mut self, grant: Grant) {
        self.connected = true;
        self.grant = grant;
    }

    /// A PUBLISH from the broker.
    pub fn on_publish(&mut self, room: Room) -> Receive {
        if self.holding.is_some() {
            return Receive::Hold(None);
        }
        match room.hold() {
            Some(why) => {
                self.holding = Some(why);
                Receive::Hold(Some(why))
            }
            None => Receive::Store,
        }
    }

    /// The message was appended to the inbox (not yet durable).
    pub fn stored(&mut self, qos: QoS, pkid: u16) {
        self.fresh += 1;
        if qos != QoS::AtMostOnce {
            self.to_ack.push(pkid);
        }
    }

    /// Whether to flush now: something is fresh and the burst is over
    /// (`buffered`: events rumqttc still holds) or long.
    pub fn flush_due(&self, buffered: usize) -> bool {
        self.fresh > 0 && (buffered == 0 || self.fresh >= Delivery::MAX_BURST)
    }

    /// The flush before the acknowledgements finished.
    pub fn on_flushed(&mut self, ok: bool) -> Flushed {
        self.fresh = 0;
        let acks = std::mem::take(&mut self.to_ack);
        if ok {
            Flushed::Ack(acks)
        } else {
            self.holding = Some(Hold::Store);
            Flushed::Held
        }
    }

    /// The idle tick: whether held input can be asked for again, by
    /// reconnecting (the resumed session redelivers it).
    pub fn on_tick(&mut self, room: Room) -> bool {
        let resume = self.holding.is_some() && room.below_resume && !room.failed;
        if resume {
            self.holding = None;
        }
        resume
    }

    /// The connection is gone (or is being dropped to resume held input).
    /// `lost`: results rumqttc had taken but not sent (their packet ids
    /// will never be reported). Returns whether fresh messages remain to
    /// be flushed and the router woken (their acks are void: the broker
    /// redelivers them).
    pub fn on_disconnect(&mut self, lost: usize) -> bool {
        for _ in 0..lost {
            if let Some(k) = self.unassigned.pop_front() {
                self.inflight.remove(&k);
            }
        }
        for (_, k) in self.by_pkid.drain() {
            self.inflight.remove(&k);
        }
        self.to_ack.clear();
        self.connected = false;
        std::mem::take(&mut self.fresh) > 0
    }

    /// How many results may be handed over now, and which are in flight.
    pub fn room(&self) -> usize {
        if self.connected {
            self.max_inflight.saturating_sub(self.inflight.len())
        } else {
            0
        }
    }

    pub fn in_flight(&self, key: u64) -> bool {
        self.inflight.contains(&key)
    }

    /// Outbox entry `key` was handed to rumqttc at the granted QoS.
    pub fn sent(&mut self, key: u64) -> Sent {
        if self.grant.qos == QoS::AtMostOnce {
            return Sent::Done;
        }
        self.unassigned.push_back(key);
        self.inflight.insert(key);
        Sent::InFlight
    }

    /// rumqttc wrote a QoS 1 PUBLISH with this packet id: the oldest
    /// unassigned result.
    pub fn on_outgoing(&mut self, pkid: u16) {
        if let Some(k) = self.unassigned.pop_front() {
            self.by_pkid.insert(pkid, k);
        }
    }

    /// A PUBACK: the outbox entry to remove, if it is one of ours. It
    /// stays in flight until [`Delivery::removed`], so it is not sent again
    /// meanwhile.
    pub fn on_puback(&mut self, pkid: u16) -> Option<u64> {
        self.by_pkid.remove(&pkid)
    }

    /// The acknowledged entry left the outbox.
    pub fn removed(&mut self, key: u64) {
        self.inflight.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOM: Room = Room {
        over_quota: false,
        below_resume: true,
        failed: false,
    };

    fn link() -> Delivery {
        let mut d = Delivery::new(4);
        d.on_connack(Grant::default());
        d
    }

    #[test]
    fn qos_0_input_is_flushed_and_wakes_the_router_without_an_ack() {
        let mut d = link();
        assert_eq!(d.on_publish(ROOM), Receive::Store);
        d.stored(QoS::AtMostOnce, 0);
        assert!(d.flush_due(0), "a lone QoS 0 message must not wait");
        assert_eq!(d.on_flushed(true), Flushed::Ack(vec![]));
        assert!(!d.flush_due(0));
    }

    #[test]
    fn a_burst_of_mixed_qos_is_acknowledged_in_order_after_one_flush() {
        let mut d = link();
        for (qos, pkid) in [
            (QoS::AtLeastOnce, 7),
            (QoS::AtMostOnce, 0),
            // QoS 2 publishers reach us at the subscription's QoS 1.
            (QoS::AtLeastOnce, 3),
        ] {
            assert_eq!(d.on_publish(ROOM), Receive::Store);
            d.stored(qos, pkid);
            assert!(!d.flush_due(1), "more of the burst is buffered");
        }
        assert!(d.flush_due(0));
        assert_eq!(d.on_flushed(true), Flushed::Ack(vec![7, 3]));
    }

    #[test]
    fn a_long_burst_is_flushed_before_it_ends() {
        let mut d = link();
        for i in 0..Delivery::MAX_BURST as u16 {
            d.stored(QoS::AtLeastOnce, i + 1);
        }
        assert!(d.flush_due(10));
    }

    #[test]
    fn quota_holds_input_says_so_once_and_resumes_by_reconnecting() {
        let mut d = link();
        let full = Room {
            over_quota: true,
            below_resume: false,
            ..ROOM
        };
        assert_eq!(d.on_publish(full), Receive::Hold(Some(Hold::Quota)));
        assert_eq!(d.on_publish(full), Receive::Hold(None));
        // Still held while above 90%, even below the quota.
        let between = Room {
            over_quota: false,
            below_resume: false,
            ..ROOM
        };
        assert_eq!(d.on_publish(between), Receive::Hold(None));
        assert!(!d.on_tick(between));
        assert!(d.on_tick(ROOM), "below 90%: reconnect for the held input");
        assert_eq!(d.holding(), None);
        assert_eq!(d.on_publish(ROOM), Receive::Store);
    }

    #[test]
    fn a_failed_flush_acknowledges_nothing_and_holds_until_the_store_heals() {
        let mut d = link();
        d.stored(QoS::AtLeastOnce, 1);
        assert_eq!(d.on_flushed(false), Flushed::Held);
        assert_eq!(d.holding(), Some(Hold::Store));
        assert_eq!(d.on_publish(ROOM), Receive::Hold(None));
        let failed = Room {
            failed: true,
            ..ROOM
        };
        assert!(!d.on_tick(failed), "not while the store is failed");
        assert!(d.on_tick(ROOM));
        // A store that fails while input flows holds it at once.
        let mut d = link();
        assert_eq!(d.on_publish(failed), Receive::Hold(Some(Hold::Store)));
    }

    #[test]
    fn results_wait_for_their_puback_and_packet_ids_are_reused() {
        let mut d = link();
        assert_eq!(d.room(), 4);
        assert_eq!(d.sent(10), Sent::InFlight);
        assert_eq!(d.sent(11), Sent::InFlight);
        assert_eq!(d.room(), 2);
        d.on_outgoing(1);
        d.on_outgoing(2);
        assert_eq!(d.on_puback(1), Some(10));
        assert!(d.in_flight(10), "in flight until removed from the outbox");
        d.removed(10);
        assert!(!d.in_flight(10));
        // rumqttc hands packet id 1 to the next result.
        assert_eq!(d.sent(12), Sent::InFlight);
        d.on_outgoing(1);
        assert_eq!(d.on_puback(1), Some(12));
        assert_eq!(d.on_puback(2), Some(11));
        assert_eq!(d.on_puback(2), None, "an ack twice is not ours");
        assert_eq!(d.on_puback(9), None, "presence and strangers");
    }

    /// The broker may or may not have kept our session: either way the
    /// outbox is the record, so nothing here depends on it.
    #[test]
    fn a_disconnect_returns_everything_in_flight_to_be_sent_anew() {
        let mut d = link();
        d.sent(1);
        d.sent(2);
        d.sent(3);
        d.on_outgoing(5); // 1 went out; 2 and 3 were still in rumqttc
        d.stored(QoS::AtLeastOnce, 9);
        assert!(
            d.on_disconnect(2),
            "the fresh message still needs its flush"
        );
        assert_eq!(d.room(), 0, "nothing is sent while disconnected");
        assert!(!(1..=3).any(|k| d.in_flight(k)), "all to be sent anew");
        d.on_connack(Grant::default());
        assert_eq!(d.room(), 4);
        assert_eq!(d.on_puback(5), None, "an old packet id means nothing now");
        assert_eq!(
            d.on_flushed(true),
            Flushed::Ack(vec![]),
            "acks of a dead link are void"
        );
    }

    #[test]
    fn a_broker_granting_qos_0_gets_results_at_most_once() {
        let mut d = Delivery::new(4);
        let grant = Grant::of(Some(0), Some(0));
        assert_eq!(
            grant,
            Grant {
                qos: QoS::AtMostOnce,
                retain: false
            }
        );
        d.on_connack(grant);
        assert_eq!(d.sent(1), Sent::Done);
        assert_eq!(d.room(), 4, "nothing waits for an ack that never comes");
        assert_eq!(Grant::of(None, None), Grant::default());
        assert_eq!(Grant::of(Some(1), Some(1)), Grant::default());
    }
}
