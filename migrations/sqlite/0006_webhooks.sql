-- Webhooks (API.md "Access"; the Standard Webhooks spec): a job's `webhook_url`, and a durable
-- outbox of deliveries written in the same transaction as the state change they announce.
alter table jobs add column webhook_url text;

create table webhook_deliveries (
    id              text primary key,        -- the `webhook-id` header: msg_<UUIDv7>
    job_id          text not null references jobs (id) on delete cascade,
    event_type      text not null,           -- job.started | job.succeeded | job.failed | job.cancelled
    payload         text not null,           -- the JSON body, exactly as signed and sent
    url             text not null,
    state           text not null check (state in ('pending', 'delivered', 'failed')),
    attempts        bigint not null default 0,
    next_attempt_at bigint not null,         -- µs; a sender claims a delivery by moving it on
    responses       text not null,           -- JSON [{at, status, error, duration_ms, body}], last 20
    created_at      bigint not null,
    delivered_at    bigint
);
create index webhook_deliveries_due on webhook_deliveries (next_attempt_at) where state = 'pending';
create index webhook_deliveries_job on webhook_deliveries (job_id, id);
