"""Where the adapter goes and how big each part is: per-module ranks and alphas, as pure functions.

Three inputs decide a module's rank:
    adapter.layers        which numbered decoder layers get adapters at all (PEFT's ``layers_to_transform``)
    adapter.rank_pattern  {regex: r} and ``alpha_pattern`` {regex: alpha}, matched as PEFT matches them: a key
                          selects a module when ``re.match(rf"(.*\\.)?({key})$", name)``, the first key in dict order
                          wins, anything unmatched keeps adapter.r / adapter.alpha
    adapter.allocate      ``gradient``: `allocate_ranks` turns the probe's scores (`lorafit.probe`) into ranks

The allocation. Each candidate module i has a score s_i (the probe's RMS gradient per weight entry, so that a
wider matrix is not favoured for being wide) and costs c_i trainable parameters per unit of rank (in + out for
LoRA, out for LoRA-FA). The budget is what uniform rank r costs on the same targets, B = r · Σ c_i. Ranks follow
the scores at that budget:

    r_i = clip(round(λ · s_i), 0, r_max_i)        λ chosen so that Σ c_i · r_i ≈ B (bisection, then a greedy fill)

so equal scores give back uniform r exactly, a module with twice the score gets about twice the rank, and a module
whose rounded rank is 0 is left out. r_max_i = min(r_max, in_i, out_i): more rank than the matrix has buys nothing.

The scale. Uniform LoRA scales every update by s = alpha / r (alpha / sqrt(r) with rsLoRA). An allocated module
keeps that scale: alpha_i = alpha · r_i / r (alpha · sqrt(r_i / r) with rsLoRA), saved as ``alpha_pattern``, so a
module's learning dynamics differ from uniform LoRA's only by its rank.

Saved keys are anchored and escaped (``^model\\.layers\\.0\\.mlp\\.down_proj``): inside PEFT's
``(.*\\.)?(key)$`` the ``^`` only matches when the optional prefix is empty, so a key selects its one module and
no other, whatever order PEFT tries the keys in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from lorafit.errors import ConfigError, LorafitError

# ----------------------------------------------------------------------------------------------- patterns


def pattern_matches(key: str, name: str) -> bool:
    """PEFT's rule for rank_pattern / alpha_pattern keys: the regex `key` matches the end of the module path
    at a component boundary."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def pattern_value(patterns: Mapping[str, object] | None, name: str, default):
    """The value of the first key (dict order) that matches `name`, else `default` (PEFT's lookup)."""
    for key, value in (patterns or {}).items():
        if pattern_matches(key, name):
            return value
    return default


def exact_key(name: str) -> str:
    """A pattern key that matches the module `name` and nothing else under PEFT's rule."""
    return "^" + re.escape(name)


def check_patterns(patterns: Mapping[str, object], names: list[str], key: str) -> None:
    """Every key of a rank/alpha pattern must match at least one target.

    Raises:
        ConfigError: naming the dotted config key, the patterns that matched nothing, and the targets.
    """
    dead = [k for k in patterns if not any(pattern_matches(k, n) for n in names)]
    if dead:
        shown = ", ".join(names[:12]) + (f" ... ({len(names)} in all)" if len(names) > 12 else "")
        raise ConfigError(f"{key}: {', '.join(map(repr, dead))} matches no adapter target (PEFT matches a key at "
                          f"the end of the module path, e.g. 'q_proj' or 'layers\\.0\\.mlp\\.down_proj'); the "
                          f"targets are: {shown}")


# ------------------------------------------------------------------------------------------------- layers


_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def layer_index(name: str) -> int | None:
    """The decoder-layer index of a module path: its first all-digit component (``model.layers.3.mlp.up_proj`` ->
    3), as PEFT's ``layers_to_transform`` finds it; None when the path has no numbered component."""
    m = _INDEX.search(name)
    return int(m.group(1)) if m else None


