//! MQTT topic names and filters (MQTT 3.1.1 section 4.7).

/// Checks a filter that may hold `+` and a trailing `#`, optionally as a
/// shared subscription `$share/GROUP/FILTER`.
pub fn check_filter(filter: &str) -> Result<(), String> {
    check_common(filter)?;
    if filter.starts_with("$share/") && unshared(filter) == filter {
        return Err(format!("{filter:?}: expected $share/GROUP/FILTER"));
    }
    let filter = unshared(filter);
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!(
                "{filter:?}: '#' must be a whole level and the last one"
            ));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("{filter:?}: '+' must be a whole level"));
        }
    }
    Ok(())
}

/// Checks a topic that messages are published to (no wildcards).
pub fn check_name(topic: &str) -> Result<(), String> {
    check_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(format!(
            "{topic:?}: a topic to publish to cannot hold wildcards"
        ));
    }
    Ok(())
}

fn check_common(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("must not be empty".into());
    }
    if topic.len() > 65535 {
        return Err("longer than 65535 bytes".into());
    }
    if topic.contains('\0') {
        return Err(format!("{topic:?}: holds a NUL character"));
    }
    Ok(())
}

/// The topic filter of a shared subscription `$share/GROUP/FILTER` (which
/// several clients subscribe to, each message going to one of them); any
/// other filter as it is.
pub fn unshared(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(group, f)| !group.is_empty() && !f.is_empty())
        .map_or(filter, |(_, f)| f)
}

/// Whether `topic` is matched by `filter`. Topics starting with `$` are not
/// matched by a leading wildcard, as brokers do.
pub fn matches(filter: &str, topic: &str) -> bool {
    let filter = unshared(filter);
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_as_brokers_do() {
        assert!(matches("home/+/command", "home/kitchen/command"));
        assert!(!matches("home/+/command", "home/kitchen/x/command"));
        assert!(matches("home/#", "home"));
        assert!(matches("home/#", "home/a/b"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/broker"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(matches("a/b", "a/b"));
        assert!(matches("$share/slmd/home/+", "home/kitchen"));
        assert!(!matches("$share/slmd/home/+", "office/x"));
    }

    #[test]
    fn bad_filters_and_names_are_refused() {
        assert!(check_filter("a/#/b").is_err());
        assert!(check_filter("a/b+").is_err());
        assert!(check_filter("").is_err());
        assert!(check_filter("a/+/#").is_ok());
        assert!(check_name("a/+").is_err());
        assert!(check_name("a/b").is_ok());
        assert!(check_filter("$share/g/a/#").is_ok());
        assert!(check_filter("$share/g").is_err());
        assert!(check_filter("$share/g/a/#/b").is_err());
    }
}
