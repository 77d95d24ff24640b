//! The worker: claims jobs, runs them on a blocking thread, heartbeats while they run, and
//! records the outcome through the fenced queue calls.
//!
//! [`Worker::run_next`] runs exactly one claimable job to its end — the hook tests use to
//! drive the queue deterministically; [`Worker::run`] is the long-running loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::runner::{
    self, PipelineError, PipelineHooks, PipelineInputs, PipelineOutput, ResumePoint,
};
use super::{Completion, Error, JobError, JobInputs, Queue};
use crate::codes::Code;
use crate::compress::engine::train::EpochMetrics;
use crate::compress::formats::hf;
use crate::compress::progress::Ctx;
use crate::db::artifacts::ArtifactRecord;
use crate::db::datasets::DatasetRecord;
use crate::db::jobs::{JobRecord, JobState};
use crate::db::models::{ModelFile, ModelRecord};
use crate::ids::{now_micros, ArtifactId, DatasetId, JobId};
use crate::spec;
use crate::store::Store;

/// Timing knobs of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Lease length; heartbeats every third of it.
    pub lease: Duration,
    /// Longest wait between polls when no wake-up arrives.
    pub poll_interval: Duration,
    /// On shutdown, how long a running job may continue before it is released.
    pub shutdown_grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// One worker (several may run in one process, any number across machines).
#[derive(Debug, Clone)]
pub struct Worker {
    queue: Queue,
    store: Store,
    id: String,
    config: WorkerConfig,
}

/// Channel message kind that carries a checkpoint rather than an event.
const CHECKPOINT: &str = "checkpoint";

/// A job's inputs, loaded before computing.
struct Prepared {
    spec: spec::JobSpec,
    model: ModelRecord,
    datasets: HashMap<DatasetId, DatasetRecord>,
    models: HashMap<String, ModelRecord>,
    resume: Option<ResumePoint>,
}

/// Why the cancel flag of a running job was raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    CancelRequested,
    Timeout,
    Shutdown,
    LeaseLost,
}

impl Worker {
    /// A worker named `id` over `queue` and `store`.
    pub fn new(queue: Queue, store: Store, id: impl Into<String>, config: WorkerConfig) -> Self {
        Self {
            queue,
            store,
            id: id.into(),
            config,
        }
    }

    /// This worker's id (recorded on the jobs it claims).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Claim one job and run it to its end. Returns the job and the state it was left in, or
    /// `None` when nothing was claimable.
    pub async fn run_next(&self) -> Result<Option<(JobId, JobState)>, Error> {
        self.run_next_until(&CancellationToken::new()).await
    }

