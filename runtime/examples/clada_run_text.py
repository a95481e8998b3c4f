"""Text in, text out around ``clada_run`` (the C++ TensorRT runner): tokenizes the prompts with
the export's tokenizer, pipes the token ids through the runner, decodes what it prints.

    python runtime/examples/clada_run_text.py OUT --prompt "The capital of France is" \\
        [--runner build/examples/clada_run] [--max-new-tokens 32] [-- RUNNER OPTIONS...]

Everything after ``--`` goes to the runner as is (``--plugin LIB``, ``--static``, ``--dense``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def token_lines(prompts: list[list[int]]) -> str:
    """The runner's input: one prompt per line, ids separated by spaces."""
    return "".join(" ".join(str(t) for t in p) + "\n" for p in prompts)


def parse_output(stdout: str, n_prompts: int) -> list[list[int]]:
    """The runner's output: one line of generated ids per prompt."""
    lines = stdout.splitlines()
    if len(lines) != n_prompts:
        raise RuntimeError(f"clada_run printed {len(lines)} lines for {n_prompts} prompts:\n{stdout}")
    return [[int(t) for t in line.split()] for line in lines]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", metavar="OUT")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--runner", default="build/examples/clada_run", help="the clada_run executable")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)

    from clada_export.prompts import eos_token_ids, load_export_tokenizer
    from clada_export.export.onnx_export import read_manifest

    export_dir = Path(args.export_dir)
    tok = load_export_tokenizer(export_dir, read_manifest(export_dir))
    prompts = [tok(text)["input_ids"] for text in args.prompt]
    eos_ids = eos_token_ids(tok)
    cmd = [args.runner, str(export_dir), "--max-new-tokens", str(args.max_new_tokens), *extra]
    for e in eos_ids:
        cmd += ["--eos", str(e)]
    run = subprocess.run(cmd, input=token_lines(prompts), capture_output=True, text=True)
    sys.stderr.write(run.stderr)
    if run.returncode != 0:
        return run.returncode
    for text, ids in zip(args.prompt, parse_output(run.stdout, len(prompts))):
        print(text + tok.decode([t for t in ids if t not in eos_ids]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
