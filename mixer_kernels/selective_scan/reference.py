"""Reference selective scan (Mamba-1) in PyTorch: the step, the sequential spec, and the CPU path.

For batch b, channel d and state index n, with dt = softplus(delta + delta_bias) (each part optional):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        h: (B, D, N), always fp32
    y_t = <h_t, C_t> + D * u_t,   out_t = y_t * silu(z_t)

Layouts follow mamba-ssm's `selective_scan_fn`: u, delta, z (B, D, T); A (D, N); B, C (B, N, T), shared
by all channels; D, delta_bias (D,). Unlike `selective_scan_fn` the scan takes an initial state, so a
prompt can be prefilled in pieces.

- `selective_state_update_ref`: one step (decoding); the spec of everything below;
- `selective_scan_ref`: that step in a loop, autograd through every step (readable, slow);
- `selective_scan`: the CPU path. Same recurrence, but the discretisation is vectorised over time and
  the loop runs in an autograd.Function whose backward is the reverse-time recurrence written out:
  one in-place op per step each way instead of autograd's graph of T small steps.
"""

import torch
import torch.nn.functional as F


def selective_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step. state (B, D, N); x, dt, z (B, D); A (D, N); B, C (B, N); D, dt_bias (D,).

    Returns y (B, D) in x's dtype and the new fp32 state (B, D, N).
    """
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(dt[..., None] * A.float())  # (B, D, N)
    write = (dt * x.float())[..., None] * B.float()[:, None, :]  # (B, D, N)
    state = state.float() * decay + write
    y = (state @ C.float()[..., None]).squeeze(-1)  # (B, D)
    if D is not None:
        y = y + D.float() * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype), state


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec: `selective_state_update_ref` at every step. Shapes as in the module docstring.

    Returns out (B, D, T) in u's dtype and the final fp32 state (B, D, N).
    """
    batch, dim, length = u.shape
    state = initial_state
    if state is None:
        state = u.new_zeros(batch, dim, A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(length):
        y, state = selective_state_update_ref(
            state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D,
            None if z is None else z[..., t], delta_bias, delta_softplus,
        )
        ys.append(y)
    return torch.stack(ys, dim=-1), state.float()


class _LinearScan(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + b_t and y_t = <h_t, c_t>, time-major so every step touches contiguous memory.

    a, b: (T, B, D, N); c: (T, B, N); h0: (B, D, N)  ->  y (T, B, D), h_T (B, D, N); all fp32.
    """

    @staticmethod
    def forward(ctx, a, b, c, h0):
        a, b = a.contiguous(), b.contiguous()
        hs = torch.empty_like(b)  # every h_t: the backward needs h_{t-1}, and y needs all of them
        h = h0
        for t in range(a.shape[0]):
            h = torch.addcmul(b[t], a[t], h, out=hs[t])
        y = (hs @ c[..., None]).squeeze(-1)  # (T, B, D)
        ctx.save_for_backward(a, c, h0, hs)
        return y, hs[-1].clone()

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        a, c, h0, hs = ctx.saved_tensors
        # g_t = dL/dh_t collects the output at t and, through h_{t+1} = a_{t+1} h_t + ..., all later ones.
        g = grad_y[..., None] * c[:, :, None, :]  # (T, B, D, N)
        g[-1] += grad_final
        for t in range(a.shape[0] - 2, -1, -1):
            g[t].addcmul_(a[t + 1], g[t + 1])
        grad_a = torch.empty_like(g)  # dL/da_t = g_t * h_{t-1}
        torch.mul(g[0], h0, out=grad_a[0])
        torch.mul(g[1:], hs[:-1], out=grad_a[1:])
        grad_c = (hs.transpose(-1, -2) @ grad_y[..., None]).squeeze(-1)  # (T, B, N)
        return grad_a, g, grad_c, a[0] * g[0]


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path, equal to `selective_scan_ref`. Returns out (B, D, T) in u's dtype and h_T (B, D, N) fp32.

    Example:
        >>> u, delta, z = (torch.randn(2, 8, 5) for _ in range(3))
        >>> A, B, C = -torch.rand(8, 4), torch.randn(2, 4, 5), torch.randn(2, 4, 5)
        >>> out, h = selective_scan(u, delta, A, B, C, D=torch.ones(8), z=z, delta_softplus=True)
        >>> out.shape, h.shape
        (torch.Size([2, 8, 5]), torch.Size([2, 8, 4]))
    """
    batch, dim, _ = u.shape
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    # Time-major and contiguous, so that every step of the loop reads and writes one contiguous block.
    dt = dt.permute(2, 0, 1).contiguous()  # (T, B, D)
    u32 = u.float()
    decay = torch.exp(dt[..., None] * A.float())  # (T, B, D, N)
    write = (dt * u32.permute(2, 0, 1))[..., None] * B.float().permute(2, 0, 1)[:, :, None, :]  # (T, B, D, N)
    h0 = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state
    h0 = h0.float()
    y, final_state = _LinearScan.apply(decay, write, C.float().permute(2, 0, 1), h0)
    y = y.permute(1, 2, 0)  # (B, D, T)
    if D is not None:
        y = y + D.float()[:, None] * u32
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), final_state
