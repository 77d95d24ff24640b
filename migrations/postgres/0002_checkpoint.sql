-- The last training checkpoint a job saved ({step, sha256, epoch}), so that an attempt that
-- dies mid-training is resumed by the next one instead of restarted. Cleared on success.
alter table jobs add column checkpoint text;
