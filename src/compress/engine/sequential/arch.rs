//! The `sequential` architecture (API.md, "Architecture (sequential/v1)").
//!
//! This module owns the architecture document: parsing it from JSON with JSON-pointer
//! errors, per-sample shape inference through every layer, PyTorch `nn.Sequential`
//! parameter naming, parameter / FLOP / activation-memory accounting, checking a weights
//! header against the architecture, and seeded PyTorch-default initialisation.
//!
//! An [`Architecture`] value that exists is valid: its fields are private and it is only
//! built by [`Architecture::from_json`] (or deserialization, which calls it), which runs
//! shape inference. It does not run the network; the compute engine builds modules from it.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::Value;

pub use super::layer::*;
use super::parse::*;
pub use crate::compress::engine::{ParamKind, ParamSpec};
use crate::compress::formats::safetensors::Header;
use crate::compress::formats::ARCHITECTURE_KEY;
use crate::compress::{json_kind, Error, Result};

/// A validated sequential architecture with its inferred shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    input_shape: Vec<usize>,
    layers: Vec<Layer>,
    output_shape: Vec<usize>,
    summary: Vec<LayerSummary>,
    params: Vec<(ParamSpec, Init)>,
    /// `{batch_norm}.num_batches_tracked` names, accepted but not required in weights.
    optional_buffers: Vec<String>,
}

