"""`lorafit.inference`: the continuous-batching engine against independent references — each request decoded alone
by transformers' `generate` on the model with only its adapter, whatever joins or leaves the batch around it; the
stacked LoRA product against each adapter's own forward; answers unchanged when adapters are swapped in and out
(`max_loras`); a composition of adapters equal to the adapter `lorafit merge --as-adapter` writes."""

from __future__ import annotations

import pytest
import torch
from rundirs import base_model, make_run, run_cli, with_adapter

from lorafit.adapters.multi import AdapterBank
from lorafit.adapters.peft_io import load_adapter
from lorafit.inference.engine import Cancelled, Engine, Request
from lorafit.inference.load import add_adapter
from lorafit.inference.sampling import Sampling

PROMPTS = ["Reverse the word: stone", "def add(a, b):", "hello, how are you? " * 6, "Count to five:"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("inference")
    made = {}
    for i, (name, options) in enumerate([("a", {}), ("b", {"rslora": True}), ("d", {"dora": True})]):
        torch.manual_seed(20 + i)
        made[name] = make_run(tmp, tiny_model_dir, tiny_tokenizer, name=name, **options)
    return made


def _bank(model_dir, runs, names=("a", "b", "d"), max_resident=None):
    model = base_model(model_dir)
    bank = AdapterBank(model)
    for name in names:
        add_adapter(bank, name, runs[name] / "adapter")
    bank.limit(max_resident)
    return model, bank


def _alone(model, prompt: list[int], new: int) -> list[int]:
    """The reference: transformers' own greedy generate on a model holding one adapter (or none)."""
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt):].tolist()


def _request(tokenizer, prompt: str, adapters, new: int) -> Request:
    return Request(list(tokenizer(prompt)["input_ids"]), Sampling(max_new_tokens=new, stop_ids=[]), adapters)


def _finish(engine: Engine) -> None:
    with torch.no_grad():
        while engine.busy():
            engine.step()


def test_requests_joining_and_leaving_mid_decode_answer_as_each_alone(runs, tiny_model_dir, tiny_tokenizer):
    model, bank = _bank(tiny_model_dir, runs)
    engine = Engine(model, tiny_tokenizer, bank, max_rows=3, prefill_chunk=5)  # 3 slots for 5 requests
    done: dict[int, list[int]] = {}
    plan = [(0, PROMPTS[0], {"a": 1.0}, 12), (0, PROMPTS[1], None, 4), (3, PROMPTS[2], {"b": 1.0}, 9),
            (3, PROMPTS[3], {"d": 1.0}, 6), (5, PROMPTS[1], {"a": 1.0}, 7)]  # (step it arrives, prompt, adapter, n)
    requests = []
    with torch.no_grad():
        for step in range(200):
            for i, (at, prompt, adapters, new) in enumerate(plan):
                if at == step:
                    request = _request(tiny_tokenizer, prompt, adapters, new)
                    request.on_done = lambda c, e, i=i: done.__setitem__(i, e or c.token_ids)
                    requests.append(request)
                    engine.submit(request)
            if step > 5 and not engine.busy():
                break
            engine.step()
    assert sorted(done) == list(range(len(plan)))
    assert max(r.batch_rows for r in requests) >= 2  # rows of different ages and adapters shared steps
    assert len(tiny_tokenizer(PROMPTS[2])["input_ids"]) > 5 * 4  # read in several chunks while others decoded
    for i, (_, prompt, adapters, new) in enumerate(plan):
        name = next(iter(adapters)) if adapters else None
        reference_model = with_adapter(tiny_model_dir, runs[name]) if name else base_model(tiny_model_dir)
        assert done[i] == _alone(reference_model, tiny_tokenizer(prompt)["input_ids"], new), (i, name)


def test_the_stacked_product_equals_each_adapters_own_forward(runs, tiny_model_dir):
    model, bank = _bank(tiny_model_dir, runs, names=("a", "b"))
    ids = torch.arange(5, 29).view(4, 6)  # (B, T)
    layer = next(iter(bank.layers.values()))
    assert layer.stacked == {"a", "b"} and layer.a_cat.shape[0] == 8  # both adapters in one stack of rank 4 + 4
    with torch.no_grad(), bank.rows(["b", {"a": 1.0}, None, "a"]):
        mixed = model(input_ids=ids).logits
    expected = {n: with_adapter(tiny_model_dir, runs[n])(input_ids=ids).logits for n in ("a", "b")}
    expected[None] = base_model(tiny_model_dir)(input_ids=ids).logits
    for row, name in enumerate(["b", "a", None, "a"]):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=1e-5, atol=1e-5)


