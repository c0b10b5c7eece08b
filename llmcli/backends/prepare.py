"""`prepare(model, options)`: after loading, swap in the modules that decide how each product runs.

A model is built with plain nn.Linear layers. Here, in order: projections that read the same input are
fused into one product; `--quantize int8` turns linears into `Int8Linear`, `--quantize int4` into
`Int4Linear` (the head into `Int6Linear` where the integer kernels run, else into `Int8Linear`, as are layers
whose shape torch's int4 packing cannot take), `--quantize int5` into `Int5Linear` (the head as in int4; int8 where
the integer kernels do not run); a GGUF's linears stored in 4 or 5 bits (or, in an int8 run of a Q8_0 or Q6_K file,
in those) keep the file's codes (`stored_int4`); on CPU, bfloat16 linears move into the bfloat16 kernel's panels
(`BlockedLinear`; Qwen MoE routers `PanelRouter`) where the kernel runs, else (eager) into oneDNN's layout
(`PackedLinear`); with `--compile`, the plain linears left become `SummingLinear` and MoE experts are stacked
(`StackedExperts`, also eagerly when a kernel holds them);
the runner then compiles the decode step; a head in a CPU kernel returns float32 logits (head.py). Linears the
model reads directly (`CausalLM.keeps_weight`) stay as they are.

During loading the same steps run layer by layer (`Preparation.loaded`), so that a layer's replaced
weights are freed before the next layer is read.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from llmcli.backends import bf16_kernel, crossover, decode_ops, int4, int8_kernel, int_dot, weight_arena
from llmcli.backends.compile import CompiledDecode
from llmcli.backends.experts import StackedExperts, in_kernel_blocks
from llmcli.backends.grouped_experts import GroupedExperts, can_group
from llmcli.backends.head import float32_logits
from llmcli.backends.heap import EXPERTS_PER_TRIM, release_freed_memory
from llmcli.backends.int4 import Int4Linear, Int5Linear, Int6Per16Linear, Int8GroupLinear
from llmcli.backends.int6 import Int6Linear
from llmcli.backends.int8 import Int8Linear, bf16_matmul_is_fast
from llmcli.backends.linear import (
    BlockedEmbedding,
    BlockedLinear,
    Float32PromptLinear,
    PackedLinear,
    SummingLinear,
    prepacking_available,
)
from llmcli.backends.router import swap_routers
from llmcli.backends.runner import Runner
from llmcli.errors import LlmcliError
from llmcli.formats.gguf import INT4_FILE_BITS
from llmcli.formats.gguf_int4 import INT4_TYPES, INT5_TYPES, Q6_TYPES, STORED_IN_INT8_RUNS, int8_runs_take_as_stored
from llmcli.models.base import CausalLM, FusesProjections
from llmcli.models.layers import Experts
from llmcli.options import Options

CODE_PART_VALUES = 1 << 22  # a file's codes extracted and packed at a time (~15 bytes of temporaries each)

# The integer kernel's module and packer for each kind of codes a file stores (GGUFSource.codes_in_parts)
STORED_KINDS = {
    "int4": (Int4Linear, int4.zero_form_blocks),
    "int5": (Int5Linear, int_dot.int5_blocks),
    "int8": (Int8GroupLinear, lambda q, scale, _: int_dot.int8_group_blocks(q, scale)),
    "q6_k": (Int6Per16Linear, int_dot.q6_k_blocks),
}


def parents_of_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with nn.Linear children. Collect parents only: a list holding the children themselves
    would keep every replaced weight alive until the end, doubling peak memory."""
    return [(name, module) for name, module in model.named_modules()
            if any(isinstance(child, nn.Linear) for child in module.children())]


def shared_weights(model: nn.Module) -> set[int]:
    seen, shared = set(), set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen else seen).add(id(param))
    return shared


def is_head(name: str) -> bool:
    return name.rpartition(".")[2] == "lm_head"


def swap_linears(module: nn.Module, make) -> int:
    """Replace nn.Linear children (exactly that type: not what a backend swapped in) one at a time, so peak
    memory grows by one layer: `make(name, linear)` gives the new module, or None to keep it. Returns the
    number replaced."""
    count = 0
    for name, parent in parents_of_linears(module):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            new = make(f"{name}.{child_name}" if name else child_name, child)
            if new is not None:
                setattr(parent, child_name, new)
                count += 1
    return count


