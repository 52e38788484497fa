//! A HuJSON parser: JSON plus `//` and `/* */` comments and trailing commas.
//!
//! Every value keeps its byte span so later stages can point at the exact
//! place in the file. Duplicate object keys are rejected here, for every
//! object, because JSON parsers disagree about which copy wins and a policy
//! must not be ambiguous.

use crate::diagnostic::Span;

/// Nesting limit; deeper input is rejected instead of exhausting the stack.
const MAX_DEPTH: usize = 128;

/// A parsed value with its position.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Value {
    pub(crate) kind: Kind,
    pub(crate) span: Span,
}

/// The JSON value kinds. Numbers keep their source text; the policy only
/// needs small integers and must not lose precision deciding that.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    Null,
    Bool(bool),
    Number(String),
    String(String),
    Array(Vec<Value>),
    Object(Vec<Member>),
}

/// One `"key": value` pair of an object, in source order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Member {
    pub(crate) key: String,
    pub(crate) key_span: Span,
    pub(crate) value: Value,
}

/// A syntax error at a byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub(crate) offset: usize,
    pub(crate) message: String,
    pub(crate) hint: Option<String>,
}

impl Kind {
    /// The kind's name as a person writing JSON knows it, for type errors.
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Number(_) => "a number",
            Kind::String(_) => "a string",
            Kind::Array(_) => "an array",
            Kind::Object(_) => "an object",
        }
    }
}

impl Value {
    /// The value as plain JSON (comments and trailing commas gone).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        match &self.kind {
            Kind::Null => serde_json::Value::Null,
            Kind::Bool(b) => serde_json::Value::Bool(*b),
            Kind::Number(text) => serde_json::from_str(text)
                .unwrap_or_else(|_| serde_json::Value::String(text.clone())),
            Kind::String(s) => serde_json::Value::String(s.clone()),
            Kind::Array(items) => {
                serde_json::Value::Array(items.iter().map(Value::to_json).collect())
            }
            Kind::Object(members) => serde_json::Value::Object(
                members
                    .iter()
                    .map(|m| (m.key.clone(), m.value.to_json()))
                    .collect(),
            ),
        }
    }
}

/// Parses one HuJSON document.
pub(crate) fn parse(source: &str) -> Result<Value, SyntaxError> {
    let mut parser = Parser {
        src: source.as_bytes(),
        text: source,
        pos: 0,
    };
    if source.starts_with('\u{feff}') {
        parser.pos = '\u{feff}'.len_utf8();
    }
    parser.skip_trivia()?;
    let value = parser.value(0)?;
    parser.skip_trivia()?;
    if parser.pos < parser.src.len() {
        return Err(parser.error_here(
            format!("unexpected {} after the end of the document", parser.describe_here()),
            Some("a policy file holds a single object; remove the extra text or merge it into the object".into()),
        ));
    }
    Ok(value)
}

