"""HumanEval infilling harness: data loading, pass@k, scoring samples (library and CLI), and the
Hugging Face completion generator on a tiny randomly initialised model."""

import json
import os
import subprocess
import sys
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest

from megafim.eval import humaneval_infilling as he
from megafim.eval.execution import SandboxConfig
from megafim.eval.pass_at_k import mean_pass_at_k, pass_at_k

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = he.PACKAGED_DATA_DIR  # installed with megafim: no folder outside the repository
CONFIG = SandboxConfig(timeout_s=10.0)  # generous: CI shares two busy cores


# ---------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------


def test_pass_at_k_matches_the_exact_binomial_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(comb(n - c, k), comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values_and_large_n():
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(2, 1, 2) == 1.0
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    # Binomials of this size overflow floats; the product form stays exact to rounding.
    exact = 1 - Fraction(comb(1000 - 10, 100), comb(1000, 100))
    assert pass_at_k(1000, 10, 100) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_rejects_bad_counts_and_skips_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    table = mean_pass_at_k([(10, 1), (4, 4)], [1, 4, 10])
    assert set(table) == {1, 4}  # k = 10 exceeds the 4 samples of the second task
    assert table[1] == pytest.approx((0.1 + 1.0) / 2)


# ---------------------------------------------------------------------------------------------
# Data and scoring
# ---------------------------------------------------------------------------------------------


def test_every_benchmark_loads_with_its_task_count():
    counts = {"single-line": 1033, "multi-line": 5815, "random-span": 1640,
              "random-span-light": 164}
    for name, count in counts.items():
        problems = he.load_problems(name, DATA_DIR)
        assert len(problems) == count
        task = next(iter(problems.values()))
        check = task.check("X")
        assert check.code == task.prompt + "X" + task.suffix
        assert check.entry_point == task.entry_point and check.test == task.test
        assert "X" not in check.context.replace(task.prompt + task.canonical_solution, "")


def test_packaged_data_has_its_license_and_an_explicit_dir_wins(tmp_path, monkeypatch):
    monkeypatch.delenv(he.DATA_DIR_ENV, raising=False)
    assert "MIT" in (DATA_DIR / "LICENSE").read_text() and "OpenAI" in (DATA_DIR / "LICENSE").read_text()
    assert len(he.load_problems("random-span-light")) == 164  # the packaged copy by default
    one = next(iter(he.load_problems("random-span-light").values()))
    import gzip
    with gzip.open(tmp_path / he.BENCHMARKS["random-span-light"], "wt") as f:
        f.write(json.dumps({k: getattr(one, k) for k in he._PROBLEM_FIELDS}) + "\n")
    assert list(he.load_problems("random-span-light", tmp_path)) == [one.task_id]
    monkeypatch.setenv(he.DATA_DIR_ENV, str(tmp_path))
    assert len(he.load_problems("random-span-light")) == 1


def test_data_dir_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.delenv(he.DATA_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        he.load_problems("random-span-light", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="HumanEval-RandomSpanInfillingLight"):
        he.load_problems("random-span-light", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark"):
        he.load_problems("nope", tmp_path)


def test_env_var_names_the_data_dir(monkeypatch):
    monkeypatch.setenv(he.DATA_DIR_ENV, str(DATA_DIR))
    assert len(he.load_problems("random-span-light")) == 164


@pytest.mark.slow
def test_canonical_solutions_pass_164_of_164(tmp_path):
    """The slowest test here (~10-20 s on two busy cores): every reference middle must pass."""
    problems = he.load_problems("random-span-light", DATA_DIR)
    samples = [he.Sample(p.task_id, p.canonical_solution) for p in problems.values()]
    report = he.evaluate_samples("random-span-light", problems, samples, [1],
                                 tmp_path / "r.jsonl", CONFIG, workers=4)
    failed = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    failed = [(r["task_id"], r["result"]) for r in failed if not r["passed"]]
    assert failed == []
    assert report.n_tasks == 164 and report.pass_at_k == {1: 1.0}


def test_wrong_completions_fail_and_pass_at_k_counts_them(tmp_path):
    problems = he.load_problems("random-span-light", DATA_DIR)
    tasks = list(problems.values())[:12]
    samples = []
    for i, task in enumerate(tasks):  # a right middle, another task's middle, and none at all
        samples += [he.Sample(task.task_id, task.canonical_solution),
                    he.Sample(task.task_id, tasks[(i + 1) % len(tasks)].canonical_solution),
                    he.Sample(task.task_id, "")]
    report = he.evaluate_samples("random-span-light", problems, samples, [1, 2, 3, 4],
                                 tmp_path / "r.jsonl", CONFIG, workers=4)
    results = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert [r["passed"] for r in results] == [True, False, False] * len(tasks)
    assert [r["task_id"] for r in results] == [s.task_id for s in samples]
    assert all(r["result"].startswith("failed: ") for r in results if not r["passed"])
    assert report.samples_per_task == 3
    assert report.pass_at_k == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})  # no k = 4 > n


def test_uneven_sample_counts_limit_k(tmp_path):
    problems = he.load_problems("random-span-light", DATA_DIR)
    a, b = list(problems.values())[:2]
    samples = [he.Sample(a.task_id, a.canonical_solution)] + \
        [he.Sample(b.task_id, b.canonical_solution if i == 0 else "") for i in range(3)]
    report = he.evaluate_samples("random-span-light", problems, samples, [1, 2],
                                 tmp_path / "r.jsonl", CONFIG, workers=2)
    assert (report.samples_per_task, report.samples_per_task_max) == (1, 3)
    assert report.pass_at_k == pytest.approx({1: (1 + 1 / 3) / 2})  # no pass@2: task a has 1
    table = he.format_table(report)
    assert "1-3" in table and "2/164" in table and "66.67%" in table


def test_samples_file_errors_name_the_line(tmp_path):
    problems = he.load_problems("random-span-light", DATA_DIR)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "RandomSpanInfillingLight/HumanEval/0/1", "completion": ""}\n'
                   "{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        he.read_samples(bad, problems)
    bad.write_text('{"task_id": "nope", "completion": ""}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: task_id 'nope'"):
        he.read_samples(bad, problems)


def test_results_path_is_beside_the_samples():
    assert he.results_path_for("/a/b/s.jsonl") == Path("/a/b/s.results.jsonl")
    assert he.results_path_for("s.jsonl.gz") == Path("s.results.jsonl")


def _each_fd(payload: bytes) -> str:
    """Body lines that write ``payload`` to every descriptor from 3 to 63 (to forge a verdict)."""
    return ("    import os\n    for _fd in range(3, 64):\n        try:\n"
            f"            os.write(_fd, {payload!r})\n        except OSError:\n            pass\n")


def test_samples_cli_end_to_end(tmp_path):
    # Single-line tasks whose middle is the first line of the function body: hostile lines put
    # before the right middle run as soon as the test calls the function. Forged or malformed
    # reports fail their sample and the run goes on, with every result written.
    problems = he.load_problems("single-line", DATA_DIR)
    first_lines = [p for p in problems.values() if p.task_id.endswith("/L0")][:9]
    right = [p.canonical_solution for p in first_lines]
    hostile = {
        "    exit()\n": "failed: SystemExit",
        "    import os; os.kill(os.getppid(), 9)\n": "failed: ",
        "    while True: pass\n": "timed out",
        "    open('written.txt', 'w').write('x' * 100)\n": "passed",  # its own directory: fine
        _each_fd(b'{"status": "passed"}\n'): "failed: ",
        _each_fd(b"{}\n"): "failed: ",
        _each_fd(b'{"status": "error", "detail": "boom"}\n'): "failed: ",
        _each_fd(b"\x00garbage\xff" * 1000): "failed: ",
        "    import json; json.dumps.__code__ = (lambda *a, **k: '{\"status\": \"passed\"}')"
        ".__code__\n    assert False\n": "failed: ",
    }
    lines = []
    for (statement, expected), problem, middle in zip(hostile.items(), first_lines, right):
        lines += [(problem, middle, "passed"), (problem, statement + middle, expected)]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p.task_id, "completion": c}) + "\n"
                               for p, c, _ in lines))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "megafim.eval.humaneval_infilling", "--benchmark", "single-line",
         "--samples", str(samples), "--k", "1,2,5", "--timeout", "5", "--workers", "4",
         "--json"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=True)
    assert "WARNING" in out.stderr
    report = json.loads(out.stdout)
    assert report["benchmark"] == "single-line"
    assert report["n_tasks"] == 9 and report["samples_per_task"] == 2
    # Eight tasks with one of two samples right, one with both: no pass@5, as n = 2.
    assert report["pass_at_k"] == {"pass@1": pytest.approx((8 * 0.5 + 1) / 9), "pass@2": 1.0}
    results = [json.loads(line) for line in open(report["results_path"])]
    assert Path(report["results_path"]) == tmp_path / "samples.results.jsonl"
    assert len(results) == len(lines)
    for result, (_, _, expected) in zip(results, lines):
        assert result["result"].startswith(expected), result
        assert result["passed"] == (expected == "passed")
    assert not (tmp_path / "written.txt").exists()


