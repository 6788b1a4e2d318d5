"""Gated delta rule, the token mixer of Gated DeltaNet (Yang, Kautz & Hatamizadeh, arXiv 2412.06464).

Shape legend: `B` batch, `T` length, `H` heads, `K` key/query head dim, `V` value head dim, `N` chunks, `C` chunk
length. Names with a shape suffix (`S_BHKV`) carry their layout.

Per head, with a state `S [K, V]` (fp32), the recurrence is (fla's `naive_recurrent_gated_delta_rule`)

    S'_t = exp(g_t) S_{t-1}                          decay (g_t <= 0 is a log decay)
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T    delta rule: move the value stored at k_t towards v_t
    o_t  = scale * S_t^T q_t

Three implementations share one signature:
* `gated_delta_rule_ref`: the recurrence above, one step at a time (the test oracle);
* `gated_delta_rule_chunked`: the same result in chunks of 64 steps with the WY/UT representation (CPU fast path);
* fla-core's Triton kernels (`chunk_gated_delta_rule`, `fused_recurrent_gated_delta_rule`) for CUDA tensors.
`chunk_gated_delta_rule` validates the inputs and dispatches. A decode token goes through
`hlsa.ops.gated_delta_decode`, which runs the whole GDN layer between its two projections and updates the cache in
place. `l2norm` and `gdn_gates` form the rule's inputs as the GDN layer does; the layer and that op share them.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from hlsa.ops import check_backend

CHUNK_SIZE = 64
# fla's fused recurrent kernel beats its chunk kernel on short inputs; the layer of fla switches at 64 tokens too.
FUSED_RECURRENT_MAX_T = 64


# fla's `l2norm` epsilon: x / sqrt(sum(x^2) + eps).
L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """fla's l2norm over the last dim, in fp32 and cast back: a zero vector (a pad) stays zero."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)).to(x.dtype)


