"""The flat-buffer gradient all-reduce gives DDP's numbers (2 gloo processes on CPU)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vmrnn.models import build_model, rollout_loss
from vmrnn.train.data_parallel import GradientAllReduce, broadcast_parameters

STEPS = 3


def _frames(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.rand(2, 6, 2, 32, 32, generator=g)


def _train(model, opt, rank, sync):
    for i in range(STEPS):
        opt.zero_grad(set_to_none=sync is None)
        frames = _frames(i, rank)
        loss = rollout_loss(model(frames, 3), frames, 3)
        loss.backward()
        if sync is not None:
            sync()
        opt.step()


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights per rank: the broadcast must align them
        ours = build_model("taxibj-tiny", drop_path=0.0)
        broadcast_parameters(ours)
        ref = build_model("taxibj-tiny", drop_path=0.0)
        ref.load_state_dict(ours.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(ref)
        sync = GradientAllReduce(ours.parameters(), world)
        _train(ours, torch.optim.Adam(ours.parameters(), lr=1e-3), rank, sync)
        _train(ddp, torch.optim.Adam(ddp.parameters(), lr=1e-3), rank, None)
        if rank == 0:
            torch.save({"ours": ours.state_dict(), "ddp": ref.state_dict()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_flat_gradient_all_reduce_matches_ddp(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "weights.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    assert got["ours"].keys() == got["ddp"].keys()
    moved = 0
    for name, ref in got["ddp"].items():
        torch.testing.assert_close(got["ours"][name], ref, rtol=1e-5, atol=1e-6, msg=name)
        moved += 1
    assert moved > 10


def test_gradients_are_views_of_one_buffer():
    model = build_model("taxibj-tiny")
    sync = GradientAllReduce(model.parameters(), world_size=1)
    params = [p for p in model.parameters() if p.requires_grad]
    assert sync.numel == sum(p.numel() for p in params)
    frames = torch.rand(1, 4, 2, 32, 32)
    rollout_loss(model(frames, 2), frames, 2).backward()
    flat = sync.buffers[0]
    assert all(p.grad.data_ptr() >= flat.data_ptr() for p in params)  # accumulated in place, not replaced
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in params]), flat)
    sync()  # one process, no group: a no-op
    assert flat.abs().sum() > 0
