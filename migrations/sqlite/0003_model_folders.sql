-- Models as Hugging Face folders: the weights stay the row's blob (`sha256`, one safetensors
-- file, shards merged on upload); `files` lists every file of the folder, weights included
-- (JSON [{path, size_bytes, sha256}], each a blob); `config` is the parsed config.json and
-- `family` the model family it names (sequential | bert | llama), when known.
alter table models add column files text;
alter table models add column config text;
alter table models add column family text;
