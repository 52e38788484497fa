//! Diagnostics: what is wrong with a policy file, where, and how to fix it.

use std::fmt;

use serde::Serialize;

/// How serious a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The policy is rejected.
    Error,
    /// The policy loads, but something in it is ignored.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One problem in a policy file, with its position and a hint at the fix.
///
/// `line` and `column` are 1-based; columns count characters. Both are 0 for
/// problems that concern the whole file (e.g. it cannot be read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file name given to the parser.
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when there is something useful to say.
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}: {}", self.file, self.severity, self.message)?;
        } else {
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file, self.line, self.column, self.severity, self.message
            )?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// A list of diagnostics; the error type of parsing, checking and testing a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Whether any diagnostic is an error (rather than a warning).
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(|d| d.severity == Severity::Error)
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// A byte range in the policy source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Span {
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// A 1-based line and column, kept on checked items so later stages (tests,
/// compilation) can point back into the file without the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Location {
    pub(crate) line: u32,
    pub(crate) column: u32,
}

/// Turns byte offsets into lines and columns, and builds diagnostics.
#[derive(Debug)]
pub(crate) struct SourceMap<'a> {
    file: &'a str,
    source: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> SourceMap<'a> {
    pub(crate) fn new(file: &'a str, source: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(source.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        SourceMap {
            file,
            source,
            line_starts,
        }
    }

    /// The source text of `span` on one line (whitespace runs collapsed), for explanations.
    pub(crate) fn snippet(&self, span: Span) -> String {
        let text = self.source.get(span.start..span.end).unwrap_or_default();
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    pub(crate) fn location(&self, offset: usize) -> Location {
        let offset = offset.min(self.source.len());
        let line_index = self
            .line_starts
            .partition_point(|&start| start <= offset)
            .saturating_sub(1);
        let line_start = self.line_starts.get(line_index).copied().unwrap_or(0);
        let column = self
            .source
            .get(line_start..offset)
            .map_or(offset - line_start, |text| text.chars().count());
        Location {
            line: to_u32(line_index + 1),
            column: to_u32(column + 1),
        }
    }

    pub(crate) fn diagnostic_at(
        &self,
        severity: Severity,
        location: Location,
        message: String,
        hint: Option<String>,
    ) -> Diagnostic {
        Diagnostic {
            severity,
            file: self.file.to_owned(),
            line: location.line,
            column: location.column,
            message,
            hint,
        }
    }

    pub(crate) fn error(&self, span: Span, message: String, hint: Option<String>) -> Diagnostic {
        self.diagnostic_at(Severity::Error, self.location(span.start), message, hint)
    }

    pub(crate) fn warning(&self, span: Span, message: String, hint: Option<String>) -> Diagnostic {
        self.diagnostic_at(Severity::Warning, self.location(span.start), message, hint)
    }
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The closest of `candidates` to `word`, for "did you mean" hints.
///
/// Case-insensitive edit distance of at most 2, and less than half the
/// length of the name after any `group:`/`tag:` prefix, so that short names
/// (`tag:db`, `tag:web`) are not "near" each other.
pub(crate) fn suggest<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    let word = word.to_lowercase();
    let name_len = word.rsplit(':').next().unwrap_or_default().chars().count();
    candidates
        .into_iter()
        .map(|c| (edit_distance(&word, &c.to_lowercase()), c))
        .filter(|(distance, _)| *distance <= 2 && 2 * distance < name_len)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

/// Edit distance where swapping two adjacent characters counts as one edit
/// (optimal string alignment), since transposed letters are a common typo.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        for j in 0..=b.len() {
            d[i * width + j] = if i == 0 || j == 0 {
                i + j
            } else {
                let cost = usize::from(a[i - 1] != b[j - 1]);
                let mut best = (d[(i - 1) * width + j] + 1)
                    .min(d[i * width + j - 1] + 1)
                    .min(d[(i - 1) * width + j - 1] + cost);
                if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                    best = best.min(d[(i - 2) * width + j - 2] + 1);
                }
                best
            };
        }
    }
    d[a.len() * width + b.len()]
}

/// "known groups: a, b" style list for hints, capped so huge policies stay readable.
pub(crate) fn known_list<'c>(what: &str, names: impl IntoIterator<Item = &'c str>) -> String {
    const SHOWN: usize = 8;
    let names: Vec<&str> = names.into_iter().collect();
    if names.is_empty() {
        return format!("no {what} are defined");
    }
    let mut list = names[..names.len().min(SHOWN)].join(", ");
    if names.len() > SHOWN {
        list.push_str(&format!(", … ({} more)", names.len() - SHOWN));
    }
    format!("known {what}: {list}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_one_based_and_count_characters() {
        let source = "{\n  \"é\": x\n}";
        let map = SourceMap::new("p.hujson", source);
        assert_eq!(map.location(0), Location { line: 1, column: 1 });
        assert_eq!(map.location(2), Location { line: 2, column: 1 });
        let x = source.find('x').unwrap();
        assert_eq!(map.location(x), Location { line: 2, column: 8 });
        assert_eq!(map.location(source.len()), Location { line: 3, column: 2 });
    }

    #[test]
    fn display_matches_the_documented_shape() {
        let d = Diagnostic {
            severity: Severity::Error,
            file: "policy.hujson".into(),
            line: 12,
            column: 5,
            message: "undefined group \"group:eng\"".into(),
            hint: Some("define it under \"groups\"".into()),
        };
        assert_eq!(
            d.to_string(),
            "policy.hujson:12:5: error: undefined group \"group:eng\"\n  hint: define it under \"groups\""
        );
        let whole_file = Diagnostic {
            line: 0,
            column: 0,
            hint: None,
            ..d
        };
        assert_eq!(
            whole_file.to_string(),
            "policy.hujson: error: undefined group \"group:eng\""
        );
    }

    #[test]
    fn suggestions_tolerate_case_and_small_typos() {
        let keys = ["acls", "groups", "tagOwners"];
        assert_eq!(suggest("acl", keys), Some("acls"));
        assert_eq!(suggest("tagowners", keys), Some("tagOwners"));
        assert_eq!(suggest("gruops", keys), Some("groups"));
        assert_eq!(suggest("banana", keys), None);
        assert_eq!(suggest("tag:db", ["tag:web"]), None);
        assert_eq!(suggest("dts", ["src", "dst"]), Some("dst"));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(suggest("group:opz", ["group:ops"]), Some("group:ops"));
    }

    #[test]
    fn known_lists_are_capped() {
        assert_eq!(known_list("groups", []), "no groups are defined");
        assert_eq!(known_list("groups", ["group:a"]), "known groups: group:a");
        let many: Vec<String> = (0..10).map(|i| format!("h{i}")).collect();
        let text = known_list("hosts", many.iter().map(String::as_str));
        assert!(text.ends_with("h7, … (2 more)"), "{text}");
    }
}
