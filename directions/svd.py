"""Channel-wise SVD of latents (arXiv 2502.02225), reimplemented from the paper's description.

Each channel of a latent [B, C, H, W] is an H x W matrix, x[b, c] = U diag(S) V^T. The paper's
observations: leading singular subspaces change little between nearby steps, scaling one
singular value changes one attribute, and coarse attributes lead at large t.

Attribute transfer (the formulas are unpublished; this is the project's reading, every open
choice an argument): per channel, the edited latent is

    y = rest + sum_{i<k} s_i u_x,i v_x,i^T + sum_{j<m} s'_j u_z,j v_z,j^T,

x the source latent, z the target's, ``rest`` x's components beyond k (kept, or dropped as in the
literal reading), and (s, s') predicted from (S_x, S_z) by a small MLP fitted to this one pair on

    w_target |y - z|^2/|z|^2 + w_source |y - x|^2/|x|^2
    + w_target_values |s' - S_z[:m]|^2/|S_z[:m]|^2 + w_source_values |s - S_x[:k]|^2/|S_x[:k]|^2.

y is linear in (s, s'), so the loss is a small quadratic in them, evaluated without touching the
H x W latents in the loop; the MLP that parameterises them is the paper's choice. The full
reading, losses and quadratic form: docs/math.md, section 'SVD latent attribute'.
"""
import math
from dataclasses import dataclass

import torch

LEARNING_RATE = 1e-2
HIDDEN = 64


def check_latent(latent: torch.Tensor, name: str) -> None:
    """A clear error, naming the input, unless ``latent`` is a non-empty, finite [B, C, H, W] tensor."""
    if latent.ndim != 4:
        raise ValueError(f"{name}: expected a 4-D latent [batch, channels, height, width], got shape "
                         f"{list(latent.shape)}")
    if latent.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty")
    if not torch.isfinite(latent).all():
        raise ValueError(f"{name}: the latent holds NaN or infinite values")


def check_vector_count(latent: torch.Tensor, name: str, count: int) -> None:
    """Each channel has min(H, W) singular vectors; asking for more is an error naming the input."""
    rank = min(latent.shape[-2:])
    if not 0 <= count <= rank:
        raise ValueError(f"{name}: {count} is outside 0 to {rank}, the number of singular vectors of a "
                         f"{latent.shape[-2]} x {latent.shape[-1]} latent channel")


def channel_svd(latent: torch.Tensor):
    """U [B, C, H, r], S [B, C, r], Vh [B, C, r, W] of every channel, in float32 at least."""
    return torch.linalg.svd(latent.to(torch.promote_types(latent.dtype, torch.float32)), full_matrices=False)