def _run_with_limit(runs, model_dir, tokenizer, jobs, limit):
    """Every job through one engine with `limit` adapters; (answers, swaps, adapters of each forward pass)."""
    model, bank = _bank(model_dir, runs, max_resident=limit)
    engine = Engine(model, tokenizer, bank, max_rows=4, max_loras=limit)
    seen, original = [], bank.selection.set_rows

    def spy(rows, *args, **kwargs):
        seen.append({n for r in rows for n in (r or {})})
        return original(rows, *args, **kwargs)

    bank.selection.set_rows = spy
    results = [None] * len(jobs)
    for i, (prompt, adapters, new) in enumerate(jobs):
        request = _request(tokenizer, prompt, adapters, new)
        request.on_done = lambda c, e, i=i: results.__setitem__(i, c.token_ids)
        engine.submit(request)
    _finish(engine)
    assert limit is None or len(bank.resident) <= limit
    return results, bank.swaps, seen


def test_answers_do_not_change_with_max_loras_and_a_step_holds_at_most_that_many(runs, tiny_model_dir,
                                                                                 tiny_tokenizer):
    jobs = [(PROMPTS[i % 4], {n: 1.0}, 5 + i) for i, n in enumerate(["a", "b", "d", "a", "b", "d"])]
    answers, swaps = {}, {}
    for limit in (None, 1, 2):
        answers[limit], swaps[limit], seen = _run_with_limit(runs, tiny_model_dir, tiny_tokenizer, jobs, limit)
        assert limit is None or max(len(s) for s in seen) <= limit
    assert answers[1] == answers[None] == answers[2]
    assert swaps[1] >= 3 and swaps[None] == 0  # with one slot every change of adapter is a swap


def test_merged_adapters_equal_the_adapter_merge_as_adapter_writes(runs, tiny_model_dir, tiny_tokenizer, tmp_path):
    out = tmp_path / "ab"
    assert run_cli("merge", str(runs["a"]), str(runs["b"]), "--weights", "0.7,-0.4", "--as-adapter",
                   "--out", str(out)) == 0
    model, bank = _bank(tiny_model_dir, runs, names=("a", "b"))
    add_adapter(bank, "ab", out)
    engine = Engine(model, tiny_tokenizer, bank, max_rows=4)
    prompts = [list(tiny_tokenizer(p)["input_ids"]) for p in PROMPTS[:2]]
    greedy = Sampling(max_new_tokens=10, stop_ids=[])
    with torch.no_grad():
        composed, merged, only_a = (
            engine.generate(prompts, [greedy] * 2, [mix] * 2)
            for mix in ({"a": 0.7, "b": -0.4}, {"ab": 1.0}, {"a": 1.0}))
    assert [c.token_ids for c in composed] == [c.token_ids for c in merged]
    assert [c.token_ids for c in composed] != [c.token_ids for c in only_a]  # the composition is not just `a`
    ids = torch.tensor([prompts[0]])
    with torch.no_grad(), bank.rows([{"a": 0.7, "b": -0.4}]):
        composed_logits = model(input_ids=ids).logits
    reference = base_model(tiny_model_dir)
    load_adapter(reference, out, dropout=0.0)  # the written adapter alone, as eval / generate load it
    torch.testing.assert_close(composed_logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_cancelled_row_leaves_at_the_next_step_and_a_failing_one_stops_no_other(runs, tiny_model_dir,
                                                                                  tiny_tokenizer):
    model, bank = _bank(tiny_model_dir, runs, names=("a",))
    engine = Engine(model, tiny_tokenizer, bank, max_rows=2)
    outcome = {}
    long = _request(tiny_tokenizer, PROMPTS[0], {"a": 1.0}, 200)
    broken = _request(tiny_tokenizer, PROMPTS[1], None, 20)
    fine = _request(tiny_tokenizer, PROMPTS[3], None, 6)
    long.on_done = lambda c, e: outcome.__setitem__("long", e)
    broken.on_text = lambda text: 1 / 0  # a client callback that fails
    broken.on_done = lambda c, e: outcome.__setitem__("broken", e)
    fine.on_done = lambda c, e: outcome.__setitem__("fine", c)
    for request in (long, broken, fine):
        engine.submit(request)
    with torch.no_grad():
        for _ in range(3):
            engine.step()
        engine.cancel(long)
        engine.step()
        assert isinstance(outcome["long"], Cancelled) and all(row is not long for row in engine.slots)
        _finish(engine)
    assert isinstance(outcome["broken"], ZeroDivisionError)
    assert outcome["fine"].token_ids == _alone(base_model(tiny_model_dir), fine.prompt, 6)


class _IdsTokenizer:
    """Decodes ids as their numbers: the zoo's models have no tokenizer of their own."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox", "falcon", "phi3", "qwen3", "gemma2", "qwen3_moe"])
def test_the_engine_decodes_the_zoos_architectures_as_transformers_generate(arch):
    from test_zoo import build_zoo_model

    from lorafit.inference.engine import decode

    model = build_zoo_model(arch, 400).eval()
    prompts = [[5, 9, 33, 7, 12, 40, 41, 8, 3, 99], [17, 4, 250], [300, 301, 302, 303, 11]]
    got = decode(model, _IdsTokenizer(), prompts, [Sampling(max_new_tokens=10)] * 3, stop_ids=[])
    assert [c.token_ids for c in got] == [_alone(model, p, 10) for p in prompts]
