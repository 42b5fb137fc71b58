"""Issue 18 at 1B scale: `python -m bench.llama1b [--threads 1,2] [--files q4_k_m,q8_0] [--rounds 3]`.

A Llama-3.2-1B-shaped model (16 layers, d 2048, 32 heads, 8 KV heads, ffn 8192, vocab 128,256, tied
embeddings) with seeded random weights is written as an F16 GGUF (gguf-py's writer, streamed one tensor
at a time), then quantized to Q4_K_M and Q8_0 by llama.cpp's own quantizer (llama-cpp-python's
`llama_model_quantize`). The files live in `~/.cache/llmos-bench/llama1b/` (`LLMOS_BENCH_CACHE` moves
it), are reused while their size and header hash match the manifest written beside them, and are
rebuilt when absent or different. The tokenizer is a synthetic byte-level BPE of the right size (the
256 byte pieces, byte pairs, byte triples, then 256 Llama-3-style special tokens; `pre` "llama-bpe"),
which both llama.cpp and llmos load: the bench feeds ids, so what the pieces say does not matter.

Rows, per file and thread count, llmos (auto form: the file's own blocks) beside llama-cpp-python, each
engine in its own process (bench/engines.py), engines alternating within each of `rounds` rounds,
medians: load, load to first token, prefill 512, decode batch 1, peak RSS, and the bandwidth floor:
the bytes of weights a decode step reads (every tensor; the tied token table once, as the head) over
the read bandwidth measured here at the same thread count (a 1 GiB fp32 torch sum), printed as the
floor's tok/s and each engine's time per token as a multiple of it. `--batch` adds 16 concurrent
128-token generations through llmos's batch engine (Q4_K_M) beside llama.cpp's one-stream decode rate,
which is what llama-cpp-python's server gives 16 clients in aggregate: it serves one request at a time
(bench/serve.py).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
RECIPE = 1  # bump when the builder's output changes: cached files of another recipe are rebuilt


@dataclass(frozen=True)
class Shape:
    layers: int
    dim: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    specials: int = 256  # Llama 3's <|begin_of_text|>, <|end_of_text|>, reserved ...: the last ids


LLAMA_1B = Shape(layers=16, dim=2048, heads=32, kv_heads=8, ffn=8192, vocab=128_256)
FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMOS_BENCH_CACHE", Path.home() / ".cache" / "llmos-bench")) / "llama1b"


def byte_pieces() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte 0..255, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def bpe_vocab(shape: Shape) -> tuple[list[str], list[int], list[str]]:
    """(pieces, GGUF token types, merges) of a byte-level BPE with exactly `shape.vocab` ids: bytes,
    then pairs of bytes, then triples (a pair and a byte), each merge building a piece from pieces ranked
    before it, then the special tokens (CONTROL)."""
    base = byte_pieces()
    normal = shape.vocab - shape.specials
    if normal < len(base):
        raise ValueError(f"vocab {shape.vocab} leaves no room for the 256 byte pieces and {shape.specials} specials")
    pieces, merges = list(base), []
    pairs = ((a, b) for a in base for b in base)
    while len(pieces) < normal:
        pair = next(pairs, None)
        if pair is None:
            break
        pieces.append(pair[0] + pair[1])
        merges.append(f"{pair[0]} {pair[1]}")
    for first in pieces[len(base):len(base) + len(base) ** 2]:
        for c in base:
            if len(pieces) >= normal:
                break
            pieces.append(first + c)
            merges.append(f"{first} {c}")
        if len(pieces) >= normal:
            break
    named = ["<|begin_of_text|>", "<|end_of_text|>"]
    pieces += [named[i] if i < 2 else f"<|reserved_special_token_{i - 2}|>" for i in range(shape.specials)]
    types = [1] * normal + [3] * shape.specials  # gguf.TokenType NORMAL, CONTROL
    return pieces, types, merges


def tensors(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, numpy shape) in file order; tied embeddings: no output.weight."""
    head = shape.dim // shape.heads
    out = [("token_embd.weight", (shape.vocab, shape.dim))]
    for i in range(shape.layers):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (shape.dim,)), (p + "attn_q.weight", (shape.dim, shape.dim)),
                (p + "attn_k.weight", (shape.kv_heads * head, shape.dim)), (p + "attn_v.weight", (shape.kv_heads * head, shape.dim)),
                (p + "attn_output.weight", (shape.dim, shape.dim)), (p + "ffn_norm.weight", (shape.dim,)),
                (p + "ffn_gate.weight", (shape.ffn, shape.dim)), (p + "ffn_up.weight", (shape.ffn, shape.dim)),
                (p + "ffn_down.weight", (shape.dim, shape.ffn))]
    return out + [("output_norm.weight", (shape.dim,))]