def projection_name(name: str) -> str:
    """What follows the layer index: ``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[0] + 1:]) or name if digits else name


def filter_layers(names: list[str], layers: list[int] | None, key: str = "adapter.layers") -> list[str]:
    """The targets inside the chosen layers (all of them when `layers` is None).

    Raises:
        ConfigError: the model has no numbered layers, or an index is out of range (the range is named).
    """
    if layers is None:
        return names
    indices = {n: layer_index(n) for n in names}
    present = sorted({i for i in indices.values() if i is not None})
    if not present:
        raise ConfigError(f"{key}: the targets have no numbered layers to choose from ({', '.join(names[:6])} ...); "
                          f"remove adapter.layers or choose modules with adapter.targets")
    bad = [i for i in layers if i not in present]
    if bad:
        raise ConfigError(f"{key}: {bad} out of range; the model's layers are {layer_ranges(present)}")
    return [n for n in names if indices[n] in set(layers)]


def layer_ranges(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    out: list[str] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def compact_ranks(ranks: Mapping[str, int]) -> list[str]:
    """Per-module ranks grouped for display: one line per (projection, rank) with its layer ranges, e.g.
    ``self_attn.q_proj  r=8   layers 0-3, 7``. Modules without a layer index are listed by name."""
    groups: dict[tuple[str, int], list[int]] = {}
    loose: list[str] = []
    for name, r in ranks.items():
        i = layer_index(name)
        if i is None:
            loose.append(f"{name}  r={r}")
            continue
        groups.setdefault((projection_name(name), r), []).append(i)
    width = max((len(p) for p, _ in groups), default=0)
    lines = [f"{p:<{width}}  r={r:<4} layers {layer_ranges(ix)}" for (p, r), ix in groups.items()]
    return lines + loose


# ---------------------------------------------------------------------------------- per-module r and alpha


def scaled_alpha(alpha: float, r: int, r_i: int, rslora: bool = False) -> float:
    """The alpha that gives rank `r_i` the scale uniform rank `r` has with `alpha` (alpha/r, or alpha/sqrt(r))."""
    return alpha * (math.sqrt(r_i / r) if rslora else r_i / r)


def module_settings(names: list[str], r: int, alpha: float, rank_pattern: Mapping[str, int] | None = None,
                    alpha_pattern: Mapping[str, float] | None = None) -> dict[str, tuple[int, float]]:
    """{module: (rank, alpha)} for the targets, with PEFT's pattern lookup; modules at rank 0 are left out."""
    out = {}
    for n in names:
        r_i = int(pattern_value(rank_pattern, n, r))
        if r_i > 0:
            out[n] = (r_i, float(pattern_value(alpha_pattern, n, alpha)))
    return out


def saved_patterns(settings: Mapping[str, tuple[int, float]], r: int, alpha: float) -> tuple[dict, dict]:
    """(rank_pattern, alpha_pattern) for adapter_config.json: one exact key per module whose rank / alpha differs
    from the config-wide r / lora_alpha, in model order."""
    ranks = {exact_key(n): ri for n, (ri, _) in settings.items() if ri != r}
    alphas = {exact_key(n): ai for n, (_, ai) in settings.items() if not math.isclose(ai, alpha, rel_tol=1e-9)}
    return ranks, alphas


# -------------------------------------------------------------------------------------------- allocation


def uniform_budget(costs: Mapping[str, int], r: int) -> int:
    """Trainable parameters of rank `r` on every module: r · Σ c_i."""
    return r * sum(costs.values())


def allocate_ranks(scores: Mapping[str, float], costs: Mapping[str, int], budget: int,
                   r_max: Mapping[str, int] | int) -> dict[str, int]:
    """Ranks proportional to the scores at a parameter budget (see the module docstring).

    Args:
        scores: {module: score >= 0}, shape-normalised.
        costs: {module: trainable parameters per unit of rank}.
        budget: total trainable parameters to spend (`uniform_budget`).
        r_max: the highest rank any module (or each module) may get.

    Returns:
        {module: rank in [0, r_max]}, in the order of `scores`; Σ costs · ranks within ±5% of `budget` whenever
        the bounds allow it.

    Raises:
        LorafitError: no module has a positive (finite) score.
    """
    names = list(scores)
    caps = {n: r_max if isinstance(r_max, int) else r_max[n] for n in names}
    s = {n: float(scores[n]) for n in names}
    if not any(v > 0 and math.isfinite(v) for v in s.values()):
        raise LorafitError("the gradient probe scored every module 0: no gradient reached the adapter targets "
                           "(are there supervised tokens in the probed batches?)")
    s = {n: v if v > 0 and math.isfinite(v) else 0.0 for n, v in s.items()}

    def ranks_at(lam: float) -> dict[str, int]:
        return {n: min(caps[n], max(0, math.floor(lam * s[n] + 0.5))) for n in names}

    def spent(ranks: dict[str, int]) -> int:
        return sum(costs[n] * ranks[n] for n in names)

    lo, hi = 0.0, 1.0
    while spent(ranks_at(hi)) < budget and hi < 1e30:
        hi *= 2
    for _ in range(100):  # spent(ranks_at(lam)) is non-decreasing in lam
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(ranks_at(mid)) < budget else (lo, mid)
    ranks = ranks_at(hi) if spent(ranks_at(hi)) - budget <= budget - spent(ranks_at(lo)) else ranks_at(lo)
    return _fill(ranks, s, costs, caps, budget, hi)


