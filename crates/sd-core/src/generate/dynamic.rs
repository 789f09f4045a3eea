//! Dynamic prompts (wildcards) of gen_img: `{a|b|c}` picks variants, `{e$$a|b}` enumerates
//! them.
//!
//! Syntax of one group: `{` [`e$$` or `E$$`] [`N$$` or `N-M$$`] [`sep$$`] `A|B|…` `}`. Without
//! `e$$`, k variants (k uniform in [N, M], default 1) are drawn without replacement and joined
//! with `sep` (default ", "); with `e$$` every combination of every size k in [N, M] is
//! produced. `\{` and `\}` are literal braces. Groups may nest; the innermost are resolved
//! first, repeatedly.
//!
//! Randomness: variant i of a line is resolved with `random.Random(seed_i)` (Python's
//! generator, [`PyRandom`]), drawing `randint(N, M)` then `sample(variants, k)` per group, the
//! groups of one nesting pass taken from last to first; so sd-scripts' choices are reproduced
//! for the same seeds.
//!
//! # Source
//! generation.md §5.4; sd-scripts `library/dynamic_prompts` behaviour (gen_img.py's
//! `handle_dynamic_prompt_variants`); CPython 3.11 `random.randint` / `random.sample`.
//!
//! # Compatibility
//! With enumeration in nested groups, upstream pairs the outer groups found in the original
//! line with the inner replacers (a mismatch); we pair each innermost group with itself. The
//! results agree for non-nested lines.

use super::PyRandom;

const OPEN_ESCAPED: &str = "\u{ff5b}";
const CLOSE_ESCAPED: &str = "\u{ff5d}";

/// One parsed `{…}` group.
#[derive(Debug, Clone, PartialEq)]
struct Group {
    enumerate: bool,
    min: usize,
    max: usize,
    separator: String,
    variants: Vec<String>,
}

/// Whether `line` has a dynamic group at all (a `{` with at least one character before a
/// later `}`); lines without one are not expanded.
pub fn has_dynamic_prompt(line: &str) -> bool {
    line.find('{')
        .is_some_and(|i| line[i + 1..].char_indices().any(|(j, c)| c == '}' && j > 0))
}

/// Parses the inside of an innermost group (no braces in it), trying the optional prefixes
/// in the order a backtracking regex would.
fn parse_group(inner: &str) -> Option<Group> {
    let e_options: &[bool] = if inner.starts_with("e$$") || inner.starts_with("E$$") {
        &[true, false]
    } else {
        &[false]
    };
    for &enumerate in e_options {
        let after_e = if enumerate { &inner[3..] } else { inner };
        // `[\d-]+$$`, greedy (a shorter run cannot be followed by "$$").
        let run = after_e
            .find(|c: char| !(c.is_ascii_digit() || c == '-'))
            .unwrap_or(after_e.len());
        let count_options: Vec<Option<(&str, &str)>> =
            if run > 0 && after_e[run..].starts_with("$$") {
                vec![Some((&after_e[..run], &after_e[run + 2..])), None]
            } else {
                vec![None]
            };
        for count in count_options {
            let (range, after_count) = match count {
                Some((r, rest)) => (Some(r), rest),
                None => (None, after_e),
            };
            // `[^|}]+?$$`, lazy: the first "$$" after at least one character, with no "|"
            // before it.
            let bar = after_count.find('|').unwrap_or(after_count.len());
            let skip = after_count.chars().next().map_or(0, char::len_utf8);
            let sep = after_count[skip..]
                .find("$$")
                .map(|p| p + skip)
                .filter(|&p| skip > 0 && p <= bar);
            let sep_options: Vec<Option<(&str, &str)>> = match sep {
                Some(p) => vec![Some((&after_count[..p], &after_count[p + 2..])), None],
                None => vec![None],
            };
            for sep in sep_options {
                let (separator, body) = match sep {
                    Some((s, rest)) => (s.to_owned(), rest),
                    None => (", ".to_owned(), after_count),
                };
                if body.is_empty() {
                    continue;
                }
                let variants: Vec<String> = body.split('|').map(str::to_owned).collect();
                let (min, max) = count_range(range, variants.len());
                return Some(Group {
                    enumerate,
                    min,
                    max,
                    separator,
                    variants,
                });
            }
        }
    }
    None
}

