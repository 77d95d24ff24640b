-- Text datasets (`text`, `jsonl`) are stored as canonical JSONL; `text_bytes` is the UTF-8
-- size of their documents (null for tensor datasets, whose `samples` count arrays).
alter table datasets add column text_bytes bigint;
