//! Small readers for request-body fields that collect every problem with its pointer.

use serde_json::{Map, Value};

use super::FieldError;

/// An optional number in `[lo, hi]` (`None` when absent or null).
pub fn f64_in(
    obj: &Map<String, Value>,
    key: &str,
    (lo, hi): (f64, f64),
    pointer: &str,
    errors: &mut Vec<FieldError>,
) -> Option<f64> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Some(x),
            _ => {
                errors.push(FieldError::new(
                    format!("{pointer}/{key}"),
                    format!("must be a number in [{lo}, {hi}]"),
                ));
                None
            }
        },
    }
}

/// An optional boolean (`default` when absent or null, and after reporting a non-boolean).
pub fn bool_or(
    obj: &Map<String, Value>,
    key: &str,
    default: bool,
    pointer: &str,
    errors: &mut Vec<FieldError>,
) -> bool {
    match obj.get(key) {
        None | Some(Value::Null) => default,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            errors.push(FieldError::new(
                format!("{pointer}/{key}"),
                "must be a boolean",
            ));
            default
        }
    }
}

/// An optional integer in `[lo, hi]`.
pub fn usize_in(
    obj: &Map<String, Value>,
    key: &str,
    (lo, hi): (usize, usize),
    pointer: &str,
    errors: &mut Vec<FieldError>,
) -> Option<usize> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(x) if (lo as u64..=hi as u64).contains(&x) => Some(x as usize),
            _ => {
                errors.push(FieldError::new(
                    format!("{pointer}/{key}"),
                    format!("must be an integer in [{lo}, {hi}]"),
                ));
                None
            }
        },
    }
}

/// An optional string out of `allowed`.
pub fn choice<'a>(
    obj: &Map<String, Value>,
    key: &str,
    allowed: &[&'a str],
    pointer: &str,
    errors: &mut Vec<FieldError>,
) -> Option<&'a str> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_str().and_then(|s| allowed.iter().find(|a| **a == s)) {
            Some(a) => Some(a),
            None => {
                errors.push(FieldError::new(
                    format!("{pointer}/{key}"),
                    format!("must be one of {}", allowed.join(", ")),
                ));
                None
            }
        },
    }
}

/// An optional object (`None` when absent or null; a problem when not an object).
pub fn object<'v>(
    obj: &'v Map<String, Value>,
    key: &str,
    pointer: &str,
    errors: &mut Vec<FieldError>,
) -> Option<&'v Map<String, Value>> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            errors.push(FieldError::new(
                format!("{pointer}/{key}"),
                "must be an object",
            ));
            None
        }
    }
}

/// Report keys of `obj` that are not in `allowed`.
pub fn deny_unknown(
    obj: &Map<String, Value>,
    allowed: &[&str],
    pointer: &str,
    errors: &mut Vec<FieldError>,
) {
    for key in obj.keys() {
        if !allowed.contains(&key.as_str()) {
            errors.push(FieldError::new(
                format!("{pointer}/{}", escape(key)),
                format!("unknown field; expected one of {}", allowed.join(", ")),
            ));
        }
    }
}

pub use crate::compress::pointer_token as escape;

/// The JSON pointer, under `base` (a step's pointer, `/steps/2`), of a parameter named the way
/// `compress` names it: `lr`, `optimizer.momentum`, `features[0].teacher`, `layer_lr[fc1.*]`
/// (a bracketed key is one reference token, dots and all).
pub fn pointer_of(base: &str, field: &str) -> String {
    let mut out = String::from(base);
    let mut token = String::new();
    let mut in_key = false;
    let flush = |out: &mut String, token: &mut String| {
        if !token.is_empty() {
            out.push('/');
            out.push_str(&escape(token));
            token.clear();
        }
    };
    for c in field.chars() {
        match (c, in_key) {
            ('[', false) => {
                flush(&mut out, &mut token);
                in_key = true;
            }
            (']', true) => {
                out.push('/');
                out.push_str(&escape(&token));
                token.clear();
                in_key = false;
            }
            ('.', false) => flush(&mut out, &mut token),
            (c, _) => token.push(c),
        }
    }
    flush(&mut out, &mut token);
    out
}

/// An optional `seed` (a non-negative integer; `null` or absent: the job's).
pub fn seed(obj: &Map<String, Value>, pointer: &str, errors: &mut Vec<FieldError>) -> Option<u64> {
    match obj.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => v.as_u64().or_else(|| {
            errors.push(FieldError::new(
                format!("{pointer}/seed"),
                "must be a non-negative integer",
            ));
            None
        }),
    }
}

/// The retraining embedded in another step (a pruning schedule's, QAT's) at `pointer`: labels
/// required (a language model learns from its text), no layer options; `transformers`: may
/// train a transformer (QAT) or not (pruning schedules refuse them elsewhere).
pub fn embedded_training(
    obj: &Map<String, Value>,
    pointer: &str,
    facts: Option<&super::Facts>,
    transformers: bool,
    errors: &mut Vec<FieldError>,
) -> Option<super::FinetuneSpec> {
    super::train::parse_training(
        obj,
        pointer,
        facts,
        super::train::TrainingRules {
            extra_fields: &[],
            labels_required: true,
            layer_options: false,
            transformers,
        },
        errors,
    )
}

#[cfg(test)]
mod tests {
    use super::pointer_of;

    #[test]
    fn compress_field_names_become_pointers() {
        assert_eq!(pointer_of("/steps/0", "lr"), "/steps/0/lr");
        assert_eq!(
            pointer_of("/steps/1", "optimizer.momentum"),
            "/steps/1/optimizer/momentum"
        );
        assert_eq!(
            pointer_of("/steps/0", "features[2].teacher"),
            "/steps/0/features/2/teacher"
        );
        assert_eq!(
            pointer_of("/steps/0", "layer_lr[fc1.*]"),
            "/steps/0/layer_lr/fc1.*"
        );
        assert_eq!(
            pointer_of("/steps/0", "layers[a/b~c]"),
            "/steps/0/layers/a~1b~0c"
        );
        assert_eq!(pointer_of("/steps/3", ""), "/steps/3");
    }
}
