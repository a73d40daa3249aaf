"""Several named adapters on one loaded base model, chosen per batch or per row.

A `MultiAdapterLinear` takes the place of a wrapped module: it keeps the frozen base layer and, by name, the adapter
layers (LoRA, DoRA, any method) that each adapter has for that module, every one wrapping the *same* base layer (no
weight is copied). An `AdapterBank` owns the model's multi-adapter layers and one `Selection` they all read:

    whole batch   bank.use("a"): every row runs adapter "a" through its own layer's forward (bit-for-bit what the
                  model with only that adapter attached computes); bank.use(None): the base
    per row       bank.rows(["a", None, "b", "a"]): one forward pass for a mixed batch. Each layer computes the base
                  output for all rows, then, for each adapter present, its rows' update (LoRA: s·B(A(x_rows)),
                  added with index_add_; other methods: their forward on those rows). Rows with None get the base.
                  A row's result depends only on its own inputs, so a request served alone and in a mixed batch
                  takes the same path (PEFT's mixed-batch inference works the same way).
                  MoE expert layers (`ExpertLora`) see the block's tokens flattened row-major, (B·T, hidden), with
                  their routing (top-k indices and weights, (B·T, k)), not rows: each adapter runs on its rows'
                  tokens (every token-aligned argument selected alike) and its output replaces theirs.

Several weights of one experts module nest (ExpertLora around ExpertLora around the experts module): the outermost
layer stands for the module, the inner ones ride inside it, and the bare experts module is the shared base.

Adapters are added (`add`) and removed (`remove`) at run time. This module loads no files: the caller attaches an
adapter with `lorafit.adapters.peft_io.load_adapter` inside `bank.detached()` and hands the layers over with
`take_adapter_layers`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lorafit.adapters.base import AdapterLayer
from lorafit.adapters.experts import ExpertLora
from lorafit.adapters.lora import LoraLinear
from lorafit.adapters.wrap import lora_layers
from lorafit.errors import LorafitError


class Selection:
    """Which adapter each row of the next forward passes uses; shared by all multi-adapter layers of a model."""

    def __init__(self) -> None:
        self.whole: str | None = None  # every row: this adapter (None: the base), unless `groups` is set
        self.groups: dict[str, torch.Tensor] | None = None  # per row: adapter -> row indices (B_k,)
        self.batch = 0  # B, the rows of the batches `groups` indexes

    def set_rows(self, names: Sequence[str | None], device: torch.device) -> None:
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            if name is not None:
                groups.setdefault(name, []).append(i)
        self.whole, self.batch = None, len(names)
        self.groups = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in groups.items()}

    def save(self) -> tuple:
        return self.whole, self.groups, self.batch

    def restore(self, saved: tuple) -> None:
        self.whole, self.groups, self.batch = saved


class MultiAdapterLinear(nn.Module):
    """A frozen base layer plus named adapter layers around it; `Selection` says which rows use which."""

    def __init__(self, base_layer: nn.Module, selection: Selection):
        super().__init__()
        self.base_layer = base_layer
        self.selection = selection
        self.adapters: dict[str, AdapterLayer] = {}  # a plain dict: names are free text; weights stay where loaded

    def forward(self, *args, **kwargs):
        """The wrapped module's own arguments: x for a linear layer; (hidden_states, routing...) for experts."""
        sel = self.selection
        if sel.groups is None:
            layer = self.adapters.get(sel.whole) if sel.whole is not None else None
            return self.base_layer(*args, **kwargs) if layer is None else layer(*args, **kwargs)
        if any(isinstance(layer, ExpertLora) for layer in self.adapters.values()):
            return self._expert_rows(args, kwargs)
        (x,) = args
        result = self.base_layer(x)  # (B, T, out)
        for name, rows in sel.groups.items():
            layer = self.adapters.get(name)
            if layer is None:
                continue  # this adapter does not adapt this module: its rows keep the base output
            x_rows = x.index_select(0, rows)  # (B_k, T, in)
            if type(layer) is LoraLinear and not layer.dora:
                x_in = x_rows.to(layer.lora_A.weight.dtype)
                update = layer.lora_B(layer.lora_A(x_in)) * layer.scale  # (B_k, T, out)
                result = result.index_add(0, rows, update.to(result.dtype))
            else:
                result = result.index_copy(0, rows, layer(x_rows).to(result.dtype))
        return result

    def _expert_rows(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """Per-row adapters on an experts module, which gets N = B·T tokens (row-major: tokens i·T .. i·T+T-1 are
        row i's) with their routing, or B rows: each adapter's forward on its rows' tokens replaces theirs."""
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        tokens, batch = tensors[0].shape[0], self.selection.batch
        if batch < 1 or tokens % batch:
            raise LorafitError(f"per-row adapters: an experts module got {tokens} tokens, not a whole number per row "
                               f"of the batch of {batch}; run one adapter per batch (AdapterBank.use)")
        per_row = tokens // batch  # T (1 when the module gets rows, not flattened tokens)
        result = self.base_layer(*args, **kwargs)  # (N, hidden)
        for name, rows in self.selection.groups.items():
            layer = self.adapters.get(name)
            if layer is None:
                continue  # this adapter does not adapt this module: its tokens keep the base output
            index = (rows[:, None] * per_row + torch.arange(per_row, device=rows.device)).flatten()  # (B_k·T,)
            out = layer(*[_tokens_of(a, index, tokens) for a in args],
                        **{k: _tokens_of(v, index, tokens) for k, v in kwargs.items()})
            result = result.index_copy(0, index.to(result.device), out.to(result.dtype))
        return result

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.adapters)}"


