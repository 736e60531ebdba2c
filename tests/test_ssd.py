"""The pure-PyTorch Mamba2 (SSD) block against a step-by-step recurrence written here from the same
parameters, forward and gradients, on the CPU; mamba_ssm.Mamba2's parameter layout; fp32 scan."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nnunet_liver_ext.networks.ssd import Mamba2SSD, describe_backend, resolve_backend, ssd_chunked

torch.set_num_threads(1)


def recurrence(block: Mamba2SSD, u: torch.Tensor) -> torch.Tensor:
    """Mamba2 computed token by token from the block's parameters (no code shared with the block):
    in_proj -> causal depthwise conv + SiLU -> h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,
    y_t = C_t h_t + D x_t -> rmsnorm(y * silu(z)) * w -> out_proj."""
    b, length, _ = u.shape
    d_inner, h, p, g, n = block.d_inner, block.nheads, block.headdim, block.ngroups, block.d_state
    zxbcdt = u @ block.in_proj.weight.T
    z = zxbcdt[..., :d_inner]
    xbc = zxbcdt[..., d_inner:2 * d_inner + 2 * g * n]
    dt_raw = zxbcdt[..., 2 * d_inner + 2 * g * n:]
    weight = block.conv1d.weight[:, 0, :]  # (channels, K)
    k = weight.shape[1]
    conv = block.conv1d.bias.expand(b, length, -1)
    for tap in range(k):  # tap k-1 multiplies the current token, tap 0 the one k-1 steps back
        shift = k - 1 - tap
        shifted = F.pad(xbc, (0, 0, shift, 0))[:, :length]
        conv = conv + shifted * weight[:, tap]
    xbc = F.silu(conv)
    x = xbc[..., :d_inner].reshape(b, length, h, p)
    B = xbc[..., d_inner:d_inner + g * n].reshape(b, length, g, n)
    C = xbc[..., d_inner + g * n:].reshape(b, length, g, n)
    A = -torch.exp(block.A_log)
    dt = F.softplus(dt_raw + block.dt_bias)  # (b, l, h)
    group_of_head = torch.arange(h) // (h // g)
    state = torch.zeros(b, h, p, n)
    ys = []
    for t in range(length):
        Bt, Ct = B[:, t, group_of_head], C[:, t, group_of_head]  # (b, h, n)
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        state = state * decay[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ct) + block.D[:, None] * x[:, t])
    y = torch.stack(ys, 1).reshape(b, length, d_inner) * F.silu(z)
    y = y.reshape(b, length, g, d_inner // g)
    y = (y / torch.sqrt(y.square().mean(-1, keepdim=True) + 1e-5)).reshape(b, length, d_inner) * block.norm.weight
    return y @ block.out_proj.weight.T


def make_block(d_model=16, d_state=8, headdim=8, ngroups=1, chunk_size=8, seed=0) -> Mamba2SSD:
    torch.manual_seed(seed)
    block = Mamba2SSD(d_model, d_state=d_state, d_conv=4, expand=2, headdim=headdim, ngroups=ngroups,
                      chunk_size=chunk_size, backend="torch")
    with torch.no_grad():  # away from the initial values, so every term matters
        block.D.uniform_(0.5, 1.5)
        block.norm.weight.uniform_(0.5, 1.5)
        block.dt_bias.add_(1.0)
    return block


@pytest.mark.parametrize("length", [1, 5, 8, 13, 24, 37])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_chunked_ssd_equals_recurrence_forward_and_gradients(length, ngroups):
    block = make_block(ngroups=ngroups)
    u = torch.randn(2, length, 16, requires_grad=True)
    ours = block(u)
    ref = recurrence(block, u)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    upstream = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * upstream).sum(), [u, *block.parameters()])
    grads_ref = torch.autograd.grad((ref * upstream).sum(), [u, *block.parameters()])
    names = ["input"] + [name for name, _ in block.named_parameters()]
    for name, g_ours, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-3, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")
        if length > 1 or name != "A_log":  # one token: the decay of an empty state has no effect
            assert g_ours.abs().sum() > 0, f"{name} got a zero gradient"


def test_result_does_not_depend_on_chunk_size_and_state_carries_over():
    torch.manual_seed(1)
    b, length, h, p, n = 2, 29, 4, 3, 5
    x, B, C = torch.randn(b, length, h, p), torch.randn(b, length, 2, n), torch.randn(b, length, 2, n)
    dt = F.softplus(torch.randn(b, length, h))
    A = -torch.rand(h) - 0.1
    D = torch.randn(h)
    y_full, state_full = ssd_chunked(x, dt, A, B, C, 64, D)
    for cs in (1, 4, 7, 29):
        y, state = ssd_chunked(x, dt, A, B, C, cs, D)
        torch.testing.assert_close(y, y_full, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state, state_full, rtol=1e-4, atol=1e-5)
    # two halves with the first half's final state as the second's initial state = the whole
    y1, s1 = ssd_chunked(x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11], 4, D)
    y2, s2 = ssd_chunked(x[:, 11:], dt[:, 11:], A, B[:, 11:], C[:, 11:], 4, D, initial_state=s1)
    torch.testing.assert_close(torch.cat((y1, y2), 1), y_full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s2, state_full, rtol=1e-4, atol=1e-5)


def test_scan_runs_in_fp32_under_autocast():
    torch.manual_seed(2)
    b, length, h, p, n = 1, 40, 2, 4, 8
    x, B, C = torch.randn(b, length, h, p), torch.randn(b, length, 1, n), torch.randn(b, length, 1, n)
    dt = F.softplus(torch.randn(b, length, h))
    A = -torch.rand(h)
    low = [t.bfloat16() for t in (x, dt, B, C)]
    reference, _ = ssd_chunked(*[t.float() for t in low[:2]], A, *[t.float() for t in low[2:]], 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = ssd_chunked(*[t.float() for t in low[:2]], A, *[t.float() for t in low[2:]], 16)
    assert y.dtype == torch.float32
    # bf16 einsums would be off by ~1e-2 relative; fp32 agrees to rounding
    torch.testing.assert_close(y, reference, rtol=1e-6, atol=1e-6)

    block = make_block()
    u = torch.randn(2, 13, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(u)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(u.grad).all()
    torch.testing.assert_close(out.float(), block(u).detach(), rtol=0.1, atol=0.05)


def test_parameter_names_and_shapes_are_mamba_ssm_mamba2s():
    """mamba_ssm 2.3 modules/mamba2.py: in_proj (2*d_inner + 2*ngroups*d_state + nheads, d_model), conv1d over
    d_inner + 2*ngroups*d_state channels, dt_bias / A_log / D per head, norm.weight (d_inner,), out_proj."""
    d_model, d_state, expand, headdim, ngroups, d_conv = 32, 16, 2, 16, 2, 4
    block = Mamba2SSD(d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, ngroups=ngroups)
    d_inner = expand * d_model
    nheads = d_inner // headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    expected = {"in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
                "conv1d.weight": (conv_dim, 1, d_conv), "conv1d.bias": (conv_dim,), "dt_bias": (nheads,),
                "A_log": (nheads,), "D": (nheads,), "norm.weight": (d_inner,), "out_proj.weight": (d_model, d_inner)}
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == expected
    # mamba_ssm's initialisation ranges
    A = torch.exp(block.A_log)
    assert A.min() >= 1 and A.max() <= 16
    dt = F.softplus(block.dt_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


@pytest.mark.parametrize("kwargs,match", [
    ({"d_model": 20, "headdim": 16}, "divisible by headdim"),
    ({"d_model": 16, "headdim": 8, "ngroups": 3}, "multiple of ngroups"),
    ({"d_model": 16, "headdim": 8, "d_state": 0}, "d_state"),
    ({"d_model": 16, "headdim": 8, "backend": "cuda"}, "backend"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba2SSD(**kwargs)


def test_backend_on_cpu_is_torch_and_named():
    assert resolve_backend(torch.device("cpu")) == "torch"
    assert describe_backend(torch.device("cpu")).startswith("torch")
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        resolve_backend(torch.device("cpu"), "mamba_ssm")


def test_no_python_loop_over_tokens():
    """The cost of the torch path grows with the number of chunks, not tokens: a 4096-token sequence in one
    call takes well under what 4096 Python-level steps of the recurrence take."""
    import time

    block = make_block(d_model=16, chunk_size=64)
    u = torch.randn(1, 4096, 16)
    with torch.no_grad():
        start = time.perf_counter()
        block(u)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        recurrence(block, u[:, :512])
        loop_512 = time.perf_counter() - start
    assert ours < loop_512 * 8 / 2, (ours, loop_512)
    assert math.isfinite(ours)


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None,
                    reason="mamba-ssm is not installed (benchmarks/mamba_ssm_parity.py says how to build its wheel)")
def test_block_equals_mamba_ssm_mamba2_around_its_kernels(monkeypatch):
    """Where mamba-ssm's wheel is installed (CI has no package index to build it): mamba_ssm.Mamba2 loads our
    state dict strictly and, with its Triton kernels replaced by mamba-ssm's own PyTorch references, computes
    what our block computes, both through its own code and with our block calling its scan; a swapped B/C
    projection is caught."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mamba_ssm_parity as parity

    parity.import_mamba_ssm()
    for target, attribute, value in parity.reference_patches():
        monkeypatch.setattr(target, attribute, value)
    from mamba_ssm.modules.mamba2 import Mamba2

    torch.manual_seed(0)
    config = dict(d_state=16, headdim=32, ngroups=2)
    ours = Mamba2SSD(128, backend="torch", **config)
    ours_via_their_scan = Mamba2SSD(128, backend="mamba_ssm", **config)
    ours_via_their_scan.load_state_dict(ours.state_dict(), strict=True)
    theirs = Mamba2(128, use_mem_eff_path=False, **config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    u = torch.randn(2, 300, 128)  # not a multiple of the chunk size
    assert parity.parity(ours, ours_via_their_scan, u, grads=False)["ok"]
    assert parity.parity(ours, theirs, u, grads=False)["ok"]

    state = ours.state_dict()
    d_inner, bc = ours.d_inner, ours.ngroups * ours.d_state
    weight = state["in_proj.weight"].clone()
    b_rows, c_rows = slice(2 * d_inner, 2 * d_inner + bc), slice(2 * d_inner + bc, 2 * d_inner + 2 * bc)
    weight[b_rows], weight[c_rows] = state["in_proj.weight"][c_rows], state["in_proj.weight"][b_rows]
    theirs.load_state_dict({**state, "in_proj.weight": weight}, strict=True)
    assert not parity.parity(ours, theirs, u, grads=False)["ok"]


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None or importlib.util.find_spec("triton") is None,
                    reason="mamba-ssm or Triton is not installed (benchmarks/mamba_ssm_parity.py says how to build "
                           "mamba-ssm's wheel)")
