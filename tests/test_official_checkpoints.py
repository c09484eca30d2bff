"""Official checkpoints: keys and shapes from ../shared/reference/official_keys.py load into our model."""

import importlib.util

import pytest
import torch

from conftest import SHARED_REFERENCE
from vmrnn.models import (
    CheckpointMismatch, build_model, convert_official_state_dict, load_official_state_dict, official_key_map,
    to_official_state_dict,
)

KEYS_FILE = SHARED_REFERENCE / "official_keys.py"
pytestmark = pytest.mark.skipif(not KEYS_FILE.exists(), reason=f"{KEYS_FILE} not found (shared/ beside the repo)")


@pytest.fixture(scope="module")
def official_keys():
    spec = importlib.util.spec_from_file_location("official_keys", KEYS_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LAYOUTS = {
    # name: (our preset, function building the official key list, prefix, standalone-B?)
    "openstl-taxibj": ("taxibj", lambda k: k.vmrnn_b(2, 128, 4, 12), ""),
    "openstl-kth": ("kth", lambda k: k.vmrnn_b(1, 128, 2, 6), ""),
    "openstl-kth-ddp": ("kth", lambda k: k.vmrnn_b(1, 128, 2, 6), "module."),
    "openstl-mmnist-d": ("mmnist-openstl", lambda k: k.vmrnn_d(1, 128, 2, [2, 2], [2, 2]), ""),
    "openstl-mmnist-d-ddp": ("mmnist-openstl", lambda k: k.vmrnn_d(1, 128, 2, [2, 2], [2, 2]), "module."),
    "standalone-mmnist-d": ("mmnist", lambda k: k.vmrnn_d(1, 128, 2, [2, 6], [6, 2]), ""),
    "standalone-b": ("mmnist-b", lambda k: k.vmrnn_b(1, 128, 2, 6, standalone=True), ""),
}


def random_official_state(keys, prefix=""):
    g = torch.Generator().manual_seed(0)
    return {prefix + k: torch.randn(*shape, generator=g) for k, shape in keys}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_official_layout_loads_and_round_trips(official_keys, layout):
    preset, make_keys, prefix = LAYOUTS[layout]
    keys = make_keys(official_keys)
    state = random_official_state(keys, prefix)
    model = load_official_state_dict(build_model(preset), state)
    ours = model.state_dict()
    # Every tensor our model keeps arrives under its mapped name, bit for bit.
    kmap = official_key_map(model.config)
    plain = {k[len(prefix):].replace("ST.layers.0.", "ST.layer."): v for k, v in state.items()}
    for official_key, tensor in plain.items():
        target = kmap[official_key]
        if target is not None:
            assert torch.equal(ours[target], tensor), official_key
    # And back: our export names and shapes the official keys exactly.
    back = to_official_state_dict(model)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in plain.items()}
    for k, target in kmap.items():
        if target is not None:
            assert torch.equal(back[k], plain[k])


def test_key_map_covers_every_official_key_once(official_keys):
    for preset, make_keys, _ in LAYOUTS.values():
        keys = [k.replace("ST.layers.0.", "ST.layer.") for k, _ in make_keys(official_keys)]
        kmap = official_key_map(build_model(preset).config)
        assert sorted(kmap) == sorted(keys)
        targets = [t for t in kmap.values() if t is not None]
        assert len(targets) == len(set(targets)) == len(build_model(preset).state_dict())


def test_latest_pth_wrapper_is_unwrapped(official_keys):
    state = {"epoch": 3, "state_dict": random_official_state(official_keys.vmrnn_b(2, 128, 4, 12))}
    assert len(convert_official_state_dict(state, build_model("taxibj").config)) == len(build_model("taxibj").state_dict())


def test_loaded_weights_drive_the_forward(official_keys):
    """Loading changes the output, and two loads of the same weights give identical outputs."""
    state = random_official_state(official_keys.vmrnn_b(2, 128, 4, 12))
    state = {k: v * 0.05 for k, v in state.items()}
    frames = torch.rand(1, 3, 2, 32, 32)
    m1 = load_official_state_dict(build_model("taxibj"), state).eval()
    m2 = load_official_state_dict(build_model("taxibj"), state).eval()
    with torch.no_grad():
        assert torch.equal(m1(frames, 2), m2(frames, 2))
        assert not torch.equal(m1(frames, 2), build_model("taxibj").eval()(frames, 2))


def test_missing_key_is_named(official_keys):
    state = random_official_state(official_keys.vmrnn_b(2, 128, 4, 12))
    del state["ST.layer.VSBs.3.self_attention.A_logs"]
    with pytest.raises(CheckpointMismatch, match=r"missing: ST\.layer\.VSBs\.3\.self_attention\.A_logs"):
        load_official_state_dict(build_model("taxibj"), state)


def test_wrong_shape_is_named(official_keys):
    state = random_official_state(official_keys.vmrnn_b(2, 128, 4, 12))
    state["ST.patch_embed.proj.weight"] = torch.zeros(128, 2, 2, 2)
    with pytest.raises(CheckpointMismatch, match=r"ST\.patch_embed\.proj\.weight: checkpoint \(128, 2, 2, 2\) vs expected \(128, 2, 4, 4\)"):
        load_official_state_dict(build_model("taxibj"), state)


def test_checkpoint_of_another_architecture_is_refused(official_keys):
    state = random_official_state(official_keys.vmrnn_d(1, 128, 2, [2, 2], [2, 2]))
    with pytest.raises(CheckpointMismatch, match=r"does not fit VMRNN-B.*missing: .*unexpected: Downsample"):
        load_official_state_dict(build_model("kth"), state)


def test_depth_mismatch_is_refused(official_keys):
    state = random_official_state(official_keys.vmrnn_d(1, 128, 2, [2, 6], [6, 2]))
    with pytest.raises(CheckpointMismatch, match="unexpected: Downsample.layers.1.VSBs.2"):
        load_official_state_dict(build_model("mmnist-openstl"), state)


def test_multi_cell_standalone_b_is_refused(official_keys):
    state = random_official_state(official_keys.vmrnn_b(1, 128, 2, 6, standalone=True))
    state["ST.layers.1.VSBs.0.ln_1.weight"] = torch.zeros(128)
    with pytest.raises(CheckpointMismatch, match="several cells"):
        load_official_state_dict(build_model("mmnist-b"), state)
