//! The `distill` step: the job's model is the teacher, the output is the student.

use serde_json::{json, Map, Value};

use super::fields::{bool_or, choice, deny_unknown, f64_in, object};
use super::train::{
    check_dataset_fits, parse_training, require_architecture, FinetuneSpec, TrainingRules,
};
use super::{Facts, FieldError, ModelFacts, TransformerFacts};
use crate::codes::Code;
use crate::compress::distill::text::{Distance, DistillLoss};
use crate::compress::distill::FeaturePair;
use crate::compress::engine::finetune::Validation;
use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::formats::safetensors::{Dtype, TensorInfo};

/// Where the student comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum StudentSpec {
    /// An uploaded model (with an architecture).
    Model(String),
    /// A fresh, seeded initialisation of this architecture.
    Architecture(Value),
    /// The teacher (a transformer) keeping only these blocks, their weights copied.
    FromTeacher(Vec<usize>),
    /// A transformer of the teacher's family and config with these keys changed, drawn
    /// afresh.
    Config(Map<String, Value>),
}

/// The `config.json` keys a drawn student may change (its shape; the vocabulary, positions
/// and head stay the teacher's).
pub const STUDENT_CONFIG_KEYS: &[&str] = &[
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
];

/// A validated `distill` step.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillSpec {
    /// The student.
    pub student: StudentSpec,
    /// Transfer set and training parameters.
    pub train: FinetuneSpec,
    /// Softmax temperature T.
    pub temperature: f64,
    /// Weight of the soft-target term.
    pub alpha: f64,
    /// Feature matching pairs.
    pub features: Vec<FeaturePair>,
    /// Also train the student on hard labels alone under the same budget, for comparison.
    pub baseline: bool,
    /// Hold the student's zero weights at zero (retraining a pruned student).
    pub keep_sparsity: bool,
    /// What the student is matched on (`None`: chosen from the models).
    pub loss: Option<DistillLoss>,
    /// Whether `hidden` and `features` matches go through a learned projection (`None`: only
    /// where the widths differ).
    pub projection: Option<bool>,
}

impl DistillSpec {
    /// Normalised JSON.
    pub fn to_json(&self) -> Value {
        let mut v = self.train.to_json();
        if let Some(o) = v.as_object_mut() {
            for k in ["freeze", "head", "layer_lr"] {
                o.remove(k);
            }
        }
        v["op"] = json!("distill");
        v["student"] = match &self.student {
            StudentSpec::Model(id) => json!({"model_id": id}),
            StudentSpec::Architecture(a) => json!({"architecture": a}),
            StudentSpec::FromTeacher(layers) => json!({"from_teacher": {"layers": layers}}),
            StudentSpec::Config(c) => json!({"config": c}),
        };
        // Written only when given, so that specs without it normalise as before.
        match self.loss {
            Some(DistillLoss::Logits) => v["loss"] = json!("logits"),
            Some(DistillLoss::Hidden) => {
                v["loss"] = json!("hidden");
                v["projection"] = json!(self.projection);
            }
            Some(DistillLoss::Embeddings(d)) => {
                v["loss"] = json!("embeddings");
                v["distance"] = json!(d.as_str());
            }
            None => {}
        }
        v["temperature"] = json!(self.temperature);
        v["alpha"] = json!(self.alpha);
        v["features"] = self
            .features
            .iter()
            .map(|f| json!({"teacher": f.teacher, "student": f.student, "weight": f.weight}))
            .collect();
        v["baseline"] = json!(self.baseline);
        v["keep_sparsity"] = json!(self.keep_sparsity);
        v
    }
}

