//! The one text form templates and inputs are compared in: lowercase,
//! punctuation as spaces (but `'`, `%`, `°`, `/`, `-`, and a decimal point
//! or comma between digits), single spaces.

/// Lowercases and blanks punctuation; keeps spacing.
pub fn fold(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let digit = |i: usize| chars.get(i).is_some_and(|c| c.is_ascii_digit());
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        match c {
            '’' | '‘' | '`' => out.push('\''),
            '.' | ',' if i > 0 && digit(i - 1) && digit(i + 1) => out.push(c),
            '.' | ',' | '?' | '!' | ';' | ':' | '"' | '“' | '”' | '¿' | '¡' | '。' | '，' => {
                out.push(' ')
            }
            c if c.is_whitespace() => out.push(' '),
            c => out.extend(c.to_lowercase()),
        }
    }
    out
}

/// An input as it is matched: folded, single spaces, trimmed.
pub fn normalise(text: &str) -> String {
    fold(text).split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_fold_to_one_form() {
        assert_eq!(
            normalise("  Turn ON the Kitchen’s lights, please!"),
            "turn on the kitchen's lights please"
        );
        assert_eq!(normalise("set it to 21.5°"), "set it to 21.5°");
        assert_eq!(normalise("Is it 50%?"), "is it 50%");
    }
}
