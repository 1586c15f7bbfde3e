"""The layer kinds of lipfast.adapters, each against per-sample gradients from autograd and full LAPACK SVDs.

The ground truth holds the tracked matrix as the tests define it, independently of the adapters: HF Conv1D's
``weight.T``, the rows of MultiheadAttention's packed ``in_proj_weight``, an Embedding's weight as stored, and a
grouped convolution's whole block-diagonal matrix (zero-padded here, in the test, never in lipfast). Per-sample
gradients come from ``torch.func.vmap(grad)`` through ``functional_call`` on an untracked twin (a loop of
``autograd.grad`` where a model does not vmap), with plain SGD, float64 and exact spectra.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lipfast import LipfastWarning, Tracker, reference
from test_tracker import ALL_FIELDS, assert_matches

EXACT = dict(rank=40, gap_tol=1e-6, step_tol=1e6)
LR = 0.1


# ----------------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------------
def persample_grads(twin: nn.Module, inputs: tuple, y, loss_fn, names, in_dims=0, loop=False):
    """``{parameter name: [B, *shape]}``: the gradient of each sample's own loss."""
    params = {k: v.detach() for k, v in twin.named_parameters()}
    buffers = {k: v.detach() for k, v in twin.named_buffers()}
    dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(inputs)

    def one(p, xs, yi):
        out = functional_call(twin, (p, buffers), tuple(x.unsqueeze(d) for x, d in zip(xs, dims)))
        return loss_fn(out, yi.unsqueeze(0))

    if not loop:
        g = vmap(grad(one), in_dims=(None, dims, 0))(params, inputs, y)
        return {n: g[n] for n in names}
    out = {n: [] for n in names}
    for i in range(y.shape[0]):
        gi = grad(one)(params, tuple(x.select(d, i) for x, d in zip(inputs, dims)), y[i])
        for n in names:
            out[n].append(gi[n])
    return {n: torch.stack(v) for n, v in out.items()}


def expected(model, twin, inputs, y, loss_fn, mats, do_step, in_dims=0, loop=False):
    """Ground-truth record fields for ``mats = {record name: (parameter name, tensor -> [m, n] matrix)}``
    around one plain-SGD step (``do_step``)."""
    twin.load_state_dict(model.state_dict())
    params = dict(model.named_parameters())
    G = persample_grads(twin, inputs, y, loss_fn, {p for p, _ in mats.values()}, in_dims, loop)
    before = {r: f(params[p].detach()).double().clone() for r, (p, f) in mats.items()}
    do_step()
    B = y.shape[0]
    out = {}
    for r, (p, f) in mats.items():
        W = before[r]
        W_after = f(params[p].detach()).double()
        dW = W_after - W
        Gi = torch.stack([f(g) for g in G[p]]).double()
        torch.testing.assert_close(dW, -LR * Gi.mean(0), rtol=1e-9, atol=1e-13)  # the step is plain SGD
        S = torch.linalg.svdvals(W)
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        sigma, sigma2 = float(S[0]), float(S[1]) if S.numel() > 1 else 0.0
        assert (sigma - sigma2) / sigma > 1e-3, f"{r}: the test's random layer has a tiny gap"
        s, hess = reference.persample_dense(W, Gi)
        gbar = Gi.mean(0)
        h_gbar = float(reference.hessian_form_dense(W, gbar))
        first = float(U[:, 0] @ dW @ Vh[0])
        second = 0.5 * float(reference.hessian_form_dense(W, dW))
        sigma_next = float(torch.linalg.matrix_norm(W_after, 2))
        rms_s = float(s.pow(2).mean().sqrt())
        out[r] = dict(
            sigma=sigma, sigma2=sigma2, sigma_next=sigma_next, delta_obs=sigma_next - sigma, first_order=first,
            second_order=second, delta_pred=first + second, drift=-LR * float(s.mean()),
            diffusion_var=LR * LR * float(s.var(unbiased=True)) / B,
            ito=LR * LR / (2 * B) * (float(hess.sum()) - B * h_gbar) / (B - 1), gap=(sigma - sigma2) / sigma,
            batch=B, _scale=dict(sigma=sigma, sigma2=sigma, sigma_next=sigma, delta_obs=float(dW.norm()),
                                 first_order=float(dW.norm()), delta_pred=float(dW.norm()),
                                 second_order=float(dW.norm()) ** 2 / (sigma - sigma2),
                                 drift=LR * rms_s, diffusion_var=LR * LR * rms_s ** 2 / B,
                                 ito=LR * LR / (2 * B) * float(hess.abs().mean() + abs(h_gbar)), gap=1.0))
    return out


