"""ilm_dist.losses.intermediate: the registry (register, a name taken twice or ``none`` refused, the config
section a registered loss gets, building the selected loss), the base class's contract, and
``import_loss_modules``'s errors naming the key."""

import sys
from dataclasses import dataclass

import pytest
import torch

from ilm_dist.config import ConfigError, LossConfig, load_config
from ilm_dist.losses.intermediate import (
    INTERMEDIATE_LOSSES,
    NO_LOSS,
    IntermediateLoss,
    build_intermediate_loss,
    import_loss_modules,
    loss_types,
    register_intermediate_loss,
)
from ilm_dist.losses.mse import MseIntermediateLoss
from tests.launcher import REPO

DEMO = REPO / "configs" / "demo.yaml"


@dataclass
class ScaleConfig:
    scale: float = 2.0


class ScaleLoss(IntermediateLoss):
    """``scale`` x weight x mean of q - k per block (enough to check the wiring)."""

    name = "scale_test"
    Config = ScaleConfig

    def reduce(self, blocks):
        return [blocks[b - 1].mean(dim=(2, 3)) for b in self.blocks]

    def forward(self, q_reduced, k_reduced):
        diffs = torch.stack([(q - k).mean() for q, k in zip(q_reduced, k_reduced, strict=True)])
        return self.options.scale * self.weights * diffs


@pytest.fixture
def registered():
    """ScaleLoss registered for one test, then forgotten (other tests see the built-in types)."""
    register_intermediate_loss(ScaleLoss)
    yield ScaleLoss
    INTERMEDIATE_LOSSES.pop(ScaleLoss.name, None)


def test_built_in_types_in_registration_order():
    assert loss_types()[:3] == [NO_LOSS, "mse", "bt"]
    assert INTERMEDIATE_LOSSES["mse"] is MseIntermediateLoss


def test_a_registered_loss_is_a_type_with_its_own_config_section(registered):
    assert loss_types()[-1] == "scale_test" and INTERMEDIATE_LOSSES["scale_test"] is registered
    assert isinstance(LossConfig().options["scale_test"], ScaleConfig)
    cfg = load_config(
        DEMO,
        ["loss.type=scale_test", "loss.blocks=[2, 4]", "loss.weights=[0.5, 1.0]", "loss.scale_test.scale=3"],
    )
    assert cfg.loss.options["scale_test"] == ScaleConfig(3.0)


@pytest.mark.parametrize("name", ["mse", NO_LOSS])
def test_a_taken_name_is_refused(name):
    clash = type("Clash", (IntermediateLoss,), {"name": name, "Config": ScaleConfig})
    before = dict(INTERMEDIATE_LOSSES)
    with pytest.raises(ValueError, match=f"intermediate loss '{name}' is already registered"):
        register_intermediate_loss(clash)
    assert before == INTERMEDIATE_LOSSES


def test_build_gives_the_selected_loss_with_blocks_weights_and_options(registered):
    cfg = LossConfig(type="scale_test", blocks=[2, 4], weights=[0.5, 1.0])
    cfg.options["scale_test"] = ScaleConfig(3.0)
    loss = build_intermediate_loss(cfg, channels=[4, 8, 16, 32])
    assert isinstance(loss, ScaleLoss) and loss.blocks == [2, 4] and loss.options.scale == 3.0
    assert loss.weights.dtype == torch.float32 and loss.weights.tolist() == [0.5, 1.0]
    assert "weights" not in loss.state_dict()  # from the config, not the checkpoint
    assert loss.term_names() == ["scale_test_block2", "scale_test_block4"]
    assert loss.comm_bytes(batch=8, world=2, itemsize=2) == 0.0
    blocks = [torch.full((2, c, 3, 3), float(i)) for i, c in enumerate([4, 8, 16, 32], start=1)]
    q = loss.reduce(blocks)
    assert [t.shape for t in q] == [(2, 8), (2, 32)] and q[1][0, 0] == 4.0
    k = [t - 1 for t in q]
    assert loss(q, k).tolist() == [3.0 * 0.5, 3.0 * 1.0]
    assert build_intermediate_loss(LossConfig(type=NO_LOSS), [4, 8, 16, 32]) is None


def test_the_base_class_leaves_reduce_and_forward_to_the_loss():
    bare = type("Bare", (IntermediateLoss,), {"name": "mse"})(LossConfig(), [4, 8, 16, 32])
    with pytest.raises(NotImplementedError):
        bare.reduce([])
    with pytest.raises(NotImplementedError):
        bare([], [])


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def write(name: str, text: str) -> str:
        (tmp_path / f"{name}.py").write_text(text)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)
    INTERMEDIATE_LOSSES.pop("plugged_test", None)


def test_import_registers_the_module_s_loss(plugin_dir):
    name = plugin_dir(
        "plugged_test_losses",
        "from tests.losses.test_intermediate import ScaleLoss\n"
        "from ilm_dist.losses import register_intermediate_loss\n"
        "@register_intermediate_loss\n"
        "class Plugged(ScaleLoss):\n    name = 'plugged_test'\n",
    )
    import_loss_modules([name], "loss.plugins")
    assert "plugged_test" in loss_types()


@pytest.mark.parametrize(
    ("module", "text", "message"),
    [
        ("a-b", None, "loss.plugins: 'a-b' is not a module name (dotted, e.g. my_losses or my_pkg.losses)"),
        ("no_such_test_module", None, "loss.plugins: no module 'no_such_test_module' on the Python path"),
        (
            "unregistered_test_losses",
            "from ilm_dist.losses import IntermediateLoss\nclass Forgot(IntermediateLoss):\n    name = 'forgot'\n",
            "loss.plugins: module 'unregistered_test_losses' registers no intermediate loss",
        ),
        (
            "reexporting_test_losses",  # a registered loss imported from elsewhere is not this module's
            "from ilm_dist.losses.mse import MseIntermediateLoss\n",
            "loss.plugins: module 'reexporting_test_losses' registers no intermediate loss",
        ),
    ],
)
def test_import_errors_name_the_key_and_the_module(plugin_dir, module, text, message):
    if text is not None:
        plugin_dir(module, text)
    with pytest.raises(ConfigError) as err:
        import_loss_modules([module], "loss.plugins")
    assert str(err.value).startswith(message)


def test_a_plugin_whose_own_import_fails_shows_that_failure(plugin_dir):
    name = plugin_dir("broken_test_losses", "import no_such_dependency_xyz\n")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        import_loss_modules([name], "loss.plugins")