def components(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """sum_i s_i u_i v_i^T for every channel: [B, C, H, W]."""
    return (u * s[..., None, :]) @ vh


def scale_singular_value(latent: torch.Tensor, index: int, factor: float, channel: int | None = None) -> torch.Tensor:
    """The latent with singular value ``index`` of one channel (or of all) multiplied by ``factor``.

    Adds (factor - 1) s_i u_i v_i^T, so every other component is untouched and factor 1 returns
    the latent exactly.
    """
    check_latent(latent, "latent")
    rank = min(latent.shape[-2:])
    if not 0 <= index < rank:
        raise ValueError(f"index: {index} is outside 0 to {rank - 1}; a {latent.shape[-2]} x {latent.shape[-1]} "
                         f"latent channel has {rank} singular vectors")
    if channel is not None and not 0 <= channel < latent.shape[1]:
        raise ValueError(f"channel: {channel} is outside 0 to {latent.shape[1] - 1} (or -1 for all channels)")
    u, s, vh = channel_svd(latent)
    part = s[..., index, None, None] * u[..., :, index, None] * vh[..., index, None, :]
    if channel is not None:
        keep = torch.zeros(latent.shape[1], 1, 1, dtype=part.dtype, device=part.device)
        keep[channel] = 1
        part = part * keep
    return latent + ((factor - 1) * part).to(latent.dtype)


def subspace_distance(first: torch.Tensor, second: torch.Tensor, k: int) -> torch.Tensor:
    """Grassmann distance between the leading-k singular subspaces of two latents, per channel [B, C].

    The principal angles between the left subspaces and between the right ones, combined as
    sqrt(sum theta^2) over both sides: 0 for the same rank-k structure, at most pi/2 sqrt(2k).
    """
    u1, _, vh1 = channel_svd(first.double())  # arccos near 1 needs the precision
    u2, _, vh2 = channel_svd(second.double())

    def angles(a, b):
        cosines = torch.linalg.svdvals(a.transpose(-1, -2) @ b).clamp(max=1.0)
        return torch.arccos(cosines)
    left = angles(u1[..., :k], u2[..., :k])
    right = angles(vh1[..., :k, :].transpose(-1, -2), vh2[..., :k, :].transpose(-1, -2))
    return (left.pow(2).sum(-1) + right.pow(2).sum(-1)).sqrt().to(torch.promote_types(first.dtype, torch.float32))


@dataclass(frozen=True)
class AttributeWeights:
    """The four loss weights: target and source closeness, and the two singular-value regularisers."""
    target: float = 1.0
    source: float = 1.0
    target_values: float = 0.1
    source_values: float = 0.1


class SingularValueMLP(torch.nn.Module):
    """Predicts every channel's (s, s') from its (S_x[:k], S_z[:m]) as multiplicative corrections.

    Starts at (S_x[:k], S_z[:m]) (the last layer is zero), and is shared by all channels.
    """

    def __init__(self, width: int, generator: torch.Generator):
        super().__init__()
        # built and drawn on the CPU whatever torch's default device (a seed gives the same MLP everywhere)
        self.layers = torch.nn.Sequential(torch.nn.Linear(width, HIDDEN, device="cpu"), torch.nn.SiLU(),
                                          torch.nn.Linear(HIDDEN, HIDDEN, device="cpu"), torch.nn.SiLU(),
                                          torch.nn.Linear(HIDDEN, width, device="cpu"))
        with torch.no_grad():
            for layer in self.layers[:-1]:
                if isinstance(layer, torch.nn.Linear):
                    bound = layer.in_features ** -0.5
                    draw = torch.rand(layer.weight.shape, generator=generator, device="cpu")
                    layer.weight.copy_(draw * 2 * bound - bound)
                    layer.bias.zero_()
            self.layers[-1].weight.zero_()
            self.layers[-1].bias.zero_()

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        scale = values.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return values * (1 + self.layers(values / scale))


def transfer_attribute(source: torch.Tensor, target: torch.Tensor, k: int, m: int,
                       weights: AttributeWeights = AttributeWeights(), iterations: int = 300, seed: int = 0,
                       keep_rest: bool = True, callback=None) -> torch.Tensor:
    """The edited latent y (see the module docstring) for source x and target z, both [B, C, H, W].

    Deterministic for a seed on a given device; runs on the inputs' device. ``callback(i)`` is
    called after every iteration (progress, cancellation).
    """
    check_latent(source, "source")
    check_latent(target, "target")
    if source.shape != target.shape:
        raise ValueError(f"target: shape {list(target.shape)} differs from the source's {list(source.shape)}; "
                         f"render both at the same size and batch")
    check_vector_count(source, "k", k)
    check_vector_count(source, "m", m)
    if k + m == 0:
        raise ValueError("k, m: both are 0; take at least one singular vector from the source or the target")
    values = (weights.target, weights.source, weights.target_values, weights.source_values)
    if not all(math.isfinite(w) and w >= 0 for w in values) or not any(values):
        raise ValueError(f"loss weights: expected finite values of at least 0, not all 0 (got {values})")
    with torch.inference_mode(False), torch.enable_grad():  # hosts run nodes in inference mode
        return _fit(source, target, k, m, weights, iterations, seed, keep_rest, callback)


def _fit(source, target, k, m, weights, iterations, seed, keep_rest, callback):
    x, z = (t.to(torch.promote_types(t.dtype, torch.float32), copy=True) for t in (source, target))
    ux, sx, vhx = channel_svd(x)
    uz, sz, vhz = channel_svd(z)
    basis_u = torch.cat([ux[..., :k], uz[..., :m]], dim=-1)
    basis_vh = torch.cat([vhx[..., :k, :], vhz[..., :m, :]], dim=-2)
    initial = torch.cat([sx[..., :k], sz[..., :m]], dim=-1)
    rest = x - components(ux[..., :k], sx[..., :k], vhx[..., :k, :]) if keep_rest else torch.zeros_like(x)

    generator = torch.Generator().manual_seed(seed)
    mlp = SingularValueMLP(k + m, generator).to(device=x.device, dtype=x.dtype)
    optimizer = torch.optim.Adam(mlp.parameters(), lr=LEARNING_RATE)

    def edited(values):
        return rest + components(basis_u, values, basis_vh)

    def along_basis(tensor):  # <u_i v_i^T, tensor> for every basis element
        return ((basis_u.mT @ tensor) * basis_vh).sum(-1)

    def relative(a, b):
        return (a - b).pow(2).sum() / b.pow(2).sum().clamp(min=1e-12)

    # y - z = (rest - z) + sum_i c_i u_i v_i^T, so the two closeness terms are, up to a constant,
    # the quadratic c^T G c + 2 c . b with G_ij = (u_i . u_j)(v_i . v_j): no H x W work per iteration.
    to_target = weights.target / z.pow(2).sum().clamp(min=1e-12)
    to_source = weights.source / x.pow(2).sum().clamp(min=1e-12)
    gram = (to_target + to_source) * (basis_u.mT @ basis_u) * (basis_vh @ basis_vh.mT)
    linear = 2 * (to_target * along_basis(rest - z) + to_source * along_basis(rest - x))

    def loss(values):
        total = (values[..., None, :] @ gram @ values[..., :, None]).sum() + (linear * values).sum()
        if m:
            total = total + weights.target_values * relative(values[..., k:], initial[..., k:])
        if k:
            total = total + weights.source_values * relative(values[..., :k], initial[..., :k])
        return total

    for i in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        loss(mlp(initial)).backward()
        optimizer.step()
        if callback is not None:
            callback(i)
    with torch.no_grad():
        return edited(mlp(initial)).to(source.dtype)
