"""FIM for free, at small scale: train one model per FIM rate on the same tokens, compare the losses.

    python examples/fim_for_free/run.py [--config examples/fim_for_free/cpu_tiny.yaml] \
        [--fim-rates 0 0.5 0.9] [--train-iters N] [--eval-interval 100] [--eval-samples 256] [--out DIR]

Bavarian et al. (2022) find that training with FIM at rate 0.5-0.9 leaves the left-to-right (AR) loss
as it is, while the model learns to infill ("FIM for free"). Each run here trains the same model
(``python -m megafim.train``) with the same seed, so the same initial weights and the same contexts in
the same order; the FIM rate is the only difference. While a run trains, every saved checkpoint is
scored on held-out data with ``megafim.eval.loss.evaluate_losses``: AR loss, FIM loss (PSM, SPM) and
middle-only loss, including ``middle_ar`` (the same middle tokens scored left to right after the prefix
alone, what a model trained without FIM can do). The held-out contexts and the FIM cut points are the
same for every run and step, so the numbers compare token for token.

Writes under --out: ``results.json`` (every evaluation), ``results.md`` (tables), ``fim_for_free.png``
(the curves) and ``runs/fim_<rate>/`` (the trainer's log, metrics.jsonl and the last checkpoint).
Data: by default the Python standard library (examples/quickstart.py's split), tokenized here; or your
own JSONL (--train-jsonl/--heldout-jsonl), or datasets you already built (--data-path/--heldout-path/
--tokenizer-model). A finished run with the same settings is reused, so rates can be added later.
See docs/fim_for_free.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "examples")]  # fim_report.py; quickstart.write_corpus

import fim_report as report  # noqa: E402  (not "report": benchmarks/ has one)
from logged_run import run_logged  # noqa: E402

EVAL_SEED = 1234  # the FIM cut points of the held-out data: the same for every run and step


class ExperimentError(ValueError):
    """A bad setting or a failed stage; the message names the flag or the file."""


@dataclass
class ExperimentConfig:
    out: Path = REPO / "runs" / "fim_for_free"
    """Everything goes under this directory."""
    config: Path = HERE / "cpu_tiny.yaml"
    """The trainer's YAML config; the same for every FIM rate."""
    fim_rates: list = field(default_factory=lambda: [0.0, 0.5])
    """One run per rate; 0 is the left-to-right baseline."""
    train_iters: int | None = None
    """Steps per run; None keeps the config's schedule.train_iters."""
    eval_interval: int = 100
    """Save and evaluate a checkpoint every this many steps (and at the end)."""
    eval_samples: int = 256
    """Held-out contexts scored per evaluation (the first ones, in file order)."""
    eval_batch_size: int = 16
    seed: int = 1234
    """Trainer seed: initial weights, data order and FIM draws. The same for every rate."""
    vocab_size: int = 2048
    """Tokenizer size when this script trains the tokenizer."""
    tokenizer_max_mb: int = 8
    """Text sampled to train the tokenizer (MB)."""
    heldout_chunk_chars: int = 3000
    """Held-out files are cut into line-aligned chunks of about this many characters and shuffled
    (``chunk_documents``), so that the evaluated contexts sample every held-out file."""
    train_jsonl: Path | None = None
    heldout_jsonl: Path | None = None
    data_path: Path | None = None
    heldout_path: Path | None = None
    tokenizer_model: Path | None = None
    trainer_set: list = field(default_factory=list)
    """Extra ``--set a.b=v`` overrides for the trainer, applied to every run."""
    launcher: str = ""
    """Command that runs the trainer module, e.g. 'torchrun --standalone --nproc_per_node 8'."""
    device: str = "auto"
    """Where checkpoints are evaluated: auto (cuda when available), cpu, cuda."""
    keep_checkpoints: bool = False
    """Keep every evaluated checkpoint (default: delete all but each run's last)."""
    cpu_threads: int = 1
    """Torch threads of the trainer and the evaluator on the CPU. 1 by default: these matrices are too
    small to gain from threads, and on a busy machine two threads waiting on each other ran ~10x slower."""

    def validate(self) -> None:
        if not self.fim_rates:
            raise ExperimentError("--fim-rates: give at least one rate")
        for rate in self.fim_rates:
            if not 0.0 <= rate <= 1.0:
                raise ExperimentError(f"--fim-rates: {rate} is not a probability in [0, 1]")
        if len(set(self.fim_rates)) != len(self.fim_rates):
            raise ExperimentError(f"--fim-rates: {self.fim_rates} repeats a rate")
        for name in ("eval_interval", "eval_samples", "eval_batch_size", "vocab_size", "tokenizer_max_mb",
                     "heldout_chunk_chars", "cpu_threads"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ExperimentError(f"{flag}: must be at least 1, got {getattr(self, name)}")
        if self.train_iters is not None and self.train_iters < 1:
            raise ExperimentError(f"--train-iters: must be at least 1, got {self.train_iters}")
        if not self.config.is_file():
            raise ExperimentError(f"--config {self.config}: no such file")
        built = (self.data_path, self.heldout_path, self.tokenizer_model)
        if any(built) and not all(built):
            raise ExperimentError("--data-path, --heldout-path and --tokenizer-model go together")
        if any(built) and (self.train_jsonl or self.heldout_jsonl):
            raise ExperimentError("give either built datasets (--data-path ...) or JSONL (--train-jsonl ...)")
        if bool(self.train_jsonl) != bool(self.heldout_jsonl):
            raise ExperimentError("--train-jsonl and --heldout-jsonl go together")
        for path in (self.train_jsonl, self.heldout_jsonl, self.tokenizer_model):
            if path is not None and not Path(path).is_file():
                raise ExperimentError(f"{path}: no such file")
        for prefix in (self.data_path, self.heldout_path):
            if prefix is not None and not Path(f"{prefix}.idx").is_file():
                raise ExperimentError(f"{prefix}.idx: no such file (give the prefix of a .bin/.idx pair)")


@dataclass(frozen=True)
class DataPaths:
    train: Path
    heldout: Path
    tokenizer: Path

    def fingerprint(self) -> list:
        """Size and modification time of each file: a rebuilt dataset must not reuse old runs."""
        files = [Path(f"{self.train}.idx"), Path(f"{self.heldout}.idx"), Path(f"{self.heldout}.bin"),
                 self.tokenizer]
        return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


# --------------------------------------------------------------------------------------------
# Data: corpus -> tokenizer -> .bin/.idx, with the repository's own tools.


def run_tool(args: list[str], log: Path) -> None:
    """Run ``python <tool> args`` from the repository root; on failure, show the tail of its log."""
    run_logged([sys.executable, *args], log, REPO, ExperimentError)


def data_paths(cfg: ExperimentConfig) -> DataPaths:
    """Where the datasets and the tokenizer are (given) or will be (built under <out>/data)."""
    if cfg.data_path is not None:
        return DataPaths(Path(cfg.data_path), Path(cfg.heldout_path), Path(cfg.tokenizer_model))
    data = cfg.out / "data"
    return DataPaths(data / "train_text_document", data / "heldout_text_document", data / "tokenizer.model")


def prepare_data(cfg: ExperimentConfig, paths: DataPaths) -> None:
    """Build the datasets and tokenizer under <out>/data, unless given or already built alike."""
    if cfg.data_path is not None:
        return
    data = cfg.out / "data"
    spec = {"vocab_size": cfg.vocab_size, "tokenizer_max_mb": cfg.tokenizer_max_mb,
            "heldout_chunk_chars": cfg.heldout_chunk_chars,
            "train_jsonl": str(cfg.train_jsonl or "stdlib"),
            "heldout_jsonl": str(cfg.heldout_jsonl or "stdlib")}
    done = data / "spec.json"
    if done.is_file() and json.loads(done.read_text()) == spec:
        print(f"data: reusing {data}")
        return
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    log = data / "prepare.log"
    train_jsonl, held_jsonl = cfg.train_jsonl, cfg.heldout_jsonl
    if train_jsonl is None:
        from quickstart import write_corpus  # the quick start's stable held-out split of the stdlib

        train_jsonl, held_jsonl, n_train, n_held = write_corpus(data / "corpus")
        print(f"data: the standard library, {n_train} training files, {n_held} held-out files")
    held_chunks = data / "heldout_chunks.jsonl"
    n_chunks = chunk_documents(Path(held_jsonl), held_chunks, cfg.heldout_chunk_chars)
    print(f"data: held-out files cut into {n_chunks} line-aligned chunks of ~{cfg.heldout_chunk_chars} "
          "characters, shuffled")
    tok_prefix = data / "tokenizer"
    run_tool(["tools/train_tokenizer.py", "--input", str(train_jsonl), "--json-keys", "text",
              "--vocab-size", str(cfg.vocab_size), "--max-bytes", str(cfg.tokenizer_max_mb * 2**20),
              "--output-prefix", str(tok_prefix)], log)
    for name, jsonl in (("train", train_jsonl), ("heldout", held_chunks)):
        run_tool(["tools/preprocess_data.py", "--input", str(jsonl), "--output-prefix", str(data / name),
                  "--tokenizer-model", str(paths.tokenizer), "--json-keys", "text", "--append-eod",
                  "--workers", "2", "--quiet"], log)
    done.write_text(json.dumps(spec))


def chunk_documents(src: Path, dst: Path, chunk_chars: int, seed: int = 0) -> int:
    """Cut every document of ``src`` (JSONL, key ``text``) at line ends into chunks of about
    ``chunk_chars`` characters and write them to ``dst`` in a seeded random order.

    The evaluation scores the *first* contexts of the held-out data, and a held-out file can hold
    tens of thousands of tokens: in file order, the first few hundred contexts would come from two
    or three files (in the standard library, two of them codec tables, far easier than the rest).
    Shuffled chunks make the first contexts a sample of every held-out file."""
    chunks: list[str] = []
    with open(src, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise ExperimentError(f"{src}:{number}: not a JSON object with a 'text' string") from None
            current = ""
            for text_line in text.splitlines(keepends=True):
                current += text_line
                if len(current) >= chunk_chars:
                    chunks.append(current)
                    current = ""
            if current.strip():
                chunks.append(current)
    random.Random(seed).shuffle(chunks)
    with open(dst, "w", encoding="utf-8") as out:
        for chunk in chunks:
            out.write(json.dumps({"text": chunk}) + "\n")
    return len(chunks)


# --------------------------------------------------------------------------------------------
# One run per FIM rate: the trainer in a subprocess, its checkpoints evaluated here as they appear.


def trainer_args(cfg: ExperimentConfig, data: DataPaths, rate: float, save: Path) -> list[str]:
    """The trainer's arguments for one rate; only --fim-rate and --save differ between runs."""
    args = ["--config", str(cfg.config), "--data-path", str(data.train),
            "--tokenizer-model", str(data.tokenizer),
            "--save", str(save), "--fim-rate", str(rate), "--seed", str(cfg.seed),
            "--save-interval", str(cfg.eval_interval), "--set", "checkpoint.keep_last=0"]
    if cfg.train_iters is not None:
        args += ["--train-iters", str(cfg.train_iters)]
    for item in cfg.trainer_set:
        args += ["--set", item]
    return args


def effective_config(args: list[str], one_rank: bool):
    """The trainer's own parse of ``args`` (so bad settings fail here, before anything trains); the
    rank-count checks run only for one rank (a --launcher's world size is the trainer's to check)."""
    from megafim.training.cli import config_from_args
    from megafim.training.config import ConfigError, validate

    try:
        train_cfg, _ = config_from_args(args)
        if one_rank:
            validate(train_cfg, world_size=1)
    except ConfigError as exc:
        raise ExperimentError(f"trainer config: {exc}") from None
    return train_cfg


def evaluate_checkpoint(ckpt: Path, data: DataPaths, cfg: ExperimentConfig, seq_length: int,
                        device: str) -> dict:
    """Every loss of ``megafim.eval.loss`` for one checkpoint, as ``LossReport.as_dict()``."""
    from megafim.data.tokenizer import Tokenizer
    from megafim.eval.loss import evaluate_losses
    from megafim.inference.loading import load_model

    loaded = load_model(ckpt, device=device)
    result = evaluate_losses(loaded.model, Tokenizer.from_file(str(data.tokenizer)), str(data.heldout),
                             seq_length=seq_length, num_samples=cfg.eval_samples,
                             batch_size=cfg.eval_batch_size, seed=EVAL_SEED)
    return result.as_dict()


def launcher_cmd(cfg: ExperimentConfig) -> list[str]:
    if cfg.launcher:
        return [*shlex.split(cfg.launcher), "-m", "megafim.train"]
    return [sys.executable, "-m", "megafim.train"]


def rate_dir(cfg: ExperimentConfig, rate: float) -> Path:
    return cfg.out / "runs" / f"fim_{rate:g}"


def run_rate(cfg: ExperimentConfig, data: DataPaths, rate: float, device: str) -> dict:
    """Train (or reuse) the run for ``rate`` and return ``{"fim_rate", "evals", ...}``."""
    run_dir = rate_dir(cfg, rate)
    save = run_dir / "checkpoints"
    args = trainer_args(cfg, data, rate, save)
    train_cfg = effective_config(args, one_rank=not cfg.launcher)
    seq, iters = train_cfg.data.seq_length, train_cfg.schedule.train_iters
    tokens_per_step = train_cfg.batch.global_batch_size * seq
    cmd = launcher_cmd(cfg) + args
    spec = {"command": cmd, "eval_samples": cfg.eval_samples, "eval_seed": EVAL_SEED,
            "data": data.fingerprint()}
    spec_path, run_json = run_dir / "spec.json", run_dir / "run.json"
    if spec_path.is_file() and run_json.is_file() and json.loads(spec_path.read_text()) == spec:
        print(f"fim_rate {rate:g}: reusing the finished run in {run_dir}")
        return json.loads(run_json.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec_path.write_text(json.dumps(spec, indent=1))
    print(f"\n=== fim_rate {rate:g}: {iters} steps of {tokens_per_step:,} tokens; "
          f"log {run_dir / 'train.log'}")
    print("$ " + shlex.join(cmd).replace(sys.executable, "python"), flush=True)
    start = time.time()

    def evaluate(ckpt: Path, step: int) -> dict:
        t0 = time.time()
        losses = evaluate_checkpoint(ckpt, data, cfg, seq, device)
        print(f"fim_rate {rate:g} step {step:>6}: AR {losses['ar']['loss']:.4f}  "
              f"FIM PSM {losses['fim_psm']['loss']:.4f}  SPM {losses['fim_spm']['loss']:.4f}  "
              f"middle PSM {losses['middle_psm']['loss']:.4f}  L2R {losses['middle_ar']['loss']:.4f}"
              f"  ({time.time() - t0:.0f} s)", flush=True)
        return {"step": step, "tokens_seen": step * tokens_per_step, "losses": losses}

    evals = train_and_watch(cmd, save, run_dir, evaluate, keep=cfg.keep_checkpoints,
                            env=trainer_env(cfg, device))
    if not evals or evals[-1]["step"] != iters:
        raise ExperimentError(f"fim_rate {rate:g}: the trainer ended without a checkpoint at step {iters}")
    result = {"fim_rate": rate, "train_iters": iters, "tokens_per_step": tokens_per_step, "seq_length": seq,
              "wall_s": round(time.time() - start, 1), "final_train_loss": final_train_loss(save),
              "command": shlex.join(cmd).replace(sys.executable, "python"), "evals": evals}
    run_json.write_text(json.dumps(result))  # written last: its presence marks the run finished
    return result


def trainer_env(cfg: ExperimentConfig, device: str) -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(cfg.cpu_threads)
    return env


def train_and_watch(cmd: list[str], save: Path, run_dir: Path, evaluate, keep: bool, env: dict) -> list[dict]:
    """Run the trainer and evaluate each checkpoint as it appears (checkpoints become visible by an
    atomic rename, so a listed one is complete); then delete it unless ``keep`` or ``latest`` names it,
    so that a long run does not hold every optimizer state on disk at once."""
    from megafim.checkpoint.files import list_checkpoints
    from megafim.checkpoint.find import latest_checkpoint
    from megafim.checkpoint.format import step_of

    evals: list[dict] = []
    evaluated: set[int] = set()
    log_path = run_dir / "train.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                finished = proc.poll() is not None  # read before scanning: no save can follow it
                for ckpt in list_checkpoints(save):
                    step = step_of(ckpt)
                    if step in evaluated:
                        continue
                    evaluated.add(step)
                    evals.append(evaluate(ckpt, step))
                    with open(run_dir / "evals.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps(evals[-1]) + "\n")
                if not keep:  # also one that was the latest when it was evaluated and is no longer
                    latest = latest_checkpoint(save)
                    for ckpt in list_checkpoints(save):
                        if step_of(ckpt) in evaluated and latest is not None and latest.name != ckpt.name:
                            shutil.rmtree(ckpt, ignore_errors=True)
                if finished:
                    break
                time.sleep(2)
        finally:
            if proc.poll() is None:  # interrupted while training: do not leave the trainer running
                proc.terminate()
                proc.wait()
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-15:])
        raise ExperimentError(f"the trainer failed with exit code {proc.returncode}; log {log_path}:\n{tail}")
    return sorted(evals, key=lambda e: e["step"])


def final_train_loss(save: Path) -> float | None:
    """The trainer's last logged loss (metrics.jsonl), for reference next to the held-out losses."""
    metrics = save / "metrics.jsonl"
    if not metrics.is_file():
        return None
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]).get("loss") if lines else None