struct Parser<'a> {
    src: &'a [u8],
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn value(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        if depth >= MAX_DEPTH {
            return Err(self.error_here(
                format!("values are nested more than {MAX_DEPTH} levels deep"),
                None,
            ));
        }
        let start = self.pos;
        let kind = match self.peek() {
            Some(b'{') => self.object(depth)?,
            Some(b'[') => self.array(depth)?,
            Some(b'"') => Kind::String(self.string()?),
            Some(b'-' | b'0'..=b'9') => Kind::Number(self.number()?),
            Some(b't') => self.literal("true", Kind::Bool(true))?,
            Some(b'f') => self.literal("false", Kind::Bool(false))?,
            Some(b'n') => self.literal("null", Kind::Null)?,
            _ => {
                let hint = if self.peek() == Some(b'\'') {
                    Some("strings use double quotes \"like this\"".into())
                } else {
                    None
                };
                return Err(self.error_here(
                    format!("expected a value, found {}", self.describe_here()),
                    hint,
                ));
            }
        };
        Ok(Value {
            kind,
            span: Span {
                start,
                end: self.pos,
            },
        })
    }

    fn object(&mut self, depth: usize) -> Result<Kind, SyntaxError> {
        self.pos += 1;
        let mut members: Vec<Member> = Vec::new();
        loop {
            self.skip_trivia()?;
            match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Kind::Object(members));
                }
                Some(b'"') => {}
                _ => {
                    return Err(self.error_here(
                        format!(
                            "expected a quoted key or '}}', found {}",
                            self.describe_here()
                        ),
                        Some("object keys are double-quoted strings".into()),
                    ))
                }
            }
            let key_start = self.pos;
            let key = self.string()?;
            let key_span = Span {
                start: key_start,
                end: self.pos,
            };
            if members.iter().any(|m| m.key == key) {
                return Err(SyntaxError {
                    offset: key_start,
                    message: format!("duplicate key \"{key}\""),
                    hint: Some("each key may appear once per object; merge the two entries".into()),
                });
            }
            self.skip_trivia()?;
            if self.peek() != Some(b':') {
                return Err(self.error_here(
                    format!(
                        "expected ':' after key \"{key}\", found {}",
                        self.describe_here()
                    ),
                    None,
                ));
            }
            self.pos += 1;
            self.skip_trivia()?;
            let value = self.value(depth + 1)?;
            members.push(Member {
                key,
                key_span,
                value,
            });
            self.skip_trivia()?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {}
                _ => {
                    return Err(self.error_here(
                        format!(
                            "expected ',' or '}}' after an object member, found {}",
                            self.describe_here()
                        ),
                        Some("separate members with commas".into()),
                    ))
                }
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Kind, SyntaxError> {
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            self.skip_trivia()?;
            if self.peek() == Some(b']') {
                self.pos += 1;
                return Ok(Kind::Array(items));
            }
            items.push(self.value(depth + 1)?);
            self.skip_trivia()?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {}
                _ => {
                    return Err(self.error_here(
                        format!(
                            "expected ',' or ']' after an array element, found {}",
                            self.describe_here()
                        ),
                        Some("separate elements with commas".into()),
                    ))
                }
            }
        }
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        let open = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let run_start = self.pos;
            while let Some(b) = self.peek() {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            // The run stops only at ASCII bytes, so it ends on a char boundary.
            out.push_str(self.text.get(run_start..self.pos).unwrap_or_default());
            match self.peek() {
                None => {
                    return Err(SyntaxError {
                        offset: open,
                        message: "unterminated string".into(),
                        hint: Some("close the string with a double quote".into()),
                    })
                }
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => out.push(self.escape()?),
                Some(_) => {
                    return Err(self.error_here(
                        "control character in a string".into(),
                        Some("write newlines and tabs as \\n and \\t".into()),
                    ))
                }
            }
        }
    }

    fn escape(&mut self) -> Result<char, SyntaxError> {
        let start = self.pos;
        self.pos += 1;
        let Some(c) = self.peek() else {
            return Err(self.error_at(start, "unterminated escape sequence".into(), None));
        };
        self.pos += 1;
        Ok(match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => return self.unicode_escape(start),
            _ => {
                return Err(self.error_at(
                    start,
                    format!(
                        "invalid escape sequence \\{}",
                        char::from(c).escape_default()
                    ),
                    Some("valid escapes are \\\" \\\\ \\/ \\b \\f \\n \\r \\t and \\uXXXX".into()),
                ))
            }
        })
    }

    fn unicode_escape(&mut self, start: usize) -> Result<char, SyntaxError> {
        let first = self.hex4(start)?;
        let code = if (0xD800..0xDC00).contains(&first) {
            if self.src.get(self.pos..self.pos + 2) != Some(b"\\u") {
                return Err(self.error_at(
                    start,
                    "unpaired UTF-16 surrogate in \\u escape".into(),
                    None,
                ));
            }
            self.pos += 2;
            let second = self.hex4(start)?;
            if !(0xDC00..0xE000).contains(&second) {
                return Err(self.error_at(
                    start,
                    "unpaired UTF-16 surrogate in \\u escape".into(),
                    None,
                ));
            }
            0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
        } else {
            first
        };
        char::from_u32(code).ok_or_else(|| {
            self.error_at(
                start,
                "unpaired UTF-16 surrogate in \\u escape".into(),
                None,
            )
        })
    }

    fn hex4(&mut self, start: usize) -> Result<u32, SyntaxError> {
        let digits = self
            .src
            .get(self.pos..self.pos + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|d| u32::from_str_radix(d, 16).ok());
        let Some(value) = digits else {
            return Err(self.error_at(
                start,
                "\\u must be followed by four hex digits".into(),
                None,
            ));
        };
        self.pos += 4;
        Ok(value)
    }

    fn number(&mut self) -> Result<String, SyntaxError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.error_at(start, "invalid number: expected a digit".into(), None)),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(
                    self.error_here("invalid number: expected a digit after '.'".into(), None)
                );
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error_here(
                    "invalid number: expected a digit in the exponent".into(),
                    None,
                ));
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'0'..=b'9')) {
            return Err(self.error_at(
                start,
                "invalid number: leading zeros are not allowed".into(),
                None,
            ));
        }
        Ok(self
            .text
            .get(start..self.pos)
            .unwrap_or_default()
            .to_owned())
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
    }

    fn literal(&mut self, word: &str, kind: Kind) -> Result<Kind, SyntaxError> {
        let end = self.pos + word.len();
        let followed_by_ident = self
            .src
            .get(end)
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
        if self.src.get(self.pos..end) != Some(word.as_bytes()) || followed_by_ident {
            return Err(self.error_here(
                format!("expected a value, found {}", self.describe_here()),
                Some("bare words are not JSON; quote strings with double quotes".into()),
            ));
        }
        self.pos = end;
        Ok(kind)
    }

    /// Skips whitespace and comments.
    fn skip_trivia(&mut self) -> Result<(), SyntaxError> {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\n' | b'\r') => self.pos += 1,
                Some(b'/') => match self.src.get(self.pos + 1) {
                    Some(b'/') => {
                        while !matches!(self.peek(), None | Some(b'\n')) {
                            self.pos += 1;
                        }
                    }
                    Some(b'*') => {
                        let open = self.pos;
                        let body = self.pos + 2;
                        let close = self
                            .src
                            .get(body..)
                            .and_then(|rest| rest.windows(2).position(|w| w == b"*/"));
                        let Some(close) = close else {
                            return Err(self.error_at(
                                open,
                                "unterminated /* comment".into(),
                                Some("close the comment with */".into()),
                            ));
                        };
                        self.pos = body + close + 2;
                    }
                    _ => {
                        return Err(self.error_here(
                            "stray '/'".into(),
                            Some("comments start with // or /*".into()),
                        ))
                    }
                },
                _ => return Ok(()),
            }
        }
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    /// The character at the cursor, quoted, or "end of file".
    fn describe_here(&self) -> String {
        match self
            .text
            .get(self.pos..)
            .and_then(|rest| rest.chars().next())
        {
            None => "end of file".into(),
            Some(c) if c.is_control() => format!("'{}'", c.escape_default()),
            Some(c) => format!("'{c}'"),
        }
    }

    fn error_here(&self, message: String, hint: Option<String>) -> SyntaxError {
        self.error_at(self.pos, message, hint)
    }

    fn error_at(&self, offset: usize, message: String, hint: Option<String>) -> SyntaxError {
        SyntaxError {
            offset,
            message,
            hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::diagnostic::{Location, SourceMap};

    fn json(source: &str) -> serde_json::Value {
        parse(source).unwrap().to_json()
    }

    fn error_location(source: &str) -> (Location, String) {
        let err = parse(source).unwrap_err();
        (
            SourceMap::new("f", source).location(err.offset),
            err.message,
        )
    }

    #[test]
    fn comments_and_trailing_commas() {
        let source = r#"
            // leading comment
            {
              /* block
                 comment */ "a": [1, 2, 3,], // trailing
              "b": {"c": true, "d": null,},
            }
            // end
        "#;
        assert_eq!(
            json(source),
            serde_json::json!({"a": [1, 2, 3], "b": {"c": true, "d": null}})
        );
    }

    #[test]
    fn strings_with_escapes() {
        assert_eq!(
            json(r#""a\"b\\c\u00e9\/\n\t""#),
            serde_json::json!("a\"b\\cé/\n\t")
        );
        assert_eq!(json(r#""\ud83d\ude00""#), serde_json::json!("😀"));
        assert_eq!(json("\"héllo ✓\""), serde_json::json!("héllo ✓"));
    }

    #[test]
    fn numbers_and_nesting() {
        assert_eq!(
            json("[0, -1, 1.5, 2e3, -0.25E-2, 18446744073709551615]"),
            serde_json::json!([0, -1, 1.5, 2000.0, -0.0025, 18446744073709551615u64])
        );
        assert_eq!(
            json(r#"{"a":{"b":[[{"c":[]}]]}}"#),
            serde_json::json!({"a":{"b":[[{"c":[]}]]}})
        );
    }

    #[test]
    fn spans_cover_values() {
        let source = r#"{"key": [1, "two"]}"#;
        let value = parse(source).unwrap();
        let Kind::Object(members) = &value.kind else {
            panic!("not an object")
        };
        assert_eq!(
            &source[members[0].key_span.start..members[0].key_span.end],
            "\"key\""
        );
        assert_eq!(
            &source[members[0].value.span.start..members[0].value.span.end],
            "[1, \"two\"]"
        );
    }

    #[test]
    fn errors_point_at_the_offending_character() {
        assert_eq!(
            error_location("{\n  \"a\": 1\n  \"b\": 2\n}").0,
            Location { line: 3, column: 3 }
        );
        assert_eq!(
            error_location("{\"a\": tru}").0,
            Location { line: 1, column: 7 }
        );
        assert_eq!(error_location("[1,,2]").0, Location { line: 1, column: 4 });
        assert_eq!(
            error_location("{\"a\": [1, 2}").0,
            Location {
                line: 1,
                column: 12
            }
        );
        let (at, message) = error_location("{\n \"a\": \"x");
        assert_eq!(
            (at, message.as_str()),
            (Location { line: 2, column: 7 }, "unterminated string")
        );
        let (at, message) = error_location("{} /* open");
        assert_eq!(
            (at, message.as_str()),
            (Location { line: 1, column: 4 }, "unterminated /* comment")
        );
        let (at, message) = error_location("{\"a\": 1, \"a\": 2}");
        assert_eq!(
            (at, message.as_str()),
            (
                Location {
                    line: 1,
                    column: 10
                },
                "duplicate key \"a\""
            )
        );
        let (at, message) = error_location("{} {}");
        assert_eq!(at, Location { line: 1, column: 4 });
        assert!(
            message.contains("after the end of the document"),
            "{message}"
        );
        assert!(error_location("{'a': 1}")
            .1
            .contains("expected a quoted key"));
        assert!(error_location("\"\\x\"").1.contains("invalid escape"));
        assert!(error_location("\"\\ud800\"").1.contains("surrogate"));
        assert!(error_location("01").1.contains("leading zeros"));
        assert!(error_location("\"a\nb\"").1.contains("control character"));
        assert!(error_location("").1.contains("end of file"));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let source = "[".repeat(100_000);
        assert!(parse(&source).unwrap_err().message.contains("nested"));
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            any::<u64>().prop_map(|n| serde_json::json!(n)),
            any::<f64>()
                .prop_filter_map("finite", serde_json::Number::from_f64)
                .prop_map(serde_json::Value::Number),
            any::<String>().prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn random_text_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn json_like_text_never_panics(text in r#"[\[\]{}",:0-9a-z\\/* \n.eE+-]{0,64}"#) {
            let _ = parse(&text);
        }

        #[test]
        fn printed_json_parses_to_the_same_value(value in arb_json()) {
            for text in [serde_json::to_string(&value).unwrap(), serde_json::to_string_pretty(&value).unwrap()] {
                let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(parse(&text).unwrap().to_json(), reference);
            }
        }
    }
}
