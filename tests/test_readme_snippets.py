"""Every ```python example of the README runs as written on a CPU.

How it works (and how to mark a snippet that cannot run):

- Each ```python block of README.md is run, in one child process (the examples register variants
  and write folders: the test process stays clean), each block in a fresh namespace, in a scratch
  folder, offline (HF_HUB_OFFLINE=1), on the CPU (CUDA_VISIBLE_DEVICES="").
- A block runs on its own imports. The only names it may use without defining them are the ones a
  reader brings from their own code, which the PRELUDE below stands in for with tiny models and
  datasets (built only when the block names them): `model`, `tokenizer`, `train`, `val`, `valid`,
  `ds`, `training_args`, `args`, `loader`, `model_init`, `t5`, `MyBaseTrainer`, and for blocks that
  import `trl` a causal LM as `model` / `ref_model` with `chats` (prompt/completion) and `pairs`
  (DPO). Anything else undefined fails the test, as it would fail a reader.
- A block that is not meant to run alone (it needs a GPU, the network, minutes, or it shows a piece
  of a larger program) is marked by an HTML comment on the line(s) just before its fence:
  `<!-- fragment: why it does not run here -->`. The reason is required; a `fragment` comment must
  be followed by a ```python block.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"<!--\s*fragment\s*:?(.*?)-->", re.S)


def readme_snippets(text):
    """[(line number, code, fragment reason or None)] of every ```python block."""
    out = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n")
        last = before.rsplit("\n", 1)[-1].strip()
        reason = None
        if last.endswith("-->") and "fragment" in last:
            comment_start = before.rfind("<!--")
            found = MARK.search(before[comment_start:])
            reason = found.group(1).strip() if found else ""
        out.append((text[:match.start()].count("\n") + 2, match.group(1), reason))
    return out


# Stand-ins for what a reader's own code defines; each is built only when a snippet names it.
PRELUDE = r'''
import torch
from datasets import Dataset

VOCAB = 64


def _classifier():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=2,
                                                    max_position_embeddings=32))


def _rows(n):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(1, VOCAB, (n, 8), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": (ids[:, 0] % 2).tolist()})


def _training_args():
    from hf_sam import SAMTrainingArguments
    return SAMTrainingArguments(output_dir="prelude_out", max_steps=2, per_device_train_batch_size=4,
                                per_device_eval_batch_size=8, report_to="none", save_strategy="no",
                                logging_steps=1, disable_tqdm=True, use_cpu=True)


def _tokenizer():
    from transformers import PreTrainedTokenizerFast
    from hf_sam_scripts.models import train_bpe
    words = ("explain the statement a loop runs its body while the condition holds " * 4).split()
    bpe = train_bpe([" ".join(words[i:i + 6]) for i in range(0, len(words), 3)], 300, ["<|end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<|end|>",
                                  unk_token="<|end|>")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def _causal_lm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id))


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, decoder_start_token_id=0))


def _prelude(code):
    """The stand-ins `code` names."""
    used = lambda name: re.search(rf"\b{name}\b", code) is not None  # noqa: E731
    env = {}
    if "trl" in code:  # TRL trainers: a causal LM and chat data
        tokenizer = _tokenizer()
        env.update(tokenizer=tokenizer, model=_causal_lm(tokenizer), ref_model=_causal_lm(tokenizer))
        user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
        bot = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
        env["chats"] = Dataset.from_dict({"prompt": [user("explain the loop")] * 4,
                                          "completion": [bot("the body runs while the condition holds")] * 4})
        env["pairs"] = Dataset.from_dict({"prompt": ["explain the loop"] * 4, "chosen": [" the body runs"] * 4,
                                          "rejected": [" a statement"] * 4})
    else:
        if used("model"):
            env["model"] = _classifier()
        if used("tokenizer"):
            env["tokenizer"] = _tokenizer()
    for name, build in (("train", lambda: _rows(16)), ("val", lambda: _rows(8)), ("valid", lambda: _rows(256)),
                        ("ds", lambda: _rows(16)), ("t5", _t5), ("model_init", lambda: _classifier)):
        if used(name):
            env[name] = build()
    if used("training_args") or used("args"):
        env["training_args"] = env["args"] = _training_args()
    if used("loader"):
        rows = _rows(8)
        env["loader"] = [{k: torch.tensor(rows[i:i + 4][k]) for k in rows.column_names} for i in (0, 4)]
    if used("MyBaseTrainer"):
        from transformers import Trainer
        env["MyBaseTrainer"] = Trainer
    return env
'''

RUNNER = r'''
import json, os, re, sys, time, traceback
os.chdir(sys.argv[2])
PRELUDE = open(sys.argv[3]).read()
exec(compile(PRELUDE, "<prelude>", "exec"), globals())
results = []
for line, code in json.load(open(sys.argv[1])):
    start = time.perf_counter()
    try:
        namespace = {"__name__": "__readme__"}
        namespace.update(_prelude(code))
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
        error = None
    except BaseException:
        error = traceback.format_exc(limit=-4)
    results.append({"line": line, "error": error, "seconds": round(time.perf_counter() - start, 2)})
print("RESULTS " + json.dumps(results))
'''


def test_fragment_markers_give_a_reason():
    snippets = readme_snippets((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(snippets) >= 5
    for line, _, reason in snippets:
        assert reason is None or reason, f"README.md:{line}: `<!-- fragment: ... -->` needs a reason"


def test_marker_parsing():
    text = textwrap.dedent("""\
        <!-- fragment: needs a GPU -->
        ```python
        a = 1
        ```

        ```python
        b = 2
        ```
        """)
    (l1, c1, r1), (l2, c2, r2) = readme_snippets(text)
    assert (l1, c1, r1) == (3, "a = 1\n", "needs a GPU") and (c2, r2) == ("b = 2\n", None)


def test_every_runnable_readme_snippet_runs_on_a_cpu(tmp_path):
    snippets = [(line, code) for line, code, reason in readme_snippets((REPO / "README.md").read_text("utf-8"))
                if reason is None]
    assert snippets
    (tmp_path / "snippets.json").write_text(json.dumps(snippets))
    (tmp_path / "prelude.py").write_text("import re\n" + PRELUDE)
    (tmp_path / "runner.py").write_text(RUNNER)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "snippets.json"), str(work),
                             str(tmp_path / "prelude.py")], env=env, capture_output=True, text=True, timeout=600)
    lines = [x for x in result.stdout.splitlines() if x.startswith("RESULTS ")]
    assert lines, result.stdout[-2000:] + result.stderr[-4000:]
    failed = [r for r in json.loads(lines[-1][len("RESULTS "):]) if r["error"]]
    assert not failed, "\n\n".join(f"README.md:{r['line']}:\n{r['error']}" for r in failed)
