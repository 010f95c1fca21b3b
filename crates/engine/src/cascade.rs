//! An extract task's first stage: Home Assistant's sentence templates
//! ([`slmd_templates`]). A sentence that matches answers at once, on the
//! caller's thread, with its intent and slots; anything else goes to the
//! model (unless the task turned the model stage off).

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;
use slmd_templates::Templates;

use crate::schema::{find_span, Slot, SlotValue};
use crate::{Query, Scores};

/// Which stage answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Template,
    #[default]
    Model,
    /// A larger model upstream (set by the daemon's escalation; the engine
    /// never answers so).
    Escalated,
}

impl Stage {
    /// Its name, as results give it.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Template => "template",
            Stage::Model => "model",
            Stage::Escalated => "escalated",
        }
    }
}

/// A task's template stage.
#[derive(Debug, Clone)]
pub struct TemplateStage {
    pub templates: Arc<Templates>,
    /// Whether what the templates miss goes to the model; without it, it
    /// is not recognised.
    pub model_stage: bool,
    /// For a task whose labels are not the templates' intents: which match
    /// is which label, first rule first. A match no rule names is no
    /// match. Empty: the intents are the labels.
    pub labels: Vec<LabelRule>,
}

/// A template match of `intent` whose slots include `slots` is `label`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRule {
    pub intent: String,
    #[serde(default)]
    pub slots: std::collections::BTreeMap<String, String>,
    pub label: String,
}

impl LabelRule {
    fn fits(&self, m: &slmd_templates::Match) -> bool {
        self.fits_parts(&m.intent, &m.slots)
    }

    fn fits_parts(&self, intent: &str, slots: &[(String, Value)]) -> bool {
        self.intent == intent
            && self.slots.iter().all(|(k, want)| {
                slots.iter().any(|(name, v)| {
                    name == k && v.as_str().map_or(v.to_string(), str::to_owned) == *want
                })
            })
    }
}

impl TemplateStage {
    /// Sentences written from the templates ([`Templates::sample`]), named
    /// by the task's labels when it has rules (a sentence no rule names is
    /// left out): training rows for the model stage.
    pub fn samples(&self, per_sentence: usize, seed: u64) -> Vec<slmd_templates::Sample> {
        let mut samples = self.templates.sample(per_sentence, seed);
        if !self.labels.is_empty() {
            samples.retain_mut(|s| {
                let rule = self
                    .labels
                    .iter()
                    .find(|r| r.fits_parts(&s.intent, &s.slots));
                rule.map(|r| s.intent = r.label.clone()).is_some()
            });
        }
        samples
    }

    /// The templates' answer; `None` leaves the query to the model. A
    /// match of an intent the query excludes (`among`) is no match.
    pub fn answer(&self, query: &Query) -> Option<Scores> {
        let started = Instant::now();
        let accept = |mut m: slmd_templates::Match| {
            if !self.labels.is_empty() {
                m.intent = self.labels.iter().find(|r| r.fits(&m))?.label.clone();
            }
            query
                .among
                .as_ref()
                .is_none_or(|a| a.contains(&m.intent))
                .then_some(m)
        };
        let hit = self
            .templates
            .recognise_with(&query.text, &query.context, &accept);
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let (ranked, label, slots, unrecognised) = match hit {
            Some(m) => (
                vec![(m.intent.clone(), 1.0)],
                Some(m.intent),
                slots(&query.text, m.slots),
                None,
            ),
            None if self.model_stage => return None,
            None => (
                Vec::new(),
                None,
                Vec::new(),
                Some(crate::Unrecognised::NoTemplateMatch),
            ),
        };
        Some(Scores {
            ranked,
            label,
            slots: Some(slots),
            inference_ms: ms,
            tokens: 0,
            by: Stage::Template,
            unrecognised,
        })
    }
}

fn slots(text: &str, pairs: Vec<(String, Value)>) -> Vec<Slot> {
    pairs
        .into_iter()
        .map(|(name, v)| {
            let value = match v {
                Value::Number(n) => n
                    .as_f64()
                    .map_or(SlotValue::Text(n.to_string()), SlotValue::Number),
                Value::String(s) => SlotValue::Text(s),
                v => SlotValue::Text(v.to_string()),
            };
            Slot {
                span: find_span(text, &value),
                name,
                value,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(model_stage: bool) -> TemplateStage {
        let mut sources = slmd_templates::Sources::default();
        sources
            .add_text(
                "lists: {level: {range: {from: 0, to: 100}}}\n\
                 intents:\n  HassLightSet: {data: [{sentences: ['lights to {level:brightness}[%]'], slots: {domain: light}}]}\n  \
                 HassTurnOn: {data: [{sentences: ['lights on']}]}",
                false,
            )
            .unwrap();
        TemplateStage {
            templates: Arc::new(sources.compile(&Default::default()).unwrap()),
            model_stage,
            labels: Vec::new(),
        }
    }

    #[test]
    fn a_match_answers_with_its_slots_and_spans_and_says_so() {
        let s = stage(true)
            .answer(&Query::from("Lights to 40%".to_owned()))
            .unwrap();
        assert_eq!(s.by, Stage::Template);
        assert_eq!(s.label.as_deref(), Some("HassLightSet"));
        let slots = s.slots.unwrap();
        assert_eq!(slots[0].value, SlotValue::Text("light".into()));
        assert_eq!(slots[1].value, SlotValue::Number(40.0));
        assert_eq!(slots[1].span.as_ref().unwrap().raw, "40%");
    }

    #[test]
    fn a_miss_goes_to_the_model_unless_its_stage_is_off() {
        let q = Query::from("make it brighter".to_owned());
        assert!(stage(true).answer(&q).is_none());
        let s = stage(false).answer(&q).unwrap();
        assert_eq!((s.label, s.ranked.len(), s.by), (None, 0, Stage::Template));
        assert_eq!(s.unrecognised, Some(crate::Unrecognised::NoTemplateMatch));
    }

    #[test]
    fn rules_name_a_match_by_the_tasks_labels_and_unnamed_matches_go_to_the_model() {
        let mut s = stage(true);
        s.labels = vec![LabelRule {
            intent: "HassLightSet".into(),
            slots: [("domain".to_owned(), "light".to_owned())].into(),
            label: "lights_dim".into(),
        }];
        let hit = s.answer(&Query::from("lights to 40".to_owned())).unwrap();
        assert_eq!(hit.label.as_deref(), Some("lights_dim"));
        assert_eq!(hit.ranked[0].0, "lights_dim");
        assert!(s.answer(&Query::from("lights on".to_owned())).is_none());
    }

    #[test]
    fn an_intent_outside_the_querys_filter_is_no_match() {
        let mut q = Query::from("lights on".to_owned());
        q.among = Some(vec!["HassLightSet".into()]);
        assert!(stage(true).answer(&q).is_none());
        q.among = Some(vec!["HassTurnOn".into()]);
        assert!(stage(true).answer(&q).is_some());
    }
}
