"""Every GPU measurement of rlhfkit in one call, one table: run by `benchmarks/gpu_suite.sh`.

    bash benchmarks/gpu_suite.sh                   # on a lent NVIDIA machine: the full shapes, <= 8 minutes
    bash benchmarks/gpu_suite.sh --dry-run         # anywhere: tiny random model on the CPU, same code paths

Parts (each a subprocess with its own time limit, so one that hangs or fails costs only its slot):

1. DPO (`dpo_vs_trl.py --defaults`): rlhfkit dpo doing TRL's work (live reference, padded pairs) beside
   TRL's DPOTrainer with the same settings, and each trainer with its own defaults (rlhfkit: precomputed
   reference, the prompt computed once; TRL: gradient checkpointing): pairs/s and peak memory.
   GPU shape: random-init Qwen2.5-0.5B, bf16, 8 pairs x 512 tokens.
2. Online RL (`ppo_step.py`): one rlhfkit ppo (GAE) and rloo step split into generate / score /
   reference+values / train, beside TRL's RLOOTrainer; the rollout engine's new tokens/s beside
   `model.generate` on the same batch. GPU shape: 16 prompts x 4 samples (64 sequences), 128-word
   prompts, 256 new tokens forced.
3. Anchors (`--anchors DIR`, default `../shared/bench` or `shared/bench` when present, GPU only): the
   scripts that measured TRL, the plain train step and the static-cache decode probe on the H100, run
   here again so their numbers come from the same machine as ours.

TRL runs only where it is importable (carry its wheels to the device machine: see the README of the
device tool); without it the TRL columns say "not installed". The table goes to stdout, and with
`--out DIR` (default `$OUT` when set) also `gpu_suite.json` with every number and `gpu_suite.log` with
each part's full output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SHAPES = {
    "gpu": {"model": "qwen2.5-0.5b-random",
            "dpo": ["--pairs", "8", "--max-length", "512", "--steps", "12", "--warmup", "3"],
            "ppo": ["--prompts", "16", "--samples", "4", "--prompt-words", "128", "--new-tokens", "256",
                    "--steps", "3", "--warmup", "1"]},
    "dry": {"model": "tiny-random",
            "dpo": ["--pairs", "2", "--max-length", "64", "--steps", "3", "--warmup", "1"],
            "ppo": ["--prompts", "2", "--samples", "2", "--prompt-words", "8", "--new-tokens", "8",
                    "--steps", "1", "--warmup", "1"]},
}
ANCHORS = ("trl_dpo_anchor.py", "trl_rloo_anchor.py", "gen_static_cache_probe.py")


def have_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def run_part(name: str, cmd: list[str], timeout: float, log: list[str]) -> tuple[dict | None, str]:
    """Run one part; returns (its last JSON line parsed, or None; a status word)."""
    t0 = time.perf_counter()
    print(f"[{name}] {' '.join(cmd[1:])} (limit {timeout:.0f} s)", flush=True)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
        out, status = res.stdout + res.stderr, "ok" if res.returncode == 0 else f"exit {res.returncode}"
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        status = f"timed out after {timeout:.0f} s"
    log.append(f"===== {name}: {status}, {time.perf_counter() - t0:.1f} s\n{out}")
    found = None
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                found = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if status != "ok":
        print(f"[{name}] {status}; last output:\n" + "\n".join(out.splitlines()[-15:]), flush=True)
    return found, status


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def ratio(mine: float, theirs: float | None) -> str:
    """"1.23x" (rlhfkit / reference), or "-" when there is no reference number."""
    return fmt(mine / theirs, ".2f") + "x" if theirs else "-"


def table(dpo: dict | None, ppo: dict | None, trl: str) -> list[tuple[str, str, str, str]]:
    """(measure, rlhfkit, reference, rlhfkit / reference) rows from the parts' JSON; `trl` is "yes",
    "not installed" or "skipped"."""
    rows: list[tuple[str, str, str, str]] = []
    missing = trl if trl != "yes" else "failed"
    if dpo:
        pairs = dpo.get("pairs", 1)
        for label, key, ref_key in (("DPO pairs/s, same work (live reference, padded)", "rlhfkit", "trl"),
                                    ("DPO pairs/s, each trainer's defaults", "rlhfkit (defaults)", "trl (defaults)")):
            ours, ref = dpo.get(key), dpo.get(ref_key)
            if ours:
                mine, theirs = pairs / ours["median_s_per_step"], ref and pairs / ref["median_s_per_step"]
                rows.append((label, fmt(mine, ".2f"), fmt(theirs, ".2f") if ref else missing, ratio(mine, theirs)))
        ours, ref = dpo.get("rlhfkit"), dpo.get("trl")
        if ours:
            rows.append(("DPO peak memory MB, same work", fmt(ours["peak_mb"], ".0f"),
                         fmt(ref["peak_mb"], ".0f") if ref else missing, ratio(ours["peak_mb"], ref and ref["peak_mb"])))
    else:
        rows.append(("DPO", "failed", "-", "-"))
    if ppo:
        r = ppo["results"]
        gen, rloo, gae, trl_r = r.get("model.generate"), r.get("rlhfkit rloo"), r.get("rlhfkit ppo (gae, value head)"), r.get("TRL RLOOTrainer")
        if rloo and gen:
            rows.append(("rollout new tokens/s (engine vs model.generate)", fmt(rloo["new_tokens_per_s"], ".0f"),
                         fmt(gen["new_tokens_per_s"], ".0f"), ratio(rloo["new_tokens_per_s"], gen["new_tokens_per_s"])))
        if rloo:
            rows.append(("RLOO step s (lower is better)", fmt(rloo["step"], ".2f"), fmt(trl_r["step"], ".2f") if trl_r else missing,
                         ratio(rloo["step"], trl_r and trl_r["step"])))
            rows.append(("  split: generate / score / ref+values / train s",
                         " / ".join(fmt(rloo[k], ".2f") for k in ("generate", "score", "reference_and_values", "train")), "", ""))
        if gae:
            rows.append(("PPO (GAE, value head) step s", fmt(gae["step"], ".2f"), "", ""))
        if rloo and rloo.get("peak_mb"):
            rows.append(("RLOO peak memory MB", fmt(rloo["peak_mb"], ".0f"),
                         fmt(trl_r["peak_mb"], ".0f") if trl_r and trl_r.get("peak_mb") else "-", ""))
    else:
        rows.append(("online RL step", "failed", "-", "-"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny random model, tiny shapes (checks the suite itself)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda, or cpu with --dry-run")
    p.add_argument("--skip-trl", action="store_true", help="leave TRL out even when it is installed")
    p.add_argument("--anchors", help="folder with the reference scripts (trl_dpo_anchor.py, ...)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole suite (default 8 minutes)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_suite.json and gpu_suite.log")
    a = p.parse_args()
    device = a.device or ("cpu" if a.dry_run else "cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here: run on a lent GPU machine, or pass --dry-run", file=sys.stderr)
            return 2
    shape = SHAPES["dry" if a.dry_run else "gpu"]
    trl_state = "skipped" if a.skip_trl else "yes" if have_trl() else "not installed"
    trl = trl_state == "yes"
    skip = [] if trl else ["--skip-trl"]
    t_start = time.perf_counter()
    log: list[str] = []
    common = ["--device", device, "--model", shape["model"]]
    # Budget shares: DPO 35%, online RL 45%, anchors what is left.
    dpo, dpo_status = run_part("dpo", [sys.executable, str(HERE / "dpo_vs_trl.py"), *common, *shape["dpo"],
                                       "--defaults", *skip], 0.35 * a.budget, log)
    ppo, ppo_status = run_part("online-rl", [sys.executable, str(HERE / "ppo_step.py"), *common, *shape["ppo"], *skip],
                               0.45 * a.budget, log)
    anchors: dict[str, str] = {}
    folder = next((Path(x) for x in ([a.anchors] if a.anchors else [HERE.parent.parent / "shared" / "bench",
                                                                       HERE.parent / "shared" / "bench"])
                   if x and (Path(x) / ANCHORS[0]).is_file()), None)
    if device == "cuda" and folder is not None:
        for name in ANCHORS:
            left = a.budget - (time.perf_counter() - t_start)
            if left < 30:
                anchors[name] = "no time left"
                continue
            if name.startswith("trl_") and not trl:
                anchors[name] = f"TRL {trl_state}"
                continue
            _, status = run_part(name, [sys.executable, str(folder / name)], left, log)
            anchors[name] = f"{status} (its output is in gpu_suite.log)"
    else:
        anchors = {n: "skipped (" + ("dry run on CPU" if device == "cpu" else "no anchors folder") + ")" for n in ANCHORS}

    rows = table(dpo, ppo, trl_state)
    width = max(len(r[0]) for r in rows)
    print(f"\nrlhfkit GPU suite: {shape['model']} on {device}, TRL: {trl_state}, "
          f"{time.perf_counter() - t_start:.0f} s")
    print(f"| {'measure':<{width}} | rlhfkit | reference (TRL / generate) | ratio |")
    print(f"|{'-' * (width + 2)}|---|---|---|")
    for r in rows:
        print(f"| {r[0]:<{width}} | {r[1]} | {r[2]} | {r[3]} |")
    for name, status in anchors.items():
        print(f"anchor {name}: {status}")
    summary = {"device": device, "model": shape["model"], "trl": trl_state, "dpo": dpo, "online_rl": ppo,
               "status": {"dpo": dpo_status, "online_rl": ppo_status, **anchors},
               "seconds": time.perf_counter() - t_start}
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_suite.json").write_text(json.dumps(summary, indent=1))
        (out / "gpu_suite.log").write_text("\n".join(log))
        print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.log'}")
    return 0 if dpo_status == "ok" and ppo_status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
