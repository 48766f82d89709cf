"""Forget-mult: the QRNN's only sequential computation, and fast paths for it.

The QRNN paper's f-pooling (Bradbury et al., 2016, eq. 4) runs, for every batch row and
hidden unit independently,

    c_t = f_t * c_{t-1} + (1 - f_t) * z_t          (c_{-1} = c0, or 0)

so f close to 1 keeps the old state and f close to 0 takes the new candidate z_t. Careful
when reading pytorch-qrnn: its CUDA kernel uses the flipped convention,
c_t = f_t * z_t + (1 - f_t) * c_{t-1}; the two differ only by f -> 1 - f.

Backward. With g_t = dL/dc_t (the gradient arriving at c_t from outside the recurrence), the
total gradient at c_t is r_t = g_t + f_{t+1} * r_{t+1} (r_{T-1} = g_{T-1}): the same kind of
recurrence, run backwards. Everything else is elementwise given r:

    dz_t = (1 - f_t) * r_t      df_t = (c_{t-1} - z_t) * r_t      dc0 = f_0 * r_0

Public API:
    forget_mult(f, z, c0)                    the recurrence as a custom autograd Function
    forget_mult_reference(f, z, c0)          an obviously-correct Python loop, for tests and
                                             the book
    qrnn_pool(gates, c0, output_gate)        gate nonlinearities + recurrence + output gate, fused
    qrnn_pool_reference(gates, c0, output_gate)  the same from torch ops and the reference loop

Implementations. A naive autograd loop records a few graph nodes per time step and its
backward walks them all; the fast paths instead run the forward as one tight loop into a
preallocated output and the backward as one reverse loop over r. On CPU the default is a
small C++ extension (shaq/nn/csrc/forget_mult.cpp) that runs both loops over all (batch,
hidden) chains in parallel, vectorised over hidden units. It is compiled on first use (once,
then cached by torch in ~/.cache/torch_extensions), not at `pip install`:
building there needs torch inside pip's isolated build environment, where a plain `torch`
build requirement downloads a multi-GB CUDA wheel and may not match the torch that imports
the extension, and Colab's `pip install git+URL` would pay that too. Without a compiler, if
the build fails, with `shaq.nn.switches.use_extension` off (SHAQ_NO_EXT=1), or for tensors
not on the CPU, the same Function runs on torch ops: on the CPU one op per time step,
elsewhere (CUDA, MPS) `linear_scan`, a chunked scan that needs about 2 sqrt(T) steps instead
of T, since there every op is a kernel launch (see `shaq.nn.switches.scan_mode`). The chunked
scan is tested on the CPU against the loop; its speed on a GPU has not been measured yet.

Dtypes: float32 and float64 are computed as given. bf16/fp16 inputs are computed in float32
on every path (a long product of f's in half precision loses the state quickly, and a bf16
sigmoid saturates to exactly 1 from 6.5 on); outputs are cast back to the input dtype,
except qrnn_pool's carried cell, which stays float32.
"""

import math
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from shaq.nn import switches

_CSRC = Path(__file__).parent / "csrc"


