"""benchmarks/speed_vs_official.py and the ``--data-root`` path it shares with benchmarks/parity.py:
argument handling, the staged image folder both systems read, the alternation of the runs and the
report.  The official code is never run here (its runs are replaced by recorded epochs)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import image_tree
from PIL import Image

from clusterkit.data import load_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def speed():
    """benchmarks/speed_vs_official.py as a module (it imports benchmarks/parity.py as ``parity``)."""
    spec = importlib.util.spec_from_file_location("speed_vs_official", REPO / "benchmarks" / "speed_vs_official.py")
    module = importlib.util.module_from_spec(spec)
    path_before = list(sys.path)
    had_parity = "parity" in sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path[:] = path_before
        if not had_parity:
            sys.modules.pop("parity", None)


def _flat_folder(root: Path, n: int = 6, size=(10, 10)) -> Path:
    """ROOT/<i>.png and ROOT/sub/<i>.jpg: unlabeled images (a flat folder and a sub-folder)."""
    rng = np.random.default_rng(1)
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        folder, ext = (root, "png") if i % 2 else (root / "sub", "jpg")
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"img{i}.{ext}")
    return root


# --------------------------------------------------------------------------- arguments


def test_defaults_are_the_recorded_setting(speed):
    args = speed.parse_args([])
    assert args.methods == ["propos", "digpro"] and args.systems == ["official", "clusterkit"]
    assert (args.untimed_epochs, args.timed_epochs, args.threads, args.batch_size) == (1, 3, 2, 256)
    assert args.limit == 5000 and args.data_root is None and args.device == "cpu"
    assert speed.command_line(args) == ("python benchmarks/speed_vs_official.py --methods propos digpro "
                                        "--out benchmarks/results/speed_vs_official.md")


@pytest.mark.parametrize("argv, message", [
    (["--untimed-epochs", "0"], "--untimed-epochs must be at least 1"),
    (["--timed-epochs", "0"], "--timed-epochs must be at least 1"),
    (["--timed-epochs", "30"], "must not exceed --schedule-epochs"),
    (["--set", "run.channels_last"], "must look like KEY=VALUE"),
    (["--variant", "cl"], "has no KEY=VALUE override"),
    (["--variant", "run.channels_last=true"], "the first word is the variant's name"),
    (["--variant", "clusterkit", "run.channels_last=true"], "is used twice"),
    (["--timed-epochs", "1"], "would overwrite the recorded Fashion-MNIST result"),
    (["--limit", "512"], "would overwrite the recorded Fashion-MNIST result"),
    (["--limit", "100", "--out", "/tmp/x.md"], "--limit must be at least --batch-size"),
    (["--limit", "20000", "--out", "/tmp/x.md"], "at most 10000"),
    (["--data-root", "/nonexistent/images", "--out", "/tmp/x.md"], "is not a folder"),
])
def test_bad_arguments_stop_with_a_message(speed, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        speed.parse_args(argv)
    assert exc.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_levers_and_variants_reach_the_clusterkit_runs_only(speed, tmp_path):
    args = speed.parse_args(["--methods", "propos", "--repeats", "2", "--set", "data.pipeline=batched",
                             "--variant", "cl", "run.channels_last=true", "--variant", "amp", "run.amp_cpu=true",
                             "--out", str(tmp_path / "s.md")])
    assert speed.systems_of(args) == [
        ("official", []), ("clusterkit", ["data.pipeline=batched"]),
        ("cl", ["data.pipeline=batched", "run.channels_last=true"]),
        ("amp", ["data.pipeline=batched", "run.amp_cpu=true"])]
    order = [(rep, label) for _, rep, label, _ in speed.schedule(args)]
    assert order == [(0, "official"), (0, "clusterkit"), (0, "cl"), (0, "amp"),
                     (1, "amp"), (1, "cl"), (1, "clusterkit"), (1, "official")]
    p = speed.parity_args(args, ["run.channels_last=true"])
    assert (p.epochs, p.extra_set, p.rerun) == (4, ["run.channels_last=true"], True)
    assert not hasattr(args, "extra_set")  # the caller's options are not changed
    assert speed.command_line(args).endswith(
        "--repeats 2 --set data.pipeline=batched --variant cl run.channels_last=true "
        "--variant amp run.amp_cpu=true --out s.md")


# --------------------------------------------------------------------------- the data-root path


def test_a_labelled_folder_is_staged_for_both_readers_in_one_order(speed, tmp_path):
    parity = speed.parity
    src = image_tree(tmp_path / "mine", classes=("zebra", "apple", "Mango"), per_class=3)
    root, name, meta = parity.prepare_folder(tmp_path / "work", src)
    assert meta["labelled"] and meta["classes"] == ["Mango", "apple", "zebra"]
    assert meta["images"] == 9 and meta["decode_size"] == 8
    staged = root / name
    # class folders are numbered (no class name can look like a split folder, train/ or val/, to either
    # reader, or sort differently in the two)
    assert sorted(p.name for p in staged.iterdir() if p.is_dir()) == ["c000", "c001", "c002"]
    # the official code reads data_folder/dataset with torchvision's ImageFolder ...
    config = parity._official_config(_child_args(root, name), root, name)
    official = torchvision.datasets.ImageFolder(os.path.join(config["data_folder"], config["dataset"]))
    # ... and clusterkit reads data.root = the staged folder: the same files, in the same order, same labels
    ours = load_dataset("imagefolder", staged, image_size=8, cache=False, progress=False)
    assert [os.path.realpath(p) for p, _ in official.samples] == [os.path.realpath(p) for p in ours.paths]
    assert [t for _, t in official.samples] == ours.targets.tolist()
    original = load_dataset("imagefolder", src, image_size=8, cache=False, progress=False)
    assert [os.path.realpath(p) for p in ours.paths] == [os.path.realpath(p) for p in original.paths]
    assert ours.targets.tolist() == original.targets.tolist()
    # the clusterkit run decodes at the files' own size
    args = _child_args(root, name)
    assert "data.decode_size=8" in parity.clusterkit_overrides(args)
    assert "data.labels=none" not in parity.clusterkit_overrides(args)
    # staging again reuses the folder; a changed file is a new one
    assert parity.prepare_folder(tmp_path / "work", src)[1] == name
    Image.new("RGB", (8, 8)).save(src / "apple" / "0.png")
    os.utime(src / "apple" / "0.png", ns=(1, 1))
    assert parity.prepare_folder(tmp_path / "work", src)[1] != name


def _child_args(root, name):
    from types import SimpleNamespace

    return SimpleNamespace(image_root=str(root), dataset=name, seed=0, schedule_epochs=30, batch_size=4,
                           threads=1, device="cpu", extra_set=["run.channels_last=true"])


def test_an_unlabeled_folder_trains_without_scores(speed, tmp_path):
    parity = speed.parity
    src = _flat_folder(tmp_path / "flat", n=6, size=(12, 9))
    root, name, meta = parity.prepare_folder(tmp_path / "work", src)
    assert not meta["labelled"] and meta["classes"] == [] and meta["images"] == 6
    assert meta["decode_size"] is None  # not square: clusterkit decodes to image_size
    assert os.listdir(root / name / "unlabeled") and len(os.listdir(root / name / "unlabeled")) == 6
    overrides = parity.clusterkit_overrides(_child_args(root, name))
    assert "data.labels=none" in overrides and "data.decode_size=null" in overrides
    assert overrides[-1] == "run.channels_last=true"  # the user's overrides come last
    # the official ImageFolder sees one class for all; clusterkit none: neither is scored
    official = torchvision.datasets.ImageFolder(str(root / name))
    rec = parity.epoch_record(np.random.default_rng(0).normal(size=(6, 4)), [0, 1, 0, 1, 2, 2],
                              [t for _, t in official.samples], 3)
    assert rec["nmi"] is None and rec["acc"] is None and rec["largest_share"] == pytest.approx(1 / 3)
    rec = parity.epoch_record(np.ones((6, 4)), [0, 1, 0, 1, 2, 2], [-1] * 6, 3)
    assert rec["nmi"] is None and parity.nmi_text(rec) == "unlabeled"
    # a subset is a seeded random one, the same every time
    _, sub, meta = parity.prepare_folder(tmp_path / "work", src, limit=4)
    assert meta["images"] == 4 and parity.prepare_folder(tmp_path / "work2", src, limit=4)[1] == sub


def test_a_folder_smaller_than_a_batch_or_without_images_stops_with_a_message(speed, tmp_path):
    src = image_tree(tmp_path / "few", per_class=2)
    args = speed.parse_args(["--data-root", str(src), "--out", str(tmp_path / "s.md"),
                             "--work", str(tmp_path / "work")])
    args.work = args.work.resolve()
    with pytest.raises(SystemExit, match="holds 4 images, fewer than one batch"):
        speed.parity.prepare_data(args)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no image files"):
        speed.parity.prepare_folder(tmp_path / "work", tmp_path / "empty")


def test_parity_takes_the_same_data_root(speed, tmp_path):
    parity = speed.parity
    args = parity.parse_args(["--data-root", str(tmp_path), "--batch-size", "4", "--limit", "8"])
    assert args.data_root == tmp_path and args.limit == 8
    args = parity.parse_args([])
    assert args.limit == 5000 and args.data_root is None
    args.data_root, args.limit, args.out = tmp_path / "pics", None, str(tmp_path / "p.md")
    assert "--data-root pics" in parity.command_line(args) and "--limit" not in parity.command_line(args)


# --------------------------------------------------------------------------- the runs and the report


def _fake_records(base: float, epochs: int, nmi: float | None = 0.3):
    """Epoch 0 (no time) and epochs 1..N: epoch 1 slow (the untimed one), then base, base+1, ..."""
    recs = [{"epoch": 0, "nmi": nmi, "largest_share": 0.2}]
    for e in range(1, epochs + 1):
        recs.append({"epoch": e, "nmi": nmi, "largest_share": 0.2,
                     "seconds": 100.0 if e == 1 else base + (e - 2), "e_step_seconds": base / 10})
    return recs


def test_the_benchmark_alternates_runs_and_reports_medians_and_ratio(speed, tmp_path, monkeypatch, capsys):
    calls = []

    def run_one(args, method, system, seed, data_root, dataset):
        calls.append((method, system, list(args.extra_set), args.epochs, args.rerun))
        base = 40.0 if system == "official" else (20.0 if "run.channels_last=true" in args.extra_set else 30.0)
        return _fake_records(base, args.epochs)

    monkeypatch.setattr(speed.parity, "run_one", run_one)
    monkeypatch.setattr(speed.parity, "prepare_images", lambda work, limit: (tmp_path, "fmnist"))
    out = tmp_path / "speed.md"
    speed.main(["--methods", "propos", "--repeats", "2", "--variant", "cl", "run.channels_last=true",
                "--out", str(out), "--work", str(tmp_path / "w"), "--official-python", sys.executable])
    assert calls == [("propos", "official", [], 4, True), ("propos", "clusterkit", [], 4, True),
                     ("propos", "clusterkit", ["run.channels_last=true"], 4, True),
                     ("propos", "clusterkit", ["run.channels_last=true"], 4, True),
                     ("propos", "clusterkit", [], 4, True), ("propos", "official", [], 4, True)]
    raw = json.loads(out.with_suffix(".json").read_text())
    s = raw["summary"]["propos"]
    # timed epochs 2..4 of each run: base, base+1, base+2 (the untimed 100 s epoch is left out)
    assert s["median"] == {"official": 41.0, "clusterkit": 31.0, "cl": 21.0}
    assert s["epochs"] == {"official": 6, "clusterkit": 6, "cl": 6}
    assert s["ratio"]["clusterkit"] == pytest.approx(31 / 41) and s["ratio"]["cl"] == pytest.approx(21 / 41)
    assert s["e_step_median"] == {"official": 4.0, "clusterkit": 3.0, "cl": 2.0}
    assert raw["finished"] and not raw["smoke"] and len(raw["runs"]) == 6
    for run in raw["runs"]:
        assert len(run["load_before"]) == 3 and len(run["load_after"]) == 3
    text = out.read_text()
    assert "| ProPos | 41.0 (6 ep.) | 31.0 (6 ep.) | 21.0 (6 ep.) | 0.76 | 0.51 | met |" in text
    assert "`python benchmarks/speed_vs_official.py --methods propos --repeats 2 --variant cl " \
           "run.channels_last=true --out speed.md`" in text
    assert "ProPos: official 4.0 s (10%), clusterkit 3.0 s (10%), cl 2.0 s (10%)" in text
    assert str(tmp_path) not in text  # no machine paths in the results
    assert "100.0" in text  # the untimed epoch is shown, apart
    assert "propos: median s/epoch official 41.0, clusterkit 31.0, cl 21.0" in capsys.readouterr().out


def test_a_missing_official_environment_is_named(speed, tmp_path):
    with pytest.raises(SystemExit, match="setup_official.sh"):
        speed.main(["--out", str(tmp_path / "s.md"), "--official-python", str(tmp_path / "nope" / "python")])


def test_others_cpu_share_counts_only_other_processes(speed):
    before = {"wall": 0.0, "busy": 100.0, "ours": 10.0}
    after = {"wall": 10.0, "busy": 115.0, "ours": 20.0}  # 15 busy CPU-seconds, 10 of them ours
    assert speed.others_share(before, after) == pytest.approx(5.0 / (10.0 * (os.cpu_count() or 1)))
    assert speed.others_share({**before, "busy": None}, after) is None
    snap = speed.cpu_snapshot()
    assert snap["ours"] > 0 and snap["wall"] > 0


def _fake_stat(pid: int, ppid: int, utime: int, comm: str = "python") -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    rest = ["S", str(ppid)] + ["0"] * 9 + [str(utime), "5"] + ["0"] * 6 + ["4242"]
    return f"{pid} ({comm}) " + " ".join(rest)


def test_descendants_are_found_through_the_whole_tree(speed, tmp_path):
    """A grandchild (a loader worker its parent never waits for) counts as ours; a process
    outside the tree does not; a name with spaces and brackets does not shift the fields."""
    tick = os.sysconf("SC_CLK_TCK")
    tree = {10: (1, "bench"), 11: (10, "run"), 12: (11, "pt_data_worker) 1"), 13: (12, "x"), 20: (1, "other")}
    for pid, (ppid, comm) in tree.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(_fake_stat(pid, ppid, 100 * pid, comm))
    (tmp_path / "self").mkdir()  # not a pid: ignored
    found = speed.descendant_cpu(10, tmp_path)
    assert sorted(found) == [(11, 4242), (12, 4242), (13, 4242)]
    assert found[(12, 4242)] == pytest.approx((1200 + 5) / tick)


def test_the_meter_sees_a_grandchild_nobody_waits_for(speed):
    import subprocess
    import time

    # its own session: the busy grandchild is in the parent's process group, which the cleanup kills whole
    # (killing the descendants seen in one scan raced with a grandchild started after it, and leaked a
    # busy process in a loaded CI run)
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'while True: pass']); time.sleep(600)"],
                              start_new_session=True)
    try:
        with speed.DescendantMeter(interval=0.05) as meter:
            deadline = time.monotonic() + 60

            def grandchild() -> list[float]:  # the meter's readings of the parent's own children
                kids = {pid for pid, _ in speed.descendant_cpu(parent.pid)}
                return [cpu for (pid, _), cpu in list(meter.seen.items()) if pid in kids]

            while time.monotonic() < deadline and not any(cpu > 0 for cpu in grandchild()):
                time.sleep(0.05)
            seen = grandchild()
        assert any(cpu > 0 for cpu in seen)  # the busy grandchild's CPU time is counted
        assert meter.seconds >= max(seen)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, 9)
        parent.wait()


# --------------------------------------------------------------------------- benchmarks/gpu_check.sh


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--python", sys.executable,
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    message = " ".join(res.stderr.split())
    assert "gpu_check.sh: no GPU is present: torch.cuda.is_available() is False" in message
    assert "nothing was run" in message and "Traceback" not in res.stderr
    assert not out.exists()


def test_gpu_check_names_a_python_without_clusterkit_and_bad_options(tmp_path):
    script = str(REPO / "benchmarks" / "gpu_check.sh")
    res = subprocess.run(["bash", script, "--python", str(tmp_path / "no-python")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "cannot import clusterkit and torch" in res.stderr
    res = subprocess.run(["bash", script, "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown option '--frobnicate'" in res.stderr


# --------------------------------------------------------------------------- benchmarks/gpu_projection.py


def test_gpu_projection_counts_traffic_and_projects_from_its_stated_assumptions():
    spec = importlib.util.spec_from_file_location("gpu_projection", REPO / "benchmarks" / "gpu_projection.py")
    proj = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proj)
    x = torch.ones(4, 8)
    with proj.Traffic() as traffic:
        (x * 2).sum()
    assert traffic.ops == 2
    assert traffic.bytes == (32 + 32) * 4 + (32 + 1) * 4  # mul reads 32 floats, writes 32; sum reads 32, writes 1
    meta = {"rn50_flops": 8e9, "jpeg_decode_s": 0.001}
    row = {"forwards": 8, "flops": 1e9, "bytes_per_image": 1e6, "batch": 100, "ops_per_batch": 1000,
           "per_image_cpu_s": 0.002}
    p = proj.project(meta, row, {"step_scale": 1.0, "bandwidth": 2e12})
    assert p["need"] == pytest.approx(proj.RN50_A100_IMAGES_PER_S * 3 * 8e9 / 8e9)
    assert p["batched"] == pytest.approx(100 / (1e8 / 1e12 + 1000 * proj.LAUNCH_SECONDS))
    assert p["workers"] == pytest.approx(8 / 0.002) and p["workers_decoding"] == pytest.approx(8 / 0.003)