/// Parse a `distill` step at `pointer`. Returns the spec and, when known, the student's facts
/// (what later steps operate on).
pub fn parse(
    obj: &Map<String, Value>,
    pointer: &str,
    facts: Option<&Facts>,
) -> Result<(DistillSpec, Option<ModelFacts>), Vec<FieldError>> {
    let mut errors = Vec::new();
    const OWN: &[&str] = &[
        "op",
        "student",
        "temperature",
        "alpha",
        "features",
        "baseline",
        "keep_sparsity",
        "loss",
        "distance",
        "projection",
    ];
    let temperature = match obj.get("temperature") {
        None | Some(Value::Null) => 4.0,
        Some(v) => match v.as_f64() {
            Some(t) if t.is_finite() && t > 0.0 && t <= 1000.0 => t,
            _ => {
                errors.push(FieldError::new(
                    format!("{pointer}/temperature"),
                    "must be a number in (0, 1000]: the softmax temperature T",
                ));
                4.0
            }
        },
    };
    let alpha = f64_in(obj, "alpha", (0.0, 1.0), pointer, &mut errors).unwrap_or(0.9);
    let distance = match choice(obj, "distance", &["cosine", "mse"], pointer, &mut errors) {
        Some("mse") => Some(Distance::Mse),
        Some(_) => Some(Distance::Cosine),
        None => None,
    };
    let loss = match choice(
        obj,
        "loss",
        &["logits", "embeddings", "hidden"],
        pointer,
        &mut errors,
    ) {
        Some("embeddings") => Some(DistillLoss::Embeddings(
            distance.unwrap_or(Distance::Cosine),
        )),
        Some("hidden") => Some(DistillLoss::Hidden),
        Some(_) => Some(DistillLoss::Logits),
        None => None,
    };
    if distance.is_some() && !matches!(loss, Some(DistillLoss::Embeddings(_))) {
        errors.push(FieldError::new(
            format!("{pointer}/distance"),
            "applies to `loss: embeddings` only",
        ));
    }
    let teacher_transformer = facts.and_then(|f| f.transformer.clone());
    let projection = match obj.get("projection") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => {
            errors.push(FieldError::new(
                format!("{pointer}/projection"),
                "must be a boolean (or null: only where the widths differ)",
            ));
            None
        }
    };
    if projection.is_some() && loss != Some(DistillLoss::Hidden) {
        errors.push(FieldError::new(
            format!("{pointer}/projection"),
            "applies to `loss: hidden` only",
        ));
    }
    if facts.is_some() && teacher_transformer.is_none() && loss == Some(DistillLoss::Hidden) {
        errors.push(FieldError::new(
            format!("{pointer}/loss"),
            "`hidden` matches the blocks of a transformer (bert, llama); match a sequential network's layers with `features`",
        ));
    }
    if facts.is_some()
        && teacher_transformer.is_none()
        && matches!(loss, Some(DistillLoss::Embeddings(_)))
    {
        errors.push(FieldError::new(
            format!("{pointer}/loss"),
            "`embeddings` matches the sentence embeddings of a bert model; this teacher outputs logits",
        ));
    }
    if let (Some(t), Some(l)) = (&teacher_transformer, loss) {
        let encoder = t.family == crate::compress::engine::Family::Bert && t.classes.is_none();
        let refused = match l {
            DistillLoss::Embeddings(_) if !encoder => Some("`embeddings` matches the sentence embeddings of a bert model without a classifier; this teacher outputs logits"),
            DistillLoss::Logits if encoder => Some("a bert model without a classifier outputs sentence embeddings, not logits: use `embeddings`"),
            _ => None,
        };
        if let Some(why) = refused {
            errors.push(FieldError::new(format!("{pointer}/loss"), why));
        }
    }
    let baseline = bool_or(obj, "baseline", false, pointer, &mut errors);
    let keep_sparsity = bool_or(obj, "keep_sparsity", false, pointer, &mut errors);
    if keep_sparsity
        && obj
            .get("student")
            .is_some_and(|s| s.get("model_id").is_none() && s.get("from_teacher").is_none())
    {
        errors.push(FieldError::new(
            format!("{pointer}/keep_sparsity"),
            "holds an uploaded (pruned) student's zero weights at zero; a fresh architecture has none",
        ));
    }
    let mut features = Vec::new();
    match obj.get("features") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let fp = format!("{pointer}/features/{i}");
                let Some(m) = item.as_object() else {
                    errors.push(FieldError::new(
                        fp,
                        "must be an object {teacher, student, weight}",
                    ));
                    continue;
                };
                deny_unknown(m, &["teacher", "student", "weight"], &fp, &mut errors);
                let name = |key: &str, errors: &mut Vec<FieldError>| match m
                    .get(key)
                    .and_then(Value::as_str)
                {
                    Some(s) if !s.is_empty() => Some(s.to_string()),
                    _ => {
                        errors.push(FieldError::new(
                            format!("{fp}/{key}"),
                            "is required: a layer name",
                        ));
                        None
                    }
                };
                let teacher = name("teacher", &mut errors);
                let student = name("student", &mut errors);
                let weight = f64_in(m, "weight", (0.0, 1e6), &fp, &mut errors).unwrap_or(1.0);
                if let (Some(teacher), Some(student)) = (teacher, student) {
                    features.push(FeaturePair {
                        teacher,
                        student,
                        weight,
                    });
                }
            }
        }
        Some(_) => errors.push(FieldError::new(
            format!("{pointer}/features"),
            "must be an array of {teacher, student, weight}",
        )),
    }

    // The student and what is known about it.
    let mut student_facts: Option<ModelFacts> = None;
    let student = match object(obj, "student", pointer, &mut errors) {
        None => {
            if !obj.contains_key("student") {
                errors.push(FieldError::new(
                    format!("{pointer}/student"),
                    "is required: {\"model_id\": …}, {\"architecture\": {…}} or {\"from_teacher\": {\"layers\": […]}}",
                ));
            }
            None
        }
        Some(s) => {
            let sp = format!("{pointer}/student");
            deny_unknown(
                s,
                &["model_id", "architecture", "from_teacher", "config"],
                &sp,
                &mut errors,
            );
            if let Some(t) = &teacher_transformer {
                if s.get("architecture").is_some() {
                    errors.push(FieldError::unsupported(
                        sp.clone(),
                        format!("a {} teacher's student is built from it (`{{\"from_teacher\": {{\"layers\": [...]}}}}`), drawn from its config (`{{\"config\": {{\"num_hidden_layers\": …}}}}`) or is a {} folder model (`model_id`)", t.family.as_str(), t.family.as_str()),
                    ));
                }
            }
            match (s.get("model_id"), s.get("architecture")) {
                _ if s.contains_key("config") => {
                    let parsed = parse_student_config(
                        s,
                        &sp,
                        facts.map(|_| teacher_transformer.as_ref()),
                        &mut errors,
                    );
                    if let (Some(t), Some(c)) = (&teacher_transformer, &parsed) {
                        let pooler = facts.is_some_and(has_pooler);
                        let shaped = config_student_facts(t, c, pooler, &sp, &mut errors);
                        if let Some(st) = shaped.as_ref().and_then(|s| s.transformer.as_ref()) {
                            check_transformer_student(
                                t,
                                Some(st),
                                TransformerLoss { loss, projection },
                                &format!("{sp}/config"),
                                pointer,
                                &mut errors,
                            );
                        }
                        student_facts = shaped;
                    }
                    parsed.map(StudentSpec::Config)
                }
                _ if s.contains_key("from_teacher") => {
                    let layers = parse_from_teacher(
                        s,
                        &sp,
                        facts,
                        teacher_transformer.as_ref(),
                        &mut errors,
                    );
                    if let (Some(f), Some(t), Some(l)) = (facts, &teacher_transformer, &layers) {
                        student_facts = Some(from_teacher_facts(f, t, l));
                    }
                    layers.map(StudentSpec::FromTeacher)
                }
                (Some(Value::String(id)), None) if uuid::Uuid::parse_str(id).is_ok() => {
                    if let Some(f) = facts {
                        match f.models.get(id) {
                            None => errors.push(FieldError {
                                code: Code::ModelNotFound,
                                ..FieldError::new(format!("{sp}/model_id"), "no model with this id")
                            }),
                            Some(m) if teacher_transformer.is_some() => {
                                if let Some(t) = &teacher_transformer {
                                    check_transformer_student(
                                        t,
                                        m.transformer.as_ref(),
                                        TransformerLoss { loss, projection },
                                        &format!("{sp}/model_id"),
                                        pointer,
                                        &mut errors,
                                    );
                                }
                                student_facts = Some(m.clone());
                            }
                            Some(m) if m.architecture.is_none() => errors.push(FieldError {
                                code: Code::ArchitectureRequired,
                                ..FieldError::new(
                                    format!("{sp}/model_id"),
                                    "the student model has no architecture; upload it with one",
                                )
                            }),
                            Some(m) => student_facts = Some(m.clone()),
                        }
                    }
                    Some(StudentSpec::Model(id.clone()))
                }
                (Some(_), None) => {
                    errors.push(FieldError::new(
                        format!("{sp}/model_id"),
                        "must be a model id (a UUID string)",
                    ));
                    None
                }
                (None, Some(a)) => match Architecture::from_json(a) {
                    Ok(arch) => {
                        student_facts = Some(ModelFacts::from_architecture(arch));
                        Some(StudentSpec::Architecture(a.clone()))
                    }
                    Err(e) => {
                        let (inner, detail) = match &e {
                            crate::compress::Error::ArchitectureInvalid { pointer, detail } => {
                                (pointer.clone(), detail.clone())
                            }
                            other => (String::new(), other.to_string()),
                        };
                        errors.push(FieldError {
                            code: Code::InvalidArchitecture,
                            ..FieldError::new(format!("{sp}/architecture{inner}"), detail)
                        });
                        None
                    }
                },
                _ => {
                    errors.push(FieldError::new(
                        sp,
                        "give exactly one of `model_id` or `architecture`",
                    ));
                    None
                }
            }
        }
    };

    // Training parameters, checked against the teacher (the job's model) ...
    let train_obj: Map<String, Value> = obj
        .iter()
        .filter(|(k, _)| !OWN.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // Labels weigh in only through a classifier's hard term: a language model's hard term
    // reads its text, and embeddings and hidden states have none.
    let labels_required = alpha < 1.0
        && !matches!(loss, Some(DistillLoss::Embeddings(_) | DistillLoss::Hidden))
        && !teacher_transformer.as_ref().is_some_and(|t| {
            t.family == crate::compress::engine::Family::Llama || t.classes.is_none()
        });
    if let Some(f) = facts.filter(|f| f.transformer.is_none()) {
        require_architecture(f, pointer, &mut errors);
    }
    let train = parse_training(
        &train_obj,
        pointer,
        facts,
        TrainingRules {
            extra_fields: &[],
            labels_required,
            layer_options: false,
            transformers: true,
        },
        &mut errors,
    );
    // ... and against the student.
    if let (Some(f), Some(sf), Some(t)) = (facts, &student_facts, &train) {
        if let (Some(ta), Some(sa)) = (&f.architecture, &sf.architecture) {
            let tw: usize = ta.output_shape().iter().product();
            let sw: usize = sa.output_shape().iter().product();
            if tw != sw {
                errors.push(FieldError::new(
                    format!("{pointer}/student"),
                    format!("the student has {sw} outputs but the teacher has {tw}: distillation matches their output distributions, so the widths must be equal"),
                ));
            } else {
                let student_view = Facts {
                    tensors: sf.tensors.clone(),
                    architecture: sf.architecture.clone(),
                    datasets: f.datasets.clone(),
                    ..Facts::default()
                };
                check_dataset_fits(
                    &student_view,
                    &t.dataset,
                    None,
                    labels_required,
                    &format!("{pointer}/student"),
                    &mut errors,
                );
                if let Validation::Dataset(v) = &t.validation {
                    check_dataset_fits(
                        &student_view,
                        v,
                        None,
                        labels_required,
                        &format!("{pointer}/student"),
                        &mut errors,
                    );
                }
            }
            for (i, fp) in features.iter().enumerate() {
                if !layer_exists(ta, &fp.teacher) {
                    errors.push(FieldError::new(
                        format!("{pointer}/features/{i}/teacher"),
                        format!("the teacher has no top-level layer named `{}` (layers are named by `name` or by index)", fp.teacher),
                    ));
                }
                if !layer_exists(sa, &fp.student) {
                    errors.push(FieldError::new(
                        format!("{pointer}/features/{i}/student"),
                        format!("the student has no top-level layer named `{}` (layers are named by `name` or by index)", fp.student),
                    ));
                }
            }
        }
    }
    if errors.is_empty() {
        match (student, train) {
            (Some(student), Some(train)) => Ok((
                DistillSpec {
                    student,
                    train,
                    temperature,
                    alpha,
                    features,
                    baseline,
                    keep_sparsity,
                    loss,
                    projection,
                },
                student_facts,
            )),
            _ => Err(errors),
        }
    } else {
        Err(errors)
    }
}

