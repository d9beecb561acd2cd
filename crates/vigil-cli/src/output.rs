//! Tables and JSON for standard output.

use serde_json::Value;

/// Widest a cell gets before it is cut with `…`.
const MAX_CELL: usize = 60;

/// `value` as pretty JSON with a final newline.
pub fn json(value: &Value) -> String {
    let mut s = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    s.push('\n');
    s
}

/// A value as one cell: strings as they are, lists joined with `,`, a
/// one-field object as `field value` (a route's `{"prefix": "/"}` reads `prefix /`),
/// nothing as `-`.
pub fn cell(value: Option<&Value>) -> String {
    let text = match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) if s.is_empty() => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.is_empty() => "-".to_owned(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| cell(Some(v)))
            .collect::<Vec<_>>()
            .join(","),
        Some(Value::Object(o)) if o.len() == 1 => o
            .iter()
            .map(|(k, v)| format!("{k} {}", cell(Some(v))))
            .collect(),
        Some(other) => other.to_string(),
    };
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > MAX_CELL {
        let mut cut: String = one_line.chars().take(MAX_CELL - 1).collect();
        cut.push('…');
        cut
    } else {
        one_line
    }
}

/// Rows under headers, columns two spaces apart, the last one unpadded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let headers: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&headers).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                out.push_str(c);
                out.extend(std::iter::repeat_n(' ', w - c.chars().count() + 2));
            }
        }
        out.push('\n');
    }
    out
}

/// The rows of `items` for `columns` (header, JSON Pointer).
pub fn rows<'a>(items: impl IntoIterator<Item = &'a Value>, pointers: &[&str]) -> Vec<Vec<String>> {
    items
        .into_iter()
        .map(|item| pointers.iter().map(|p| cell(item.pointer(p))).collect())
        .collect()
}

/// A resource's top-level fields as `field  value` lines.
pub fn fields(value: &Value) -> String {
    let rows: Vec<Vec<String>> = match value {
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::Object(_) => v.to_string(),
                    _ => cell(Some(v)),
                };
                vec![k.clone(), text]
            })
            .collect(),
        other => vec![vec!["value".into(), cell(Some(other))]],
    };
    table(&["FIELD", "VALUE"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cells_are_short_single_lines() {
        assert_eq!(cell(None), "-");
        assert_eq!(cell(Some(&json!(null))), "-");
        assert_eq!(cell(Some(&json!("a\nb"))), "a b");
        assert_eq!(cell(Some(&json!(["x", "y"]))), "x,y");
        assert_eq!(cell(Some(&json!([]))), "-");
        assert_eq!(cell(Some(&json!({"prefix": "/api"}))), "prefix /api");
        assert_eq!(cell(Some(&json!(true))), "true");
        assert_eq!(cell(Some(&json!(12))), "12");
        let long = "x".repeat(100);
        assert_eq!(cell(Some(&json!(long))).chars().count(), MAX_CELL);
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["NAME", "VERSION"],
            &[
                vec!["staff".into(), "3".into()],
                vec!["a".into(), "12".into()],
            ],
        );
        assert_eq!(t, "NAME   VERSION\nstaff  3\na      12\n");
    }

    #[test]
    fn rows_follow_pointers() {
        let items = [json!({"name": "a", "path": {"exact": "/x"}})];
        assert_eq!(
            rows(&items, &["/name", "/path", "/missing"]),
            vec![vec!["a".to_owned(), "exact /x".to_owned(), "-".to_owned()]]
        );
    }
}
