"""Did `make demo` learn? Reads the run's metrics.jsonl and checks the promise of the demo:
the final text sample holds at least MIN_WORDS alphabetic words past the prompt and no run of
more than MAX_NEWLINES newlines, and the final validation loss is below MAX_VAL_LOSS.

    python scripts/demo_check.py [RUN_DIR]     (default runs/demo; exit 1 when a check fails)

scripts/demo.sh runs it last, so a demo that regresses into repeats or blank lines fails
instead of printing them.
"""

from __future__ import annotations

import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from gptrain.train.logger import read_metrics

MIN_WORDS = 10
MAX_NEWLINES = 3
MAX_VAL_LOSS = 6.0


@dataclass(frozen=True)
class DemoResult:
    first_val_loss: float
    val_loss: float
    words: int  # alphabetic words in the sample's continuation
    longest_newline_run: int
    continuation: str

    def failures(self) -> list[str]:
        return [
            problem for problem, failed in (
                (f"{self.words} alphabetic words in the sample (want >= {MIN_WORDS})", self.words < MIN_WORDS),
                (f"a run of {self.longest_newline_run} newlines in the sample (want <= {MAX_NEWLINES})",
                 self.longest_newline_run > MAX_NEWLINES),
                (f"final validation loss {self.val_loss:.3f} (want < {MAX_VAL_LOSS})", not self.val_loss < MAX_VAL_LOSS),
            ) if failed
        ]


def alphabetic_words(text: str) -> int:
    """Whitespace-separated words that are letters only once surrounding punctuation is gone
    ("Alice," and "said." count; "1844", "--" and "x7y" do not)."""
    return sum(word.strip(string.punctuation + "“”‘’").isalpha() for word in text.split())


def longest_newline_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"\n+", text)), default=0)


def check_run(run_dir: str) -> DemoResult:
    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    if not evals or evals[-1].get("sample") is None:
        raise SystemExit(f"{run_dir}: no evaluation with a text sample in metrics.jsonl")
    sample = evals[-1]["sample"]
    prompt = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["eval"]["sample_prompt"]
    continuation = sample[len(prompt):] if prompt and sample.startswith(prompt) else sample
    return DemoResult(
        first_val_loss=evals[0]["val_loss"], val_loss=evals[-1]["val_loss"],
        words=alphabetic_words(continuation), longest_newline_run=longest_newline_run(continuation),
        continuation=continuation,
    )


def main(argv: list[str]) -> int:
    run_dir = argv[0] if argv else "runs/demo"
    result = check_run(run_dir)
    failures = result.failures()
    print(
        f"demo check: validation loss {result.first_val_loss:.3f} -> {result.val_loss:.3f}, the final sample has "
        f"{result.words} alphabetic words and at most {result.longest_newline_run} newlines in a row: "
        + ("ok" if not failures else "FAILED: " + "; ".join(failures))
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