def step(model, opt, inputs, y, loss_fn):
    opt.zero_grad(set_to_none=True)
    loss_fn(model(*inputs), y).backward()
    opt.step()


def check(tracker, step_index, want):
    at = {r["layer"]: r for r in tracker.records if r["step"] == step_index}
    assert set(want) <= set(at), f"records for {sorted(at)}, expected {sorted(want)}"
    for name, w in want.items():
        r = at[name]
        assert r["batch"] == w["batch"] and not r["nonfinite"], r
        assert set(filter(None, r["flag_names"].split(";"))) <= {"crossing", "closure"}, r
        assert_matches(r, w, ALL_FIELDS)
        assert r["ito_lo"] == pytest.approx(r["ito"], rel=1e-9) and r["ito_hi"] == pytest.approx(r["ito"], rel=1e-9)
    return at


def rows(t):  # the matrix of a weight stored [out, in, ...]
    return t.reshape(t.shape[0], -1)


def ce(out, y):
    return F.cross_entropy(out, y)


def run_and_check(model, inputs, y, loss_fn, mats, steps=2, in_dims=0, loop=False, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    twin = copy.deepcopy(model)
    tracker = Tracker(model, opt, **{**EXACT, **kwargs})
    got = []
    for k in range(steps):
        want = expected(model, twin, inputs, y, loss_fn, mats, lambda: step(model, opt, inputs, y, loss_fn),
                        in_dims, loop)
        got.append(check(tracker, k, want))
    return tracker, got


# ----------------------------------------------------------------------------------------------------
# Convolutions
# ----------------------------------------------------------------------------------------------------
def test_conv1d_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 5, 3, padding=1), nn.Tanh(), nn.Conv1d(5, 4, 3, stride=2, dilation=2),
                          nn.Tanh(), nn.Conv1d(4, 4, 3, padding="same"), nn.Flatten(), nn.Linear(12, 3)).double()
    x, y = torch.randn(7, 3, 9, dtype=torch.float64), torch.randint(0, 3, (7,))
    mats = {"0": ("0.weight", rows), "2": ("2.weight", rows), "4": ("4.weight", rows), "6": ("6.weight", rows)}
    tracker, got = run_and_check(model, (x,), y, ce, mats)
    assert [got[0][n]["kind"] for n in ("0", "2", "4", "6")] == ["conv1d", "conv1d", "conv1d", "linear"]
    tracker.close()


