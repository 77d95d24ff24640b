-- Whittle schema, PostgreSQL flavour. Keep in step with migrations/sqlite/0001_init.sql:
-- the same tables and columns; only types and auto-increment spelling differ.
-- Timestamps are microseconds since the Unix epoch (bigint); JSON is stored as text.

create table models (
    id            text primary key,          -- UUIDv7
    name          text not null,
    sha256        text not null,             -- blob holding the safetensors bytes
    size_bytes    bigint not null,
    parameters    bigint not null,           -- elements over all tensors
    tensors       text not null,             -- JSON [{name, dtype, shape}]
    architecture  text,                      -- JSON, null for weight-only models
    source_job_id text,                      -- set on models a job produced
    source_step   bigint,
    created_at    bigint not null
);

create table datasets (
    id            text primary key,
    name          text not null,
    format        text not null,             -- as uploaded: safetensors | csv | idx
    samples       bigint not null,
    feature_shape text not null,             -- JSON [d1, d2, …]
    num_classes   bigint,
    sha256        text not null,             -- blob in canonical safetensors form (x, y)
    size_bytes    bigint not null,
    created_at    bigint not null
);

create table jobs (
    id               text primary key,
    state            text not null check (state in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    model_id         text not null,          -- no foreign key: a finished job outlives its input
    spec             text not null,          -- JSON: the validated request (steps, eval, seed, …)
    priority         bigint not null default 0,
    attempt          bigint not null default 0,
    max_attempts     bigint not null,
    timeout_seconds  bigint not null,
    idempotency_key  text unique,
    request_sha256   text,                   -- body hash, to tell a replay from a key reuse
    worker_id        text,
    lease_expires_at bigint,
    run_at           bigint not null,        -- not claimable before (retry backoff)
    cancel_requested bigint not null default 0,
    progress         text,                   -- JSON
    error            text,                   -- JSON {code, message, retryable}
    result           text,                   -- JSON {model_id, artifacts}
    metrics          text,                   -- JSON, see API.md "Metrics"
    created_at       bigint not null,
    started_at       bigint,
    finished_at      bigint,
    updated_at       bigint not null
);

-- The claim query reads queued jobs by priority then age (ids are time-ordered).
create index jobs_claimable on jobs (priority desc, id) where state = 'queued';
create index jobs_running_lease on jobs (lease_expires_at) where state = 'running';
create index jobs_model on jobs (model_id);

create table job_labels (
    job_id text not null references jobs (id) on delete cascade,
    key    text not null,
    value  text not null,
    primary key (job_id, key)
);
create index job_labels_kv on job_labels (key, value);

-- Append-only event log per job: SSE replays it (seq = event id), logs read it.
create table job_events (
    seq        bigserial primary key,
    job_id     text not null references jobs (id) on delete cascade,
    kind       text not null,                -- state | progress | log | metrics
    data       text not null,                -- JSON
    created_at bigint not null
);
create index job_events_job on job_events (job_id, seq);

create table artifacts (
    id         text primary key,
    job_id     text not null references jobs (id) on delete cascade,
    kind       text not null,                -- model | gguf | packed | report
    format     text not null,                -- safetensors | gguf | json
    sha256     text not null,
    size_bytes bigint not null,
    created_at bigint not null
);
create index artifacts_job on artifacts (job_id);
