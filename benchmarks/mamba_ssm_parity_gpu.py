"""NOT YET RUN (written in a session without a GPU; no figure from it exists yet).

Parity and speed of the package's pure-PyTorch Mamba2 block (``networks.ssd.Mamba2SSD``, chunked SSD in
PyTorch) against mamba-ssm on the same weights, on a CUDA GPU:

1. ours, ``backend="torch"`` vs ours, ``backend="mamba_ssm"`` (the scan in mamba-ssm's Triton kernel
   ``mamba_chunk_scan_combined``; everything else identical);
2. ours vs ``mamba_ssm.Mamba2`` itself with our state dict loaded (strict), through its
   ``use_mem_eff_path=False`` path (the fused path needs the compiled ``causal_conv1d``; tried too and
   reported when it fails);
forward outputs and input/parameter gradients, fp32 and under fp16 autocast; then the latency of a
forward+backward for each. Tolerance: max abs difference <= 1e-3 * max abs value (fp32).

mamba-ssm is not installed on the GPU machine: build its pure-Python wheel on the CPU machine
(``MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip wheel --no-deps --no-build-isolation mamba-ssm``)
and install it there with --no-deps (../shared/GPU.md). Its package import needs the compiled
``selective_scan_cuda`` (Mamba1's kernel, unused here): THIS SCRIPT ONLY inserts an empty stand-in module
for it when it is missing, and says so in its output. The package itself never does this.

    python benchmarks/mamba_ssm_parity_gpu.py [--out benchmarks/results/mamba_ssm_parity_gpu]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def import_mamba_ssm() -> dict:
    notes = {}
    try:
        import mamba_ssm  # noqa: F401
    except ImportError as error:
        if "selective_scan_cuda" not in str(error):
            raise
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")  # parity script only
        notes["stub"] = "selective_scan_cuda replaced by an empty module (Mamba1 kernel, unused by Mamba2)"
        import mamba_ssm  # noqa: F401
    import mamba_ssm
    notes["mamba_ssm_version"] = getattr(mamba_ssm, "__version__", "?")
    return notes


def timed(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / repeats


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()
    return {"max_abs_diff": diff, "max_abs_ref": scale, "ok": diff <= 1e-3 * max(scale, 1e-6)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mamba_ssm_parity_gpu"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    notes = import_mamba_ssm()
    from mamba_ssm import Mamba2

    from nnunet_liver_ext.networks import ssd

    ssd.mamba_ssm_scan.cache_clear()
    device = torch.device("cuda")
    results = {"notes": notes, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    for d_model, headdim, length, batch in ((104, 16, 6144, 2), (320, 64, 64, 2), (320, 64, 4096, 2)):
        torch.manual_seed(0)
        ours = ssd.Mamba2SSD(d_model, d_state=16, headdim=headdim, backend="torch").to(device)
        kernel = ssd.Mamba2SSD(d_model, d_state=16, headdim=headdim, backend="mamba_ssm").to(device)
        kernel.load_state_dict(ours.state_dict())
        case = {"d_model": d_model, "headdim": headdim, "length": length, "batch": batch}
        u = torch.randn(batch, length, d_model, device=device, requires_grad=True)
        for label, module in (("mamba_ssm_scan_kernel", kernel),):
            y_ref, y = ours(u), module(u)
            g_ref = torch.autograd.grad(y_ref.square().sum(), [u, *ours.parameters()])
            g = torch.autograd.grad(y.square().sum(), [u, *module.parameters()])
            case[label] = {"forward": compare(y, y_ref),
                           "grads": {n: compare(a, b) for (n, _), a, b in zip([("input", None), *ours.named_parameters()],
                                                                              g, g_ref)}}
        for mem_eff in (False, True):
            label = f"mamba_ssm.Mamba2(use_mem_eff_path={mem_eff})"
            try:
                theirs = Mamba2(d_model, d_state=16, headdim=headdim, use_mem_eff_path=mem_eff).to(device)
                theirs.load_state_dict(ours.state_dict(), strict=True)
                y_ref, y = ours(u), theirs(u)
                case[label] = {"forward": compare(y, y_ref),
                               "ms_fwd_bwd": timed(lambda: theirs(u).sum().backward())}
            except Exception as error:  # reported, not hidden
                case[label] = {"error": f"{type(error).__name__}: {error}"}
        with torch.autocast("cuda", dtype=torch.float16):
            case["fp16_autocast_torch_vs_kernel"] = compare(kernel(u), ours(u))
        case["ms_fwd_bwd_torch"] = timed(lambda: ours(u).sum().backward())
        case["ms_fwd_bwd_kernel"] = timed(lambda: kernel(u).sum().backward())
        results["cases"].append(case)
        print(json.dumps(case, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
