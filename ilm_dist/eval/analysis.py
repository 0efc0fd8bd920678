"""Collect the results of several methods on one dataset, check they are comparable, add CKA and KS.

Methods are comparable when they were evaluated on the same packed dataset and test images, under the
same evaluation protocol (``protocol.json``) and settings, with the same label fractions drawn as the same
subsets. CKA (per fine-tuning result, before vs after, per block) is cached in the result's ``cka.json``
with its parameters and the digests of the features it was computed from (a result fine-tuned again with
``--force`` gets new CKA); KS is cheap and recomputed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ilm_dist.eval.cka import linear_cka, subset_plan, subset_rbf_cka
from ilm_dist.eval.context import PROTOCOL, SOURCE
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.ks import ks_per_class
from ilm_dist.eval.protocol import EvalProtocol, load_protocol, recorded_protocol
from ilm_dist.eval.settings import CkaParams
from ilm_dist.eval.store import arrays_digest, load_npz, read_json, write_json

log = logging.getLogger("ilm_dist")

CKA_FORMAT = 2  # bump when cka.json's contents change, so older files are recomputed


@dataclass
class MethodResults:
    name: str
    path: Path
    source: dict
    protocol: dict | None  # protocol.json: the evaluation protocol every result of the method used
    finetune: dict[tuple[str, float], dict] = field(default_factory=dict)  # (mode, fraction) -> metrics.json
    probe: dict[float, dict] = field(default_factory=dict)  # fraction -> metrics.json

    def result_dir(self, mode: str, fraction: float) -> Path:
        return Path(self.finetune[(mode, fraction)]["_dir"])


def expand_dirs(paths: list[str | Path]) -> list[Path]:
    """Method directories; an eval directory stands for all method directories in it."""
    found = []
    for path in map(Path, paths):
        if (path / SOURCE).is_file():
            found.append(path)
        elif path.is_dir() and (subs := sorted(p.parent for p in path.glob(f"*/{SOURCE}"))):
            found += subs
        else:
            raise EvalError(
                f"{path}: no {SOURCE} (not a method directory written by launch/finetune.py or probe.py)"
            )
    return found


def load_method(path: Path) -> MethodResults:
    source = read_json(path / SOURCE)
    protocol = read_json(path / PROTOCOL) if (path / PROTOCOL).is_file() else None
    method = MethodResults(source["name"], path, source, protocol)
    for metrics in sorted(path.glob("finetune/*/metrics.json")):
        record = read_json(metrics) | {"_dir": str(metrics.parent)}
        method.finetune[(record["mode"], record["fraction"])] = record
    for metrics in sorted(path.glob("probe/*/metrics.json")):
        record = read_json(metrics) | {"_dir": str(metrics.parent)}
        method.probe[record["fraction"]] = record
    return method


def check_comparable(methods: list[MethodResults]) -> None:
    """Raise :class:`EvalError` naming the directories and values that differ."""
    if not methods:
        raise EvalError("no method directories to analyse")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise EvalError(f"two method directories share a name: {[str(m.path) for m in methods]}")
    for method in methods:
        _check_recorded_protocol(method)
    first = methods[0]
    for other in methods[1:]:
        if other.protocol["digest"] != first.protocol["digest"]:
            raise EvalError(
                f"mismatched protocols: {first.path} was evaluated under {_describe(first.protocol)}, "
                f"{other.path} under {_describe(other.protocol)}"
            )
        for key, what in (("dataset_id", "packed dataset"), ("test_digest", "test images")):
            if other.source[key] != first.source[key]:
                raise EvalError(
                    f"mismatched runs: {first.path} used {what} {first.source['data']} ({first.source[key]}), "
                    f"{other.path} used {other.source['data']} ({other.source[key]})"
                )
        _check_same(
            first, other, "fine-tuning (mode, fraction)", sorted(first.finetune), sorted(other.finetune)
        )
        _check_same(first, other, "probe fractions", sorted(first.probe), sorted(other.probe))
        for kind, a, b in (
            ("fine-tuning", first.finetune, other.finetune),
            ("probe", first.probe, other.probe),
        ):
            for key, record in a.items():
                _check_same_settings(first, other, f"{kind} {key}", record["settings"], b[key]["settings"])
        finetuned = [(key[1], record, other.finetune[key]) for key, record in first.finetune.items()]
        _check_subsets(first, other, "fine-tuned", finetuned)
        _check_subsets(first, other, "probed", [(f, r, other.probe[f]) for f, r in first.probe.items()])


def _check_subsets(
    a: MethodResults, b: MethodResults, verb: str, records: list[tuple[float, dict, dict]]
) -> None:
    """Each ``(fraction, record of a, record of b)`` pair was trained on the same labelled images."""
    for fraction, record_a, record_b in records:
        digest_a, digest_b = record_a["subset"]["digest"], record_b["subset"]["digest"]
        if digest_a != digest_b:
            raise EvalError(
                f"mismatched label subsets at fraction {fraction}: {a.path} and {b.path} were {verb} on "
                f"different images (subset digests {digest_a} vs {digest_b}); evaluate both into the same EVAL_DIR"
            )


def _describe(protocol: dict) -> str:
    return f"protocol {protocol['name']} (dataset {protocol['dataset']}, digest {protocol['digest']})"


def _check_recorded_protocol(method: MethodResults) -> None:
    """Every result of ``method`` ran under the protocol its ``protocol.json`` records."""
    if method.protocol is None:
        raise EvalError(
            f"{method.path}: no {PROTOCOL} (evaluated before protocols were recorded); evaluate it again "
            "with --force"
        )
    for record in [*method.finetune.values(), *method.probe.values()]:
        digest = (record.get("protocol") or {}).get("digest")
        if digest != method.protocol["digest"]:
            raise EvalError(
                f"{record['_dir']}: computed under protocol digest {digest}, not the {_describe(method.protocol)} "
                f"of {method.path / PROTOCOL}; evaluate it again with --force"
            )


def _check_same_settings(
    a: MethodResults, b: MethodResults, what: str, settings_a: dict, settings_b: dict
) -> None:
    differ = [key for key in settings_a if settings_a[key] != settings_b.get(key)]
    if differ:
        values = ", ".join(f"{key} {settings_a[key]!r} vs {settings_b.get(key)!r}" for key in differ)
        raise EvalError(f"mismatched settings of {what}: {a.path} and {b.path} differ in {values}")


def check_protocol(methods: list[MethodResults], spec: str | None) -> EvalProtocol:
    """The protocol of (comparable) ``methods``; ``spec`` (``--protocol``), when given, must be it."""
    recorded = methods[0].protocol
    if spec is None:
        return recorded_protocol(recorded)
    protocol = load_protocol(spec)
    given = protocol.resolve(methods[0].source["task"], recorded["dataset"] if protocol.datasets else None)
    if given.digest != recorded["digest"]:
        raise EvalError(
            f"--protocol {spec}: the methods were evaluated under {_describe(recorded)}, this is "
            f"{_describe(given.summary())}"
        )
    return given


def _check_same(a: MethodResults, b: MethodResults, what: str, values_a: list, values_b: list) -> None:
    if values_a != values_b:
        raise EvalError(f"mismatched {what}: {a.path} has {values_a}, {b.path} has {values_b}")


def cka_for(
    method: MethodResults, mode: str, fraction: float, params: CkaParams, force: bool = False
) -> dict:
    """``{"block<i>": {"linear", "rbf_mean", "rbf_std"}}`` between init and fine-tuned test features."""
    out = method.result_dir(mode, fraction)
    path = out / "cka.json"
    before, after = load_npz(method.path / "init_features_test.npz"), load_npz(out / "features_test.npz")
    features = {"init": arrays_digest(before), "finetuned": arrays_digest(after)}
    header = {"format": CKA_FORMAT, "params": asdict(params), "features": features}
    if path.is_file() and not force and (saved := read_json(path)) | header == saved:
        return saved["blocks"]
    log.info("CKA: %s %s fraction %g", method.name, mode, fraction)
    blocks = {}
    for block in sorted(k for k in after if k.startswith("block")):
        x, y = before[block], after[block]
        mean, std = subset_rbf_cka(
            x, y, params.num_subsets, params.subset_size, params.seed, params.sigma, params.relative
        )
        draws, size = subset_plan(len(x), params.num_subsets, params.subset_size)
        blocks[block] = {
            "linear": linear_cka(x, y),
            "rbf_mean": mean,
            "rbf_std": std,
            "rbf_subsets": draws,
            "rbf_subset_size": size,
        }
    write_json(path, header | {"blocks": blocks})
    return blocks


def ks_for(method: MethodResults, mode: str, fraction: float) -> dict:
    """KS between the test probabilities after fine-tuning on ``fraction`` and on all labels."""
    few = load_npz(method.result_dir(mode, fraction) / "predictions.npz")["probs"]
    full = load_npz(method.result_dir(mode, 1.0) / "predictions.npz")["probs"]
    return ks_per_class(few, full, method.source["task"], tuple(method.source["class_names"]))


def needs_init_features(methods: list[MethodResults]) -> list[Path]:
    return [
        m.path
        for m in methods
        if any(k[0] == "full" for k in m.finetune) and not (m.path / "init_features_test.npz").is_file()
    ]


def summarise(methods: list[MethodResults], params: CkaParams, force: bool = False) -> dict:
    """CKA for every full fine-tuning result, KS for every fraction < 1 that has a 100% counterpart."""
    missing = needs_init_features(methods)
    if missing:
        raise EvalError(f"{missing[0]}: init_features_test.npz is missing (written by launch/finetune.py)")
    cka, ks = {}, {}
    for m in methods:
        for mode, fraction in sorted(m.finetune):
            if mode == "full":
                cka[(m.name, fraction)] = cka_for(m, mode, fraction, params, force)
            if fraction < 1 and (mode, 1.0) in m.finetune:
                ks[(m.name, mode, fraction)] = ks_for(m, mode, fraction)
    return {"cka": cka, "ks": ks}
