"""Storage faults at full length, with gptrain's default retry settings: an s3:// run behind a
fault-injecting proxy (tests/fault_proxy.py) in front of a real S3 server (moto_server).

    bursts   500 InternalError for 10 s from the first checkpoint write, then 503 SlowDown for
             60 s from the next metrics write: the run must finish, bit for bit equal to an
             uninterrupted one (every logged loss and the final weights).
    outage   503 ServiceUnavailable on every request for --outage-s seconds (default 600) from
             the save of step 6: the run must end on its own with exit status 1 (not 0, not 75)
             and one error line naming the URL; once the outage is over, the same command
             resumes and finishes bit for bit.

    .venv/bin/python benchmarks/storage_faults.py [--outage-s 600] [--dir DIR]

Reports the wall time of each phase, how many requests each fault answered, and the error
line. The training processes are tests/test_resume.py's worker (the real `gptrain train`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from checkpoint_fixtures import prepare_dataset, same_weights  # noqa: E402
from conftest import VENV_BIN, free_port, stop_pid, wait_for_port  # noqa: E402
from fault_proxy import Fault, FaultProxy, checkpoint_write, writes  # noqa: E402
from test_resume import finish, start, train_records, write_config  # noqa: E402

from gptrain.checkpoint.export import load_model_from_checkpoint  # noqa: E402


def bitwise(run_dir: str, straight: Path) -> bool:
    return train_records(run_dir) == train_records(straight) and same_weights(
        load_model_from_checkpoint(run_dir), load_model_from_checkpoint(str(straight)))


def error_line(log: Path, offset: int) -> str:
    lines = [line for line in log.read_text()[offset:].splitlines() if line.startswith("gptrain train: ")]
    return " | ".join(lines) or "(none)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-s", type=float, default=600.0)
    parser.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="storage-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    moto = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = None
    try:
        wait_for_port(port)
        proxy = FaultProxy(f"http://127.0.0.1:{port}")
        os.environ.update(AWS_ENDPOINT_URL=proxy.url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", OMP_NUM_THREADS="1")
        os.environ.pop("AWS_MAX_ATTEMPTS", None)  # the defaults are what is measured
        import s3fs

        s3fs.S3FileSystem().mkdir("faults")
        data = prepare_dataset(root / "dataset")
        log = root / "log.txt"
        straight = root / "straight"
        assert finish(start(write_config(root / "straight.yaml", data, str(straight)), log=log), 600) == 0

        # Bursts: 500s for 10 s, then 503s for 60 s, during saves and metric writes.
        run_dir = "s3://faults/bursts"
        errors = proxy.add(Fault("status", 10, status=500, code="InternalError", start_on=checkpoint_write,
                                 only=writes))
        throttled = proxy.add(Fault("status", 60, status=503, code="SlowDown", only=writes, start_on=lambda m, p: (
            errors.over and writes(m, p) and (p.endswith("metrics.jsonl") or "/checkpoints/" in p))))
        begin = time.monotonic()
        status = finish(start(write_config(root / "bursts.yaml", data, run_dir), log=log), 3600)
        print(f"bursts: exit {status} after {time.monotonic() - begin:.0f} s; 500s answered to {errors.hits} "
              f"requests over 10 s, 503s to {throttled.hits} requests over 60 s; bitwise equal: "
              f"{status == 0 and bitwise(run_dir, straight)}", flush=True)

        # Outage: every request fails for --outage-s seconds from the save of step 6.
        proxy.clear()
        run_dir = "s3://faults/outage"
        config = write_config(root / "outage.yaml", data, run_dir)
        outage = proxy.add(Fault("status", args.outage_s, status=503, start_on=lambda m, p: (
            checkpoint_write(m, p) and "/step-6/" in p)))
        offset = log.stat().st_size
        status = finish(start(config, log=log), args.outage_s + 3600)
        failed_after = time.monotonic() - outage.started_at
        print(f"outage: exit {status} {failed_after:.0f} s into a {args.outage_s:.0f} s outage "
              f"({outage.hits} requests answered 503); error: {error_line(log, offset)}", flush=True)
        while not outage.over:
            time.sleep(1)
        begin = time.monotonic()
        status = finish(start(config, log=log), 3600)
        print(f"outage over: the rerun exited {status} after {time.monotonic() - begin:.0f} s; bitwise equal: "
              f"{status == 0 and bitwise(run_dir, straight)}", flush=True)
    finally:
        if proxy is not None:
            proxy.close()
        stop_pid(moto)
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
