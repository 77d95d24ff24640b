-- Access (API.md "Access"): every model, dataset and job belongs to one tenant (artifacts,
-- events and logs through their job); rows from before tenants belong to `default`.
alter table models add column tenant text not null default 'default';
alter table datasets add column tenant text not null default 'default';
alter table jobs add column tenant text not null default 'default';
create index models_tenant on models (tenant, id);
create index datasets_tenant on datasets (tenant, id);
create index jobs_tenant on jobs (tenant, id);

-- API keys: only the sha256 of a key is kept (keys are 256 random bits, so a fast hash is
-- enough); `prefix` is the key's first characters, to tell keys apart in lists.
create table api_keys (
    id           text primary key,          -- UUIDv7
    name         text not null,
    tenant       text not null,
    scope        text not null check (scope in ('read', 'write', 'admin')),
    prefix       text not null,
    hash         text not null unique,      -- sha256 hex of the whole key
    created_at   bigint not null,
    last_used_at bigint,
    revoked_at   bigint
);
