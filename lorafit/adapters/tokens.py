"""Token rows and whole modules trained beside the adapter: PEFT's `trainable_token_indices` and `modules_to_save`.

Token rows. A few rows of the embedding (and of an untied output head) train on their own: the layer keeps the
frozen matrix W and a trained (n, dim) block D of replacement rows for the token ids I, and acts as W with
W[I] := D — PEFT's TrainableTokensLayer, whose saved `trainable_tokens_delta` is D itself (the rows' values, not a
difference). Only D trains; the embedding looks the ids up in W and overwrites the positions holding an id of I,
the head computes x·Wᵀ and overwrites the columns of I with x·Dᵀ, so no (V, dim) copy of W is made per step. With
tied embeddings the head's layer shares the embedding's D (saved once).

Untrained rows. A base model's special tokens that pretraining never used keep their initial row: Llama-3 bases
ship `<|eot_id|>` and the reserved tokens with rows at zero or about 1e-3 of a trained row's norm, so a chat
fine-tune that ends turns with them learns nothing at those rows (NaNs or models that never stop). A row counts
as untrained when its L2 norm is below `UNTRAINED_RATIO` × the median row norm (`untrained_rows`).

modules_to_save. Whole modules (the head, the embedding) train in place and are saved whole; a module whose
weight is tied to another gets its own copy first, as PEFT's ModulesToSaveWrapper does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.errors import LorafitError

# A row whose norm is below this fraction of the median row norm is untrained (see the module docstring; the
# measurements behind it are in docs/config.md, adapter.train_tokens).
UNTRAINED_RATIO = 1e-2
TOKEN_ADAPTER = "token_adapter"  # PEFT's names: <module>.token_adapter.trainable_tokens_delta
DELTA = "trainable_tokens_delta"


# ----------------------------------------------------------------------------------------- pure functions


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of a (V, dim) matrix, in fp32: (V,)."""
    return torch.linalg.vector_norm(weight.detach().float(), dim=1)


def untrained_rows(weight: torch.Tensor, ids: list[int], ratio: float = UNTRAINED_RATIO) -> list[int]:
    """The ids among `ids` whose row of `weight` (V, dim) is untrained: norm < ratio × the median row norm."""
    norms = row_norms(weight)
    limit = ratio * float(norms.median())
    return [i for i in ids if i < weight.shape[0] and float(norms[i]) < limit]


def mean_row(weight: torch.Tensor, exclude: list[int] = ()) -> torch.Tensor:
    """The mean of `weight`'s rows but `exclude` (new or untrained rows), in fp32: (dim,)."""
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[list(exclude)] = False
    return weight.detach().float()[keep].mean(dim=0)


# ---------------------------------------------------------------------------------------------- the layer


