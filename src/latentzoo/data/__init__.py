"""Data: image sources, the train/val/test split and WebDataset shards.

- `latentzoo.data.sources`: `load_source(cfg)` → `SourceData` (digits, MNIST-style idx files, an image folder).
- `latentzoo.data.prepare`: `split_indices`, `prepare(cfg, seed, out_dir)` (prepare stage), `load_split`.
- `latentzoo.data.shards`: `write_shards` (shard stage), `load_manifest`, `verify_shards`, `shard_urls`.

Nothing is re-exported here: `prepare` is both a module and its main function, and importing the function into the
package would hide the module.
"""
