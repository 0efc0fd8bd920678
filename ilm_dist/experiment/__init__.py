"""The paper's experiment as one command: methods x pretraining seeds x label fractions, pretrained, evaluated
and compared (``launch/experiment.py``, ``ilm-experiment``).

- :mod:`~ilm_dist.experiment.config`: the experiment file (typed, validated, paths relative to the file);
- :mod:`~ilm_dist.experiment.cells`: the cells (one command each) and the directory layout;
- :mod:`~ilm_dist.experiment.state`: which cells are done, running or failed (``state.json``), the progress line;
- :mod:`~ilm_dist.experiment.backends`: running the cells in sequence or as Ray tasks;
- :mod:`~ilm_dist.experiment.stats`: paired differences with a two-level bootstrap over seeds and test images;
- :mod:`~ilm_dist.experiment.report`: ``report.md``, ``summary.json``, tables and plots;
- :mod:`~ilm_dist.experiment.command`: the command line.
"""