# --------------------------------------------------------------------------------------------
# The command line and the results.


def parse_args(argv: list[str] | None = None) -> tuple[ExperimentConfig, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ExperimentConfig()
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--config", type=Path, default=d.config, help="trainer YAML (default: %(default)s)")
    p.add_argument("--fim-rates", type=float, nargs="+", default=d.fim_rates,
                   help="default: 0 0.5 (add 0.9 for the paper's upper end)")
    p.add_argument("--train-iters", type=int, help="steps per run (default: the config's)")
    p.add_argument("--eval-interval", type=int, default=d.eval_interval, help="steps between evaluations")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help="held-out contexts per evaluation")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--seed", type=int, default=d.seed, help="trainer seed, the same for every rate")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="tokenizer size when trained here")
    p.add_argument("--tokenizer-max-mb", type=int, default=d.tokenizer_max_mb)
    p.add_argument("--heldout-chunk-chars", type=int, default=d.heldout_chunk_chars,
                   help="held-out files are cut into shuffled chunks of about this size (characters)")
    p.add_argument("--train-jsonl", type=Path, help="your own training corpus (JSONL, key 'text')")
    p.add_argument("--heldout-jsonl", type=Path, help="your own held-out corpus (JSONL, key 'text')")
    p.add_argument("--data-path", type=Path, help="an existing training dataset prefix (.bin/.idx)")
    p.add_argument("--heldout-path", type=Path, help="an existing held-out dataset prefix (.bin/.idx)")
    p.add_argument("--tokenizer-model", type=Path, help="the tokenizer of --data-path/--heldout-path")
    p.add_argument("--set", dest="trainer_set", action="append", default=[], metavar="A.B=VALUE",
                   help="trainer config override for every run (python -m megafim.train --set)")
    p.add_argument("--launcher", default="", help="runs '<launcher> -m megafim.train', e.g. 'torchrun "
                   "--standalone --nproc_per_node 8' (default: this python)")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="evaluation device")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every evaluated checkpoint")
    p.add_argument("--cpu-threads", type=int, default=d.cpu_threads,
                   help="torch threads of trainer and evaluator on the CPU (default: %(default)s)")
    ns = p.parse_args(argv)
    cfg = ExperimentConfig(**{k: v for k, v in vars(ns).items()})
    cfg.out = cfg.out.resolve()
    return cfg, sys.argv if argv is None else ["examples/fim_for_free/run.py", *argv]


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "gpu": gpu}


