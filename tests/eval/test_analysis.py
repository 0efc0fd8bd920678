"""Collecting method directories: what counts as comparable, the CKA cache, KS against scipy."""

import re
import shutil

import numpy as np
import pytest
from scipy.stats import ks_2samp

from ilm_dist.eval import analysis
from ilm_dist.eval.analysis import (
    check_comparable,
    cka_for,
    expand_dirs,
    ks_for,
    load_method,
    summarise,
)
from ilm_dist.eval.cka import linear_cka, subset_rbf_cka
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.settings import CkaParams
from ilm_dist.eval.store import load_npz, save_npz
from tests.eval.method_dirs import N_TEST, block_features, write_method

PARAMS = CkaParams(num_subsets=3, subset_size=16, seed=0)


def methods(eval_dir, *specs: dict):
    return [load_method(write_method(eval_dir, f"m{i}", seed=i, **spec)) for i, spec in enumerate(specs)]


# --------------------------------------------------------------------------- directories


def test_expand_dirs_takes_method_dirs_and_eval_dirs_in_order(tmp_path):
    b_dir, a_dir = write_method(tmp_path / "eval", "b"), write_method(tmp_path / "eval", "a")
    other = write_method(tmp_path / "other", "c")
    (tmp_path / "eval" / "subsets").mkdir()  # an eval dir holds more than method dirs
    assert expand_dirs([tmp_path / "eval"]) == [a_dir, b_dir]  # sorted by name
    assert expand_dirs([str(other), tmp_path / "eval", b_dir]) == [other, a_dir, b_dir, b_dir]


@pytest.mark.parametrize("make", ["empty_dir", "missing", "file"])
def test_expand_dirs_refuses_a_path_without_results_naming_it(tmp_path, make):
    path = tmp_path / "results"
    if make == "empty_dir":
        path.mkdir()
    elif make == "file":
        path.write_text("x")
    with pytest.raises(EvalError, match=f"^{re.escape(str(path))}: no source.json"):
        expand_dirs([write_method(tmp_path, "ok"), path])


def test_load_method_indexes_every_result(tmp_path):
    [m] = methods(tmp_path, {"modes": ("full", "linear"), "fractions": (0.01, 0.06, 1.0)})
    assert sorted(m.finetune) == [(mode, f) for mode in ("full", "linear") for f in (0.01, 0.06, 1.0)]
    assert sorted(m.probe) == [0.1]
    assert m.result_dir("linear", 0.06) == tmp_path / "m0" / "finetune" / "linear_f0.06"
    assert m.name == "m0" and m.source["task"] == "binary"


# --------------------------------------------------------------------------- comparable


def test_methods_on_the_same_data_subsets_and_fractions_are_comparable(tmp_path):
    check_comparable(methods(tmp_path, {}, {}, {}))


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"dataset_id": "dataset-2"}, ["packed dataset", "dataset-1", "dataset-2"]),
        ({"test_digest": "test-2"}, ["test images", "test-1", "test-2"]),
        ({"fractions": (0.06, 1.0)}, ["fine-tuning (mode, fraction)", "0.1", "0.06"]),
        ({"modes": ("linear",)}, ["fine-tuning (mode, fraction)", "'full'", "'linear'"]),
        ({"probe_fractions": (0.1, 1.0)}, ["probe fractions", "[0.1]", "[0.1, 1.0]"]),
        ({"subset_digest": "subset-seed1"}, ["label subsets at fraction 0.1", "fine-tuned"]),
    ],
)
def test_different_runs_are_refused_naming_both_directories(tmp_path, change, fragments):
    first, other = methods(tmp_path, {}, change)
    with pytest.raises(EvalError) as caught:
        check_comparable([first, other])
    message = str(caught.value)
    assert "\n" not in message
    for fragment in [str(first.path), str(other.path), *fragments]:
        assert fragment in message, message


def test_probes_on_different_label_subsets_are_refused(tmp_path):
    first, other = methods(tmp_path, {"fractions": ()}, {"fractions": ()})  # probes only
    other.probe[0.1]["subset"]["digest"] = "subset-seed1-f0.1"
    with pytest.raises(EvalError) as caught:
        check_comparable([first, other])
    message = str(caught.value)
    for fragment in (
        str(first.path),
        str(other.path),
        "probed",
        "0.1",
        "subset-seed0-f0.1",
        "subset-seed1-f0.1",
    ):
        assert fragment in message, message


def test_no_methods_or_a_shared_name_is_refused(tmp_path):
    with pytest.raises(EvalError, match="no method directories"):
        check_comparable([])
    first = load_method(write_method(tmp_path / "a", "same"))
    second = load_method(write_method(tmp_path / "b", "same"))
    with pytest.raises(EvalError, match="share a name") as caught:
        check_comparable([first, second])
    assert str(first.path) in str(caught.value) and str(second.path) in str(caught.value)


# --------------------------------------------------------------------------- CKA


def direct_cka(method, mode: str, fraction: float, params: CkaParams) -> dict:
    before = load_npz(method.path / "init_features_test.npz")
    after = load_npz(method.result_dir(mode, fraction) / "features_test.npz")
    out = {}
    for block in sorted(after):
        mean, std = subset_rbf_cka(
            before[block],
            after[block],
            params.num_subsets,
            params.subset_size,
            params.seed,
            params.sigma,
            params.relative,
        )
        out[block] = {"linear": linear_cka(before[block], after[block]), "rbf_mean": mean, "rbf_std": std}
    return out


def assert_same_cka(got: dict, want: dict, draws: int, size: int) -> None:
    assert sorted(got) == ["block1", "block2", "block3", "block4"] == sorted(want)
    for block, values in want.items():
        assert got[block]["rbf_subsets"] == draws and got[block]["rbf_subset_size"] == size
        for key, value in values.items():
            assert got[block][key] == pytest.approx(value, rel=1e-12), (block, key)