def block_diagonal(groups):
    """The whole block-diagonal matrix of a grouped convolution weight [C_out, C_in/g, *k]."""
    def f(t):
        blocks = t.reshape(groups, t.shape[0] // groups, -1)
        return torch.block_diag(*blocks)
    return f


class InvertedResidual(nn.Module):
    """A MobileNetV2 block: 1x1 expansion, 3x3 depthwise, 1x1 projection, residual; and a head. No BatchNorm
    (it couples the samples of a batch, another question)."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(4, 12, 1)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3)  # blocks 4 x 4·9
        self.project = nn.Conv2d(12, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu6(self.expand(x))
        h = F.relu6(self.depthwise(h))
        h = torch.tanh(self.grouped(h))
        return self.head((x + self.project(h)).mean(dim=(2, 3)))


def test_depthwise_and_grouped_conv_follow_the_top_block():
    torch.manual_seed(1)
    model = InvertedResidual().double()
    x, y = torch.randn(6, 4, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    mats = {"expand": ("expand.weight", rows), "depthwise": ("depthwise.weight", block_diagonal(12)),
            "grouped": ("grouped.weight", block_diagonal(3)), "project": ("project.weight", rows)}
    tracker, got = run_and_check(model, (x,), y, ce, mats)
    # The ground truth is the whole block-diagonal matrix: its σ1, σ2 and forces are those of the record, which
    # follows the top block (``group``) with the block's shape.
    for name, g in (("depthwise", 12), ("grouped", 3)):
        r = got[-1][name]
        assert 0 <= r["group"] < g and (r["m"], r["n"]) == ((1, 9) if g == 12 else (4, 36)) and r["kind"] == "conv2d"
    assert got[0]["expand"]["group"] == -1 and got[0]["expand"]["shared_with"] == ""
    tracker.close()


def test_grouped_conv_follows_the_block_that_takes_the_top():
    torch.manual_seed(9)
    conv = nn.Conv2d(4, 4, 3, groups=2).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()
    x, y = torch.randn(6, 4, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = Tracker(model, opt, **EXACT)
    groups = []
    for top in (0, 1):
        with torch.no_grad():  # make block `top` the larger one
            conv.weight[2 * top:2 * top + 2] *= 3.0
        step(model, opt, (x,), y, ce)
        groups.append(tracker.records[-2]["group"])
        with torch.no_grad():
            conv.weight[2 * top:2 * top + 2] /= 3.0
    assert groups == [0, 1]
    # Another block overtaking the followed one after a step is a level crossing of the whole weight.
    adapter = tracker.captures["0"].adapter
    adapter.select()  # the weight changed since the last step: follow its top block now
    followed = float(torch.linalg.matrix_norm(adapter.matrix(conv.weight), 2))
    assert not adapter.overtaken(followed)
    with torch.no_grad():
        conv.weight[2 - 2 * adapter.group:4 - 2 * adapter.group] *= 10.0
    assert adapter.overtaken(followed)
    tracker.close()


# ----------------------------------------------------------------------------------------------------
# Embeddings and tied weights
# ----------------------------------------------------------------------------------------------------
class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 5, padding_idx=0)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)).mean(dim=1))


def test_embedding_model():
    torch.manual_seed(2)
    model = Bag().double()
    tokens = torch.randint(0, 12, (8, 6))
    tokens[0, :2] = 0  # padding rows get no gradient
    tokens[1, :] = 3  # one token many times in a sample: its rows add up
    y = torch.randint(0, 3, (8,))
    tracker, got = run_and_check(model, (tokens,), y, ce, {"emb": ("emb.weight", lambda t: t),
                                                          "head": ("head.weight", rows)})
    assert (got[0]["emb"]["kind"], got[0]["emb"]["m"], got[0]["emb"]["n"]) == ("embedding", 12, 5)
    tracker.close()


class TiedLM(nn.Module):
    """A tiny language model whose output head is the embedding (GPT-2's wte <-> lm_head)."""

    def __init__(self, V=11, d=5):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


def lm_loss(logits, y):  # the mean over a sample's positions, then over samples
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def test_tied_embedding_and_head_get_one_record_with_both_uses():
    torch.manual_seed(3)
    model = TiedLM().double()
    tokens, y = torch.randint(0, 11, (6, 4)), torch.randint(0, 11, (6, 4))
    tracker, got = run_and_check(model, (tokens,), y, lm_loss, {"emb": ("emb.weight", lambda t: t)})
    r = got[0]["emb"]
    assert r["shared_with"] == "head" and "head" not in {x["layer"] for x in tracker.records}
    tracker.close()


# ----------------------------------------------------------------------------------------------------
# The sample dimension and attention
# ----------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.encoder(x)
        return self.head(h.mean(dim=1 if self.batch_first else 0))


def encoder_pair():
    torch.manual_seed(4)
    first = Encoder(True).double()
    second = Encoder(False).double()
    second.load_state_dict(first.state_dict())
    return first, second


ATTN = "encoder.layers.0.self_attn"


def qkv_mats():
    E = 6
    mats = {f"{ATTN}.{p}": (f"{ATTN}.in_proj_weight", lambda t, i=i: t[i * E:(i + 1) * E]) for i, p in enumerate("qkv")}
    mats[f"{ATTN}.out_proj"] = (f"{ATTN}.out_proj.weight", rows)
    for n in ("linear1", "linear2"):
        mats[f"encoder.layers.0.{n}"] = (f"encoder.layers.0.{n}.weight", rows)
    return mats


def test_transformer_encoder_batch_first_false_and_true_give_identical_records():
    model_t, model_f = encoder_pair()
    x, y = torch.randn(5, 7, 6, dtype=torch.float64), torch.randint(0, 3, (5,))  # B=5, T=7
    tracker_t, got_t = run_and_check(model_t, (x,), y, ce, qkv_mats(), loop=True)
    opt = torch.optim.SGD(model_f.parameters(), lr=LR)
    tracker_f = Tracker(model_f, opt, **EXACT)
    for _ in range(2):
        step(model_f, opt, (x.transpose(0, 1),), y, ce)
    assert list(tracker_f.captures) == list(tracker_t.captures)
    assert list(tracker_t.captures)[:4] == [f"{ATTN}.q", f"{ATTN}.k", f"{ATTN}.v", f"{ATTN}.out_proj"]
    assert len(tracker_f.records) == len(tracker_t.records) == 2 * 7
    for a, b in zip(tracker_t.records, tracker_f.records):
        assert a["layer"] == b["layer"] and a["batch"] == b["batch"] == 5
        for f in ALL_FIELDS + ("ito_lo", "ito_hi"):
            assert a[f] == pytest.approx(b[f], rel=1e-9, abs=1e-15), (a["layer"], f)
    assert got_t[0][f"{ATTN}.q"]["kind"] == "attention"
    tracker_t.close()
    tracker_f.close()


@pytest.mark.parametrize("need_weights", [False, True])  # SDPA, or the explicit bmm path
def test_separate_qkv_weights(need_weights):
    torch.manual_seed(5)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(6, 2, kdim=4, vdim=3, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, q, kv, v):
            return self.head(self.attn(q, kv, v, need_weights=need_weights)[0].mean(dim=1))

    model = Cross().double()
    q, k, v = (torch.randn(5, 3, 6, dtype=torch.float64), torch.randn(5, 4, 4, dtype=torch.float64),
               torch.randn(5, 4, 3, dtype=torch.float64))
    y = torch.randint(0, 3, (5,))
    mats = {f"attn.{p}": (f"attn.{p}_proj_weight", lambda t: t) for p in "qkv"}
    mats["attn.out_proj"] = ("attn.out_proj.weight", rows)
    tracker, got = run_and_check(model, (q, k, v), y, ce, mats, steps=1, loop=True)
    assert (got[0]["attn.k"]["m"], got[0]["attn.k"]["n"]) == (6, 4)
    tracker.close()


@pytest.mark.parametrize("inputs", ["kv", "qkv"])  # F.linear on the rows [E:3E] (k is v), or on each third
def test_packed_weights_with_distinct_query_key_value(inputs):
    torch.manual_seed(16)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, q, k, v):
            return self.head(self.attn(q, k, k if inputs == "kv" else v)[0].mean(dim=1))

    model = Cross().double()
    q, k, v = (torch.randn(5, 3, 6, dtype=torch.float64) for _ in range(3))
    y = torch.randint(0, 3, (5,))
    mats = {f"attn.{p}": ("attn.in_proj_weight", lambda t, i=i: t[i * 6:(i + 1) * 6]) for i, p in enumerate("qkv")}
    mats["attn.out_proj"] = ("attn.out_proj.weight", rows)
    tracker, _ = run_and_check(model, (q, k, v), y, ce, mats, steps=1, loop=True)
    tracker.close()


def test_f_linear_is_restored_after_each_attention_forward():
    torch.manual_seed(10)
    model = Encoder(True).double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = Tracker(model, opt, **EXACT)
    original = F.linear
    x, y = torch.randn(3, 4, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    step(model, opt, (x,), y, ce)
    assert F.linear is original and tracker.records
    with pytest.raises(AssertionError, match="embedding dimension"):  # a forward failing inside the attention
        model(torch.randn(3, 4, 5, dtype=torch.float64))
    assert F.linear is original
    with torch.no_grad():  # nothing listens outside a captured forward
        model(x)
    assert F.linear is original
    tracker.close()


def test_ambiguous_sample_dimension_is_refused_and_batch_dim_resolves_it():
    class SeqFirst(nn.Module):  # custom code feeding [T, B, n] to a Linear: nothing says dim 1 is the batch
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.transpose(0, 1)).mean(dim=0)

    torch.manual_seed(6)
    model = SeqFirst().double()
    x, y = torch.randn(6, 9, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = Tracker(model, opt, **EXACT)
    with pytest.raises(ValueError, match=r"cannot tell which dim of layer 'fc''s input \(9, 6, 4\) holds the samples.*"
                                         r"batch_dim=\{'fc': 1\}"):
        model(x)
    tracker.close()
    tracker, _ = run_and_check(model, (x,), y, ce, {"fc": ("fc.weight", rows)}, steps=1, batch_dim={"fc": 1})
    tracker.close()
    with pytest.raises(ValueError, match="batch_dim names 'nope'"):
        Tracker(model, opt, batch_dim={"nope": 1})
    with pytest.raises(TypeError, match="batch_dim must be None, an int or a dict"):
        Tracker(model, opt, batch_dim="1")


def test_a_flattened_input_is_refused():
    class Flattened(nn.Module):  # [B, T, n] flattened to [B·T, n]: rows are no longer samples
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.reshape(-1, 4)).reshape(x.shape[0], -1, 3).mean(dim=1)

    model = Flattened().double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = Tracker(model, opt, **EXACT)
    x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"layer 'fc''s calls in one forward pass hold \[30\] rows .* batch holds 6"):
        step(model, opt, (x,), y, ce)
    tracker.close()


