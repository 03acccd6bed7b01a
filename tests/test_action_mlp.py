"""Pi0's fused action MLP kernel (kernels/action_mlp.py) against its PyTorch reference (CPU: Triton interpreter)."""

import pytest
import torch

from cortexflow.kernels.action_mlp import action_mlp, action_mlp_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, h, a, d, seed):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(DEVICE)  # noqa: E731
    return t(b, h, a), t(d, a, s=a**-0.5), t(d, s=0.5), t(d, d, s=d**-0.5), t(d, s=0.5)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, h, a, d", [(1, 5, 7, 100), (2, 19, 32, 64)])
def test_action_mlp_writes_the_reference_rows_only(out_dtype, b, h, a, d):
    """Odd sizes (action dim 7 padded to 16, width 100 not a tile multiple, 19 tokens a batch entry across
    row tiles); the tokens land at rows 1..H of each batch entry and row 0 (the state token) is untouched."""
    x_t, w_in, b_in, w_out, b_out = _inputs(b, h, a, d, seed=h)
    out = torch.full((b, h + 1, d), 7.0, dtype=out_dtype, device=DEVICE)
    action_mlp(x_t, w_in, b_in, w_out, b_out, out, row_offset=1)
    reference = action_mlp_reference(x_t, w_in, b_in, w_out, b_out)
    got = out[:, 1:].float()
    rel = ((got - reference).norm() / reference.norm()).item()
    bound = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    assert rel <= bound, f"‖Δ‖/‖ref‖ {rel:.2e} > {bound:.0e}"
    assert (got - reference).abs().max().item() <= 4 * bound * (reference.abs().max().item() + 1)
    assert torch.equal(out[:, 0].float(), torch.full((b, d), 7.0, device=DEVICE))


def test_action_mlp_refuses_what_does_not_fit():
    x_t, w_in, b_in, w_out, b_out = _inputs(1, 5, 7, 64, seed=0)
    out = torch.zeros(1, 6, 64, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        action_mlp(x_t, w_in[:, :6], b_in, w_out, b_out, out)
    with pytest.raises(ValueError, match="cannot take rows 1..5"):
        action_mlp(x_t, w_in, b_in, w_out, b_out, out[:, :5])
    with pytest.raises(ValueError, match="contiguous fp32"):
        action_mlp(x_t, w_in, b_in, w_out.half(), b_out, out)
