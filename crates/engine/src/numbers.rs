//! Numbers said in text, in digits ("21", "20.5°") or words ("twenty one",
//! "one hundred"): what slot grounding checks generated numbers against and
//! what the policy reads quantities with.

/// Every number said in `text`, in digits ("21", "20.5°") or words ("one
/// hundred"), with the byte range of the words that say it.
pub fn said_numbers(text: &str) -> Vec<(f64, std::ops::Range<usize>)> {
    let words: Vec<(usize, &str)> = text
        .split(separates)
        .map(|w| (w.as_ptr() as usize - text.as_ptr() as usize, w))
        .filter(|(_, w)| !w.is_empty())
        .collect();
    let lower: Vec<String> = words.iter().map(|(_, w)| w.to_lowercase()).collect();
    let lower: Vec<&str> = lower.iter().map(String::as_str).collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < words.len() {
        match number_at(&lower[i..]) {
            Some((value, used)) => {
                let (start, _) = words[i];
                let (last, w) = words[i + used - 1];
                found.push((value, start..last + w.len()));
                i += used;
            }
            None => i += 1,
        }
    }
    found
}

/// Whether `c` separates the words numbers are read from.
pub fn separates(c: char) -> bool {
    c.is_whitespace() || c == ',' || c == '?' || c == '!'
}

/// A number written in digits ("21", "21.5", "21°c") or words ("twenty
/// one"); the value and how many words it took.
pub fn number_at(words: &[&str]) -> Option<(f64, usize)> {
    let first = words.first()?;
    let digits: String = first
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    if !digits.is_empty() {
        return digits.parse().ok().map(|v| (v, 1));
    }
    let mut total = 0.0;
    let mut used = 0;
    for w in words {
        let v = match *w {
            "zero" => 0.0,
            "one" => 1.0,
            "two" => 2.0,
            "three" => 3.0,
            "four" => 4.0,
            "five" => 5.0,
            "six" => 6.0,
            "seven" => 7.0,
            "eight" => 8.0,
            "nine" => 9.0,
            "ten" => 10.0,
            "eleven" => 11.0,
            "twelve" => 12.0,
            "thirteen" => 13.0,
            "fourteen" => 14.0,
            "fifteen" => 15.0,
            "sixteen" => 16.0,
            "seventeen" => 17.0,
            "eighteen" => 18.0,
            "nineteen" => 19.0,
            "twenty" => 20.0,
            "thirty" => 30.0,
            "forty" => 40.0,
            "fifty" => 50.0,
            "sixty" => 60.0,
            "seventy" => 70.0,
            "eighty" => 80.0,
            "ninety" => 90.0,
            "hundred" if used > 0 => {
                total *= 100.0;
                used += 1;
                continue;
            }
            _ => break,
        };
        // "twenty one", not "one one".
        if used > 0 && (total % 10.0 != 0.0 || v >= 10.0) {
            break;
        }
        total += v;
        used += 1;
    }
    (used > 0).then_some((total, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_number_is_found_with_its_words() {
        let text = "Set it to one hundred percent, then 20.5° in 5 minutes";
        let got: Vec<(f64, &str)> = said_numbers(text)
            .into_iter()
            .map(|(v, r)| (v, &text[r]))
            .collect();
        assert_eq!(got, [(100.0, "one hundred"), (20.5, "20.5°"), (5.0, "5")]);
        assert!(said_numbers("no numbers here").is_empty());
    }
}
