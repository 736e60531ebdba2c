"""Parity of the package's pure-PyTorch Mamba2 block (``networks.ssd.Mamba2SSD``, chunked SSD in PyTorch)
against mamba-ssm on the same weights (issue 11): forward outputs and gradients (input and every parameter,
by name; not with the reference kernels). Tolerance: max abs difference <= 1e-3 * max abs reference value (fp32).

Comparisons, on the same random input and one state dict:

1. ``scan``: ours with ``backend="torch"`` against ours with the scan in mamba-ssm's
   ``mamba_chunk_scan_combined`` (``backend="mamba_ssm"``: everything else identical), which checks how
   our block calls mamba-ssm's scan;
2. ``Mamba2``: ours against ``mamba_ssm.Mamba2`` itself with our state dict loaded (strict), which
   checks the parameter layout and everything around the scan (projection split order, causal conv,
   dt, gated norm);
3. ``scan, torch.compile``: ours calling mamba-ssm's scan, compiled (inductor on CUDA, aot_eager on the
   CPU), against ours eager: the kernel stays outside the graph (``ssd.mamba_ssm_chunk_scan``), the rest
   compiles around it (the graph count is recorded) and gives the same output and gradients.

``--device cuda`` (issue 11's GPU evidence; NOT YET RUN, no session so far had the GPU machine):
mamba-ssm's Triton kernels; ``Mamba2`` through both of its paths (``use_mem_eff_path=False``, and the
fused path, which needs the compiled ``causal_conv1d``: tried, and its error reported when it fails); fp16
autocast; latency of a forward+backward of each. Results: benchmarks/results/mamba_ssm_parity_gpu/.

``--device cpu`` (default ``--kernels triton``): mamba-ssm's own Triton kernels, the chunked scan's and
``RMSNormGated``'s, forward and backward, run on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``; :func:`interpreter_patches` lists the CUDA queries answered for a CPU tensor).
Forward and every gradient are compared, through ``Mamba2``'s unfused path (the fused one needs the
compiled ``causal_conv1d``). This checks the kernels' arithmetic in fp32, not their speed and not their
GPU numerics (TF32 matrix products, fp16): those are the GPU's part. Results:
benchmarks/results/mamba_ssm_parity_cpu_interpreter/.

``--device cpu --kernels reference``: mamba-ssm's PyTorch references of the two kernels
(``ssd_chunk_scan_combined_ref``, ``rms_norm_ref``) stand in for them; forward only (``parity`` says why).
Seconds instead of minutes. Results: benchmarks/results/mamba_ssm_parity_cpu_reference/.

mamba-ssm is a source archive that needs a CUDA build; its pure-Python wheel (Triton kernels, no
compiled extension) is enough here: ``bash benchmarks/mamba_ssm_wheel.sh`` builds it into ``.whl/rest``,
which the GPU runners install (benchmarks/gpu_env.sh). mamba-ssm's package ``__init__`` imports Mamba1's
compiled extension, Mamba3 and a language-model class that needs ``transformers``; Mamba2 uses none of
them and the GPU machine has neither. THIS SCRIPT ONLY registers the installed package without running
its ``__init__`` and imports the submodules it needs from there. The package never does this: in
``networks/ssd.py`` a failing ``import mamba_ssm`` means the PyTorch scan.

On the CPU machine:

    bash benchmarks/mamba_ssm_wheel.sh
    pip install --no-deps --target /tmp/mamba_site .whl/rest/mamba_ssm-*.whl
    PYTHONPATH=/tmp/mamba_site python benchmarks/mamba_ssm_parity.py --device cpu [--kernels reference]

On the GPU machine, after ../shared/GPU.md's step 2, with ``.whl/rest`` carried (then copy
``$OUT/mamba_ssm_parity_gpu/`` to benchmarks/results/):

    bash benchmarks/mamba_ssm_parity_gpu.sh
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nnunet_liver_ext.networks import ssd  # noqa: E402
from perf_common import synchronize  # noqa: E402  (this script's folder is on sys.path)

# (d_model, headdim, ngroups, length, batch): small heads over a long sequence; the default plans' 320
# bottleneck features, short and long; two groups of B/C over a length that is no multiple of the chunk size
GPU_CASES = ((104, 16, 1, 6144, 2), (320, 64, 1, 64, 2), (320, 64, 1, 4096, 2), (128, 32, 2, 600, 2))
CPU_CASES = ((104, 16, 1, 1536, 2), (320, 64, 1, 64, 2), (320, 64, 1, 600, 1), (128, 32, 2, 300, 2))
QUICK_CASES = ((64, 16, 1, 300, 1), (64, 16, 2, 64, 2))
TOLERANCE = 1e-3


def import_mamba_ssm() -> Dict[str, str]:
    """Registers the installed mamba-ssm package without running its ``__init__`` (see the module docstring)."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or spec.submodule_search_locations is None:
        sys.exit("mamba-ssm is not importable here: build its wheel (bash benchmarks/mamba_ssm_wheel.sh) and "
                 "install it (pip install --no-deps --target DIR ...), then put DIR on PYTHONPATH")
    if "mamba_ssm" not in sys.modules:
        sys.modules["mamba_ssm"] = importlib.util.module_from_spec(spec)  # not executed: no __init__
    return {"mamba_ssm_version": importlib.metadata.version("mamba_ssm"), "mamba_ssm_location": spec.origin,
            "import": "package registered without its __init__ (Mamba1 extension, Mamba3, transformers unused)"}


