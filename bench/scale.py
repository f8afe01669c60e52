#!/usr/bin/env python
"""Benchmark: does data preparation and pretraining start-up scale to Wikipedia-sized data on one machine?

1. `prepare_dataset.py --max_seq_length 128` on deterministic English corpora of --megabytes (default 4, 40 and
   200 MB: CPython's pydoc paragraphs shuffled with a fixed seed, 8 paragraphs per document, documents separated by
   blank lines), and on --workers_megabytes with each of --num_workers: wall time, time per MB, and the peak
   anonymous memory (RssAnon: what the run itself allocates, not the files it maps) and file-backed memory
   (RssFile) of the process and its children, summed at each 50 ms sample. The global datasets cache
   (HF_DATASETS_CACHE, HF_HOME) points at an empty folder, whose file count after the runs is reported.
2. `run_pretraining.py` (a tiny BERT, one step) on a save_to_disk dataset of --rows_small and --rows_large rows
   of 128 tokens: the time until the first step's loss is logged, and the peak anonymous memory. The large
   dataset is the small one's data file hard-linked --rows_large / --rows_small times as that many shards of one
   dataset, so 10^7 rows need no more disk than 10^5; datasets maps each shard on its own, as for any dataset.

    python bench/scale.py [--megabytes 4 40 200] [--workers_megabytes 40] [--num_workers 1 2]
                          [--rows_small 100000] [--rows_large 10000000] [--keep FOLDER]

Prints one markdown table per part (the rows bench/RESULTS.md records) and the machine's load average around
each run, since a shared machine's other work shows in wall times and not in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ipu_trainer.cli.offline_assets import english_text_documents, train_wordpiece_tokenizer  # noqa: E402

TINY_BERT = ("vocab_size=2000,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
             "max_position_embeddings=128")
ONE_CPU = "layers_per_ipu=[-1],ipus_per_replica=1,replication_factor=1,gradient_accumulation_steps=1"


# ---- corpus ------------------------------------------------------------------------------------------------------


def write_corpus(path: str, megabytes: float, seed: int = 0) -> float:
    """pydoc paragraphs, shuffled with `seed` and repeated, 8 per document, until the file holds `megabytes` MB.
    Written as it is made, so the bench's own memory does not grow with it. Returns the size in MB."""
    paragraphs = english_text_documents()
    rng = random.Random(seed)
    size = 0
    with open(path, "w", encoding="utf-8") as handle:
        while size < megabytes * 1e6:
            rng.shuffle(paragraphs)
            for start in range(0, len(paragraphs), 8):
                document = "\n".join(paragraphs[start : start + 8]) + "\n\n"
                handle.write(document)
                size += len(document.encode())
                if size >= megabytes * 1e6:
                    break
    return size / 1e6


# ---- measuring a process tree ------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc/<pid>/task/<tid>/children."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    pending.extend(int(child) for child in handle.read().split())
        except OSError:  # ended while being read
            pass
    return found


def tree_memory_kb(pid: int) -> dict[str, int]:
    """RssAnon and RssFile (kB) summed over the process tree of `pid`, and Pss_Anon: forked workers share their
    parent's pages until they write them, and RssAnon counts a shared page in every process, Pss_Anon splits it."""
    total = {"RssAnon": 0, "RssFile": 0, "Pss_Anon": 0}
    for member in process_tree(pid):
        for source in ("status", "smaps_rollup"):
            try:
                with open(f"/proc/{member}/{source}") as handle:
                    for line in handle:
                        key, _, value = line.partition(":")
                        if key in total:
                            total[key] += int(value.split()[0])
            except OSError:  # ended while being read
                pass
    return total


def run_measured(command: list[str], env: dict[str, str], marker: str | None = None) -> dict:
    """Run `command`, sampling its tree's memory every 50 ms. Returns wall seconds, peak RssAnon / RssFile (MB),
    the seconds until a line of its output first contained `marker` (None if never), the exit code and the output's
    last lines."""
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines: list[str] = []
    seen: list[float] = []

    def read() -> None:
        for line in process.stdout:
            lines.append(line.rstrip())
            if marker is not None and not seen and marker in line:
                seen.append(time.perf_counter() - started)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak = {"RssAnon": 0, "RssFile": 0, "Pss_Anon": 0}
    while process.poll() is None:
        for key, value in tree_memory_kb(process.pid).items():
            peak[key] = max(peak[key], value)
        time.sleep(0.05)
    wall = time.perf_counter() - started
    reader.join(timeout=5)
    # CPU seconds of the child and every descendant it waited for: what other load on a shared machine leaves alone.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (children.ru_utime - children_before.ru_utime) + (children.ru_stime - children_before.ru_stime)
    return {"wall": wall, "anon_mb": peak["RssAnon"] / 1024, "file_mb": peak["RssFile"] / 1024,
            "pss_anon_mb": peak["Pss_Anon"] / 1024, "cpu": cpu,
            "marker_s": seen[0] if seen else None, "returncode": process.returncode, "tail": lines[-20:],
            "load": (load_before, os.getloadavg()[0])}


