import platform
import subprocess
import sys

import pytest

from sr_finetune import cpu_memory

MAPPED_BLOCKS = """
import ctypes, torch
from sr_finetune.cpu_memory import reuse_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
blocks_before = libc.mallinfo2().hblks
plain = torch.ones(64 << 20, dtype=torch.uint8)  # a 64 MiB activation
blocks_plain = libc.mallinfo2().hblks
applied = reuse_freed_memory()
tuned = torch.ones(64 << 20, dtype=torch.uint8)
print(blocks_plain - blocks_before, libc.mallinfo2().hblks - blocks_before, applied, reuse_freed_memory())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_large_activations_come_from_the_heap_once_tuned():
    out = subprocess.run([sys.executable, "-c", MAPPED_BLOCKS], capture_output=True, text=True, check=True).stdout.split()
    mapped_plain, mapped_after_tuned, applied, again = int(out[0]), int(out[1]), out[2], out[3]
    assert mapped_plain == 1  # by default glibc maps a 64 MiB block afresh (and unmaps it on free)
    assert mapped_after_tuned == 1  # tuned, the second comes from the heap, where freed blocks are kept
    assert applied == again == "True"  # idempotent


def test_without_glibc_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", None)
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: None)
    assert cpu_memory.reuse_freed_memory() is False