def write_f16(path: Path, shape: Shape, seed: int = 0) -> Path:
    """The F16 GGUF of `shape` with seeded random weights, N(0, 1/in_features) so activations keep their
    scale through the layers, norms 1; written through a temporary file one tensor at a time (memory
    bounded by the largest tensor)."""
    import gguf

    from llmos.files import commit, temp_for

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_for(path)
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("llama1b-random")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(2048)
    writer.add_embedding_length(shape.dim)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500_000.0)
    writer.add_rope_dimension_count(shape.dim // shape.heads)
    writer.add_vocab_size(shape.vocab)
    pieces, types, merges = bpe_vocab(shape)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(pieces)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(shape.vocab - shape.specials)
    writer.add_eos_token_id(shape.vocab - shape.specials + 1)
    writer.add_add_bos_token(True)
    layout = tensors(shape)
    for name, dims in layout:
        dtype = np.float32 if len(dims) == 1 else np.float16
        writer.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
    rng = np.random.default_rng(seed)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, dims in layout:
            if len(dims) == 1:
                writer.write_tensor_data(np.ones(dims, np.float32))
            else:
                w = rng.standard_normal(dims, dtype=np.float32)  # (out, in)
                w *= 1.0 / np.sqrt(dims[1])
                writer.write_tensor_data(w.astype(np.float16))
                del w
    finally:
        writer.close()
    commit(tmp, path)
    return path


def quantize(src: Path, dst: Path, form: str, threads: int) -> Path:
    """`src` quantized to `form` ("q4_k_m", "q8_0") by llama.cpp's own quantizer, written atomically."""
    import llama_cpp

    from llmos.files import commit, temp_for

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[form])
    params.nthread = threads
    tmp = temp_for(dst)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src.name} -> {form}) failed with {rc}")
    commit(tmp, dst)
    return dst


def fingerprint(path: Path) -> dict:
    """Size and sha256 of the first MiB (header, metadata, tensor table): what the cache checks."""
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"size": path.stat().st_size, "head_sha256": head}


