"""The bench's byte count of one federated round, made with the functions the server
and the edge use."""

from __future__ import annotations

from bench.wire import _round_bytes
from fl_core.model import build_split_model, model_to_bytes


def test_a_rounds_model_downloads_as_its_update_in_about_half_the_bytes() -> None:
    model = build_split_model(
        ["ok", "defect"], backbone="tiny_cnn", pretrained=False, input_size=32
    )
    r = _round_bytes(model, model_to_bytes(model))
    assert r["train_from"] == model.info.finetune_from and r["dtype"] == "float16"
    assert r["changed_tensors"] == r["trained_tensors"] > 0
    # float16 against the changed float32 tensors, each with its file's header
    assert r["download_update"] < 0.6 * r["download_changed_tensors"]
    assert 2 * r["trained_parameters"] < r["upload"] < 2 * r["trained_parameters"] + 10_000