impl Architecture {
    /// Parses and validates an architecture document, inferring every layer's shape.
    ///
    /// Errors are [`Error::ArchitectureInvalid`] with a JSON pointer relative to the
    /// document (e.g. `/layers/3/out_features`) and a message naming the shapes involved.
    pub fn from_json(doc: &Value) -> Result<Architecture> {
        let Value::Object(map) = doc else {
            return Err(invalid(
                "",
                format!(
                    "the architecture must be a JSON object, got {}",
                    json_kind(doc)
                ),
            ));
        };
        let f = Fields {
            map,
            ptr: "",
            what: "a sequential architecture",
        };
        f.deny_unknown(&["kind", "input_shape", "layers"])?;
        match f.required("kind")? {
            Value::String(k) if k == "sequential" => {}
            other => {
                return Err(invalid(
                    "/kind",
                    format!("`kind` must be \"sequential\", got {other}"),
                ))
            }
        }
        let input_shape = match f.required("input_shape")? {
            Value::Array(dims) if !dims.is_empty() && dims.len() <= 8 => dims
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    size_value(d, 1).map_err(|m| invalid(format!("/input_shape/{i}"), format!("input dimension {m}")))
                })
                .collect::<Result<Vec<_>>>()?,
            _ => {
                return Err(invalid(
                    "/input_shape",
                    "`input_shape` must be a list of 1 to 8 positive integers (one sample's shape, without the batch dimension)",
                ))
            }
        };
        if numel(&input_shape) > MAX_ELEMENTS {
            return Err(invalid(
                "/input_shape",
                format!(
                    "input shape {input_shape:?} has more than {MAX_ELEMENTS} elements per sample"
                ),
            ));
        }
        let Value::Array(values) = f.required("layers")? else {
            return Err(invalid("/layers", "`layers` must be an array of layers"));
        };
        let mut b = Builder::default();
        let (layers, summary, output_shape) = b.list(values, "/layers", "", &input_shape, 0)?;
        Ok(Architecture {
            input_shape,
            layers,
            output_shape,
            summary,
            params: b.params,
            optional_buffers: b.optional_buffers,
        })
    }

    /// Parses an architecture from JSON text (for example the `whittle.architecture`
    /// metadata string of a safetensors file).
    pub fn from_json_str(text: &str) -> Result<Architecture> {
        let doc: Value = serde_json::from_str(text)
            .map_err(|e| invalid("", format!("the architecture is not valid JSON: {e}")))?;
        Architecture::from_json(&doc)
    }

    /// The architecture stored under [`ARCHITECTURE_KEY`] in safetensors
    /// metadata, if there is one.
    pub fn from_metadata(metadata: &BTreeMap<String, String>) -> Result<Option<Architecture>> {
        metadata
            .get(ARCHITECTURE_KEY)
            .map(|text| Architecture::from_json_str(text))
            .transpose()
    }

    /// The canonical JSON document (defaults filled in); parsing it gives back an equal value.
    pub fn to_json(&self) -> Value {
        let layers: Vec<Value> = self
            .layers
            .iter()
            .map(|l| serde_json::to_value(l).unwrap_or(Value::Null))
            .collect();
        serde_json::json!({
            "kind": "sequential",
            "input_shape": self.input_shape,
            "layers": layers,
        })
    }

    /// One sample's input shape (no batch dimension).
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// One sample's output shape (no batch dimension).
    pub fn output_shape(&self) -> &[usize] {
        &self.output_shape
    }

    /// The top-level layers.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Every tensor the weights file must hold, in network order (weight, bias, then
    /// running statistics for each layer), named as in a PyTorch `nn.Sequential` state_dict.
    pub fn parameters(&self) -> Vec<ParamSpec> {
        self.params.iter().map(|(p, _)| p.clone()).collect()
    }

    /// Total number of parameter elements (batch-norm running statistics included).
    pub fn parameter_count(&self) -> u64 {
        self.params.iter().map(|(p, _)| p.numel() as u64).sum()
    }

    /// Forward FLOPs for one sample (see [`LayerSummary::flops`]).
    pub fn flops(&self) -> u64 {
        self.summary
            .iter()
            .fold(0u64, |acc, s| acc.saturating_add(s.flops))
    }

    /// Per-layer figures for the top-level layers (a residual's inner layers are nested
    /// in its `layers`).
    pub fn summary(&self) -> Vec<LayerSummary> {
        self.summary.clone()
    }

    /// Checks that a weights header holds exactly the tensors this architecture expects:
    /// every parameter present with its exact shape and a floating-point dtype, nothing
    /// else except batch-norm `num_batches_tracked` counters (integer scalars).
    pub fn validate_weights(&self, header: &Header) -> Result<()> {
        let found: HashMap<&str, &crate::compress::formats::safetensors::TensorInfo> = header
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let optional: HashSet<&str> = self.optional_buffers.iter().map(String::as_str).collect();
        let mut missing = Vec::new();
        let mut wrong_shape = Vec::new();
        let mut wrong_dtype = Vec::new();
        for (p, _) in &self.params {
            match found.get(p.name.as_str()) {
                None => missing.push(p.name.clone()),
                Some(t) if t.shape != p.shape => wrong_shape.push(format!(
                    "{} expected {:?}, found {:?}",
                    p.name, p.shape, t.shape
                )),
                Some(t) if !t.dtype.is_float() => wrong_dtype.push(format!(
                    "{} is {} (expected a floating-point dtype)",
                    p.name, t.dtype
                )),
                Some(_) => {}
            }
        }
        let expected: HashSet<&str> = self.params.iter().map(|(p, _)| p.name.as_str()).collect();
        let mut unexpected = Vec::new();
        for t in &header.tensors {
            if expected.contains(t.name.as_str()) {
                continue;
            }
            if optional.contains(t.name.as_str()) {
                if t.numel() != 1 || t.shape.len() > 1 {
                    wrong_shape.push(format!("{} expected [], found {:?}", t.name, t.shape));
                } else if !t.dtype.is_integer() {
                    wrong_dtype.push(format!(
                        "{} is {} (expected an integer counter such as I64)",
                        t.name, t.dtype
                    ));
                }
                continue;
            }
            unexpected.push(t.name.clone());
        }
        let mut parts = Vec::new();
        for (label, items) in [
            ("missing tensors", missing),
            ("unexpected tensors", unexpected),
            ("wrong shapes", wrong_shape),
            ("wrong dtypes", wrong_dtype),
        ] {
            if !items.is_empty() {
                parts.push(format!("{label}: {}", capped_list(&items, 10)));
            }
        }
        if parts.is_empty() {
            Ok(())
        } else {
            Err(Error::ArchitectureMismatch(parts.join("; ")))
        }
    }

    /// Freshly initialised parameters, in [`Architecture::parameters`] order, with
    /// PyTorch's default initialisation: linear and conv weights and biases
    /// ~ U(-1/√fan_in, 1/√fan_in) (what `kaiming_uniform_(a=√5)` reduces to), norm weights 1
    /// and biases 0, running mean 0 and running variance 1. Deterministic for a seed
    /// (ChaCha8); the distribution matches PyTorch, the random stream does not.
    pub fn init_weights(&self, seed: u64) -> Vec<(ParamSpec, Vec<f32>)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.params
            .iter()
            .map(|(p, init)| {
                let n = p.numel();
                let values = match *init {
                    Init::Uniform(bound) => (0..n).map(|_| rng.gen_range(-bound..bound)).collect(),
                    Init::Const(c) => vec![c; n],
                };
                (p.clone(), values)
            })
            .collect()
    }
}

