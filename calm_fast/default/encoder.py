"""The encoder of the embedded default: a Hugging Face BERT (all-MiniLM-L6-v2) run in two halves.

Fine-tuning trains only the top layers, and every merging method here leaves a layer that no task
changed exactly at θ0, so the bottom of the network computes the same hidden states for every method.
:class:`Encoder` therefore runs the network as ``prefix`` (embeddings + layers ``< start``, computed once
per split with the pretrained weights and cached) and ``suffix`` (layers ``>= start`` + pooler + a task
head, with whatever tensors are loaded).  :meth:`Encoder.check_split_equals_full` verifies, on real
inputs, that this split run gives the logits of the plain ``BertModel`` forward; if it does not (another
transformers version), the runner falls back to ``start = 0``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .assets import offline, require_transformers

StateDict = Dict[str, torch.Tensor]


@dataclass
class Tokens:
    """A tokenized split, padded to its longest text; ``lengths`` are the true lengths."""
    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]


class Encoder:
    """Tokenizer + one working ``BertModel`` whose tensors are swapped with :meth:`load`."""

    def __init__(self, path: Path, max_length: int = 64):
        offline()
        transformers = require_transformers()
        transformers.logging.set_verbosity_error()  # the "classifier weights newly initialized" reports
        transformers.logging.disable_progress_bar()
        self.path = Path(path)
        self.max_length = max_length
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.bert = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        self.bert.eval()
        for p in self.bert.parameters():
            p.requires_grad_(False)
        self.config = self.bert.config
        self.num_layers = int(self.config.num_hidden_layers)
        #: θ0: the floating-point tensors of the pretrained encoder (the keys that are merged)
        self.base: StateDict = {k: v.detach().clone() for k, v in self.bert.state_dict().items()
                                if v.is_floating_point()}
        dropout = getattr(self.config, "classifier_dropout", None)
        self.head_dropout = float(dropout if dropout is not None else self.config.hidden_dropout_prob)

    # -------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tokens:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        mask = enc["attention_mask"]
        return Tokens(enc["input_ids"], mask, mask.sum(1))

    def load(self, encoder_state: StateDict) -> None:
        """Load encoder tensors (θ0's keys; missing keys keep their current value)."""
        with torch.no_grad():
            own = self.bert.state_dict()
            for k, v in encoder_state.items():
                if k in own:
                    own[k].copy_(v)

    def reset(self) -> None:
        self.load(self.base)

    def layer_of(self, key: str) -> int:
        """The first block that a tensor feeds: embeddings -> 0, ``encoder.layer.i`` -> i, pooler -> L."""
        if key.startswith("embeddings."):
            return 0
        if key.startswith("encoder.layer."):
            return int(key.split(".")[2])
        return self.num_layers

    def first_changed_layer(self, encoder_state: StateDict) -> int:
        """The lowest block whose tensors differ from θ0 (``num_layers`` if only the pooler does)."""
        changed = [self.layer_of(k) for k, v in encoder_state.items()
                   if k in self.base and not torch.equal(v, self.base[k])]
        return min(changed, default=self.num_layers)

    # -------------------------------------------------------------------------------------------
    def _mask4d(self, hidden: torch.Tensor, mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)

    def run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        m4 = self._mask4d(hidden, mask)
        for layer in self.bert.encoder.layer[start:stop]:
            out = layer(hidden, m4)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def prefix(self, tokens: Tokens, start: int, batch_size: int = 64) -> torch.Tensor:
        """Hidden states after the embeddings and layers ``< start`` with the weights loaded now (call
        it with θ0 loaded), ``[N, L, H]`` (padding positions are left as computed; they are masked)."""
        self.bert.eval()
        out = torch.zeros(len(tokens), tokens.ids.shape[1], self.config.hidden_size)
        for idx in _length_batches(tokens.lengths, batch_size):
            n = int(tokens.lengths[idx].max())
            ids, mask = tokens.ids[idx, :n], tokens.mask[idx, :n]
            hidden = self.bert.embeddings(input_ids=ids)
            out[idx, :n] = self.run_layers(hidden, mask, 0, start)
        return out

    def suffix(self, hidden: torch.Tensor, mask: torch.Tensor, start: int, head: StateDict,
               train: bool = False) -> torch.Tensor:
        """Logits from hidden states after layer ``start - 1``: layers ``>= start``, pooler, head."""
        hidden = self.run_layers(hidden, mask, start, self.num_layers)
        pooled = self.bert.pooler(hidden)
        pooled = F.dropout(pooled, self.head_dropout, training=train)
        return F.linear(pooled, head["classifier.weight"], head["classifier.bias"])

    @torch.no_grad()
    def logits(self, tokens: Tokens, head: StateDict, start: int = 0, cached: Optional[torch.Tensor] = None,
               batch_size: int = 64) -> torch.Tensor:
        """Eval-mode logits of a split; ``cached`` is :meth:`prefix`'s output for the same ``start``."""
        self.bert.eval()
        out = torch.empty(len(tokens), head["classifier.weight"].shape[0])
        for idx in _length_batches(tokens.lengths, batch_size):
            n = int(tokens.lengths[idx].max())
            mask = tokens.mask[idx, :n]
            if cached is None:
                hidden = self.run_layers(self.bert.embeddings(input_ids=tokens.ids[idx, :n]), mask, 0, start)
            else:
                hidden = cached[idx, :n]
            out[idx] = self.suffix(hidden, mask, start, head)
        return out

    @torch.no_grad()
    def full_logits(self, tokens: Tokens, head: StateDict) -> torch.Tensor:
        """The plain Hugging Face forward (``BertModel(...).pooler_output`` + head), for checking."""
        self.bert.eval()
        pooled = self.bert(input_ids=tokens.ids, attention_mask=tokens.mask).pooler_output
        return F.linear(pooled, head["classifier.weight"], head["classifier.bias"])

    def check_split_equals_full(self, tokens: Tokens, head: StateDict, start: int, atol: float = 1e-4) -> float:
        """Max |split-run logits − plain-forward logits| on ``tokens``; raises if above ``atol``."""
        cached = self.prefix(tokens, start)
        err = float((self.logits(tokens, head, start, cached) - self.full_logits(tokens, head)).abs().max())
        if not err <= atol:
            raise RuntimeError(f"the split encoder run differs from the plain forward by {err:.3g}")
        return err


def _length_batches(lengths: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    """Indices in batches of similar length (less padding), in a fixed order."""
    order = torch.argsort(lengths, stable=True)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def new_head(num_labels: int, hidden: int, seed: int, std: float = 0.02) -> StateDict:
    """A classifier as Hugging Face initialises it (normal(0, std) weight, zero bias), seeded."""
    g = torch.Generator().manual_seed(seed)
    return {"classifier.weight": torch.randn(num_labels, hidden, generator=g) * std,
            "classifier.bias": torch.zeros(num_labels)}
