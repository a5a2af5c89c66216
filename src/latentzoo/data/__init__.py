"""Data: image sources, the train/val/test split and WebDataset shards.

- `latentzoo.data.sources`: `scan_source(cfg)` → `SourceIndex` (where each image is, no pixels), `read_images`,
  and `load_source(cfg)` → `SourceData` (both at once) for digits, MNIST-style idx files and image folders.
- `latentzoo.data.prepare`: `split_indices`, `prepare(cfg, seed, out_dir)` (prepare stage: the split index),
  `load_prepared`, `load_split`.
- `latentzoo.data.shards`: `write_shards` (shard stage: one job per shard, `shard_jobs`, `write_shard`),
  `load_manifest`, `verify_shards`, `shard_urls`.

Nothing is re-exported here: `prepare` is both a module and its main function, and importing the function into the
package would hide the module.
"""
