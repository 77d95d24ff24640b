//! Tensor selection: which tensors a weight operation touches.
//!
//! This module owns the `include` / `exclude` glob patterns of the REST contract and the
//! default selection (floating-point tensors with at least two dimensions: linear and
//! conv kernels; biases and norms are left alone unless included; for transformers, the
//! linear layers of the blocks: [`family_default`]). It only looks at names, dtypes and
//! shapes, never at tensor data.

use super::engine::Family;
use super::formats::safetensors::TensorInfo;

/// Whether `name` matches the glob `pattern`: `*` matches any run of characters (dots
/// included), `?` exactly one character, everything else itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Position of the last `*` seen and the name position it is currently matched up to;
    // on a mismatch the star swallows one more character. Linear backtracking suffices
    // because a later star subsumes every choice made by an earlier one.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether a tensor belongs to the default selection: a floating-point tensor with
/// `ndim >= 2`.
pub fn is_default_selected(t: &TensorInfo) -> bool {
    t.dtype.is_float() && t.shape.len() >= 2
}

/// The default selection of a transformer family, as include patterns: the linear layers
/// inside its blocks (attention projections and feed-forward layers) — not the embeddings,
/// the norms, a tied output head, a pooler or a classifier. `None` for `sequential`, whose
/// default is [`is_default_selected`].
pub fn family_default(family: Family) -> Option<Vec<String>> {
    let patterns: &[&str] = match family {
        Family::Sequential => return None,
        Family::Bert => &[
            "*encoder.layer.*.attention.self.*.weight",
            "*encoder.layer.*.intermediate.dense.weight",
            "*encoder.layer.*.output.dense.weight",
        ],
        Family::Llama => &[
            "model.layers.*.self_attn.*_proj.weight",
            "model.layers.*.mlp.*_proj.weight",
        ],
    };
    Some(patterns.iter().map(|p| p.to_string()).collect())
}

/// The tensors an operation touches, in file order: those matching any `include`
/// pattern (or the default selection when `include` is empty) and no `exclude` pattern.
pub fn select<'a>(
    tensors: &'a [TensorInfo],
    include: &[String],
    exclude: &[String],
) -> Vec<&'a TensorInfo> {
    tensors
        .iter()
        .filter(|t| {
            let included = if include.is_empty() {
                is_default_selected(t)
            } else {
                include.iter().any(|p| glob_match(p, &t.name))
            };
            included && !exclude.iter().any(|p| glob_match(p, &t.name))
        })
        .collect()
}

/// Which list a pattern came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternList {
    /// The `include` list.
    Include,
    /// The `exclude` list.
    Exclude,
}

impl PatternList {
    /// The field name in a step object (`include` / `exclude`).
    pub fn field(self) -> &'static str {
        match self {
            PatternList::Include => "include",
            PatternList::Exclude => "exclude",
        }
    }
}

/// A pattern that matched no tensor name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmatchedPattern {
    /// The list it came from.
    pub list: PatternList,
    /// Its index in that list.
    pub index: usize,
    /// The pattern itself.
    pub pattern: String,
}

impl UnmatchedPattern {
    /// JSON pointer relative to the step object, e.g. `/include/1`; callers prefix the
    /// step's own pointer (`/steps/0`).
    pub fn pointer(&self) -> String {
        format!("/{}/{}", self.list.field(), self.index)
    }

    /// A user-facing explanation.
    pub fn detail(&self) -> String {
        format!(
            "{} pattern {:?} matches no tensor in the model",
            self.list.field(),
            self.pattern
        )
    }
}