def backend_as_requested(device, requested: str = "auto") -> str:
    """Stands in for ``ssd.resolve_backend`` on the CPU, where the package resolves ``mamba_ssm`` to an error."""
    return "mamba_ssm" if requested == "mamba_ssm" else "torch"


def reference_patches() -> List[Tuple[object, str, object]]:
    """CPU: ``(object, attribute, value)`` that put mamba-ssm's PyTorch references in place of its Triton
    kernels, in mamba-ssm's Mamba2 module and for our block's ``mamba_ssm`` backend (which resolves to the
    kernel on CUDA only). ``main`` sets them; a test sets them through pytest's ``monkeypatch``."""
    from mamba_ssm.modules import mamba2
    from mamba_ssm.ops.triton import layernorm_gated
    from mamba_ssm.ops.triton.ssd_combined import ssd_chunk_scan_combined_ref

    def scan_reference(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False, seq_idx=None,
                       cu_seqlens=None, return_final_states=False, return_varlen_states=False, **dt_limit):
        if seq_idx is not None or cu_seqlens is not None or return_final_states or return_varlen_states or dt_limit:
            raise NotImplementedError("the reference scan covers the plain training call only")
        # the reference takes whole chunks only; padding the tail cannot change earlier outputs of a causal scan
        length = x.shape[1]
        pad = (-length) % chunk_size
        x, dt, B, C = (F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad)) for t in (x, dt, B, C))
        z = None if z is None else F.pad(z, (0, 0, 0, 0, 0, pad))
        return ssd_chunk_scan_combined_ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                           dt_softplus=dt_softplus)[:, :length]

    def rms_norm_gated_reference(self, x, z=None):
        return layernorm_gated.rms_norm_ref(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                                            norm_before_gate=self.norm_before_gate)

    return [(mamba2, "mamba_chunk_scan_combined", scan_reference),
            (mamba2.RMSNormGated, "forward", rms_norm_gated_reference),  # layernorm_gated.RMSNorm
            (ssd, "mamba_ssm_scan", lambda: scan_reference),
            (ssd, "resolve_backend", backend_as_requested)]


def interpreter_patches() -> List[Tuple[object, str, object]]:
    """CPU: ``(object, attribute, value)`` under which mamba-ssm's own Triton kernels run on CPU tensors in
    Triton's interpreter (a process started with ``TRITON_INTERPRET=1``: :func:`interpreted_rerun`).
    mamba-ssm's launchers ask the CUDA runtime for two things a CPU tensor has no answer to:
    ``torch.cuda.device(tensor.device.index)`` around each launch (a no-op here) and the multiprocessor
    count that sizes the grid of one backward kernel (any positive count computes the same sums, in
    another order). The interpreter has no benchmarker, so every autotuner keeps its first configuration
    (block sizes: the order of the sums, not what is summed). Our block's ``mamba_ssm`` backend is pointed
    at the same kernel (it resolves to the kernel on CUDA only)."""
    import contextlib
    import types

    from mamba_ssm.ops.triton import (layernorm_gated, ssd_bmm, ssd_chunk_scan, ssd_chunk_state, ssd_combined,
                                      ssd_state_passing)
    from triton.runtime.autotuner import Autotuner

    cuda_device = torch.cuda.device

    def device_or_nothing(index):
        return contextlib.nullcontext() if index is None else cuda_device(index)

    properties = torch.cuda.get_device_properties

    def properties_or_cpu(device=None):
        if torch.device(device if device is not None else "cpu").type == "cpu":
            return types.SimpleNamespace(multi_processor_count=os.cpu_count() or 1)
        return properties(device)

    patches = [(torch.cuda, "device", device_or_nothing),
               (torch.cuda, "get_device_properties", properties_or_cpu),
               (ssd, "mamba_ssm_scan", lambda: ssd_combined.mamba_chunk_scan_combined),
               (ssd, "resolve_backend", backend_as_requested)]
    for module in (ssd_bmm, ssd_chunk_scan, ssd_chunk_state, ssd_combined, ssd_state_passing, layernorm_gated):
        patches += [(kernel, "configs", kernel.configs[:1]) for kernel in vars(module).values()
                    if isinstance(kernel, Autotuner)]
    return patches


