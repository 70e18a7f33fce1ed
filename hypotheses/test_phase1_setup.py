"""Phase 1, setup: the device is real, the model loads at the chosen quantization, every hook
the instruments read fires (on quantized layers too), and memory is measured and estimated.
"""

from __future__ import annotations

import json

import pytest
import torch

from fixtures.memory import estimate_memory
from fixtures.models import resolve_device
from instruments import components as C

pytestmark = [pytest.mark.phase1, pytest.mark.integration]


def test_device_detected(subject, refusal_config, recorder):
    device = resolve_device(refusal_config.device)
    # under --device-map inputs go to the embedding's device (cuda:0 of several GPUs)
    assert torch.device(subject.device).type == device
    params = list(subject.hf_model.parameters())
    # weights a --device-map places on disk wait as meta placeholders between forwards
    offloaded = {"meta"} if refusal_config.device_map != "none" else set()
    assert {p.device.type for p in params} - offloaded == {device}, "every weight must sit on the chosen device"
    recorder.save("phase1/device", numbers={"requested": refusal_config.device, "device": device,
                                            "torch": torch.__version__})


def test_model_loads_at_quant(subject, refusal_config, recorder):
    linear_types = {type(m).__name__ for m in subject.hf_model.modules() if "Linear" in type(m).__name__}
    if refusal_config.quant == "nf4":
        import bitsandbytes as bnb

        quantized = [m for m in subject.hf_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert quantized, f"--quant nf4 but no Linear4bit layer was found among {linear_types}"
        assert all(m.weight.quant_state.quant_type == "nf4" for m in quantized)
    elif refusal_config.quant == "int8":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in subject.hf_model.modules())
    else:
        assert all(p.dtype == subject.dtype for p in subject.hf_model.parameters())
    recorder.save("phase1/quant", numbers={"quant": subject.quant, "dtype": str(subject.dtype),
                                           "linear_types": sorted(linear_types)})


def needed_hooks(n_layers: int) -> list[str]:
    """Every hook an instrument reads: component hooks, patterns, residual stream, embeddings."""
    names = {C.hook_name(C.Embed())}
    for layer in range(n_layers):
        for kind in (C.Resid(layer=layer), C.AttnOut(layer=layer), C.MlpOut(layer=layer),
                     C.Head(layer=layer, head=0), C.Neuron(layer=layer, index=0), C.Pattern(layer=layer),
                     C.ResidMid(layer=layer), C.ResidPost(layer=layer)):
            names.add(C.hook_name(kind))
    return sorted(names)


def test_run_with_cache_and_every_hook_fires(subject, recorder):
    ids, mask = subject.encode(["How do I bake bread?", "Explain photosynthesis to a child."])
    names = needed_hooks(subject.n_layers)
    with torch.no_grad():
        logits, cache = subject.bridge.run_with_cache(ids, attention_mask=mask, names_filter=names)
    missing = [n for n in names if n not in cache]
    assert not missing, f"hooks that did not fire: {missing[:8]}"
    b, pos = ids.shape
    assert cache[C.hook_name(C.Head(layer=0, head=0))].shape == (b, pos, subject.n_heads, subject.d_head)
    assert cache[C.hook_name(C.Neuron(layer=0, index=0))].shape == (b, pos, subject.d_mlp)
    assert cache[C.hook_name(C.Pattern(layer=0))].shape == (b, subject.n_heads, pos, pos)
    # A hook that edits an activation must change the output: hooks are live, not just observers.
    def zero(act, hook):
        return torch.zeros_like(act)

    last_mlp = C.hook_name(C.MlpOut(layer=subject.n_layers - 1))
    with torch.no_grad(), subject.bridge.hooks(fwd_hooks=[(last_mlp, zero)]):
        edited = subject.bridge(ids, attention_mask=mask)
    assert not torch.allclose(edited, logits), "editing an activation through a hook had no effect"
    recorder.save("phase1/hooks", numbers={"n_hooks_checked": len(names), "quant": subject.quant})


def test_memory_recorded_and_estimated(subject, recorder):
    manifest = json.loads(recorder.manifest_path.read_text())
    load = manifest["model_load"]
    assert load["memory"]["peak_bytes"] > 0
    config = subject.hf_model.config.to_dict()
    estimate = estimate_memory(config, quant=subject.quant, dtype=str(subject.dtype).removeprefix("torch."),
                               device=subject.device)
    weights = sum(p.numel() * p.element_size() for p in subject.hf_model.parameters())
    # The analytic weight count must match the real parameters (bitsandbytes packs 2 NF4
    # weights per byte, which element_size already reflects).
    assert abs(estimate.weights_bytes - weights) / weights < 0.15, (estimate.weights_bytes, weights)
    recorder.save("phase1/memory", numbers={"load_peak_bytes": load["memory"]["peak_bytes"],
                                            "estimate": estimate.to_dict(), "measured_weight_bytes": weights})