def test_a_use_of_the_weight_the_tracker_cannot_see_is_warned():
    class Functional(nn.Module):  # the embedding matrix reused by custom code as the output map
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 5)
            self.mix = nn.Linear(5, 5)

        def forward(self, tokens):
            return torch.tanh(self.mix(self.emb(tokens))) @ self.emb.weight.T

    torch.manual_seed(17)
    model = Functional().double()
    tokens, y = torch.randint(0, 11, (6, 4)), torch.randint(0, 11, (6, 4))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = Tracker(model, opt, **EXACT)
    with pytest.warns(LipfastWarning, match=r"layer 'emb': .* not explained by the calls the tracker captured"):
        step(model, opt, (tokens,), y, lm_loss)
    tracker.close()
    # Clipping and an L2 penalty change weight.grad too, and are no unseen use.
    model = TiedLM().double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = Tracker(model, opt, **EXACT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LipfastWarning)
        opt.zero_grad()
        (lm_loss(model(tokens), y) + 0.1 * model.emb.weight.pow(2).sum()).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
    assert tracker.records
    tracker.close()


def test_lstm_weights_are_skipped():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lstm = nn.LSTM(4, 5, batch_first=True)
            self.head = nn.Linear(5, 3)

        def forward(self, tokens):
            return self.head(self.lstm(self.emb(tokens))[0][:, -1])

    torch.manual_seed(7)
    model = Recurrent().double()
    tokens, y = torch.randint(0, 10, (6, 5)), torch.randint(0, 3, (6,))
    tracker, _ = run_and_check(model, (tokens,), y, ce, {"emb": ("emb.weight", lambda t: t),
                                                        "head": ("head.weight", rows)}, steps=1, loop=True)
    assert set(tracker.skipped) == {"lstm.weight_ih_l0", "lstm.weight_hh_l0"}
    assert all("recurrent" in r for r in tracker.skipped.values())
    tracker.close()


