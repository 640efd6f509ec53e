"""The shared cadence of every training loop: log / eval / save every N steps and (log, save) at the end."""

from viq.train.progress import due, flat_metrics, format_metrics


def test_due():
    assert [s for s in range(1, 8) if due(3, s, 7)] == [3, 6, 7]  # and the last step
    assert [s for s in range(1, 8) if due(3, s, 7, at_end=False)] == [3, 6]  # the final eval runs anyway
    assert [s for s in range(1, 7) if due(3, s, 6, at_end=False)] == [3]
    assert [s for s in range(1, 5) if due(None, s, 4)] == [4]


def test_metrics_flatten_and_format():
    m = {"loss": 0.5, "eval": {"acc": 0.25, "name": "x"}, "ok": True}
    assert flat_metrics(m) == {"loss": 0.5, "eval/acc": 0.25}
    assert format_metrics(m) == "loss=0.5 eval/acc=0.25"
