"""Ray Tune sweeps over run-config keys (loss weights, layer subsets, loss type, training knobs).

``spec`` loads a sweep YAML (base run config + search space + scheduler), ``space`` parses and
checks the search space before Ray starts, ``trial`` runs one short pretraining as a subprocess of
``launch/pretrain.py`` and reports its kNN monitor records, ``sweep`` drives Ray Tune, ``results``
writes the table, plot and best run config. Entry point: ``launch/tune.py``.
"""