def write_results(cfg: ExperimentConfig, runs: list[dict], command: str) -> None:
    first = runs[0]
    title = (f"same model, seed and contexts; FIM rate the only difference "
             f"({first['train_iters']} steps x {first['tokens_per_step']:,} tokens)")
    results = {"command": command, "machine": machine(), "settings": _jsonable(asdict(cfg)),
               "eval_seed": EVAL_SEED, "runs": runs}
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    text = "\n\n".join([
        f"Command: `{command}`",
        report.token_counts(runs),
        "Losses at the last step (nats per token, held-out data):\n\n" + report.final_table(runs),
        "AR loss along training:\n\n" + report.curve_table(runs, "ar"),
        "FIM loss (PSM) along training:\n\n" + report.curve_table(runs, "fim_psm"),
        "Middle-only loss (PSM) along training:\n\n" + report.curve_table(runs, "middle_psm"),
    ])
    (cfg.out / "results.md").write_text(text + "\n")
    report.plot(runs, cfg.out / "fim_for_free.png", title)
    print("\n" + text)
    print(f"\nwrote {cfg.out / 'results.json'}, {cfg.out / 'results.md'}, {cfg.out / 'fim_for_free.png'}")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj


def main(argv: list[str] | None = None) -> int:
    cfg, raw = parse_args(argv)
    command = shlex.join(["python", *raw])
    try:
        cfg.validate()
        data = data_paths(cfg)
        for rate in cfg.fim_rates:  # the trainer's config checks, before anything is built
            effective_config(trainer_args(cfg, data, rate, rate_dir(cfg, rate) / "checkpoints"),
                             one_rank=not cfg.launcher)
        start = time.time()
        cfg.out.mkdir(parents=True, exist_ok=True)
        prepare_data(cfg, data)
        import torch

        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        if device == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        runs = [run_rate(cfg, data, rate, device) for rate in cfg.fim_rates]
        write_results(cfg, runs, command)
        print(f"done in {time.time() - start:.0f} s")
    except ExperimentError as exc:
        print(f"fim_for_free: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
