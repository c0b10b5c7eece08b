"""llmcli: run and inspect Qwen and DeepSeek language models natively in PyTorch."""

import os

__version__ = "0.1.0"

# Weights on 2 MiB pages: with this set, torch's CPU allocator asks the kernel for transparent huge pages for every
# buffer of 2 MiB or more (madvise), which Linux's default THP mode ("madvise") otherwise never gives an anonymous
# buffer. Streaming weights through 4 KiB pages walks a page table every 4 KiB: on a 2-core Zen 4, a bfloat16 decode
# step of the Qwen2.5-0.5B shape took 25.6 ms on 4 KiB pages and 19.8 on 2 MiB (README: huge pages). torch reads the
# variable once, at its first allocation, so it is set here, before llmcli imports torch; THP_MEM_ALLOC_ENABLE=0 (set
# by the user) turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
