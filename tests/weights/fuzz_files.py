"""File fuzzing, run in a child process by test_fuzz_files.py: Hypothesis mutates a valid tiny GGUF file
or Hugging Face safetensors folder (flipped bytes, truncation, counts, dims, offsets, types, config
values) and each mutant is loaded and run for two tokens. Every outcome must be a model that works or
one LlmosError line; any other exception, a case over CASE_SECONDS, or an allocation past the
address-space cap (MemoryError) fails the run.

    python fuzz_files.py gguf|safetensors EXAMPLES   ->  prints one JSON line of counts, exit 0 if all held
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import struct
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

torch.set_num_threads(1)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llmos.errors import LlmosError  # noqa: E402
from llmos.weights.loader import load_model  # noqa: E402
from tiny_checkpoints import write_gguf, write_hf  # noqa: E402

CASE_SECONDS = 20
HEADROOM = 2 << 30  # bytes of address space a case may add to what the process holds at start
OUTCOMES: Counter[str] = Counter()

U64 = st.one_of(st.integers(0, 64), st.sampled_from([2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1]),
                st.integers(0, 2**64 - 1))


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout(f"a case ran past {CASE_SECONDS} s")


def check(path: Path, label: str) -> None:
    """Load and run `path`: a working model or one LlmosError line; anything else propagates."""
    signal.alarm(CASE_SECONDS)
    try:
        model, config, tokenizer = load_model(path, "fp32", use_cache=False)
        with torch.inference_mode():
            ids = tokenizer.encode("hi", add_special_tokens=False)[:2] or [0]
            logits = model(torch.tensor([ids]), torch.arange(len(ids)))
        assert logits.shape[-1] == config.vocab_size
        OUTCOMES[f"{label}: loaded"] += 1
    except LlmosError as exc:
        assert "\n" not in str(exc), f"a multi-line error: {exc}"
        OUTCOMES[f"{label}: refused"] += 1
    finally:
        signal.alarm(0)


# --- GGUF ----------------------------------------------------------------------------------------------------


def gguf_mutations(base: bytes) -> st.SearchStrategy:
    data_start = 5568 if len(base) > 5568 else len(base)  # the tiny file's header ends here; the rest is weights
    tensor_at = [i for i in range(len(base)) if base.startswith(b"blk.0.", i)][:9]
    flip = st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, data_start - 1), st.integers(1, 255)),
                                                min_size=1, max_size=8))
    truncate = st.tuples(st.just("truncate"), st.integers(0, len(base) - 1))
    counts = st.tuples(st.just("counts"), st.sampled_from([8, 16]), U64)
    # a tensor info: name, n_dims u32, dims u64 x n, type u32, offset u64 (all our tensors are 1-D or 2-D)
    info = st.tuples(st.just("info"), st.sampled_from(tensor_at), st.sampled_from(["n_dims", "dim0", "dim1", "type", "offset"]),
                     U64)
    config = st.tuples(st.just("config"), st.sampled_from(["n_layers", "dim", "heads", "kv", "ffn", "ctx"]),
                       st.one_of(st.integers(0, 70), st.sampled_from([2**20, 2**31, 2**32 - 1])))
    return st.one_of(flip, truncate, counts, info, config)


def apply_gguf(base: bytes, mutation: tuple, out: Path) -> None:
    kind = mutation[0]
    data = bytearray(base)
    if kind == "flip":
        for pos, xor in mutation[1]:
            data[pos] ^= xor
    elif kind == "truncate":
        del data[mutation[1]:]
    elif kind == "counts":
        data[mutation[1]:mutation[1] + 8] = struct.pack("<Q", mutation[2])
    elif kind == "info":
        _, at, field, value = mutation
        name_len = struct.unpack_from("<Q", data, at - 8)[0]
        pos = at + name_len
        n_dims = struct.unpack_from("<I", data, pos)[0]
        where = {"n_dims": (pos, "<I"), "dim0": (pos + 4, "<Q"), "dim1": (pos + 12, "<Q"),
                 "type": (pos + 4 + 8 * n_dims, "<I"), "offset": (pos + 8 + 8 * n_dims, "<Q")}[field]
        if field == "dim1" and n_dims < 2:
            where = (pos + 4, "<Q")
        fmt = where[1]
        struct.pack_into(fmt, data, where[0], value % (2**32 if fmt == "<I" else 2**64))
    elif kind == "config":
        write_gguf(out, {mutation[1]: mutation[2]})
        return
    out.write_bytes(bytes(data))


# --- safetensors folders ------------------------------------------------------------------------------------


def safetensors_mutations(header_len: int, size: int) -> st.SearchStrategy:
    flip = st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 8 + header_len - 1), st.integers(1, 255)),
                                                min_size=1, max_size=6))
    truncate = st.tuples(st.just("truncate"), st.integers(0, size - 1))
    length = st.tuples(st.just("header_len"), U64)
    field = st.tuples(st.just("tensor"), st.integers(0, 19), st.sampled_from(["shape", "dtype", "offsets", "drop", "dup"]),
                      st.one_of(st.integers(-3, 2**33), st.sampled_from(["F64", "I8", "BOOL", "F8_E4M3", "U64", "X"])))
    config = st.tuples(st.just("config"), st.sampled_from(["vocab_size", "hidden_size", "num_hidden_layers",
                                                           "num_attention_heads", "num_key_value_heads",
                                                           "intermediate_size", "max_position_embeddings", "head_dim",
                                                           "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                                                           "model_type", "rope_scaling"]),
                       st.one_of(st.integers(-2, 2**31), st.floats(allow_nan=True), st.text(max_size=5), st.none(),
                                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
    index = st.tuples(st.just("index"), st.sampled_from(["../x.safetensors", "/etc/passwd", "model.safetensors", "missing",
                                                         "", ".", "sub/../model.safetensors"]))
    return st.one_of(flip, truncate, length, field, config, index)


def apply_safetensors(base: Path, mutation: tuple, out: Path) -> None:
    shutil.copytree(base, out)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    kind = mutation[0]
    if kind == "flip":
        for pos, xor in mutation[1]:
            data[pos] ^= xor
    elif kind == "truncate":
        del data[mutation[1]:]
    elif kind == "header_len":
        data[0:8] = struct.pack("<Q", mutation[1])
    elif kind == "tensor":
        _, k, field, value = mutation
        n = struct.unpack_from("<Q", data, 0)[0]
        header = json.loads(data[8:8 + n])
        names = sorted(x for x in header if x != "__metadata__")
        name = names[k % len(names)]
        entry = header[name]
        if field == "shape":
            entry["shape"] = [value if isinstance(value, int) else 1] + entry["shape"][1:]
        elif field == "dtype":
            entry["dtype"] = value if isinstance(value, str) else "F16"
        elif field == "offsets":
            entry["data_offsets"] = [entry["data_offsets"][0], value if isinstance(value, int) else 0]
        elif field == "drop":
            del header[name]
        else:  # the same bytes under a second name that maps to the same weight in another spelling
            header["model." + name] = entry
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        data = bytearray(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    elif kind == "config":
        config = json.loads((out / "config.json").read_text())
        config[mutation[1]] = mutation[2]
        (out / "config.json").write_text(json.dumps(config))
    elif kind == "index":
        from safetensors import safe_open

        names = list(safe_open(str(weights), "pt").keys())
        (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: mutation[1] for n in names}}))
    weights.write_bytes(bytes(data))


def main(kind: str, examples: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        held = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (held + HEADROOM, hard))
    signal.signal(signal.SIGALRM, _alarm)
    work = Path(tempfile.mkdtemp(prefix="llmos-fuzz-"))
    try:
        if kind == "gguf":
            base = write_gguf(work / "base.gguf").read_bytes()
            strategy = gguf_mutations(base)
        else:
            base_dir = write_hf(work / "base")
            raw = (base_dir / "model.safetensors").read_bytes()
            strategy = safetensors_mutations(struct.unpack_from("<Q", raw, 0)[0], len(raw))
        counter = iter(range(10**9))

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def fuzz(mutation: tuple) -> None:
            out = work / f"case{next(counter)}"
            if kind == "gguf":
                out = out.with_suffix(".gguf")
                apply_gguf(base, mutation, out)
            else:
                apply_safetensors(base_dir, mutation, out)
            try:
                check(out, mutation[0])
            finally:
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)

        fuzz()
        print(json.dumps({"cases": sum(OUTCOMES.values()), "outcomes": dict(sorted(OUTCOMES.items()))}))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
