//! Command concepts: groups of words that say the same thing to a device
//! ("reduce", "lower", "dim" and "less" all say *down*), counted into one
//! feature per group beside the hidden state and the n-grams.
//!
//! A task has 3-20 examples per label, so most wordings a user will say are
//! missing from them, and a 135M model's hidden state places antonyms
//! ("up"/"down", "on"/"off") close together. A group gives the head one
//! feature that an unseen synonym shares with the examples' words. The
//! built-in groups are English command vocabulary (direction, power,
//! question, device class); a task may replace them with its own
//! (`concepts` in the task's configuration), for another language or
//! domain. docs/EVAL.md measures what they do.

use std::collections::BTreeMap;

/// Named groups of lower-case words.
#[derive(Debug, Clone, PartialEq)]
pub struct Concepts {
    groups: Vec<(String, Vec<String>)>,
}

/// The built-in groups: a name and its words, separated by spaces.
const ENGLISH: &[(&str, &str)] = &[
    ("up", "up increase raise higher more brighter brighten louder boost maximum max stronger faster warmer hotter"),
    ("down", "down decrease reduce lower less dim dimmer darker quieter softer minimum min weaker slower cooler colder"),
    ("on", "on start activate enable begin launch resume boot"),
    ("off", "off stop deactivate disable shut kill halt cancel"),
    ("ask", "what whats which how is are does do did was were whether status check"),
    ("open", "open unlock"),
    ("close", "close lock"),
    ("light", "light lights lamp lamps bulb bulbs lighting brightness"),
    ("plug", "plug plugs socket sockets outlet outlets"),
    ("cleaner", "vacuum roomba hoover mop clean cleaning sweep sweeper"),
    ("colour", "color colour colors colours red blue green yellow purple orange pink white scene mode"),
    ("climate", "temperature heat heating heater thermostat degrees ac conditioning fan"),
    ("sound", "volume sound loud quiet mute unmute"),
    ("cover", "window windows blind blinds shade shades curtain curtains garage door doors"),
];

impl Default for Concepts {
    /// The built-in English groups.
    fn default() -> Self {
        Concepts {
            groups: ENGLISH
                .iter()
                .map(|(name, words)| {
                    let words = words.split_whitespace().map(String::from).collect();
                    (name.to_string(), words)
                })
                .collect(),
        }
    }
}

impl From<&BTreeMap<String, Vec<String>>> for Concepts {
    /// A task's own groups; words are matched in lower case.
    fn from(table: &BTreeMap<String, Vec<String>>) -> Self {
        Concepts {
            groups: table
                .iter()
                .map(|(name, words)| {
                    (
                        name.clone(),
                        words.iter().map(|w| w.to_lowercase()).collect(),
                    )
                })
                .collect(),
        }
    }
}

impl Concepts {
    /// How many times each group's words occur in `text`, one dimension
    /// per group, L2-normalised (all zero when none occurs).
    pub fn features(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0.0f32; self.groups.len()];
        for word in super::lexical::words(&text.to_lowercase()) {
            for (count, (_, words)) in v.iter_mut().zip(&self.groups) {
                if words.iter().any(|w| w == word) {
                    *count += 1.0;
                }
            }
        }
        super::head::l2_normalise(&mut v);
        v
    }

    /// The groups, in the order of the feature's dimensions (for the head's
    /// cache key).
    pub fn groups(&self) -> &[(String, Vec<String>)] {
        &self.groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::dot;

    #[test]
    fn synonyms_share_a_feature_and_antonyms_do_not() {
        let c = Concepts::default();
        let reduce = c.features("reduce the brightness");
        let dim = c.features("dim the lights");
        let raise = c.features("raise the lights");
        assert!((dot(&reduce, &reduce) - 1.0).abs() < 1e-5);
        assert!(dot(&reduce, &dim) > 0.99, "down + light both times");
        assert!(dot(&dim, &raise) < 0.51, "only the light group is shared");
    }

    #[test]
    fn words_match_whole_and_in_any_case() {
        let c = Concepts::default();
        assert_eq!(c.features("Turn OFF"), c.features("off"));
        assert!(c.features("upstairs offices").iter().all(|&x| x == 0.0));
        assert!(c.features("").iter().all(|&x| x == 0.0));
    }

    #[test]
    fn a_tasks_own_groups_replace_the_built_in_ones() {
        let table = BTreeMap::from([
            (
                "aus".to_string(),
                vec!["Aus".to_string(), "ausschalten".to_string()],
            ),
            (
                "an".to_string(),
                vec!["an".to_string(), "einschalten".to_string()],
            ),
        ]);
        let c = Concepts::from(&table);
        assert_eq!(c.groups().len(), 2);
        assert_eq!(
            c.features("Licht aus"),
            vec![0.0, 1.0],
            "groups in name order"
        );
        assert_eq!(c.features("licht einschalten"), vec![1.0, 0.0]);
        assert!(c.features("turn off").iter().all(|&x| x == 0.0));
    }
}
