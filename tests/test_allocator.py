"""`allocator.retain_freed_memory`: a freed large tensor's memory serves the next one without
page faults (run in a fresh interpreter, so the setting and the counts are its own)."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from sparse_lens.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
x = torch.empty(16 * 2**20)  # 64 MiB, above every glibc mmap threshold
x.fill_(1.0)
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.empty(15 * 2**20)  # smaller: it fits the freed block (alignment padding aside)
y.fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_serves_the_next_tensor_without_page_faults():
    applied, faults = probe("retain")
    if applied != "True":
        pytest.skip("not glibc: retain_freed_memory does nothing here")
    assert faults < 500  # 60 MiB of fresh 4 KiB pages would be ~15,000 faults
    _, default_faults = probe("default")
    assert default_faults > 4 * faults + 1000  # what it saves: glibc unmaps and refaults by default
