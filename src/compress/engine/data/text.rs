//! Text datasets (API.md "Text datasets"): `text` (UTF-8, documents separated by a blank
//! line) and `jsonl` (one object a line: `{"text"}`, optional `"text_pair"` and integer
//! `"label"`), stored canonically as JSONL; and their tokenization with the model's own
//! `tokenizer.json` (the `tokenizers` crate) into padded batches (encoders) or a token stream
//! cut into context windows (language models).

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{Batch, Dataset, DatasetX, MAX_CLASSES};
use crate::compress::{Error, Result};

/// One document of a text dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// The text.
    pub text: String,
    /// The second text of a pair (sentence-pair tasks), if any.
    #[serde(rename = "text_pair", skip_serializing_if = "Option::is_none", default)]
    pub pair: Option<String>,
}

/// One line of the canonical JSONL form.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    text: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    text_pair: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    label: Option<i64>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidDataset(msg.into())
}

fn utf8(bytes: &[u8]) -> Result<&str> {
    std::str::from_utf8(bytes).map_err(|e| {
        invalid(format!(
            "the text is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })
}

impl Dataset {
    /// A `text` upload: documents separated by one or more blank lines, each trimmed.
    pub fn from_text(bytes: &[u8]) -> Result<Dataset> {
        let text = utf8(bytes)?;
        let mut docs = Vec::new();
        let mut current: Vec<&str> = Vec::new();
        for line in text.lines().chain(std::iter::once("")) {
            if line.trim().is_empty() {
                if !current.is_empty() {
                    docs.push(Document {
                        text: current.join("\n").trim().to_string(),
                        pair: None,
                    });
                    current.clear();
                }
            } else {
                current.push(line);
            }
        }
        Dataset::of_documents(docs, None)
    }

    /// A `jsonl` upload: one JSON object a line with a string `text`, optionally a string
    /// `text_pair` and a non-negative integer `label` (every line, or none); blank lines are
    /// skipped; other keys are refused.
    pub fn from_jsonl(bytes: &[u8]) -> Result<Dataset> {
        let text = utf8(bytes)?;
        let mut docs = Vec::new();
        let mut labels = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = |msg: String| invalid(format!("line {}: {msg}", i + 1));
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
            let Some(obj) = value.as_object() else {
                return Err(at("must be a JSON object with `text`".into()));
            };
            if let Some(k) = obj
                .keys()
                .find(|k| !matches!(k.as_str(), "text" | "text_pair" | "label"))
            {
                return Err(at(format!(
                    "unknown key {k:?}; expected text, text_pair, label"
                )));
            }
            let text = match obj.get("text") {
                Some(serde_json::Value::String(t)) => t.clone(),
                Some(_) => return Err(at("`text` must be a string".into())),
                None => return Err(at("has no `text`".into())),
            };
            let pair = match obj.get("text_pair") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(t)) => Some(t.clone()),
                Some(_) => return Err(at("`text_pair` must be a string".into())),
            };
            match obj.get("label") {
                None | Some(serde_json::Value::Null) => labels.push(None),
                Some(v) => match v.as_u64() {
                    Some(l) if (l as usize) < MAX_CLASSES => labels.push(Some(l as i64)),
                    _ => {
                        return Err(at(format!(
                            "`label` must be an integer in [0, {MAX_CLASSES})"
                        )))
                    }
                },
            }
            docs.push(Document { text, pair });
        }
        let labelled = labels.iter().filter(|l| l.is_some()).count();
        let y = match labelled {
            0 => None,
            n if n == labels.len() => Some(labels.into_iter().flatten().collect()),
            n => {
                return Err(invalid(format!(
                    "{n} of {} lines have a `label`: label every line or none",
                    labels.len()
                )))
            }
        };
        Dataset::of_documents(docs, y)
    }

    fn of_documents(docs: Vec<Document>, y: Option<Vec<i64>>) -> Result<Dataset> {
        if docs.is_empty() {
            return Err(invalid("the dataset has no documents"));
        }
        let num_classes = y
            .as_ref()
            .map(|y| y.iter().copied().max().unwrap_or(0) as usize + 1);
        Ok(Dataset {
            samples: docs.len(),
            x: DatasetX::Text(docs),
            feature_shape: Vec::new(),
            y,
            num_classes,
        })
    }

    /// The documents of a text dataset.
    pub fn documents(&self) -> Option<&[Document]> {
        match &self.x {
            DatasetX::Text(d) => Some(d),
            _ => None,
        }
    }

    /// Bytes of text over all documents (pairs included).
    pub fn text_bytes(&self) -> usize {
        self.documents().map_or(0, |docs| {
            docs.iter()
                .map(|d| d.text.len() + d.pair.as_ref().map_or(0, String::len))
                .sum()
        })
    }

    /// The canonical JSONL form of a text dataset.
    pub fn to_jsonl_bytes(&self) -> Result<Vec<u8>> {
        let docs = self
            .documents()
            .ok_or_else(|| Error::Internal("not a text dataset".into()))?;
        let mut out = Vec::new();
        for (i, d) in docs.iter().enumerate() {
            let line = Line {
                text: d.text.clone(),
                text_pair: d.pair.clone(),
                label: self.y.as_ref().map(|y| y[i]),
            };
            serde_json::to_writer(&mut out, &line)
                .map_err(|e| Error::Internal(format!("writing JSONL: {e}")))?;
            out.push(b'\n');
        }
        Ok(out)
    }

    /// A stored dataset: canonical JSONL for the text formats, safetensors otherwise.
    pub fn load(format: &str, path: impl AsRef<Path>) -> Result<Dataset> {
        match format {
            "text" | "jsonl" => Dataset::from_jsonl(&std::fs::read(path)?),
            _ => Dataset::from_safetensors(path),
        }
    }
}

/// A model's tokenizer (`tokenizer.json`).
pub struct TextEncoder {
    tokenizer: tokenizers::Tokenizer,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TextEncoder(..)")
    }
}

