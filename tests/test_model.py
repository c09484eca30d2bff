"""VMRNN model: parameter counts, SS2D semantics, rollout and loss, determinism, bad inputs."""

import os

import pytest
import torch
import torch.nn.functional as F

from test_selective_scan import stepwise_scan
from vmrnn.models import (
    PRESETS,
    SS2D,
    ConfigError,
    build_model,
    count_parameters,
    cross_merge,
    cross_scan,
    get_preset,
    official_parameter_count,
    rollout_loss,
)
from vmrnn.models.blocks import VMRNNCell

# Official counts (VMRNN_SPEC.md) and ours: we omit the official tensors that never get gradients
# (VSBs.{i>=1}.linear, and Upsample.patch_embed in VMRNN-D).
COUNTS = {
    "taxibj": (2_579_970, 2_579_970 - 11 * (128 * 256 + 128)),
    "kth": (1_214_721, 1_214_721 - 5 * (128 * 256 + 128)),
    "mmnist": (15_267_201, None),
    "mmnist-openstl": (9_674_113, None),
}


@pytest.mark.parametrize("preset", sorted(COUNTS))
def test_parameter_counts_match_the_official_models(preset):
    official, ours = COUNTS[preset]
    model = build_model(preset)
    assert official_parameter_count(model.config) == official == get_preset(preset).official_params
    if ours is not None:
        assert count_parameters(model) == ours


def test_vmrnn_d_omits_exactly_the_unused_tensors():
    cfg = build_model("mmnist").config
    n_unused_linear = sum(d - 1 for d in cfg.depths_down + cfg.depths_up)
    unused = sum(c * 2 * c + c for c in [128] * 1 + [256] * 5 + [512] * 1 + [256] * 5)  # (levels x depth-1)
    assert n_unused_linear == 12
    patch_embed = 128 * 1 * 2 * 2 + 3 * 128
    assert count_parameters(build_model("mmnist")) == 15_267_201 - unused - patch_embed