    async fn run_next_until(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<(JobId, JobState)>, Error> {
        let Some(job) = self
            .queue
            .claim(&self.id, self.config.lease, now_micros())
            .await?
        else {
            return Ok(None);
        };
        let id = job.id;
        let span =
            tracing::info_span!("job", job_id = %id, attempt = job.attempt, worker = %self.id);
        let state = self.execute(job, shutdown).instrument(span).await?;
        Ok(Some((id, state)))
    }

    /// Loop until `shutdown`: rescue expired leases, claim, run, wait for a wake-up.
    pub async fn run(self, shutdown: CancellationToken) {
        let wake = self.queue.wake_handle();
        let mut last_rescue = Instant::now() - self.config.lease;
        info!(worker = %self.id, "worker started");
        while !shutdown.is_cancelled() {
            // Armed before looking at the queue, so a job announced meanwhile is not missed.
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if last_rescue.elapsed() >= self.config.lease / 2 {
                last_rescue = Instant::now();
                match self.queue.rescue(now_micros()).await {
                    Ok(rescued) => {
                        for (job, state) in rescued {
                            warn!(job_id = %job, state = state.as_str(), "rescued a job whose lease expired");
                            metrics::counter!("whittle_job_rescues_total", "state" => state.as_str())
                                .increment(1);
                        }
                    }
                    Err(e) => warn!(error = %e, "rescue failed"),
                }
            }
            match self.run_next_until(&shutdown).await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "worker iteration failed; retrying after the poll interval")
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(self.config.poll_interval) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        info!(worker = %self.id, "worker stopped");
    }

    /// Run a job this worker already claimed (with [`Queue::claim`]) to its end.
    pub async fn run_claimed(&self, job: JobRecord) -> Result<JobState, Error> {
        self.execute(job, &CancellationToken::new()).await
    }

    async fn execute(
        &self,
        job: JobRecord,
        shutdown: &CancellationToken,
    ) -> Result<JobState, Error> {
        let started = Instant::now();
        let (id, attempt) = (job.id, job.attempt);
        let Prepared {
            spec,
            model,
            datasets,
            models,
            resume,
        } = match self.prepare(&job).await {
            Ok(p) => p,
            Err(error) => return self.queue.fail(id, attempt, &error, now_micros()).await,
        };
        if let Some(r) = &resume {
            info!(
                step = r.step,
                epoch = r.epoch,
                "resuming from the checkpoint of an earlier attempt"
            );
            let message = format!(
                "resuming step {} after {} {} from an earlier attempt's checkpoint",
                r.step + 1,
                r.unit.as_deref().unwrap_or("epoch"),
                r.epoch
            );
            self.queue
                .event(
                    id,
                    attempt,
                    "log",
                    &json!({"level": "info", "message": message}),
                )
                .await?;
        }
        info!(steps = spec.steps.len(), "job started");
        // Renew the lease once before computing: a cancel asked for between the claim and
        // now is seen before any work is done.
        let cancel_now = self
            .queue
            .heartbeat(id, attempt, self.config.lease, None, now_micros())
            .await?;

        let cancel = Arc::new(AtomicBool::new(cancel_now));
        let progress = Arc::new(Mutex::new(None::<Value>));
        let (events_tx, mut events_rx) = mpsc::unbounded_channel::<(String, Value)>();

        let compute = {
            let (store, job, model, cancel, progress, events_tx) = (
                self.store.clone(),
                job.clone(),
                model.clone(),
                cancel.clone(),
                progress.clone(),
                events_tx.clone(),
            );
            let span = tracing::Span::current();
            tokio::task::spawn_blocking(move || {
                let _guard = span.enter();
                let steps = spec.steps.len();
                let current_step = Mutex::new((0usize, "")); // (index, op)
                let last_sent = Mutex::new(Instant::now() - Duration::from_secs(1));
                let report = |fraction: f64, message: &str| {
                    let (index, op) = *current_step.lock().unwrap_or_else(|e| e.into_inner());
                    let value = json!({
                        "step": index, "op": op,
                        "fraction": (index as f64 + fraction) / steps as f64,
                        "message": message, "updated_at": crate::ids::rfc3339(now_micros()),
                    });
                    *progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(value.clone());
                    let mut last = last_sent.lock().unwrap_or_else(|e| e.into_inner());
                    if last.elapsed() >= Duration::from_millis(250) || fraction >= 1.0 {
                        *last = Instant::now();
                        let _ = events_tx.send(("progress".into(), value));
                    }
                };
                let step_started = |index: usize, op: &str| {
                    *current_step.lock().unwrap_or_else(|e| e.into_inner()) =
                        (index, spec.steps[index].op());
                    let _ = events_tx.send((
                        "log".into(),
                        json!({"level": "info", "message": format!("step {}/{}: {op}", index + 1, steps)}),
                    ));
                };
                let last_epoch_log = Mutex::new(None::<Instant>);
                let epoch_finished = |step: usize, m: &EpochMetrics| {
                    let mut data = serde_json::to_value(m).unwrap_or(Value::Null);
                    data["step"] = json!(step);
                    let _ = events_tx.send(("metrics".into(), data));
                    // Every epoch's figures go out as `metrics`; the log gets a line per
                    // second at most.
                    let mut last = last_epoch_log.lock().unwrap_or_else(|e| e.into_inner());
                    if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                        return;
                    }
                    *last = Some(Instant::now());
                    let _ = events_tx.send((
                        "log".into(),
                        json!({"level": "info", "message": format!(
                            "epoch {}: train_loss {:.4}{}", m.epoch, m.train_loss,
                            m.val_accuracy.map(|a| format!(", val_accuracy {a:.4}")).unwrap_or_default())}),
                    ));
                };
                let checkpoint_saved = |point: ResumePoint| {
                    let _ = events_tx.send((
                        CHECKPOINT.into(),
                        serde_json::to_value(point).unwrap_or(Value::Null),
                    ));
                };
                let ctx = Ctx::new(&report, &cancel);
                let inputs = PipelineInputs {
                    store: store.as_ref(),
                    job: &job,
                    spec: &spec,
                    model: &model,
                    datasets: &datasets,
                    models: &models,
                    resume,
                };
                let hooks = PipelineHooks {
                    step_started: &step_started,
                    epoch_finished: &epoch_finished,
                    checkpoint_saved: &checkpoint_saved,
                };
                runner::run_pipeline(&inputs, &ctx, &hooks)
            })
        };
        drop(events_tx);
        tokio::pin!(compute);

        let mut heartbeat = tokio::time::interval(self.config.lease / 3);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = tokio::time::sleep(Duration::from_secs(job.timeout_seconds.max(1) as u64));
        tokio::pin!(deadline);
        let grace = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(grace);
        let mut shutting_down = false;
        let mut stop = cancel_now.then_some(StopReason::CancelRequested);
        let raise = |reason: StopReason, stop: &mut Option<StopReason>| {
            if stop.is_none() {
                *stop = Some(reason);
            }
            cancel.store(true, Ordering::Relaxed);
        };

        let outcome = loop {
            tokio::select! {
                joined = &mut compute => break joined,
                Some((kind, data)) = events_rx.recv() => {
                    if let Err(Error::LeaseLost) = self.record(id, attempt, &kind, &data).await {
                        raise(StopReason::LeaseLost, &mut stop);
                    }
                }
                _ = heartbeat.tick() => {
                    let p = progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    match self.queue.heartbeat(id, attempt, self.config.lease, p.as_ref(), now_micros()).await {
                        Ok(true) => raise(StopReason::CancelRequested, &mut stop),
                        Ok(false) => {}
                        Err(Error::LeaseLost) => raise(StopReason::LeaseLost, &mut stop),
                        Err(e) => warn!(error = %e, "heartbeat failed; will retry"),
                    }
                }
                _ = &mut deadline, if stop.is_none() => raise(StopReason::Timeout, &mut stop),
                _ = shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    grace.as_mut().reset(tokio::time::Instant::now() + self.config.shutdown_grace);
                }
                _ = &mut grace, if shutting_down && stop.is_none() => raise(StopReason::Shutdown, &mut stop),
            }
        };
        // Events still buffered were sent before the outcome: record them first.
        while let Ok((kind, data)) = events_rx.try_recv() {
            let _ = self.record(id, attempt, &kind, &data).await;
        }

