"""A Mamba2 (SSD, state-space duality) block in pure PyTorch, with ``mamba_ssm.Mamba2``'s parameters.

Why our own: mamba-ssm ships as a source archive that needs a CUDA build and does not import on a
CPU machine (../shared/DESIGN.md, "Dependencies"), so it stays the optional extra ``[mamba]``.
:class:`Mamba2SSD` has the parameter names and shapes of ``mamba_ssm.Mamba2`` (mamba-ssm 2.3,
``ngroups`` groups, ``d_ssm = d_inner``, ``rmsnorm=True``, ``D_has_hdim=False``)::

    in_proj.weight   (2*d_inner + 2*ngroups*d_state + nheads, d_model)   order [z, x, B, C, dt]
    conv1d.weight    (d_inner + 2*ngroups*d_state, 1, d_conv), conv1d.bias (same first dim)
    dt_bias (nheads,), A_log (nheads,), D (nheads,)
    norm.weight      (d_inner,)             gated RMSNorm, norm(x * silu(z)) per group
    out_proj.weight  (d_model, d_inner)

so one state dict loads under either backend (checked against mamba-ssm 2.3.2's own ``Mamba2``,
forward and gradients, with its Triton kernels run on the CPU by Triton's interpreter:
benchmarks/mamba_ssm_parity.py).

Backends (chosen per call, logged once per process and kind):
- ``torch``: the chunked, matmul-based SSD algorithm (``ssd_minimal_discrete`` of mamba-ssm,
  Listing 1 of the Mamba2 paper): quadratic attention-like form inside chunks, a linear
  recurrence over chunk states between them. No Python loop over tokens.
- ``mamba_ssm``: for CUDA inputs when ``import mamba_ssm`` succeeds (any exception means no), the
  scan runs in mamba-ssm's Triton kernel ``mamba_chunk_scan_combined``, the kernel
  ``Mamba2.forward`` calls, on the same parameters (the depthwise causal conv and the gated norm
  stay in PyTorch, so the block needs neither ``causal_conv1d`` nor mamba-ssm's compiled
  extension).

Mixed precision: projections follow autocast; the discretisation, the scan and the gated norm
run in fp32 (U-Mamba users hit NaN losses with an fp16 scan).
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_liver_ext.networks.blocks import autocast_off

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "mamba_ssm")
_logged_backends: set = set()


@functools.lru_cache(maxsize=None)
def mamba_ssm_scan():
    """mamba-ssm's Triton SSD scan (``mamba_chunk_scan_combined``), or None when mamba-ssm does not
    import here (not installed, no compiled extension, no Triton, ...)."""
    try:
        import mamba_ssm  # noqa: F401  (the package import is the availability test DESIGN.md names)
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # any failure means: use ours
        return None
    return mamba_chunk_scan_combined


@torch.compiler.assume_constant_result
def mamba_ssm_available() -> bool:
    """Whether mamba-ssm's scan imports; a constant to ``torch.compile`` (the import attempt is no graph)."""
    return mamba_ssm_scan() is not None


@torch.compiler.disable
def mamba_ssm_chunk_scan(*args, **kwargs) -> torch.Tensor:
    """``mamba_chunk_scan_combined`` kept outside a compiled graph: its kernels are fused already, and
    whether dynamo traces mamba-ssm's autotuned Triton launches depends on the mamba-ssm and torch
    versions (not verified on a GPU here); the rest of the network compiles around it."""
    return mamba_ssm_scan()(*args, **kwargs)


