"""The trainer with packed documents, sequence parallelism and context parallelism (gloo, CPU, fp32):
each layout trains the losses of the plain one, and bad sizes stop it with one line naming the flag."""

import re

import pytest

from tests.training.launcher import base_args, check, launch, metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DOCS = ["--reset-attention-mask", "--reset-position-ids"]


def _run(tiny_data, tmp_path, name, nproc, extra, steps=3):
    save = tmp_path / name
    args = base_args(tiny_data, **{"data.fim.rate": 0.5}) + ["--train-iters", str(steps), "--n-future", "4",
                                                             "--save", str(save), *extra]
    check(launch(nproc, args, tmp_path))
    return [m["loss"] for m in metrics(save)]


def _assert_same(a, b, rtol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rtol * abs(y), (a, b)


def test_document_mask_trains_and_pipeline_stages_agree(tiny_data, tmp_path):
    # long enough contexts that some hold a document boundary (the corpus's documents are whole files):
    # at 256 tokens the 12 samples of 3 steps held none once the tokenizer gained <repo_name>/<file_sep>
    longer = ["--seq-length", "512"]
    plain = _run(tiny_data, tmp_path, "plain", 1, longer)
    masked = _run(tiny_data, tmp_path, "masked", 1, DOCS + longer)
    assert any(abs(x - y) > 1e-4 for x, y in zip(plain, masked)), (plain, masked)  # the mask changes training
    _assert_same(_run(tiny_data, tmp_path, "masked_pp2", 2, DOCS + longer + ["--pipeline-model-parallel-size", "2"]),
                 masked)


def test_sequence_parallel_trains_the_losses_of_tensor_parallel(tiny_data, tmp_path):
    tp = ["--tensor-model-parallel-size", "2"]
    _assert_same(_run(tiny_data, tmp_path, "sp", 2, tp + ["--sequence-parallel"]),
                 _run(tiny_data, tmp_path, "tp", 2, tp))


def test_context_parallel_trains_the_losses_of_cp1_and_resumes_exactly(tiny_data, tmp_path):
    reference = _run(tiny_data, tmp_path, "cp1", 1, DOCS, steps=4)
    cp = DOCS + ["--context-parallel-size", "2"]
    _assert_same(_run(tiny_data, tmp_path, "cp2", 2, cp + ["--save-interval", "2"], steps=4), reference)
    _assert_same(_run(tiny_data, tmp_path, "cp2_tp2", 4, cp + ["--tensor-model-parallel-size", "2",
                                                               "--zero-stage", "2"], steps=4), reference)
    resumed = tmp_path / "cp2_resumed"
    check(launch(2, base_args(tiny_data, **{"data.fim.rate": 0.5}) + [
        "--train-iters", "4", "--n-future", "4", "--save", str(resumed), "--load", str(tmp_path / "cp2" / "step_00000002"),
        *cp], tmp_path))
    _assert_same([m["loss"] for m in metrics(resumed)], reference[2:])


def test_context_parallel_under_zero3_trains_the_losses_of_cp1(tiny_data, tmp_path):
    zero3 = DOCS + ["--zero-stage", "3"]
    _assert_same(_run(tiny_data, tmp_path, "cp2_z3", 2, zero3 + ["--context-parallel-size", "2"]),
                 _run(tiny_data, tmp_path, "cp1_z3", 1, zero3))


def test_sequence_parallel_with_one_tensor_rank_exits_2_with_one_line(tiny_data, tmp_path):
    proc = launch(1, base_args(tiny_data) + ["--train-iters", "1", "--sequence-parallel"], tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert "parallel.sequence_parallel (--sequence-parallel) needs parallel.tensor > 1" in proc.stderr


@pytest.mark.parametrize("extra, world_size, message", [
    (["--context-parallel-size", "2"], 3, "world size 3 is not divisible by tensor (1) x pipeline (1) x "
                                          "context (2) = 2"),
    (["--context-parallel-size", "2", "--seq-length", "30"], 2,
     "parallel.context (--context-parallel-size 2): data.seq_length 30 is not divisible by 2 x 2"),
    (["--context-parallel-size", "0"], 2, "parallel.context (--context-parallel-size) must be a positive integer"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "33"], 2,
     "parallel.sequence_parallel (--sequence-parallel): data.seq_length 33 must split over parallel.tensor = 2"),
])
def test_bad_sizes_name_the_flag_before_any_process_group(tiny_data, extra, world_size, message):
    from megafim.training.cli import config_from_args
    from megafim.training.config import ConfigError
    from megafim.training.loop import check_before_groups

    cfg, _ = config_from_args(base_args(tiny_data) + extra)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_before_groups(cfg, world_size)