def model_files(folder: Path | None = None, shape: Shape = LLAMA_1B, forms: tuple[str, ...] = ("q4_k_m", "q8_0"),
                threads: int = 2, seed: int = 0) -> dict[str, Path]:
    """{"f16": path, form: path, ...}: reused when the manifest's recipe and each file's fingerprint
    match, rebuilt otherwise (the F16 file first, the quantized ones from it)."""
    from llmos.files import write_atomically

    folder = folder or cache_dir()
    manifest_path = folder / "manifest.json"
    recipe = {"recipe": RECIPE, "shape": asdict(shape), "seed": seed}
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("recipe") != recipe:
        manifest = {"recipe": recipe, "files": {}}
    paths = {"f16": folder / "llama1b-f16.gguf", **{f: folder / f"llama1b-{f}.gguf" for f in forms}}

    def fresh(name: str) -> bool:
        p = paths[name]
        return p.exists() and manifest["files"].get(name) == fingerprint(p)

    for name, path in paths.items():
        if fresh(name):
            continue
        t0 = time.perf_counter()
        if name == "f16":
            write_f16(path, shape, seed)
        else:
            if not fresh("f16"):
                raise RuntimeError("the F16 file changed while building")
            quantize(paths["f16"], path, name, threads)
        manifest["files"][name] = fingerprint(path)
        print(f"  built {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        write_atomically(manifest_path, json.dumps(manifest, indent=2))
    return paths


def decode_bytes(path: Path) -> int:
    """Bytes of weights one decode step reads: every tensor, except the token table when the file has
    its own output head (then one row of the table is read, which is nothing beside the rest)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight", None)
    return sum(sizes.values())


def read_bandwidth(threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s of a torch sum over `nbytes` of fp32 at `threads` threads (median of `reps` after a
    warm-up): the read floor a memory-bound decode step can reach."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        big = torch.ones(nbytes // 4)
        big.sum()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            big.sum()
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return big.numel() * 4 / statistics.median(times)


def rows(paths: dict[str, Path], forms: list[str], threads_list: list[int], rounds: int) -> dict:
    from bench.run import measure, table

    engines = ["llmos"] + (["llama.cpp"] if importlib.util.find_spec("llama_cpp") else [])
    out: dict = {}
    for threads in threads_list:
        bandwidth = read_bandwidth(threads)
        for form in forms:
            path = paths[form]
            nbytes = decode_bytes(path)
            floor_tps = bandwidth / nbytes
            runs: dict[str, list[dict]] = {e: [] for e in engines}
            for r in range(rounds):
                for e in engines:  # alternating, so drift in machine load hits both alike
                    runs[e].append(measure(e, path, threads, "auto" if e == "llmos" else form))
                    print(f"  {form} {threads}t round {r + 1}: {e}: {runs[e][-1]}", file=sys.stderr)
            med = {e: {k: statistics.median(x[k] for x in runs[e]) for k, v in runs[e][0].items()
                       if isinstance(v, (int, float))} for e in engines}
            print(f"\n{path.name}, {threads} thread(s): decode reads {nbytes / 1e6:.0f} MB of weights; read bandwidth "
                  f"{bandwidth / 1e9:.1f} GB/s; bandwidth floor {floor_tps:.1f} tok/s ({1e3 / floor_tps:.1f} ms/token)")
            print(table([
                ("load (s)", {e: med[e]["load_s"] for e in engines}, False),
                ("load to 1st token (s)", {e: med[e]["first_token_s"] for e in engines}, False),
                ("prefill 512 (tok/s)", {e: med[e]["prefill_tps"] for e in engines}, True),
                ("decode batch 1 (tok/s)", {e: med[e]["decode_tps"] for e in engines}, True),
                ("decode x floor time", {e: floor_tps / med[e]["decode_tps"] for e in engines}, False),
                ("peak RSS (MB)", {e: med[e]["peak_rss_mb"] for e in engines}, False),
            ], engines))
            out[f"{form}/{threads}t"] = {"file": path.name, "threads": threads, "decode_bytes": nbytes,
                                         "read_gb_per_s": bandwidth / 1e9, "floor_tps": floor_tps,
                                         "medians": med, "runs": runs}
    return out


def batch16(path: Path, threads: int, n: int = 16, tokens: int = 128) -> dict:
    """Aggregate generated tok/s of `n` concurrent `tokens`-token greedy generations in llmos's batch
    engine (the server's), prompts of 16 distinct ids each."""
    import torch

    import llmos
    from llmos.engine.batch import BatchEngine, Request
    from llmos.quality import prompt_ids

    torch.set_num_threads(threads)
    llm = llmos.load(str(path), threads=threads, quiet=True)
    ids = prompt_ids(llm.config.vocab_size)
    engine = BatchEngine(llm.model, max_batch=n, max_len=256, kv_dtype=llm.kv_dtype)
    reqs = [Request(ids[i * 16:(i + 1) * 16], tokens, min_new_tokens=tokens) for i in range(n)]
    for r in reqs:
        engine.submit(r)
    t0 = time.perf_counter()
    while not engine.idle:
        engine.step()
    return {"requests": n, "tokens": tokens, "aggregate_tps": sum(len(r.output) for r in reqs) / (time.perf_counter() - t0)}


def profile(path: Path, threads: int, reps: int = 10) -> dict:
    """Where llmos's decode step goes on `path` at `threads`: each GGUF part's one-row product through
    the installed kernels, timed in `reps` passes over all parts in model order (medians), summed per
    GGML type (the tied head apart),
    beside the whole step's time (greedy decode, bench/engines.py's measure in this process); the rest
    is attention, norms, RoPE, the token row and Python."""
    import torch

    import llmos
    from llmos.gguf_linear import GGUFLinear
    from llmos.quality import timed
    from llmos.weights.dequant import type_name

    torch.set_num_threads(threads)
    llm = llmos.load(str(path), threads=threads, quiet=True)
    step_ms = 1e3 / timed(llm.model, llm.config.vocab_size, 63, llm.kv_dtype)["decode_tps"]
    calls = []  # (type key, one-row product) in the model's order
    nbytes: dict[str, int] = {}
    for name, layer in llm.model.named_modules():
        if isinstance(layer, GGUFLinear):
            x = torch.randn(1, layer.in_features)
            for raw, qtype in layer.parts():
                key = f"head {type_name(qtype)}" if name == "output" else type_name(qtype)
                nbytes[key] = nbytes.get(key, 0) + raw.numel()
                calls.append((key, lambda x=x, raw=raw, qtype=qtype, layer=layer: layer.kernels.gguf_mm(
                    x, raw.view(-1), qtype, raw.shape[0])))
    # Whole passes in model order, as a decode step reads them: each part's weights come from memory,
    # not from the cache a repeated call of one part would leave them in.
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(reps + 1):
        for i, (_, call) in enumerate(calls):
            t = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - t)
    per: dict[str, list[float]] = {}
    for (key, _), t in zip(calls, times):
        per.setdefault(key, []).append(statistics.median(t[1:]) * 1e3)  # the first pass faults pages in
    kernels = {k: {"parts": len(v), "ms": sum(v), "gb_per_s": nbytes[k] / sum(v) / 1e6} for k, v in per.items()}
    rest = step_ms - sum(v["ms"] for v in kernels.values())
    print(f"\n{path.name}, {threads} thread(s): decode step {step_ms:.1f} ms")
    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]["ms"]):
        print(f"  {k:<12} {v['parts']:>4} products {v['ms']:8.2f} ms  {v['ms'] / step_ms * 100:5.1f}%  "
              f"{nbytes[k] / 1e6:6.0f} MB at {v['gb_per_s']:5.1f} GB/s")
    print(f"  {'rest':<12} {'':>4}          {rest:8.2f} ms  {rest / step_ms * 100:5.1f}%  (attention, norms, RoPE, Python)")
    return {"step_ms": step_ms, "kernels": kernels, "rest_ms": rest}


