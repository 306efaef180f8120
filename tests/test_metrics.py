import struct
import subprocess
import sys

from conftest import REPO

from tensorboardX.proto import event_pb2

from jaxlm.metrics import MetricsLog, read_metrics


def _scalars(board_dir):
    """(tag, step, value) of every scalar in the TFRecord-framed event files, in write order."""
    found = []
    for path in sorted(board_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            found += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return found


def test_jsonl_and_tensorboard_get_the_same_scalars(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl", enabled=True, resume_step=0, tensorboard_dir=tmp_path / "tb")
    log.write([{"step": 1, "loss": 2.5, "nonfinite": False}, {"step": 2, "loss": 2.0}])
    log.write([{"step": 2, "eval_loss": 1.75}])
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2, 2]
    assert _scalars(tmp_path / "tb") == [("train/loss", 1, 2.5), ("train/loss", 2, 2.0),
                                         ("eval/loss", 2, 1.75)]


def test_resume_drops_records_after_the_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 3, "lo')
    MetricsLog(path, enabled=True, resume_step=1).write([{"step": 2, "loss": 1.5}])
    assert read_metrics(path) == [{"step": 1, "loss": 3}, {"step": 2, "loss": 1.5}]
    MetricsLog(tmp_path / "other.jsonl", enabled=False, resume_step=0).write([{"step": 1}])
    assert not (tmp_path / "other.jsonl").exists()


FILL_UP = """
from pathlib import Path
from jaxlm.errors import TrainingStopped
from jaxlm.metrics import MetricsLog
log = MetricsLog(Path("{d}/m.jsonl"), enabled=True, resume_step=0, tensorboard_dir=Path("{d}/tb"))
try:
    for step in range(1, 1_000_000):
        log.write([{{"step": step, "loss": 1.0 / step, "note": "x" * 200}}])
except TrainingStopped as err:
    print(err)
log.close()
"""


def test_a_full_disk_stops_metric_writes_with_one_message_instead_of_blocking(tmp_path):
    """JSONL and TensorBoard on a 256 KiB tmpfs (private mount namespace, no root needed)."""
    script = f"mount -t tmpfs -o size=256k tmpfs {tmp_path} && {sys.executable} -c '{FILL_UP.format(d=tmp_path)}'"
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("writing metrics of step ") and "(No space left on device)" in proc.stdout
