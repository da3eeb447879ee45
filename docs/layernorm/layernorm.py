"""LayerNorm by hand: the forward pass and its backward pass, written out (see README.md).

    python docs/layernorm/layernorm.py   # checks both against PyTorch and torch.autograd.gradcheck
"""

import torch


def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5):
    """y = w * (x - mean) / sqrt(var + eps) + b over the last dimension (biased variance)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    rstd = (var + eps) ** -0.5
    xhat = (x - mean) * rstd
    return w * xhat + b, (xhat, rstd, w)


def backward(dy: torch.Tensor, cache):
    """Gradients of the loss with respect to x, w and b, given dy = dloss/dy."""
    xhat, rstd, w = cache
    rows = tuple(range(dy.dim() - 1))  # every dimension but the normalized one
    db = dy.sum(rows)
    dw = (dy * xhat).sum(rows)
    dxhat = dy * w
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx, dw, db


class LayerNorm(torch.autograd.Function):
    """The hand-written passes as an autograd function, so that gradcheck can test `backward`."""

    @staticmethod
    def forward(ctx, x, w, b, eps=1e-5):
        y, ctx.cache = forward(x, w, b, eps)
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*backward(dy, ctx.cache), None)


if __name__ == "__main__":
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 8, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    dy = torch.randn_like(x)
    y, cache = forward(x, w, b)
    dx, dw, db = backward(dy, cache)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    reference = torch.nn.functional.layer_norm(leaves[0], (16,), leaves[1], leaves[2], eps=1e-5)
    reference.backward(dy)
    for name, ours, theirs in [("y", y, reference), ("dx", dx, leaves[0].grad), ("dw", dw, leaves[1].grad),
                               ("db", db, leaves[2].grad)]:
        print(f"{name}: max |ours - torch| = {(ours - theirs).abs().max().item():.2e}")
    print("gradcheck:", torch.autograd.gradcheck(LayerNorm.apply, [t.clone().requires_grad_() for t in (x, w, b)]))
