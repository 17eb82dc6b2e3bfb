"""metrics.jsonl is strict JSON (null for non-finite values) and holds each step once after a resume."""

import json
import math

from pretrain.metrics import MetricsLogger


def strict_loads(line: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def read_records(path):
    return [strict_loads(line) for line in path.read_text().splitlines()]


def test_non_finite_values_are_written_as_null(tmp_path):
    logger = MetricsLogger(str(tmp_path), tensorboard=False)
    logger.log({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "extra": [-math.inf, 2.0]})
    logger.close()
    [record] = read_records(tmp_path / "metrics.jsonl")
    assert record == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3, "extra": [None, 2.0]}


def test_resume_drops_records_of_steps_that_are_rerun(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in range(1, 11)))
    logger = MetricsLogger(str(tmp_path), tensorboard=False, resume_step=5)
    for s in range(6, 9):
        logger.log({"step": s, "loss": 0.5})
    logger.close()
    records = read_records(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in records] == [9.0, 8.0, 7.0, 6.0, 5.0, 0.5, 0.5, 0.5]


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    MetricsLogger(str(tmp_path), tensorboard=False, resume_step=1).close()
    assert read_records(path) == [{"step": 1, "loss": 2.0}]


def test_non_logging_rank_leaves_the_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 4))
    path.write_text(text)
    MetricsLogger(str(tmp_path), tensorboard=False, enabled=False, resume_step=1).close()
    assert path.read_text() == text
