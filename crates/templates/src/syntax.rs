//! The template language: `(a|b)` alternatives, `[a]` optional parts,
//! `(a;b)` permutations, `{list}` and `{list:slot}` list references,
//! `<rule>` expansion rules, `\` escapes; anything else is text.

use crate::TemplateError;

/// A parsed template. Text is lowercased; rules are still references
/// (resolved when the templates are compiled).
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Text(String),
    Seq(Vec<Expr>),
    Alt(Vec<Expr>),
    /// A list's values; the matched value fills slot `slot`.
    List {
        list: String,
        slot: String,
    },
    Rule(String),
}

impl Expr {
    fn empty() -> Expr {
        Expr::Text(String::new())
    }
}

/// The longest template, the deepest nesting and the most items a
/// permutation may have: bounds on what one template may cost to compile
/// and match (a permutation of n items is n! sequences).
const MAX_CHARS: usize = 2000;
const MAX_DEPTH: usize = 32;
const MAX_PERMUTED: usize = 6;

/// Parses one template.
pub fn parse(template: &str) -> Result<Expr, TemplateError> {
    let mut p = Parser {
        chars: template.chars().collect(),
        pos: 0,
        depth: 0,
        template,
    };
    if p.chars.len() > MAX_CHARS {
        return Err(p.error(format!("longer than {MAX_CHARS} characters")));
    }
    p.group(None)
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    depth: usize,
    template: &'a str,
}

impl Parser<'_> {
    fn error(&self, why: impl Into<String>) -> TemplateError {
        TemplateError::Syntax {
            template: self.template.to_owned(),
            at: self.pos,
            why: why.into(),
        }
    }

    /// Up to `close` (the end when `None`): alternatives separated by `|`,
    /// or permutation items separated by `;`.
    fn group(&mut self, close: Option<char>) -> Result<Expr, TemplateError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error(format!("nested more than {MAX_DEPTH} deep")));
        }
        let (mut branches, mut items, mut text) = (Vec::new(), Vec::new(), String::new());
        let (mut alternatives, mut permutation) = (false, false);
        loop {
            let Some(c) = self.chars.get(self.pos).copied() else {
                if let Some(close) = close {
                    return Err(self.error(format!("{close:?} is missing")));
                }
                break;
            };
            self.pos += 1;
            if Some(c) == close {
                break;
            }
            if matches!(c, '|' | ';' | '(' | '[' | '{' | '<') {
                flush(&mut text, &mut items);
            }
            match c {
                '|' | ';' => {
                    branches.push(seq(std::mem::take(&mut items)));
                    alternatives |= c == '|';
                    permutation |= c == ';';
                }
                '(' => items.push(self.group(Some(')'))?),
                '[' => items.push(Expr::Alt(vec![self.group(Some(']'))?, Expr::empty()])),
                '{' => {
                    let name = self.name('}')?;
                    let (list, slot) = name.split_once(':').unwrap_or((&name, &name));
                    items.push(Expr::List {
                        list: list.trim().to_owned(),
                        slot: slot.trim().to_owned(),
                    });
                }
                '<' => items.push(Expr::Rule(self.name('>')?)),
                '\\' => {
                    let Some(next) = self.chars.get(self.pos) else {
                        return Err(self.error("nothing after \\"));
                    };
                    text.push(*next);
                    self.pos += 1;
                }
                ')' | ']' | '}' | '>' => return Err(self.error(format!("unexpected {c:?}"))),
                c => text.push(c),
            }
        }
        flush(&mut text, &mut items);
        branches.push(seq(items));
        if alternatives && permutation {
            return Err(self.error("a group mixes | and ;"));
        }
        if permutation && branches.len() > MAX_PERMUTED {
            return Err(self.error(format!("a permutation of more than {MAX_PERMUTED} items")));
        }
        self.depth -= 1;
        Ok(if permutation {
            Expr::Alt(permutations(&branches))
        } else if branches.len() == 1 {
            branches.pop().expect("one branch")
        } else {
            Expr::Alt(branches)
        })
    }

    fn name(&mut self, close: char) -> Result<String, TemplateError> {
        let start = self.pos;
        while let Some(&c) = self.chars.get(self.pos) {
            self.pos += 1;
            if c == close {
                let name: String = self.chars[start..self.pos - 1].iter().collect();
                if name.trim().is_empty() {
                    return Err(self.error("an empty name"));
                }
                return Ok(name.trim().to_owned());
            }
        }
        Err(self.error(format!("{close:?} is missing")))
    }
}

fn flush(text: &mut String, items: &mut Vec<Expr>) {
    if !text.is_empty() {
        items.push(Expr::Text(crate::normal::fold(&std::mem::take(text))));
    }
}

fn seq(mut items: Vec<Expr>) -> Expr {
    match items.len() {
        0 => Expr::empty(),
        1 => items.pop().expect("one item"),
        _ => Expr::Seq(items),
    }
}

/// Every order of `items`, each separated by a space.
fn permutations(items: &[Expr]) -> Vec<Expr> {
    if items.len() <= 1 {
        return items.to_vec();
    }
    let mut out = Vec::new();
    for (i, first) in items.iter().enumerate() {
        let rest: Vec<Expr> = items
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, e)| e.clone())
            .collect();
        for tail in permutations(&rest) {
            out.push(Expr::Seq(vec![first.clone(), Expr::Text(" ".into()), tail]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Expr {
        Expr::Text(s.into())
    }

    #[test]
    fn groups_optionals_lists_and_rules_parse() {
        assert_eq!(
            parse("Turn (on|off) [the] {area} <light>").unwrap(),
            Expr::Seq(vec![
                text("turn "),
                Expr::Alt(vec![text("on"), text("off")]),
                text(" "),
                Expr::Alt(vec![text("the"), text("")]),
                text(" "),
                Expr::List {
                    list: "area".into(),
                    slot: "area".into()
                },
                text(" "),
                Expr::Rule("light".into()),
            ])
        );
        assert_eq!(
            parse("{cover_classes:device_class}").unwrap(),
            Expr::List {
                list: "cover_classes".into(),
                slot: "device_class".into()
            }
        );
        assert_eq!(parse(r"a\(b").unwrap(), text("a(b"));
    }

    #[test]
    fn a_permutation_is_every_order() {
        let Expr::Alt(orders) = parse("(a;b;c)").unwrap() else {
            panic!("not alternatives");
        };
        assert_eq!(orders.len(), 6);
    }

    #[test]
    fn bad_templates_say_where() {
        let deep = "(".repeat(40) + "a" + &")".repeat(40);
        let wide = format!("({})", ["a"; 7].join(";"));
        let long = "a ".repeat(1500);
        for bad in [
            "(a|b", "[a", "{x", "a)", "(a|b;c)", "{}", &deep, &wide, &long,
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