/// `config: {...}`: a student drawn afresh with the teacher's config, these keys changed
/// (positive integers of [`STUDENT_CONFIG_KEYS`]; heads must divide the hidden size unless
/// `head_dim` is given, key-value heads the heads); only for a transformer teacher.
fn parse_student_config(
    s: &Map<String, Value>,
    sp: &str,
    known: Option<Option<&TransformerFacts>>,
    errors: &mut Vec<FieldError>,
) -> Option<Map<String, Value>> {
    // `None`: no facts (a stored spec re-read by a worker); `Some(None)`: no transformer.
    let teacher = known.flatten();
    let cp = format!("{sp}/config");
    if s.len() > 1 {
        errors.push(FieldError::new(
            sp,
            "give exactly one of `model_id`, `architecture`, `from_teacher` or `config`",
        ));
    }
    let Some(c) = s.get("config").and_then(Value::as_object) else {
        errors.push(FieldError::new(
            cp,
            "must be an object of config.json keys to change",
        ));
        return None;
    };
    if known.is_some_and(|t| t.is_none()) {
        errors.push(FieldError::new(
            cp.clone(),
            "draws a transformer student from its teacher's config; this teacher has none (give `architecture`)",
        ));
    }
    deny_unknown(c, STUDENT_CONFIG_KEYS, &cp, errors);
    let before = errors.len();
    let mut out = Map::new();
    for (k, v) in c {
        if !STUDENT_CONFIG_KEYS.contains(&k.as_str()) {
            continue;
        }
        match v.as_u64() {
            Some(n) if (1..=65_536).contains(&n) => {
                out.insert(k.clone(), json!(n));
            }
            _ => errors.push(FieldError::new(
                format!("{cp}/{k}"),
                "must be an integer in 1..=65536",
            )),
        }
    }
    if let Some(t) = teacher {
        let get = |k: &str, default: usize| {
            out.get(k)
                .and_then(Value::as_u64)
                .map_or(default, |v| v as usize)
        };
        let hidden = get("hidden_size", t.hidden);
        let heads = get("num_attention_heads", t.heads);
        if !out.contains_key("head_dim") && heads > 0 && hidden % heads != 0 {
            errors.push(FieldError::new(
                format!("{cp}/num_attention_heads"),
                format!("{heads} heads do not divide the hidden size {hidden}"),
            ));
        }
        if let Some(kv) = out.get("num_key_value_heads").and_then(Value::as_u64) {
            if t.family != crate::compress::engine::Family::Llama {
                errors.push(FieldError::new(
                    format!("{cp}/num_key_value_heads"),
                    "applies to llama models",
                ));
            } else if heads % kv as usize != 0 {
                errors.push(FieldError::new(
                    format!("{cp}/num_key_value_heads"),
                    format!("{kv} key-value heads do not divide {heads} attention heads"),
                ));
            }
        }
        if out.contains_key("head_dim") && t.family != crate::compress::engine::Family::Llama {
            errors.push(FieldError::new(
                format!("{cp}/head_dim"),
                "applies to llama models",
            ));
        }
    }
    (errors.len() == before).then_some(out)
}

