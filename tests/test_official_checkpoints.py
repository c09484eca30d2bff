"""Official checkpoints: the official key names and shapes (tests/fixtures/official_keys.json) load into our
model, round-trip, and every mismatch is named."""

import json
import math
from functools import cache
from pathlib import Path

import pytest
import torch

from vmrnn.models import (
    CheckpointMismatch,
    build_model,
    convert_official_state_dict,
    load_official_state_dict,
    official_key_map,
    to_official_state_dict,
)

KEYS_FILE = Path(__file__).parent / "fixtures" / "official_keys.json"


@cache
def official_keys(layout: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor of an official checkpoint layout, in the checkpoint's order."""
    return [(k, tuple(shape)) for k, shape in json.loads(KEYS_FILE.read_text())["layouts"][layout]["keys"]]


LAYOUTS = {
    # name: (our preset, official layout in KEYS_FILE, key prefix)
    "openstl-taxibj": ("taxibj", "vmrnn-b-taxibj", ""),
    "openstl-kth": ("kth", "vmrnn-b-kth", ""),
    "openstl-kth-ddp": ("kth", "vmrnn-b-kth", "module."),
    "openstl-mmnist-d": ("mmnist-openstl", "vmrnn-d-mmnist-openstl", ""),
    "openstl-mmnist-d-ddp": ("mmnist-openstl", "vmrnn-d-mmnist-openstl", "module."),
    "standalone-mmnist-d": ("mmnist", "vmrnn-d-mmnist-standalone", ""),
    "standalone-b": ("mmnist-b", "vmrnn-b-mmnist-standalone", ""),
}


def test_fixture_counts_match_its_keys():
    """The fixture's stated tensor and parameter counts agree with its key list (a damaged file fails here)."""
    for name, layout in json.loads(KEYS_FILE.read_text())["layouts"].items():
        shapes = [shape for _, shape in official_keys(name)]
        assert len(shapes) == layout["tensors"], name
        assert sum(math.prod(s) for s in shapes) == layout["parameters"], name


def random_official_state(keys, prefix=""):
    g = torch.Generator().manual_seed(0)
    return {prefix + k: torch.randn(*shape, generator=g) for k, shape in keys}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_official_layout_loads_and_round_trips(layout):
    preset, official, prefix = LAYOUTS[layout]
    keys = official_keys(official)
    state = random_official_state(keys, prefix)
    model = load_official_state_dict(build_model(preset), state)
    ours = model.state_dict()
    # Every tensor our model keeps arrives under its mapped name, bit for bit.
    kmap = official_key_map(model.config)
    plain = {k[len(prefix) :].replace("ST.layers.0.", "ST.layer."): v for k, v in state.items()}
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


def test_key_map_covers_every_official_key_once():
    for preset, official, _ in LAYOUTS.values():
        keys = [k.replace("ST.layers.0.", "ST.layer.") for k, _ in official_keys(official)]
        kmap = official_key_map(build_model(preset).config)
        assert sorted(kmap) == sorted(keys)
        targets = [t for t in kmap.values() if t is not None]
        assert len(targets) == len(set(targets)) == len(build_model(preset).state_dict())


def test_latest_pth_wrapper_is_unwrapped():
    state = {"epoch": 3, "state_dict": random_official_state(official_keys("vmrnn-b-taxibj"))}
    assert len(convert_official_state_dict(state, build_model("taxibj").config)) == len(
        build_model("taxibj").state_dict()
    )


def test_loaded_weights_drive_the_forward():
    """Loading changes the output, and two loads of the same weights give identical outputs."""
    state = random_official_state(official_keys("vmrnn-b-taxibj"))
    state = {k: v * 0.05 for k, v in state.items()}
    frames = torch.rand(1, 3, 2, 32, 32)
    m1 = load_official_state_dict(build_model("taxibj"), state).eval()
    m2 = load_official_state_dict(build_model("taxibj"), state).eval()
    with torch.no_grad():
        assert torch.equal(m1(frames, 2), m2(frames, 2))
        assert not torch.equal(m1(frames, 2), build_model("taxibj").eval()(frames, 2))


def test_missing_key_is_named():
    state = random_official_state(official_keys("vmrnn-b-taxibj"))
    del state["ST.layer.VSBs.3.self_attention.A_logs"]
    with pytest.raises(CheckpointMismatch, match=r"missing: ST\.layer\.VSBs\.3\.self_attention\.A_logs"):
        load_official_state_dict(build_model("taxibj"), state)


def test_wrong_shape_is_named():
    state = random_official_state(official_keys("vmrnn-b-taxibj"))
    state["ST.patch_embed.proj.weight"] = torch.zeros(128, 2, 2, 2)
    with pytest.raises(
        CheckpointMismatch,
        match=r"ST\.patch_embed\.proj\.weight: checkpoint \(128, 2, 2, 2\) vs expected \(128, 2, 4, 4\)",
    ):
        load_official_state_dict(build_model("taxibj"), state)


def test_checkpoint_of_another_architecture_is_refused():
    state = random_official_state(official_keys("vmrnn-d-mmnist-openstl"))
    with pytest.raises(CheckpointMismatch, match=r"does not fit VMRNN-B.*missing: .*unexpected: Downsample"):
        load_official_state_dict(build_model("kth"), state)


def test_depth_mismatch_is_refused():
    state = random_official_state(official_keys("vmrnn-d-mmnist-standalone"))
    with pytest.raises(CheckpointMismatch, match="unexpected: Downsample.layers.1.VSBs.2"):
        load_official_state_dict(build_model("mmnist-openstl"), state)


def test_multi_cell_standalone_b_is_refused():
    state = random_official_state(official_keys("vmrnn-b-mmnist-standalone"))
    state["ST.layers.1.VSBs.0.ln_1.weight"] = torch.zeros(128)
    with pytest.raises(CheckpointMismatch, match="several cells"):
        load_official_state_dict(build_model("mmnist-b"), state)