# ----------------------------------------------------------------------------------------------------
# HF GPT-2
# ----------------------------------------------------------------------------------------------------
def test_gpt2_every_conv1d_tracked_and_wte_lm_head_one_record():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(8)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).double()
    model.config.use_cache = False

    class Logits(nn.Module):  # the logits alone, so that the loss is the test's
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids).logits

    wrapped = Logits(model)
    ids, y = torch.randint(0, 100, (4, 6)), torch.randint(0, 100, (4, 6))
    conv = [n for n, m in wrapped.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv) == 8
    mats = {n: (f"{n}.weight", lambda t: t.t()) for n in conv}
    mats["lm.transformer.wte"] = ("lm.transformer.wte.weight", lambda t: t)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker, got = run_and_check(wrapped, (ids,), y, lm_loss, mats, steps=1, loop=True, rank=32)
    r = got[0]["lm.transformer.wte"]
    assert r["shared_with"] == "lm.lm_head" and r["kind"] == "embedding"
    assert {got[0][n]["kind"] for n in conv} == {"hf_conv1d"}
    # The position embedding's input is [1, T], shared by every sample: moved to skipped, with a warning.
    assert "shared by every sample" in tracker.skipped["lm.transformer.wpe"]
    assert any(issubclass(w.category, LipfastWarning) and "wpe" in str(w.message) for w in caught)
    assert set(tracker.captures) == set(conv) | {"lm.transformer.wte"}
    assert all(n.endswith(("ln_1", "ln_2", "ln_f", "wpe")) for n in tracker.skipped)
    tracker.close()