/// The facts of a student drawn from the teacher's config changed by `c`: its tensors as
/// the engine draws them, and its transformer. A config the engine refuses is reported at
/// `{sp}/config`.
pub(super) fn config_student_facts(
    t: &TransformerFacts,
    c: &Map<String, Value>,
    pooler: bool,
    sp: &str,
    errors: &mut Vec<FieldError>,
) -> Option<ModelFacts> {
    let document = crate::compress::engine::transformer::merge_config(&t.config, c);
    let shapes = match crate::compress::engine::families::shapes(&document, t.classes, pooler) {
        Ok(s) => s,
        Err(e) => {
            errors.push(FieldError::new(format!("{sp}/config"), e.to_string()));
            return None;
        }
    };
    let mut offset = 0;
    let tensors: Vec<TensorInfo> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let bytes = shape.iter().product::<usize>() * 4;
            offset += bytes;
            TensorInfo {
                name,
                dtype: Dtype::F32,
                shape,
                data_offsets: (offset - bytes, offset),
            }
        })
        .collect();
    let transformer = TransformerFacts::of(&document, &tensors, t.tokenizer_sha256.as_deref())?;
    Some(ModelFacts {
        tensors,
        architecture: None,
        transformer: Some(transformer),
    })
}

/// Whether a bert teacher has a pooler (its drawn students get one too).
pub(super) fn has_pooler(f: &Facts) -> bool {
    f.tensors
        .iter()
        .any(|t| t.name.ends_with("pooler.dense.weight"))
}

