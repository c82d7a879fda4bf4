"""Channel-wise traces against exact Hessians of tiny models."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cwhawq.graph import canonicalize
from cwhawq.hessian import channel_traces, non_piecewise_linear_ops, analyze
from cwhawq.errors import CwhawqError


def exact_block_traces(qm, x, y):
    """Per-channel traces of the exact loss Hessian w.r.t. each layer's weight and input."""
    weights, acts = {}, {}
    inputs = {}

    def capture(name):
        def hook(inp):
            inputs[name] = inp.detach()
            return inp
        return hook

    for n, q in qm.qlayers.items():
        q.act = capture(n)
    with torch.no_grad():
        qm(x)
    qm.reset()
    for n, q in qm.qlayers.items():
        w0 = q.weight.detach().clone()

        def loss_w(w, q=q):
            q.wq = lambda _w, w=w: w
            try:
                return F.cross_entropy(qm(x), y)
            finally:
                q.wq = None
        H = torch.autograd.functional.hessian(loss_w, w0, vectorize=True).reshape(w0.numel(), w0.numel())
        d = torch.diagonal(H).reshape(w0.shape[0], -1).sum(1)
        weights[n] = d.numpy()

        x0 = inputs[n]

        def loss_a(e, q=q):
            q.act = lambda inp, e=e: inp + e
            try:
                return F.cross_entropy(qm(x), y)
            finally:
                q.act = None
        Ha = torch.autograd.functional.hessian(loss_a, torch.zeros_like(x0), vectorize=True).reshape(x0.numel(), x0.numel())
        da = torch.diagonal(Ha).reshape(x0.shape)
        acts[n] = da.transpose(0, 1).reshape(x0.shape[1], -1).sum(1).numpy()
    return weights, acts


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_q(tiny):
    m, x, y = tiny
    qm = canonicalize(m, (2, 5, 5))
    return qm, x, y


_EXACT = {}


def exact_cached(qm, x, y):
    """Exact traces of the tiny model (the same seeded model and batch in every test): computed once."""
    key = (tuple(qm.names), float(x.sum()), int(y.sum()))
    if key not in _EXACT:
        _EXACT[key] = exact_block_traces(qm, x, y)
    return _EXACT[key]


def test_exact_scheme_matches_full_hessian(tiny_q):
    qm, x, y = tiny_q
    ew, ea = exact_cached(qm, x, y)
    r = channel_traces(qm, [(x, y)], scheme="exact")
    for n in qm.names:
        np.testing.assert_allclose(r.weight_trace[n], ew[n], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r.act_trace[n], ea[n], rtol=1e-4, atol=1e-6)
        # channel traces summed over a layer agree with the layer trace
        assert abs(r.weight_trace[n].sum() - ew[n].sum()) <= 1e-4 * abs(ew[n].sum()) + 1e-6


@pytest.mark.parametrize("scheme", ["layer", "network", "interleave:2", "ggn"])
def test_hutchinson_unbiased_with_honest_stderr(tiny_q, scheme):
    qm, x, y = tiny_q
    ew, ea = exact_cached(qm, x, y)
    r = channel_traces(qm, [(x, y)], scheme=scheme, max_probes=250, tol=0.0, seed=1)
    z = []
    for n in qm.names:
        for est, se, ex in ((r.weight_trace[n], r.weight_stderr[n], ew[n]), (r.act_trace[n], r.act_stderr[n], ea[n])):
            ok = se > 0
            z.extend(np.abs(est[ok] - ex[ok]) / se[ok])
            assert np.allclose(est[~ok], ex[~ok], atol=1e-6)  # zero-variance channels are exact
    z = np.asarray(z)
    assert np.mean(z < 3) > 0.9, z
    assert z.max() < 5


def test_channel_scheme_and_seed(tiny_q):
    qm, x, y = tiny_q
    ew, _ = exact_cached(qm, x, y)
    a = channel_traces(qm, [(x, y)], scheme="channel", max_probes=200, tol=0.0, seed=3)
    b = channel_traces(qm, [(x, y)], scheme="channel", max_probes=200, tol=0.0, seed=3)
    for n in qm.names:
        assert np.array_equal(a.weight_trace[n], b.weight_trace[n])
        z = np.abs(a.weight_trace[n] - ew[n]) / np.maximum(a.weight_stderr[n], 1e-12)
        assert (z < 5).all()


def test_stopping_rule(tiny_q):
    qm, x, y = tiny_q
    r = channel_traces(qm, [(x, y)], scheme="layer", max_probes=5000, tol=0.05, seed=0)
    assert r.converged and r.layer_rel_stderr < 0.05 and r.probes < 5000


def test_non_piecewise_linear_refuses_exact():
    import torch.nn as nn

    class Smooth(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.fc2 = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc2(torch.sigmoid(self.fc1(x.flatten(1))))
    qm = canonicalize(Smooth(), (1, 2, 2))
    assert non_piecewise_linear_ops(qm)
    with pytest.raises(CwhawqError, match="piecewise-linear"):
        channel_traces(qm, [(torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 0]))], scheme="exact")
    # Hutchinson still works there
    r = channel_traces(qm, [(torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 0]))], scheme="layer", max_probes=20)
    assert r.probes == 20 or r.converged


def test_bad_inputs_give_clear_errors(tiny_q):
    import torch.nn as nn
    from cwhawq.errors import ModelError
    from cwhawq.data import Dataset

    class NoLayers(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3]
    with pytest.raises(ModelError, match="no Conv2d or Linear"):
        canonicalize(NoLayers(), (1, 2, 2))
    qm, x, y = tiny_q
    with pytest.raises(CwhawqError, match="empty"):
        analyze(qm, Dataset(np.zeros((0, 2, 5, 5), np.float32), np.zeros(0, np.int64), "e", "train"))
    with pytest.raises(CwhawqError, match="NaN"):
        channel_traces(qm, [(torch.full_like(x, float("nan")), y)], scheme="exact")


def test_analyze_output_format(tiny_q):
    from cwhawq.data import Dataset

    qm, x, y = tiny_q
    ds = Dataset(np.random.default_rng(0).standard_normal((40, 2, 5, 5)).astype(np.float32),
                 np.random.default_rng(1).integers(0, 4, 40), "d", "train")
    s = analyze(qm, ds, batch_size=16, batches=2)
    assert s["batches"] == 2 and s["samples"] == 32 and s["scheme"] == "exact"
    for rec, info in zip(s["layers"], qm.layer_infos):
        assert rec["name"] == info.name and rec["kind"] == info.kind
        assert len(rec["weight"]["trace"]) == info.out_channels == len(rec["weight"]["stderr"])
        assert len(rec["activation"]["trace"]) == info.in_channels
        for side in ("weight", "activation"):
            om = rec[side]["omega"]
            assert set(om) == {"2", "3", "4", "6", "7", "8"}
            # more bits, less error
            assert np.all(np.asarray(om["2"]) >= np.asarray(om["8"]) - 1e-12)
