"""Execution modes of the training step against the reference: same weights, same inputs.

CPU: the fused SS2D layout (torch scan backend), activation checkpointing, torch.compile of the fused
SS2D (fullgraph: no graph break) and the mode plumbing. GPU (marked gpu): CUDA-graph capture of the whole
step and of the rollout, the Triton scan inside the model, bf16, and compile with the Triton custom op.
"""

from __future__ import annotations

import pytest
import torch

from vmrnn.models import SS2D, build_model
from vmrnn.ops import ss2d_scan as fs
from vmrnn.train.execution import MODES, ExecutionConfig
from vmrnn.train.step import configure_model, make_forecast, make_train_step

CUDA = torch.cuda.is_available()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def step_loss_and_grads(preset, execution, device="cpu", seed=0, n_input=2, frames_t=4, batch=2):
    torch.manual_seed(seed)
    model = build_model(preset, drop_path=0.0).to(device)
    c = model.config
    g = torch.Generator().manual_seed(seed + 1)
    frames = torch.rand(batch, frames_t, c.in_chans, c.img_size, c.img_size, generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = make_train_step(model, opt, n_input=n_input, execution=execution, device=device)
    loss = float(step(frames))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss, grads, model, frames


def assert_close(ref, got, tol):
    """Loss and all gradients (as one vector) within tol; each tensor within 10 tol of its own norm,
    floored at 1e-2 of the whole gradient's (some gradients are zero in exact arithmetic, e.g. a conv
    bias right before a GroupNorm of one channel per group, and only rounding noise is left)."""
    (l0, g0), (l1, g1) = ref[:2], got[:2]
    assert abs(l1 - l0) / abs(l0) < tol
    assert g0.keys() == g1.keys()
    total = sum(g.double().norm() ** 2 for g in g0.values()) ** 0.5
    diff = sum((g1[n].double() - g0[n].double()).norm() ** 2 for n in g0) ** 0.5
    assert diff / total < tol
    for name in g0:
        err = (g1[name].double() - g0[name].double()).norm() / max(g0[name].double().norm(), 1e-2 * total)
        assert err < 10 * tol, name


def test_execution_config_modes():
    ref = ExecutionConfig.reference()
    assert ref == ExecutionConfig() == MODES["reference"] and not (ref.fused or ref.compile or ref.cuda_graphs)
    fast = MODES["fast"]
    assert fast.precision == "bf16" and fast.fused and fast.cuda_graphs and not fast.compile
    assert MODES["fast-compile"] == fast.replace(compile=True)
    assert MODES["fast-ckpt"] == fast.replace(checkpoint_steps=True)
    assert fast == MODES["bf16-fused-graphs"].replace(fused_norm=True) and fast.fused_norm
    assert fast.describe() == "bf16+fused+norm+graphs"
    assert MODES["bf16-fused-graphs"].describe() == "bf16+fused+graphs"
    with pytest.raises(ValueError, match="fused_norm needs the fused SS2D layout"):
        ExecutionConfig(fused_norm=True)
    with pytest.raises(ValueError, match="scan_backend"):
        ExecutionConfig(scan_backend="triton")  # the Triton scan exists only in the fused layout
    with pytest.raises(ValueError, match="scan_backend"):
        ExecutionConfig(fused=True, scan_backend="cuda")
    with pytest.raises(ValueError, match="precision"):
        ExecutionConfig(precision="fp16")


def test_configure_model_sets_and_resets_the_modules():
    model = build_model("taxibj-tiny")
    configure_model(model, ExecutionConfig(fused=True, scan_backend="torch", checkpoint_steps=True))
    ss = [m for m in model.modules() if isinstance(m, SS2D)]
    assert ss and all(m.impl == "fused" and m.fused_backend == "torch" and not m.fused_norm for m in ss)
    assert model.checkpoint_steps
    configure_model(model, ExecutionConfig(fused=True, fused_norm=True))
    assert all(m.fused_norm for m in ss)
    configure_model(model, ExecutionConfig.reference())
    assert all(m.impl == "reference" and m.scan_backend == "auto" and m.scan_fp32_inputs for m in ss)
    assert not any(m.fused_norm for m in ss)
    assert not model.checkpoint_steps
    # the state_dict does not change with the mode
    keys = list(build_model("taxibj-tiny").state_dict())
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("preset", ["taxibj-tiny", "mmnist-tiny"])
@pytest.mark.parametrize(
    "mode",
    [
        dict(fused=True, scan_backend="torch"),
        dict(checkpoint_steps=True),
        dict(fused=True, scan_backend="torch", checkpoint_steps=True),
        dict(fused=True, fused_norm=True, scan_backend="torch"),
    ],
)
def test_cpu_modes_match_reference_fp32(preset, mode):
    ref = step_loss_and_grads(preset, ExecutionConfig.reference())
    got = step_loss_and_grads(preset, ExecutionConfig(**mode))
    assert_close(ref, got, 1e-5)


def test_fused_forecast_matches_reference():
    torch.manual_seed(0)
    model = build_model("mmnist-tiny").eval()
    frames = torch.rand(2, 5, 1, 64, 64)
    ref = make_forecast(model, n_input=3)(frames)
    got = make_forecast(model, n_input=3, execution=ExecutionConfig(fused=True, scan_backend="torch"))(frames)
    assert rel(got, ref) < 1e-5


def test_compiled_fused_ss2d_has_no_graph_break():
    """fullgraph=True raises on any graph break; the compiled module must equal the eager one."""
    import torch._dynamo  # noqa: PLC0415

    torch.manual_seed(0)
    m = SS2D(16, d_state=4)
    m.impl, m.fused_backend = "fused", "torch"
    x = torch.randn(2, 4, 4, 16)
    m(x)
    explanation = torch._dynamo.explain(m.forward_fused)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


# --- GPU ---------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "mode",
    [
        dict(fused=True),
        dict(cuda_graphs=True),
        dict(fused=True, cuda_graphs=True),
        dict(fused=True, cuda_graphs=True, checkpoint_steps=True),
        dict(fused=True, compile=True),
        dict(fused=True, fused_norm=True, cuda_graphs=True),
        dict(fused=True, fused_norm=True, compile=True),
    ],
)
def test_gpu_modes_match_reference_fp32(mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = step_loss_and_grads("taxibj-tiny", ExecutionConfig.reference(), "cuda", batch=4)
    got = step_loss_and_grads("taxibj-tiny", ExecutionConfig(**mode), "cuda", batch=4)
    assert_close(ref, got, 1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_bf16_fast_mode_close_to_reference():
    ref = step_loss_and_grads("taxibj-tiny", ExecutionConfig.reference(), "cuda", batch=4)
    got = step_loss_and_grads("taxibj-tiny", MODES["fast"], "cuda", batch=4)
    l0, l1 = ref[0], got[0]
    assert abs(l1 - l0) / l0 < 2e-2
    num = sum((got[1][n].float() - ref[1][n]).norm() ** 2 for n in ref[1]) ** 0.5
    den = sum(ref[1][n].norm() ** 2 for n in ref[1]) ** 0.5
    assert num / den < 5e-2


@pytest.mark.gpu
@gpu
def test_graphed_step_trains_like_eager_and_follows_lr_changes():
    """Several real Adam steps: graph replays give the eager losses; a new float lr is picked up."""
    losses = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        model = build_model("taxibj-tiny", drop_path=0.0).cuda()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        step = make_train_step(
            model, opt, n_input=2, device="cuda", execution=ExecutionConfig(fused=True, cuda_graphs=graphs)
        )
        g = torch.Generator().manual_seed(5)
        out = []
        for i in range(6):
            if i == 3:
                for group in opt.param_groups:
                    group["lr"] = 3e-3  # as a scheduler that writes floats would
            out.append(float(step(torch.rand(4, 4, 2, 32, 32, generator=g).cuda())))
        losses[graphs] = out
    for a, b in zip(losses[False], losses[True]):
        assert abs(a - b) / a < 1e-4


@pytest.mark.gpu
@gpu
def test_graphed_forecast_matches_eager():
    torch.manual_seed(0)
    model = build_model("mmnist-tiny").cuda().eval()
    frames = torch.rand(2, 5, 1, 64, 64, device="cuda")
    ref = make_forecast(model, n_input=3)(frames)
    fc = make_forecast(model, n_input=3, execution=ExecutionConfig(fused=True, cuda_graphs=True), device="cuda")
    for _ in range(2):
        assert rel(fc(frames), ref) < 1e-4
    frames2 = torch.rand(2, 5, 1, 64, 64, device="cuda")
    assert rel(fc(frames2), make_forecast(model, n_input=3)(frames2)) < 1e-4


@pytest.mark.gpu
@gpu
@pytest.mark.skipif(not fs.HAS_TRITON, reason="needs triton")
def test_compiled_fused_ss2d_with_triton_op_has_no_graph_break():
    import torch._dynamo  # noqa: PLC0415

    torch.manual_seed(0)
    m = SS2D(32, d_state=16).cuda()
    m.impl, m.fused_backend = "fused", "triton"
    x = torch.randn(2, 8, 8, 32, device="cuda", requires_grad=True)
    explanation = torch._dynamo.explain(m.forward_fused)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(m.forward_fused, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    assert rel(y, m.forward_fused(x)) < 1e-5


def test_graph_safe_checkpointing_gives_the_eager_gradients_with_drop_path():
    """Masks drawn ahead of the checkpointed step: same masks and gradients as the eager step."""
    from vmrnn.train.step import _graph_safe_checkpointing  # noqa: PLC0415

    out = []
    for safe in (False, True):
        torch.manual_seed(0)
        model = build_model("mmnist-tiny", drop_path=0.5).train()
        _graph_safe_checkpointing(model, safe)
        frames = torch.rand(3, 4, 1, 64, 64, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(7)
        from vmrnn.models import rollout_loss  # noqa: PLC0415

        loss = rollout_loss(model(frames, 2), frames, 2)
        loss.backward()
        out.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert_close(out[0], out[1], 1e-5)
