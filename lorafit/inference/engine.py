"""The engine: iteration-level scheduling (Orca) over one model, its adapters and a `SlotCache`.

Each `step`:
  1. rows whose request was cancelled (a client that went away) leave;
  2. waiting requests are admitted while slots are free and the step's distinct adapters stay within `max_loras`
     (parked adapters are swapped in, least recently used out);
  3. rows still reading their prompt advance by at most `prefill_chunk` tokens in all (oldest first), in one
     forward pass; a row whose prompt is done samples its first token and joins the decoding rows;
  4. the decoding rows advance one token together; a row that ends leaves at once and its slot is reused.
So a request that arrives while others decode starts at the next step, and a short answer never waits for a long one.

Decoding rows hold slots 0..D-1 (the attention reads that range as a view, no copy); prefilling rows sit above. Each
row's adapter (or composition of adapters) is a row of the bank's selection: one stacked product per layer
(`lorafit.adapters.multi`). A row's result depends only on its own inputs, so a greedy answer equals the answer to
the request decoded alone.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lorafit.errors import LorafitError
from lorafit.inference.cache import Plan, SlotCache
from lorafit.inference.sampling import Completion, RowText, Sampling, advance, pick_token


class Cancelled(Exception):
    """The request was cancelled (its client disconnected) before it finished."""


@dataclass
class Request:
    """One generation: prompt ids, settings, adapters ({name: weight}; None: the base); results through the
    callbacks (called on the engine's thread): on_text(piece) as text becomes certain, on_done(completion, error)."""

    prompt: list[int]
    sampling: Sampling
    adapters: dict[str, float] | None = None
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[Completion | None, BaseException | None], None] | None = None
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)
    first_token: float | None = None  # when its first token was sampled
    finished: float | None = None
    batch_rows: int = 0  # the most rows that shared one of its decode steps


@dataclass
class _Row:
    request: Request
    slot: int
    out: RowText
    fed: int = 0  # prompt tokens in the cache
    length: int = 0  # tokens in the cache
    pending: int | None = None  # the sampled token not yet fed back