def test_bert_every_linear_and_embedding_tracked_position_embedding_skipped():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(11)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=3)
    model = transformers.BertForSequenceClassification(config).double()

    class Logits(nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, ids):
            return self.bert(input_ids=ids).logits

    wrapped = Logits(model)
    ids, y = torch.randint(0, 100, (4, 7)), torch.randint(0, 3, (4,))
    linear = [n for n, m in wrapped.named_modules() if isinstance(m, nn.Linear)]
    emb = "bert.bert.embeddings"
    mats = {n: (f"{n}.weight", rows) for n in ("bert.bert.encoder.layer.0.attention.self.query", "bert.classifier")}
    mats[f"{emb}.word_embeddings"] = (f"{emb}.word_embeddings.weight", lambda t: t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LipfastWarning)
        tracker, got = run_and_check(wrapped, (ids,), y, ce, mats, steps=1, loop=True, rank=32)
    assert set(tracker.captures) == set(linear) | {f"{emb}.word_embeddings", f"{emb}.token_type_embeddings"}
    assert "shared by every sample" in tracker.skipped[f"{emb}.position_embeddings"]
    assert all(n.endswith("LayerNorm") or n.endswith("position_embeddings") for n in tracker.skipped)
    tracker.close()


def test_torch_transformer_encoder_as_the_model_takes_its_batch_from_batch_first():
    torch.manual_seed(12)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0), 1,
                                    enable_nested_tensor=False).double()
    opt = torch.optim.SGD(encoder.parameters(), lr=LR)
    tracker = Tracker(encoder, opt, **EXACT)
    x = torch.randn(9, 4, 6, dtype=torch.float64)  # [T=9, B=4, E]
    opt.zero_grad()
    encoder(x).pow(2).mean().backward()
    opt.step()
    assert {r["batch"] for r in tracker.records} == {4} and len(tracker.records) == 6
    tracker.close()


