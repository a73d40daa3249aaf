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

Stacked LoRA (Punica's SGMV, vLLM's `einsum` over `lora_b[indices]`, written for the CPU): the plain LoRA adapters
that are *resident* sit in each layer as one stack, A_cat (R, in) and B_cat (out, R), R = Σ rᵢ. A step's rows say how
much of each resident adapter they want, `mix` (B, N); per layer E (N, R) spreads each adapter's scale over its
columns, so one product serves every row: out = base(x) + ((x A_catᵀ) ⊙ (mix E)) B_catᵀ. A row with one adapter
has a single 1 in its mix row; a row composing adapters (LoRAX's `merged_adapters`, linear) has their weights: that
is Σ wᵢ sᵢ Bᵢ Aᵢ x, exactly the concatenated adapter `lorafit merge --combine sum --as-adapter` writes. Methods that
cannot stack (DoRA, VeRA, ...) keep the per-adapter loop below.

Residency (`max_resident`, vLLM's max_loras): at most that many adapters sit in the model; the others wait on the
CPU (their layers out of the model) and are swapped in, least recently used out first, by `make_resident`.

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
        self.resident: list[str] = []  # the stacked adapters, in the order of every layer's stack (set by the bank)
        self.mix: torch.Tensor | None = None  # (B, N): row b's weight on resident adapter n, with `groups`

    def set_rows(self, rows: Sequence[str | dict[str, float] | None], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        """rows[i]: an adapter name, {name: weight} (several composed, stacked LoRA only), or None (the base)."""
        groups: dict[str, list[int]] = {}
        mix = torch.zeros(len(rows), len(self.resident), dtype=dtype)  # (B, N)
        column = {name: n for n, name in enumerate(self.resident)}
        for i, row in enumerate(rows):
            for name, weight in ({row: 1.0} if isinstance(row, str) else row or {}).items():
                groups.setdefault(name, []).append(i)
                if name in column:
                    mix[i, column[name]] = weight
        self.whole, self.batch = None, len(rows)
        self.groups = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in groups.items()}
        self.mix = mix.to(device) if bool(mix.any()) else None  # None: no row uses a stacked adapter this step

    def save(self) -> tuple:
        return self.whole, self.groups, self.batch, self.mix

    def restore(self, saved: tuple) -> None:
        self.whole, self.groups, self.batch, self.mix = saved


class MultiAdapterLinear(nn.Module):
    """A frozen base layer plus named adapter layers around it; `Selection` says which rows use which."""

    def __init__(self, base_layer: nn.Module, selection: Selection):
        super().__init__()
        self.base_layer = base_layer
        self.selection = selection
        self.adapters: dict[str, AdapterLayer] = {}  # a plain dict: names are free text; weights stay where loaded
        self.stacked: set[str] = set()  # adapters served by the stack below, not by their own forward
        self.a_cat: torch.Tensor | None = None  # (R, in): the stacked adapters' A, one block of rᵢ rows each
        self.b_cat: torch.Tensor | None = None  # (out, R)
        self.spread: torch.Tensor | None = None  # E, (N, R): resident adapter n's scale on its own R columns

    def restack(self, resident: Sequence[str]) -> None:
        """Rebuild the stack from the resident plain-LoRA adapters, in `resident` order (the selection's columns)."""
        names = [n for n in resident if n in self.adapters and stackable(self.adapters[n])]
        self.stacked = set(names)
        if not names:
            self.a_cat = self.b_cat = self.spread = None
            return
        layers = [self.adapters[n] for n in names]
        self.a_cat = torch.cat([layer.lora_A.weight for layer in layers])  # (R, in)
        self.b_cat = torch.cat([layer.lora_B.weight for layer in layers], dim=1)  # (out, R)
        self.spread = self.a_cat.new_zeros(len(resident), len(self.a_cat))  # (N, R)
        start = 0
        for name, layer in zip(names, layers, strict=True):
            self.spread[list(resident).index(name), start: start + layer.r] = layer.scale
            start += layer.r

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
        if self.a_cat is not None and sel.mix is not None and sel.mix.shape[1] == len(self.spread):
            # one product for every row and resident adapter: (B, T, in) -> (B, T, R) -> masked -> (B, T, out)
            if sel.mix.shape[0] != x.shape[0]:
                raise LorafitError(f"per-row adapters: a layer got {x.shape[:-1].numel()} tokens in {x.shape[0]} "
                                   f"rows, not the batch of {sel.mix.shape[0]} the adapters were chosen for")
            coeff = (sel.mix.to(self.spread.dtype) @ self.spread)[:, None, :]  # (B, 1, R): each row's columns
            x_in = x.to(self.a_cat.dtype)
            update = ((x_in @ self.a_cat.T) * coeff) @ self.b_cat.T  # (B, T, out)
            result = result + update.to(result.dtype)
        for name, rows in sel.groups.items():
            layer = self.adapters.get(name)
            if layer is None or name in self.stacked:
                continue  # not adapting this module (its rows keep the base output), or served by the stack
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


def stackable(layer: nn.Module) -> bool:
    """A plain LoRA layer (LoRA-FA included: the same product at inference) whose update is s·B A x."""
    return isinstance(layer, LoraLinear) and not layer.dora


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

    def __init__(self, model: nn.Module, max_resident: int | None = None):
        self.model = model
        self.selection = Selection()
        self.layers: dict[str, MultiAdapterLinear] = {}  # module name -> its multi-adapter layer
        self.names: list[str] = []  # adapters, in the order added
        self.max_resident = max_resident  # None: every adapter stays in the model
        self.resident: list[str] = []  # in the model, least recently used first
        self.parked: dict[str, dict[str, AdapterLayer]] = {}  # out of the model, on the CPU: name -> module -> layer
        self.swaps = 0  # adapters brought back into the model

    def limit(self, max_resident: int | None) -> None:
        """At most `max_resident` adapters in the model from now on (None: all); the least recently used are parked."""
        self.max_resident = max_resident
        while max_resident is not None and len(self.resident) > max_resident:
            self._park(self.resident[0])
        self._restack()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _restack(self) -> None:
        self.selection.resident = list(self.resident)
        for multi in self.layers.values():
            multi.restack(self.resident)

    def make_resident(self, names: Sequence[str], keep: Sequence[str] = ()) -> int:
        """Bring `names` into the model, parking least recently used adapters (never one in `keep` or `names`) on
        the CPU to stay within `max_resident`; `names` become the most recently used. Returns adapters swapped in.

        Raises:
            LorafitError: more adapters asked for (with `keep`) than `max_resident` allows, or an unknown name.
        """
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            if name not in self.names:
                raise LorafitError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.names) or 'none'})")
        pinned = set(wanted) | set(keep)
        if self.max_resident is not None and len(pinned) > self.max_resident:
            raise LorafitError(f"{len(pinned)} adapters asked for at once; at most {self.max_resident} fit")
        brought = 0
        for name in wanted:
            if name in self.resident:
                self.resident.remove(name)
                self.resident.append(name)
                continue
            while self.max_resident is not None and len(self.resident) >= self.max_resident:
                self._park(next(n for n in self.resident if n not in pinned))
            self._unpark(name)
            brought += 1
        self.swaps += brought
        if brought:
            self._restack()
        return brought

    def _park(self, name: str) -> None:
        held = {}
        for module, multi in self.layers.items():
            layer = multi.adapters.pop(name, None)
            if layer is not None:
                held[module] = _adapter_part(layer).to("cpu")
        self.parked[name] = held
        self.resident.remove(name)

    def _unpark(self, name: str) -> None:
        for module, part in self.parked.pop(name).items():
            part.to(self.device)
            self.layers[module].adapters[name] = part.layer
        self.resident.append(name)

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
        self.resident.append(name)
        if self.max_resident is not None and len(self.resident) > self.max_resident:
            self._park(name)  # no room: it waits on the CPU until a request asks for it
        self._restack()

    def remove(self, name: str) -> None:
        """Drop adapter `name` (its weights are freed once nothing else holds them)."""
        if name not in self.names:
            raise LorafitError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.names) or 'none'})")
        for multi in self.layers.values():
            multi.adapters.pop(name, None)
        self.names.remove(name)
        self.parked.pop(name, None)
        if name in self.resident:
            self.resident.remove(name)
        self._restack()

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[nn.Module]:
        """Every row runs adapter `name` (None: the base) inside the block."""
        if name is not None and name not in self.names:
            raise LorafitError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.names) or 'none'})")
        if name is not None:
            self.make_resident([name])
        previous = self.selection.save()
        self.selection.whole, self.selection.groups = name, None
        try:
            yield self.model
        finally:
            self.selection.restore(previous)

    @contextlib.contextmanager
    def rows(self, names: Sequence[str | dict[str, float] | None]) -> Iterator[nn.Module]:
        """Row i of every batch inside the block runs adapter names[i] (None: the base; {name: weight, ...}: those
        plain LoRA adapters composed linearly). Parked adapters the rows name are swapped in first."""
        used = [n for row in names for n in ({row: 1} if isinstance(row, str) else row or {})]
        unknown = [n for n in used if n not in self.names]
        if unknown:
            raise LorafitError(f"no adapter named {unknown[0]!r} is loaded (loaded: {', '.join(self.names) or 'none'})")
        self.make_resident(used)
        previous = self.selection.save()
        self.selection.set_rows(names, self.device)
        try:
            yield self.model
        finally:
            self.selection.restore(previous)


class _Part(nn.Module):
    """One parked adapter layer's own weights, moved without its (shared, frozen) base layer."""

    def __init__(self, layer: AdapterLayer):
        super().__init__()
        self.layer = layer

    def to(self, device):  # noqa: D102 - every parameter of the layer except the base layer's
        base = self.layer.base_layer
        for child in self.layer.children():
            if child is not base:
                child.to(device)
        for param in self.layer.parameters(recurse=False):
            param.data = param.data.to(device)
        return self


def _adapter_part(layer: AdapterLayer) -> _Part:
    return _Part(layer)