def _tokens_of(arg, index: torch.Tensor, tokens: int):
    """`arg` at the token positions `index` when it is token-aligned (hidden states, top-k indices and weights: first
    dimension `tokens`); any other argument as it is."""
    if isinstance(arg, torch.Tensor) and arg.dim() > 0 and arg.shape[0] == tokens:
        return arg.index_select(0, index.to(arg.device))
    return arg


def take_adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Remove the model's adapter layers without merging (each base layer goes back) and return them by module name;
    they keep wrapping the model's own base layers. Nested layers come back as their outermost, under the module's
    name, and the module itself (not an inner layer) goes back."""
    layers = lora_layers(model)
    # nested layers (two weights of one experts module): the outermost stands for the module, inner ones ride in it
    outermost = {name: layer for name, layer in layers.items()
                 if not (name.endswith(".base_layer") and name.removesuffix(".base_layer") in layers)}
    for name, layer in outermost.items():
        model.set_submodule(name, innermost_base(layer))
    return outermost


def innermost_base(layer: nn.Module) -> nn.Module:
    """The model's own module under an adapter layer and any adapter layers nested inside it."""
    while isinstance(layer, AdapterLayer):
        layer = layer.base_layer
    return layer


class AdapterBank:
    """The named adapters held on one base model, and which rows use which (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.selection = Selection()
        self.layers: dict[str, MultiAdapterLinear] = {}  # module name -> its multi-adapter layer
        self.names: list[str] = []  # adapters, in the order added

    @contextlib.contextmanager
    def detached(self) -> Iterator[nn.Module]:
        """The bare base model for the block (to attach one adapter with the usual loader); the multi-adapter
        layers are put back afterwards, also when the block fails (any layers it left are dropped)."""
        for name, multi in self.layers.items():
            self.model.set_submodule(name, multi.base_layer)
        try:
            yield self.model
        finally:
            take_adapter_layers(self.model)
            for name, multi in self.layers.items():
                self.model.set_submodule(name, multi)

    def add(self, name: str, layers: dict[str, AdapterLayer]) -> None:
        """Hold `layers` (from `take_adapter_layers`, wrapping this model's base layers) as adapter `name`.

        Raises:
            LorafitError: the name is taken, or a layer does not wrap this model's base layer.
        """
        if name in self.names:
            raise LorafitError(f"adapter name {name!r} is already loaded; give each adapter its own name")
        for module, layer in layers.items():
            multi = self.layers.get(module)
            if multi is None:
                base = self.model.get_submodule(module)
                multi = self.layers[module] = MultiAdapterLinear(base, self.selection)
                self.model.set_submodule(module, multi)
            if innermost_base(layer) is not multi.base_layer:
                raise LorafitError(f"adapter {name!r}: its layer {module} wraps another model's weights")
            layer.eval()
            multi.adapters[name] = layer
        self.names.append(name)

    def remove(self, name: str) -> None:
        """Drop adapter `name` (its weights are freed once nothing else holds them)."""
        if name not in self.names:
            raise LorafitError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.names) or 'none'})")
        for multi in self.layers.values():
            multi.adapters.pop(name, None)
        self.names.remove(name)

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[nn.Module]:
        """Every row runs adapter `name` (None: the base) inside the block."""
        if name is not None and name not in self.names:
            raise LorafitError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.names) or 'none'})")
        previous = self.selection.save()
        self.selection.whole, self.selection.groups = name, None
        try:
            yield self.model
        finally:
            self.selection.restore(previous)

    @contextlib.contextmanager
    def rows(self, names: Sequence[str | None]) -> Iterator[nn.Module]:
        """Row i of every batch inside the block runs adapter names[i] (None: the base)."""
        unknown = [n for n in names if n is not None and n not in self.names]
        if unknown:
            raise LorafitError(f"no adapter named {unknown[0]!r} is loaded (loaded: {', '.join(self.names) or 'none'})")
        previous = self.selection.save()
        self.selection.set_rows(names, next(self.model.parameters()).device)
        try:
            yield self.model
        finally:
            self.selection.restore(previous)