def naive_ss2d_core(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D's scan written from the spec with explicit index orders (independent of cross_scan/merge)."""
    b, d, h, w = x.shape
    rows = [(i, j) for i in range(h) for j in range(w)]
    cols = [(i, j) for j in range(w) for i in range(h)]
    orders = [rows, cols, rows[::-1], cols[::-1]]
    A = -torch.exp(m.A_log.double()).reshape(4, d, -1)
    out = torch.zeros(b, d, h, w, dtype=torch.float64)
    for k, order in enumerate(orders):
        seq = torch.stack([x[:, :, i, j] for i, j in order], dim=-1).double()  # (b, d, L)
        proj = torch.einsum("bdl,cd->bcl", seq, m.x_proj[k].double())
        dt_low, Bk, Ck = proj.split([m.rank, m.d_state, m.d_state], dim=1)
        dt = torch.einsum("brl,dr->bdl", dt_low, m.dt_proj[k].double())
        y = stepwise_scan(
            seq, dt, A[k], Bk[:, None], Ck[:, None], m.skip.double().reshape(4, d)[k], m.dt_bias[k].double(), True
        )
        for t, (i, j) in enumerate(order):
            out[:, :, i, j] += y[:, :, t]
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize("h,w", [(4, 4), (3, 5)])
def test_ss2d_scan_matches_the_spec_direction_by_direction(h, w):
    torch.manual_seed(0)
    m = SS2D(8, d_state=4)
    x = torch.randn(2, 16, h, w)
    ours = m.scan(x).double()
    ref = naive_ss2d_core(m, x)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_cross_scan_and_merge_are_adjoint_reorderings():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    xs = cross_scan(x)
    assert xs.shape == (2, 4, 3, 20)
    assert torch.equal(xs[:, 1, :, 1], x[:, :, 1, 0])  # column-major: second token is row 1, col 0
    assert torch.equal(xs[:, 2], xs[:, 0].flip(-1)) and torch.equal(xs[:, 3], xs[:, 1].flip(-1))
    # Merging the scanned copies gives each pixel back four times.
    assert torch.equal(cross_merge(xs, 4, 5), 4 * x.reshape(2, 3, 20))


def test_ssm_init_follows_the_official_ranges():
    torch.manual_seed(0)
    m = SS2D(128)
    assert m.rank == 8 and m.x_proj.shape == (4, 8 + 32, 256) and m.A_log.shape == (1024, 16)
    assert m.x_proj.abs().max() <= 1 / 256**0.5
    assert m.dt_proj.abs().max() <= 8**-0.5
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert torch.allclose(m.A_log[5], torch.log(torch.arange(1, 17.0)))
    assert torch.equal(m.skip, torch.ones(1024))


def test_cell_update_equations():
    torch.manual_seed(0)
    cell = VMRNNCell(16, (4, 4), depth=2, drop_path=0.0, d_state=4).eval()
    x, hx, cx = torch.randn(3, 1, 16, 16).unbind(0)
    h, (h2, c) = cell(x, (hx, cx))
    o = cell.blocks[1](cell.blocks[0](x, hx))
    f = torch.sigmoid(o)
    c_ref = f * (cx + torch.tanh(o))
    assert torch.allclose(c, c_ref) and torch.allclose(h, f * torch.tanh(c_ref)) and h is h2


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_hidden_states_follow_input_dtype(dtype):
    cell = VMRNNCell(16, (4, 4), depth=1, d_state=4).to(dtype)
    h, (h2, c) = cell(torch.randn(2, 16, 16, dtype=dtype))
    assert h.dtype == c.dtype == dtype


@pytest.mark.parametrize("preset", ["taxibj-tiny", "mmnist-tiny", "kth-tiny"])
def test_rollout_uses_ground_truth_then_its_own_outputs(preset):
    torch.manual_seed(0)
    model = build_model(preset, drop_path=0.0).eval()
    c = model.config
    n_in, n_out = 3, 2
    frames = torch.rand(2, n_in + n_out, c.in_chans, c.img_size, c.img_size)
    preds = model(frames, n_in)
    assert preds.shape == (2, n_in + n_out - 1, c.in_chans, c.img_size, c.img_size)
    assert preds.min() >= 0 and preds.max() <= 1  # sigmoid output
    # Future ground truth never leaks into the predictions.
    changed = frames.clone()
    changed[:, n_in:] = torch.rand_like(changed[:, n_in:])
    assert torch.equal(model(changed, n_in), preds)
    # Output i depends on input frame i but not on later ones while teacher-forcing.
    changed = frames.clone()
    changed[:, 1] += 0.5
    p2 = model(changed, n_in)
    assert torch.equal(p2[:, 0], preds[:, 0]) and not torch.equal(p2[:, 1], preds[:, 1])
    # predict() is the rollout's last n_out outputs.
    assert torch.allclose(model.predict(frames[:, :n_in], n_out), preds[:, n_in - 1 :], atol=1e-6)


def test_loss_definitions():
    frames = torch.rand(2, 6, 1, 8, 8)
    preds = torch.rand(2, 5, 1, 8, 8)
    assert torch.allclose(rollout_loss(preds, frames, 3), ((preds - frames[:, 1:]) ** 2).mean())
    fut = rollout_loss(preds, frames, 3, target="future")
    assert torch.allclose(fut, ((preds[:, 2:] - frames[:, 3:]) ** 2).mean())
    both = rollout_loss(preds, frames, 3, kind="mse+l1")
    assert torch.allclose(both, ((preds - frames[:, 1:]) ** 2).mean() + (preds - frames[:, 1:]).abs().mean())
    with pytest.raises(ValueError, match="loss target"):
        rollout_loss(preds, frames, 3, target="past")


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    for preset in ("taxibj-tiny", "mmnist-tiny"):
        model = build_model(preset)
        c = model.config
        frames = torch.rand(2, 4, c.in_chans, c.img_size, c.img_size)
        rollout_loss(model(frames, 2), frames, 2).backward()
        unused = [n for n, p in model.named_parameters() if p.grad is None]
        assert not unused, unused


def test_ddp_needs_no_find_unused_parameters(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DDP(build_model("mmnist-tiny"), find_unused_parameters=False)
        frames = torch.rand(2, 4, 1, 64, 64)
        for _ in range(2):  # DDP raises on the second step if a parameter got no gradient
            rollout_loss(model(frames, 2), frames, 2).backward()
    finally:
        dist.destroy_process_group()


def test_same_seed_same_model_and_output():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model("taxibj-tiny")
        frames = torch.rand(1, 4, 2, 32, 32)
        outs.append(model(frames, 2))  # training mode: drop-path draws from the seeded RNG too
    assert torch.equal(outs[0], outs[1])


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_model("taxibj-tiny", drop_path=0.0)
    frames = torch.rand(2, 5, 2, 32, 32)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.checkpoint_steps = ckpt
        rollout_loss(model(frames, 3), frames, 3).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(img_size=30), "divisible"),
        (dict(patch_size=3), "patch_size"),
        (dict(arch="x"), "arch"),
        (dict(embed_dim=24), "multiple of 16"),
        (dict(depths_down=(1,) * 5, depths_up=(1,) * 5), "halved"),
        (dict(depths_down=(1,), depths_up=(1, 1)), "same length"),
        (dict(drop_path=1.5), "drop_path"),
        (dict(window_size=4), "unknown model option"),
    ],
)
def test_bad_configs_are_named(kwargs, match):
    base = "mmnist-tiny"
    with pytest.raises(ConfigError, match=match):
        build_model(base, **kwargs)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'vmrnn-xl'"):
        build_model("vmrnn-xl")


@pytest.mark.parametrize(
    "shape,match",
    [
        ((2, 4, 32, 32), "batch, time, channels"),  # wrong rank
        ((2, 4, 2, 32, 16), "2x32x16"),  # H != W
        ((2, 4, 1, 32, 32), "1x32x32"),  # wrong channels
        ((2, 4, 2, 64, 64), "expects 2x32x32"),  # wrong size
    ],
)
def test_bad_inputs_are_named(shape, match):
    model = build_model("taxibj-tiny")
    with pytest.raises(ValueError, match=match):
        model(torch.rand(*shape), 2)


def test_bad_n_input():
    model = build_model("taxibj-tiny")
    with pytest.raises(ValueError, match="n_input"):
        model(torch.rand(1, 4, 2, 32, 32), 4)


def test_presets_all_build():
    for name in PRESETS:
        assert count_parameters(build_model(name)) > 0
