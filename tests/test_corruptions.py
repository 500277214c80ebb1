"""Tests of the Models Genesis corruptions (pretraining/corruptions.py)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, HealthCheck, strategies as st

from nnunet_sar.pretraining.corruptions import (
    GenesisFlip,
    ImagePainting,
    LocalPixelShuffling,
    NonLinearIntensity,
    corrupt,
    genesis_corruptions,
    marking,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster and steadier on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _apply(t, x):
    """Draw parameters, apply, return (output image, parameters)."""
    params = t.get_parameters(image=x)
    return t.apply({"image": x}, **params)["image"], params


def _no_noise_values(shape):
    """Unique values in [0, 0.5) that torch.rand (multiples of 2**-24) can never produce."""
    n = math.prod(shape)
    step = (2 ** 23) // n
    assert step >= 1
    k = torch.arange(n, dtype=torch.float64) * step + 0.5
    return (k * 2.0 ** -24).float().view(shape)


def _box_mask(shape, boxes):
    m = torch.zeros(shape, dtype=torch.bool)
    for box in boxes:
        m[tuple(slice(a, b) for a, b in box)] = True
    return m


# ---------------------------------------------------------------------------------------------
# local pixel shuffling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 30, 20), (64, 64, 32), (23, 11, 9)])
def test_shuffle_is_local_permutation(shape):
    t = LocalPixelShuffling(p=1.0)
    n = math.prod(shape)
    x = torch.arange(n, dtype=torch.float32).view((1,) + shape)
    grids = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
    moved_fracs = []
    for seed in range(25 if n < 50000 else 8):
        torch.manual_seed(seed)
        out, p = _apply(t, x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.equal(torch.sort(out.flatten()).values, x.flatten())  # exact permutation
        box, off, nbox = p["box_size"], p["offset"], p["n_boxes"]
        src = torch.unravel_index(out[0].long().flatten(), shape)  # where each value came from
        inside = torch.ones(shape, dtype=torch.bool)
        for d, s in enumerate(shape):
            assert 1 <= box[d] <= max(1, s // 10)
            assert 0 <= off[d] < box[d]
            dst_c, src_c = grids[d], src[d].view(shape)
            assert int((dst_c - src_c).abs().max()) < box[d]
            # every voxel stays in its own box of the grid
            in_d = (dst_c >= off[d]) & (dst_c < off[d] + nbox[d] * box[d])
            inside &= in_d
            assert torch.equal(torch.div(dst_c - off[d], box[d], rounding_mode="floor")[in_d],
                               torch.div(src_c - off[d], box[d], rounding_mode="floor")[in_d])
        # voxels outside the tiled region do not move
        assert torch.equal(out[0][~inside], x[0][~inside])
        if math.prod(box) >= 8 and inside.any():
            moved_fracs.append(float((out[0] != x[0])[inside].float().mean()))
    if math.prod(max(1, s // 10) for s in shape) >= 8:
        assert moved_fracs and min(moved_fracs) > 0.5


def test_shuffle_same_permutation_for_all_channels_and_coverage():
    shape = (64, 64, 32)
    n = math.prod(shape)
    x = torch.stack([torch.arange(n), torch.arange(n) + n]).float().view((2,) + shape)
    t = LocalPixelShuffling(p=1.0)
    cover, moved = [], []
    for seed in range(40):
        torch.manual_seed(seed)
        out, p = _apply(t, x)
        assert torch.equal(out[1] - out[0], torch.full(shape, float(n)))
        cover.append(math.prod(nb * b for nb, b in zip(p["n_boxes"], p["box_size"])) / n)
        moved.append(float((out != x).float().mean()))
    assert np.mean(cover) > 0.8  # most of the cube, like the reference's overlapping boxes
    assert np.mean(moved) > 0.6


def test_shuffle_p0_is_identity():
    x = torch.rand(1, 32, 32, 32)
    for seed in range(10):
        torch.manual_seed(seed)
        out, p = _apply(LocalPixelShuffling(p=0.0), x)
        assert torch.equal(out, x) and not p["apply"]


# ---------------------------------------------------------------------------------------------
# non-linear intensity
# ---------------------------------------------------------------------------------------------
def test_nonlinear_monotone_endpoints_and_both_directions():
    t = NonLinearIntensity(p=1.0)
    ramp = torch.linspace(0, 1, 2001).view(1, 2001, 1, 1)
    directions = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out, p = _apply(t, ramp)
        y = out.flatten()
        assert out.shape == ramp.shape and out.dtype == torch.float32
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        d = torch.diff(y)
        if p["invert"]:
            assert bool((d <= 0).all())
            assert float(y[0]) == 1.0 and float(y[-1]) == 0.0
        else:
            assert bool((d >= 0).all())
            assert float(y[0]) == 0.0 and float(y[-1]) == 1.0
        directions.add(p["invert"])
        # agrees with np.interp on the sorted Bezier samples (the reference's application)
        xs, ys = t.curve(p["control_points"], p["invert"])
        ref = np.interp(ramp.flatten().double().numpy(), xs, ys)
        err = np.abs(y.double().numpy() - ref)
        assert err.mean() < 2e-3 and err.max() < 0.05
    assert directions == {True, False}


def test_nonlinear_is_not_identity_and_clips():
    torch.manual_seed(0)
    x = torch.rand(1, 16, 16, 16)
    out, _ = _apply(NonLinearIntensity(p=1.0), x)
    assert not torch.allclose(out, x, atol=1e-3)
    wild = torch.linspace(-2, 3, 500).view(1, 500, 1, 1)
    out, _ = _apply(NonLinearIntensity(p=1.0), wild)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


# ---------------------------------------------------------------------------------------------
# painting
# ---------------------------------------------------------------------------------------------
SHAPE = (48, 40, 32)


def test_outpainting_windows():
    t = ImagePainting(p=1.0, inpaint_share=0.0)
    x = _no_noise_values((1,) + SHAPE)
    n_windows = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out, p = _apply(t, x)
        assert p["mode"] == "out" and 1 <= len(p["boxes"]) <= 5
        n_windows.add(len(p["boxes"]))
        kept = (out == x)[0]
        assert torch.equal(kept, _box_mask(SHAPE, p["boxes"]))  # kept voxels == union of windows
        for box in p["boxes"]:
            for (a, b), s in zip(box, SHAPE):
                assert math.ceil(3 * s / 7) <= b - a <= math.ceil(4 * s / 7)
                assert a >= 3 and b <= s - 3
        # the kept region's bounding box respects the margin too, independent of params
        idx = kept.nonzero()
        assert int(idx.min()) >= 3 and all(int(idx[:, d].max()) < s - 3 for d, s in enumerate(SHAPE))
        noise = out[0][~kept]
        assert noise.numel() > 0.2 * kept.numel() / 5
        assert float(noise.min()) >= 0 and float(noise.max()) < 1
        assert abs(float(noise.mean()) - 0.5) < 0.02  # uniform noise
    assert len(n_windows) > 1


def test_inpainting_boxes():
    t = ImagePainting(p=1.0, inpaint_share=1.0)
    x = _no_noise_values((1,) + SHAPE)
    counts = []
    for seed in range(40):
        torch.manual_seed(seed)
        out, p = _apply(t, x)
        assert p["mode"] == "in" and len(p["boxes"]) <= 5
        counts.append(len(p["boxes"]))
        changed = (out != x)[0]
        assert torch.equal(changed, _box_mask(SHAPE, p["boxes"]))
        for box in p["boxes"]:
            for (a, b), s in zip(box, SHAPE):
                assert s // 6 <= b - a <= s // 3
                assert a >= 3 and b <= s - 3
        if changed.any():
            assert float(out[0][changed].min()) >= 0 and float(out[0][changed].max()) < 1
    assert max(counts) >= 3


def test_painting_does_not_modify_input_in_place():
    x = torch.rand(1, 24, 24, 24)
    x0 = x.clone()
    for share in (0.0, 1.0):
        torch.manual_seed(1)
        _apply(ImagePainting(p=1.0, inpaint_share=share), x)
        assert torch.equal(x, x0)


def test_painting_and_inversion_say_what_they_did():
    """ImagePainting marks exactly the voxels its noise replaced (in- and out-painting; none when it does not
    apply), NonLinearIntensity whether it inverted the cube: the transfer check splits its figures by them.
    Painting marks only when asked (``marking``: the validation cubes), with the same draws."""
    x = _no_noise_values((1,) + SHAPE)
    for share in (0.0, 1.0):
        for seed in range(8):
            torch.manual_seed(seed)
            t = ImagePainting(p=1.0, inpaint_share=share, mark=True)
            out = t.apply({"image": x.clone()}, **t.get_parameters(image=x))
            assert out["painted"].dtype == torch.bool
            assert torch.equal(out["painted"], out["image"] != x)  # in-painting may draw no box at all
            assert share == 1.0 or out["painted"][:, :3].all()  # out-painting always replaces the margin
    plain = genesis_corruptions(paint_p=1)
    marked = marking(plain)
    for seed in range(4):
        torch.manual_seed(seed)
        a = plain(image=x.clone(), regression_target=x)
        torch.manual_seed(seed)
        b = marked(image=x.clone(), regression_target=x)
        assert "painted" not in a and torch.equal(a["image"], b["image"])  # the same cube, marked
        assert b["painted"].shape == x.shape and b["painted"].any()  # these seeds paint every cube
    assert marking(None) is None and not plain.transforms[-1].mark  # a copy: the training pipeline unmarked
    skipped = ImagePainting(p=0.0, mark=True)
    assert not skipped.apply({"image": x.clone()}, **skipped.get_parameters(image=x))["painted"].any()
    inverted = set()
    for seed in range(12):
        torch.manual_seed(seed)
        t = NonLinearIntensity(p=1.0)
        params = t.get_parameters(image=x)
        out = t.apply({"image": x.clone()}, **params)
        r = float(torch.corrcoef(torch.stack([x.flatten(), out["image"].flatten()]))[0, 1])
        assert bool(out["inverted"]) == params["invert"] == (r < 0), r
        inverted.add(params["invert"])
    assert inverted == {True, False}
    off = NonLinearIntensity(p=0.0)
    assert not off.apply({"image": x.clone()}, **off.get_parameters(image=x))["inverted"]
    for invert_p in (0.0, 1.0):  # --corruption invert_p=P reaches the map
        pipeline = genesis_corruptions(flip_p=0, shuffle_p=0, nonlinear_p=1, paint_p=0, invert_p=invert_p)
        assert {bool(pipeline(image=x.clone())["inverted"]) for _ in range(6)} == {bool(invert_p)}


# ---------------------------------------------------------------------------------------------
# flips and the pipeline
# ---------------------------------------------------------------------------------------------
def _flips_of(x):
    nd = x.ndim - 1
    outs = []
    for m in range(2 ** nd):
        axes = [d + 1 for d in range(nd) if m >> d & 1]
        outs.append(torch.flip(x, axes) if axes else x)
    return outs


def test_flips_apply_to_image_and_target():
    x = torch.arange(6 * 5 * 4, dtype=torch.float32).view(1, 6, 5, 4) / 120
    tr = genesis_corruptions(flip_p=1.0, shuffle_p=0, nonlinear_p=0, paint_p=0)
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        inp, tgt = corrupt(x, tr)
        assert torch.equal(inp, tgt)
        k = [i for i, f in enumerate(_flips_of(x)) if torch.equal(f, tgt)]
        assert len(k) == 1
        seen.add(k[0])
    assert len(seen) >= 4  # several different net flips occur
    # params: 3 attempts at p=1, net axes = axes flipped an odd number of times
    torch.manual_seed(0)
    p = GenesisFlip(p=1.0).get_parameters(image=x)
    assert p["n_flips"] == 3 and set(p["axes"]) <= {0, 1, 2}


def test_all_p_zero_is_identity():
    x = torch.rand(1, 20, 20, 20)
    tr = genesis_corruptions(flip_p=0, shuffle_p=0, nonlinear_p=0, paint_p=0)
    inp, tgt = corrupt(x, tr)
    assert torch.equal(inp, x) and torch.equal(tgt, x)
    assert inp.data_ptr() != x.data_ptr() and tgt.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_non_flip_corruptions_never_touch_target(share):
    x = torch.rand(1, 32, 32, 16)
    x0 = x.clone()
    tr = genesis_corruptions(flip_p=0, shuffle_p=1, nonlinear_p=1, paint_p=1, inpaint_share=share)
    for seed in range(5):
        torch.manual_seed(seed)
        inp, tgt = corrupt(x, tr)
        assert torch.equal(tgt, x0) and torch.equal(x, x0)
        assert not torch.equal(inp, tgt)
    # with flips on, the target is a flip of the clean cube, never corrupted otherwise
    tr = genesis_corruptions(flip_p=1, shuffle_p=1, nonlinear_p=1, paint_p=1, inpaint_share=share)
    for seed in range(5):
        torch.manual_seed(seed)
        inp, tgt = corrupt(x, tr)
        assert any(torch.equal(f, tgt) for f in _flips_of(x0))


def test_defaults_shapes_dtype_range():
    tr = genesis_corruptions()
    for seed in range(20):
        torch.manual_seed(seed)
        x = torch.rand(1, 64, 64, 32)
        inp, tgt = corrupt(x, tr)
        for t in (inp, tgt):
            assert t.shape == x.shape and t.dtype == torch.float32
            assert float(t.min()) >= 0 and float(t.max()) <= 1
        assert torch.equal(torch.sort(tgt.flatten()).values, torch.sort(x.flatten()).values)


def test_transform_batch():
    """The device path of --transform-on: each cube under its own seed, reproducible from the seeds alone."""
    from nnunet_sar.pretraining.cubes import transform_batch
    one = torch.rand(1, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    batch = {"image": one.unsqueeze(0).repeat(6, 1, 1, 1, 1)}
    batch["target"] = batch["image"].clone()
    tr = genesis_corruptions(flip_p=0, shuffle_p=1, nonlinear_p=1, paint_p=1)
    out = transform_batch(tr, batch, seeds=range(6))
    inp, tgt = out["image"], out["target"]
    assert inp.shape == batch["image"].shape == tgt.shape and inp.dtype == batch["image"].dtype
    assert torch.equal(tgt, batch["image"])
    # per-cube seeds: identical clean cubes get different corruptions
    assert len({inp[i].sum().item() for i in range(6)}) == 6
    # the same seeds give the same cubes, whatever the global RNG did in between
    torch.manual_seed(3)
    again = transform_batch(tr, batch, seeds=range(6))
    assert torch.equal(again["image"], inp) and torch.equal(again["target"], tgt)
    assert not torch.equal(transform_batch(tr, batch, seeds=range(6, 12))["image"], inp)


def test_probabilities_of_each_step():
    n = 400
    x = torch.rand(1, 64, 64, 32)
    flip, shuffle, nonlin, paint = genesis_corruptions().transforms
    torch.manual_seed(0)
    fp = [flip.get_parameters(image=x) for _ in range(n)]
    sp = [shuffle.get_parameters(image=x)["apply"] for _ in range(n)]
    npar = [nonlin.get_parameters(image=x) for _ in range(n)]
    pp = [paint.get_parameters(image=x) for _ in range(n)]

    def close(freq, p):  # 4 binomial standard deviations
        assert abs(freq - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (freq, p)

    close(np.mean([q["n_flips"] >= 1 for q in fp]), 0.4)
    close(np.mean([q["n_flips"] >= 2 for q in fp]), 0.16)
    close(np.mean(sp), 0.5)
    close(np.mean([q["apply"] for q in npar]), 0.9)
    close(np.mean([q["invert"] for q in npar if q["apply"]]), 0.5)
    close(np.mean([q["apply"] and q["mode"] == "in" for q in pp]), 0.9 * 0.2)
    close(np.mean([q["apply"] and q["mode"] == "out" for q in pp]), 0.9 * 0.8)
    outs = [len(q["boxes"]) for q in pp if q["apply"] and q["mode"] == "out"]
    close(np.mean([k == 5 for k in outs]), 0.95 ** 4)


def test_observed_frequencies_through_corrupt():
    """Frequencies seen in the outputs, one corruption switched on at a time."""
    n = 400
    x = torch.rand(1, 32, 32, 16)
    torch.manual_seed(0)
    # non-linear: output differs from the target
    tr = genesis_corruptions(flip_p=0, shuffle_p=0, nonlinear_p=0.9, paint_p=0)
    f = np.mean([not torch.equal(*corrupt(x, tr)) for _ in range(n)])
    assert abs(f - 0.9) < 4 * math.sqrt(0.09 / n)
    # painting: out-painting changes > 30 % of voxels, in-painting < 20 %
    tr = genesis_corruptions(flip_p=0, shuffle_p=0, nonlinear_p=0, paint_p=0.9)
    fr = []
    for _ in range(n):
        inp, tgt = corrupt(x, tr)
        fr.append(float((inp != tgt).float().mean()))
    fr = np.array(fr)
    assert abs(np.mean(fr > 0.3) - 0.72) < 4 * math.sqrt(0.72 * 0.28 / n)
    assert abs(np.mean((fr > 0) & (fr < 0.2)) - 0.18 * 0.95) < 4 * math.sqrt(0.18 * 0.82 / n)
    # flips: target differs from the clean cube
    tr = genesis_corruptions(flip_p=0.4, shuffle_p=0, nonlinear_p=0, paint_p=0)
    fl = np.mean([not torch.equal(corrupt(x, tr)[1], x) for _ in range(n)])
    # net flip unless no attempt succeeds or exactly 2 succeed on the same axis (prob 1/3):
    # 0.4 - 0.4 ** 2 * 0.6 / 3 = 0.368
    assert abs(fl - 0.368) < 4 * math.sqrt(0.368 * 0.632 / n)


# ---------------------------------------------------------------------------------------------
# property tests
# ---------------------------------------------------------------------------------------------
side = st.integers(min_value=8, max_value=40)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.tuples(st.integers(1, 2), side, side, side),
       dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2 ** 31 - 1),
       share=st.sampled_from([0.0, 0.2, 1.0]))
def test_property_any_shape_in_range(shape, dtype, seed, share):
    torch.manual_seed(seed)
    x = torch.rand(shape).to(dtype)
    tr = genesis_corruptions(flip_p=0.5, shuffle_p=1, nonlinear_p=1, paint_p=1, inpaint_share=share)
    inp, tgt = corrupt(x, tr)
    for t in (inp, tgt):
        assert t.shape == x.shape and t.dtype == dtype
        assert bool(torch.isfinite(t).all())
        assert float(t.min()) >= 0 and float(t.max()) <= 1


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(side, side, side), seed=st.integers(0, 2 ** 31 - 1))
def test_property_shuffle_keeps_values(shape, seed):
    torch.manual_seed(seed)
    x = torch.rand((1,) + shape)
    out, p = _apply(LocalPixelShuffling(p=1.0), x)
    assert torch.equal(torch.sort(out.flatten()).values, torch.sort(x.flatten()).values)
    assert all(1 <= b <= max(1, s // 10) for b, s in zip(p["box_size"], shape))


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(side, side, side), seed=st.integers(0, 2 ** 31 - 1),
       share=st.sampled_from([0.0, 1.0]))
def test_property_painting_boxes_inside(shape, seed, share):
    torch.manual_seed(seed)
    x = torch.rand((1,) + shape)
    out, p = _apply(ImagePainting(p=1.0, inpaint_share=share), x)
    assert out.shape == x.shape
    for box in p["boxes"]:
        for (a, b), s in zip(box, shape):
            assert 0 <= a < b <= s
            if share == 1.0:
                assert max(1, s // 6) <= b - a <= max(1, s // 3)
            else:
                assert math.ceil(3 * s / 7) <= b - a <= math.ceil(4 * s / 7)
            if s >= 20:
                assert a >= 3 and b <= s - 3


def test_cpu_painting_noise_is_uniform_and_follows_torch_seed():
    from nnunet_sar.pretraining.corruptions import uniform_noise
    torch.manual_seed(3)
    a = uniform_noise((2, 40, 40, 40), "cpu")
    torch.manual_seed(3)
    b = uniform_noise((2, 40, 40, 40), "cpu")
    c = uniform_noise((2, 40, 40, 40), "cpu")
    assert a.shape == (2, 40, 40, 40) and a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(b, c)
    assert 0 <= float(a.min()) and float(a.max()) < 1
    counts = torch.histc(a, bins=10, min=0, max=1)  # 128,000 values: each tenth within 3 % of 12,800
    assert (counts - a.numel() / 10).abs().max() < 0.03 * a.numel() / 10
