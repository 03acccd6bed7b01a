"""L2 prefetches from the decode attention (kernels/l2_prefetch.py, ``TritonOptions.decode_o_prefetch``): what the
attention kernel compiles to with and without them for Hopper and Ada, how a weight is cut into per-program shares,
and (on a Hopper GPU) that the prefetch changes no output bit."""

import math

import pytest
import torch

pytest.importorskip("triton")

from compile_support import run_compile_script  # noqa: E402

from cortexflow.backends.triton_options import TritonOptions  # noqa: E402
from cortexflow.errors import ConfigError  # noqa: E402
from cortexflow.kernels.l2_prefetch import l2_prefetch_supported  # noqa: E402

CUDA = torch.device("cuda")
HOPPER = torch.cuda.is_available() and l2_prefetch_supported(CUDA)

PREFETCH_COMPILE_SCRIPT = r"""
import json, sys, torch
from cortexflow.kernels.attention import attention
from cortexflow.kernels.l2_prefetch import CHUNKS, L2Prefetch
from cortexflow.kernels.runtime import CompileTarget, set_compile_target
from cortexflow.tools.compile_check import compile_only

meta = torch.device("meta")
out = {}
for arch in (89, 90):
    with compile_only(CompileTarget(arch=arch, processors=132)) as launches:
        q = torch.empty(1, 1, 32, 128, dtype=torch.bfloat16, device=meta)
        cache = torch.empty(1, 290, 32, 128, dtype=torch.bfloat16, device=meta)
        mask = torch.empty(1, 1, 290, dtype=torch.bool, device=meta)
        w_o = torch.empty(4096, 4096, dtype=torch.bfloat16, device=meta)
        attention(q, cache, cache, mask, 0.088, pdl=arch >= 90)
        attention(q, cache, cache, mask, 0.088, pdl=arch >= 90, l2_prefetch=w_o, l2_prefetch_fraction=0.5)
        shares = {name: (None if p is None else p.share) for name, p in {
            "all": L2Prefetch.of(w_o, 160), "half": L2Prefetch.of(w_o, 160, 0.5), "none": L2Prefetch.of(w_o, 160, 0.0),
            "tiny": L2Prefetch.of(torch.empty(64, 64, device=meta), 160),
            "strided": L2Prefetch.of(w_o.t(), 160)}.items()}
    out[arch] = {"launches": [{"name": l.name, "grid": list(l.grid), "prefetch": l.constexprs.get("PREFETCH"),
                               "ptx_prefetch": "cp.async.bulk.prefetch.L2.global" in l.kernel.asm["ptx"]}
                              for l in launches], "shares": shares, "chunks": CHUNKS}
json.dump(out, sys.stdout)
"""


def test_decode_attention_compiles_l2_prefetches_for_hopper_only(tmp_path):
    """OpenVLA's decode attention (32 heads, 290 keys) compiled for sm_90 and sm_89 without and with half of the
    o-projection weight (4096 x 4096 bf16) to prefetch: on Hopper the second launch carries the bulk prefetch in its
    PTX, each of its programs asking for an equal, 2 KiB-aligned share (half of 32 MiB over the grid's programs); on
    Ada (no bulk prefetch) nothing changes. Tensors too small for a share or not contiguous get no prefetch."""
    report = run_compile_script(PREFETCH_COMPILE_SCRIPT, tmp_path)
    for arch, report_arch in report.items():
        launches = [launch for launch in report_arch["launches"] if launch["name"] == "_attention_kernel"]
        assert len(launches) == 2 and launches[0]["grid"] == launches[1]["grid"]
        programs = math.prod(launches[0]["grid"])
        assert not launches[0]["prefetch"] and not launches[0]["ptx_prefetch"]
        shares = report_arch["shares"]
        step = report_arch["chunks"] * 16
        if arch == "90":
            assert launches[1]["prefetch"] and launches[1]["ptx_prefetch"]
            assert shares["all"] == (4096 * 4096 * 2 // 160) // step * step and shares["all"] % step == 0
            assert shares["half"] == (4096 * 4096 // 160) // step * step and 160 * shares["all"] <= 4096 * 4096 * 2
            assert programs > 1
        else:
            assert not launches[1]["prefetch"] and not launches[1]["ptx_prefetch"] and shares["all"] is None
        assert shares["none"] is None and shares["tiny"] is None and shares["strided"] is None


def test_o_prefetch_option_takes_its_choices_only():
    assert TritonOptions().decode_o_prefetch == "off"
    assert TritonOptions.parse("decode_o_prefetch=half").decode_o_prefetch == "half"
    with pytest.raises(ConfigError, match="decode_o_prefetch must be"):
        TritonOptions.parse("decode_o_prefetch=0.5")


@pytest.mark.skipif(not HOPPER, reason="bulk L2 prefetches need a CUDA GPU of compute capability >= 9.0 (Hopper); "
                                       "this machine has none")
def test_prefetch_changes_no_output_bit_on_hopper():
    """The decode attention with PDL, with and without the whole o weight prefetched: the same bits."""
    from cortexflow.kernels.attention import attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 1, 32, 128, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(1, 290, 32, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
    mask = torch.rand(1, 1, 290, device="cuda", generator=g) < 0.9
    w_o = torch.randn(4096, 4096, device="cuda", generator=g).bfloat16()
    plain = attention(q, k, v, mask, 0.088, pdl=True)
    fetched = attention(q, k, v, mask, 0.088, pdl=True, l2_prefetch=w_o)
    assert torch.equal(plain, fetched) and plain.float().abs().mean() > 1e-3
