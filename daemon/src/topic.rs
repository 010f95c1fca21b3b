//! MQTT topic names and filters (MQTT 3.1.1 section 4.7).

/// Checks a filter that may hold `+` and a trailing `#`.
pub fn check_filter(filter: &str) -> Result<(), String> {
    check_common(filter)?;
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

/// Whether `topic` is matched by `filter`. Topics starting with `$` are not
/// matched by a leading wildcard, as brokers do.
pub fn matches(filter: &str, topic: &str) -> bool {
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
    }

    #[test]
    fn bad_filters_and_names_are_refused() {
        assert!(check_filter("a/#/b").is_err());
        assert!(check_filter("a/b+").is_err());
        assert!(check_filter("").is_err());
        assert!(check_filter("a/+/#").is_ok());
        assert!(check_name("a/+").is_err());
        assert!(check_name("a/b").is_ok());
    }
}