/// `N` or `N-M` → [min, max], swapped if reversed, clamped to [0, variants]; anything else
/// (with a warning) → [1, 1].
fn count_range(range: Option<&str>, variants: usize) -> (usize, usize) {
    let Some(range) = range else {
        return (1, 1);
    };
    let parts: Vec<Option<usize>> = range.split('-').map(|p| p.parse().ok()).collect();
    let (mut lo, mut hi) = match parts[..] {
        [Some(n)] => (n, n),
        [Some(a), Some(b)] => (a, b),
        _ => {
            tracing::warn!("invalid dynamic prompt count range \"{range}\": using 1");
            (1, 1)
        }
    };
    if lo > hi {
        std::mem::swap(&mut lo, &mut hi);
    }
    let hi = hi.min(variants);
    // Upstream fails (randint with lo > hi) when lo exceeds the variant count; use them all.
    (lo.min(hi), hi)
}

impl Group {
    /// One random choice: `randint(min, max)` variants by `sample`, joined.
    fn draw(&self, rng: &mut PyRandom) -> String {
        let k = rng.randint(self.min as u64, self.max as u64) as usize;
        let picked: Vec<&str> = rng
            .sample_indices(self.variants.len(), k.min(self.variants.len()))
            .into_iter()
            .map(|i| self.variants[i].as_str())
            .collect();
        picked.join(&self.separator)
    }

    /// Every combination of every size in [min, max], in itertools.combinations order.
    fn all(&self) -> Vec<String> {
        let n = self.variants.len();
        let mut out = Vec::new();
        for k in self.min..=self.max {
            let mut idx: Vec<usize> = (0..k).collect();
            loop {
                let parts: Vec<&str> = idx.iter().map(|&i| self.variants[i].as_str()).collect();
                out.push(parts.join(&self.separator));
                // Next combination in lexicographic order.
                let Some(pos) = (0..k).rev().find(|&i| idx[i] != i + n - k) else {
                    break;
                };
                idx[pos] += 1;
                for j in pos + 1..k {
                    idx[j] = idx[j - 1] + 1;
                }
            }
        }
        out
    }
}

/// The innermost groups of `prompt`: (byte start, byte end, parsed group), in order.
fn innermost_groups(prompt: &str) -> Vec<(usize, usize, Group)> {
    let mut deepest = 0usize;
    let mut level = 0usize;
    for c in prompt.chars() {
        match c {
            '{' => {
                level += 1;
                deepest = deepest.max(level);
            }
            '}' => level = level.saturating_sub(1),
            _ => {}
        }
    }
    if deepest == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let (mut level, mut start) = (0usize, None);
    for (i, c) in prompt.char_indices() {
        match c {
            '{' => {
                level += 1;
                if level == deepest {
                    start = Some(i);
                }
            }
            '}' => {
                if level == deepest
                    && let Some(s) = start.take()
                    && let Some(g) = parse_group(&prompt[s + 1..i])
                {
                    out.push((s, i + 1, g));
                }
                level = level.saturating_sub(1);
            }
            _ => {}
        }
    }
    out
}

