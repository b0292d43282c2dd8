"""--estimate (training and alignment), --batch-size auto, the cost table, and the compile graph-break check."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from test_train_pipeline import cli_args, make_faces
from titan.costs import StageCost, TimedLoader, Work, bottlenecks, cost_table, recipe_workload, workload
from titan.device import fit_batch, graph_breaks, halved
from titan.models.classifier import Classifier
from titan.models.convnextv2 import build_backbone
from titan.models.heads import build_head
from titan.models.simmim import SimMIM
from titan.runlog import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import align_faces  # noqa: E402
import train_v42_diamond  # noqa: E402

STAGES = ["SSL step", "fine-tune step (+aug)", "validation", "TTA inference ×2"]


def tree(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in sorted(folder.rglob("*"))}


def estimate_record(out: Path, event: str = "estimate") -> dict:
    recs, bad = read_jsonl(out / ("estimate_v42_log.jsonl" if event == "estimate" else "align_estimate_log.jsonl"))
    assert bad == 0
    return [r for r in recs if r["event"] == event][-1]


def test_estimate_times_every_stage_and_writes_nothing_but_its_log(tmp_path: Path):
    data = make_faces(tmp_path)
    before = tree(data)
    assert train_v42_diamond.main(cli_args(data, "est", "--estimate", "--estimate-steps", "2")) == 0
    out = data / "est"
    assert sorted(p.name for p in out.rglob("*")) == ["estimate_v42_log.jsonl", "estimate_v42_log.txt"]
    assert {k: v for k, v in tree(data).items() if not k.startswith("est")} == before  # faces and labels untouched
    rec = estimate_record(out)
    assert [s["stage"] for s in rec["stages"]] == STAGES
    for s in rec["stages"]:
        assert all(math.isfinite(s[k]) for k in ("img_s", "seconds", "peak_gib", "data_wait")), s
        assert s["img_s"] > 0 and s["steps"] > 0 and s["images"] > 0, s
    # Projection: 24 real + 4 pseudo rows, 5 folds × 2 epochs; SSL over 24 train + 8 test faces × 1 epoch.
    by = {s["stage"]: s for s in rec["stages"]}
    assert by["SSL step"]["images"] == 32 and by["fine-tune step (+aug)"]["images"] == 2 * (5 * 28 - 24)
    assert by["validation"]["images"] == 2 * 24 and by["TTA inference ×2"]["images"] == 8 * 5
    assert rec["total_seconds"] == pytest.approx(sum(s["seconds"] for s in rec["stages"]))
    text = (out / "estimate_v42_log.txt").read_text()
    assert all(name in text for name in STAGES) and "total" in text and "data loader" in text


def test_estimate_of_one_stage_times_only_that_stage(tmp_path: Path):
    data = make_faces(tmp_path, n_train=12, n_test=4, n_pseudo=0)
    assert train_v42_diamond.main(cli_args(data, "est", "--estimate", "--estimate-steps", "1", "--stages", "ssl")) == 0
    assert [s["stage"] for s in estimate_record(data / "est")["stages"]] == ["SSL step"]


@pytest.fixture
def oom_above_4(monkeypatch):
    """Every training forward (model.train()) with more than 4 images raises the device's out-of-memory error."""
    calls: list[int] = []

    def guard(forward):
        def wrapped(self, x, *a, **k):
            calls.append(x.shape[0])
            if self.training and x.shape[0] > 4:
                raise torch.OutOfMemoryError(f"simulated: batch {x.shape[0]} does not fit")
            return forward(self, x, *a, **k)
        return wrapped

    monkeypatch.setattr(SimMIM, "forward", guard(SimMIM.forward))
    monkeypatch.setattr(Classifier, "forward", guard(Classifier.forward))
    return calls


def test_batch_size_auto_halves_on_out_of_memory_and_keeps_the_virtual_batch(tmp_path: Path, oom_above_4):
    data = make_faces(tmp_path, n_train=12, n_test=4, n_pseudo=0)
    # virtual batch 8 × 2 = 16: 16 and 8 do not fit, 4 does → 4 × accumulation 4.
    args = cli_args(data, "auto", "--stages", "ssl", "--batch-size", "auto", "--accum-steps", "2")
    assert train_v42_diamond.main(args) == 0
    cfg = json.loads((data / "auto" / "config_v42.json").read_text())
    assert (cfg["batch_size"], cfg["accum_steps"], cfg["auto_batch"]) == (4, 4, True)
    assert {16, 8, 4} <= set(oom_above_4) and max(n for n in oom_above_4 if n <= 4) == 4
    recs, _ = read_jsonl(data / "auto" / "training_v42_log.jsonl")
    auto = [r for r in recs if r["event"] == "auto_batch"][0]
    assert auto["batch_size"] * auto["accum_steps"] == auto["virtual_batch"] == 16
    assert auto["did_not_fit"] == ["ssl batch 16: out of memory (OutOfMemoryError)", "ssl batch 8: out of memory (OutOfMemoryError)"]
    assert any(r["event"] == "ssl_epoch" for r in recs)  # and SimMIM trained at the found batch


