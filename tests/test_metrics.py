import struct

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
