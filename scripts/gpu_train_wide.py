"""Train the `wide` preset on one GPU within a wall-clock budget, and pack it for the trip back.

    python3 scripts/gpu_train_wide.py --out $OUT --budget-s 300 --git-commit SHA

The recipe behind the `wide-gpu` checkpoint, written for a lent GPU machine whose session is
short (minutes) and whose files come back only as a few files of at most 16 MiB:

1. time the real training step (`benchmarks/bench_gpu.py`) of `wide` for each batch size and
   dtype in `--batches` x `--dtypes`, eagerly and captured in a CUDA graph (`sparse-lens train
   --cuda-graph`, `training.graphed`; unless `--no-cuda-graph`), and take the candidate with most
   tokens/s among those that fit at least `--min-steps` steps into the budget;
2. steps = `--budget-s` / that step time (rounded down to a multiple of 100): the run ends on
   its schedule (the L0 anneal and the LR decay complete) rather than being cut off; a run
   that fails in bf16 or as a graph is retried eagerly in float32;
3. `sparse-lens train --preset wide --device cuda ...`, keeping snapshots every steps/8;
4. pack the finished model and the snapshots taken at or after the end of the L0 anneal (each
   about 2.5 MB in `sparse_lens.pretrained`'s format; earlier ones are nearly dense) into
   `OUT/wide-gpu.tar` (split into 15 MiB parts if larger);
5. train the dense baseline (same shape, batch, dtype and schedule) until its validation loss
   reaches the sparse model's, for the circuit-size comparison; `OUT/wide-gpu-dense.tar.part*`;
6. with time left (`--final-bench`), `bench_gpu.py` on the `small` and `paper` presets.

Measured on one H200 (results/gpu/summary.md): it chose bf16, batch 256, 2,100 steps (68.8M
tokens in 270 s), and that model came out worse than the shipped `wide` (20,000 CPU steps of 8 x
128 tokens): validation 3.4552 against 3.1358. The small models' GPU steps are launch-bound (64 ms
at batch 64, 107 ms at 256: 4x the batch for 1.7x the time), so a 15-minute lease fits a few
thousand steps; a better model needs
more steps (longer leases, or a step captured in CUDA graphs), not bigger batches.

Everything prints to stdout and `OUT/driver.log`; each stage has its own time limit, so a failure
or an overrun in one stage still brings back what the earlier ones made. Runs on CPU too, for a
check of the whole flow: `--device cpu --preset tiny --batches 4 --dtypes float32 --budget-s 20`.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PART_BYTES = 15 * 2**20


class Driver:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "driver.log", "a")

    def left(self) -> float:
        """Seconds left of `--deadline-s`."""
        return self.args.deadline_s - (time.monotonic() - self.t0)

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def run(self, argv: list[str], limit_s: float) -> int:
        """Run `argv`, its output into the log; SIGINT after `limit_s` (training then saves a
        checkpoint and stops), SIGKILL 60 s later. Returns the exit code."""
        self.log(f"$ {shlex.join(argv)}   (limit {limit_s:.0f} s)")
        proc = subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            return proc.wait(timeout=max(limit_s, 1))
        except subprocess.TimeoutExpired:
            self.log("time limit: SIGINT")
            proc.send_signal(signal.SIGINT)
            try:
                return proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()


def probe_steps(driver: Driver) -> list[tuple[int, str, bool, float]]:
    """(batch size, dtype, CUDA graph, seconds per step) for each candidate, timed with
    bench_gpu's eager step and, with `--cuda-graph`, its captured step (a capture that fails is
    logged and left out)."""
    a = driver.args
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    probes = []
    for dtype in a.dtypes:
        for batch in a.batches:
            median = bench_gpu.bench(a.preset, dtype, batch, steps=a.probe_steps, warmup=3,
                                     device=a.device)
            seconds = sum(median.values())
            driver.log(f"probe {a.preset} {dtype} batch {batch}: {seconds * 1e3:.1f} ms/step, "
                       f"{batch / seconds:,.1f} sequences/s")
            probes.append((batch, dtype, False, seconds))
            if not (a.cuda_graph and a.device == "cuda"):
                continue
            try:
                graphed = bench_gpu.bench_graphed(a.preset, dtype, batch, a.probe_steps, seconds)
            except Exception as err:  # noqa: BLE001  (any failure to capture: train eagerly)
                driver.log(f"probe {a.preset} {dtype} batch {batch} as a CUDA graph failed: {err!r}")
                continue
            driver.log(f"probe {a.preset} {dtype} batch {batch} as a CUDA graph: "
                       f"{graphed * 1e3:.1f} ms/step, {batch / graphed:,.1f} sequences/s")
            probes.append((batch, dtype, True, graphed))
    return probes


def choose(probes: list[tuple[int, str, bool, float]], budget_s: float,
           min_steps: int) -> tuple[int, str, bool, int]:
    """(batch, dtype, graph, steps): most sequences/s among the candidates whose steps within the
    budget (10% kept for evaluation and checkpoints; a multiple of 100) are at least
    `min_steps`; if none, the most steps."""
    options = [(batch, dtype, graph, int(budget_s / (seconds * 1.1)) // 100 * 100)
               for batch, dtype, graph, seconds in probes]
    enough = [o for o in options if o[3] >= min_steps]
    if enough:
        return max(enough, key=lambda o: o[0] * o[3])
    batch, dtype, graph, steps = max(options, key=lambda o: o[3])
    return batch, dtype, graph, max(steps, 100)


def train_argv(a: argparse.Namespace, out: Path, batch: int, dtype: str, steps: int,
               *extra: str) -> list[str]:
    return [sys.executable, "-m", "sparse_lens", "train", "--preset", a.preset, "--device", a.device,
            "--dtype", dtype, "--batch-size", str(batch), "--steps", str(steps), "--out", str(out),
            "--no-progress", "--overwrite", *extra]


def sparse_argv(a: argparse.Namespace, out: Path, batch: int, dtype: str, steps: int,
                graph: bool = False) -> list[str]:
    """The sparse run: evaluated 40 times, a checkpoint every quarter, a snapshot every eighth."""
    return train_argv(a, out, batch, dtype, steps, *(["--cuda-graph"] if graph else []),
                      "--eval-every", str(max(steps // 40, 1)),
                      "--checkpoint-every", str(max(steps // 4, 1)),
                      "--snapshot-every", str(max(steps // 8, 1)))


def final_val_loss(run_dir: Path) -> float | None:
    state = json.loads((run_dir / "training" / "state.json").read_text())
    losses = [h["val_loss"] for h in state["history"] if "val_loss" in h]
    return losses[-1] if losses else None


def pack_snapshots(run_dir: Path, dest: Path, first_step: int) -> list[int]:
    """Snapshots of `run_dir` at step >= first_step, packed (config + compact weights) under dest."""
    from sparse_lens import checkpoint, shipped

    kept = []
    for snap in sorted((run_dir / "snapshots").glob("step-*")):
        step = int(snap.name.removeprefix("step-"))
        if step < first_step:
            continue
        target = dest / snap.name
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text((snap / checkpoint.CONFIG_FILE).read_text())
        shipped.save_packed(checkpoint.load_tensors(snap / checkpoint.WEIGHTS_FILE),
                            target / "weights.safetensors")
        kept.append(step)
    return kept


def ship(driver: Driver, name: str, base: Path, members: list[str]) -> None:
    """tar `members` (relative to `base`) into OUT/name, split into parts of at most 15 MiB."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for m in members:
            if (base / m).exists():
                tar.add(base / m, arcname=m)
    data = buffer.getvalue()
    if len(data) <= PART_BYTES:
        (driver.out / name).write_bytes(data)
    else:
        for i in range(0, len(data), PART_BYTES):
            (driver.out / f"{name}.part{i // PART_BYTES:02d}").write_bytes(data[i:i + PART_BYTES])
    driver.log(f"shipped {name}: {len(data) / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where the files to bring back go ($OUT)")
    p.add_argument("--budget-s", type=float, default=300, help="seconds for the sparse training's steps")
    p.add_argument("--deadline-s", type=float, default=540, help="seconds for the whole script")
    p.add_argument("--git-commit", required=True, help="the commit this tree is (recorded in provenance)")
    p.add_argument("--preset", default="wide")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "float32"])
    p.add_argument("--probe-steps", type=int, default=8)
    p.add_argument("--min-steps", type=int, default=8000,
                   help="fewest steps a candidate must fit (2,100 large steps lost to 20,000 small ones)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="probe and train the eager step only")
    p.add_argument("--runs", default="/tmp/runs")
    p.add_argument("--final-bench", action="store_true",
                   help="finish with bench_gpu.py --presets small paper, time allowing")
    a = p.parse_args(argv)
    from sparse_lens.training import TrainConfig

    d = Driver(a)
    runs = Path(a.runs)
    name = f"{a.preset}-gpu"

    probes = probe_steps(d)
    batch, dtype, graph, steps = choose(probes, a.budget_s, a.min_steps)
    d.log(f"chose {dtype}, batch {batch} x n_ctx, {'a CUDA graph, ' if graph else ''}{steps} steps")
    sparse_dir = runs / name
    command = sparse_argv(a, sparse_dir, batch, dtype, steps, graph)
    rc = d.run(command, d.left() - 120)
    d.log(f"sparse training exit code {rc}")
    if rc != 0 and (graph or dtype != "float32") and d.left() > 240:  # bf16 NaN, a failed graph
        eager_fp32 = [pr for pr in probes if pr[1] == "float32" and not pr[2]]
        batch, dtype, graph, steps = choose(eager_fp32 or probes, d.left() - 200, a.min_steps)
        d.log(f"retrying eagerly in {dtype}, batch {batch}, {steps} steps")
        command = sparse_argv(a, sparse_dir, batch, dtype, steps, graph)
        rc = d.run(command, d.left() - 120)
        d.log(f"sparse training exit code {rc}")
    pack_root = runs / "pack"
    pack_root.mkdir(parents=True, exist_ok=True)
    shown = [sys.executable.rsplit("/", 1)[-1], *command[1:]]
    shown[shown.index("--out") + 1] = f"runs/{name}"
    members = []
    if rc == 0:
        rc_pack = d.run([sys.executable, "-m", "sparse_lens.pretrained", str(sparse_dir), name,
                         "--root", str(pack_root), "--git-commit", a.git_commit,
                         "--command", shlex.join(shown).replace(" --overwrite", "")], 120)
        if rc_pack == 0:
            members.append(name)
    first = int(steps * TrainConfig().anneal_end_frac)  # where the L0 anneal ends
    kept = pack_snapshots(sparse_dir, pack_root / "snapshots", first) if sparse_dir.exists() else []
    d.log(f"snapshots packed: {kept}")
    members += ["snapshots", "state.json"]
    if (sparse_dir / "training" / "state.json").exists():
        (pack_root / "state.json").write_text((sparse_dir / "training" / "state.json").read_text())
    ship(d, f"{name}.tar", pack_root, members)

    target = final_val_loss(sparse_dir) if rc == 0 else None
    if target is not None and d.left() > 90:
        dense_dir = runs / f"{name}-dense"
        rc = d.run(train_argv(a, dense_dir, batch, dtype, steps, *(["--cuda-graph"] if graph else []),
                              "--dense", "--stop-at-val-loss", f"{target}",
                              "--eval-every", "20", "--checkpoint-every", str(steps)), d.left() - 60)
        d.log(f"dense training exit code {rc}; validation loss {final_val_loss(dense_dir)} "
              f"(target {target:.4f})")
        ship(d, f"{name}-dense.tar", dense_dir,
             ["config.json", "model.safetensors", "tokenizer", "training/state.json"])
    if a.final_bench and d.left() > 60:
        d.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--presets", "small", "paper",
               "--steps", "5"], d.left() - 10)
    d.log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
