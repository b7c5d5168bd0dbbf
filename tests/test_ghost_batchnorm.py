"""Ghost BatchNorm (model.bn_batch): BatchNorm group by group, forward and backward; its running
statistics; and one process with micro batch 8 and bn_batch 4 against two gloo processes with
micro batch 4 and plain BatchNorm (DDP), the layout it stands in for."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from resnet_lamb.ghost_batchnorm import GhostBatchNorm2d
from resnet_lamb.networks import build_resnet
from test_data_dist import free_port


def _pair(channels=3, k=4, momentum=0.1):
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(channels, momentum=momentum, ghost_batch=k).double()
    with torch.no_grad():
        ghost.weight.copy_(torch.rand(channels) + 0.5)
        ghost.bias.copy_(torch.randn(channels))
        ghost.running_mean.copy_(torch.randn(channels))
        ghost.running_var.copy_(torch.rand(channels) + 0.5)
    plain = nn.BatchNorm2d(channels, momentum=momentum).double()
    plain.load_state_dict(ghost.state_dict())
    return ghost, plain


@pytest.mark.parametrize("momentum", [0.1, None])
def test_forward_and_backward_equal_batchnorm_group_by_group(momentum):
    ghost, plain = _pair(momentum=momentum)
    x = (torch.randn(12, 3, 5, 5, dtype=torch.float64) * 3 + 1).requires_grad_()
    w = torch.randn(12, 3, 5, 5, dtype=torch.float64)
    y = ghost(x)
    (y * w).sum().backward()
    # the reference: a fresh BatchNorm per group of 4, same parameters and starting statistics
    groups = [copy.deepcopy(plain) for _ in range(3)]
    xr = x.detach().clone().requires_grad_()
    yr = torch.cat([bn(part) for bn, part in zip(groups, xr.split(4))])
    (yr * w).sum().backward()
    assert torch.equal(y, yr)
    assert torch.equal(x.grad, xr.grad)
    assert torch.allclose(ghost.weight.grad, sum(bn.weight.grad for bn in groups), rtol=1e-13, atol=0)
    assert torch.allclose(ghost.bias.grad, sum(bn.bias.grad for bn in groups), rtol=1e-13, atol=0)
    # and the formula: each group normalised by its own mean and biased variance
    xg = x.detach().view(3, 4, 3, 5, 5)
    mean = xg.mean(dim=(1, 3, 4), keepdim=True)
    var = xg.var(dim=(1, 3, 4), keepdim=True, unbiased=False)
    want = (xg - mean) / torch.sqrt(var + ghost.eps) * ghost.weight.view(1, 1, 3, 1, 1) + ghost.bias.view(1, 1, 3, 1, 1)
    assert torch.allclose(y, want.view(12, 3, 5, 5), rtol=1e-12, atol=1e-12)
    # running statistics: one update per forward, the mean of the groups' BatchNorm updates
    assert torch.allclose(ghost.running_mean, sum(bn.running_mean for bn in groups) / 3, rtol=1e-14, atol=1e-15)
    assert torch.allclose(ghost.running_var, sum(bn.running_var for bn in groups) / 3, rtol=1e-14, atol=1e-15)
    assert int(ghost.num_batches_tracked) == 1
    m = 0.1 if momentum is not None else 1.0
    unbiased = xg.var(dim=(1, 3, 4), unbiased=True).mean(0)
    assert torch.allclose(ghost.running_var, (1 - m) * plain.running_var + m * unbiased, rtol=1e-12)


def test_eval_is_batchnorm_and_a_single_group_is_plain_batchnorm():
    ghost, plain = _pair(k=8)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(ghost(x), plain(x))  # K = micro batch: plain BatchNorm
    assert torch.equal(ghost.running_mean, plain.running_mean)
    ghost.ghost_batch = 2
    ghost.eval(), plain.eval()
    assert torch.equal(ghost(x), plain(x))  # eval: the running statistics, whatever K
    ghost.train()
    with pytest.raises(ValueError, match=r"model\.bn_batch: 2 does not divide the micro batch of 7 samples"):
        ghost(torch.randn(7, 3, 4, 4, dtype=torch.float64))


def test_channels_last_stays_channels_last():
    ghost, _ = _pair()
    x = torch.randn(8, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert ghost.float()(x).is_contiguous(memory_format=torch.channels_last)


def test_resnet_with_ghost_batchnorm_is_the_same_network():
    """Same initial weights and state-dict keys as plain BatchNorm; zero-init of each block's last
    gamma; the author's parameter rule still finds every BatchNorm (no decay, no trust ratio)."""
    from resnet_lamb.optim.param_groups import param_groups

    torch.manual_seed(0)
    plain = build_resnet("resnet50", 10, zero_init_residual=True)
    torch.manual_seed(0)
    ghost = build_resnet("resnet50", 10, zero_init_residual=True, bn_batch=2)
    a, b = plain.state_dict(), ghost.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bns = [m for m in ghost.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 53 and all(isinstance(m, GhostBatchNorm2d) and m.ghost_batch == 2 for m in bns)
    assert all(float(blk.bn3.weight.detach().abs().sum()) == 0 for blk in (ghost.layer1[0], ghost.layer4[2]))
    groups = {g["layer_adaptation"]: {n for n, _ in g["params"]} for g in param_groups(ghost, 1.5, "author")}
    assert groups[False] == {n for n, _ in ghost.named_parameters() if "bn" in n or "downsample.1" in n}
    assert "fc.bias" in groups[True]  # biases keep decay and the trust ratio (the author's rule)


WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from resnet_lamb.networks import build_resnet
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def batch():
        g = torch.Generator().manual_seed(1)
        return torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)

    def net(bn_batch):
        torch.manual_seed(0)
        return build_resnet("resnet18", 10, small_input=True, bn_batch=bn_batch).double()

    def loss(model, x, y):  # the harness's loss: the sum over the micro batch / its size
        return torch.nn.functional.cross_entropy(model(x), y, reduction="sum") / len(y)

    x, y = batch()
    # two processes, micro batch 4 each, plain BatchNorm; DDP averages the gradients
    ddp = DDP(net(None))
    loss(ddp, x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4]).backward()
    grads = {n: p.grad for n, p in ddp.module.named_parameters()}
    stats = {n: b for n, b in ddp.module.named_buffers() if "running" in n}
    gathered = [None, None]
    dist.all_gather_object(gathered, stats)
    if rank == 0:
        # one process, micro batch 8, bn_batch 4
        one = net(4)
        loss(one, x, y).backward()
        worst = max(float((p.grad - grads[n]).abs().max() / grads[n].abs().max().clamp(min=1e-30))
                    for n, p in one.named_parameters())
        stat = max(float((b - (gathered[0][n] + gathered[1][n]) / 2).abs().max())
                   for n, b in one.named_buffers() if "running" in n)
        print("RESULT " + json.dumps({"grad_rel": worst, "stats": stat, "n": len(grads)}))
    dist.destroy_process_group()
""")


def test_one_process_with_bn_batch_equals_two_processes_with_plain_batchnorm(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script)], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    result = json.loads(outs[0][0].split("RESULT ", 1)[1])
    assert result["n"] == 62  # every parameter tensor of the ResNet-18 compared
    assert result["grad_rel"] < 1e-10, result  # float64: the same gradients up to summation order
    # the running statistics: the mean of the two processes' (DDP broadcasts rank 0's at the next forward)
    assert result["stats"] < 1e-12, result
