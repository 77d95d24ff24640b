//! How client commands print: JSON documents (or JSON lines while following a job), or
//! tables for people.

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use serde_json::Value;

use super::OutputFormat;

/// The chosen output.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    format: OutputFormat,
}

/// A figure for a table cell.
pub(super) fn cell(v: &Value) -> String {
    match v {
        Value::Null => "–".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => {
                if f.abs() >= 1000.0 || f == 0.0 {
                    format!("{f:.1}")
                } else {
                    format!("{f:.4}")
                }
            }
            _ => n.to_string(),
        },
        other => {
            let s = other.to_string();
            if s.len() > 60 {
                format!(
                    "{}…",
                    &s[..s.char_indices().nth(59).map_or(s.len(), |(i, _)| i)]
                )
            } else {
                s
            }
        }
    }
}

/// Bytes for people.
pub(super) fn bytes(v: &Value) -> String {
    match v.as_f64() {
        None => cell(v),
        Some(b) => {
            let units = ["B", "KiB", "MiB", "GiB", "TiB"];
            let mut x = b;
            let mut u = 0;
            while x >= 1024.0 && u + 1 < units.len() {
                x /= 1024.0;
                u += 1;
            }
            if u == 0 {
                format!("{b:.0} B")
            } else {
                format!("{x:.1} {}", units[u])
            }
        }
    }
}

impl Output {
    /// An output in `format`.
    pub fn new(format: OutputFormat) -> Output {
        Output { format }
    }

    /// Whether it prints JSON.
    pub fn is_json(&self) -> bool {
        self.format == OutputFormat::Json
    }

    /// One JSON line (following a job when not on a terminal).
    pub fn line(&self, v: &Value) {
        println!("{v}");
    }

    /// One resource: JSON, or its top-level fields as a table.
    pub fn object(&self, _kind: &str, v: &Value) {
        if self.is_json() {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
            return;
        }
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        if let Some(o) = v.as_object() {
            for (k, val) in o {
                let shown = if k.ends_with("size_bytes") || k == "bytes" {
                    bytes(val)
                } else {
                    cell(val)
                };
                t.add_row(vec![k.clone(), shown]);
            }
        }
        println!("{t}");
    }

    /// A key just created: its fields, and its secret with the warning that it is shown once.
    pub fn new_key(&self, v: &Value) {
        if self.is_json() {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
            return;
        }
        let mut shown = v.clone();
        if let Some(o) = shown.as_object_mut() {
            o.remove("secret");
        }
        self.object("key", &shown);
        println!(
            "\nAPI key (shown once; store it now):\n{}",
            v["secret"].as_str().unwrap_or("")
        );
    }

    /// A page of a list: JSON, or a table of the columns that matter for `kind`.
    pub fn list(&self, kind: &str, page: &Value) {
        if self.is_json() {
            println!("{}", serde_json::to_string_pretty(page).unwrap_or_default());
            return;
        }
        let columns: &[&str] = match kind {
            "models" => &[
                "id",
                "name",
                "family",
                "parameters",
                "size_bytes",
                "created_at",
            ],
            "datasets" => &[
                "id",
                "name",
                "format",
                "samples",
                "num_classes",
                "size_bytes",
            ],
            "keys" => &[
                "id",
                "name",
                "tenant",
                "scope",
                "prefix",
                "created_at",
                "last_used_at",
            ],
            _ => &["id", "state", "ops", "progress", "created_at"],
        };
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(columns.to_vec());
        for item in page["items"].as_array().into_iter().flatten() {
            let row: Vec<String> = columns
                .iter()
                .map(|c| match *c {
                    "ops" => item["steps"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|s| s["op"].as_str())
                        .collect::<Vec<_>>()
                        .join(" → "),
                    "progress" => item["progress"]["fraction"]
                        .as_f64()
                        .map_or("–".into(), |f| format!("{:.0}%", f * 100.0)),
                    "size_bytes" => bytes(&item[*c]),
                    c => cell(&item[c]),
                })
                .collect();
            t.add_row(row);
        }
        println!("{t}");
        if let Some(next) = page["next_cursor"].as_str() {
            println!("more: ?cursor={next}");
        }
    }

    /// A job's metrics: JSON, or the summary table (input vs output) and a line per step.
    pub fn metrics(&self, m: &Value) {
        if self.is_json() {
            println!("{}", serde_json::to_string_pretty(m).unwrap_or_default());
            return;
        }
        println!("{}", summary_table(m));
    }
}

/// The figures of a job's metrics, input beside output.
pub(super) fn summary_table(m: &Value) -> Table {
    let (b, f) = (&m["baseline"], &m["final"]);
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["", "input", "output"]);
    let rows: &[(&str, &str)] = &[
        ("size", "size_bytes"),
        ("parameters", "parameters"),
        ("non-zero", "nonzero"),
        ("bits per weight", "bits_per_weight"),
        ("encoded size", "packed_size_bytes"),
        ("compression ratio", "compression_ratio"),
        ("accuracy", "accuracy"),
        ("loss", "loss"),
        ("perplexity", "perplexity"),
        ("KL divergence (mean)", "/kl_divergence/mean"),
        ("top-1 agreement", "top1_agreement"),
        ("embedding cosine (min)", "/embedding_cosine/min"),
        ("agreement", "agreement"),
    ];
    for (label, key) in rows {
        let get = |v: &Value| -> Value {
            if let Some(p) = key.strip_prefix('/') {
                v.pointer(&format!("/{p}")).cloned().unwrap_or(Value::Null)
            } else {
                v.get(*key).cloned().unwrap_or(Value::Null)
            }
        };
        let (x, y) = (get(b), get(f));
        if x.is_null() && y.is_null() {
            continue;
        }
        let fmt = |v: &Value| {
            if key.ends_with("bytes") {
                bytes(v)
            } else {
                cell(v)
            }
        };
        t.add_row(vec![label.to_string(), fmt(&x), fmt(&y)]);
    }
    for (i, s) in m["steps"].as_array().into_iter().flatten().enumerate() {
        let summary = &s["summary"];
        let brief: Vec<String> = [
            "sparsity",
            "bits_per_weight",
            "type",
            "method",
            "perplexity",
            "accuracy",
        ]
        .iter()
        .filter_map(|k| {
            summary
                .get(*k)
                .filter(|v| !v.is_null())
                .map(|v| format!("{k} {}", cell(v)))
        })
        .collect();
        t.add_row(vec![
            format!("step {} {}", i + 1, s["op"].as_str().unwrap_or("")),
            format!("{:.1} s", s["seconds"].as_f64().unwrap_or(0.0)),
            brief.join(", "),
        ]);
    }
    t
}
