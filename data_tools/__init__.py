"""Dataset packer for ilm_dist: image datasets → WebDataset shards + DALI indices + ``manifest.json``
(the on-disk contract is in `ilm_dist.data.manifest`).

CLIs (``--help`` for all options)::

    python -m data_tools.pack SOURCE OUT_DIR [options]     # folder tree, CSV/TSV, NIH lists, .npz
    python -m data_tools.verify OUT_DIR                    # re-read everything, report mismatches
    python -m data_tools.synthetic OUT_DIR [options]       # structured synthetic dataset, same format

Modules: `pack` (CLI and pipeline), `sources` / `labelfiles` (inputs), `splits` (groups, stratified
splits), `imaging` (decode, colour policy, JPEG), `shards` (tar + DALI index), `writer` (shard plan,
manifest, staging directory), `verify`, `synthetic`.
"""

from data_tools.errors import PackError

__all__ = ["PackError"]
