"""Daemon hygiene in a real process: no core dumps, and once the key is
loaded it is gone from the environment, /proc/PID/environ and children."""

from __future__ import annotations

import json
import sys

from stormfs import keys

from .keyscan import new_key, run

# The child learns which key to look for on stdin, so the only copy in its
# environment is the one under STORMCLOUD_ENCRYPTION_KEY.
CHILD = r"""
import ctypes, json, os, resource, subprocess, sys
from stormfs import hygiene, keys

PR_GET_DUMPABLE = 3

key = sys.stdin.read().encode()
before = open("/proc/self/environ", "rb").read()
hygiene.disable_core_dumps()
ring = keys.load_keyring(key_file=None, environ=os.environ)
hygiene.scrub_key_environment()
json.dump({
    "loaded": ring is not None,
    "in_proc_environ_before": key in before,
    "in_proc_environ": key in open("/proc/self/environ", "rb").read(),
    "in_os_environ": keys.ENV_KEY in os.environ,
    "in_child": key in subprocess.run(["env"], capture_output=True).stdout,
    "in_child_proc": key in subprocess.run(
        ["cat", "/proc/self/environ"], capture_output=True).stdout,
    "key_id_kept": os.environ.get(keys.ENV_KEY_ID),
    "core_limit": resource.getrlimit(resource.RLIMIT_CORE),
    "dumpable": ctypes.CDLL(None).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1,
}, sys.stdout)
"""


def test_key_gone_and_no_core_dumps():
    key = new_key()
    proc = run(
        [sys.executable, "-c", CHILD],
        env={keys.ENV_KEY: key, keys.ENV_KEY_ID: "7"},
        input=key,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "loaded": True,
        "in_proc_environ_before": True,  # the probe can see a key where there is one
        "in_proc_environ": False,
        "in_os_environ": False,
        "in_child": False,
        "in_child_proc": False,
        "key_id_kept": "7",
        "core_limit": [0, 0],
        "dumpable": False,
    }
