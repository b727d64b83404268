//! JSON to block-style YAML, for the generated artifacts people read and review (the
//! CRD, later the chart). A small emitter of our own instead of a YAML library: we
//! only ever write, the input is plain JSON, and the output is checked by a test that
//! has `kubectl` parse it back into the same JSON.
//!
//! Strings that could read as anything else in YAML (numbers, booleans, `null`,
//! anything with YAML syntax characters) are written as JSON double-quoted strings,
//! which YAML reads identically.

use serde_json::Value;

/// `value` as a YAML document.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => write_map(map, 0, &mut out),
        Value::Array(items) if !items.is_empty() => write_seq(items, 0, &mut out),
        scalar => {
            out.push_str(&inline(scalar));
            out.push('\n');
        }
    }
    out
}

fn write_map(map: &serde_json::Map<String, Value>, indent: usize, out: &mut String) {
    for (key, value) in map {
        push_indent(indent, out);
        out.push_str(&scalar_str(key));
        out.push(':');
        write_after_key(value, indent, out);
    }
}

/// The value of a mapping entry, after `key:`.
fn write_after_key(value: &Value, indent: usize, out: &mut String) {
    match value {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            write_map(m, indent + 2, out);
        }
        // Kubernetes style: sequence items at the key's own indentation.
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            write_seq(items, indent, out);
        }
        scalar => {
            out.push(' ');
            out.push_str(&inline(scalar));
            out.push('\n');
        }
    }
}

fn write_seq(items: &[Value], indent: usize, out: &mut String) {
    for item in items {
        push_indent(indent, out);
        out.push('-');
        match item {
            Value::Object(m) if !m.is_empty() => {
                // The first entry shares the dash's line; the rest align under it.
                let mut first = true;
                for (key, value) in m {
                    if first {
                        out.push(' ');
                        first = false;
                    } else {
                        push_indent(indent + 2, out);
                    }
                    out.push_str(&scalar_str(key));
                    out.push(':');
                    write_after_key(value, indent + 2, out);
                }
            }
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                write_seq(inner, indent + 2, out);
            }
            scalar => {
                out.push(' ');
                out.push_str(&inline(scalar));
                out.push('\n');
            }
        }
    }
}

fn push_indent(indent: usize, out: &mut String) {
    out.extend(std::iter::repeat_n(' ', indent));
}

/// A scalar or an empty collection, on one line.
fn inline(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => scalar_str(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// A string, plain when that is unambiguous, else JSON-quoted.
fn scalar_str(s: &str) -> String {
    if is_plain_safe(s) {
        s.to_owned()
    } else {
        serde_json::Value::String(s.to_owned()).to_string()
    }
}

fn is_plain_safe(s: &str) -> bool {
    const WORDS: [&str; 12] = [
        "true", "false", "yes", "no", "on", "off", "y", "n", "null", "~", ".inf", ".nan",
    ];
    let Some(first) = s.chars().next() else {
        return false;
    };
    (first.is_ascii_alphabetic() || first == '_' || first == '/')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        && !WORDS.iter().any(|w| w.eq_ignore_ascii_case(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_maps_and_sequences_in_kubernetes_style() {
        let v = json!({
            "apiVersion": "v1",
            "spec": {"names": ["a", "b"], "empty": [], "none": {}, "items": [{"name": "x", "count": 1}, {"name": "z"}]},
        });
        assert_eq!(
            to_yaml(&v),
            "apiVersion: v1\nspec:\n  empty: []\n  items:\n  - count: 1\n    name: x\n  - name: z\n  names:\n  - a\n  - b\n  none: {}\n"
        );
    }

    #[test]
    fn ambiguous_strings_are_quoted() {
        for s in [
            "true",
            "No",
            "1",
            "1.5",
            "",
            "-x",
            "a: b",
            "#c",
            "two\nlines",
            "x y",
            "08",
            "null",
            "*",
            "@a",
        ] {
            let out = to_yaml(&json!({ "k": s }));
            assert_eq!(out, format!("k: {}\n", serde_json::Value::String(s.into())), "{s:?}");
        }
        assert_eq!(to_yaml(&json!({"k": "iot.nationtech.io"})), "k: iot.nationtech.io\n");
        assert_eq!(
            to_yaml(&json!({"x-kubernetes-list-type": "map"})),
            "x-kubernetes-list-type: map\n"
        );
    }
}
