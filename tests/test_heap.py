"""The allocator settings of `ctplatform.heap`, each in a fresh process: the ingress gives freed heap memory back
after a large request (`trim_heap`, measured on the resident memory as Serve's messages leave it, without Ray), and
prepare's processes reuse a freed volume buffer (`reuse_large_buffers`, counted in page faults)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20

# In a process of its own: what an earlier test freed would otherwise be reused by these allocations.
RECEIVE_AND_TRIM = """
import json, threading
import psutil
from ctplatform.heap import trim_heap

process = psutil.Process()
held = {}

def receive():  # as Serve's replica queues a body: ~64 KiB messages, in a thread other than the decode's
    messages, pins = [], []
    for k in range(1600):  # 100 MiB
        messages.append(bytes([k % 251]) * (64 << 10))
        pins.append(bytes([k % 13]) * 64)  # small objects between them, as a live process has
    held["pins"] = pins
    messages.clear()  # the body is on disk: every message is freed

trim_heap()
before = process.memory_info().rss
thread = threading.Thread(target=receive)
thread.start()
thread.join()
freed = process.memory_info().rss
trimmed = trim_heap()
after = process.memory_info().rss
print(json.dumps({"before": before, "freed": freed, "after": after, "trimmed": trimmed, "pins": len(held["pins"])}))
"""


def test_freed_message_sized_allocations_stay_resident_until_the_heap_is_trimmed():
    run = subprocess.run([sys.executable, "-c", RECEIVE_AND_TRIM], capture_output=True, text=True, timeout=50)
    assert run.returncode == 0, run.stderr
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"RSS: before {rss['before'] / MiB:.0f} MiB, messages freed +{(rss['freed'] - rss['before']) / MiB:.0f} "
          f"MiB, trimmed +{(rss['after'] - rss['before']) / MiB:.0f} MiB")
    assert rss["freed"] - rss["before"] > 60 * MiB  # glibc keeps what was freed in the thread's arena
    assert rss["trimmed"] and rss["after"] - rss["before"] < 20 * MiB  # and gives it back when asked
    assert rss["pins"] == 1600


# In a fresh process: the heap setting is process-wide, for the rest of the process's life.
FAULTS_PER_BUFFER = """
import ctypes, json, resource, sys
import numpy as np
from ctplatform.heap import reuse_large_buffers

ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: one fault per 4 KiB page, whatever the machine's THP
if sys.argv[1] == "reuse":
    assert reuse_large_buffers()
def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(64 << 20, np.uint8)  # the first buffer faults in either way
before = faults()
for _ in range(8):  # as prepare decodes one volume after another: a 64 MiB buffer filled, used, freed
    np.ones(64 << 20, np.uint8)
print(json.dumps({"faults_per_buffer": (faults() - before) / 8}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_prepare_workers_reuse_a_freed_volume_buffer_instead_of_faulting_it_in_again():
    def faults(mode: str) -> float:
        run = subprocess.run([sys.executable, "-c", FAULTS_PER_BUFFER, mode], capture_output=True, text=True,
                             timeout=30, check=True)
        return json.loads(run.stdout)["faults_per_buffer"]

    pages = (64 << 20) / 4096
    assert faults("default") > pages / 2  # mapped afresh each time: every page faulted in (and zeroed) again
    assert faults("reuse") < pages / 100