@cache
def _load_extension() -> ModuleType | None:
    """Compile (first time only) and import the C++ kernels, or return None if that fails."""
    try:
        from torch.utils.cpp_extension import load

        # -mavx2 lets gcc vectorise 8 floats at a time; only ask for it when torch itself
        # detected AVX2 on this CPU, and keep the two builds apart in the extension cache.
        avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        arch = ["-mavx2", "-mfma"] if avx2 else []
        return load(
            name="shaq_forget_mult" + ("_avx2" if avx2 else ""),
            sources=[str(_CSRC / "forget_mult.cpp")],
            # -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in the headers,
            # so without it the kernels would silently run on one thread.
            extra_cflags=["-O3", "-fno-trapping-math", "-fopenmp", *arch],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # no compiler, no ninja, a build error, a read-only cache, ...
        reason = (str(e).strip().splitlines() or [""])[0][
            :160
        ]  # build errors quote whole command lines
        warnings.warn(
            f"shaq: C++ forget_mult extension unavailable ({type(e).__name__}: {reason}); "
            "using the pure-PyTorch loop",
            RuntimeWarning,
            stacklevel=4,  # point at the caller of forget_mult / qrnn_pool
        )
        return None


def _extension_for(x: Tensor) -> ModuleType | None:
    """The compiled kernels if they apply to tensors like x, else None (use the torch loop)."""
    if not switches.use_extension or x.device.type != "cpu":
        return None
    return _load_extension()


def _chunked(x: Tensor) -> bool:
    """Whether the torch path runs linear_scan's chunked scan (else one op per time step)."""
    mode = switches.scan_mode
    if mode not in ("auto", "steps", "chunked"):
        raise ValueError(
            f"shaq.nn.switches.scan_mode must be 'auto', 'steps' or 'chunked', not {mode!r}"
        )
    return mode == "chunked" or (mode == "auto" and x.device.type != "cpu")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ----------------------------------------------------------------------------------------
# forget_mult


def forget_mult_reference(f: Tensor, z: Tensor, c0: Tensor | None = None) -> Tensor:
    """The recurrence as a plain loop over time, differentiated by autograd.

    Args:
        f: [B, T, H] forget gates (in [0, 1] for a QRNN, though any values work).
        z: [B, T, H] candidates.
        c0: [B, H] initial state, or None for zeros.

    Returns:
        c: [B, T, H], the state after every step.
    """
    c = z.new_zeros(z.shape[0], z.shape[2]) if c0 is None else c0
    cs = []
    # unbind, not f[:, t]: indexing inside autograd records a select node per step whose
    # backward materialises a full [B, T, H] gradient, making the backward O(T^2).
    for f_t, z_t in zip(f.unbind(1), z.unbind(1), strict=True):
        c = f_t * c + (1 - f_t) * z_t
        cs.append(c)
    return torch.stack(cs, dim=1)


def linear_scan(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t over time (h_{-1} = h0), in about 2 * sqrt(T) steps of bulk ops.

    A loop of one op per time step costs T kernel launches (T op dispatches on a CPU), which on
    a GPU costs far more than the arithmetic. Instead, cut time into N chunks of L ~ sqrt(T):

    1. within every chunk at once, run the recurrence from 0 (L steps over all chunks in
       parallel): local_t; and the running products of a inside the chunk: P_t (one cumprod);
    2. carry across chunks (N steps): the state entering chunk n is the state at the end of
       chunk n - 1, i.e. local_end + P_end * entering state of chunk n - 1;
    3. everywhere at once: h_t = local_t + P_t * (state entering t's chunk).

    Only products of a's appear (no division), so f's close to 0 are as safe as in the loop.
    Time is padded at the end with a = 1, b = 0, which leaves earlier steps unchanged.

    Args:
        a, b: [B, T, H] contiguous; h0: [B, H].

    Returns:
        h: [B, T, H].
    """
    B, T, H = b.shape
    if T == 0:
        return b.clone()
    L = math.isqrt(T - 1) + 1  # ceil(sqrt(T))
    N = -(-T // L)
    pad = N * L - T
    if pad:
        a = torch.cat([a, a.new_ones(B, pad, H)], dim=1)
        b = torch.cat([b, b.new_zeros(B, pad, H)], dim=1)
    a, b = a.view(B, N, L, H), b.view(B, N, L, H)
    local = torch.empty_like(b)
    local[:, :, 0] = b[:, :, 0]
    for i in range(1, L):
        torch.addcmul(b[:, :, i], a[:, :, i], local[:, :, i - 1], out=local[:, :, i])
    products = torch.cumprod(a, dim=2)
    entering = torch.empty(B, N, H, dtype=b.dtype, device=b.device)
    entering[:, 0] = h0
    for n in range(1, N):
        torch.addcmul(
            local[:, n - 1, -1], products[:, n - 1, -1], entering[:, n - 1], out=entering[:, n]
        )
    h = local.addcmul_(products, entering.unsqueeze(2))
    return h.view(B, N * L, H)[:, :T]


class _ForgetMult(torch.autograd.Function):
    """forget_mult with hand-written loops; `ext` is the C++ module or None for torch ops.

    Expects contiguous f, z: [B, T, H] and c0: [B, H] of one float dtype (forget_mult ensures it).
    """

    @staticmethod
    def forward(ctx, f: Tensor, z: Tensor, c0: Tensor, ext: ModuleType | None) -> Tensor:
        if ext is not None:
            c = ext.forget_mult_forward(f, z, c0)
        elif _chunked(z):
            c = linear_scan(f, torch.addcmul(z, f, z, value=-1), c0)  # b = (1 - f) * z
        else:
            c = torch.empty_like(z)
            c_prev = c0
            # One fused op per step, written straight into the output:
            # lerp(z, c_prev, f) = z + f * (c_prev - z) = f * c_prev + (1 - f) * z.
            for f_t, z_t, c_t in zip(f.unbind(1), z.unbind(1), c.unbind(1), strict=True):
                torch.lerp(z_t, c_prev, f_t, out=c_t)
                c_prev = c_t
        ctx.save_for_backward(f, z, c0, c)
        ctx.ext = ext
        return c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_c: Tensor) -> tuple[Tensor | None, ...]:
        f, z, c0, c = ctx.saved_tensors
        grad_c = grad_c.contiguous()
        if ctx.ext is not None:
            df, dz, dc0 = ctx.ext.forget_mult_backward(f, z, c0, c, grad_c)
        else:
            # Only r needs the sequential part: r_t = g_t + f_{t+1} * r_{t+1}, r_{T-1} = g_{T-1}.
            if _chunked(grad_c):
                # A linear scan backwards in time: forwards over the flipped sequence with
                # a'_s = f_{T-s} (a'_0 multiplies the zero initial state, so any value does).
                f_next = f.flip(1).roll(1, dims=1)
                r = linear_scan(f_next, grad_c.flip(1), torch.zeros_like(c0)).flip(1)
            else:  # one op per step
                r = torch.empty_like(grad_c)
                rs, gs, fs = r.unbind(1), grad_c.unbind(1), f.unbind(1)
                rs[-1].copy_(gs[-1])
                for t in range(len(rs) - 2, -1, -1):
                    torch.addcmul(gs[t], fs[t + 1], rs[t + 1], out=rs[t])
            dz = torch.addcmul(r, f, r, value=-1)  # (1 - f) * r
            c_prev = torch.cat([c0.unsqueeze(1), c[:, :-1]], dim=1)  # c_{t-1}: [B, T, H]
            df = (c_prev - z).mul_(r)
            dc0 = f[:, 0] * r[:, 0]
        return df, dz, dc0, None


def _check_fz(f: Tensor, z: Tensor, c0: Tensor | None) -> None:
    if f.dim() != 3 or f.shape != z.shape:
        raise ValueError(
            f"f and z must both be [B, T, H], got {tuple(f.shape)} and {tuple(z.shape)}"
        )
    if c0 is not None and c0.shape != (z.shape[0], z.shape[2]):
        raise ValueError(f"c0 must be [B, H] = {(z.shape[0], z.shape[2])}, got {tuple(c0.shape)}")


def forget_mult(f: Tensor, z: Tensor, c0: Tensor | None = None) -> Tensor:
    """c_t = f_t * c_{t-1} + (1 - f_t) * z_t over a whole segment, with a fast backward.

    Args:
        f: [B, T, H] forget gates.
        z: [B, T, H] candidates.
        c0: [B, H] initial state, or None for zeros.

    Returns:
        c: [B, T, H] in the dtype of z (the carried state is c[:, -1]).
    """
    _check_fz(f, z, c0)
    out_dtype, dtype = z.dtype, _compute_dtype(z.dtype)
    f, z = f.to(dtype).contiguous(), z.to(dtype).contiguous()
    c0 = z.new_zeros(z.shape[0], z.shape[2]) if c0 is None else c0.to(dtype).contiguous()
    c = _ForgetMult.apply(f, z, c0, _extension_for(z))
    return c.to(out_dtype)


# ----------------------------------------------------------------------------------------
# qrnn_pool: the QRNN's elementwise work around its matmul, fused


def _split_gates(gates: Tensor, output_gate: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """[B, T, G * H] pre-activations -> z, f, o views of [B, T, H] each (o is None when G = 2)."""
    if output_gate:
        z, f, o = gates.chunk(3, dim=-1)
        return z, f, o
    z, f = gates.chunk(2, dim=-1)
    return z, f, None


def qrnn_pool_reference(
    gates: Tensor, c0: Tensor | None = None, output_gate: bool = True
) -> tuple[Tensor, Tensor]:
    """QRNN fo-pooling from torch ops and forget_mult_reference (see qrnn_pool for the API)."""
    z, f, o = _split_gates(gates, output_gate)
    c = forget_mult_reference(torch.sigmoid(f), torch.tanh(z), c0)
    h = torch.sigmoid(o) * c if o is not None else c
    return h, c[:, -1]


class _QRNNPool(torch.autograd.Function):
    """qrnn_pool through the C++ kernels: one pass over time forward, one backward.

    Expects contiguous gates: [B, T, G * H] and c0: [B, H] of one float dtype.
    """

    @staticmethod
    def forward(
        ctx, gates: Tensor, c0: Tensor, output_gate: bool, ext: ModuleType
    ) -> tuple[Tensor, Tensor]:
        h, c = ext.qrnn_pool_forward(gates, c0, output_gate)
        ctx.save_for_backward(gates, c0, c)
        ctx.output_gate, ctx.ext = output_gate, ext
        # A copy, not a view of c: the caller keeps it across segments while c is freed.
        return h, c[:, -1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h: Tensor, grad_c_last: Tensor) -> tuple[Tensor | None, ...]:
        gates, c0, c = ctx.saved_tensors
        dgates, dc0 = ctx.ext.qrnn_pool_backward(
            gates, c0, c, grad_h.contiguous(), grad_c_last.contiguous(), ctx.output_gate
        )
        return dgates, dc0, None, None


def qrnn_pool(
    gates: Tensor, c0: Tensor | None = None, output_gate: bool = True
) -> tuple[Tensor, Tensor]:
    """A QRNN layer's pooling: gate nonlinearities, the forget-mult and the output gate.

    With z, f, o = gates.chunk(3, dim=-1) (z, f = gates.chunk(2, dim=-1) without the output gate):

        c = forget_mult(sigmoid(f), tanh(z), c0)        h = sigmoid(o) * c   (h = c without o)

    On CPU with the extension this is one fused pass over time forward and one backward (which
    recomputes the gates rather than storing them); otherwise it is the torch ops above around
    the forget_mult Function. The fused exp/tanh are float32 polynomial approximations, within
    a few 1e-7 of torch's.

    Args:
        gates: [B, T, G * H] pre-activations, G = 3 (z, f, o) or 2 (z, f), blocks along the
            last dim.
        c0: [B, H] initial cell, or None for zeros.
        output_gate: whether gates holds o (fo-pooling) or not (f-pooling).

    Returns:
        h: [B, T, H] in gates' dtype, and the final cell c_last: [B, H] (the state to carry) in
        float32 for half-precision gates (float64 stays float64), so that a state carried over
        many segments is not rounded to 8 bits at every segment boundary.
    """
    n_gates = 3 if output_gate else 2
    if gates.dim() != 3 or gates.shape[-1] % n_gates:
        raise ValueError(f"gates must be [B, T, {n_gates} * H], got {tuple(gates.shape)}")
    B, H = gates.shape[0], gates.shape[-1] // n_gates
    if c0 is not None and c0.shape != (B, H):
        raise ValueError(f"c0 must be [B, H] = {(B, H)}, got {tuple(c0.shape)}")
    # Half-precision gates are widened first: bf16 has 8 significant bits, so sigmoid(f) rounds
    # to exactly 1.0 for f >= 6.5, freezing a long-memory cell and zeroing its gradient, which
    # is where the paper's convention (f near 1 keeps the cell) puts long memory.
    out_dtype, dtype = gates.dtype, _compute_dtype(gates.dtype)
    gates = gates.to(dtype)
    c0 = None if c0 is None else c0.to(dtype)
    ext = _extension_for(gates)
    if ext is None:
        z, f, o = _split_gates(gates, output_gate)
        c = forget_mult(torch.sigmoid(f), torch.tanh(z), c0)
        h = torch.sigmoid(o) * c if o is not None else c
        c_last = c[:, -1]
    else:
        gates = gates.contiguous()
        c0 = gates.new_zeros(B, H) if c0 is None else c0.contiguous()
        h, c_last = _QRNNPool.apply(gates, c0, output_gate, ext)
    return h.to(out_dtype), c_last