fn capped_list(items: &[String], cap: usize) -> String {
    let mut s = items
        .iter()
        .take(cap)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > cap {
        s.push_str(&format!(" and {} more", items.len() - cap));
    }
    s
}

impl Serialize for Architecture {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Doc<'a> {
            kind: &'static str,
            input_shape: &'a [usize],
            layers: &'a [Layer],
        }
        Doc {
            kind: "sequential",
            input_shape: &self.input_shape,
            layers: &self.layers,
        }
        .serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Architecture {
    /// Deserializes through [`Architecture::from_json`], so a deserialized value is valid;
    /// the error message carries the JSON pointer.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let doc = Value::deserialize(d)?;
        Architecture::from_json(&doc).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::formats::safetensors;
    use crate::compress::formats::safetensors::{Dtype, TensorSpec};
    use serde_json::json;

    fn lenet_300_100() -> Value {
        json!({"kind":"sequential","input_shape":[1,28,28],"layers":[
          {"type":"flatten"},
          {"type":"linear","name":"fc1","in_features":784,"out_features":300},
          {"type":"relu"},
          {"type":"linear","name":"fc2","in_features":300,"out_features":100},
          {"type":"relu"},
          {"type":"linear","name":"fc3","in_features":100,"out_features":10}]})
    }

    fn lenet5() -> Value {
        json!({"kind":"sequential","input_shape":[1,28,28],"layers":[
          {"type":"conv2d","in_channels":1,"out_channels":6,"kernel_size":5,"padding":2},
          {"type":"relu"},
          {"type":"max_pool2d","kernel_size":2},
          {"type":"conv2d","in_channels":6,"out_channels":16,"kernel_size":5},
          {"type":"relu"},
          {"type":"max_pool2d","kernel_size":2},
          {"type":"flatten"},
          {"type":"linear","in_features":400,"out_features":120},
          {"type":"relu"},
          {"type":"linear","in_features":120,"out_features":84},
          {"type":"relu"},
          {"type":"linear","in_features":84,"out_features":10}]})
    }

    fn pointer_of(doc: Value) -> (String, String) {
        match Architecture::from_json(&doc) {
            Err(Error::ArchitectureInvalid { pointer, detail }) => (pointer, detail),
            other => panic!("expected ArchitectureInvalid, got {other:?}"),
        }
    }

    fn header_of(specs: &[(String, Dtype, Vec<usize>)]) -> Header {
        let specs: Vec<TensorSpec> = specs
            .iter()
            .map(|(n, d, s)| TensorSpec::new(n.clone(), *d, s.clone()))
            .collect();
        let mut bytes = Vec::new();
        safetensors::write_safetensors(&mut bytes, &BTreeMap::new(), &specs, |i, w| {
            w.write_all(&vec![0u8; specs[i].nbytes().unwrap()])?;
            Ok(())
        })
        .unwrap();
        safetensors::parse_header(&bytes, bytes.len() as u64).unwrap()
    }

    fn header_for(a: &Architecture) -> Vec<(String, Dtype, Vec<usize>)> {
        a.parameters()
            .into_iter()
            .map(|p| (p.name, Dtype::F32, p.shape))
            .collect()
    }

    #[test]
    fn lenet_300_100_counts_and_names() {
        let a = Architecture::from_json(&lenet_300_100()).unwrap();
        assert_eq!(a.parameter_count(), 266_610);
        assert_eq!(a.output_shape(), &[10]);
        let names: Vec<String> = a.parameters().into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias",
                "fc3.weight",
                "fc3.bias"
            ]
        );
        assert_eq!(a.parameters()[0].shape, vec![300, 784]);
        let s = a.summary();
        assert_eq!(s.len(), 6);
        assert_eq!(s[0].name, "0");
        assert_eq!(s[0].output_shape, vec![784]);
        assert_eq!(s[1].flops, 2 * 784 * 300);
        assert_eq!(s[1].parameters, 235_500);
        assert_eq!(s[1].activation_bytes, 1200);
        assert_eq!(
            a.flops(),
            2 * (784 * 300 + 300 * 100 + 100 * 10) + 300 + 100
        );
    }

    #[test]
    fn lenet5_infers_shapes_and_counts() {
        let a = Architecture::from_json(&lenet5()).unwrap();
        assert_eq!(a.parameter_count(), 61_706);
        let shapes: Vec<Vec<usize>> = a.summary().into_iter().map(|s| s.output_shape).collect();
        assert_eq!(shapes[0], vec![6, 28, 28]);
        assert_eq!(shapes[2], vec![6, 14, 14]);
        assert_eq!(shapes[3], vec![16, 10, 10]);
        assert_eq!(shapes[5], vec![16, 5, 5]);
        assert_eq!(shapes[6], vec![400]);
        assert_eq!(a.output_shape(), &[10]);
        let names: Vec<String> = a.parameters().into_iter().map(|p| p.name).collect();
        assert_eq!(names[0], "0.weight");
        assert_eq!(names[2], "3.weight");
        assert_eq!(names[4], "7.weight");
        assert_eq!(a.parameters()[0].shape, vec![6, 1, 5, 5]);
        // conv1: 2 * (1*5*5) * 6 * 28 * 28 multiply-add flops
        assert_eq!(a.summary()[0].flops, 2 * 25 * 6 * 28 * 28);
    }

    #[test]
    fn unnamed_linear_after_flatten_is_index_one() {
        let doc = json!({"kind":"sequential","input_shape":[4],"layers":[
            {"type":"flatten"},{"type":"linear","in_features":4,"out_features":2,"bias":false}]});
        let a = Architecture::from_json(&doc).unwrap();
        let p = a.parameters();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].name, "1.weight");
        assert_eq!(p[0].kind, ParamKind::Weight);
    }

    #[test]
    fn residual_and_norm_naming() {
        let doc = json!({"kind":"sequential","input_shape":[3,8,8],"layers":[
            {"type":"conv2d","name":"stem","in_channels":3,"out_channels":4,"kernel_size":3,"padding":1},
            {"type":"residual","layers":[
                {"type":"conv2d","in_channels":4,"out_channels":4,"kernel_size":[3,3],"padding":1,"bias":false},
                {"type":"batch_norm2d","name":"bn","num_features":4},
                {"type":"relu"}]},
            {"type":"global_avg_pool2d"},
            {"type":"flatten"},
            {"type":"layer_norm","normalized_shape":4},
            {"type":"dropout","p":0.1},
            {"type":"linear","name":"head","in_features":4,"out_features":2}]});
        let a = Architecture::from_json(&doc).unwrap();
        let names: Vec<String> = a.parameters().into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "stem.weight",
                "stem.bias",
                "1.0.weight",
                "1.bn.weight",
                "1.bn.bias",
                "1.bn.running_mean",
                "1.bn.running_var",
                "4.weight",
                "4.bias",
                "head.weight",
                "head.bias"
            ]
        );
        let s = a.summary();
        assert_eq!(s[1].layer_type, "residual");
        assert_eq!(s[1].layers.len(), 3);
        assert_eq!(s[1].layers[1].name, "1.bn");
        assert_eq!(s[1].parameters, 4 * 4 * 9 + 16);
        assert_eq!(s[2].output_shape, vec![4, 1, 1]);
        // Round trip through the canonical JSON.
        let again = Architecture::from_json(&a.to_json()).unwrap();
        assert_eq!(again, a);
        let via_serde: Architecture = serde_json::from_value(a.to_json()).unwrap();
        assert_eq!(via_serde, a);
        assert_eq!(
            a.to_json()["layers"][1]["layers"][0]["kernel_size"],
            json!(3)
        );
    }

    #[test]
    fn bad_shapes_point_at_the_offending_layer() {
        let mut doc = lenet_300_100();
        doc["layers"][3]["in_features"] = json!(301);
        let (p, d) = pointer_of(doc);
        assert_eq!(p, "/layers/3/in_features");
        assert!(d.contains("301") && d.contains("[300]"), "{d}");

        let mut doc = lenet_300_100();
        doc["layers"].as_array_mut().unwrap().remove(0);
        let (p, d) = pointer_of(doc);
        assert_eq!(p, "/layers/0/in_features");
        assert!(d.contains("[1, 28, 28]") && d.contains("flatten"), "{d}");

        let mut doc = lenet5();
        doc["layers"][3]["in_channels"] = json!(5);
        let (p, d) = pointer_of(doc);
        assert_eq!(p, "/layers/3/in_channels");
        assert!(d.contains("[6, 14, 14]"), "{d}");

        let mut doc = lenet5();
        doc["layers"][7]["in_features"] = json!(256);
        assert_eq!(pointer_of(doc).0, "/layers/7/in_features");

        let doc = json!({"kind":"sequential","input_shape":[1,4,4],"layers":[
            {"type":"conv2d","in_channels":1,"out_channels":2,"kernel_size":5}]});
        let (p, d) = pointer_of(doc);
        assert_eq!(p, "/layers/0/kernel_size");
        assert!(d.contains("[1, 4, 4]"), "{d}");

        let doc = json!({"kind":"sequential","input_shape":[10],"layers":[
            {"type":"conv2d","in_channels":1,"out_channels":2,"kernel_size":3}]});
        assert_eq!(pointer_of(doc).0, "/layers/0");

        let doc = json!({"kind":"sequential","input_shape":[3,8,8],"layers":[
            {"type":"batch_norm2d","num_features":4}]});
        assert_eq!(pointer_of(doc).0, "/layers/0/num_features");

        let doc = json!({"kind":"sequential","input_shape":[8],"layers":[
            {"type":"residual","layers":[{"type":"linear","in_features":8,"out_features":4}]}]});
        let (p, d) = pointer_of(doc);
        assert_eq!(p, "/layers/0");
        assert!(d.contains("[8]") && d.contains("[4]"), "{d}");

        let doc = json!({"kind":"sequential","input_shape":[8],"layers":[
            {"type":"residual","layers":[{"type":"relu"},{"type":"linear","in_features":7,"out_features":8}]}]});
        assert_eq!(pointer_of(doc).0, "/layers/0/layers/1/in_features");

        let doc = json!({"kind":"sequential","input_shape":[8],"layers":[
            {"type":"layer_norm","normalized_shape":[4]}]});
        assert_eq!(pointer_of(doc).0, "/layers/0/normalized_shape");

        let doc = json!({"kind":"sequential","input_shape":[1,5,5],"layers":[
            {"type":"max_pool2d","kernel_size":2,"padding":2}]});
        assert_eq!(pointer_of(doc).0, "/layers/0/padding");
    }

    #[test]
    fn malformed_documents_point_at_the_field() {
        let mut doc = lenet_300_100();
        doc["layers"][5]
            .as_object_mut()
            .unwrap()
            .remove("out_features");
        let (p, d) = pointer_of(doc);
        assert_eq!(p, "/layers/5/out_features");
        assert!(d.contains("missing"), "{d}");

        let mut doc = lenet_300_100();
        doc["layers"][3]["type"] = json!("conv3d");
        let (p, d) = pointer_of(doc);
        assert_eq!(p, "/layers/3/type");
        assert!(d.contains("conv3d"), "{d}");

        let mut doc = lenet_300_100();
        doc["layers"][1]["out_feature"] = json!(3);
        assert_eq!(pointer_of(doc).0, "/layers/1/out_feature");

        let mut doc = lenet_300_100();
        doc["layers"][1]["out_features"] = json!(0);
        assert_eq!(pointer_of(doc).0, "/layers/1/out_features");

        let mut doc = lenet_300_100();
        doc["layers"][1]["out_features"] = json!(-3);
        let (p, d) = pointer_of(doc);
        assert_eq!(p, "/layers/1/out_features");
        assert!(d.contains("positive"), "{d}");

        let mut doc = lenet_300_100();
        doc["layers"][1]["out_features"] = json!(1u64 << 40);
        assert_eq!(pointer_of(doc).0, "/layers/1/out_features");

        let mut doc = lenet_300_100();
        doc["layers"][1]["out_features"] = json!("300");
        assert_eq!(pointer_of(doc).0, "/layers/1/out_features");

        let mut doc = lenet_300_100();
        doc["layers"][2]["type"] = json!(3);
        assert_eq!(pointer_of(doc).0, "/layers/2/type");

        let mut doc = lenet_300_100();
        doc["layers"][2] = json!("relu");
        assert_eq!(pointer_of(doc).0, "/layers/2");

        let mut doc = lenet_300_100();
        doc["input_shape"] = json!([1, 0, 28]);
        assert_eq!(pointer_of(doc).0, "/input_shape/1");

        let mut doc = lenet_300_100();
        doc["input_shape"] = json!([]);
        assert_eq!(pointer_of(doc).0, "/input_shape");

        let mut doc = lenet_300_100();
        doc["kind"] = json!("transformer");
        assert_eq!(pointer_of(doc).0, "/kind");

        let mut doc = lenet_300_100();
        doc["extra"] = json!(1);
        assert_eq!(pointer_of(doc).0, "/extra");

        let mut doc = lenet_300_100();
        doc["layers"] = json!([]);
        assert_eq!(pointer_of(doc).0, "/layers");

        let mut doc = lenet_300_100();
        doc["layers"][3]["name"] = json!("fc1");
        let (p, d) = pointer_of(doc);
        assert_eq!(p, "/layers/3/name");
        assert!(d.contains("already taken"), "{d}");

        let mut doc = lenet_300_100();
        doc["layers"][3]["name"] = json!("a.b");
        assert_eq!(pointer_of(doc).0, "/layers/3/name");

        let mut doc = lenet_300_100();
        doc["layers"][2] = json!({"type":"dropout","p":1.5});
        assert_eq!(pointer_of(doc).0, "/layers/2/p");

        let doc = json!({"kind":"sequential","input_shape":[1,8,8],"layers":[
            {"type":"conv2d","in_channels":1,"out_channels":2,"kernel_size":[3,3,3]}]});
        assert_eq!(pointer_of(doc).0, "/layers/0/kernel_size");

        let doc = json!({"kind":"sequential","input_shape":[4],"layers":[
            {"type":"batch_norm1d","num_features":4,"eps":0}]});
        assert_eq!(pointer_of(doc).0, "/layers/0/eps");

        // A field name with a slash is escaped in the pointer.
        let mut doc = lenet_300_100();
        doc["layers"][0]["a/b"] = json!(1);
        assert_eq!(pointer_of(doc).0, "/layers/0/a~1b");

        assert!(matches!(
            Architecture::from_json_str("{"),
            Err(Error::ArchitectureInvalid { .. })
        ));
        assert!(serde_json::from_value::<Architecture>(json!({"kind":"sequential"})).is_err());
    }

    #[test]
    fn absurd_sizes_are_refused() {
        let doc = json!({"kind":"sequential","input_shape":[8],"layers":[
            {"type":"linear","in_features":8,"out_features":16_000_000},
            {"type":"linear","in_features":16_000_000,"out_features":16_000_000}]});
        let (p, _) = pointer_of(doc);
        assert_eq!(p, "/layers/1");
        let doc =
            json!({"kind":"sequential","input_shape":[4096,4096,4096],"layers":[{"type":"relu"}]});
        assert_eq!(pointer_of(doc).0, "/input_shape");
        let mut nested = json!({"type":"relu"});
        for _ in 0..20 {
            nested = json!({"type":"residual","layers":[nested]});
        }
        let doc = json!({"kind":"sequential","input_shape":[4],"layers":[nested]});
        assert!(pointer_of(doc).1.contains("nest"));
    }

    #[test]
    fn validate_weights_reports_every_difference() {
        let a = Architecture::from_json(&lenet_300_100()).unwrap();
        let ok = header_of(&header_for(&a));
        a.validate_weights(&ok).unwrap();

        let mut specs = header_for(&a);
        specs.retain(|(n, _, _)| n != "fc3.bias");
        specs[0].2 = vec![784, 300];
        specs[1].1 = Dtype::I32;
        specs.push(("extra.weight".to_owned(), Dtype::F32, vec![2]));
        let e = a.validate_weights(&header_of(&specs)).unwrap_err();
        let Error::ArchitectureMismatch(m) = &e else {
            panic!("{e:?}")
        };
        assert!(m.contains("missing tensors: fc3.bias"), "{m}");
        assert!(m.contains("unexpected tensors: extra.weight"), "{m}");
        assert!(
            m.contains("fc1.weight expected [300, 784], found [784, 300]"),
            "{m}"
        );
        assert!(m.contains("fc1.bias is I32"), "{m}");
        assert_eq!(e.code().as_str(), "architecture_mismatch");
    }

    #[test]
    fn num_batches_tracked_is_accepted_not_required() {
        let doc = json!({"kind":"sequential","input_shape":[4],"layers":[
            {"type":"batch_norm1d","num_features":4},{"type":"linear","in_features":4,"out_features":2}]});
        let a = Architecture::from_json(&doc).unwrap();
        let mut specs = header_for(&a);
        a.validate_weights(&header_of(&specs)).unwrap();
        specs.push(("0.num_batches_tracked".to_owned(), Dtype::I64, vec![]));
        a.validate_weights(&header_of(&specs)).unwrap();
        specs.last_mut().unwrap().1 = Dtype::F32;
        assert!(a.validate_weights(&header_of(&specs)).is_err());
        // F16 weights are fine: any float dtype.
        let mut specs = header_for(&a);
        specs[0].1 = Dtype::F16;
        a.validate_weights(&header_of(&specs)).unwrap();
    }

    #[test]
    fn init_is_seeded_and_pytorch_shaped() {
        let a = Architecture::from_json(&lenet5()).unwrap();
        let w1 = a.init_weights(7);
        let w2 = a.init_weights(7);
        let w3 = a.init_weights(8);
        assert_eq!(w1, w2);
        assert_ne!(w1[0].1, w3[0].1);
        assert_eq!(w1.len(), a.parameters().len());
        for (p, v) in &w1 {
            assert_eq!(v.len(), p.numel());
        }
        // conv1: fan_in = 1*5*5 → bound 0.2; values spread over the whole interval.
        let v = &w1[0].1;
        assert!(v.iter().all(|x| x.abs() < 0.2));
        assert!(v.iter().any(|x| *x > 0.15) && v.iter().any(|x| *x < -0.15));
        // fc after flatten: fan_in 400 → bound 0.05.
        let fc = w1.iter().find(|(p, _)| p.name == "7.bias").unwrap();
        assert!(fc.1.iter().all(|x| x.abs() < 0.05));

        let doc = json!({"kind":"sequential","input_shape":[3],"layers":[
            {"type":"batch_norm1d","num_features":3},{"type":"layer_norm","normalized_shape":[3]}]});
        let w = Architecture::from_json(&doc).unwrap().init_weights(0);
        let vals: Vec<Vec<f32>> = w.into_iter().map(|(_, v)| v).collect();
        assert_eq!(
            vals,
            vec![
                vec![1.0; 3],
                vec![0.0; 3],
                vec![0.0; 3],
                vec![1.0; 3],
                vec![1.0; 3],
                vec![0.0; 3]
            ]
        );
    }

    #[test]
    fn architecture_from_metadata() {
        let mut meta = BTreeMap::new();
        assert!(Architecture::from_metadata(&meta).unwrap().is_none());
        meta.insert(ARCHITECTURE_KEY.to_owned(), lenet_300_100().to_string());
        let a = Architecture::from_metadata(&meta).unwrap().unwrap();
        assert_eq!(a.parameter_count(), 266_610);
    }
}
