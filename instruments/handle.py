"""What an instrument may use of a loaded model: the :class:`ModelHandle` protocol.

Instruments take any object with these members; ``fixtures.models.ModelHandle`` is the one
the suite loads (tests/test_layering.py checks that it has every one). Only the members
listed here may be read by code in ``instruments/``; anything else an instrument needs
belongs here first, so a new kind of handle knows what to provide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class ModelHandle(Protocol):
    """A loaded chat model, read-only: hooks attach through ``bridge.hooks(...)`` context managers."""

    @property
    def bridge(self) -> Any:
        """The TransformerLens ``TransformerBridge``: called for logits, ``hooks(...)``, ``run_with_cache``,
        ``hook_dict``, ``ln_final`` and ``unembed``."""

    @property
    def hf_model(self) -> Any:
        """The Hugging Face model inside the bridge (its ``forward`` signature, input embeddings, layers)."""

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (``decode``, ``pad_token_id``, its chat template)."""

    @property
    def device(self) -> str:
        """Where the weights live: ``cpu``, ``cuda`` or ``mps``."""

    @property
    def quant(self) -> str:
        """``none``, ``nf4`` or ``int8``: weight edits and some sweeps need full precision."""

    @property
    def n_layers(self) -> int: ...

    @property
    def n_heads(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    @property
    def d_mlp(self) -> int: ...

    def chat(self, prompt: str) -> str:
        """One user turn in the model's own chat template, ready for generation."""

    def encode(self, prompts: Sequence[str], *, chat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded token ids and attention mask on the model's device (position -1 is each prompt's last)."""
