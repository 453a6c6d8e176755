"""The ingress gives freed heap memory back after a large request (`ctplatform.heap.trim_heap`): measured on
the resident memory (psutil) of a fresh process, as Serve's messages leave it, without Ray."""

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