def _cache_keyword(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def find_selection(model):
    """The adapter selection the model's multi-adapter layers read, or None (no `AdapterBank` on it)."""
    from lorafit.adapters.multi import MultiAdapterLinear

    return next((m.selection for m in model.modules() if isinstance(m, MultiAdapterLinear)), None)


class Engine:
    """Continuous batching over `model`; see the module docstring.

    Args:
        model: a causal LM in eval mode whose attention goes through the cache's `update` (transformers' usual).
        tokenizer: decodes the new tokens.
        bank: the `AdapterBank` on the model (None: no adapters, or the model's own attached adapter).
        max_rows: rows decoded together (the cache's slots).
        prefill_chunk: prompt tokens read per step, all prefilling rows together.
        max_loras: distinct adapters in one step (None: any); the bank's `max_resident` bounds what is in memory.
        stop_ids: the tokens that end a row whose sampling names none.
    """

    def __init__(self, model, tokenizer, bank=None, max_rows: int = 32, prefill_chunk: int = 256,
                 max_loras: int | None = None, stop_ids: Sequence[int] = ()):
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.selection = bank.selection if bank is not None else find_selection(model)
        self.max_rows, self.prefill_chunk, self.max_loras = max_rows, prefill_chunk, max_loras
        self.stop_ids = list(stop_ids)
        self.cache = SlotCache(max_rows)
        self.slots: list[_Row | None] = [None] * max_rows
        self.decoding = 0  # D: rows 0..D-1 decode
        self.waiting: deque[Request] = deque()
        self.wake = threading.Condition()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache_keyword = _cache_keyword(model)
        self.steps = 0

    # -- outside

    def submit(self, request: Request) -> None:
        with self.wake:
            self.waiting.append(request)
            self.wake.notify()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self.wake:
            self.wake.notify()

    @property
    def running(self) -> int:
        return sum(row is not None for row in self.slots)

    def busy(self) -> bool:
        return bool(self.waiting) or self.running > 0

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Step while there is work; sleep until a request arrives (the server's worker thread)."""
        while stop is None or not stop.is_set():
            with self.wake:
                while not self.busy():
                    self.wake.wait(timeout=0.5)
                    if stop is not None and stop.is_set():
                        return
            self.step()

    def generate(self, prompts: list[list[int]], samplings: list[Sampling],
                 adapters: Sequence[dict[str, float] | None] | None = None,
                 on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        """Decode every prompt to the end on this thread (generate, eval); one Completion per prompt, in order."""
        results: list = [None] * len(prompts)

        def done(i):
            return lambda completion, error: results.__setitem__(i, error or completion)

        for i, (prompt, sampling) in enumerate(zip(prompts, samplings, strict=True)):
            self.submit(Request(list(prompt), sampling, (adapters or [None] * len(prompts))[i],
                                (lambda t, i=i: on_text(i, t)) if on_text else None, done(i)))
        while self.busy():
            self.step()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    # -- one step

    def step(self) -> None:
        """One iteration: drop cancelled rows, admit, one prefill chunk, one decode token (module docstring)."""
        self._drop_cancelled()
        self._admit()
        prefilling = [row for row in self.slots[self.decoding:] if row is not None]
        if prefilling:
            self._guarded(prefilling, self._prefill)
        if self.decoding:
            self._guarded(self.slots[: self.decoding], self._decode)
        self.steps += 1

    def _guarded(self, rows: list[_Row], run: Callable[[list[_Row]], None]) -> None:
        """A forward pass that fails fails its rows (their requests get the error); the engine goes on."""
        try:
            run(rows)
        except Exception as error:  # noqa: BLE001 - one failing batch must not stop the server
            for row in list(rows):
                if row is not None and self.slots[row.slot] is row:
                    self._finish(row, error)

    def _drop_cancelled(self) -> None:
        with self.wake:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                _notify(request, None, Cancelled())
        for row in [r for r in self.slots if r is not None and r.request.cancelled]:
            self._finish(row, Cancelled())

    def _adapters_in_use(self) -> set[str]:
        return {name for row in self.slots if row is not None for name in (row.request.adapters or {})}

    def _admit(self) -> None:
        free = [s for s in range(self.decoding, self.max_rows) if self.slots[s] is None]
        in_use = self._adapters_in_use()
        with self.wake:
            candidates = list(self.waiting)
        blocked = False  # an older request waits for adapter room: later ones may not take more of it
        for request in candidates:
            if not free:
                break
            names = set(request.adapters or {})
            if self.max_loras is not None and len(names) > self.max_loras:
                with self.wake:
                    self.waiting.remove(request)
                _notify(request, None, LorafitError(f"{len(names)} adapters in one request; at most "
                                                    f"{self.max_loras} (max_loras) fit in a step"))
                continue
            if self.max_loras is not None and len(in_use | names) > self.max_loras:
                blocked = True  # waits until rows of other adapters leave (a step takes at most max_loras adapters)
                continue
            if blocked and not names <= in_use:
                continue
            if names and self.bank is not None:
                try:
                    self.bank.make_resident(sorted(names), keep=sorted(in_use))
                except LorafitError as error:
                    with self.wake:
                        self.waiting.remove(request)
                    _notify(request, None, error)
                    continue
            in_use |= names
            with self.wake:
                self.waiting.remove(request)
            slot = free.pop(0)
            self.slots[slot] = _Row(request, slot, RowText.start(request.sampling, self.stop_ids))

    def _prefill(self, rows: list[_Row]) -> None:
        """The next `prefill_chunk` prompt tokens of the step, shared by the prefilling rows oldest first (so a burst
        of long prompts cannot stall decoding), left-padded to the widest so every row's last token comes last."""
        budget, chunks, taken = self.prefill_chunk, [], []
        for row in sorted(rows, key=lambda r: r.request.arrived):
            if budget <= 0:
                break
            chunks.append(row.request.prompt[row.fed: row.fed + budget])
            taken.append(row)
            budget -= len(chunks[-1])
        rows = taken
        q = max(len(c) for c in chunks)
        width = max(row.fed + len(c) for row, c in zip(rows, chunks, strict=True))
        self.cache.reserve(width)
        ids = torch.zeros(len(rows), q, dtype=torch.long)  # (B, q)
        positions = torch.zeros(len(rows), q, dtype=torch.long)  # (B, q): rotary positions (padding: 0)
        writes = torch.full((len(rows), q), self.cache.scratch, dtype=torch.long)  # (B, q): padding -> scratch
        mask = torch.zeros(len(rows), 1, q, width, dtype=torch.bool)  # (B, 1, q, width): True = may attend
        mask[:, :, :, 0] = True  # padding queries see column 0 (their output is never used; no all-masked row)
        for b, (row, chunk) in enumerate(zip(rows, chunks, strict=True)):
            pad = q - len(chunk)
            span = torch.arange(row.fed, row.fed + len(chunk))
            ids[b, pad:], positions[b, pad:], writes[b, pad:] = torch.tensor(chunk), span, span
            mask[b, 0, pad:] = torch.arange(width)[None, :] <= span[:, None]
        slots = torch.tensor([row.slot for row in rows])
        logits = self._forward(rows, ids, positions, Plan(slots, writes, slots, width), mask)
        for b, (row, chunk) in enumerate(zip(rows, chunks, strict=True)):
            row.fed += len(chunk)
            row.length = row.fed
            if row.fed == len(row.request.prompt):
                self._sample(row, logits[b], len(rows))
                if self.slots[row.slot] is row:
                    self._start_decoding(row)

    def _decode(self, rows: list[_Row]) -> None:
        ids = torch.tensor([[row.pending] for row in rows])  # (D, 1)
        positions = torch.tensor([[row.length] for row in rows])  # (D, 1)
        width = max(row.length for row in rows) + 1
        self.cache.reserve(width)
        mask = (torch.arange(width)[None, :] <= positions)[:, None, None, :]  # (D, 1, 1, width)
        plan = Plan(torch.arange(len(rows)), positions, slice(0, len(rows)), width)
        logits = self._forward(rows, ids, positions, plan, mask)
        for b, row in enumerate(list(rows)):
            row.length += 1
            self._sample(row, logits[b], len(rows))

    def _forward(self, rows: list[_Row], ids, positions, plan: Plan, mask) -> torch.Tensor:
        """The model on (B, q) tokens with the cache planned; the last position's logits (B, V), float, on the CPU."""
        additive = torch.zeros(mask.shape, dtype=self.dtype).masked_fill_(~mask, torch.finfo(self.dtype).min)
        self.cache.plan = plan
        previous = self.selection.save() if self.selection is not None else None
        try:
            if self.selection is not None:
                self.selection.set_rows([row.request.adapters for row in rows], self.device)
            out = self.model(input_ids=ids.to(self.device), attention_mask=additive.to(self.device),
                             position_ids=positions.to(self.device), use_cache=True, logits_to_keep=1,
                             **{self.cache_keyword: self.cache})
        finally:
            if previous is not None:
                self.selection.restore(previous)
        return out.logits[:, -1, :].float().cpu()  # (B, V)

    # -- rows coming and going

    def _sample(self, row: _Row, logits: torch.Tensor, batch: int) -> None:
        request = row.request
        request.batch_rows = max(request.batch_rows, batch)
        try:
            token = pick_token(logits, request.sampling, row.out.generator)
            if request.first_token is None:
                request.first_token = time.monotonic()
            advance(row.out, token, self.tokenizer, request.on_text)
        except Exception as error:  # noqa: BLE001 - a failing callback (a client gone) ends its own row only
            self._finish(row, error)
            return
        if row.out.finish is not None:
            self._finish(row, None)
        else:
            row.pending = token

    def _start_decoding(self, row: _Row) -> None:
        """Move a row that finished its prompt to slot D, the end of the decoding range."""
        target = self.decoding
        if row.slot != target:
            other = self.slots[target]
            self.cache.swap(row.slot, target)
            self.slots[row.slot], self.slots[target] = other, row
            if other is not None:
                other.slot = row.slot
            row.slot = target
        self.decoding += 1

    def _finish(self, row: _Row, error: BaseException | None) -> None:
        """The row leaves now; a decoding row's place is taken by the last decoding row (slots 0..D-1 stay dense)."""
        slot = row.slot
        self.slots[slot] = None
        if slot < self.decoding:
            last = self.decoding - 1
            if slot != last:
                moved = self.slots[last]
                self.cache.move(last, slot)
                self.slots[slot], self.slots[last] = moved, None
                moved.slot = slot
            self.decoding -= 1
        request = row.request
        request.finished = time.monotonic()
        out = row.out
        completion = Completion(out.tokens, out.text, out.finish or "length", len(request.prompt))
        _notify(request, None if error else completion, error)


def _notify(request: Request, completion: Completion | None, error: BaseException | None) -> None:
    if request.on_done is not None:
        try:
            request.on_done(completion, error)
        except Exception:  # noqa: BLE001, S110 - a callback that fails must not take the engine down
            pass


def decode(model, tokenizer, prompts: list[list[int]], samplings: list[Sampling], stop_ids: Sequence[int],
           on_text: Callable[[int, str], None] | None = None,
           adapters: Sequence[dict[str, float] | str | None] | None = None) -> list[Completion]:
    """Decode a batch of prompts to the end (the engine on this thread): each row with its own settings, stop tokens
    (`stop_ids` unless its sampling names its own) and adapter.

    Args:
        adapters: per row, an adapter name, {name: weight} or None; by default, what an enclosing
            `AdapterBank.rows(...)` block chose for rows 0..B-1 (or one adapter for all under `AdapterBank.use`).

    Returns:
        One Completion per prompt, in order.
    """
    selection = find_selection(model)
    if adapters is None and selection is not None:
        adapters = _rows_of(selection, len(prompts))
    adapters = [{a: 1.0} if isinstance(a, str) else a for a in adapters] if adapters is not None else None
    engine = Engine(model, tokenizer, max_rows=max(1, len(prompts)), stop_ids=stop_ids)
    with torch.no_grad():
        return engine.generate(prompts, samplings, adapters, on_text)


def _rows_of(selection, batch: int) -> list[dict[str, float] | None]:
    """Each row's adapters as the selection holds them now (a `rows` block sized `batch`, or `use`)."""
    if selection.groups is None:
        return [{selection.whole: 1.0} if selection.whole is not None else None] * batch
    if selection.batch != batch:
        raise LorafitError(f"per-row adapters were chosen for {selection.batch} rows, but {batch} prompts were given")
    rows: list[dict[str, float] | None] = [None] * batch
    column = {name: n for n, name in enumerate(selection.resident)}
    for name, indices in selection.groups.items():
        for i in indices.tolist():
            weight = float(selection.mix[i, column[name]]) if name in column and selection.mix is not None else 1.0
            rows[i] = {**(rows[i] or {}), name: weight}
    return rows