/// The `include` and `exclude` patterns that match no tensor name at all (exclude
/// patterns are checked against every tensor, not only the included ones), so the API
/// can refuse a likely typo with a 422 and a pointer.
pub fn unmatched_patterns(
    tensors: &[TensorInfo],
    include: &[String],
    exclude: &[String],
) -> Vec<UnmatchedPattern> {
    let lists = [
        (PatternList::Include, include),
        (PatternList::Exclude, exclude),
    ];
    lists
        .into_iter()
        .flat_map(|(list, patterns)| {
            patterns
                .iter()
                .enumerate()
                .filter(|(_, p)| !tensors.iter().any(|t| glob_match(p, &t.name)))
                .map(move |(index, p)| UnmatchedPattern {
                    list,
                    index,
                    pattern: p.clone(),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::formats::safetensors::Dtype;

    fn t(name: &str, dtype: Dtype, shape: &[usize]) -> TensorInfo {
        TensorInfo {
            name: name.to_owned(),
            dtype,
            shape: shape.to_vec(),
            data_offsets: (0, 0),
        }
    }

    fn model() -> Vec<TensorInfo> {
        vec![
            t("0.weight", Dtype::F32, &[6, 1, 5, 5]),
            t("0.bias", Dtype::F32, &[6]),
            t("fc1.weight", Dtype::F32, &[300, 784]),
            t("fc1.bias", Dtype::F32, &[300]),
            t("bn.running_mean", Dtype::F32, &[300]),
            t("bn.num_batches_tracked", Dtype::I64, &[]),
            t("codes", Dtype::U8, &[10, 10]),
            t("fc2.weight", Dtype::BF16, &[10, 300]),
        ]
    }

    fn names(v: Vec<&TensorInfo>) -> Vec<&str> {
        v.into_iter().map(|t| t.name.as_str()).collect()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn glob_semantics() {
        assert!(glob_match("fc1.weight", "fc1.weight"));
        assert!(!glob_match("fc1.weight", "fc1.weights"));
        assert!(!glob_match("fc1", "fc1.weight"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "a.b.c"));
        assert!(glob_match("*.weight", "layers.0.attn.weight"));
        assert!(glob_match("fc?.weight", "fc2.weight"));
        assert!(!glob_match("fc?.weight", "fc10.weight"));
        assert!(glob_match("*a*b*c", "xaybzabc"));
        assert!(!glob_match("*a*b*c", "xaybzab"));
        assert!(glob_match("a**", "a"));
        assert!(!glob_match("?", ""));
        assert!(glob_match("é?", "éà"));
        assert!(!glob_match("", "a"));
        assert!(glob_match("", ""));
    }

    #[test]
    fn transformer_defaults_are_the_block_linear_layers() {
        let names = [
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.11.mlp.down_proj.weight",
            "model.norm.weight",
            "lm_head.weight",
            "bert.embeddings.word_embeddings.weight",
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.encoder.layer.0.attention.self.query.bias",
            "bert.encoder.layer.0.attention.output.dense.weight",
            "bert.encoder.layer.0.attention.output.LayerNorm.weight",
            "encoder.layer.5.intermediate.dense.weight",
            "encoder.layer.5.output.dense.weight",
            "bert.pooler.dense.weight",
            "classifier.weight",
        ];
        let chosen = |f: Family| -> Vec<&str> {
            let pats = family_default(f).unwrap();
            names
                .iter()
                .copied()
                .filter(|n| pats.iter().any(|p| glob_match(p, n)))
                .collect()
        };
        assert_eq!(
            chosen(Family::Llama),
            [
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.o_proj.weight",
                "model.layers.11.mlp.down_proj.weight"
            ]
        );
        assert_eq!(
            chosen(Family::Bert),
            [
                "bert.encoder.layer.0.attention.self.query.weight",
                "bert.encoder.layer.0.attention.output.dense.weight",
                "encoder.layer.5.intermediate.dense.weight",
                "encoder.layer.5.output.dense.weight"
            ]
        );
        assert_eq!(family_default(Family::Sequential), None);
    }

    #[test]
    fn default_selection_is_float_matrices_and_kernels() {
        let m = model();
        assert_eq!(
            names(select(&m, &[], &[])),
            ["0.weight", "fc1.weight", "fc2.weight"]
        );
    }

    #[test]
    fn include_and_exclude() {
        let m = model();
        assert_eq!(
            names(select(&m, &s(&["*.bias", "fc1.*"]), &[])),
            ["0.bias", "fc1.weight", "fc1.bias"]
        );
        assert_eq!(names(select(&m, &[], &s(&["fc*"]))), ["0.weight"]);
        // Include overrides the default: integer tensors can be named explicitly.
        assert_eq!(names(select(&m, &s(&["codes"]), &[])), ["codes"]);
        assert!(select(&m, &s(&["*"]), &s(&["*"])).is_empty());
    }

    #[test]
    fn reports_patterns_that_match_nothing() {
        let m = model();
        let un = unmatched_patterns(&m, &s(&["fc1.*", "fc3.weight"]), &s(&["*.bias", "conv*"]));
        assert_eq!(un.len(), 2);
        assert_eq!(un[0].pointer(), "/include/1");
        assert_eq!(un[0].pattern, "fc3.weight");
        assert_eq!(un[1].pointer(), "/exclude/1");
        assert!(un[1].detail().contains("\"conv*\""));
        assert!(unmatched_patterns(&m, &[], &[]).is_empty());
    }
}
