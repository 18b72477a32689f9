"""What a long job leaves on disk is bounded: checkpoints, the metrics log, role logs, the spill file."""

import shutil

from ops.metrics import MetricsLog, MetricsTail, metric_rows
from tba.logs import rotate
from trainer.checkpoint import prune
from trainer.spill_file import SpillFile, free_beyond_reserve


def test_checkpoints_keep_the_newest_and_those_named(tmp_path):
    for step in range(1, 11):
        (tmp_path / f"step-{step:06d}" / "model").mkdir(parents=True)
    (tmp_path / "latest").write_text("step-000010")
    (tmp_path / "step-000011").mkdir()  # a stray folder of a save interrupted before `latest` named it
    removed = prune(tmp_path, keep=3, steps=[2, 99], latest="step-000008")
    assert sorted(p.name for p in removed) == [f"step-{s:06d}" for s in (1, 3, 4, 5, 6, 7)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000002", "step-000008", "step-000009",
                                                         "step-000010", "step-000011"]  # fmt: skip
    assert "step-000008" not in {p.name for p in prune(tmp_path, keep=1, steps=[], latest="step-000008")}


def test_the_metrics_log_rotates_and_reads_back_oldest_first(tmp_path):
    log = MetricsLog(tmp_path, max_mb=0.001, backups=2)  # ~1 kB a file
    for step in range(200):
        log.write({"kind": "train", "step": step, "pad": "x" * 40})
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["metrics.jsonl", "metrics.jsonl.1", "metrics.jsonl.2"]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 3 * 1100  # bounded, whatever the steps
    steps = [r["step"] for r in metric_rows(tmp_path)]
    assert steps == list(range(steps[0], 200)) and steps[0] > 0  # the newest rows, in order; the oldest gone


def test_a_role_log_rotates_while_its_writer_keeps_appending(tmp_path):
    path = tmp_path / "searcher-0.log"
    with open(path, "ab", buffering=0) as role:  # the role's stdout, as the supervisor opens it
        for i in range(10):
            role.write(f"line {i} ".encode() + b"x" * 100 + b"\n")
            rotate(path, max_bytes=300, backups=2)
        role.write(b"last line\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["searcher-0.log", "searcher-0.log.1", "searcher-0.log.2"]
    assert path.read_bytes().endswith(b"last line\n") and path.stat().st_size < 300 + 120
    assert b"line 8 " in (tmp_path / "searcher-0.log.1").read_bytes()  # the newest old lines are in .1
    assert not rotate(path, max_bytes=10_000, backups=2)


def test_the_spill_file_stops_growing_before_the_disk_fills(tmp_path, monkeypatch, caplog):
    spill = SpillFile(str(tmp_path), max_bytes=1 << 30)
    assert free_beyond_reserve(spill._file.fileno()) < shutil.disk_usage(tmp_path).free  # the reserve is kept
    monkeypatch.setattr("trainer.spill_file.free_beyond_reserve", lambda fd: 1000)  # a disk nearly full
    spill.keep([(0, offset, bytes([offset]) * 300) for offset in range(5)])
    spill.keep([(0, 5, b"later")])
    assert [spill.get(0, o) is not None for o in range(6)] == [True, True, True, False, False, False]
    assert spill.full and spill.size <= 1000
    assert [r.message for r in caplog.records].count(
        "the spill file is full (the disk's free space, at 0.0 GB): groups read from here on are read back from "
        "Kafka when evicted"
    ) == 1
    spill.close()


def test_the_live_view_reads_only_the_rows_added_since_it_last_looked(tmp_path):
    tail = MetricsTail(tmp_path)
    assert tail.new_rows() == []  # no file yet
    log = MetricsLog(tmp_path, max_mb=0.0005, backups=1)  # ~500 bytes a file: rotates every few rows
    seen = []
    for step in range(40):
        log.write({"kind": "eval", "step": step, "pad": "x" * 60})
        if step % 3 == 0:
            seen += [r["step"] for r in tail.new_rows()]
    with open(tmp_path / "metrics.jsonl", "a") as half:
        half.write('{"kind": "eval", "st')  # a line still being written is left for the next look
    seen += [r["step"] for r in tail.new_rows()]
    assert seen == sorted(set(seen)) and seen[-1] == 39  # in order, never twice, the newest read
    assert tail.position == (tmp_path / "metrics.jsonl").stat().st_size  # read to the end, not again from 0
    log.close()