def test_attention_under_non_reentrant_checkpointing_matches_plain():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(Encoder):
        def forward(self, x):
            h = checkpoint(self.encoder, x, use_reentrant=False)
            return self.head(h.mean(dim=1))

    torch.manual_seed(13)
    plain = Encoder(True).double()
    ckpt = Checkpointed(True).double()
    ckpt.load_state_dict(plain.state_dict())
    x, y = torch.randn(5, 4, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    got = []
    for model in (plain, ckpt):
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        tracker = Tracker(model, opt, **EXACT)
        with warnings.catch_warnings():
            warnings.simplefilter("error", LipfastWarning)  # no false "had no backward"
            for _ in range(2):
                step(model, opt, (x,), y, ce)
        got.append(tracker.records)
        tracker.close()
    assert [r["layer"] for r in got[0]] == [r["layer"] for r in got[1]] and len(got[0]) == 2 * 7
    for a, b in zip(*got):
        for f in ALL_FIELDS:
            assert a[f] == pytest.approx(b[f], rel=1e-9, abs=1e-15), (a["layer"], f)


def test_embedding_and_grouped_conv_never_allocate_dense_per_sample_tensors():
    """No tensor of a tied embedding's [B, V, d] per-sample gradients, nor a grouped convolution's dense
    [C_out, C_in·k²] block-diagonal matrix, is ever produced (a dispatch mode sees every op's outputs)."""
    from test_tracker import _LargestAllocation

    torch.manual_seed(14)
    V, d, B, T = 500, 16, 8, 6
    lm = TiedLM(V, d)
    conv = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=16), nn.Flatten(), nn.Linear(64 * 4 * 4, 3))
    cases = ((lm, torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T)), lm_loss, B * V * d),
             (conv, torch.randn(B, 64, 4, 4), torch.randint(0, 3, (B,)), ce, 64 * 64 * 9))
    for model, x, y, loss_fn, forbidden in cases:
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        tracker = Tracker(model, opt, rank=4)
        step(model, opt, (x,), y, loss_fn)
        mode = _LargestAllocation()
        with mode:
            step(model, opt, (x,), y, loss_fn)
        assert len(tracker.records) == 2 * len(tracker.captures) and mode.ops > 0
        assert mode.numel < forbidden, mode.shape
        tracker.close()


@pytest.mark.parametrize("make", [InvertedResidual, TiedLM, lambda: Encoder(True)], ids=["convs", "tied", "attention"])
def test_reference_implementation_gives_the_same_records(make):
    torch.manual_seed(15)
    model = make().double()
    if isinstance(model, TiedLM):
        x, y, loss_fn = torch.randint(0, 11, (5, 4)), torch.randint(0, 11, (5, 4)), lm_loss
    elif isinstance(model, Encoder):
        x, y, loss_fn = torch.randn(5, 4, 6, dtype=torch.float64), torch.randint(0, 3, (5,)), ce
    else:
        x, y, loss_fn = torch.randn(5, 4, 5, 5, dtype=torch.float64), torch.randint(0, 3, (5,)), ce
    got = []
    for impl in ("compiled", "reference"):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        tracker = Tracker(m, opt, implementation=impl, **EXACT)
        for _ in range(2):
            step(m, opt, (x,), y, loss_fn)
        got.append(tracker.records)
        tracker.close()
    assert len(got[0]) == len(got[1]) > 0
    for a, b in zip(*got):
        assert (a["layer"], a["group"], a["shared_with"]) == (b["layer"], b["group"], b["shared_with"])
        for f in ALL_FIELDS:
            assert a[f] == pytest.approx(b[f], rel=1e-8, abs=1e-14), (a["layer"], f)


def test_a_row_shared_by_the_batch_is_skipped_even_when_its_length_equals_the_batch():
    """Position ids [1, T] with T == B: dim 1 has the batch's size by coincidence; the one row is shared by every
    sample (moved to skipped with a warning), not an ambiguity that stops training."""
    class WithPositions(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(20, 5), nn.Embedding(8, 5), nn.Linear(5, 3)

        def forward(self, ids):
            return self.head(self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])).mean(dim=1)

    torch.manual_seed(3)
    model = WithPositions().double()
    ids, y = torch.randint(0, 20, (6, 6)), torch.randint(0, 3, (6,))  # B == T == 6
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Tracker(model, opt, **EXACT) as tracker:
            for _ in range(2):
                opt.zero_grad()
                ce(model(ids), y).backward()
                opt.step()
    assert "shared by every sample" in tracker.skipped["pos"]
    assert any(issubclass(w.category, LipfastWarning) and "pos" in str(w.message) for w in caught)
    assert {r["layer"] for r in tracker.records} == {"tok", "head"}