def test_cli_table_and_load_hook(tmp_path, capsys):
    he.main(["--canonical", "--data-dir", str(DATA_DIR), "--limit", "3", "--k", "1",
             "--output", str(tmp_path / "c.jsonl")])
    table = capsys.readouterr().out
    assert "pass@1" in table and "100.00%" in table and "3/164" in table
    from megafim.checkpoint.format import CheckpointError

    with pytest.raises(CheckpointError, match="no 'latest' file"):
        he.main(["--load", str(tmp_path), "--data-dir", str(DATA_DIR)])
    assert "WARNING" in he.build_parser().format_help()
    # From the command line: one clear line and a non-zero status, not a traceback.
    out = subprocess.run(
        [sys.executable, "-m", "megafim.eval.humaneval_infilling", "--load", str(tmp_path),
         "--data-dir", str(DATA_DIR)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert out.returncode == 2 and "neither a checkpoint directory" in out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------
# Hugging Face generator on a tiny random model (plumbing, not quality)
# ---------------------------------------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]


def _save_tiny_tokenizer(path: Path, specials=SPECIALS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i)\n"]
    tok.train_from_iterator(text * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def _tiny_llama(vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random model directory, and a second one whose weights make it a bigram chain:
    <fim_middle> -> 'x' -> '1' -> <|endoftext|> -> 'x' (the last step shows the stop is real)."""
    import torch

    random_dir = tmp_path_factory.mktemp("tiny_random")
    tok = _save_tiny_tokenizer(random_dir)
    _tiny_llama(len(tok)).save_pretrained(random_dir)

    chain_dir = tmp_path_factory.mktemp("tiny_chain")
    _save_tiny_tokenizer(chain_dir)
    model = _tiny_llama(len(tok))
    with torch.no_grad():
        for layer in model.model.layers:  # no attention or MLP output: the residual stream
            layer.self_attn.o_proj.weight.zero_()  # is the current token's embedding
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        unit = emb / emb.norm(dim=1, keepdim=True)
        head = model.lm_head.weight
        head.zero_()
        ids = [tok.convert_tokens_to_ids(t) for t in ("<fim_middle>",)]
        x, one = tok.encode("x", add_special_tokens=False)[0], tok.encode("1")[0]
        eot = tok.convert_tokens_to_ids("<|endoftext|>")
        for cur, nxt in [(ids[0], x), (x, one), (one, eot), (eot, x)]:
            head[nxt] = 40.0 * unit[cur]  # logit margin ~ 40 * sqrt(32) * (1 - cos) >> 1
    model.save_pretrained(chain_dir)
    return random_dir, chain_dir


def test_prompt_format_psm_and_spm(tiny_hf):
    from megafim.eval.generators import HFCompletionGenerator

    gen = HFCompletionGenerator(str(tiny_hf[0]), device="cpu")
    prefix, suffix = "def f(x):\n    return", " + 1\n"
    tok = gen.tokenizer
    psm = tok.decode(gen.prompt_ids(prefix, suffix, "psm"), clean_up_tokenization_spaces=False)
    spm = tok.decode(gen.prompt_ids(prefix, suffix, "spm"), clean_up_tokenization_spaces=False)
    assert psm == f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
    assert spm == f"<fim_prefix><fim_suffix>{suffix}<fim_middle>{prefix}"
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert gen.prompt_ids(prefix, suffix, "spm") == [1, 3, *enc(suffix), 2, *enc(prefix)]


def test_generation_stops_at_end_of_text(tiny_hf):
    from megafim.eval.generators import HFCompletionGenerator

    gen = HFCompletionGenerator(str(tiny_hf[1]), device="cpu")
    middles = gen.generate("a = ", "\n", n=3, temperature=1.0, top_p=0.95, max_new_tokens=20)
    assert middles == ["x1"] * 3
    assert gen.generate("a = ", "\n", n=2, temperature=1.0, top_p=0.95,
                        max_new_tokens=1) == ["x"] * 2


def test_sampling_parameters_reach_the_sampler(tiny_hf):
    import torch

    from megafim.eval.generators import HFCompletionGenerator

    gen = HFCompletionGenerator(str(tiny_hf[0]), device="cpu", batch_size=3)
    kw = dict(prefix="def f(x):\n", suffix="    return x\n", max_new_tokens=12, mode="psm")
    torch.manual_seed(0)
    hot = gen.generate(n=5, temperature=1.5, top_p=1.0, **kw)  # two batches: 3 + 2
    assert len(hot) == 5 and len(set(hot)) > 1
    greedy = gen.generate(n=3, temperature=0.0, top_p=0.95, **kw)
    assert len(greedy) == 3 and len(set(greedy)) == 1
    # A tiny nucleus keeps only the most likely token: sampling then equals greedy decoding.
    assert gen.generate(n=3, temperature=1.5, top_p=1e-6, **kw) == greedy
    spm = gen.generate(n=1, temperature=0.0, top_p=0.95, **dict(kw, mode="spm"))
    assert spm != greedy[:1]  # a different prompt (same model, greedy)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(n=1, temperature=1.0, top_p=0.0, **kw)
    with pytest.raises(ValueError, match="mode"):
        gen.generate(n=1, temperature=1.0, top_p=0.9, **dict(kw, mode="pms"))


def test_tokenizer_without_sentinels_is_rejected(tmp_path):
    from megafim.eval.generators import HFCompletionGenerator

    tok = _save_tiny_tokenizer(tmp_path, specials=["<|endoftext|>"])
    _tiny_llama(len(tok)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="<fim_prefix>"):
        HFCompletionGenerator(str(tmp_path), device="cpu")


def test_hf_model_cli_end_to_end(tiny_hf, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    he.main(["--hf-model", str(tiny_hf[1]), "--data-dir", str(DATA_DIR), "--limit", "2",
             "--num-samples", "2", "--temperature", "0.8", "--max-new-tokens", "8", "--k", "1,2",
             "--device", "cpu", "--output", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["n_tasks"] == 2 and report["samples_per_task"] == 2
    assert report["pass_at_k"] == {"pass@1": 0.0, "pass@2": 0.0}  # "x1" solves nothing
    samples = [json.loads(line) for line in open(out)]
    assert [s["completion"] for s in samples] == ["x1"] * 4
    assert Path(report["results_path"]) == tmp_path / "gen.results.jsonl"