/// Expands a prompt line (after `--d` removal) into its variants with their seeds.
///
/// Without enumeration the result has `seeds.len()` variants, variant i resolved with
/// `random.Random(seeds[i])`. With enumeration there is one variant per combination, and all
/// take `seeds[0]`. A line without groups is returned once with `seeds[0]`.
///
/// # Errors
/// None; `seeds` must not be empty (an empty list gives no variants).
pub fn expand_dynamic_prompt(line: &str, seeds: &[u64]) -> Vec<(String, u64)> {
    let Some(&first) = seeds.first() else {
        return Vec::new();
    };
    if !has_dynamic_prompt(line) {
        return vec![(line.to_owned(), first)];
    }
    let escaped = line
        .replace("\\{", OPEN_ESCAPED)
        .replace("\\}", CLOSE_ESCAPED);
    let mut prompts = vec![escaped; seeds.len()];
    let mut enumerated = false;
    loop {
        let mut changed = false;
        let mut next = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let seed = seeds.get(i).copied().unwrap_or(first);
            let groups = innermost_groups(p);
            if groups.is_empty() {
                next.push(p.clone());
                continue;
            }
            changed = true;
            let mut rng = PyRandom::new(seed);
            if groups.iter().any(|(_, _, g)| g.enumerate) {
                enumerated = true;
                let mut list = vec![p.clone()];
                for (s, e, g) in groups.iter().filter(|(_, _, g)| g.enumerate) {
                    let text = &p[*s..*e];
                    list = list
                        .iter()
                        .flat_map(|c| g.all().into_iter().map(move |r| c.replacen(text, &r, 1)))
                        .collect();
                }
                for (s, e, g) in groups.iter().filter(|(_, _, g)| !g.enumerate) {
                    let text = &p[*s..*e];
                    for c in &mut list {
                        *c = c.replacen(text, &g.draw(&mut rng), 1);
                    }
                }
                next.extend(list);
            } else {
                let mut current = p.clone();
                for (s, e, g) in groups.iter().rev() {
                    current = format!("{}{}{}", &current[..*s], g.draw(&mut rng), &current[*e..]);
                }
                next.push(current);
            }
        }
        prompts = next;
        if !changed {
            break;
        }
    }
    prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let text = p.replace(OPEN_ESCAPED, "{").replace(CLOSE_ESCAPED, "}");
            let seed = if enumerated {
                first
            } else {
                seeds.get(i).copied().unwrap_or(first)
            };
            (text, seed)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_prefixes_parse_like_the_reference_regex() {
        let g = parse_group("e$$2-3$$ and $$a|b|c").expect("group");
        assert!(g.enumerate);
        assert_eq!((g.min, g.max, g.separator.as_str()), (2, 3, " and "));
        assert_eq!(g.variants, ["a", "b", "c"]);
        let g = parse_group("a|b").expect("group");
        assert_eq!(
            (g.enumerate, g.min, g.max, g.separator.as_str()),
            (false, 1, 1, ", ")
        );
        // "2$$" with nothing after it is the variant text itself.
        assert_eq!(parse_group("2$$").expect("group").variants, ["2$$"]);
        assert_eq!(parse_group("5$$a|b").map(|g| (g.min, g.max)), Some((2, 2)));
        assert_eq!(
            parse_group("3-1$$a|b|c").map(|g| (g.min, g.max)),
            Some((1, 3))
        );
    }

    #[test]
    fn combinations_in_itertools_order() {
        let g = parse_group("e$$1-2$$+$$a|b|c").expect("group");
        assert_eq!(g.all(), ["a", "b", "c", "a+b", "a+c", "b+c"]);
    }

    #[test]
    fn lines_without_groups_are_unchanged() {
        assert_eq!(
            expand_dynamic_prompt("a cat, {} \\{x", &[3, 4]),
            [("a cat, {} \\{x".to_owned(), 3)]
        );
        // A "{…}" span with no parsable group still makes one copy per seed, as upstream.
        assert_eq!(
            expand_dynamic_prompt("a \\{x\\}", &[3, 4]),
            [("a {x}".to_owned(), 3), ("a {x}".to_owned(), 4)]
        );
        assert!(!has_dynamic_prompt("{}"));
        assert!(has_dynamic_prompt("{a}"));
    }

    /// Expected values from CPython 3.11.7's `random.Random(seed)` `randint` + `sample`,
    /// drawn in the order the module documents (groups of a pass from last to first, a fresh
    /// generator per pass).
    #[test]
    fn choices_match_python_random() {
        let seeds = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
            v.iter().map(|(p, s)| ((*p).to_owned(), *s)).collect()
        };
        assert_eq!(
            expand_dynamic_prompt("a {red|green|blue} cat, {big|small}", &[5, 6]),
            seeds(&[("a green cat, small", 5), ("a red cat, small", 6)])
        );
        assert_eq!(
            expand_dynamic_prompt("{2-3$$ and $$a|b|c|d}", &[7]),
            seeds(&[("b and d and a", 7)])
        );
        assert_eq!(
            expand_dynamic_prompt("{x|{y|z}} w", &[9]),
            seeds(&[("z w", 9)])
        );
        // Enumeration: every copy expands; non-enumerated groups use the copy's seed; all
        // variants take the first seed.
        assert_eq!(
            expand_dynamic_prompt("{e$$a|b} {c|d}", &[11, 12]),
            seeds(&[("a d", 11), ("b c", 11), ("a d", 11), ("b c", 11)])
        );
        let many: Vec<String> = (0..30).map(|i| format!("v{i}")).collect();
        // k = 8 of 30: the pool method; k = 3 of 30: the rejection (set) method.
        assert_eq!(
            expand_dynamic_prompt(&format!("{{8$$/$${}}}", many.join("|")), &[13])[0].0,
            "v9/v21/v28/v25/v5/v20/v7/v27"
        );
        assert_eq!(
            expand_dynamic_prompt(&format!("{{3$$/$${}}}", many.join("|")), &[14])[0].0,
            "v19/v22/v24"
        );
    }
}