def resolve_backend(device: torch.device, requested: str = "auto") -> str:
    """The backend a block with ``backend=requested`` uses for inputs on ``device``."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return "torch"
    available = torch.device(device).type == "cuda" and mamba_ssm_available()
    if requested == "mamba_ssm" and not available:
        raise RuntimeError("backend='mamba_ssm' needs CUDA inputs and an importable mamba-ssm "
                           "(pip install --no-build-isolation mamba-ssm)")
    return "mamba_ssm" if available else "torch"


def describe_backend(device: torch.device, requested: str = "auto") -> str:
    backend = resolve_backend(device, requested)
    if backend == "mamba_ssm":
        return "mamba_ssm (Triton mamba_chunk_scan_combined)"
    why = "CPU input" if torch.device(device).type != "cuda" else "mamba-ssm does not import"
    return f"torch (chunked SSD in PyTorch; {why})" if requested == "auto" else "torch (chunked SSD in PyTorch)"


def _log_backend_once(device: torch.device, requested: str) -> None:
    if torch.compiler.is_compiling():
        return  # logging breaks a compiled graph; the eager forward and the trainer's log say it
    key = (torch.device(device).type, requested)
    if key not in _logged_backends:
        _logged_backends.add(key)
        logger.info("Mamba2 block backend for %s inputs: %s", key[0], describe_backend(device, requested))


def segsum(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(x[..., j+1:i+1])`` for ``i >= j``, ``-inf`` above the diagonal:
    ``exp(segsum(a))`` is the causal decay matrix of a chunk. Cumsum of a masked repeat, not a
    difference of cumsums, for stability (mamba-ssm's ``segsum``). ``x`` ``(..., T)`` ->
    ``(..., T, T)``."""
    t = x.shape[-1]
    x = x.unsqueeze(-1).expand(*x.shape, t)
    strict = torch.tril(torch.ones(t, t, device=x.device, dtype=torch.bool), diagonal=-1)
    out = torch.cumsum(x.masked_fill(~strict, 0), dim=-2)
    causal = torch.tril(torch.ones(t, t, device=x.device, dtype=torch.bool), diagonal=0)
    return out.masked_fill(~causal, -torch.inf)


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int, D: Optional[torch.Tensor] = None,
                initial_state: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The selective scan ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T``, ``y_t = C_t h_t + D x_t``
    by the chunked SSD algorithm, in fp32.

    x ``(b, l, h, p)``; dt ``(b, l, h)`` (already softplus'ed); A ``(h,)`` (negative);
    B, C ``(b, l, g, n)`` with ``h % g == 0`` (head i reads group ``i // (h // g)``, as mamba-ssm);
    D ``(h,)`` or None; initial_state ``(b, h, p, n)`` or None.
    Returns y ``(b, l, h, p)`` and the final state ``(b, h, p, n)``. Any ``l``: the tail is padded
    with ``dt = 0`` steps (no decay, no input), which leave outputs and the final state unchanged.
    """
    with autocast_off(x.device.type):
        return _ssd_chunked_fp32(x, dt, A, B, C, chunk_size, D, initial_state)


def _ssd_chunked_fp32(x, dt, A, B, C, chunk_size, D, initial_state):
    out_dtype = x.dtype
    b, length, h, p = x.shape
    g = B.shape[2]
    if h % g:
        raise ValueError(f"number of heads ({h}) must be a multiple of ngroups ({g})")
    x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
    if g != h:
        B = B.repeat_interleave(h // g, dim=2)
        C = C.repeat_interleave(h // g, dim=2)
    # a chunk longer than the sequence only pads: the result does not depend on the chunk size
    cs = max(1, min(chunk_size, length))
    pad = (-length) % cs
    xdt = x * dt.unsqueeze(-1)
    Adt = A * dt  # (b, l, h)
    if pad:
        xdt, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xdt, B, C))
        Adt = F.pad(Adt, (0, 0, 0, pad))
    nc = (length + pad) // cs
    xdt = xdt.view(b, nc, cs, h, p)
    B = B.view(b, nc, cs, h, -1)
    C = C.view(b, nc, cs, h, -1)
    Adt = Adt.view(b, nc, cs, h).permute(0, 3, 1, 2)  # (b, h, c, l)
    A_cumsum = torch.cumsum(Adt, dim=-1)

    # 1. within chunks: the quadratic (attention-like) form with the causal decay matrix
    decay = torch.exp(segsum(Adt))  # (b, h, c, l, s)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
    # 2. the state each chunk leaves behind, from its own inputs
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)  # (b, h, c, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, xdt)
    # 3. the recurrence between chunks (nc steps, as one matmul with the chunk decay matrix)
    if initial_state is None:
        initial_state = torch.zeros_like(states[:, :1])
    else:
        initial_state = initial_state.float().unsqueeze(1)
    states = torch.cat((initial_state, states), dim=1)  # (b, c+1, h, p, n)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = states[:, :-1], states[:, -1]
    # 4. the contribution of the incoming state to each position of a chunk
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cumsum))
    y = y.reshape(b, nc * cs, h, p)[:, :length]
    if D is not None:
        y = y + x * D.float().view(1, 1, h, 1)
    return y.to(out_dtype), final_state


class GatedRMSNorm(nn.Module):
    """mamba-ssm's ``RMSNormGated`` (norm_before_gate=False): ``rmsnorm(x * silu(z)) * weight``, the
    RMS taken per group of ``group_size`` channels, in fp32. Parameter: ``weight`` ``(dim,)``."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: Optional[int] = None):
        super().__init__()
        group_size = dim if group_size is None else group_size
        if dim % group_size:
            raise ValueError(f"dim ({dim}) must be a multiple of group_size ({group_size})")
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = x.float() * F.silu(z.float())
        grouped = x.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + self.eps)
        return grouped.flatten(-2) * self.weight.float()


class Mamba2SSD(nn.Module):
    """Mamba2 block (selective state space, SSD form): ``(B, L, d_model) -> (B, L, d_model)``.

    Args are ``mamba_ssm.Mamba2``'s: ``d_model``, ``d_state`` [128 there; the Mamba-codebook U-Net
    uses 16], ``d_conv`` [4], ``expand`` [2], ``headdim`` [64] (``expand * d_model`` must be a
    multiple of it), ``ngroups`` [1], ``A_init_range``, ``dt_min``/``dt_max``/``dt_init_floor``,
    ``bias`` (in/out projections), ``conv_bias``, ``chunk_size`` [256]. ``backend``: ``auto``
    (mamba-ssm's kernel for CUDA inputs when it imports, else ours), ``torch`` or ``mamba_ssm``.
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, A_init_range: Tuple[float, float] = (1, 16), dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, bias: bool = False, conv_bias: bool = True,
                 chunk_size: int = 256, backend: str = "auto"):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                            ("headdim", headdim), ("ngroups", ngroups), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"expand * d_model ({expand} * {d_model} = {d_inner}) must be divisible by headdim "
                             f"({headdim}), as in mamba_ssm.Mamba2")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"the number of heads ({nheads}) must be a multiple of ngroups ({ngroups})")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner, self.headdim, self.nheads, self.ngroups = d_inner, headdim, nheads, ngroups
        self.chunk_size = chunk_size
        self.backend = backend

        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias)
        conv_dim = d_inner + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=conv_bias)
        # mamba_ssm.Mamba2's initialisation: dt log-uniform in [dt_min, dt_max], stored as softplus^-1
        dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(d_inner, eps=1e-5, group_size=d_inner // ngroups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
                f"headdim={self.headdim}, nheads={self.nheads}, ngroups={self.ngroups}, "
                f"chunk_size={self.chunk_size}, backend={self.backend!r}")

    def ssm_inputs(self, u: torch.Tensor):
        """The projections before the scan: z, x ``(b, l, h, p)``, B, C ``(b, l, g, n)``, raw dt ``(b, l, h)``
        (exposed for the recurrence reference of the tests)."""
        b, length, _ = u.shape
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * self.ngroups * self.d_state,
                                                   self.nheads], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :length].transpose(1, 2))  # causal depthwise conv
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        return (z, x.unflatten(-1, (self.nheads, self.headdim)), B.unflatten(-1, (self.ngroups, self.d_state)),
                C.unflatten(-1, (self.ngroups, self.d_state)), dt)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if u.ndim != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"expected (batch, length, {self.d_model}), got {tuple(u.shape)}")
        backend = resolve_backend(u.device, self.backend)
        _log_backend_once(u.device, self.backend)
        z, x, B, C, dt = self.ssm_inputs(u)
        with autocast_off(u.device.type):
            A = -torch.exp(self.A_log.float())
            if backend == "mamba_ssm":
                y = mamba_ssm_chunk_scan(x.float().contiguous(), dt.float().contiguous(), A, B.float().contiguous(),
                                         C.float().contiguous(), chunk_size=self.chunk_size, D=self.D.float(),
                                         dt_bias=self.dt_bias.float(), dt_softplus=True)
            else:
                dt = F.softplus(dt.float() + self.dt_bias.float())
                y, _ = ssd_chunked(x.float(), dt, A, B.float(), C.float(), self.chunk_size, D=self.D)
            y = self.norm(y.flatten(-2), z)
        # under autocast the projection casts itself; without it, it needs its weight's dtype
        return self.out_proj(y.to(self.out_proj.weight.dtype))