/// Token ids of one encoded text (a document, or a document pair).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The ids, special tokens included.
    pub ids: Vec<u32>,
    /// The segment of each id (0, or 1 for the second text of a pair).
    pub segments: Vec<u32>,
}

impl TextEncoder {
    /// The tokenizer in a `tokenizer.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<TextEncoder> {
        let tokenizer = tokenizers::Tokenizer::from_file(path.as_ref()).map_err(|e| {
            Error::InvalidModelFolder(format!("the model's tokenizer.json does not load: {e}"))
        })?;
        Self::new(tokenizer)
    }

    /// The tokenizer in `tokenizer.json` bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<TextEncoder> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| {
            Error::InvalidModelFolder(format!("the model's tokenizer.json does not load: {e}"))
        })?;
        Self::new(tokenizer)
    }

    /// A tokenizer without the padding and truncation its file may configure (sentence-
    /// transformers folders pad every text to a fixed length): as `transformers` calls it,
    /// texts are encoded whole and cut to the length each use asks for.
    fn new(mut tokenizer: tokenizers::Tokenizer) -> Result<TextEncoder> {
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::InvalidModelFolder(format!("tokenizer.json: {e}")))?;
        Ok(TextEncoder { tokenizer })
    }

    /// Encodes a document (with its pair, if any) with the tokenizer's special tokens, at
    /// most `max_len` ids: the texts are cut first (the longer one first, for a pair), so the
    /// special tokens stay, as `transformers` truncates.
    pub fn encode(&self, doc: &Document, max_len: usize) -> Result<Encoded> {
        let failed =
            |e: tokenizers::Error| Error::InvalidDataset(format!("tokenizing failed: {e}"));
        let mut a = self
            .tokenizer
            .encode(doc.text.as_str(), false)
            .map_err(failed)?;
        let mut b = match &doc.pair {
            Some(p) => Some(self.tokenizer.encode(p.as_str(), false).map_err(failed)?),
            None => None,
        };
        let added = self.tokenizer.get_post_processor().map_or(0, |p| {
            tokenizers::PostProcessor::added_tokens(p, b.is_some())
        });
        let budget = max_len.saturating_sub(added);
        let (la, lb) = (a.len(), b.as_ref().map_or(0, |b| b.len()));
        if la + lb > budget {
            // Longest first: cut the longer text down to the shorter, then both evenly.
            let (mut na, mut nb) = (la, lb);
            let mut excess = la + lb - budget;
            let cut = excess.min(na.abs_diff(nb));
            if na > nb {
                na -= cut;
            } else {
                nb -= cut;
            }
            excess -= cut;
            na -= excess.div_ceil(2).min(na);
            nb -= (excess / 2).min(nb);
            let right = tokenizers::TruncationDirection::Right;
            a.truncate(na, 0, right);
            if let Some(b) = b.as_mut() {
                b.truncate(nb, 0, right);
            }
        }
        let enc = self.tokenizer.post_process(a, b, true).map_err(failed)?;
        let mut ids = enc.get_ids().to_vec();
        let mut segments = enc.get_type_ids().to_vec();
        ids.truncate(max_len);
        segments.truncate(max_len);
        Ok(Encoded { ids, segments })
    }

    /// All documents joined by a blank line and encoded once, as language-model perplexity
    /// is measured (special tokens as the tokenizer adds them: a BOS at the start).
    pub fn encode_stream(&self, docs: &[Document]) -> Result<Vec<u32>> {
        let joined = docs
            .iter()
            .map(|d| d.text.as_str())
            .collect::<Vec<_>>()
            .join("\n\n");
        let enc = self
            .tokenizer
            .encode(joined.as_str(), true)
            .map_err(|e| Error::InvalidDataset(format!("tokenizing failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

/// How a network reads text: its tokenizer, its longest input and its padding id.
#[derive(Debug, Clone, Copy)]
pub struct TextInput<'a> {
    /// The tokenizer.
    pub encoder: &'a TextEncoder,
    /// Ids kept per document (the model's `max_position_embeddings`, or less).
    pub max_len: usize,
    /// The id padding shorter documents (masked out).
    pub pad_id: u32,
}

/// A padded batch of encoded documents: ids `[n, longest]` (padding with `pad_id`), the
/// attention mask, the segments, and the labels of `labels` when given.
pub fn text_batch(
    encoded: &[Encoded],
    pad_id: u32,
    labels: Option<&[u32]>,
    indices: Vec<usize>,
) -> Result<Batch> {
    let n = encoded.len();
    let longest = encoded
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = vec![pad_id; n * longest];
    let mut mask = vec![0f32; n * longest];
    let mut segments = vec![0u32; n * longest];
    for (r, e) in encoded.iter().enumerate() {
        for (c, (&id, &seg)) in e.ids.iter().zip(&e.segments).enumerate() {
            ids[r * longest + c] = id;
            mask[r * longest + c] = 1.0;
            segments[r * longest + c] = seg;
        }
    }
    let dev = Device::Cpu;
    let y = match labels {
        Some(l) => Some(Tensor::from_slice(l, n, &dev)?),
        None => None,
    };
    Ok(Batch {
        x: Tensor::from_vec(ids, (n, longest), &dev)?,
        mask: Some(Tensor::from_vec(mask, (n, longest), &dev)?),
        segments: Some(Tensor::from_vec(segments, (n, longest), &dev)?),
        y,
        labels: labels.map(<[u32]>::to_vec),
        len: n,
        indices,
    })
}

/// One context window of a token stream: the ids it feeds the model, and from which
/// position on its predictions are scored (earlier ones only give context, as in
/// `transformers`' sliding-window perplexity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Stream offset of the first id.
    pub begin: usize,
    /// The ids.
    pub ids: Vec<u32>,
    /// Predictions of positions `score_from..ids.len() - 1` (each of the next id) count.
    pub score_from: usize,
}

/// Cuts `stream` into windows of `context` ids every `stride` ids, until `max_tokens`
/// predictions are scored: every id after the first is predicted exactly once.
pub fn windows(stream: &[u32], context: usize, stride: usize, max_tokens: usize) -> Vec<Window> {
    let (context, stride) = (context.max(2), stride.max(1).min(context.max(2)));
    let mut out = Vec::new();
    let mut scored = 0usize;
    let mut predicted_until = 0usize; // stream positions < this have been predicted
    let mut begin = 0usize;
    while begin + 1 < stream.len() && scored < max_tokens {
        let end = (begin + context).min(stream.len());
        // Predictions of ids begin+1..end; skip those already scored.
        let first_new_target = predicted_until.max(begin + 1);
        let score_from = first_new_target - 1 - begin;
        let mut ids = stream[begin..end].to_vec();
        let mut new = end - first_new_target;
        if scored + new > max_tokens {
            let keep = max_tokens - scored;
            ids.truncate(score_from + 1 + keep);
            new = keep;
        }
        scored += new;
        predicted_until = begin + ids.len();
        out.push(Window {
            begin,
            ids,
            score_from,
        });
        if end == stream.len() {
            break;
        }
        begin += stride;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_documents_are_split_on_blank_lines() {
        let d = Dataset::from_text(b"first line\nstill first\n\n\n  second  \n \nthird").unwrap();
        let docs = d.documents().unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0].text, "first line\nstill first");
        assert_eq!(docs[1].text, "second");
        assert_eq!(d.samples, 3);
        assert!(d.is_text());
        assert_eq!(d.num_classes, None);
        assert!(Dataset::from_text(b"\n\n \n").is_err());
        assert!(Dataset::from_text(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn jsonl_lines_carry_text_pairs_and_labels() {
        let d = Dataset::from_jsonl(
            b"{\"text\": \"a\", \"label\": 2}\n\n{\"text\": \"b\", \"text_pair\": \"c\", \"label\": 0}\n",
        )
        .unwrap();
        assert_eq!(d.num_classes, Some(3));
        assert_eq!(d.y, Some(vec![2, 0]));
        assert_eq!(d.documents().unwrap()[1].pair.as_deref(), Some("c"));
        let again = Dataset::from_jsonl(&d.to_jsonl_bytes().unwrap()).unwrap();
        assert_eq!(again, d);
        for (bad, says) in [
            (&b"{\"label\": 1}"[..], "no `text`"),
            (b"{\"text\": 3}", "must be a string"),
            (b"[1]", "JSON object"),
            (b"{\"text\": \"a\", \"colour\": 1}", "unknown key"),
            (b"{\"text\": \"a\", \"label\": -1}", "label"),
            (
                b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\"}",
                "every line or none",
            ),
            (b"not json", "line 1"),
        ] {
            let e = Dataset::from_jsonl(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn windows_score_every_prediction_once() {
        let stream: Vec<u32> = (0..10).collect();
        let w = windows(&stream, 4, 4, usize::MAX);
        assert_eq!(w.len(), 3);
        assert_eq!((w[0].ids.clone(), w[0].score_from), (vec![0, 1, 2, 3], 0));
        assert_eq!((w[1].ids.clone(), w[1].score_from), (vec![4, 5, 6, 7], 0));
        // Overlapping windows score only what the previous one did not.
        let w = windows(&stream, 4, 2, usize::MAX);
        let scored: usize = w.iter().map(|w| w.ids.len() - 1 - w.score_from).sum();
        assert_eq!(scored, 9, "{w:?}");
        assert_eq!(w[1].begin, 2);
        assert_eq!(w[1].score_from, 1, "targets 4 and 5 are new");
        // The token budget truncates.
        let w = windows(&stream, 4, 4, 5);
        let scored: usize = w.iter().map(|w| w.ids.len() - 1 - w.score_from).sum();
        assert_eq!(scored, 5, "{w:?}");
    }

    #[test]
    fn long_texts_keep_their_special_tokens_and_file_padding_is_ignored() {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/transformers");
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("tiny-bert/tokenizer.json")).unwrap())
                .unwrap();
        // A sentence-transformers style file: pad and truncate everything to 16.
        json["padding"] = serde_json::json!({"strategy": {"Fixed": 16}, "direction": "Right",
            "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"});
        json["truncation"] = serde_json::json!({"max_length": 16, "strategy": "LongestFirst", "stride": 0, "direction": "Right"});
        let enc = TextEncoder::from_bytes(json.to_string().as_bytes()).unwrap();
        let short = Document {
            text: "the cat sat on the mat".into(),
            pair: None,
        };
        let ids = enc.encode(&short, 512).unwrap().ids;
        assert!(ids.len() < 16 && !ids.contains(&0), "no padding: {ids:?}");
        let per = ids.len() - 2;
        let long = Document {
            text: "the cat sat on the mat ".repeat(20),
            pair: None,
        };
        let full = enc.encode(&long, 512).unwrap().ids;
        assert_eq!(full.len(), 2 + per * 20, "no truncation at the file's 16");
        let cut = enc.encode(&long, 10).unwrap().ids;
        assert_eq!(cut.len(), 10);
        assert_eq!(cut[..9], full[..9]);
        assert_eq!(cut[9], *full.last().unwrap(), "[SEP] kept");
        let tail = Document {
            text: "mat".into(),
            pair: None,
        };
        let tail_len = enc.encode(&tail, 512).unwrap().ids.len() - 2;
        let pair = Document {
            text: "the cat ".repeat(10),
            pair: Some("mat".into()),
        };
        let e = enc.encode(&pair, 12).unwrap();
        assert_eq!(e.ids.len(), 12);
        let second = e.segments.iter().filter(|&&s| s == 1).count();
        assert_eq!(
            second,
            tail_len + 1,
            "the short text and its [SEP] are kept: {e:?}"
        );
    }

    #[test]
    fn the_fixture_tokenizers_encode_like_transformers() {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/transformers");
        let expected = |dir: &str| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(root.join(dir).join("expected.json")).unwrap())
                .unwrap()
        };
        let bert = TextEncoder::from_file(root.join("tiny-bert/tokenizer.json")).unwrap();
        let e = expected("tiny-bert");
        let texts = e["texts"].as_array().unwrap();
        let ids = e["input_ids"].as_array().unwrap();
        let mask = e["attention_mask"].as_array().unwrap();
        for (i, t) in texts.iter().enumerate() {
            let doc = Document {
                text: t.as_str().unwrap().into(),
                pair: None,
            };
            let got = bert.encode(&doc, 512).unwrap().ids;
            let n = mask[i]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m.as_i64() == Some(1))
                .count();
            let want: Vec<u32> = ids[i].as_array().unwrap()[..n]
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(got, want, "{t}");
        }
        let llama = TextEncoder::from_file(root.join("tiny-llama/tokenizer.json")).unwrap();
        let e = expected("tiny-llama");
        for i in 0..2 {
            let doc = Document {
                text: e["texts"][i].as_str().unwrap().into(),
                pair: None,
            };
            let got = llama.encode(&doc, 512).unwrap().ids;
            let want: Vec<u32> = e[format!("input_ids_{i}")]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(got, want);
        }
    }
}