def test_block_equals_mamba_ssm_triton_kernels_in_the_interpreter(tmp_path):
    """mamba-ssm's own Triton kernels (the chunked scan and RMSNormGated, forward and backward) in Triton's CPU
    interpreter: mamba_ssm.Mamba2 with our state dict, and our block calling mamba-ssm's scan, eager and
    compiled, give our block's output and the gradients of the input and of every parameter. The script runs
    in its own process, which the interpreter needs from the start. A scan comparison with no difference at all
    would mean our own scan ran on both sides."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "mamba_ssm_parity.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--cases", "quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "parity.json").read_text())
    assert results["mode"] == "cpu_interpreter" and results["all_ok"]
    names = {"input"} | {name for name, _ in Mamba2SSD(64, d_state=16, headdim=16).named_parameters()}
    for case in results["cases"]:
        compiled = "scan, torch.compile(aot_eager): 2 graphs"  # split at the kernel, which stays eager
        for label in ("scan", "Mamba2(use_mem_eff_path=False)", compiled):
            assert set(case[label]["grads"]) == names, label
        (graph_break,) = case[compiled]["graph_breaks"]
        assert "torch.compiler.disable" in graph_break
        assert 0 < case["scan"]["forward"]["max_abs_diff"]
        assert any(0 < g["max_abs_diff"] for g in case["scan"]["grads"].values())


def test_parity_report_of_a_gpu_run(monkeypatch):
    """The GPU run's report (its only chance may be one short session): every comparison a row, a failed
    path reported as failed, the speed table with the ratio over mamba-ssm's fastest path that ran."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mamba_ssm_parity as parity

    close = {"max_abs_diff": 1e-6, "max_abs_ref": 2.0, "ok": True}
    case = {"d_model": 320, "headdim": 64, "ngroups": 1, "length": 4096, "batch": 2,
            "scan": {"forward": close, "grads": {"input": close, "A_log": {**close, "max_abs_diff": 1e-5}},
                     "ok": True},
            "scan, torch.compile(inductor): 2 graphs": {"forward": close, "grads": {"input": close}, "ok": True,
                                                        "graph_breaks": ["Skip calling torch.compiler.disable()d"]},
            "Mamba2(use_mem_eff_path=False)": {"forward": close, "grads": {"input": close}, "ok": True,
                                               "ms_fwd_bwd": 4.0},
            "Mamba2(use_mem_eff_path=True)": {"error": "ImportError: causal_conv1d_cuda", "ok": False},
            "fp16_autocast_scan": {"max_abs_diff": 3e-3, "max_abs_ref": 2.0, "ok": False},
            "ms_fwd_bwd_torch": 10.0, "ms_fwd_bwd_kernel": 5.0, "ms_fwd_bwd_kernel_compiled": 4.5}
    results = {"device_name": "NVIDIA H100", "command": "python benchmarks/mamba_ssm_parity.py --device cuda",
               "torch": "2.11.0", "notes": {"mamba_ssm_version": "2.3.2.post1"}, "what": "CUDA.", "cases": [case]}
    assert parity.comparisons(case) == ["scan", "scan, torch.compile(inductor): 2 graphs",
                                        "Mamba2(use_mem_eff_path=False)", "Mamba2(use_mem_eff_path=True)"]
    report = parity.markdown(results)
    assert "| scan | 1.00e-06 (2) | A_log: 1.00e-05 (2) | yes |" in report
    assert "| Mamba2(use_mem_eff_path=True) | ImportError: causal_conv1d_cuda | | no |" in report
    assert "| 320 | 64 | 1 | 4096 | 2 | 10 | 5 | 4.5 | 4 | failed | 2.50 | 3.00e-03 (2) |" in report
    # a run stopped by an error keeps the cases before it and says where and why
    stopped = parity.markdown({**results, "error": {"case": [128, 32, 2, 600, 2], "error": "RuntimeError: x"}})
    assert "STOPPED at case [128, 32, 2, 600, 2]: RuntimeError: x" in stopped and "| 320 | 64 |" in stopped
