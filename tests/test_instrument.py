"""lipfast.instrument under torch.compile and activation checkpointing (issue 18, part 6).

- A forward compiled after the tracker attached is refused at its first call, with the attach-time advice (the
  hooks cannot be compiled: Dynamo recompiled them every step, ~200x slower).
- Non-reentrant checkpointing: the records equal those of the same run without checkpointing, the tracker keeps
  no layer input that autograd does not keep (counted tensor by tensor, and as the run's live memory), and the
  recomputation inside backward raises no "had no backward" warning (pyproject's ``filterwarnings = error``).
- Reentrant checkpointing: equal records where a layer's calls of one forward pass lie within one checkpoint; a
  clear error where they do not (the tracker cannot group them).
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import profile_memory
from lipfast import Tracker, instrument
from lipfast.tracker import LAYER_FIELDS, NETWORK_FIELDS

EXACT = dict(rank=8, gap_tol=1e-6, step_tol=1e6)  # exact spectra, nothing flagged degenerate


# ----------------------------------------------------------------------------------------------------
# torch.compile after attach
# ----------------------------------------------------------------------------------------------------
COMPILED = r"ran under torch\.compile while a Tracker is attached; expected an eager forward"
ADVICE = r"Attach the tracker to the uncompiled model \(train it eagerly while tracking\)\."


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches are per process: a code object past its recompile limit would run eagerly (and be tracked
    correctly) instead of reaching the refusal this test checks."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, Tracker(model, opt, **EXACT)


# torch.compile imports dynamo, which emits torch's own DeprecationWarnings (torch.jit.script_method); Dynamo
# reads .grad of a compiled layer's non-leaf input while it wraps it.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:The .grad attribute of a Tensor that is not a leaf")
def test_forward_compiled_after_attach_is_refused_at_its_first_call(fresh_dynamo):
    x = torch.randn(6, 4, dtype=torch.float64)
    model, opt, tracker = _tiny()
    compiled = torch.compile(model, backend="eager")  # Dynamo traces the hooks as inductor would, without C++
    for _ in range(2):  # every call, not only until Dynamo gives up on the frame
        with pytest.raises(RuntimeError, match=rf"the tracked model's forward {COMPILED} .*{ADVICE}"):
            compiled(x)
    assert tracker.forward_id == 0 and not any(cap.groups for cap in tracker.captures.values())

    inplace, _, _ = _tiny()
    inplace.compile(backend="eager")
    with pytest.raises(RuntimeError, match=rf"the tracked model's forward {COMPILED}"):
        inplace(x)

    model, opt, tracker = _tiny()  # a compiled training step
    step = torch.compile(lambda x: model(x).sum(), backend="eager")
    with pytest.raises(RuntimeError, match=rf"the tracked model's forward {COMPILED}"):
        step(x)

    model, opt, tracker = _tiny()  # a compiled layer: the root's hook runs eagerly, the layer's is traced
    model[2] = torch.compile(model[2], backend="eager")
    with pytest.raises(RuntimeError, match=rf"the forward of layer '2' {COMPILED} .*{ADVICE}"):
        model(x)

    tracker.close()  # once closed, the model compiles
    assert model(x).shape == (6, 3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.skipif("reason" not in inspect.signature(torch.compiler.disable).parameters,
                    reason="this torch's disable() has no reason to show")
def test_fullgraph_compile_after_attach_shows_the_advice(fresh_dynamo):
    model, opt, tracker = _tiny()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=rf"a lipfast Tracker is attached\. {ADVICE}"):
        compiled(torch.randn(6, 4, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------------------
class SegmentedMLP(nn.Module):
    """Linear + tanh layers ("layers.0", "layers.2", ...) run in segments, each checkpointed or not; ``mode``
    "plain" runs every segment without checkpointing. Layer 0 stays outside: a reentrant checkpoint whose
    inputs need no grad gives its weights no gradient (torch warns)."""

    def __init__(self, dims=(5, 8, 7, 6, 5, 3), segments=((0, 2, False), (2, 4, True), (4, 8, True), (8, 9, False)),
                 dtype=torch.float64):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.layers = nn.Sequential(*layers[:-1]).to(dtype)
        self.segments = segments
        self.mode = "plain"

    def forward(self, x):
        for start, stop, checkpointed in self.segments:
            run = self.layers[start:stop]
            if checkpointed and self.mode != "plain":
                x = checkpoint(run, x, use_reentrant=self.mode == "reentrant")
            else:
                x = run(x)
        return x


class SharedAcross(nn.Module):
    """One layer called inside two checkpointed segments and once outside (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.to(torch.float64)
        self.mode = "plain"

    def block(self, h):
        return torch.tanh(self.shared(h))

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for _ in range(2):
            if self.mode == "plain":
                h = self.block(h)
            else:
                h = checkpoint(self.block, h, use_reentrant=self.mode == "reentrant")
        return self.head(self.block(h))


def _records(model, mode, x, y, steps=3, micro=1, context=None, forward=None):
    """Layer and network records of ``steps`` SGD steps (``micro`` micro-batches each) of a copy of ``model``."""
    model = copy.deepcopy(model)
    model.mode = mode
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = Tracker(model, opt, **EXACT)
    for _ in range(steps):
        opt.zero_grad()
        for xb, yb in zip(x.chunk(micro), y.chunk(micro)):
            with context() if context is not None else torch.enable_grad():
                out = model(xb) if forward is None else forward(model, xb)
                loss = F.cross_entropy(out, yb) / micro
            loss.backward()
        tracker.log(loss=loss)
        opt.step()
    assert all(cap.dropped_calls == 0 and not cap.groups for cap in tracker.captures.values())
    tracker.close()
    return tracker.records, tracker.network


def _assert_same_records(got, want):
    """Every field equal; numbers to 1e-10 relative (the same arithmetic on the same tensors: in fact exact)."""
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for f in g:
            a, b = g[f], w[f]
            if isinstance(b, float) and not isinstance(b, bool):
                assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-10, abs_tol=1e-300), \
                    f"step {g['step']} {g.get('layer', '')}: {f} = {a!r}, without checkpointing {b!r}"
            else:
                assert a == b, f"step {g['step']} {g.get('layer', '')}: {f} = {a!r}, without checkpointing {b!r}"


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("micro", [1, 2])
def test_checkpointed_records_equal_the_plain_run(mode, micro):
    """Two of four segments checkpointed (one with two layers); ``micro=2``: gradient accumulation."""
    model = SegmentedMLP()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    layers, network = _records(model, mode, x, y, micro=micro)
    plain_layers, plain_network = _records(model, "plain", x, y, micro=micro)
    assert len(layers) == 3 * 5 and set(LAYER_FIELDS) <= set(layers[0]) and set(NETWORK_FIELDS) <= set(network[0])
    assert all(r["batch"] == 8 and r["flag_names"] == "" for r in layers)
    _assert_same_records(layers, plain_layers)
    _assert_same_records(network, plain_network)