def files_under(folder: str) -> int:
    return sum(len(names) for _, _, names in os.walk(folder))


# ---- part 1: prepare_dataset.py ----------------------------------------------------------------------------------


def bench_prepare(workdir: str, tokenizer: str, runs: list[tuple[float, int | None]], env: dict[str, str]) -> list[dict]:
    results = []
    for megabytes, workers in runs:
        corpus = os.path.join(workdir, f"corpus-{megabytes:g}MB.txt")
        if not os.path.exists(corpus):
            write_corpus(corpus, megabytes)
        output = os.path.join(workdir, f"prepared-{megabytes:g}MB")
        shutil.rmtree(output, ignore_errors=True)
        command = [sys.executable, os.path.join(REPO, "prepare_dataset.py"), "--tokenizer_name", tokenizer,
                   "--train_file", corpus, "--max_seq_length", "128", "--output_dir", output]
        if workers is not None:
            command += ["--num_workers", str(workers)]
        measured = run_measured(command, env)
        if measured["returncode"] != 0:
            raise RuntimeError("prepare_dataset.py failed:\n" + "\n".join(measured["tail"]))
        with open(os.path.join(output, "prepare_dataset.json")) as handle:
            summary = json.load(handle)
        size = os.path.getsize(corpus) / 1e6
        measured.update(megabytes=size, workers=workers or 1, pairs=summary["splits"]["train"]["pairs"],
                        output_mb=sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(output)
                                      for name in names) / 1e6,
                        shards=len([n for n in os.listdir(os.path.join(output, "train")) if n.startswith("data-")]))
        results.append(measured)
        print(f"prepare {size:.1f} MB, {measured['workers']} worker(s): {measured['wall']:.1f} s "
              f"({measured['cpu']:.1f} CPU s), "
              f"RssAnon {measured['anon_mb']:.0f} MB, RssFile {measured['file_mb']:.0f} MB", flush=True)
        shutil.rmtree(output, ignore_errors=True)
    return results


# ---- part 2: run_pretraining.py's time to the first step ----------------------------------------------------------


def synthetic_rows(folder: str, rows: int, seq_len: int = 128, seed: int = 0) -> None:
    """`rows` random sentence pairs in prepare_dataset.py's columns, saved as one shard."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, seq_len + 1, size=rows).astype(np.int32)
    mask = (np.arange(seq_len) < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(5, 2000, size=(rows, seq_len)), 0).astype(np.int32)
    ids[:, 0] = 2  # [CLS] of the offline WordPiece vocabulary
    ids[np.arange(rows), lengths - 1] = 3  # [SEP]
    labels = np.full((rows, seq_len), -100, dtype=np.int32)
    table = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids), "labels": labels,
             "next_sentence_label": rng.integers(0, 2, size=rows), "length": lengths}
    datasets.Dataset.from_dict(table).save_to_disk(folder, num_shards=1)


def linked_copies(source: str, folder: str, copies: int) -> None:
    """A save_to_disk folder whose `copies` shards are hard links to `source`'s one data file."""
    os.makedirs(folder)
    with open(os.path.join(source, "state.json")) as handle:
        state = json.load(handle)
    (data_file,) = [entry["filename"] for entry in state["_data_files"]]
    names = [f"data-{index:05d}-of-{copies:05d}.arrow" for index in range(copies)]
    for name in names:
        os.link(os.path.join(source, data_file), os.path.join(folder, name))
    state["_data_files"] = [{"filename": name} for name in names]
    with open(os.path.join(folder, "state.json"), "w") as handle:
        json.dump(state, handle)
    shutil.copy(os.path.join(source, "dataset_info.json"), folder)