/// The loss settings a transformer student is checked against.
struct TransformerLoss {
    loss: Option<DistillLoss>,
    projection: Option<bool>,
}

/// An uploaded or config-drawn transformer student of teacher `t`: the same family,
/// tokenizer and head (the teacher reads the student's batches and their outputs are
/// compared), and widths that the loss can compare. Problems are reported `at` the field the
/// student comes from (`…/student/model_id`, `…/student/config`).
fn check_transformer_student(
    t: &TransformerFacts,
    student: Option<&TransformerFacts>,
    l: TransformerLoss,
    at: &str,
    pointer: &str,
    errors: &mut Vec<FieldError>,
) {
    let family = t.family.as_str();
    let Some(s) = student else {
        errors.push(FieldError::new(
            at,
            format!("the student must be a {family} folder model like its teacher"),
        ));
        return;
    };
    if s.family != t.family {
        errors.push(FieldError::new(
            at,
            format!(
                "the student is a {} model and the teacher a {family} model: distillation needs one family",
                s.family.as_str()
            ),
        ));
        return;
    }
    if s.tokenizer_sha256.is_none() || s.tokenizer_sha256 != t.tokenizer_sha256 {
        errors.push(FieldError::new(
            at,
            "the student must read text as its teacher does: its folder needs the teacher's tokenizer.json (same bytes)",
        ));
    }
    if s.vocab_size != t.vocab_size || s.classes != t.classes {
        errors.push(FieldError::new(
            at,
            format!(
                "the student's outputs ({} vocabulary, {} classes) differ from the teacher's ({}, {}): distillation compares them",
                s.vocab_size,
                s.classes.map_or("no".into(), |c| c.to_string()),
                t.vocab_size,
                t.classes.map_or("no".into(), |c| c.to_string()),
            ),
        ));
    }
    let encoder = t.family == crate::compress::engine::Family::Bert && t.classes.is_none();
    let widths_differ = s.hidden != t.hidden;
    match l.loss {
        Some(DistillLoss::Hidden) => {
            if s.layers > t.layers {
                errors.push(FieldError::new(
                    at,
                    format!("`hidden` pairs every student block with a teacher block: the student has {} blocks, the teacher {}", s.layers, t.layers),
                ));
            }
            if widths_differ && l.projection == Some(false) {
                errors.push(FieldError::new(
                    format!("{pointer}/projection"),
                    format!("the student's hidden size {} differs from the teacher's {}: matching hidden states needs the projection", s.hidden, t.hidden),
                ));
            }
        }
        Some(DistillLoss::Embeddings(_)) | None if encoder && widths_differ => {
            errors.push(FieldError::new(
                at,
                format!("`embeddings` compares sentence embeddings of equal width: the student's hidden size is {} and the teacher's {} (use `loss: hidden`, which projects)", s.hidden, t.hidden),
            ));
        }
        _ => {}
    }
}

