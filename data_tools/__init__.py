"""Dataset packer for ilm_dist: image datasets → WebDataset shards + DALI indices + ``manifest.json``
(the on-disk contract is in `ilm_dist.data.manifest`, the shard format in `ilm_dist.data.shard_format`).

CLIs (``--help`` for all options)::

    python -m data_tools.pack SOURCE OUT_DIR [options]               # folder tree, CSV/TSV, NIH files, .npz, DICOM
    python -m data_tools.verify OUT_DIR                              # re-read everything, report mismatches
    python -m data_tools.synthetic_dataset OUT_DIR [options]         # structured synthetic dataset, same format

Modules: `pack` (CLI and pipeline), `sources` / `labelfiles` / `dicom` (inputs), `splits` (groups, split
lists, stratified splits), `imaging` (decode, colour policy, fundus crop, JPEG), `shard_writer` (one tar +
its DALI index), `writer` (shard plan, manifest, staging directory), `verify`, `synthetic_dataset`.
"""

from data_tools.errors import PackError

__all__ = ["PackError"]
