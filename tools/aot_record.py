"""Which ahead-of-time compiles (tools/triton_aot.py) have passed for exactly these sources: the Triton AOT
stage of the test command compiles only when what it compiles changed.

The key of a run: the Triton version, the profile (ci, quick, full) and the architectures. Its hash: every
file the compile reads (the Triton kernels, the ops' launchers and specs, the activation table, the
dispatcher, the CUDA sources and setup.py for the CUDA kernels' resources, the script itself) and the
torch version. benchmarks/results/triton-aot-passed.json keeps, per key, the hash of the last passing
run (committed with the reports it goes with); a run whose hash matches has nothing new to compile.

    python3 tools/aot_record.py check --triton 3.8.0 --profile ci --arch 80,90    # exit 0: unchanged
No torch or Triton import: the check runs before an environment for that Triton exists.

The same for the 2^31-element CPU tests (tests/test_huge.py: about 3 minutes alone, no other test
beside them): they run when the C++ kernels, the ops' Python side, the build or the test changed since
their last passing run (benchmarks/results/huge-passed.json; `huge-check`, and `huge-pass` after a run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "triton-aot-passed.json"
INPUTS = ("kernels/*.py", "fastgen/ops/*.py", "fastgen/activations.py", "fastgen/dispatch.py", "csrc/*",
          "setup.py", "tools/triton_aot.py")


HUGE_RECORD = ROOT / "benchmarks" / "results" / "huge-passed.json"
HUGE_KEY = "tests/test_huge.py, CPU"
HUGE_INPUTS = ("fastgen/ops/*.py", "fastgen/activations.py", "fastgen/dispatch.py", "csrc/*", "setup.py",
               "tests/test_huge.py", "tests/cases.py")


def key(triton: str, profile: str, archs: str) -> str:
    return f"triton {triton} {profile} sm_{archs.replace(',', ',sm_')}"


def inputs_hash(torch_version: str, inputs=INPUTS) -> str:
    h = hashlib.sha256(torch_version.encode())
    for path in sorted({p for pattern in inputs for p in ROOT.glob(pattern) if p.is_file()}):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def passed_before(k: str, torch_version: str, record: Path = RECORD, inputs=INPUTS) -> dict | None:
    """The record of the last passing run under key k when it compiled these very inputs, else None."""
    try:
        entry = json.loads(record.read_text()).get(k)
    except (OSError, ValueError):
        return None
    return entry if entry and entry.get("hash") == inputs_hash(torch_version, inputs) else None


def remember(k: str, torch_version: str, entry: dict, record: Path = RECORD, inputs=INPUTS) -> None:
    try:
        table = json.loads(record.read_text())
    except (OSError, ValueError):
        table = {}
    table[k] = {"hash": inputs_hash(torch_version, inputs), **entry}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["check", "huge-check", "huge-pass"])
    parser.add_argument("--triton")
    parser.add_argument("--torch", required=True)
    parser.add_argument("--profile")
    parser.add_argument("--arch")
    parser.add_argument("--git-sha", default="")
    parser.add_argument("--seconds", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.action == "huge-pass":
        import datetime
        remember(HUGE_KEY, args.torch, {"git_sha": args.git_sha, "date": datetime.date.today().isoformat(),
                                        "seconds": args.seconds}, HUGE_RECORD, HUGE_INPUTS)
        return 0
    if args.action == "huge-check":
        entry = passed_before(HUGE_KEY, args.torch, HUGE_RECORD, HUGE_INPUTS)
        if entry:
            print(f"{HUGE_KEY}: unchanged since its passing run at {entry.get('git_sha')} ({entry.get('date')}, "
                  f"inputs {entry['hash']}): not run again")
            return 0
        print(f"{HUGE_KEY}: its inputs changed since the last passing run (or none is recorded): running it")
        return 1
    if not (args.triton and args.profile and args.arch):
        parser.error("check needs --triton, --profile and --arch")
    k = key(args.triton, args.profile, args.arch)
    entry = passed_before(k, args.torch)
    if entry:
        print(f"{k}: unchanged since its passing run at {entry.get('git_sha')} ({entry.get('date')}, inputs "
              f"{entry['hash']}): nothing to compile again")
        return 0
    print(f"{k}: its inputs changed since the last passing run (or none is recorded): compiling")
    return 1


if __name__ == "__main__":
    sys.exit(main())
