"""Small hand-made method directories, laid out as ``ilm-finetune`` / ``ilm-probe`` write them
(:mod:`ilm_dist.eval.store`), with seeded values the analysis and report tests read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ilm_dist.eval.context import PROTOCOL, SOURCE
from ilm_dist.eval.protocol import load_protocol
from ilm_dist.eval.store import fraction_tag, save_npz, write_json

CLASSES = {"binary": ["benign", "malignant"], "multiclass": ["a", "b", "c"]}
BLOCK_DIMS = (4, 6, 8, 10)
N_TEST = 40


def block_features(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {f"block{i}": rng.normal(size=(N_TEST, d)).astype(np.float32) for i, d in enumerate(BLOCK_DIMS, 1)}


def scored(rng: np.random.Generator, names: tuple[str, ...], n_boot: int) -> dict:
    """``metrics`` and, with a bootstrap, ``ci95`` intervals around them (3 decimals, as printed)."""
    values = {n: round(float(rng.uniform(0.55, 0.95)), 3) for n in names}
    record = {"metrics": values, "ci95": {}, "primary": names[0]}
    if n_boot:
        record["ci95"] = {n: [round(v - 0.05, 3), round(v + 0.04, 3)] for n, v in values.items()}
    return record


def write_method(
    eval_dir: Path,
    name: str,
    *,
    task: str = "binary",
    modes: tuple[str, ...] = ("full",),
    fractions: tuple[float, ...] = (0.1, 1.0),
    probe_fractions: tuple[float, ...] = (0.1,),
    dataset_id: str = "dataset-1",
    test_digest: str = "test-1",
    subset_digest: str = "subset-seed0",
    n_boot: int = 200,
    seed: int = 0,
) -> Path:
    """A method directory with source.json, init features, fine-tuning and probe results."""
    rng = np.random.default_rng(seed)
    out = eval_dir / name
    classes = CLASSES[task]
    names = ("auc", "accuracy", "f1") if task == "binary" else ("accuracy", "macro_f1", "macro_auc")
    write_json(
        out / SOURCE,
        {
            "name": name,
            "weights": f"/runs/{name}/backbone.pt",
            "arch": "resnet18",
            "config": f"/runs/{name}/config.yaml",
            "data": f"/data/packed/{dataset_id}",
            "dataset_id": dataset_id,
            "task": task,
            "class_names": classes,
            "image_size": 32,
            "test_digest": test_digest,
        },
    )
    protocol = load_protocol("ilm_dist").resolve(task, None)  # what the commands record by default
    write_json(out / PROTOCOL, protocol.record())
    save_npz(out / "init_features_test.npz", **block_features(rng))
    for mode in modes:
        for fraction in fractions:
            result = out / "finetune" / f"{mode}_{fraction_tag(fraction)}"
            subset = {
                "digest": f"{subset_digest}-{fraction_tag(fraction)}",
                "num_samples": round(500 * fraction),
            }
            write_json(
                result / "metrics.json",
                {
                    "method": name,
                    "kind": "finetune",
                    "mode": mode,
                    "fraction": fraction,
                    "task": task,
                    "class_names": classes,
                    "dataset_id": dataset_id,
                    "subset": subset,
                    "test": {"num_samples": N_TEST, "digest": test_digest},
                    "settings": {"mode": mode, "n_boot": n_boot, "seed": 0},
                    "protocol": protocol.summary(),
                    **scored(rng, names, n_boot),
                },
            )
            save_npz(result / "features_test.npz", **block_features(rng))
            probs = rng.dirichlet(np.ones(len(classes)), size=N_TEST)
            save_npz(result / "predictions.npz", probs=probs, labels=rng.integers(0, len(classes), N_TEST))
    for fraction in probe_fractions:
        write_json(
            out / "probe" / fraction_tag(fraction) / "metrics.json",
            {
                "method": name,
                "kind": "probe",
                "fraction": fraction,
                "task": task,
                "dataset_id": dataset_id,
                "subset": {"digest": f"{subset_digest}-{fraction_tag(fraction)}", "num_samples": 50},
                "test": {"num_samples": N_TEST, "digest": test_digest},
                "settings": {"n_boot": n_boot, "seed": 0},
                "protocol": protocol.summary(),
                "blocks": {f"block{i}": scored(rng, names, n_boot) for i in range(1, len(BLOCK_DIMS) + 1)},
            },
        )
    return out