class TokenRows(nn.Module):
    """An embedding or output head whose rows `token_indices` are replaced by a trained block (PEFT's
    TrainableTokensLayer). The original module stays, frozen, as ``base_layer``."""

    def __init__(self, base_layer: nn.Module, token_indices: list[int], delta: nn.Parameter | None = None):
        """Wrap `base_layer` (nn.Embedding or nn.Linear).

        Args:
            token_indices: the trained rows' ids, in the order of the block's rows.
            delta: share this (n, dim) block (the tied head shares the embedding's); default: a new block holding
                the rows' current values.
        """
        super().__init__()
        if not isinstance(base_layer, nn.Embedding | nn.Linear):
            raise LorafitError(f"token rows train on an embedding or a linear head, not a {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.token_indices = list(token_indices)
        self.register_buffer("_index", torch.tensor(self.token_indices, dtype=torch.long,
                                                    device=base_layer.weight.device), persistent=False)
        self.tied = delta is not None
        if delta is None:
            delta = nn.Parameter(base_layer.weight.detach()[self._index].float().clone())
        # A tied layer keeps the shared block out of its own parameters (it is saved once, by the embedding).
        if self.tied:
            self._shared = [delta]
        else:
            self.trainable_tokens_delta = delta

    @property
    def delta(self) -> nn.Parameter:
        return self._shared[0] if self.tied else self.trainable_tokens_delta

    @property
    def weight(self) -> torch.Tensor:
        """The effective matrix W with W[I] := D (merge, export and transformers' look-ups read it)."""
        w = self.base_layer.weight
        return w.index_copy(0, self._index, self.delta.to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = base(x)  # (B, T, dim)
            slot = torch.full((base.weight.shape[0],), -1, dtype=torch.long, device=x.device)
            slot[self._index] = torch.arange(len(self.token_indices), device=x.device)
            s = slot[x]  # (B, T): row of D, or -1
            rows = self.delta.to(out.dtype)[s.clamp(min=0)]  # (B, T, dim)
            scale = getattr(base, "embed_scale", None)  # Gemma's scaled embedding multiplies inside its forward
            if scale is not None:
                rows = rows * scale.to(rows.dtype)
            return torch.where((s >= 0).unsqueeze(-1), rows, out)
        out = base(x)  # (..., V)
        cols = F.linear(x.to(self.delta.dtype), self.delta)  # (..., n)
        if base.bias is not None:
            cols = cols + base.bias[self._index].to(cols.dtype)
        return out.index_copy(-1, self._index, cols.to(out.dtype))

    def merge_into_base(self) -> nn.Module:
        """The base module with the trained rows written into its weight (for merge / unwrapping)."""
        with torch.no_grad():
            self.base_layer.weight.index_copy_(0, self._index, self.delta.to(self.base_layer.weight.dtype))
        return self.base_layer


# ------------------------------------------------------------------------------------------ whole models


def token_row_layers(model: nn.Module) -> dict[str, TokenRows]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TokenRows)}


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def heads_tied(model: nn.Module) -> bool:
    """True when the output head shares the input embedding's weight."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def attach_token_rows(model: nn.Module, ids: list[int], embed: bool = True, head: bool = True) -> list[str]:
    """Train the rows `ids` of the input embedding and of the output head (a tied head shares the embedding's
    block), starting from their current values. `embed` / `head` False: leave that one (it trains whole).

    Returns:
        The wrapped module names (embedding first).
    """
    ids = sorted(set(ids))
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = heads_tied(model)
    names, rows = [], None
    if embed:
        names.append(_module_name(model, inp))
        rows = TokenRows(inp, ids)
        model.set_input_embeddings(rows)
    if head and out is not None:
        names.append(_module_name(model, out))
        shared = rows.delta if tied and rows is not None else None
        model.set_output_embeddings(TokenRows(out, ids, delta=shared))
    return names


def init_rows(model: nn.Module, ids: list[int], exclude: list[int] = ()) -> None:
    """Set rows `ids` of the embedding and the untied head to the mean of their other rows (but `exclude`: other
    new or untrained rows, which would pull the mean towards zero)."""
    if not ids:
        return
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    modules = [embed] + ([head] if head is not None and not heads_tied(model) else [])
    with torch.no_grad():
        for m in modules:
            m.weight[list(ids)] = mean_row(m.weight, [*ids, *exclude]).to(m.weight.dtype)


def unwrap_token_rows(model: nn.Module, merge: bool = True) -> None:
    """Put the embedding and head back (with the trained rows written in when `merge`)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(head, TokenRows):
        model.set_output_embeddings(head.merge_into_base() if merge else head.base_layer)
    if isinstance(embed, TokenRows):
        model.set_input_embeddings(embed.merge_into_base() if merge else embed.base_layer)


def token_row_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{`<module>.token_adapter.trainable_tokens_delta`: D} for each untied token-row layer (PEFT's names, without
    the ``base_model.model.`` prefix)."""
    return {f"{name}.{TOKEN_ADAPTER}.{DELTA}": layer.delta.detach()
            for name, layer in token_row_layers(model).items() if not layer.tied}


def find_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The modules `names` (exact names or suffixes) select, PEFT's modules_to_save rule.

    Raises:
        LorafitError: a name matching no module (the model's top-level and leaf module names listed).
    """
    found, missing = {}, []
    for key in names:
        hits = {n: m for n, m in model.named_modules() if n and (n == key or n.endswith("." + key))
                and not isinstance(m, TokenRows)}
        if not hits:
            missing.append(key)
        found.update(hits)
    if missing:
        leaves = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if n and not list(m.children())})
        raise LorafitError(f"adapter.modules_to_save: {', '.join(missing)} matches no module of the model; its "
                           f"modules are named {', '.join(leaves)} (e.g. lm_head, embed_tokens)")
    return found


def train_whole(model: nn.Module, names: list[str]) -> list[str]:
    """Make the modules `names` select trainable in place (modules_to_save); a weight shared with another module
    (tied embeddings) is given its own copy first, so the other one stays as it was. Returns the module names."""
    found = find_modules(model, names)
    shared = {id(p) for n, m in model.named_modules() if n not in found for p in m.parameters(recurse=False)}
    for module in found.values():
        for pname, p in list(module.named_parameters(recurse=False)):
            if id(p) in shared:
                setattr(module, pname, nn.Parameter(p.detach().clone()))
        for p in module.parameters():
            p.requires_grad_(True)
    if heads_tied(model) is False and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # saved merged models must not tie them again on load
    return list(found)


def whole_module_tensors(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """{`<module>.<param>`: tensor} of the modules_to_save (PEFT saves them under the module's own names)."""
    modules = dict(model.named_modules())
    return {f"{n}.{p}": t.detach() for n in names for p, t in modules[n].named_parameters(recurse=True)}