/// `from_teacher: {"layers": [...]}`: block indices of the teacher, each once, increasing,
/// within its `num_hidden_layers`; only for a transformer teacher.
fn parse_from_teacher(
    s: &Map<String, Value>,
    sp: &str,
    facts: Option<&Facts>,
    teacher: Option<&TransformerFacts>,
    errors: &mut Vec<FieldError>,
) -> Option<Vec<usize>> {
    let fp = format!("{sp}/from_teacher");
    if facts.is_some() && teacher.is_none() {
        errors.push(FieldError::new(
            fp.clone(),
            "keeps blocks of a transformer teacher (bert, llama folder models); this teacher has none",
        ));
    }
    if s.contains_key("model_id") || s.contains_key("architecture") {
        errors.push(FieldError::new(
            sp,
            "give exactly one of `model_id`, `architecture`, `from_teacher` or `config`",
        ));
    }
    let Some(ft) = s.get("from_teacher").and_then(Value::as_object) else {
        errors.push(FieldError::new(fp, "must be an object {\"layers\": [...]}"));
        return None;
    };
    deny_unknown(ft, &["layers"], &fp, errors);
    let lp = format!("{fp}/layers");
    let Some(items) = ft.get("layers").and_then(Value::as_array) else {
        errors.push(FieldError::new(
            lp,
            "is required: the teacher's block indices to keep",
        ));
        return None;
    };
    let mut layers = Vec::with_capacity(items.len());
    for (i, v) in items.iter().enumerate() {
        match v.as_u64() {
            Some(l) if l < 100_000 => layers.push(l as usize),
            _ => {
                errors.push(FieldError::new(
                    format!("{lp}/{i}"),
                    "must be a block index",
                ));
                return None;
            }
        }
    }
    let total = teacher.map_or(usize::MAX, |t| t.layers);
    if layers.is_empty() {
        errors.push(FieldError::new(lp, "keep at least one block"));
        return None;
    }
    for (i, &l) in layers.iter().enumerate() {
        if l >= total {
            errors.push(FieldError::new(
                format!("{lp}/{i}"),
                format!(
                    "block {l} does not exist: the teacher has blocks 0..{}",
                    total.saturating_sub(1)
                ),
            ));
        } else if i > 0 && layers[i - 1] >= l {
            errors.push(FieldError::new(
                format!("{lp}/{i}"),
                "list each block once, in increasing order",
            ));
        }
    }
    Some(layers)
}