def test_estimate_reports_the_auto_batch(tmp_path: Path, oom_above_4):
    data = make_faces(tmp_path, n_train=12, n_test=4, n_pseudo=0)
    args = cli_args(data, "est", "--estimate", "--estimate-steps", "1", "--batch-size", "auto", "--n-folds", "2")
    assert train_v42_diamond.main(args) == 0
    rec = estimate_record(data / "est")
    assert (rec["batch_size"], rec["accum_steps"]) == (4, 2)  # tiny preset: 8 × 1 → 4 × 2
    assert "batch size auto: 4 × accumulation 2 = virtual batch 8" in (data / "est" / "estimate_v42_log.txt").read_text()


def test_halving_keeps_batch_times_accumulation_exact():
    assert [halved(b) for b in (32, 16, 3, 1)] == [16, 8, 1, 1]
    chain, b = [], 30
    while b > 1:
        b = halved(b, multiple_of=30)
        chain.append(b)
    assert chain == [15, 6, 3, 1] and all(30 % c == 0 for c in chain)


def test_fit_batch_reraises_what_is_not_out_of_memory():
    def step(b: int) -> None:
        if b > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert fit_batch(step, 8, torch.device("cpu")) == (2, ["batch 8: out of memory (RuntimeError)",
                                                          "batch 4: out of memory (RuntimeError)"])
    with pytest.raises(ValueError):
        fit_batch(lambda b: (_ for _ in ()).throw(ValueError("bad input")), 8, torch.device("cpu"))
    with pytest.raises(torch.OutOfMemoryError):
        fit_batch(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("never fits")), 2, torch.device("cpu"))


def test_align_estimate_times_each_split_and_writes_no_crop(tmp_path: Path, demo_photos):
    from PIL import Image

    for split, n in (("train", 6), ("test", 3)):
        folder = tmp_path / "ds" / f"{split}_images"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(demo_photos[i % len(demo_photos)].image).save(folder / f"{split}{i}.jpg")
    args = ["--input", str(tmp_path / "ds"), "--output", str(tmp_path / "faces"), "--device", "cpu", "--estimate",
            "--estimate-images", "4", "--batch-size", "2", "--workers", "1"]
    assert align_faces.main(args) == 0
    assert sorted(p.name for p in (tmp_path / "faces").rglob("*")) == ["align_estimate_log.jsonl", "align_estimate_log.txt"]
    rec = estimate_record(tmp_path / "faces", "align_estimate")
    assert [s["stage"] for s in rec["stages"]] == ["align train", "align test"]
    assert [s["images"] for s in rec["stages"]] == [6, 3]
    assert all(s["img_s"] > 0 and math.isfinite(s["seconds"]) for s in rec["stages"])


def test_a_slow_loader_is_named_as_the_bottleneck_with_its_share():
    def slow_batches():
        for _ in range(6):
            time.sleep(0.03)  # the loader: 30 ms per batch
            yield torch.zeros(4, 1)

    loader = TimedLoader(slow_batches())
    for _ in loader:
        time.sleep(0.01)  # the model: 10 ms per batch
    images, seconds, wait = loader.window(1)
    assert images == 20 and 0.6 < wait / seconds < 0.9
    row = StageCost("fine-tune step", images / seconds, Work(1000, 250), 1.0, wait / seconds)
    (line,) = bottlenecks([row])
    assert "fine-tune step: the data loader is the bottleneck" in line and "waits" in line
    fast = StageCost("validation", 100.0, Work(500, 5), 1.0, 0.02)
    assert not bottlenecks([fast]) and "keeps up" in cost_table([fast])[-1]
    assert row.seconds == pytest.approx(1000 / row.img_s)


def test_the_recipe_workload_counts_images_and_optimiser_steps():
    w = recipe_workload()
    assert w["ssl"].images == 50 * 58_000 and w["ssl"].steps == 50 * math.ceil(58_000 / 8 / 4)
    assert w["finetune"].images == 5 * 10 * (46_000 - 9_200) and w["validation"].images == 5 * 10 * 9_200
    assert w["infer"].images == 5 * 12_000
    two = workload(10, [(8, 2)], 4, ssl_epochs=1, ft_epochs=1, batch_size=4, accum_steps=1, infer_batch_size=4, world=2)
    assert two["ssl"].steps == 2 and two["finetune"].steps == 1  # per process: 5 and 4 images


@pytest.mark.parametrize("make", [
    lambda b: (Classifier(b, build_head("linear", b.num_features)), (torch.rand(2, 3, 64, 64), torch.tensor([0.0, 1.0]))),
    lambda b: (SimMIM(b, 32, 0.4), (torch.rand(2, 3, 64, 64),)),
])
def test_compile_covers_everything_after_the_nine_channel_input_with_one_break(make):
    model, args = make(build_backbone("atto"))
    g = graph_breaks(model, *args)
    # At most one break — where the eager FFT input hands over (none is counted when nothing was
    # traced before it, as in SimMIM) — and no FFT inside a graph.
    assert g["breaks"] <= 1 and not g["fft_in_graph"]
    assert max(g["ops"]) > 100  # stem, every stage and block in one graph