def gdn_gates(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GDN layer's `(g, beta)` from its projections `a, b [..., H]`: the log decay `-exp(A_log) softplus(a +
    dt_bias) <= 0` in fp32, as fla's kernels compute it, and the step size `sigmoid(b)` in the dtype of `b`."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.sigmoid()


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str | None = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over a whole sequence, continuing from `initial_state`.

    Args:
        q: queries `[B, T, H, K]` (the layer L2-normalises q and k; this op does not).
        k: keys `[B, T, H, K]`, same dtype as `q`.
        v: values `[B, T, H, V]`, same dtype as `q`.
        g: log decay `[B, T, H]`, `<= 0` (not checked: that would need a device sync).
        beta: delta-rule step sizes `[B, T, H]`, usually in `(0, 1)`.
        scale: query scale, default `K ** -0.5`.
        initial_state: `[B, H, K, V]` state to start from (zeros when `None`).
        output_final_state: also return the state after the last step.
        backend: `"torch"` (chunked PyTorch; `gated_delta_rule_ref` is the step-by-step reference), `"fla"`
            (fla-core kernels, CUDA only) or `"auto"`: fla for CUDA tensors when fla-core is installed, else
            `"torch"` (`hlsa.ops.BACKENDS`).

    Returns:
        o: `[B, T, H, V]` in the dtype of `v`.
        final_state: `[B, H, K, V]` (fp32, or fp64 for fp64 inputs) if `output_final_state`, else `None`.
    """
    _check_tensors(q, k, v, g, beta, initial_state)
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive (or None for K ** -0.5), got {scale}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    implementations = {"torch": gated_delta_rule_chunked, "fla": _gated_delta_rule_fla}
    run = implementations[_pick_backend(backend, q)]
    return run(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def gated_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step recurrence (readable oracle). Shapes and returns as `chunk_gated_delta_rule`."""
    dtype = _compute_dtype(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if initial_state is None:
        S_BHKV = q.new_zeros(B, H, K, V, dtype=dtype)
    else:
        S_BHKV = initial_state.to(dtype)
    outputs = []
    for t in range(T):
        S_BHKV, o_BHV = gated_delta_step_ref(S_BHKV, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], scale)
        outputs.append(o_BHV)
    o_BTHV = torch.stack(outputs, dim=1).to(v.dtype)
    return o_BTHV, (S_BHKV if output_final_state else None)


def gated_delta_step_ref(
    S_BHKV: torch.Tensor,
    q_BHK: torch.Tensor,
    k_BHK: torch.Tensor,
    v_BHV: torch.Tensor,
    g_BH: torch.Tensor,
    beta_BH: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence in the state's dtype -> (new state, output in the state's dtype)."""
    dtype = S_BHKV.dtype
    q_BHK, k_BHK, v_BHV = q_BHK.to(dtype), k_BHK.to(dtype), v_BHV.to(dtype)
    S_BHKV = g_BH.to(dtype).exp()[..., None, None] * S_BHKV
    # The value the decayed state already returns for k_t; the delta rule replaces it by v_t (by a beta step).
    predicted_BHV = torch.einsum("bhkv,bhk->bhv", S_BHKV, k_BHK)
    delta_BHV = beta_BH.to(dtype)[..., None] * (v_BHV - predicted_BHV)
    S_BHKV = S_BHKV + k_BHK[..., :, None] * delta_BHV[..., None, :]
    return S_BHKV, scale * torch.einsum("bhkv,bhk->bhv", S_BHKV, q_BHK)


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule in PyTorch (differentiable by autograd). Shapes and returns as the public op.

    Derivation, for one head and one chunk of `C` steps starting from state `S0 [K, V]`. Let `G_r` be the cumulative
    log decay from the chunk start up to step `r` (inclusive) and `w_r = beta_r (v_r - S'_r^T k_r)` the delta that
    step `r` writes. Unrolling the recurrence inside the chunk,

        S_r  = exp(G_r) S0 + sum_{s <= r} exp(G_r - G_s) k_s w_s^T
        w_r  = beta_r v_r - beta_r exp(G_r) S0^T k_r - sum_{s < r} beta_r exp(G_r - G_s) (k_r . k_s) w_s

    so with the strictly lower triangular `A[r, s] = beta_r exp(G_r - G_s) (k_r . k_s)` (s < r), the deltas solve
    the unit lower triangular system `(I + A) W = diag(beta) V - diag(beta exp(G)) K S0`, i.e. (WY form)

        W = U - Wk S0,   U = (I + A)^-1 diag(beta) V,   Wk = (I + A)^-1 diag(beta exp(G)) K.

    `U` and `Wk` do not depend on the state, so they are solved for all chunks at once; only the cheap part below
    runs chunk after chunk:

        O    = scale * (diag(exp(G)) Q S0 + (Q K^T * D) W),        D[r, s] = exp(G_r - G_s) for s <= r, else 0
        S_C  = exp(G_C) S0 + (diag(exp(G_C - G)) K)^T W.

    Every exponent is `<= 0`, so nothing overflows however strong the decay. `T` is padded up to a multiple of the
    chunk with `k = v = 0, beta = 0, g = 0`: such a step leaves the state as it is, and its output is dropped.
    """
    dtype = _compute_dtype(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    C = min(CHUNK_SIZE, T)
    N = -(-T // C)
    pad = N * C - T

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, *D] -> [B, H, N, C, *D] in the compute dtype, zero-padded at the end of time.
        x = x.to(dtype).movedim(1, 2)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(B, H, N, C, *x.shape[3:])

    q_c, k_c, v_c = to_chunks(q) * scale, to_chunks(k), to_chunks(v)  # [B, H, N, C, K|V]
    beta_c = to_chunks(beta)  # [B, H, N, C]
    G = to_chunks(g).cumsum(-1)  # [B, H, N, C]

    # D[r, s] = exp(G_r - G_s) on and below the diagonal; the masked entries would be exp(positive), never computed.
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    D = torch.where(causal, G[..., :, None] - G[..., None, :], float("-inf")).exp()  # [B, H, N, C, C]

    # Intra-chunk WY solve, batched over all chunks.
    A = (beta_c[..., :, None] * D * (k_c @ k_c.transpose(-1, -2))).tril(-1)  # [B, H, N, C, C]
    eye = torch.eye(C, dtype=dtype, device=q.device)
    rhs = torch.cat([beta_c[..., None] * v_c, (beta_c * G.exp())[..., None] * k_c], dim=-1)  # [B, H, N, C, V+K]
    solved = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    U, Wk = solved.split([V, K], dim=-1)  # [B, H, N, C, V], [B, H, N, C, K]

    scores = (q_c @ k_c.transpose(-1, -2)) * D  # [B, H, N, C, C] intra-chunk attention with decay
    q_decayed = q_c * G.exp()[..., None]  # [B, H, N, C, K] reads S0
    k_decayed = k_c * (G[..., -1:] - G).exp()[..., None]  # [B, H, N, C, K] writes S_C
    chunk_decay = G[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]

    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for n in range(N):
        W = U[:, :, n] - Wk[:, :, n] @ S  # [B, H, C, V]
        outputs.append(q_decayed[:, :, n] @ S + scores[:, :, n] @ W)  # [B, H, C, V]
        S = chunk_decay[:, :, n] * S + k_decayed[:, :, n].transpose(-1, -2) @ W  # [B, H, K, V]
    o = torch.stack(outputs, dim=2).reshape(B, H, N * C, V)[:, :, :T]  # [B, H, T, V]
    return o.movedim(2, 1).to(v.dtype), (S if output_final_state else None)


def _gated_delta_rule_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla-core's kernels: the fused recurrent one for short inputs that need no gradient (it has no backward)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_fused_recurrent

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state)
    )
    kernel = fla_fused_recurrent if q.shape[1] <= FUSED_RECURRENT_MAX_T and not needs_grad else fla_chunk
    return kernel(
        q=q,
        k=k,
        v=v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )


def allow_fla_gated_backward_on_hopper() -> bool:
    """Let fla's gated chunk backward run on Hopper under Triton < 3.7.1, which fla refuses: a bug in fla's
    Hopper check.

    The guard is fla's own module attribute; this flips it for the process. hlsa's GPU tests
    (tests/model/test_gpu.py, tests/ops/test_gated_delta.py) check the resulting gradients against our reference
    on the H200 with Triton 3.6. Returns whether the guard was active (False without fla, or where it never refuses).
    """
    try:
        import fla.ops.common.chunk_o as chunk_o
    except ImportError:
        return False
    if getattr(chunk_o, "TRITON_ABOVE_3_7_1", True):
        return False
    chunk_o.TRITON_ABOVE_3_7_1 = True
    return True


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    # fp32 at least (the state is fp32, as in fla's kernels); fp64 inputs stay fp64 so tests can use them as truth.
    return torch.promote_types(q.dtype, torch.float32)


def _pick_backend(backend: str | None, q: torch.Tensor) -> str:
    backend = check_backend("chunk_gated_delta_rule", backend, ("fla",))
    if backend == "fla" and q.device.type != "cuda":
        raise ValueError(f"backend='fla' needs CUDA tensors, got {q.device}; use backend='torch' on this device")
    if backend != "auto":
        return backend
    if q.device.type == "cuda" and importlib.util.find_spec("fla") is not None:
        return "fla"
    return "torch"


def _check_tensors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError("q has T = 0 steps; call the op with at least one step")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got shape {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != q.shape[:3]:
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}], got shape {tuple(x.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(
            f"initial_state must be [B, H, K, V] = [{B}, {H}, {K}, {v.shape[-1]}], got {tuple(initial_state.shape)}"
        )
    named = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": initial_state}
    for name, x in named.items():
        if x is not None and not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; move all inputs to one device")
    if not (k.dtype == v.dtype == q.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