def refuse_recomputing(monkeypatch) -> None:
    for name in ("linear_cka", "subset_rbf_cka"):
        monkeypatch.setattr(analysis, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} recomputed"))


def test_cka_matches_the_cka_functions_and_is_cached_with_its_parameters(tmp_path, monkeypatch):
    [m] = methods(tmp_path, {})
    got = cka_for(m, "full", 0.1, PARAMS)
    assert_same_cka(got, direct_cka(m, "full", 0.1, PARAMS), draws=3, size=16)
    assert (m.result_dir("full", 0.1) / "cka.json").is_file()
    with monkeypatch.context() as patch:
        refuse_recomputing(patch)
        assert cka_for(m, "full", 0.1, PARAMS) == got  # read back from cka.json


@pytest.mark.parametrize(
    "changed",
    [
        CkaParams(num_subsets=2, subset_size=16, seed=0),
        CkaParams(num_subsets=3, subset_size=20, seed=0),
        CkaParams(num_subsets=3, subset_size=16, seed=1),
        CkaParams(num_subsets=3, subset_size=16, seed=0, sigma=0.5),
        CkaParams(num_subsets=3, subset_size=16, seed=0, absolute_sigma=True),
        CkaParams(num_subsets=3, subset_size=N_TEST, seed=0),  # every test image at once
    ],
)
def test_cka_is_recomputed_when_its_parameters_change(tmp_path, changed):
    [m] = methods(tmp_path, {})
    first = cka_for(m, "full", 0.1, PARAMS)
    again = cka_for(m, "full", 0.1, changed)
    draws, size = (1, N_TEST) if changed.subset_size >= N_TEST else (changed.num_subsets, changed.subset_size)
    assert_same_cka(again, direct_cka(m, "full", 0.1, changed), draws, size)
    assert again != first
    assert cka_for(m, "full", 0.1, changed) == again


def test_cka_is_recomputed_when_the_features_change_or_when_forced(tmp_path, monkeypatch):
    [m] = methods(tmp_path, {})
    first = cka_for(m, "full", 0.1, PARAMS)
    # `ilm-finetune --force` writes new features after fine-tuning again: the saved CKA is stale
    save_npz(m.result_dir("full", 0.1) / "features_test.npz", **block_features(np.random.default_rng(9)))
    after_finetune = cka_for(m, "full", 0.1, PARAMS)
    assert_same_cka(after_finetune, direct_cka(m, "full", 0.1, PARAMS), draws=3, size=16)
    assert after_finetune != first
    save_npz(m.path / "init_features_test.npz", **block_features(np.random.default_rng(10)))
    after_init = cka_for(m, "full", 0.1, PARAMS)
    assert_same_cka(after_init, direct_cka(m, "full", 0.1, PARAMS), draws=3, size=16)
    calls = []
    monkeypatch.setattr(analysis, "linear_cka", lambda x, y: calls.append(1) or linear_cka(x, y))
    assert cka_for(m, "full", 0.1, PARAMS, force=True) == after_init
    assert len(calls) == 4  # forced: every block recomputed


def test_a_copied_result_keeps_its_cache(tmp_path, monkeypatch):
    [m] = methods(tmp_path / "a", {})
    cka = cka_for(m, "full", 0.1, PARAMS)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = load_method(tmp_path / "b" / "m0")
    refuse_recomputing(monkeypatch)
    assert cka_for(copy, "full", 0.1, PARAMS) == cka


# --------------------------------------------------------------------------- KS and the summary


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_ks_matches_scipy_per_class(tmp_path, task):
    [m] = methods(tmp_path, {"task": task, "modes": ("linear",)})
    few = load_npz(m.result_dir("linear", 0.1) / "predictions.npz")["probs"]
    full = load_npz(m.result_dir("linear", 1.0) / "predictions.npz")["probs"]
    result = ks_for(m, "linear", 0.1)
    classes = m.source["class_names"]
    columns = {classes[1]: 1} if task == "binary" else {c: i for i, c in enumerate(classes)}
    assert sorted(result["per_class"]) == sorted(columns)
    for name, column in columns.items():
        test = ks_2samp(few[:, column], full[:, column])
        assert result["per_class"][name] == {"statistic": test.statistic, "pvalue": test.pvalue}
    assert result["mean_statistic"] == pytest.approx(
        np.mean([ks_2samp(few[:, c], full[:, c]).statistic for c in columns.values()])
    )


def test_summary_has_cka_for_full_fine_tuning_and_ks_below_all_labels(tmp_path):
    ms = methods(
        tmp_path,
        {"modes": ("full", "linear"), "fractions": (0.01, 0.1, 1.0)},
        {"modes": ("full", "linear"), "fractions": (0.01, 0.1, 1.0)},
    )
    summary = summarise(ms, PARAMS)
    assert sorted(summary["cka"]) == [(m, f) for m in ("m0", "m1") for f in (0.01, 0.1, 1.0)]
    assert sorted(summary["ks"]) == [
        (m, mode, f) for m in ("m0", "m1") for mode in ("full", "linear") for f in (0.01, 0.1)
    ]
    assert summary["ks"][("m1", "linear", 0.01)] == ks_for(ms[1], "linear", 0.01)


def test_summary_without_init_features_names_the_method(tmp_path):
    ms = methods(tmp_path, {}, {})
    (ms[1].path / "init_features_test.npz").unlink()
    with pytest.raises(EvalError, match=f"^{re.escape(str(ms[1].path))}: init_features_test.npz is missing"):
        summarise(ms, PARAMS)