def bench_first_step(workdir: str, tokenizer: str, rows_small: int, rows_large: int, env: dict[str, str],
                     packing: bool) -> list[dict]:
    small = os.path.join(workdir, f"rows-{rows_small}")
    large = os.path.join(workdir, f"rows-{rows_large}")
    if not os.path.isdir(small):
        synthetic_rows(small, rows_small)
    if not os.path.isdir(large):
        linked_copies(small, large, rows_large // rows_small)
    results = []
    for rows, folder in ((rows_small, small), (rows_large, large)):
        for packed in (False, True) if packing else (False,):
            output = os.path.join(workdir, "pretraining-output")
            command = [sys.executable, os.path.join(REPO, "run_pretraining.py"), "--model_type", "bert",
                       "--config_overrides", TINY_BERT, "--tokenizer_name", tokenizer, "--dataset_path", folder,
                       "--is_already_preprocessed", "--ipu_config_name", REPO, "--ipu_config_overrides", ONE_CPU,
                       "--per_device_train_batch_size", "8", "--do_train", "--max_steps", "1", "--logging_steps", "1",
                       "--save_strategy", "no", "--output_dir", output, "--overwrite_output_dir", "--report_to", "none",
                       "--disable_tqdm", "true", "--fp32", *(["--packing"] if packed else [])]
            measured = run_measured(command, env, marker="'loss'")
            if measured["returncode"] != 0 or measured["marker_s"] is None:
                raise RuntimeError("run_pretraining.py failed:\n" + "\n".join(measured["tail"]))
            measured.update(rows=rows, packing=packed)
            results.append(measured)
            print(f"run_pretraining {rows:.0e} rows{' --packing' if packed else ''}: first step after "
                  f"{measured['marker_s']:.1f} s, RssAnon {measured['anon_mb']:.0f} MB", flush=True)
            shutil.rmtree(output, ignore_errors=True)
    return results


# ---- main --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, nargs="*", default=[4, 40, 200], help="corpus sizes")
    parser.add_argument("--workers_megabytes", type=float, default=40, help="corpus size of the --num_workers runs")
    parser.add_argument("--num_workers", type=int, nargs="*", default=[2],
                        help="prepare_dataset.py --num_workers values run at --workers_megabytes (besides the default)")
    parser.add_argument("--rows_small", type=int, default=100_000)
    parser.add_argument("--rows_large", type=int, default=10_000_000)
    parser.add_argument("--no_packing", action="store_true", help="leave out the --packing start-up runs")
    parser.add_argument("--keep", help="work in this folder and keep it (corpora, datasets) for the next run")
    args = parser.parse_args(argv)

    workdir = args.keep or tempfile.mkdtemp(prefix="bench-scale-")
    os.makedirs(workdir, exist_ok=True)
    try:
        global_cache = os.path.join(workdir, "global-hf-home")
        shutil.rmtree(global_cache, ignore_errors=True)
        env = dict(os.environ, PYTHONPATH=REPO, HF_HOME=global_cache,
                   HF_DATASETS_CACHE=os.path.join(global_cache, "datasets"), HF_HUB_OFFLINE="1")
        tokenizer = os.path.join(workdir, "tokenizer")
        if not os.path.isdir(tokenizer):
            train_wordpiece_tokenizer(english_text_documents(), tokenizer)

        runs = [(megabytes, None) for megabytes in args.megabytes]
        runs += [(args.workers_megabytes, workers) for workers in args.num_workers]
        prepared = bench_prepare(workdir, tokenizer, runs, env)
        cached = files_under(global_cache)
        first_steps = bench_first_step(workdir, tokenizer, args.rows_small, args.rows_large, env,
                                       packing=not args.no_packing) if args.rows_large else []
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nmachine: {os.cpu_count()} CPUs; files left in the global datasets cache: {cached}\n")
    print("| corpus | --num_workers | pairs | output (shards) | wall | s per MB | CPU s per MB | peak RssAnon | "
          "peak Pss_Anon | peak RssFile | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in prepared:
        print(f"| {run['megabytes']:.4g} MB | {run['workers']} | {run['pairs']:,} | {run['output_mb']:.0f} MB "
              f"({run['shards']}) | {run['wall']:.1f} s | {run['wall'] / run['megabytes']:.2f} | "
              f"{run['cpu'] / run['megabytes']:.2f} | "
              f"{run['anon_mb']:.0f} MB | {run['pss_anon_mb']:.0f} MB | {run['file_mb']:.0f} MB | "
              f"{run['load'][0]:.1f} -> {run['load'][1]:.1f} |")
    if first_steps:
        print("\n| rows | --packing | time to first step | whole run | peak RssAnon | load avg |")
        print("| --- | --- | --- | --- | --- | --- |")
        for run in first_steps:
            print(f"| {run['rows']:.0e} | {'yes' if run['packing'] else 'no'} | {run['marker_s']:.1f} s | "
                  f"{run['wall']:.1f} s | {run['anon_mb']:.0f} MB | {run['load'][0]:.1f} -> {run['load'][1]:.1f} |")
    return {"prepare": prepared, "first_step": first_steps, "global_cache_files": cached}


if __name__ == "__main__":
    main()