def block_tied_head(module: nn.Module) -> bool:
    """A bfloat16 head that shares its weight with the input embedding (and nothing else) becomes a
    BlockedLinear and the embedding a BlockedEmbedding on the same panels. Returns whether it did."""
    holders = [(parent, name, child) for _, parent in module.named_modules()
               for name, child in parent.named_children() if isinstance(child, (nn.Embedding, nn.Linear))]
    embeddings = {id(m.weight): (p, n, m) for p, n, m in holders if isinstance(m, nn.Embedding)}
    for parent, name, child in holders:
        tied = embeddings.get(id(child.weight)) if type(child) is nn.Linear else None
        if tied is None or child.bias is not None or not bf16_kernel.suits(child.weight):
            continue
        if sum(t is child.weight for _, t in module.named_parameters(remove_duplicate=False)) != 2:
            continue  # a third holder would keep reading the plain weight
        head = BlockedLinear(child, consume=True)
        setattr(parent, name, head)
        setattr(tied[0], tied[1], BlockedEmbedding(head))
        return True
    return False


def pack_linears(module: nn.Module, kernel: bool, prepack: bool, keep=lambda name: False,
                 float32_prompts: bool = False) -> int:
    """CPU bfloat16 linears into the bfloat16 kernel's panels (`kernel`: it runs here), else into oneDNN's
    layout (`prepack`), else with prompts in float32 (`float32_prompts`: no native bfloat16 products here).
    Layers whose weight other code reads directly (`keep(name)`) stay as they are, and so do those that share
    their weight, unless it is a head tied to the embedding and the kernel runs. Returns the number swapped."""
    count = int(kernel and block_tied_head(module))
    shared = shared_weights(module)

    def pack(name, child):
        w = child.weight
        if w.dtype != torch.bfloat16 or w.device.type != "cpu" or id(w) in shared or keep(name):
            return None
        if kernel and bf16_kernel.suits(w):
            return BlockedLinear(child, consume=True)
        if prepack:
            return PackedLinear(child)
        return Float32PromptLinear(child) if float32_prompts else None

    return count + swap_linears(module, pack)


