//! The control plane over MQTT: model update requests (installs and
//! chunked transfers) on the control topic and Hermes entity injections.
//! Each is checked here against the trust rules (signature, device,
//! sequence) and handed to the supervisor as a [`Job`]; the router only
//! publishes the answer.

use std::sync::Arc;

use crate::bundle::control::{self, Request, Rules, Sequence};
use crate::bundle::transfer::{Progress, Transfers};
use crate::bundle::{BundleError, Trust};
use crate::injection;
use crate::payload::json_entry;
use crate::update;
use slmd_store::OutboxEntry;

/// What the control plane hands to the supervisor.
#[derive(Debug)]
pub enum Job {
    /// An install the control topic asked for; `transfer` names the MQTT
    /// transfer whose file it is (removed afterwards).
    Update {
        req: update::Request,
        transfer: Option<String>,
    },
    /// Entity injection (Hermes): new enum values, hence a new engine.
    Inject(injection::Request),
}

/// Model update requests arrive on `topic`. Installs go to the supervisor
/// (`tx`); transfer chunks are written here. Each request is answered
/// with a retained status on `status_topic`.
pub struct Control {
    pub topic: String,
    pub status_topic: String,
    pub trust: Trust,
    pub require_signed: bool,
    /// Entity injections must be signed too (they change what slmd
    /// answers).
    pub require_signed_injection: bool,
    /// This device's client id: a signed request naming another device is
    /// refused.
    pub device: String,
    /// The highest sequence number of a signed request accepted (replays).
    pub sequence: Sequence,
    pub transfers: Arc<Transfers>,
    /// Topic filters no response topic may match (slmd's own topics).
    pub reserved: Vec<String>,
    pub tx: tokio::sync::mpsc::Sender<Job>,
}

impl Control {
    /// A model update request: parsed (and its signature checked), then
    /// queued for the supervisor or written as a transfer chunk. The answer
    /// is a retained status, or nothing for a chunk that needs none.
    pub async fn request(&self, payload: &[u8]) -> Option<OutboxEntry> {
        let rules = Rules {
            trust: &self.trust,
            require_signed: self.require_signed,
            device: &self.device,
        };
        // A signed request with a sequence number must be newer than any
        // accepted before; announcing an open transfer again (to resume
        // it) is the one repeat allowed.
        let parsed = control::parse(payload, &rules).and_then(|p| {
            let resume = matches!(&p.request, Request::Start(s) if self.transfers.is_open(s));
            match p.seq {
                Some(seq) if !resume => self.sequence.advance(seq).map(|()| p),
                _ => Ok(p),
            }
        });
        let status = match parsed.map(|p| p.request) {
            Err(e) => refusal(&e),
            Ok(Request::Install {
                source,
                activate,
                force,
                size,
            }) => self.queue(
                update::Request {
                    source,
                    activate,
                    force,
                    network: Some(size.unwrap_or(u64::MAX)),
                },
                None,
            ),
            Ok(request) => {
                let chunk = matches!(request, Request::Chunk(_));
                match self.transfer(request).await {
                    Err(e) => refusal(&e),
                    Ok(Progress::Ignored) => return None,
                    // Every 16th chunk is answered, and every announcement
                    // (which is how a sender asks again).
                    Ok(Progress::Receiving { received, .. }) if chunk && received % 16 != 0 => {
                        return None
                    }
                    Ok(Progress::Receiving {
                        id,
                        received,
                        chunks,
                        missing,
                    }) => serde_json::json!({
                        "state": "receiving", "transfer": id, "received": received,
                        "chunks": chunks, "missing": missing
                    }),
                    Ok(Progress::Complete {
                        path,
                        activate,
                        force,
                    }) => {
                        let id = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                        // The file is slmd's own, its size bounded already.
                        let req = update::Request {
                            source: path.to_string_lossy().into_owned(),
                            activate,
                            force,
                            network: None,
                        };
                        self.queue(req, id)
                    }
                }
            }
        };
        Some(OutboxEntry {
            retain: true,
            ..json_entry(&self.status_topic, &status)
        })
    }

    /// A transfer announcement or chunk, written off the runtime.
    async fn transfer(&self, request: Request) -> Result<Progress, BundleError> {
        let transfers = self.transfers.clone();
        tokio::task::spawn_blocking(move || match request {
            Request::Start(s) => transfers.start(s),
            Request::Chunk(ch) => transfers.chunk(ch),
            Request::Install { .. } => unreachable!("installs are queued, not written"),
        })
        .await
        .unwrap_or_else(|e| Err(BundleError::BadRequest(e.to_string())))
    }

    /// Queues an install for the supervisor; one waits at most.
    fn queue(&self, req: update::Request, transfer: Option<String>) -> serde_json::Value {
        match self.tx.try_send(Job::Update { req, transfer }) {
            Ok(()) => serde_json::json!({"state": "received"}),
            Err(_) => serde_json::json!({
                "state": "refused", "reason": "busy", "detail": "an update is already queued"
            }),
        }
    }

    /// An entity injection request: checked here, applied by the
    /// supervisor (which answers it once the new engine serves). The
    /// answer here is a refusal or nothing.
    pub async fn inject(&self, payload: &[u8]) -> Option<OutboxEntry> {
        let id = injection::request_id(payload);
        let refused = |reason: &str, why: String| {
            log::warn!(reason = reason; "entity injection refused: {why}");
            let body = injection::refusal(id.as_deref(), reason, &why);
            Some(json_entry(injection::ERROR_TOPIC, &body))
        };
        let rules = Rules {
            trust: &self.trust,
            require_signed: self.require_signed_injection,
            device: &self.device,
        };
        // Signature and device first; the sequence number advances only
        // for a request that parses.
        match control::unwrap_signed(payload, &rules) {
            Err(e) => refused(e.reason(), e.to_string()),
            Ok((payload, seq)) => match injection::parse(&payload) {
                Err(e) => refused(e.reason(), e.to_string()),
                Ok(req) => match seq.map_or(Ok(()), |n| self.sequence.advance(n)) {
                    Err(e) => refused(e.reason(), e.to_string()),
                    Ok(()) => match self.tx.send(Job::Inject(req)).await {
                        Ok(()) => None,
                        Err(_) => refused("unavailable", "the supervisor has stopped".into()),
                    },
                },
            },
        }
    }
}

fn refusal(e: &BundleError) -> serde_json::Value {
    log::warn!(reason = e.reason(); "model control request refused: {e}");
    serde_json::json!({"state": "refused", "reason": e.reason(), "detail": e.to_string()})
}