def run(threads_list: list[int] | None = None, forms: list[str] | None = None, rounds: int = 3, batch: bool = False) -> dict:
    """`make bench`'s section (bench/run.py --only llama1b)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {"error": "llama-cpp-python is not installed (make bench-deps): it quantizes the 1B files"}
    threads_list = threads_list or [1, 2]
    forms = forms or list(FTYPES)
    paths = model_files(forms=tuple(forms), threads=max(threads_list))
    result: dict = {"shape": asdict(LLAMA_1B), "rows": rows(paths, forms, threads_list, rounds)}
    if batch and "q4_k_m" in forms:
        threads = max(threads_list)
        ours = batch16(paths["q4_k_m"], threads)
        theirs = result["rows"].get(f"q4_k_m/{threads}t", {}).get("medians", {}).get("llama.cpp", {}).get("decode_tps")
        print(f"\n16 concurrent 128-token generations, Q4_K_M, {threads} threads: llmos batch engine "
              f"{ours['aggregate_tps']:.1f} tok/s aggregate; llama-cpp-python's server serves one request at a time, "
              f"so its aggregate is its batch-1 decode, {theirs or float('nan'):.1f} tok/s"
              + (f": {ours['aggregate_tps'] / theirs:.2f}x" if theirs else ""))
        result["batch16"] = {"llmos": ours, "llama.cpp_one_stream_tps": theirs}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--files", default="q4_k_m,q8_0", help="comma-separated forms: q4_k_m,q8_0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", action="store_true", help="also 16 concurrent generations (Q4_K_M)")
    parser.add_argument("--build-only", action="store_true", help="make (or check) the files and stop")
    parser.add_argument("--profile", action="store_true", help="where llmos's decode step goes, per GGML type, and stop")
    args = parser.parse_args()
    forms = [f for f in args.files.split(",") if f]
    threads = [int(t) for t in args.threads.split(",") if t]
    if args.build_only:
        for name, path in model_files(forms=tuple(forms), threads=max(threads)).items():
            print(f"{name}: {path} ({path.stat().st_size / 1e6:.0f} MB, decode reads {decode_bytes(path) / 1e6:.0f} MB)")
        return
    if args.profile:
        paths = model_files(forms=tuple(forms), threads=max(threads))
        for t in threads:
            for form in forms:
                profile(paths[form], t)
        return
    result = run(threads, forms, args.rounds, args.batch)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"llama1b-{date.today()}.json"
    try:  # runs of other thread counts or files the same day are kept beside this one's
        earlier = json.loads(out.read_text())
        result = {**earlier, **result, "rows": {**earlier.get("rows", {}), **result["rows"]}}
    except (OSError, ValueError):
        pass
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