def test_checkpointing_the_whole_model_and_shared_layers_give_the_plain_records():
    """The root module's forward recomputed inside backward, and a layer called in two checkpoints and outside
    them: its three calls act on the same samples and add up, as without checkpointing."""
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    shared = SharedAcross()
    _assert_same_records(_records(shared, "non_reentrant", x, y)[0], _records(shared, "plain", x, y)[0])

    model = SegmentedMLP()  # checkpoint(model, x): the tracked root itself runs again during backward
    x = torch.randn(6, 5, dtype=torch.float64)
    whole = _records(model, "plain", x, y, forward=lambda m, xb: checkpoint(m, xb, use_reentrant=False))[0]
    _assert_same_records(whole, _records(model, "plain", x, y)[0])


def test_saved_tensor_hooks_other_than_checkpointing_give_the_plain_records():
    """save_on_cpu: the captured input goes through the same hooks as autograd's saved tensors."""
    model = SegmentedMLP()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    _assert_same_records(_records(model, "plain", x, y, context=torch.autograd.graph.save_on_cpu)[0],
                         _records(model, "plain", x, y)[0])


def test_reentrant_checkpoint_splitting_a_layer_is_refused():
    """use_reentrant=True runs the checkpointed forward without grad: the tracker meets the shared layer's calls
    one checkpoint at a time, after reducing the others, and would count them as separate samples."""
    model = SharedAcross()
    model.mode = "reentrant"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = Tracker(model, opt, **EXACT)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(RuntimeError, match=r"layer 'shared' is called in a reentrant activation checkpoint "
                                           r"\(use_reentrant=True\) .*use_reentrant=False\)"):
        F.cross_entropy(model(x), y).backward()
    tracker.close()