/// The facts of a student that keeps the teacher's blocks `layers`: the teacher's tensors
/// without the other blocks, renumbered, and a transformer of that many blocks.
pub(super) fn from_teacher_facts(f: &Facts, t: &TransformerFacts, layers: &[usize]) -> ModelFacts {
    let mut tensors = Vec::with_capacity(f.tensors.len());
    for info in &f.tensors {
        // `encoder.layer.{i}.` (bert, with or without `bert.`), `model.layers.{i}.` (llama).
        let block = ["encoder.layer.", "model.layers."].iter().find_map(|p| {
            let at = info.name.find(p)?;
            let rest = &info.name[at + p.len()..];
            let (index, tail) = rest.split_once('.')?;
            Some((at + p.len(), index.parse::<usize>().ok()?, tail.to_string()))
        });
        match block {
            None => tensors.push(info.clone()),
            Some((head, index, tail)) => {
                if let Some(new) = layers.iter().position(|&l| l == index) {
                    let mut renamed = info.clone();
                    renamed.name = format!("{}{new}.{tail}", &info.name[..head]);
                    tensors.push(renamed);
                }
            }
        }
    }
    ModelFacts {
        tensors,
        architecture: None,
        transformer: Some(TransformerFacts {
            layers: layers.len(),
            ..t.clone()
        }),
    }
}

/// Whether `arch` has a top-level layer called `name` (its `name`, or its index).
fn layer_exists(arch: &Architecture, name: &str) -> bool {
    arch.layers().iter().enumerate().any(|(i, l)| {
        l.name()
            .map_or_else(|| i.to_string() == name, |n| n == name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::engine::Family;

    fn facts(family: Family, hidden: usize, layers: usize, tokenizer: &str) -> TransformerFacts {
        TransformerFacts {
            family,
            max_positions: 512,
            has_tokenizer: true,
            tokenizer_sha256: Some(tokenizer.into()),
            config: serde_json::json!({}),
            classes: None,
            vocab_size: 1000,
            layers,
            hidden,
            intermediate: 4 * hidden,
            heads: 4,
        }
    }

    fn refused(
        t: &TransformerFacts,
        s: &TransformerFacts,
        loss: Option<DistillLoss>,
        projection: bool,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        check_transformer_student(
            t,
            Some(s),
            TransformerLoss {
                loss,
                projection: Some(projection),
            },
            "/steps/0/student/model_id",
            "/steps/0",
            &mut errors,
        );
        errors.into_iter().map(|e| e.pointer).collect()
    }

    #[test]
    fn uploaded_transformer_students_must_read_and_answer_as_their_teacher() {
        let teacher = facts(Family::Bert, 384, 6, "a");
        let narrow = facts(Family::Bert, 256, 3, "a");
        let model_id = vec!["/steps/0/student/model_id".to_string()];
        // Hidden states of other widths go through the projection; without it they cannot.
        assert!(refused(&teacher, &narrow, Some(DistillLoss::Hidden), true).is_empty());
        assert_eq!(
            refused(&teacher, &narrow, Some(DistillLoss::Hidden), false),
            vec!["/steps/0/projection".to_string()]
        );
        // Sentence embeddings are compared directly.
        assert_eq!(refused(&teacher, &narrow, None, true), model_id);
        let same = facts(Family::Bert, 384, 3, "a");
        assert!(refused(&teacher, &same, None, true).is_empty());
        // Another tokenizer, another family, a deeper student under `hidden`.
        assert_eq!(
            refused(&teacher, &facts(Family::Bert, 384, 3, "b"), None, true),
            model_id
        );
        assert_eq!(
            refused(&teacher, &facts(Family::Llama, 384, 3, "a"), None, true),
            model_id
        );
        assert_eq!(
            refused(
                &teacher,
                &facts(Family::Bert, 384, 8, "a"),
                Some(DistillLoss::Hidden),
                true
            ),
            model_id
        );
    }
}