class Preparation:
    """The decisions for one model and options, applied to parts of the model as they are loaded
    (`loaded`) and then to the whole (`finish`)."""

    UNITS = (re.compile(r"^(.*?\.layers\.\d+\.mlp\.experts\.\d+\.)"), re.compile(r"^(.*?\.layers\.\d+\.)"))

    def __init__(self, model: CausalLM, options: Options, stored=None):
        """`stored`: a file with 4- or 5-bit weights (GGUF): `stored.stores(name, types)`, is that weight in one of
        the types, and `stored.codes_in_parts(name, kind, rows)`, its codes as the file stores them."""
        self.model, self.options = model, options
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        cpu = self.device.type == "cpu"
        self.int5 = options.quantize == "int5"
        self.int4 = options.quantize == "int4" or self.int5  # int5: the same steps, 5 bits where it can
        self.stored = stored if self.int4 else None
        # int4 runs keep misfits in int8, and the head where the integer kernels do not run
        self.int8 = options.quantize == "int8" or self.int4
        self.notes: list[str] = []
        self.int8_kernel = self.bf16_kernel = False
        wait = options.kernel_build != "background"
        if self.int4 and not int4.available(self.device.type):
            raise LlmcliError(f"--quantize {options.quantize} runs on CPU only; this model is on "
                              f"{self.device.type}: use --quantize int8 there", exit_code=2)
        if cpu and self.int8:
            if options.int8_kernel:
                self.int8_kernel, note = int8_kernel.available(wait)
            else:
                note = "int8 decode kernel disabled (LLMCLI_INT8_KERNEL=0)"
            self.notes += [note] if note else []
        if cpu and self.dtype == torch.bfloat16:
            if options.bf16_kernel:
                self.bf16_kernel, note = bf16_kernel.available(wait)
            else:
                note = "bfloat16 CPU kernel disabled (LLMCLI_BF16_KERNEL=0)"
            if not self.int8 and note:
                self.notes.append(note)
        self.int8_gemm = self.int8_kernel and int8_kernel.gemm_available()
        # integer dot products (activations quantised to int8) where the CPU has AVX2, AVX-512 ones included: on a
        # Zen 4 the float int8 kernel's decode products were no faster, and only the integer weights take the
        # fused MLP and expert ops (int8 decode, one sitting: DeepSeek-V3 shape 11.3 -> 8.8 ms a step, Qwen2.5-0.5B
        # shape 20.0 -> 18.5). Many-row products keep the AVX512-BF16 GEMM where it runs (Int8Linear.forward).
        self.int_dot = self.int8_kernel and options.int_dot and int_dot.runs_fast()
        # An int8 run of a file's Q8_0 and Q6_K linears takes their codes and scales as stored (Int8GroupLinear,
        # Int6Per16Linear): the per-row int8 grid would round each weight a second time.
        self.int8_groups = (options.quantize == "int8" and self.int_dot and stored is not None
                            and int8_runs_take_as_stored(stored.layer_types()))
        if self.int8_groups:
            self.stored = stored
        if self.int5 and not self.int_dot:
            self.notes.append("int5 runs on llmcli's AVX2 integer kernel, which does not run here: layers in int8")
        # A 4-bit file's few wider parts (Q4_K_M keeps attn_v and ffn_down in Q6_K in half the layers, Q5_0 where a
        # width is not a multiple of 256) run in int5 in an int4 run, nearer their own precision than 4 bits.
        layer_bits = self.stored.layer_bits() if self.stored is not None else None
        self.wide_parts_in_int5 = (not self.int5 and self.int_dot and layer_bits is not None
                                   and layer_bits <= INT4_FILE_BITS)
        self.pack = cpu  # bfloat16 linears reordered for CPU products
        self.prepack = cpu and options.prepack and not options.compile and prepacking_available()
        self.float32_prompts = cpu and not options.compile and not bf16_matmul_is_fast()
        self.fused_decode = cpu and not options.compile and options.fused_decode and decode_ops.available(wait)
        self.pending: dict[str, set[str]] = {}
        self.parts_done = 0
        for name in model.state_dict():
            for prefix in self._units(name):
                self.pending.setdefault(prefix, set()).add(name)

    def _units(self, name: str) -> list[str]:
        """The units `name` belongs to, innermost first: an expert, then a decoder layer."""
        return [match.group(1) for match in (unit.match(name) for unit in self.UNITS) if match]

    # -- per part ------------------------------------------------------------------------------

    def loaded(self, name: str) -> None:
        """Called with each parameter name as it is loaded: prepares each MoE expert, then each decoder
        layer, once all of its tensors are in, and frees what that replaced before more is read. So the
        load peaks at about the final model plus one layer's dense part or one expert, instead of the
        loaded and the final weights together (a MoE layer of DeepSeek-V3 is 22 GB in bfloat16)."""
        for prefix in self._units(name):
            remaining = self.pending.get(prefix)
            if remaining is None:
                continue
            remaining.discard(name)
            if not remaining:
                del self.pending[prefix]
                with torch.no_grad():
                    self.prepare_part(self.model.get_submodule(prefix[:-1]), prefix)
                self.parts_done += 1
                if prefix == self._units(prefix)[-1] or self.parts_done % EXPERTS_PER_TRIM == 0:  # heap.py
                    release_freed_memory()
        if self.int8 and is_head(name.removesuffix(".weight")):
            self.quantize_head(name.removesuffix(".weight"))

    def quantize_head(self, name: str) -> None:
        """An untied head in an int8/int4 run, quantised as soon as its weight is in rather than at the end: a
        checkpoint that stores it first (DeepSeek's safetensors: lm_head sorts before model.*) otherwise kept it in
        bfloat16 through the whole load (DeepSeek-V3 shape, int8: the load peaked at 1.27x its weights, now 1.06x).
        A head tied to the embedding waits: the embedding keeps that weight."""
        parent_name, _, child_name = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        head = getattr(parent, child_name, None)
        if type(head) is not nn.Linear or self.model.keeps_weight(name):
            return
        if any(weight is head.weight for other, weight in self.model.named_parameters(remove_duplicate=False)
               if other != name + ".weight"):  # tied: its values may not even be loaded yet
            return
        with torch.no_grad():  # as prepare_part would: the file's codes where it takes them as stored (the float
            # weight was then never read), else quantised
            new = self.stored_int4(name, head) if self.stored is not None else None
            setattr(parent, child_name, new if new is not None else self.quantized(name, head))
        del head, new
        release_freed_memory()

    def prepare_part(self, module: nn.Module, prefix: str = "") -> None:
        """Fuse, quantise and reorder within `module` (parts already done are left alone). Linears stored in
        4-bit become Int4Linear first, with the file's codes; that leaves them out of fusing."""
        if self.stored is not None:
            swap_linears(module, lambda name, child: self.stored_int4(prefix + name, child))
            if self.int_dot and self.int4:  # the rest in int4 now: q/k/v and gate/up join whatever types the file mixed
                swap_linears(module, lambda name, child: self.int4_to_join(prefix + name, child))
        for part in [m for m in module.modules() if isinstance(m, FusesProjections)]:
            if not part.projections_fused:
                part.fuse_projections()
                part.projections_fused = True
        def keep(name: str) -> bool:
            return self.model.keeps_weight(prefix + name)

        if self.int8:
            swap_linears(module, lambda name, child: None if keep(name) else self.quantized(name, child))
        if self.pack:
            pack_linears(module, self.bf16_kernel, self.prepack, keep, self.float32_prompts)
            if self.bf16_kernel:
                swap_routers(module)

    def takes_stored_int4(self, weight_name: str) -> bool:
        """Will this weight become an Int4Linear from the file's own 4-bit codes? (Then loading need not read it
        as floats: the codes are read once, when the layer is prepared.)"""
        if self.stored is None or not weight_name.endswith(".weight"):
            return False
        name = weight_name.removesuffix(".weight")
        try:
            linear = self.model.get_submodule(name)
        except AttributeError:
            return False
        return (type(linear) is nn.Linear and self._may_store_int4(name, linear)
                and self.stored.stores(weight_name, self._stored_types(name)))

    def _stored_types(self, name: str) -> tuple[str, ...]:
        """The file's types whose codes this run takes as stored for linear `name`: 4-bit ones, in int5 5-bit ones,
        in int8 Q8_0 and Q6_K; a low-bit run's head Q6_K (6.5625 bits, the file's own matrix, where Int6Linear
        re-quantised it onto a grid per 64 inputs)."""
        if self.int8_groups:
            return STORED_IN_INT8_RUNS
        if is_head(name):
            return Q6_TYPES
        return INT4_TYPES + (INT5_TYPES if self.int5 and self.int_dot else ())

    def _may_store_int4(self, name: str, linear: nn.Linear) -> bool:
        """Low-bit runs keep the head in more bits: a Q6_K head as stored where the integer kernel runs, else
        Int6Linear; an int8 run takes a Q8_0 or Q6_K head as stored too."""
        return ((self.int8_groups or not is_head(name) or self.int_dot) and not self.model.keeps_weight(name)
                and int4.fits(linear.weight.shape))

    def stored_int4(self, name: str, linear: nn.Linear) -> nn.Module | None:
        if not self._may_store_int4(name, linear):
            return None
        if self.int8_groups or is_head(name):
            stored_name = self._stored_name(name, linear)
            if self.int8_groups and (held := self.stored_blocks(stored_name, "int8", linear)) is not None:
                return held
            return self.stored_blocks(stored_name, "q6_k", linear)
        if self.int5 and self.int_dot and (held := self.stored_blocks(name + ".weight", "int5", linear)) is not None:
            return held
        if self.int_dot and int_dot.int4_fits(tuple(linear.weight.shape)):
            return self.stored_blocks(name + ".weight", "int4", linear)
        parts = self.stored.codes_in_parts(name + ".weight", "int4", linear.out_features)  # torch's packing: whole
        return None if parts is None else Int4Linear(linear, quantized=next(parts), integer=self.int_dot)

    def stored_blocks(self, name: str, kind: str, linear: nn.Linear) -> Int4Linear | None:
        """`linear` as the integer kernel's module for `kind` (STORED_KINDS) holding the file's codes of checkpoint
        tensor `name`, packed a few thousand rows at a time; None where the file does not store it so."""
        parts = self.stored.codes_in_parts(name, kind, int_dot.rows_per_part(linear.in_features, CODE_PART_VALUES))
        if parts is None:
            return None
        cls, pack = STORED_KINDS[kind]
        return cls.holding(linear, *int_dot.blocks_in_parts(parts, linear.out_features, pack))

    def _stored_name(self, name: str, linear: nn.Linear) -> str:
        """The checkpoint tensor holding `linear`'s weight: its own, or a tied head's embedding (SmolLM2's Q8_0 file
        stores the two as one token_embd)."""
        if not self.stored.stores(name + ".weight", self._stored_types(name)):
            for embedding_name, module in self.model.named_modules():
                if isinstance(module, nn.Embedding) and module.weight is linear.weight:
                    return embedding_name + ".weight"
        return name + ".weight"

    def int4_to_join(self, name: str, linear: nn.Linear) -> nn.Module | None:
        """A linear the file does not store in 4 bits, in int4 (int5) before fusing: llama.cpp's Q4_K_M keeps attn_v
        and ffn_down in Q6_K in some layers, and a stored q and k (Int4Linear) would not join a float v. The same
        codes as quantising the joined matrix afterwards (groups run along each row). A 4-bit file's parts stored
        in more bits take int5 instead (`wide_parts_in_int5`); joined with 4-bit ones, those take int5's layout."""
        if is_head(name) or not self._may_store_int4(name, linear) or not int_dot.int4_fits(tuple(linear.weight.shape)):
            return None
        bits = self.stored.stored_bits(name + ".weight")
        if self.wide_parts_in_int5 and bits is not None and bits > INT4_FILE_BITS:
            held = self.stored_blocks(name + ".weight", "int5", linear)  # Q5 codes as stored
            return held if held is not None else Int5Linear(linear)
        return Int5Linear(linear) if self.int5 else Int4Linear(linear, integer=True)

    def quantized(self, name: str, linear: nn.Linear) -> nn.Module:
        head = is_head(name)
        if self.int5 and not head and self.int_dot and int_dot.int4_fits(tuple(linear.weight.shape)):
            return Int5Linear(linear)
        if self.int4 and not self.int5 and not head and int4.fits(linear.weight.shape):
            return Int4Linear(linear, integer=self.int_dot)
        if self.int4 and head and self.int_dot and int_dot.int6_fits(linear.weight.shape):
            return Int6Linear(linear)  # 6 bits, as llama.cpp's Q4_0 files keep it: 4 cost too much quality
        return Int8Linear(linear, kernel=self.int8_kernel, gemm=self.int8_gemm, compiled=self.options.compile,
                          integer=self.int_dot)

    # -- the whole model -------------------------------------------------------------------------

    def finish(self) -> None:
        """What is outside the layers (the head) and any layer left; then what a compiled step needs and
        the expert stacks."""
        with torch.no_grad():
            self.prepare_part(self.model)
            release_freed_memory()
            if self.options.compile:
                cuda_sum = self.options.cuda_gemv == "sum"
                swap_linears(self.model, lambda name, child: SummingLinear(child, cuda_sum))
            for parent in list(self.model.modules()):
                for name, child in list(parent.named_children()):
                    # int4 experts stack only in the integer kernel's blocks (torch's int4 packing has no stacked form)
                    stackable = type(child) is Experts and (not self.int4 or in_kernel_blocks(child))
                    if stackable and self.groups_experts() and can_group(child):
                        setattr(parent, name, GroupedExperts(child))
                        release_freed_memory()
                    elif stackable and (self.options.compile or in_kernel_blocks(child)):
                        setattr(parent, name, StackedExperts(child))  # eager: a decode step's experts in 2 calls
                        release_freed_memory()
            if self.fused_decode:
                decode_ops.install(self.model)
            float32_logits(self.model)
            if self.device.type == "cpu" and not self.options.compile:
                self.notes += crossover.apply(self.model, self.dtype, self.options.crossover)
            if self.device.type == "cpu" and weight_arena.wanted():
                weight_arena.move_into_arena(self.model)
        self.model.eval()

    def groups_experts(self) -> bool:
        """Routed experts over many rows as grouped products (grouped_experts.py): asked for, on CUDA, and on
        CPU in float32 (DeepSeek-V3 shape, prompt 128, 2 cores: 1.1x the loop; in bfloat16 the loop's float32
        prompt products were 1.4x torch's bfloat16 grouped product)."""
        mode = self.options.expert_products
        return mode == "grouped" or (mode == "auto" and (self.device.type == "cuda" or self.dtype == torch.float32))

    def runner(self) -> Runner:
        """The model as drivers call it: with the compiled decode step under --compile."""
        compiled = CompiledDecode(self.model, self.device, self.options) if self.options.compile else None
        return Runner(self.model, compiled)


def prepare(model: CausalLM, options: Options) -> Runner:
    """Prepare a loaded model for `options` in one go (loading does it layer by layer) and return its runner."""
    preparation = Preparation(model, options)
    preparation.finish()
    return preparation.runner()