def interpreted_rerun(argv: List[str]) -> int:
    """Runs this script again with ``TRITON_INTERPRET=1`` and returns its exit status. Triton fixes its
    own standard library (``tl.sum``, ``tl.cumsum``...) as compiled or interpreted when it is first
    imported, and importing the package's networks imports it through torch's native operators: the
    interpreter needs a process that has the variable from its start."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env).returncode


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()
    return {"max_abs_diff": diff, "max_abs_ref": scale, "ok": diff <= TOLERANCE * max(scale, 1e-6)}


def forward_and_grads(module: nn.Module, u: torch.Tensor, weight: torch.Tensor):
    """Output and the gradients of ``sum(output * weight)`` w.r.t. the input and every parameter, by name."""
    u = u.detach().requires_grad_(True)
    y = module(u)
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad((y.float() * weight).sum(), [u, *params])
    return y.detach(), dict(zip(("input", *names), grads))


def parity(ours: nn.Module, theirs: nn.Module, u: torch.Tensor, grads: bool) -> dict:
    """Forward and, with ``grads``, the gradients of the input and of every parameter. Without: the
    reference kernels' mode, whose stand-in scan has a NaN backward by construction (``chunk_scan_ref``
    exponentiates the decay above the causal diagonal, where it overflows, before masking it)."""
    if not grads:
        with torch.no_grad():
            forward = compare(theirs(u), ours(u))
        return {"forward": forward, "grads": None, "ok": forward["ok"]}
    weight = torch.randn(u.shape[:-1] + (ours.d_model,), generator=torch.Generator().manual_seed(1)).to(u.device)
    y_ref, g_ref = forward_and_grads(ours, u, weight)
    y, g = forward_and_grads(theirs, u, weight)
    if set(g) != set(g_ref):
        raise RuntimeError(f"parameter names differ: {sorted(set(g) ^ set(g_ref))}")
    forward = compare(y, y_ref)
    grads = {name: compare(g[name], g_ref[name]) for name in g_ref}
    return {"forward": forward, "grads": grads, "ok": forward["ok"] and all(c["ok"] for c in grads.values())}


def timed(fn, device: torch.device, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return 1e3 * (time.perf_counter() - start) / repeats


def run_case(device: torch.device, kernels: str, d_model: int, headdim: int, ngroups: int, length: int,
             batch: int) -> dict:
    from mamba_ssm.modules.mamba2 import Mamba2

    torch.manual_seed(0)
    config = dict(d_state=16, headdim=headdim, ngroups=ngroups)
    ours = ssd.Mamba2SSD(d_model, backend="torch", **config).to(device)
    ours_kernel = ssd.Mamba2SSD(d_model, backend="mamba_ssm", **config).to(device)
    ours_kernel.load_state_dict(ours.state_dict(), strict=True)
    u = torch.randn(batch, length, d_model, device=device)
    grads = kernels == "triton"  # the reference scan's backward is NaN (parity says why)
    case = {"d_model": d_model, "headdim": headdim, "ngroups": ngroups, "length": length, "batch": batch,
            "scan": parity(ours, ours_kernel, u, grads)}
    ours_compiled = None
    if grads:
        # the kernel is kept out of the compiled graph (ssd.mamba_ssm_chunk_scan); the rest compiles around it
        compile_backend = "inductor" if device.type == "cuda" else "aot_eager"
        label = f"scan, torch.compile({compile_backend})"
        try:
            ours_compiled = ssd.Mamba2SSD(d_model, backend="mamba_ssm", **config).to(device)
            ours_compiled.load_state_dict(ours.state_dict(), strict=True)
            explained = torch._dynamo.explain(ours_compiled)(u)  # expected: 2 graphs, split at the kernel
            torch._dynamo.reset()
            ours_compiled.compile(backend=compile_backend)  # in place: the parameter names stay
            label += f": {explained.graph_count} graphs"
            case[label] = parity(ours, ours_compiled, u, grads)
            case[label]["graph_breaks"] = [str(reason.reason).split("\n")[0] for reason in explained.break_reasons]
        except Exception as error:  # reported, not hidden; the other comparisons still run
            case[label] = {"error": f"{type(error).__name__}: {str(error)[:500]}", "ok": False}
            ours_compiled = None
    # the fused path needs the compiled causal_conv1d, which only a CUDA machine can build
    for mem_eff in ((False,) if device.type == "cpu" else (False, True)):
        label = f"Mamba2(use_mem_eff_path={mem_eff})"
        try:
            theirs = Mamba2(d_model, use_mem_eff_path=mem_eff, **config).to(device)
            theirs.load_state_dict(ours.state_dict(), strict=True)
            case[label] = parity(ours, theirs, u, grads)
            if device.type == "cuda":
                case[label]["ms_fwd_bwd"] = timed(lambda: theirs(u).sum().backward(), device)
        except Exception as error:  # reported, not hidden
            case[label] = {"error": f"{type(error).__name__}: {error}", "ok": False}
    if device.type == "cuda":
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            case["fp16_autocast_scan"] = compare(ours_kernel(u), ours(u))
        x = u.detach().requires_grad_(True)
        case["ms_fwd_bwd_torch"] = timed(lambda: ours(x).sum().backward(), device)
        case["ms_fwd_bwd_kernel"] = timed(lambda: ours_kernel(x).sum().backward(), device)
        if ours_compiled is not None:
            case["ms_fwd_bwd_kernel_compiled"] = timed(lambda: ours_compiled(x).sum().backward(), device)
    return case


def comparisons(case: dict) -> List[str]:
    """The labels of a case's parity comparisons (the table's rows; fp16 and timings are reported apart)."""
    return [label for label in case if label.startswith(("scan", "Mamba2("))]


def markdown(results: dict) -> str:
    lines = [f"# Mamba2 block parity against mamba-ssm ({results['device_name']})", "",
             f"Produced by `{results['command']}`; torch {results['torch']}, mamba-ssm "
             f"{results['notes']['mamba_ssm_version']}. {results['what']} Tolerance: max abs difference <= "
             f"{TOLERANCE:g} x max abs reference value; gradients (not with the reference kernels): input and every "
             "parameter by name, worst shown.",
             "", "| d_model | headdim | ngroups | length | batch | comparison | forward max abs diff (ref max) "
                 "| worst gradient: name, max abs diff (ref max) | ok |", "|---|---|---|---|---|---|---|---|---|"]
    for case in results["cases"]:
        for label in comparisons(case):
            c = case[label]
            head = "| " + " | ".join(str(case[k]) for k in ("d_model", "headdim", "ngroups", "length", "batch")) \
                + f" | {label} "
            if "error" in c:
                lines.append(head + f"| {c['error']} | | no |")
                continue
            grads = "not compared (reference kernels)"
            if c["grads"] is not None:
                name, worst = max(c["grads"].items(),
                                  key=lambda kv: kv[1]["max_abs_diff"] / max(kv[1]["max_abs_ref"], 1e-12))
                grads = f"{name}: {worst['max_abs_diff']:.2e} ({worst['max_abs_ref']:.3g})"
            lines.append(head + f"| {c['forward']['max_abs_diff']:.2e} ({c['forward']['max_abs_ref']:.3g}) | {grads} "
                                f"| {'yes' if c['ok'] else 'NO'} |")
    if "error" in results:
        lines += ["", f"STOPPED at case {results['error']['case']}: {results['error']['error']}"]
    timed_cases = [case for case in results["cases"] if "ms_fwd_bwd_torch" in case]
    if timed_cases:
        lines += ["", "Forward+backward of one block, ms (mean of 20 after 3 warm-up ones); x: ours with the PyTorch "
                      "scan over mamba-ssm's fastest Mamba2 path; fp16: our block calling the kernel under fp16 "
                      "autocast against our fp32 block (max abs diff, ref max).", "",
                  "| d_model | headdim | ngroups | length | batch | ours, PyTorch scan | ours, mamba-ssm scan "
                  "| the same, compiled | Mamba2 unfused | Mamba2 fused | x | fp16 autocast |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for case in timed_cases:
            theirs = [case.get(f"Mamba2(use_mem_eff_path={fused})", {}).get("ms_fwd_bwd") for fused in (False, True)]
            fastest = min((ms for ms in theirs if ms), default=None)
            fp16 = case["fp16_autocast_scan"]
            cells = [str(case[k]) for k in ("d_model", "headdim", "ngroups", "length", "batch")]
            cells += [f"{case[k]:.3g}" if k in case else "failed"
                      for k in ("ms_fwd_bwd_torch", "ms_fwd_bwd_kernel", "ms_fwd_bwd_kernel_compiled")]
            cells += [f"{ms:.3g}" if ms else "failed" for ms in theirs]
            cells += [f"{case['ms_fwd_bwd_torch'] / fastest:.2f}" if fastest else "-",
                      f"{fp16['max_abs_diff']:.2e} ({fp16['max_abs_ref']:.3g})"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


WHAT = {"cuda": "CUDA: mamba-ssm's Triton kernels.",
        "cpu_interpreter": "CPU: mamba-ssm's own Triton kernels (the scan's and RMSNormGated's, forward and backward) "
                           "in Triton's interpreter (TRITON_INTERPRET=1): the kernels' arithmetic, not their speed or "
                           "their GPU numerics (TF32, fp16).",
        "cpu_reference": "CPU: mamba-ssm's PyTorch references stand in for its Triton kernels "
                         "(ssd_chunk_scan_combined_ref, rms_norm_ref); the rest of mamba_ssm.Mamba2.forward is "
                         "mamba-ssm's own code."}


def main(argv: Iterable[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernels", choices=["triton", "reference"], default="triton",
                        help="mamba-ssm's Triton kernels (on the CPU in Triton's interpreter), or its PyTorch "
                             "references of them (forward only)")
    parser.add_argument("--cases", choices=["gpu", "cpu", "quick"], default=None,
                        help="shapes: default gpu on CUDA, cpu on the CPU; quick: the smallest CPU ones")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/mamba_ssm_parity_<gpu|cpu_interpreter|cpu_reference>")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA GPU")
    mode = "cuda" if device.type == "cuda" else f"cpu_{'interpreter' if args.kernels == 'triton' else 'reference'}"
    if mode == "cuda" and args.kernels == "reference":
        sys.exit("--kernels reference is the CPU's stand-in; on CUDA the kernels run")
    if mode == "cpu_interpreter" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit(interpreted_rerun(sys.argv[1:] if argv is None else list(argv)))
    notes = import_mamba_ssm()
    if mode != "cuda":
        for target, attribute, value in (interpreter_patches() if mode == "cpu_interpreter" else reference_patches()):
            setattr(target, attribute, value)
    else:
        ssd.mamba_ssm_scan.cache_clear()
    command = " ".join(["python benchmarks/mamba_ssm_parity.py --device", args.device]
                       + (["--kernels", args.kernels] if args.kernels != "triton" else [])
                       + (["--cases", args.cases] if args.cases else []))
    results = {"notes": notes, "what": WHAT[mode], "torch": torch.__version__, "mode": mode,
               "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
               "command": command, "tolerance": TOLERANCE, "cases": []}
    cases = {"gpu": GPU_CASES, "cpu": CPU_CASES, "quick": QUICK_CASES}[args.cases or device.type.replace("cuda", "gpu")]
    out = args.out or REPO / "benchmarks" / "results" / f"mamba_ssm_parity_{'gpu' if mode == 'cuda' else mode}"
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every case: a GPU call may end at its time limit
        results["all_ok"] = "error" not in results and all(
            c[label]["ok"] for c in results["cases"] for label in comparisons(c))
        (out / "parity.json").write_text(json.dumps(results, indent=2))
        (out / "parity.md").write_text(markdown(results))

    for case in cases:
        start = time.perf_counter()
        try:
            results["cases"].append(run_case(device, args.kernels, *case))
        except Exception as error:  # the cases before it are kept, and so is the reason
            results["error"] = {"case": case, "error": f"{type(error).__name__}: {str(error)[:1000]}"}
            save()
            break
        results["cases"][-1]["seconds"] = round(time.perf_counter() - start, 1)
        save()
        print(json.dumps({k: v for k, v in results["cases"][-1].items() if not isinstance(v, dict)}), flush=True)
    print(markdown(results))
    if not results["all_ok"]:
        sys.exit("parity NOT met: see " + str(out / "parity.md"))


if __name__ == "__main__":
    main()
