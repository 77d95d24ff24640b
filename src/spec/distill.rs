//! The `distill` step: the job's model is the teacher, the output is the student.

use serde_json::{json, Map, Value};

use super::fields::{bool_or, deny_unknown, f64_in, object};
use super::train::{
    check_dataset_fits, parse_training, require_architecture, FinetuneSpec, TrainingRules,
};
use super::{Facts, FieldError, ModelFacts};
use crate::codes::Code;
use crate::compress::distill::FeaturePair;
use crate::compress::engine::finetune::Validation;
use crate::compress::engine::sequential::arch::Architecture;

/// Where the student comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum StudentSpec {
    /// An uploaded model (with an architecture).
    Model(String),
    /// A fresh, seeded initialisation of this architecture.
    Architecture(Value),
}

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
        };
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
    let baseline = bool_or(obj, "baseline", false, pointer, &mut errors);
    let keep_sparsity = bool_or(obj, "keep_sparsity", false, pointer, &mut errors);
    if keep_sparsity
        && obj
            .get("student")
            .is_some_and(|s| s.get("model_id").is_none())
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
                    "is required: {\"model_id\": …} or {\"architecture\": {…}}",
                ));
            }
            None
        }
        Some(s) => {
            let sp = format!("{pointer}/student");
            deny_unknown(s, &["model_id", "architecture"], &sp, &mut errors);
            match (s.get("model_id"), s.get("architecture")) {
                (Some(Value::String(id)), None) if uuid::Uuid::parse_str(id).is_ok() => {
                    if let Some(f) = facts {
                        match f.models.get(id) {
                            None => errors.push(FieldError {
                                code: Code::ModelNotFound,
                                ..FieldError::new(format!("{sp}/model_id"), "no model with this id")
                            }),
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
    let labels_required = alpha < 1.0;
    if let Some(f) = facts {
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
            transformers: false,
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
                },
                student_facts,
            )),
            _ => Err(errors),
        }
    } else {
        Err(errors)
    }
}

/// Whether `arch` has a top-level layer called `name` (its `name`, or its index).
fn layer_exists(arch: &Architecture, name: &str) -> bool {
    arch.layers().iter().enumerate().any(|(i, l)| {
        l.name()
            .map_or_else(|| i.to_string() == name, |n| n == name)
    })
}
