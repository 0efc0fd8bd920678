"""Initial weights: every accepted source resolves and loads; wrong architectures fail with a clear message."""

import pytest
import torch
import torchvision

from ilm_dist.errors import InputError
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.weights import (
    DS_MODEL_STATES,
    assert_unchanged,
    build_classifier,
    fingerprint,
    guess_arch,
    load_state,
    resolve_init,
)


@pytest.fixture(scope="module")
def r18_state():
    torch.manual_seed(0)
    return {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}


@pytest.fixture
def run_dir(tmp_path, r18_state):
    """A fake pretraining run: config.yaml, backbone.pt and a DeepSpeed checkpoint at step 3."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_3").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {arch: resnet18}\n")
    torch.save(r18_state, run / "backbone.pt")
    module = {f"encoder.backbone.{k}": v.clone() for k, v in r18_state.items()}
    module["encoder.head.weight"] = torch.zeros(4, 512)
    torch.save({"module": module, "ds_version": "x"}, run / "checkpoints" / "step_3" / DS_MODEL_STATES)
    (run / "checkpoints" / "latest").write_text("step_3")
    return run


def test_random():
    init = resolve_init("random")
    assert init.kind == "random" and load_state(init) is None


def test_run_dir_and_backbone_file(run_dir, r18_state):
    for spec in (run_dir, run_dir / "backbone.pt"):
        init = resolve_init(str(spec))
        assert (init.kind, init.path, init.run_config) == (
            "state_dict",
            run_dir / "backbone.pt",
            run_dir / "config.yaml",
        )
    state = load_state(resolve_init(str(run_dir)))
    assert all(torch.equal(state[k], r18_state[k]) for k in r18_state)


def test_deepspeed_checkpoint_sources(run_dir, r18_state):
    ckpt = run_dir / "checkpoints"
    (run_dir / "backbone.pt").unlink()  # a run that never exported
    for spec in (run_dir, ckpt, ckpt / "step_3", ckpt / "step_3" / DS_MODEL_STATES):
        init = resolve_init(str(spec))
        assert (init.kind, init.path, init.run_config) == (
            "deepspeed",
            ckpt / "step_3" / DS_MODEL_STATES,
            run_dir / "config.yaml",
        ), spec
    state = load_state(resolve_init(str(ckpt)))
    assert set(state) == set(r18_state)  # prefix stripped, head dropped


def test_torchvision_file_with_fc_loads_and_gets_a_new_head(tmp_path):
    full = torchvision.models.resnet18().state_dict()
    torch.save(full, tmp_path / "tv.pth")
    init = resolve_init(str(tmp_path / "tv.pth"))
    assert init.run_config is None
    model = build_classifier("resnet18", load_state(init), 3, str(init.path))
    assert model.fc.out_features == 3
    assert torch.equal(model.layer4[1].conv2.weight, full["layer4.1.conv2.weight"])


def test_bad_paths(tmp_path):
    with pytest.raises(EvalError, match="no such file"):
        resolve_init(str(tmp_path / "nope.pt"))
    with pytest.raises(EvalError, match=r"no backbone\.pt"):
        resolve_init(str(tmp_path))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(InputError, match=r"junk\.pt: cannot read"):
        load_state(resolve_init(str(tmp_path / "junk.pt")))


def test_other_architecture_is_named(run_dir):
    state = load_state(resolve_init(str(run_dir)))
    with pytest.raises(
        EvalError, match=r"backbone.pt: weights do not fit resnet34; the file looks like resnet18"
    ):
        build_classifier("resnet34", state, 2, str(run_dir / "backbone.pt"))
    assert guess_arch(torchvision.models.resnet50().state_dict()) == "resnet50"


def test_fingerprint_sees_batchnorm_statistics(r18_state):
    model = build_classifier("resnet18", r18_state, 2, "x")
    before = fingerprint(model)
    model.fc.weight.data += 1  # the head is not part of the backbone
    assert_unchanged(model, before, "head only")
    model.layer2[0].bn1.running_var[0] += 1e-3
    with pytest.raises(RuntimeError, match="frozen backbone changed"):
        assert_unchanged(model, before, "probe")