def _fill(ranks: dict[str, int], s: dict[str, float], costs: Mapping[str, int], caps: dict[str, int],
          budget: int, lam: float) -> dict[str, int]:
    """Move toward the budget one rank at a time: add where λ·s_i most exceeds r_i, remove where it least does."""
    total = sum(costs[n] * r for n, r in ranks.items())
    while True:
        if total < budget:
            room = [n for n in ranks if ranks[n] < caps[n] and s[n] > 0 and total + costs[n] - budget <= budget - total]
            if not room:
                return ranks
            n = max(room, key=lambda m: lam * s[m] - ranks[m])
            ranks[n] += 1
            total += costs[n]
        else:
            over = [n for n in ranks if ranks[n] > 0 and budget - (total - costs[n]) < total - budget]
            if not over:
                return ranks
            n = min(over, key=lambda m: lam * s[m] - ranks[m])
            ranks[n] -= 1
            total -= costs[n]


def rank_cap(in_features: int, out_features: int, r_max: int) -> int:
    """The highest useful rank of an (out, in) update: r_max, or the matrix's own rank when smaller."""
    return min(r_max, in_features, out_features)


def allocation(scores: Mapping[str, float], shapes: Mapping[str, tuple[int, int]], *, r: int, alpha: float,
               rslora: bool = False, frozen_a: bool = False, r_max: int | None = None) -> dict[str, tuple[int, float]]:
    """The whole placement decision: {module: (rank, alpha)} for the modules that keep rank > 0.

    Args:
        scores: the probe's shape-normalised scores.
        shapes: {module: (in_features, out_features)}.
        r, alpha, rslora: the uniform adapter whose budget and scale are kept.
        frozen_a: LoRA-FA (only B trains: a unit of rank costs out, not in + out).
        r_max: the highest rank (default 4 · r).

    Returns:
        {module: (r_i, alpha_i)} in the order of `scores`; alpha_i keeps uniform r's scale (`scaled_alpha`).
    """
    costs = {n: (o if frozen_a else i + o) for n, (i, o) in shapes.items()}
    caps = {n: rank_cap(i, o, r_max or 4 * r) for n, (i, o) in shapes.items()}
    ranks = allocate_ranks(scores, costs, uniform_budget(costs, r), caps)
    return {n: (ri, scaled_alpha(alpha, r, ri, rslora)) for n, ri in ranks.items() if ri > 0}


# ------------------------------------------------------------------------------------- the adapter settings


def place(names: list[str], settings: Mapping) -> dict[str, dict]:
    """Which of the candidate targets get an adapter, and each one's layer arguments that differ from the
    uniform ones: {module: {"r": r_i, "alpha": alpha_i} or {}}.

    Args:
        names: the candidates (`targets.find_targets`), in model order.
        settings: the `adapter:` section as plain data (`AdapterConfig.settings()`); an ``allocation`` key
            ({module: [r, alpha]}, from the gradient probe or a run's saved allocation) wins over the patterns.

    Raises:
        ConfigError: `adapter.layers` out of range, or a pattern that matches no target.
    """
    names = filter_layers(names, settings.get("layers"))
    r, alpha = settings["r"], settings.get("alpha")
    allocated = settings.get("allocation")
    if allocated is not None:
        chosen = {n: (int(v[0]), float(v[1])) for n, v in allocated.items() if n in set(names) and int(v[0]) > 0}
        chosen |= {n: (r, alpha) for n in names if n not in allocated}  # not scored (fused expert weights)
    else:
        for key in ("rank_pattern", "alpha_pattern"):
            check_patterns(settings.get(key) or {}, names, f"adapter.{key}")
        chosen = module_settings(names, r, alpha, settings.get("rank_pattern"), settings.get("alpha_pattern"))
    out = {}
    for n in names:
        if n in chosen:
            r_i, a_i = chosen[n]
            out[n] = {k: v for k, v, default in (("r", r_i, r), ("alpha", a_i, alpha)) if v != default}
    return out
