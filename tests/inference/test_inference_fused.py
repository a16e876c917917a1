"""The two-segment GEMM of a bottleneck's tail (conv3 + downsample, bnlab.inference._fused).

Tolerance: float32 kernel vs float64 reference within 1e-5·sqrt(K1 + K2) absolute plus 1e-5
relative (sums of K products of standard normals), as for the one-segment GEMM.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnlab.inference import _act as A
from bnlab.inference import _fused as F
from bnlab.inference import _gemm as G


@pytest.mark.parametrize(
    ("m", "k1", "k2", "n"),
    [
        (1, 5, 3, 32),  # a single, partial row block
        (13, 64, 64, 256),  # layer1's shape, small: 2 full blocks and a partial one
        (50, 512, 1030, 96),  # K2 > 512: three K blocks in the second segment
        (140, 7, 600, 64),  # more rows than one L2 chunk
        (9, 40, 24, 72),  # a masked last panel (72 = 2·32 + 8)
    ],
)
@pytest.mark.parametrize("threads", [1, 3])
def test_two_segment_gemm_matches_reference(rng, m, k1, k2, n, threads):
    a = rng.standard_normal((m, k1)).astype(np.float32)
    a2 = rng.standard_normal((m, k2)).astype(np.float32)
    w = rng.standard_normal((k1, n)).astype(np.float32)
    w2 = rng.standard_normal((k2, n)).astype(np.float32)
    shift = rng.standard_normal(n).astype(np.float32)
    for act in (A.RELU, A.IDENTITY, (A.SILU, 0.0, 0.0)):
        c = np.full((m, n), np.nan, np.float32)  # every entry must be written
        items = G.work_items(m, n, k1 + k2, threads)
        if threads > 1:  # each row block on its own, too: every split path
            items = [(b, b + 1, 0, -(-n // G.NR)) for b in range(-(-m // G.MR))]
        for item in items:
            F.gemm2_tile_range(
                a, G.pack_panels(w), a2, G.pack_panels(w2), c, *item, shift, *A.as_params(act)
            )
        ref = F.gemm2_reference(a, w, a2, w2, shift, act)
        np.testing.assert_allclose(c, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k1 + k2))


def test_engine_fuses_every_downsample_when_folded(rng):
    """The four downsample blocks of ResNet-50 run as fused tails when BN is folded, and as
    separate convs (BN kept as scale + shift) when it is not; the logits agree."""
    pytest.importorskip("torch")
    from torch_resnet import randomized_resnet50

    import bnlab.inference

    sd = {k: v.numpy().copy() for k, v in randomized_resnet50(seed=2).state_dict().items()}
    x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    folded = bnlab.inference.compile(sd, threads=1)
    kept = bnlab.inference.compile(sd, fold_bn=False, threads=1)
    out, ref = folded(x), kept(x)
    assert folded._plans[(0, 1, 64, 64)].labels.count("fused_tail 1x1") == 4
    assert "fused_tail 1x1" not in kept._plans[(0, 1, 64, 64)].labels
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