# -- memory ------------------------------------------------------------------------------------------
def _held_bytes(tracker) -> int:
    """Bytes of the distinct storages behind every tensor the tracker's captures hold (inputs, gradients)."""
    storages = {}
    for cap in tracker.captures.values():
        for group in cap.groups.values():
            for call in group.calls:
                for t in (call.x, call.d, call.saved and call.saved[1]):
                    if isinstance(t, torch.Tensor):
                        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_tracker_holds_no_input_autograd_does_not_hold_under_checkpointing(monkeypatch):
    """Without checkpointing the tracker holds every layer's input from the forward to its backward, as autograd
    does (the same storage). With every block checkpointed autograd keeps only the blocks' boundaries, and the
    tracker keeps the input of the head (outside any checkpoint) and no block's; inside backward it takes one
    layer's recomputed input and output-gradient at a time, which autograd holds then too, and lets go of them
    before its hook returns. Sampled after every hook call."""
    trace: list[tuple[bool, int]] = []  # (in backward, bytes held)
    for name in ("_on_forward", "_on_grad"):
        original = getattr(instrument.LayerCapture, name)

        def sampled(self, *args, _original=original):
            out = _original(self, *args)
            trace.append((instrument.in_backward(), _held_bytes(self.owner)))
            return out

        monkeypatch.setattr(instrument.LayerCapture, name, sampled)

    B, W, L = 16, 32, 6
    model = SegmentedMLP(dims=(W,) * (L + 1), segments=tuple((i, i + 2, True) for i in range(0, 2 * L - 2, 2))
                         + ((2 * L - 2, 2 * L - 1, False),))
    x, y = torch.randn(B, W, dtype=torch.float64), torch.randint(0, W, (B,))
    one = B * W * 8  # one layer's input, or its output-gradient
    peaks = {}
    for mode in ("plain", "non_reentrant"):
        trace.clear()
        _records(model, mode, x, y, steps=2)
        after_forward = [held for backward, held in trace if not backward][-1]
        peaks[mode] = (after_forward, max(held for _, held in trace))
    assert peaks["plain"] == (L * one, L * one)  # the count sees the inputs that autograd holds too
    assert peaks["non_reentrant"] == (one, one)  # the head's input: nothing of the checkpointed blocks


def _peak_live_bytes(run) -> int:
    """Peak of the live CPU tensor memory allocated inside ``run()`` (the profiler's running total)."""
    _, events = profile_memory(run)
    mem = [e["args"] for e in events]
    start = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(a["Total Allocated"] for a in mem) - start


def test_checkpointing_adds_nothing_to_the_trackers_memory():
    """The run's peak live memory, tracked minus untracked, with and without checkpointing block by block: the
    same (the tracker's spectra and one layer's statistics). A tracker holding the checkpointed layers' inputs
    from the forward on (as before this test: 4.9 MiB more here; 28.7 vs 8.9 MiB on 12 layers of 128, B=2048)
    would not."""
    L, W, B = 6, 64, 1024
    x, y = torch.randn(B, W), torch.randint(0, W, (B,))
    activation = B * W * 4  # one layer's input

    def run(model, tracked):
        model = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        tracker = Tracker(model, opt, rank=4) if tracked else None
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if tracker is not None:
            tracker.close()

    peak, extra = {}, {}
    for mode in ("plain", "non_reentrant"):
        model = SegmentedMLP(dims=(W,) * (2 * L + 1), segments=tuple((i, i + 4, True) for i in range(0, 4 * L, 4)),
                             dtype=torch.float32)
        model.mode = mode
        peak[mode] = _peak_live_bytes(lambda: run(model, False))
        extra[mode] = _peak_live_bytes(lambda: run(model, True)) - peak[mode]
    # The method sees the activations: checkpointing lowers the untracked peak by several layers' inputs.
    assert peak["plain"] - peak["non_reentrant"] >= 4 * activation, peak
    assert extra["non_reentrant"] <= extra["plain"] + activation, (
        f"the tracker adds {extra['non_reentrant'] / 2**10:.0f} KiB with checkpointing, "
        f"{extra['plain'] / 2**10:.0f} KiB without")