        let now = now_micros();
        let result = match outcome {
            Ok(Ok(output)) => match stop {
                Some(StopReason::LeaseLost) => Err(Error::LeaseLost),
                _ => {
                    let mut done = self.completion(&job, &model, output);
                    // The stored progress is the last heartbeat's (a few seconds old at best):
                    // a finished job reads 100%, at its last step.
                    done.progress = progress
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone()
                        .map(|mut p| {
                            p["fraction"] = json!(1.0);
                            p["message"] = json!("done");
                            p["updated_at"] = json!(crate::ids::rfc3339(now));
                            p
                        });
                    self.queue
                        .complete(id, attempt, &done, now)
                        .await
                        .map(|_| JobState::Succeeded)
                }
            },
            Ok(Err(PipelineError::Cancelled)) => match stop {
                Some(StopReason::Timeout) => {
                    let error = JobError::fatal(
                        Code::Timeout,
                        format!(
                            "the attempt ran longer than timeout_seconds = {}",
                            job.timeout_seconds
                        ),
                    );
                    self.queue.fail(id, attempt, &error, now).await
                }
                Some(StopReason::Shutdown) => self
                    .queue
                    .release(id, attempt, now)
                    .await
                    .map(|_| JobState::Queued),
                Some(StopReason::LeaseLost) => Err(Error::LeaseLost),
                Some(StopReason::CancelRequested) | None => self
                    .queue
                    .finish_cancelled(id, attempt, now)
                    .await
                    .map(|_| JobState::Cancelled),
            },
            Ok(Err(error)) => self.queue.fail(id, attempt, &error.job_error(), now).await,
            Err(join) => {
                let error = JobError::fatal(
                    Code::InternalError,
                    "the job's computation panicked; this is a bug in Whittle",
                );
                warn!(error = %join, "job computation panicked");
                self.queue.fail(id, attempt, &error, now).await
            }
        };
        match &result {
            Ok(state) => {
                info!(
                    state = state.as_str(),
                    seconds = started.elapsed().as_secs_f64(),
                    "job finished"
                );
                metrics::counter!("whittle_job_attempts_total", "outcome" => state.as_str())
                    .increment(1);
                metrics::histogram!("whittle_job_duration_seconds", "outcome" => state.as_str())
                    .record(started.elapsed().as_secs_f64());
            }
            Err(Error::LeaseLost) => warn!("lease lost: this attempt's results were discarded"),
            Err(e) => warn!(error = %e, "recording the job's outcome failed"),
        }
        result
    }

    /// Record a message from the compute thread: a checkpoint, or an event.
    async fn record(&self, id: JobId, attempt: i64, kind: &str, data: &Value) -> Result<(), Error> {
        if kind == CHECKPOINT {
            self.queue.save_checkpoint(id, attempt, data).await
        } else {
            self.queue.event(id, attempt, kind, data).await
        }
    }

    /// Load what a job needs before computing; errors here are fatal for the job.
    async fn prepare(&self, job: &JobRecord) -> Result<Prepared, JobError> {
        let spec = spec::parse_job(&job.spec, None).map_err(|errors| {
            JobError::fatal(
                Code::InvalidSpec,
                format!("the stored job spec no longer parses: {errors:?}"),
            )
        })?;
        let inputs = JobInputs::load(self.queue.db(), None, &job.spec)
            .await
            .map_err(|e| {
                JobError::retryable(
                    Code::DatabaseError,
                    format!("loading the job's inputs failed: {e}"),
                )
            })?;
        let model = inputs.model.ok_or_else(|| {
            JobError::fatal(
                Code::ModelNotFound,
                format!("input model {} no longer exists", job.model_id),
            )
        })?;
        let (datasets, models) = (inputs.datasets, inputs.models);
        let resume = job
            .checkpoint
            .as_ref()
            .and_then(|c| serde_json::from_value::<ResumePoint>(c.clone()).ok());
        Ok(Prepared {
            spec,
            model,
            datasets,
            models,
            resume,
        })
    }

    fn completion(
        &self,
        job: &JobRecord,
        input: &ModelRecord,
        output: PipelineOutput,
    ) -> Completion {
        let now = now_micros();
        let mut model = ModelRecord::new(
            format!("{} (job {})", input.name, job.id),
            output.model.sha256.clone(),
            output.model.size,
            &output.header,
            output.architecture.clone(),
            Some((
                job.id,
                job.spec["steps"]
                    .as_array()
                    .map_or(0, |s| s.len() as i64 - 1),
            )),
        )
        // A folder model's output is a folder model: its config and tokenizer come along.
        .with_folder(
            input.companions(),
            input.config.clone(),
            input.family.clone(),
        );
        // A step that changed the config (a new head) replaces its file.
        if let Some((config, blob)) = &output.config {
            model.files.retain(|f| f.path != hf::CONFIG);
            model.files.push(ModelFile {
                path: hf::CONFIG.into(),
                size_bytes: blob.size as i64,
                sha256: blob.sha256.clone(),
            });
            model.files.sort_by(|a, b| a.path.cmp(&b.path));
            model.config = Some(config.clone());
        }
        // What a job makes belongs to the job's tenant.
        model.tenant = job.tenant.clone();
        let artifact = |kind: &str, format: &str, blob: &crate::store::BlobRef| ArtifactRecord {
            id: ArtifactId::new(),
            job_id: job.id,
            kind: kind.into(),
            format: format.into(),
            sha256: blob.sha256.clone(),
            size_bytes: blob.size as i64,
            created_at: now,
        };
        Completion {
            artifacts: std::iter::once(artifact("model", "safetensors", &output.model))
                .chain(
                    output
                        .encodings
                        .iter()
                        .map(|(kind, format, blob)| artifact(kind, format, blob)),
                )
                .chain(
                    output
                        .outputs
                        .iter()
                        .map(|blob| artifact("outputs", "safetensors", blob)),
                )
                .chain(std::iter::once(artifact("report", "json", &output.report)))
                .collect(),
            models: vec![model],
            metrics: output.metrics,
            progress: None,
        }
    }
}
