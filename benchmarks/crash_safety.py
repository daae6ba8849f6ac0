"""Crash safety: `kill -9` medvae train, generate and embed at random moments, then check the disk.

For each kill: start the real command (`python -m medvae ...`), SIGKILL its whole process group after
a random delay drawn from [0.5 s, the command's uninterrupted duration], then check:

- generate: --out is absent, or complete (generation.json lists every sample and each file reads);
  the folder of an earlier finished generate run is byte-identical.
- embed: the table is absent, or every row reads back with a full vector (the rows of the table
  the user had before the run are all still there); a rerun completes it.
- train: every checkpoint folder under its final name passes verify_checkpoint; the export is absent
  or loads; `train.resume=auto` then finishes the run (step == max_steps) with a loadable export.
- always: the user's own files beside the outputs are byte-identical.

Leftover temporary folders (``.name.tmp-*``, which a SIGKILL cannot clean up and no reader ever
opens) are counted, not treated as outputs.

    python benchmarks/crash_safety.py                          # 7 train, 7 generate, 7 embed kills
    python benchmarks/crash_safety.py --kills 4 --json benchmarks/out/crash_safety.json

Real anatomy: the training volumes are crops of nibabel's real T1 (anatomical.nii) and the demo's
MNI template when nilearn is installed; the model is trained by the benchmark itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.channels=[8,16]", "model.norm_num_groups=4", "model.latent_channels=2", "data.patch_size=[16,16,16]",
        "data.batch_size=2", "data.val_fraction=0.25", "train.warmup_steps=2", "train.val_every=0",
        "train.checkpoint_every=2", "train.keep_checkpoints=2", "tracking.log_every=1",
        "tracking.wandb_mode=offline", "data.spacing=[3,3,3]"]
TRAIN_STEPS = 8


def _env() -> dict:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    env.pop("MEDVAE_DEBUG", None)
    return env


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "medvae", *map(str, args)]


def _run(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(_command(args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _run_and_kill(args: list[str], cwd: Path, delay: float) -> bool:
    """Start the command, SIGKILL its process group after ``delay`` s; True if it was still running."""
    process = subprocess.Popen(_command(args), cwd=cwd, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True


def _kill_at_random(args: list[str], cwd: Path, rng: random.Random, duration: float, prepare) -> tuple[bool, float]:
    """Kill at a random moment of the command's run: a delay drawn from [0.5 s, 0.95 x duration];
    if the command finished first (timings vary on a shared machine), ``prepare()`` resets the
    inputs and the draw is repeated from a shorter window, at most 4 times."""
    window = duration
    for _ in range(4):
        prepare()
        delay = rng.uniform(0.5, max(0.6, 0.95 * window))
        if _run_and_kill(args, cwd, delay):
            return True, delay
        window *= 0.6
    return False, delay


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftover_temporaries(folder: Path) -> int:
    return sum(1 for p in folder.rglob(".*") if ".tmp" in p.name)


def _make_data(work: Path) -> Path:
    import importlib.resources

    import nibabel as nib
    import numpy as np

    data = work / "data"
    data.mkdir()
    anatomical = nib.load(str(importlib.resources.files("nibabel") / "tests" / "data" / "anatomical.nii"))
    array = np.asarray(anatomical.get_fdata(), dtype=np.float32)
    for i, (a, b, c) in enumerate([(0, 0, 0), (8, 10, 0), (16, 20, 5), (4, 15, 8), (12, 5, 3), (2, 22, 6)]):
        crop = array[a:a + 17, b:b + 19, c:c + 17]
        nib.save(nib.Nifti1Image(crop, anatomical.affine), data / f"t1_{i:02d}.nii.gz")
    return data


def _check_generate(out: Path, num: int) -> str:
    import nibabel as nib

    if not out.exists():
        return "absent"
    record = json.loads((out / "generation.json").read_text())
    assert len(record["samples"]) == num
    for sample in record["samples"]:
        nib.load(out / sample["file"]).get_fdata()
    return "complete"


def _check_table(table: Path, before_ids: set[str], width: int) -> str:
    sys.path.insert(0, str(ROOT))
    from medvae.jobs.embedding_table import read_table

    if not table.exists():
        return "absent"
    rows = read_table(table)
    ids = {r["id"] for r in rows}
    assert before_ids <= ids, "rows the user had are gone"
    assert all(len(r["embedding"]) == width for r in rows)
    return "complete" if len(rows) else "empty"


def _check_run(run: Path) -> tuple[str, int]:
    from medvae.export import load_model
    from medvae.train.checkpoint import list_checkpoints, verify_checkpoint

    checkpoints = list_checkpoints(run)
    for checkpoint in checkpoints:
        verify_checkpoint(checkpoint)
    if (run / "export").exists():
        load_model(run / "export")
        return "export complete", len(checkpoints)
    return "no export yet", len(checkpoints)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=7, help="kills per command (train, generate, embed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a cut run still shows what it found
    rng = random.Random(args.seed)
    sys.path.insert(0, str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="medvae-crash-"))
    data = _make_data(work)
    user_file = work / "user_notes.txt"
    user_file.write_text("the user's own file: must survive every kill\n")
    results: dict[str, dict] = {}

    # A finished run gives the model; its duration sets the kill window of training.
    started = time.perf_counter()
    base = _run(["train", *TINY, f"data.train={data}", f"train.output_dir={work / 'model_run'}",
                 f"train.max_steps={TRAIN_STEPS}"], work)
    assert base.returncode == 0, base.stderr[-2000:]
    train_seconds = time.perf_counter() - started
    model = work / "model_run"

    def timed(command: list[str]) -> float:
        t0 = time.perf_counter()
        result = _run(command, work)
        assert result.returncode == 0, result.stderr[-2000:]
        return time.perf_counter() - t0

    earlier = work / "earlier_generate"
    generate_seconds = timed(["generate", "--model", model, "--num", "3", "--out", earlier, "--prior", "standard"])
    earlier_digest = _digest(earlier)
    inputs = sorted(str(p) for p in data.glob("*.nii.gz"))
    old_table = work / "old.npz"
    embed_seconds = timed(["embed", "--model", model, "--out", old_table, inputs[0], inputs[1]])
    from medvae.jobs.embedding_table import read_table

    old_ids = {r["id"] for r in read_table(old_table)}
    width = len(read_table(old_table)[0]["embedding"])
    user_digest = user_file.read_bytes()

    # generate
    outcome = {"kills": 0, "finished_before_kill": 0, "absent": 0, "complete": 0, "broken": 0, "leftover_temporaries": 0}
    for i in range(args.kills):
        out = work / f"gen_{i}"
        killed, _ = _kill_at_random(["generate", "--model", model, "--num", "4", "--out", out, "--prior", "standard"],
                                    work, rng, generate_seconds, lambda out=out: shutil.rmtree(out, ignore_errors=True))
        outcome["kills" if killed else "finished_before_kill"] += 1
        try:
            outcome[_check_generate(out, 4)] += 1
        except Exception as err:  # noqa: BLE001 - any failure to read is a broken output
            outcome["broken"] += 1
            print(f"generate kill {i}: broken output {out}: {err}")
    outcome["leftover_temporaries"] = _leftover_temporaries(work)
    outcome["earlier_output_intact"] = _digest(earlier) == earlier_digest
    results["generate"] = outcome

    # embed: resumable; kill, check, then the rerun completes the table
    outcome = {"kills": 0, "finished_before_kill": 0, "absent": 0, "complete": 0, "empty": 0, "broken": 0,
               "rerun_completed": 0}
    for i in range(args.kills):
        table = work / f"emb_{i}.npz"
        killed, _ = _kill_at_random(  # the user's table, with 2 rows, is extended in place
            ["embed", "--model", model, "--out", table, *inputs], work, rng, embed_seconds * 2,
            lambda table=table: table.write_bytes(old_table.read_bytes()))
        outcome["kills" if killed else "finished_before_kill"] += 1
        try:
            outcome[_check_table(table, old_ids, width)] += 1
        except Exception as err:  # noqa: BLE001
            outcome["broken"] += 1
            print(f"embed kill {i}: broken table {table}: {err}")
            continue
        rerun = _run(["embed", "--model", model, "--out", table, *inputs], work)
        if rerun.returncode == 0 and len(read_table(table)) == len(inputs):
            outcome["rerun_completed"] += 1
        else:
            print(f"embed kill {i}: rerun failed: {rerun.stderr[-500:]}")
    results["embed"] = outcome

    # train: kill, check, resume=auto to the end
    outcome = {"kills": 0, "finished_before_kill": 0, "checkpoints_verified": 0, "broken": 0,
               "resumed_to_the_end": 0, "export_complete_at_kill": 0}
    for i in range(args.kills):
        run = work / f"run_{i}"
        common = ["train", *TINY, f"data.train={data}", f"train.output_dir={run}", f"train.max_steps={TRAIN_STEPS}"]
        killed, _ = _kill_at_random(common, work, rng, train_seconds, lambda run=run: shutil.rmtree(run, ignore_errors=True))
        outcome["kills" if killed else "finished_before_kill"] += 1
        try:
            state, count = _check_run(run)
            outcome["checkpoints_verified"] += count
            outcome["export_complete_at_kill"] += state == "export complete"
        except Exception as err:  # noqa: BLE001
            outcome["broken"] += 1
            print(f"train kill {i}: broken run folder {run}: {err}")
            continue
        resumed = _run([*common, "train.resume=auto"], work)
        summary = run / "summary.json"
        if resumed.returncode == 0 and json.loads(summary.read_text())["step"] == TRAIN_STEPS:
            _check_run(run)
            outcome["resumed_to_the_end"] += 1
        else:
            print(f"train kill {i}: resume failed: {resumed.stderr[-800:]}")
    results["train"] = outcome
    results["user_file_intact"] = user_file.read_bytes() == user_digest
    results["durations_s"] = {"train": round(train_seconds, 1), "generate": round(generate_seconds, 1),
                              "embed": round(embed_seconds, 1)}

    print(f"{'command':10s} " + " ".join(f"{k:>22s}" for k in ("kills", "finished_before_kill")) + "  outcome")
    for command in ("train", "generate", "embed"):
        o = results[command]
        rest = {k: v for k, v in o.items() if k not in ("kills", "finished_before_kill")}
        print(f"{command:10s} {o['kills']:>22d} {o['finished_before_kill']:>22d}  {rest}")
    print(f"user file intact: {results['user_file_intact']}; work folder {work}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
