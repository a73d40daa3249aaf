"""Inference: one loader, one engine, one sampler for eval, generate and serve.

    load.py      a source's model (with its adapter), or its base once with several adapters in an AdapterBank
    sampling.py  per-row settings (greedy / temperature / top_p / seed / stops), the next token, streamed text
    cache.py     `SlotCache`: preallocated KV slots, one per running row, so rows of any length decode together
    engine.py    `Engine`: iteration-level scheduling (Orca): requests join the running batch at the next step and
                 leave the step they finish; chunked prefill; per-row adapters (stacked LoRA) within `max_loras`
"""
